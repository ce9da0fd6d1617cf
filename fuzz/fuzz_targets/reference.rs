//! Image names as a user types them: `nginx`, `127.0.0.1:5000/a/b:1@sha256:...`,
//! `oci:DIR:TAG`, `docker-archive:F:REPO:TAG`.
//!
//! Beyond not panicking: a registry reference that parses prints as a name that parses back
//! to the same reference (the normalised name is what `--json` reports as `source`), and an
//! ASCII reference parses as oci-spec parses it (which oci2uk further refuses uppercase
//! repositories and digests that oci-spec's `Digest` refuses).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci2uk::reference::{is_loopback_host, ImageRef, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = is_loopback_host(s);
    if s.is_ascii() {
        agrees_with_oci_spec(s);
    }
    let Ok(source) = s.parse::<Source>() else {
        return;
    };
    let shown = source.to_string();
    let _ = source.name();
    match &source {
        Source::Registry(r) => {
            let again: ImageRef = shown
                .parse()
                .unwrap_or_else(|e| panic!("{s:?} prints as {shown:?}, which does not parse: {e}"));
            assert_eq!(&again, r, "{s:?} prints as {shown:?}");
            assert_eq!(again.to_string(), shown);
            let explicit: Source = format!("docker://{shown}").parse().unwrap();
            assert_eq!(explicit, source);
            let _ = (
                r.endpoint(),
                r.manifest_reference(),
                r.name(),
                r.is_loopback(),
            );
            let pinned = r.with_digest(
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            );
            let _ = pinned.to_string();
        }
        Source::OciDir { .. } | Source::OciArchive { .. } | Source::DockerArchive { .. } => {
            // The path holds no colon (skopeo splits at the first), so the name round-trips.
            let again: Source = shown.parse().unwrap();
            assert_eq!(again, source, "{s:?} prints as {shown:?}");
        }
    }
});

fn agrees_with_oci_spec(s: &str) {
    use oci_spec::distribution::Reference;
    let theirs = s.parse::<Reference>();
    match (s.parse::<ImageRef>(), theirs) {
        (Ok(ours), Ok(theirs)) => {
            assert_eq!(ours.registry(), theirs.registry(), "{s:?}");
            assert_eq!(ours.repository(), theirs.repository(), "{s:?}");
            assert_eq!(ours.tag(), theirs.tag(), "{s:?}");
            assert_eq!(ours.digest(), theirs.digest(), "{s:?}");
        }
        (Ok(ours), Err(e)) => panic!("{s:?} parses as {ours} but oci-spec says {e}"),
        (Err(_), Ok(theirs)) => {
            let upper = theirs.repository().bytes().any(|b| b.is_ascii_uppercase());
            let bad_digest = theirs
                .digest()
                .is_some_and(|d| d.parse::<oci_spec::image::Digest>().is_err());
            assert!(upper || bad_digest, "{s:?} is refused but oci-spec takes it");
        }
        (Err(_), Err(_)) => {}
    }
}

//! Image names as a user types them: `nginx`, `127.0.0.1:5000/a/b:1@sha256:...`,
//! `oci:DIR:TAG`, `docker-archive:F:REPO:TAG`.
//!
//! Beyond not panicking: a registry reference that parses prints as a name that parses back
//! to the same reference (the normalised name is what `--json` reports as `source`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci2uk::reference::{is_loopback_host, ImageRef, Source};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = is_loopback_host(s);
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

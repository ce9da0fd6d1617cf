//! Manifests and indexes as any transport hands them over: arbitrary bytes with the content
//! type a registry or descriptor claims (chosen by the first byte), then platform selection
//! and the layers' media types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci2uk::oci::{
    self as select, parse_document, select_platform, Compression, Document, Platform, DOCKER_LIST,
    DOCKER_MANIFEST, DOCKER_SCHEMA1, OCI_INDEX, OCI_MANIFEST,
};

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some(OCI_MANIFEST),
    Some(OCI_INDEX),
    Some(DOCKER_MANIFEST),
    Some(DOCKER_LIST),
    Some(DOCKER_SCHEMA1),
    Some("application/json"),
    Some("text/plain; charset=utf-8"),
    Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
    Some(""),
    Some("application/octet-stream"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, doc)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let Ok(parsed) = parse_document(doc, content_type, "the manifest") else {
        return;
    };
    match parsed {
        Document::Index(index) => {
            let mut platforms = vec![
                Platform::host(),
                "linux/arm64".parse::<Platform>().unwrap(),
                "linux/arm64/v8".parse().unwrap(),
                "linux/arm/v7".parse().unwrap(),
            ];
            // Each entry's own platform, as `--platform` would spell it, must select an entry.
            for d in index.manifests() {
                if let Some(p) = d.platform() {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s = format!("{s}/{v}");
                    }
                    if let Ok(p) = s.parse::<Platform>() {
                        platforms.push(p);
                    }
                }
            }
            for p in &platforms {
                match select_platform(&index, p, "the index") {
                    Ok(d) => {
                        let mt = d.media_type().to_string();
                        assert!(mt == OCI_MANIFEST || mt == DOCKER_MANIFEST, "{mt}");
                    }
                    Err(e) => {
                        assert!(matches!(e, select::SelectError::NoPlatform { .. }));
                        let _ = e.to_string();
                    }
                }
            }
        }
        Document::Manifest(m) => {
            for l in m.layers() {
                let _ = Compression::from_media_type(
                    &l.media_type().to_string(),
                    &l.digest().to_string(),
                );
            }
        }
    }
});

//! Archives as `docker-archive:FILE` (or, without a `manifest.json`, `oci-archive:FILE`)
//! hands them over: resolved into a private cache, flattened with a small size cap (so that
//! decompression bombs stop fast) and written out as the tar `--format tar` gives.
//!
//! Beyond not panicking: a tree that flattens is written out whole, and its tar reads back.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use oci2uk::cache::Cache;
use oci2uk::flatten::{flatten, FlattenOptions};
use oci2uk::image::docker_archive::{self, DockerArchiveError};
use oci2uk::image::{layout, Image, ResolveOptions};
use oci2uk::output::tar::write_tar;
use oci2uk::progress::Progress;

/// The cap on uncompressed layer bytes (`--max-size`).
const MAX_SIZE: u64 = 8 << 20;

fn resolve(path: &std::path::Path, cache: &Cache) -> Option<Image> {
    match docker_archive::resolve(path, None, cache) {
        Ok(image) => Some(image),
        // Several images: take the last, as `docker-archive:F:@N` would.
        Err(DockerArchiveError::Ambiguous { count, .. }) => {
            docker_archive::resolve(path, Some(&format!("@{}", count - 1)), cache).ok()
        }
        Err(DockerArchiveError::NoManifest { .. }) => {
            layout::resolve_archive(path, None, &ResolveOptions::default(), cache).ok()
        }
        Err(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let archive = dir.path().join("image.tar");
    std::fs::write(&archive, data).expect("write the archive");
    let cache = Cache::open(Some(&dir.path().join("cache"))).expect("a cache");
    let Some(image) = resolve(&archive, &cache) else {
        return;
    };
    let opts = FlattenOptions { max_size: MAX_SIZE };
    let Ok(tree) = flatten(&image.layers, &opts, &cache.tmp_dir(), &Progress::hidden()) else {
        return;
    };
    let mut out = Vec::new();
    write_tar(&tree, &mut out).expect("a flattened tree is written out");
    let mut members = 0usize;
    let mut ar = tar::Archive::new(&out[..]);
    for e in ar.entries().expect("the output is a tar") {
        let mut e = e.expect("a valid member");
        std::io::copy(&mut e.by_ref(), &mut std::io::sink()).expect("member data");
        members += 1;
    }
    // Every path but the root is a member.
    assert_eq!(members, tree.len());
});

//! Builds the guest init (`init/`, a static musl binary) and hands it to the library, which
//! embeds it with `include_bytes!`, so that `cargo install` gives one self-contained binary.
//!
//! The init is built by a nested `cargo build` with its own target directory (sharing the
//! outer one would deadlock on its lock). `OCI2UK_INIT_BIN` names a prebuilt init instead.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("oci2uk-init");
    for p in [
        "init/src",
        "init/Cargo.toml",
        "config/src",
        "config/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=OCI2UK_INIT_BIN");

    if let Some(prebuilt) = env::var_os("OCI2UK_INIT_BIN") {
        std::fs::copy(&prebuilt, &out).expect("OCI2UK_INIT_BIN names a readable file");
        return;
    }
    let target_dir = manifest.join("target").join("init");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&manifest)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "oci2uk-init",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags and profile settings are for the host, not the init.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_MAKEFLAGS")
        // Small: the init is copied into every guest. A panic powers the guest off from the
        // panic hook before the abort.
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building the guest init failed; is the musl target installed? \
         (`rustup target add {TARGET}`)"
    );
    let built = target_dir.join(TARGET).join("release").join("oci2uk-init");
    std::fs::copy(&built, &out).expect("the init was built");
}

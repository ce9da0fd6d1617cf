#!/usr/bin/env bash
# Runs every check the project has: formatting, lints, unit tests, the integration tests
# against the loopback test registry (started here if it is not up) and the VM tests
# (qemu-system-x86_64 under TCG with Debian's cloud kernel).
set -euo pipefail
cd "$(dirname "$0")/.."

testregistry/install.sh
scripts/install-vm.sh
testregistry/up.sh
# shellcheck disable=SC1091
source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"

cargo fmt --all -- --check
# Modules import one way: no cycle between siblings, no import from a stage above.
scripts/check-layers.py
cargo clippy --workspace --all-targets --all-features -- -D warnings
# --all-features builds the registry and VM tests, the library's own VM checks (bake, rootfs,
# bundle) among them: none of them skips, so a missing kernel, busybox or QEMU fails the run.
cargo test --workspace --all-features
# A short run of every fuzz target on its corpus (installs nightly and cargo-fuzz if needed).
scripts/fuzz.sh 30

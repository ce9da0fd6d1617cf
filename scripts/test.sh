#!/usr/bin/env bash
# Runs every check the project has: formatting, lints, unit tests, and the integration tests
# against the loopback test registry (started here if it is not up).
set -euo pipefail
cd "$(dirname "$0")/.."

testregistry/install.sh
testregistry/up.sh
# shellcheck disable=SC1091
source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"

cargo fmt --all -- --check
cargo clippy --all-targets --all-features -- -D warnings
cargo test --all-features

#!/usr/bin/env bash
# Installs what is needed, starts the loopback test registry with its fixture images, builds
# oci2uk and converts the fixture nginx image: the main job, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."

testregistry/install.sh
testregistry/up.sh
# shellcheck disable=SC1091
source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"

cargo build --release
./target/release/oci2uk build "$OCI2UK_TEST_REGISTRY/nginx:latest" --format tar -o nginx.tar
tar -tvf nginx.tar | head -n 5
echo "nginx.tar: $(tar -tf nginx.tar | wc -l) entries"

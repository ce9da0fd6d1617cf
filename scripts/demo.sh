#!/usr/bin/env bash
# Installs what is needed, starts the loopback test registry with its fixture images, builds
# oci2uk and its kernel, converts the fixture nginx into one bootable file and boots it, serving on
# http://127.0.0.1:8080/ (ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."

testregistry/install.sh
scripts/install-vm.sh
testregistry/up.sh
# shellcheck disable=SC1091
source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"

cargo build --release
# oci2uk's own lean kernel (about 6 minutes on 2 cores the first time, cached after): from
# here on `oci2uk IMAGE` uses it.
./target/release/oci2uk kernel build
./target/release/oci2uk "$OCI2UK_TEST_REGISTRY/nginx:latest" -o nginx.elf
echo "booting nginx.elf; try: curl http://127.0.0.1:8080/"
exec ./target/release/oci2uk run nginx.elf -p 8080:80

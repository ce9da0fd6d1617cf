#!/usr/bin/env bash
# Runs every check the project has: formatting, lints, unit tests, the integration tests
# against the loopback test registry (started here if it is not up) and the VM tests
# (qemu-system-x86_64 under TCG with the oci2uk kernel, which this builds, and again with
# Debian's cloud kernel), and the Xen tests against a Xen test host (testxen/) booted under
# QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."

# Free space where the run writes: the cargo build, the caches in $HOME and the scratch in /tmp.
disk() {
    echo "test.sh: disk $1:"
    df -h --output=target,size,used,avail . "${TMPDIR:-/tmp}" "$HOME" | awk '!seen[$0]++'
}
disk "at the start"

testregistry/install.sh
scripts/install-vm.sh
# The Xen test host is built (cached after the first time) and booted in the background while
# the registry's fixtures and the code build; the Xen tests find it through OCI2UK_XEN_DIR.
xen_dir=$(mktemp -d /tmp/oci2uk-xen.XXXXXX)
(testxen/build.sh build >/dev/null && testxen/up.sh "$xen_dir") >"$xen_dir.log" 2>&1 &
xen_boot=$!
trap 'status=$?; testxen/down.sh "$xen_dir" >/dev/null 2>&1 || true; rm -rf "$xen_dir" "$xen_dir.log" "${kernel_json:-}"; if [ $status -ne 0 ]; then disk "when the run failed"; fi' EXIT
testregistry/up.sh
# shellcheck disable=SC1091
source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"

cargo fmt --all -- --check
# Modules import one way: no cycle between siblings, no import from a stage above.
scripts/check-layers.py
# oci2uk's own kernel, built by oci2uk (the first time takes about 6 minutes on 2 cores; it is
# cached under ~/.cache/oci2uk after): every test that boots a guest boots it, while the code
# builds beside it.
cargo build --bin oci2uk
kernel_json=$(mktemp /tmp/oci2uk-kernel.XXXXXX)
"${CARGO_TARGET_DIR:-target}/debug/oci2uk" kernel build --quiet --json >"$kernel_json" &
kernel_build=$!
cargo clippy --workspace --all-targets --all-features -- -D warnings
# --all-features builds the registry and VM tests, the library's own VM checks (bake, rootfs,
# bundle) among them: none of them skips, so a missing kernel, busybox or QEMU fails the run.
cargo test --workspace --all-features --no-run
if ! wait "$xen_boot"; then
    echo "test.sh: the Xen test host did not come up:" >&2
    cat "$xen_dir.log" >&2
    exit 1
fi
echo "test.sh: Xen test host ready in $(tail -1 "$xen_dir.log") s"
export OCI2UK_XEN_DIR=$xen_dir
wait "$kernel_build"
OCI2UK_KERNEL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["kernel"])' "$kernel_json")
export OCI2UK_KERNEL
echo "test.sh: the tests boot the oci2uk kernel $OCI2UK_KERNEL"
cargo test --workspace --all-features
# The Xen tests leave their bundles on the host's share, where no domain uses them once the run
# has ended: their space goes to the next run.
rm -rf "$xen_dir"/it-*
# Debian's kernel, which loads its drivers as modules, through the VM and Xen tests again.
distribution=$(find /boot -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -1)
echo "test.sh: the VM and Xen tests again with $distribution"
OCI2UK_KERNEL=$distribution cargo test --all-features --test it -- vm:: xen::
testxen/down.sh "$xen_dir"
disk "after the tests"
if [[ ${CI:-} == true ]]; then
    # A CI clone is thrown away after the run: the test build's space goes to the fuzz build.
    cargo clean
fi
# A short run of every fuzz target on its corpus (installs nightly and cargo-fuzz if needed).
scripts/fuzz.sh 30

#!/usr/bin/env bash
# Boot figures, measured in one run so that ratios mean something on a shared machine (TCG):
#   1. QEMU start -> first console output of the application, for a baked busybox file
#      (`oci2uk build busybox --entrypoint 'echo ready'`), beside the same kernel booting a
#      trivial busybox initramfs (`-kernel vmlinuz -initrd`, an /init that echoes).
#   2. QEMU start -> first HTTP 200 from the baked nginx fixture, through user networking.
#   3. The nginx file's size beside the image's compressed size plus the kernel's.
# Each boot is repeated RUNS times (default 3); medians are printed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${OCI2UK_TEST_REGISTRY:-}" ]; then
    testregistry/up.sh >/dev/null
    # shellcheck disable=SC1091
    source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"
fi
runs="${RUNS:-3}"
cargo build --release --quiet
bin="$PWD/target/release/oci2uk"
work="$(mktemp -d)"
trap 'pkill -f "qemu-system-x86_64.*$work" 2>/dev/null || true; rm -rf "$work"' EXIT
kernel=$(ls -v /boot/vmlinuz-*-cloud-amd64 | tail -n1)
machine=(-accel tcg -M microvm,isa-serial=on -nodefaults -no-user-config -display none -serial stdio -no-reboot)
tsc_khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

# Seconds from starting "$@" until the marker appears on its console.
time_to_marker() {
    local marker=$1 log="$work/console.$RANDOM"
    shift
    local start
    start=$(now)
    "$@" >"$log" 2>&1 &
    local pid=$!
    until grep -q -- "$marker" "$log" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "VM ended without $marker:" >&2; cat "$log" >&2; return 1; }
        sleep 0.02
    done
    echo "$(now) - $start" | bc
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}

# The baked busybox file.
"$bin" build "$OCI2UK_TEST_REGISTRY/busybox:latest" --entrypoint '["echo","oci2uk-bench-ready"]' \
    -o "$work/bb.elf" --quiet
# The baseline: the same kernel with a trivial busybox initramfs.
mkdir -p "$work/root/bin"
cp /bin/busybox "$work/root/bin/busybox"
ln -s busybox "$work/root/bin/sh"
printf '#!/bin/sh\necho oci2uk-bench-ready\n/bin/busybox poweroff -f\n' >"$work/root/init"
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1 >"$work/base.cpio.gz")

ours=() base=()
for _ in $(seq "$runs"); do
    ours+=("$(time_to_marker oci2uk-bench-ready qemu-system-x86_64 "${machine[@]}" -m 256 -kernel "$work/bb.elf")")
    base+=("$(time_to_marker oci2uk-bench-ready qemu-system-x86_64 "${machine[@]}" -m 256 \
        -kernel "$kernel" -initrd "$work/base.cpio.gz" \
        -append "console=ttyS0 panic=-1 rdinit=/init quiet tsc_early_khz=$tsc_khz")")
done
o=$(printf '%s\n' "${ours[@]}" | median)
b=$(printf '%s\n' "${base[@]}" | median)
printf 'boot to first application output (median of %d, TCG, microvm):\n' "$runs"
printf '  %-52s %6.2f s\n' "oci2uk busybox file (init, modules, DHCP)" "$o"
printf '  %-52s %6.2f s\n' "same kernel + trivial busybox initramfs" "$b"
printf '  ratio %.2f\n' "$(echo "$o / $b" | bc -l)"

# nginx: QEMU start to the first page.
"$bin" build "$OCI2UK_TEST_REGISTRY/nginx:latest" -o "$work/nginx.elf" --quiet
port=18080
pages=()
for _ in $(seq "$runs"); do
    start=$(now)
    qemu-system-x86_64 "${machine[@]}" -m 512 -kernel "$work/nginx.elf" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:80" -device virtio-net-device,netdev=n0 \
        >"$work/nginx.log" 2>&1 &
    pid=$!
    until curl -sf -o /dev/null -m 1 "http://127.0.0.1:$port/"; do sleep 0.05; done
    pages+=("$(echo "$(now) - $start" | bc)")
    kill "$pid"; wait "$pid" 2>/dev/null || true
done
printf '  %-52s %6.2f s\n' "nginx file: QEMU start to first HTTP 200" "$(printf '%s\n' "${pages[@]}" | median)"

layers=$(skopeo inspect --tls-verify=false --raw "docker://$OCI2UK_TEST_REGISTRY/nginx:latest" |
    jq '[.layers[].size] | add')
ksize=$(stat -c %s "$kernel")
fsize=$(stat -c %s "$work/nginx.elf")
printf 'sizes:\n  %-52s %6d MiB\n  %-52s %6d MiB (%d + %d)\n  ratio %.2f\n' \
    "nginx.elf" $((fsize >> 20)) "image layers (compressed) + kernel (bzImage)" \
    $(((layers + ksize) >> 20)) $((layers >> 20)) $((ksize >> 20)) "$(echo "$fsize / ($layers + $ksize)" | bc -l)"

#!/usr/bin/env bash
# The guest memory each root file system needs: builds the fixture nginx with
# `--rootfs initramfs` and `--rootfs squashfs`, then for each finds by bisection the smallest
# `-m` (MiB) at which nginx serves its index page under
# `qemu-system-x86_64 -accel tcg -M microvm,isa-serial=on -kernel FILE.elf`, and prints it with
# the boot-to-first-HTTP-200 time at that memory and at 512 MiB, the ELF's size, the memory
# recorded in the file, and the ratio squashfs/initramfs.
#
# Needs the loopback test registry (testregistry/up.sh; this sources /tmp/oci2uk-testreg/env)
# and qemu-system-x86. OCI2UK=path/to/oci2uk (default: target/release, else target/debug),
# IMAGE=REF (default: the registry's nginx:latest), STEP=MiB (bisection precision, default 8),
# TIMEOUT=seconds per boot (default 180), ROOTFS="initramfs squashfs".
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -n "${OCI2UK_TEST_REGISTRY:-}" ] || . /tmp/oci2uk-testreg/env
OCI2UK=${OCI2UK:-}
if [ -z "$OCI2UK" ]; then
    for b in target/release/oci2uk target/debug/oci2uk; do
        [ -x "$b" ] && OCI2UK=$b && break
    done
fi
[ -n "$OCI2UK" ] || { echo "build oci2uk first (cargo build --release)" >&2; exit 1; }
IMAGE=${IMAGE:-$OCI2UK_TEST_REGISTRY/nginx:latest}
STEP=${STEP:-8}
TIMEOUT=${TIMEOUT:-180}
ROOTFS=${ROOTFS:-initramfs squashfs}
work=$(mktemp -d /tmp/oci2uk-bench-memory.XXXXXX)
trap 'rm -rf "$work"' EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# boot ELF MIB: prints the seconds from QEMU's start to the first HTTP 200, or "fail".
boot() {
    local elf=$1 mem=$2 port log pid start now ok=
    port=$(free_port)
    log=$work/console-$(basename "$elf")-$mem
    start=$(date +%s.%N)
    qemu-system-x86_64 -accel tcg -M microvm,isa-serial=on -m "$mem" -nographic -no-reboot \
        -kernel "$elf" -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:80" \
        -device virtio-net-device,netdev=n0 </dev/null >"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" || true)" = 200 ]; then
            ok=1
            break
        fi
        now=$(date +%s.%N)
        if [ "$(echo "$now - $start > $TIMEOUT" | bc)" = 1 ]; then
            break
        fi
        sleep 0.2
    done
    now=$(date +%s.%N)
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ -n "$ok" ]; then
        printf '%.1f\n' "$(echo "$now - $start" | bc)"
    else
        echo fail
    fi
}

# smallest ELF: bisects between a failing and a serving size.
smallest() {
    local elf=$1 lo=32 hi=512 mid
    [ "$(boot "$elf" "$hi")" != fail ] || { echo "none up to $hi"; return; }
    while [ $((hi - lo)) -gt "$STEP" ]; do
        mid=$(((lo + hi) / 2 / STEP * STEP))
        if [ "$(boot "$elf" "$mid")" != fail ]; then
            hi=$mid
            echo "  $(basename "$elf"): -m $mid serves" >&2
        else
            lo=$mid
            echo "  $(basename "$elf"): -m $mid fails" >&2
        fi
    done
    echo "$hi"
}

declare -A MIN
printf '%-10s %8s %12s %12s %10s %12s\n' rootfs min_MiB boot_at_min boot_at_512 elf_MiB recorded_MiB
for r in $ROOTFS; do
    elf=$work/nginx-$r.elf
    json=$("$OCI2UK" build "$IMAGE" --rootfs "$r" -o "$elf" --quiet --json --cache "$work/cache")
    recorded=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["memory_mib"])')
    size=$(stat -c %s "$elf")
    min=$(smallest "$elf")
    MIN[$r]=$min
    at_min=$(boot "$elf" "$min")
    at_512=$(boot "$elf" 512)
    printf '%-10s %8s %11ss %11ss %10.1f %12s\n' "$r" "$min" "$at_min" "$at_512" \
        "$(echo "$size / 1048576" | bc -l)" "$recorded"
done
if [ -n "${MIN[initramfs]:-}" ] && [ -n "${MIN[squashfs]:-}" ]; then
    printf 'squashfs/initramfs memory ratio: %.2f\n' \
        "$(echo "${MIN[squashfs]} / ${MIN[initramfs]}" | bc -l)"
fi

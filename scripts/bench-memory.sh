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
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup
IMAGE=${IMAGE:-$OCI2UK_TEST_REGISTRY/nginx:latest}
STEP=${STEP:-8}
TIMEOUT=${TIMEOUT:-180}
ROOTFS=${ROOTFS:-initramfs squashfs}
work=$(mktemp -d /tmp/oci2uk-bench-memory.XXXXXX)
trap 'rm -rf "$work"' EXIT

BENCH_WORK=$work

declare -A MIN
printf '%-10s %8s %12s %12s %10s %12s\n' rootfs min_MiB boot_at_min boot_at_512 elf_MiB recorded_MiB
for r in $ROOTFS; do
    elf=$work/nginx-$r.elf
    json=$("$OCI2UK" build "$IMAGE" --rootfs "$r" -o "$elf" --quiet --json --cache "$work/cache")
    recorded=$(echo "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["memory_mib"])')
    size=$(stat -c %s "$elf")
    min=$(LO=32 smallest "$elf")
    MIN[$r]=$min
    at_min=$(boot_http "$elf" "$min")
    at_512=$(boot_http "$elf" 512)
    printf '%-10s %8s %11ss %11ss %10.1f %12s\n' "$r" "$min" "$at_min" "$at_512" \
        "$(echo "$size / 1048576" | bc -l)" "$recorded"
done
if [ -n "${MIN[initramfs]:-}" ] && [ -n "${MIN[squashfs]:-}" ]; then
    printf 'squashfs/initramfs memory ratio: %.2f\n' \
        "$(echo "${MIN[squashfs]} / ${MIN[initramfs]}" | bc -l)"
fi

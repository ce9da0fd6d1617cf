#!/usr/bin/env bash
# The oci2uk kernel against the installed distribution kernel, with the same image, in the
# same run, under qemu-system-x86_64 -accel tcg -M microvm:
#   - the baked ELF's size;
#   - the smallest -m (MiB, to STEP) at which the image's HTTP server answers (bisection);
#   - QEMU start to the first HTTP 200 at -m MEM, the median of RUNS boots of each, taken in
#     turns;
# with the ratios oci2uk/distribution, and the oci2uk kernel's loaded size, option count and
# build time (as `oci2uk kernel build --json` reports it; a cached kernel took none).
#
# Needs the loopback test registry (testregistry/up.sh; this sources /tmp/oci2uk-testreg/env),
# qemu-system-x86 and the Linux source `oci2uk kernel build` reads. OCI2UK=path/to/oci2uk
# (default: target/release, else target/debug), IMAGE=REF (default: the registry's
# nginx:latest), CLOUD=vmlinuz (default: the newest installed /boot/vmlinuz-*), RUNS (default
# 5), MEM (default 512), STEP (default 4), TIMEOUT=seconds per boot (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
bench_setup
IMAGE=${IMAGE:-$OCI2UK_TEST_REGISTRY/nginx:latest}
CLOUD=${CLOUD:-$(find /boot -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -1)}
RUNS=${RUNS:-5}
MEM=${MEM:-512}
export STEP=${STEP:-4} TIMEOUT=${TIMEOUT:-60}
work=$(mktemp -d /tmp/oci2uk-bench-kernel.XXXXXX)
trap 'rm -rf "$work"' EXIT
BENCH_WORK=$work
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

lean_json=$("$OCI2UK" kernel build --quiet --json)
LEAN=$(echo "$lean_json" | field kernel)
declare -A ELF SIZE MIN
for k in lean cloud; do
    kernel=$LEAN
    [ "$k" = cloud ] && kernel=$CLOUD
    ELF[$k]=$work/$k.elf
    "$OCI2UK" build "$IMAGE" --kernel "$kernel" -o "${ELF[$k]}" --quiet --cache "$work/cache"
    SIZE[$k]=$(stat -c %s "${ELF[$k]}")
    MIN[$k]=$(LO=16 HI=$MEM smallest "${ELF[$k]}")
done
lean_t=() cloud_t=()
for _ in $(seq "$RUNS"); do
    lean_t+=("$(boot_http "${ELF[lean]}" "$MEM")")
    cloud_t+=("$(boot_http "${ELF[cloud]}" "$MEM")")
done
lt=$(printf '%s\n' "${lean_t[@]}" | grep -v fail | median)
ct=$(printf '%s\n' "${cloud_t[@]}" | grep -v fail | median)
ratio() { if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]]; then printf '%.2f' "$(echo "$1 / $2" | bc -l)"; else echo -; fi; }

printf '\noci2uk bench-kernel: %s, %s, medians of %d boots at -m %s\n' "$IMAGE" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$RUNS" "$MEM"
printf '  oci2uk kernel: %s (%s, loaded %.1f MiB, %s options, %s)\n' "$LEAN" \
    "$(echo "$lean_json" | field release)" \
    "$(echo "$(echo "$lean_json" | field loaded_bytes) / 1048576" | bc -l)" \
    "$(echo "$lean_json" | field options)" \
    "$(if [ "$(echo "$lean_json" | field cached)" = True ]; then echo "cached"; else
        printf 'built in %.0f s' "$(echo "$lean_json" | field seconds)"; fi)"
printf '  distribution kernel: %s\n\n' "$CLOUD"
printf '  %-34s %12s %12s %8s\n' "" oci2uk distribution ratio
printf '  %-34s %12.1f %12.1f %8s\n' "baked ELF (MiB)" "$(echo "${SIZE[lean]} / 1048576" | bc -l)" \
    "$(echo "${SIZE[cloud]} / 1048576" | bc -l)" "$(ratio "${SIZE[lean]}" "${SIZE[cloud]}")"
printf '  %-34s %12s %12s %8s\n' "smallest -m that serves (MiB)" "${MIN[lean]}" "${MIN[cloud]}" \
    "$(ratio "${MIN[lean]}" "${MIN[cloud]}")"
printf '  %-34s %12s %12s %8s\n' "QEMU start to HTTP 200 (s)" "$lt" "$ct" "$(ratio "$lt" "$ct")"
printf '  boots: oci2uk %s; distribution %s\n' "${lean_t[*]}" "${cloud_t[*]}"

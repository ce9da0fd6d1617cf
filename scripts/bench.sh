#!/usr/bin/env bash
# Cold pull+flatten of the nginx fixture from the loopback registry: oci2uk against the
# independent pipeline `skopeo copy` + `umoci raw unpack` + `tar`, measured in the same run so
# that the ratio means something on a shared, noisy machine. Prints wall time and peak RSS of
# each (median of RUNS runs) and their ratios.
#
#   scripts/bench.sh [IMAGE]     (default: $OCI2UK_TEST_REGISTRY/nginx:latest)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${OCI2UK_TEST_REGISTRY:-}" ]; then
    testregistry/up.sh >/dev/null
    # shellcheck disable=SC1091
    source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"
fi
if ! command -v bc >/dev/null || [ ! -x /usr/bin/time ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bc time >/dev/null
fi
image="${1:-$OCI2UK_TEST_REGISTRY/nginx:latest}"
runs="${RUNS:-3}"
cargo build --release --quiet
bin="$PWD/target/release/oci2uk"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Prints "SECONDS KIB" for a command: elapsed wall time and peak RSS.
measure() {
    /usr/bin/time -f '%e %M' -o "$work/time" "$@" >/dev/null 2>"$work/stderr" || {
        cat "$work/stderr" >&2
        return 1
    }
    cat "$work/time"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

ours_t=() ours_m=() base_t=() base_m=()
for i in $(seq "$runs"); do
    rm -rf "$work/cache" "$work/ours.tar"
    read -r t m < <(measure "$bin" build "$image" --format tar -o "$work/ours.tar" --cache "$work/cache" --quiet)
    ours_t+=("$t") ours_m+=("$m")

    rm -rf "$work/layout" "$work/rootfs" "$work/base.tar"
    read -r t1 m1 < <(measure skopeo copy --quiet --src-tls-verify=false "docker://$image" "oci:$work/layout:img")
    read -r t2 m2 < <(measure umoci raw unpack --image "$work/layout:img" "$work/rootfs")
    read -r t3 m3 < <(measure tar -C "$work/rootfs" -cf "$work/base.tar" .)
    base_t+=("$(echo "$t1 + $t2 + $t3" | bc)")
    base_m+=("$(printf '%s\n' "$m1" "$m2" "$m3" | sort -n | tail -n1)")
done

ot=$(printf '%s\n' "${ours_t[@]}" | median)
om=$(printf '%s\n' "${ours_m[@]}" | median)
bt=$(printf '%s\n' "${base_t[@]}" | median)
bm=$(printf '%s\n' "${base_m[@]}" | median)
size=$(stat -c %s "$work/ours.tar")
printf 'image: %s (output tar %d MiB), median of %d cold runs\n' "$image" $((size >> 20)) "$runs"
printf '%-44s %8s s  %8d MiB peak RSS\n' "oci2uk build --format tar" "$ot" $((om / 1024))
printf '%-44s %8s s  %8d MiB peak RSS\n' "skopeo copy + umoci raw unpack + tar" "$bt" $((bm / 1024))
printf 'ratio (oci2uk / baseline): time %s, peak RSS %s\n' \
    "$(echo "scale=3; $ot / $bt" | bc)" "$(echo "scale=3; $om / $bm" | bc)"

#!/usr/bin/env bash
# Xen figures under nested emulation: Xen and its dom0 run inside qemu-system-x86_64 with
# software emulation (the test host of testxen/), so they are many times what hardware gives;
# they are figures to compare with each other, not targets. Printed as medians of RUNS runs
# (default 3):
#
#   Xen start to dom0 ready            testxen/up.sh's figure, one fresh Xen boot per run
#   xl create to HTTP 200, PV          the nginx fixture's bundle, xen-pv.cfg, DHCP
#   xl create to HTTP 200, PVH         the same, xen-pvh.cfg
#
# The guest figures are taken inside dom0 (/proc/uptime), from just before `xl create` to the
# first answer of `wget` from dom0 over the bridge.
#
#   scripts/bench-xen.sh                      boots its own test host RUNS times
#   OCI2UK_XEN_DIR=DIR scripts/bench-xen.sh   guests only, on the host already running in DIR
#
# OCI2UK_BIN=PATH measures that oci2uk instead of building target/release/oci2uk.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ -z "${OCI2UK_TEST_LAYOUT:-}" ]; then
    testregistry/up.sh >/dev/null
    # shellcheck disable=SC1091
    source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"
fi
bin=${OCI2UK_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=${CARGO_TARGET_DIR:-$root/target}/release/oci2uk
fi
runs=${RUNS:-3}
prefix=${OCI2UK_XEN_PREFIX:-bench-}$$
own_host=
if [ -n "${OCI2UK_XEN_DIR:-}" ]; then
    dir=$(realpath "$OCI2UK_XEN_DIR")
    [ -e "$dir/ready" ] || { echo "bench-xen: no test host ready in $dir (testxen/up.sh $dir)" >&2; exit 1; }
else
    own_host=1
    dir=$(mktemp -d /tmp/oci2uk-bench-xen.XXXXXX)
fi
work=$dir/$prefix
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    [ -z "$own_host" ] || testxen/down.sh "$dir" || true
    rm -rf "$work"
    [ -z "$own_host" ] || rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$work"

"$bin" build "oci:$OCI2UK_TEST_LAYOUT:nginx" --format bundle -o "$work/nginx.bundle" --quiet
elf=$(basename "$(ls "$work"/nginx.bundle/*.elf)")
share=/share/$prefix/nginx.bundle

# Prints the seconds from `xl create` to the first HTTP 200 of a guest of TYPE (pv, pvh), or
# "failed"; the guest is destroyed after.
guest() {
    local type=$1 name=$prefix-$1
    testxen/job.sh "$dir" "$prefix-$type-$RANDOM" 900 <<JOB || echo failed
up() { cut -d' ' -f1 /proc/uptime; }
t0=\$(up)
xl create $share/xen-$type.cfg 'name="$name"' 'kernel="$share/$elf"' >/dev/null 2>&1 || { echo failed; exit 0; }
ok=
for _ in \$(seq 600); do
    mac=\$(xl network-list $name 2>/dev/null | awk 'NR == 2 { print \$3 }')
    addr=\$(dumpleases -f /var/lib/misc/udhcpd.leases 2>/dev/null | awk -v m="\$mac" 'tolower(\$1) == tolower(m) { print \$2 }' | head -1)
    if [ -n "\$addr" ] && timeout 10 wget -q -O /dev/null "http://\$addr/" 2>/dev/null; then ok=1; break; fi
    xl list $name >/dev/null 2>&1 || break
    sleep 0.5
done
t1=\$(up)
xl destroy $name >/dev/null 2>&1 || true
if [ -n "\$ok" ]; then awk -v a="\$t0" -v b="\$t1" 'BEGIN { printf "%.1f\n", b - a }'; else echo failed; fi
JOB
}

median() { sort -n | awk 'NF { a[++n] = $1 } END { if (n == 0) print "-"; else print a[int((n + 1) / 2)] }'; }
boot=() pv=() pvh=() failed=0
for run in $(seq "$runs"); do
    if [ -n "$own_host" ]; then
        boot+=("$(testxen/up.sh "$dir")")
    fi
    for type in pv pvh; do
        t=$(guest "$type" | tail -1)
        echo "bench-xen: run $run $type: $t" >&2
        if [ "$t" = failed ]; then
            failed=1
            continue
        fi
        if [ "$type" = pv ]; then pv+=("$t"); else pvh+=("$t"); fi
    done
    if [ -n "$own_host" ]; then
        testxen/down.sh "$dir"
        while [ -e "$dir/qemu.pid" ] && kill -0 "$(cat "$dir/qemu.pid")" 2>/dev/null; do sleep 1; done
    fi
done

echo "Xen 4.17 under qemu-system-x86_64 -accel tcg (nested emulation; figures only), medians of $runs:"
if [ -n "$own_host" ]; then
    printf '  %-34s %6s s\n' "Xen start to dom0 ready" "$(printf '%s\n' "${boot[@]}" | median)"
fi
printf '  %-34s %6s s  (%d of %d served)\n' "xl create to HTTP 200, PV" \
    "$(printf '%s\n' "${pv[@]}" | median)" "${#pv[@]}" "$runs"
printf '  %-34s %6s s  (%d of %d served)\n' "xl create to HTTP 200, PVH" \
    "$(printf '%s\n' "${pvh[@]}" | median)" "${#pvh[@]}" "$runs"
exit "$failed"

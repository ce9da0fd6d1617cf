# shellcheck shell=bash
# Shared by the bench scripts (sourced): medians, a free port, and booting a baked ELF under
# QEMU until its HTTP server answers.
#
# boot_http ELF MIB [QEMU ARGS...]: prints the seconds from QEMU's start to the first HTTP 200
# from the guest's port 80 (-accel tcg -M microvm, virtio-net, user networking), or "fail"
# when QEMU ends or TIMEOUT seconds (default 180) pass first. The console goes to
# $BENCH_WORK/console-NAME-MIB (BENCH_WORK: a directory the caller made); the probe is
# first_200's, below.
# smallest ELF: the smallest -m (MiB, a multiple of STEP, default 8; between LO, default 32,
# and HI, default 512) at which boot_http serves, by bisection; "none up to HI" otherwise.

# bench_setup: the test registry's environment (/tmp/oci2uk-testreg/env, unless it is set) and
# OCI2UK, the binary to measure (default: target/release, else target/debug).
bench_setup() {
    # shellcheck disable=SC1091
    [ -n "${OCI2UK_TEST_REGISTRY:-}" ] || . /tmp/oci2uk-testreg/env
    OCI2UK=${OCI2UK:-}
    if [ -z "$OCI2UK" ]; then
        for b in target/release/oci2uk target/debug/oci2uk; do
            [ -x "$b" ] && OCI2UK=$b && break
        done
    fi
    [ -n "$OCI2UK" ] || { echo "build oci2uk first (cargo build --release)" >&2; exit 1; }
}

median() { sort -n | awk 'NF { a[++n] = $1 } END { if (n == 0) print "-"; else print a[int((n + 1) / 2)] }'; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# first_200 PORT PID START: the seconds from START (date +%s.%N) to the first HTTP 200 from
# 127.0.0.1:PORT, or "fail" when process PID ends or TIMEOUT seconds (default 180) pass first.
# A request is started every 50 ms, each in the background, and the first 200 to arrive is the
# time: QEMU's user networking accepts a connection on the host before the guest listens and
# holds it until the guest answers its SYN again, seconds later, so requests made one after
# another would measure that retry, not the guest.
first_200() {
    local port=$1 pid=$2 start=$3 now first oks probes=()
    oks=$(mktemp "${TMPDIR:-/tmp}/oci2uk-http.XXXXXX")
    while kill -0 "$pid" 2>/dev/null && [ ! -s "$oks" ]; do
        {
            code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" || true)
            [ "$code" != 200 ] || date +%s.%N >>"$oks"
        } &
        probes+=($!)
        now=$(date +%s.%N)
        if [ "$(echo "$now - $start > ${TIMEOUT:-180}" | bc)" = 1 ]; then
            break
        fi
        sleep 0.05
    done
    # A request under way may still answer: give it a moment.
    [ -s "$oks" ] || sleep 0.2
    kill "${probes[@]}" 2>/dev/null || true
    wait "${probes[@]}" 2>/dev/null || true
    first=$(sort -n "$oks" | head -1)
    rm -f "$oks"
    if [ -n "$first" ]; then
        printf '%.2f\n' "$(echo "$first - $start" | bc)"
    else
        echo fail
    fi
}

boot_http() {
    local elf=$1 mem=$2 port log pid start
    shift 2
    port=$(free_port)
    log=${BENCH_WORK:?}/console-$(basename "$elf")-$mem
    start=$(date +%s.%N)
    qemu-system-x86_64 -accel tcg -M microvm,isa-serial=on -m "$mem" -nographic -no-reboot \
        -kernel "$elf" -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:80" \
        -device virtio-net-device,netdev=n0 "$@" </dev/null >"$log" 2>&1 &
    pid=$!
    first_200 "$port" "$pid" "$start"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

smallest() {
    local elf=$1 step=${STEP:-8} lo=${LO:-32} hi=${HI:-512} mid
    [ "$(boot_http "$elf" "$hi")" != fail ] || { echo "none up to $hi"; return; }
    while [ $((hi - lo)) -gt "$step" ]; do
        mid=$(((lo + hi) / 2 / step * step))
        if [ "$(boot_http "$elf" "$mid")" != fail ]; then
            hi=$mid
            echo "  $(basename "$elf"): -m $mid serves" >&2
        else
            lo=$mid
            echo "  $(basename "$elf"): -m $mid fails" >&2
        fi
    done
    echo "$hi"
}

#!/usr/bin/env bash
# Runs a bash script (on stdin) in the test host's dom0 and waits for it: prints its output and
# exits with its status.
#
#   job.sh DIR NAME [TIMEOUT_SECONDS] < script.sh
#
# The script runs from DIR (shared as /share in dom0); files put into DIR are there.
set -euo pipefail
dir=$(realpath "${1:?usage: $0 DIR NAME [TIMEOUT] < script}")
name=${2:?usage: $0 DIR NAME [TIMEOUT] < script}
timeout=${3:-900}
rm -f "$dir/jobs/$name".{out,rc}
cat >"$dir/jobs/.$name.sh"
mv "$dir/jobs/.$name.sh" "$dir/jobs/$name.sh"
deadline=$((SECONDS + timeout))
while [[ ! -e $dir/jobs/$name.rc ]]; do
    if ! kill -0 "$(cat "$dir/qemu.pid")" 2>/dev/null; then
        echo "testxen: the Xen host is gone; its console:" >&2
        tail -40 "$dir/serial.log" >&2
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "testxen: job $name still running after $timeout s" >&2
        cat "$dir/jobs/$name.out" >&2 || true
        exit 1
    fi
    sleep 1
done
cat "$dir/jobs/$name.out"
exit "$(cat "$dir/jobs/$name.rc")"

#!/usr/bin/env bash
# Stops the Xen test host started by `testxen/up.sh DIR`: dom0 destroys its guests and powers
# off; after 30 s QEMU is killed.
set -euo pipefail
dir=$(realpath "${1:?usage: $0 DIR}")
[[ -e $dir/qemu.pid ]] || exit 0
pid=$(cat "$dir/qemu.pid")
touch "$dir/stop"
for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 1
done
kill "$pid" 2>/dev/null || true

#!/usr/bin/env bash
# Boots the Xen test host (testxen/build.sh) under qemu-system-x86_64 with software emulation
# and waits until dom0's toolstack works.
#
#   up.sh DIR      DIR is shared with dom0 (9p) and holds the run's state:
#                  DIR/serial.log  Xen's and dom0's console;  DIR/qemu.pid
#                  DIR/jobs/ DIR/console/  see testxen/dom0-init
#
# Prints the seconds from QEMU's start to dom0 ready. `testxen/job.sh DIR NAME` runs a job in
# dom0; `testxen/down.sh DIR` stops the host.
set -euo pipefail
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
dir=$(realpath "${1:?usage: $0 DIR}")
host=$("$here/build.sh" build)
mkdir -p "$dir/jobs" "$dir/console"
rm -f "$dir/ready" "$dir/ready.error" "$dir/stop"
# Xen needs AMD SVM with nested paging for PVH guests (TCG emulates both, not Intel VMX);
# `noreboot` keeps a dom0 crash visible instead of resetting the machine.
xen_cmdline="console=com1 com1=115200,8n1 dom0_mem=${OCI2UK_XEN_DOM0_MEM:-1024M},max:${OCI2UK_XEN_DOM0_MEM:-1024M} dom0_max_vcpus=1 loglvl=warning guest_loglvl=warning noreboot"
start=$(date +%s.%N)
qemu-system-x86_64 -accel tcg -M pc -cpu qemu64,+svm,+npt -m "${OCI2UK_XEN_MEM:-3072}" -smp 2 \
    -display none -monitor none -serial "file:$dir/serial.log" -no-reboot \
    -fsdev "local,id=share,path=$dir,security_model=none" \
    -device virtio-9p-pci,fsdev=share,mount_tag=share \
    -kernel "$host/xen" -append "$xen_cmdline" \
    -initrd "$host/vmlinuz console=hvc0 earlyprintk=xen quiet rdinit=/init,$host/dom0.cpio.gz" \
    -daemonize -pidfile "$dir/qemu.pid"
deadline=$((SECONDS + ${OCI2UK_XEN_BOOT_TIMEOUT:-600}))
while [[ ! -e $dir/ready ]]; do
    if [[ -e $dir/ready.error ]]; then
        echo "testxen: dom0 booted but xl does not work:" >&2
        cat "$dir/ready.error" >&2
        exit 1
    fi
    if ! kill -0 "$(cat "$dir/qemu.pid")" 2>/dev/null; then
        echo "testxen: the Xen host stopped before dom0 was ready; its console:" >&2
        tail -40 "$dir/serial.log" >&2
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "testxen: dom0 not ready after ${OCI2UK_XEN_BOOT_TIMEOUT:-600} s; its console:" >&2
        tail -40 "$dir/serial.log" >&2
        exit 1
    fi
    sleep 1
done
awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }'

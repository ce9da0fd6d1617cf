#!/usr/bin/env bash
# Boot and size figures: sections e and f of scripts/bench-all.sh (the nginx ELF's size
# against the kernel's loaded size plus its layers; QEMU start to the first HTTP 200 against
# the same kernel with a busybox httpd initramfs, both under TCG). RUNS=N
set -euo pipefail
exec "$(dirname "$0")/bench-all.sh" size boot

#!/usr/bin/env bash
# Cold tar, cold ELF and warm ELF builds against skopeo + umoci + tar (+ cpio | zstd), measured
# in the same run: sections a to c of scripts/bench-all.sh.
#
#   scripts/bench.sh [IMAGE]     (default: $OCI2UK_TEST_REGISTRY/nginx:latest); RUNS=N
set -euo pipefail
if [ $# -gt 0 ]; then
    export IMAGE=$1
fi
exec "$(dirname "$0")/bench-all.sh" tar elf warm

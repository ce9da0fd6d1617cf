#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/) and runs each for SECONDS (default 30) on its committed
# corpus (fuzz/corpus/TARGET), after replaying the saved crash inputs in fuzz/artifacts/TARGET
# if there are any. Fails on the first crash, leak, timeout or out-of-memory. Installs what it
# needs: the nightly toolchain (sanitizers), g++ (libFuzzer) and cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(reference manifest docker_archive kernel)
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
# libfuzzer-sys compiles libFuzzer, which is C++.
if ! command -v c++ >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "fuzz.sh: run as root to install g++ (libFuzzer is C++)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
        --no-install-recommends g++
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# The targets never use the guest init, which build.rs would otherwise build for musl with the
# nightly toolchain: an empty file stands in for it.
mkdir -p fuzz/target
: >fuzz/target/no-init
export OCI2UK_INIT_BIN="$PWD/fuzz/target/no-init"

cargo +nightly fuzz build
bin=fuzz/target/x86_64-unknown-linux-gnu/release

# New inputs go to a scratch directory, so the committed corpus stays as it is.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The archive target writes a file and a cache per input: on tmpfs it runs ten times faster.
run_tmp=${TMPDIR:-/tmp}
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    run_tmp=/dev/shm
fi

for t in "${targets[@]}"; do
    if [ -d "fuzz/artifacts/$t" ] && [ -n "$(ls -A "fuzz/artifacts/$t")" ]; then
        echo "fuzz: $t: replaying fuzz/artifacts/$t"
        TMPDIR="$run_tmp" "$bin/$t" -runs=1 "fuzz/artifacts/$t"/*
    fi
    echo "fuzz: $t: ${seconds}s on fuzz/corpus/$t"
    mkdir -p "$scratch/$t"
    # -timeout: an input taking longer is a hang (the archive target writes, resolves and
    # flattens a file per input; the kernel target decompresses up to 256 MiB).
    if ! TMPDIR="$run_tmp" "$bin/$t" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
        -artifact_prefix="$scratch/" -print_final_stats=1 \
        "$scratch/$t" "fuzz/corpus/$t" >"$scratch/$t.log" 2>&1; then
        tail -n 60 "$scratch/$t.log" >&2
        mkdir -p "fuzz/artifacts/$t"
        for f in "$scratch"/crash-* "$scratch"/leak-* "$scratch"/timeout-* "$scratch"/oom-*; do
            if [ -e "$f" ]; then cp "$f" "fuzz/artifacts/$t/"; fi
        done
        echo "fuzz: $t failed; the input is in fuzz/artifacts/$t" >&2
        exit 1
    fi
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|^#[0-9]+\s+DONE' \
        "$scratch/$t.log" || true
done
echo "fuzz: no crash"

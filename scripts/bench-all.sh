#!/usr/bin/env bash
# Every benchmark of oci2uk in one run, each figure beside a baseline measured in the same run
# (the machine is shared and noisy: only ratios mean something), printed as one table with
# PASS/MISS against the targets:
#
#   (a) cold pull+flatten of the nginx fixture to --format tar, against skopeo copy +
#       umoci raw unpack + tar                                              target <= 0.33x
#   (b) cold build of the baked ELF, against (a)'s baseline followed by cpio | zstd
#                                                                           target <= 0.50x
#   (c) warm rebuild of the ELF (blobs and initramfs cached), against (b)  target <= 0.20x
#   (d) peak RSS (/usr/bin/time) of cold builds, tar and ELF, of nginx and of a generated
#       image of more than 1 GiB (scripts/make-big-image.py)               target <= 128 MiB
#   (e) the ELF's size against the kernel's loaded size (PT_LOAD file sizes of the vmlinux the
#       bake uses) + 1.05x the image's compressed layers                   target <= 1.00x
#   (f) boot under TCG: QEMU start to the first HTTP 200 of the nginx ELF, against the same
#       kernel booting a busybox httpd initramfs that loads the same modules and sets the
#       same static address                                                target <= 1.30x
#   (g) scripts/bench-memory.sh's lines, when that script exists
#
#   scripts/bench-all.sh [SECTION...]    SECTION: tar elf warm rss size boot memory (default:
#                                        all); RUNS=N medians of N runs (default 3);
#                                        IMAGE=REF another image for (a) to (c);
#                                        BIG_MIB=N the generated image's size (default 1100),
#                                        BIG_RUNS=N its builds per format (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

if [ -z "${OCI2UK_TEST_REGISTRY:-}" ]; then
    testregistry/up.sh >/dev/null
    # shellcheck disable=SC1091
    source "${OCI2UK_TESTREG_DIR:-/tmp/oci2uk-testreg}/env"
fi
need=()
command -v bc >/dev/null || need+=(bc)
[ -x /usr/bin/time ] || need+=(time)
command -v jq >/dev/null || need+=(jq)
command -v readelf >/dev/null || need+=(binutils)
command -v cpio >/dev/null || need+=(cpio)
command -v zstd >/dev/null || need+=(zstd)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(tar elf warm rss size boot memory)
want() { local s; for s in "${sections[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

runs="${RUNS:-3}"
image="${IMAGE:-$OCI2UK_TEST_REGISTRY/nginx:latest}"
cargo build --release --quiet
bin="$root/target/release/oci2uk"
work="$(mktemp -d /tmp/oci2uk-bench.XXXXXX)"
qemu_pids=()
cleanup() {
    local p
    for p in "${qemu_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
# The same baked TSC frequency for oci2uk's file and the baseline kernel, found as oci2uk
# finds it (README: the baked command line).
if [ -z "${OCI2UK_TSC_KHZ:-}" ]; then
    OCI2UK_TSC_KHZ=$(cat /sys/devices/system/cpu/cpu0/tsc_freq_khz 2>/dev/null || awk -F: '
        /^model name/ && match($2, /@ *[0-9.]+GHz/) { v = substr($2, RSTART, RLENGTH); gsub(/[@ GHz]/, "", v); printf "%d", v * 1000000 + 0.5; exit }
        /^cpu MHz/ { printf "%d", int($2 + 0.5) * 1000; exit }' /proc/cpuinfo)
fi
export OCI2UK_TSC_KHZ

ratio() { echo "scale=3; $1 / $2" | bc | sed 's/^\./0./'; }
# Prints "SECONDS KIB" for a command: wall time and peak RSS.
measure() {
    /usr/bin/time -f '%e %M' -o "$work/time" "$@" >/dev/null 2>"$work/stderr" || {
        cat "$work/stderr" >&2
        return 1
    }
    cat "$work/time"
}
rows=()
# row FIGURE OURS BASELINE RATIO TARGET RESULT
row() { rows+=("$(printf '%-46s %12s %12s %8s %9s  %s' "$@")"); }
verdict() { # verdict VALUE LIMIT -> PASS when VALUE <= LIMIT
    if [ "$(echo "$1 <= $2" | bc)" = 1 ]; then echo PASS; else echo MISS; fi
}

# --- (a), (b), (c): cold tar, cold ELF, warm ELF, each beside the same baseline run --------
if want tar || want elf || want warm; then
    tar_t=() elf_t=() warm_t=() base_t=() base_cz=() tar_m=() elf_m=()
    for _ in $(seq "$runs"); do
        if want tar; then
            rm -rf "$work/cache"
            read -r t m < <(measure "$bin" build "$image" --format tar -o "$work/ours.tar" --cache "$work/cache" --quiet)
            tar_t+=("$t") tar_m+=("$m")
        fi
        if want elf || want warm; then
            rm -rf "$work/cache"
            read -r t m < <(measure "$bin" build "$image" -o "$work/ours.elf" --cache "$work/cache" --quiet)
            elf_t+=("$t") elf_m+=("$m")
            read -r t _ < <(measure "$bin" build "$image" -o "$work/warm.elf" --cache "$work/cache" --quiet)
            warm_t+=("$t")
            cmp -s "$work/ours.elf" "$work/warm.elf" || { echo "warm and cold ELF differ" >&2; exit 1; }
        fi
        rm -rf "$work/layout" "$work/rootfs" "$work/base.tar" "$work/base.cpio.zst"
        read -r t1 _ < <(measure skopeo copy --quiet --src-tls-verify=false "docker://$image" "oci:$work/layout:img")
        read -r t2 _ < <(measure umoci raw unpack --image "$work/layout:img" "$work/rootfs")
        read -r t3 _ < <(measure tar -C "$work/rootfs" -cf "$work/base.tar" .)
        read -r t4 _ < <(measure sh -c "cd '$work/rootfs' && find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -3 -T1 -q -c >'$work/base.cpio.zst'")
        base_t+=("$(echo "$t1 + $t2 + $t3" | bc)")
        base_cz+=("$(echo "$t1 + $t2 + $t3 + $t4" | bc)")
    done
    bt=$(printf '%s\n' "${base_t[@]}" | median)
    bz=$(printf '%s\n' "${base_cz[@]}" | median)
    if want tar; then
        ot=$(printf '%s\n' "${tar_t[@]}" | median)
        r=$(ratio "$ot" "$bt")
        row "(a) cold pull+flatten to tar, s" "$ot" "$bt" "$r" "<=0.33" "$(verdict "$r" 0.33)"
    fi
    if want elf || want warm; then
        oe=$(printf '%s\n' "${elf_t[@]}" | median)
        r=$(ratio "$oe" "$bz")
        want elf && row "(b) cold build to ELF, s" "$oe" "$bz" "$r" "<=0.50" "$(verdict "$r" 0.50)"
        ow=$(printf '%s\n' "${warm_t[@]}" | median)
        r=$(ratio "$ow" "$oe")
        want warm && row "(c) warm rebuild of the ELF vs cold, s" "$ow" "$oe" "$r" "<=0.20" "$(verdict "$r" 0.20)"
    fi
    row "    baseline: skopeo+umoci+tar (+cpio|zstd), s" "-" "$bt ($bz)" "" "" ""
fi

# --- (d) peak RSS: nginx, and a generated image of more than 1 GiB -----------------------
if want rss; then
    big_mib="${BIG_MIB:-1100}"
    big_key=$(cat scripts/make-big-image.py <(echo "$big_mib") /bin/busybox | sha256sum | cut -c1-16)
    big_dir="${OCI2UK_BENCH_CACHE:-$HOME/.cache/oci2uk-bench}/big-$big_key"
    if [ ! -d "$big_dir" ]; then
        mkdir -p "$(dirname "$big_dir")"
        python3 scripts/make-big-image.py "$big_dir" --mib "$big_mib"
    fi
    big="$OCI2UK_TEST_REGISTRY/bench-big:$big_key"
    skopeo copy --quiet --dest-tls-verify=false "oci:$big_dir:big" "docker://$big" >/dev/null
    for name in nginx big; do
        ref=$image
        [ "$name" = big ] && ref=$big
        for fmt in tar elf; do
            ms=()
            # Peak RSS hardly moves between runs: the big image is built once (BIG_RUNS).
            n=$runs
            [ "$name" = big ] && n=${BIG_RUNS:-1}
            for _ in $(seq "$n"); do
                rm -rf "$work/cache" "$work/rss.out"
                read -r _ m < <(measure "$bin" build "$ref" --format "$fmt" -o "$work/rss.out" --cache "$work/cache" --quiet)
                ms+=("$m")
            done
            m=$(printf '%s\n' "${ms[@]}" | median)
            eval "rss_${name}_$fmt=$((m / 1024))"
            size=$(stat -c %s "$work/rss.out")
            row "(d) peak RSS, $name ($((size >> 20)) MiB $fmt), MiB" "$((m / 1024))" "-" "-" "<=128" "$(verdict $((m / 1024)) 128)"
        done
        rm -f "$work/rss.out"
    done
    # Independent of the image's size: the big image within 10% (or 8 MiB) of nginx.
    for fmt in tar elf; do
        a=$(eval echo "\$rss_nginx_$fmt") b=$(eval echo "\$rss_big_$fmt")
        lim=$((a + (a / 10 > 8 ? a / 10 : 8)))
        row "(d) RSS big/nginx, $fmt" "$b" "$a" "$(ratio "$b" "$a")" "<=+10%" "$(verdict "$b" "$lim")"
    done
fi

# --- (e) size -------------------------------------------------------------------------------
# The bundle carries the vmlinux the bake used, the baked file and the command line.
bundle() {
    [ -d "$work/nginx.bundle" ] ||
        "$bin" build "$image" --format bundle -o "$work/nginx.bundle" --cache "$work/cache" --quiet
}
if want size; then
    bundle
    elf=$(stat -c %s "$work/nginx.bundle/nginx.elf")
    load=0
    for h in $(readelf -lW "$work/nginx.bundle/vmlinux" | awk '$1 == "LOAD" { print $5 }'); do
        load=$((load + h))
    done
    layers=$(skopeo inspect --tls-verify=false --raw "docker://$image" | jq '[.layers[].size] | add')
    budget=$(echo "$load + 1.05 * $layers" | bc)
    r=$(ratio "$elf" "$budget")
    row "(e) ELF size vs PT_LOAD+1.05*layers, MiB" "$((elf >> 20))" "$(echo "$budget / 1048576" | bc)" "$r" "<=1.00" "$(verdict "$r" 1.00)"
    row "    PT_LOAD $((load >> 20)) MiB, layers $((layers >> 20)) MiB, vmlinux $(($(stat -c %s "$work/nginx.bundle/vmlinux") >> 20)) MiB" "" "" "" "" ""
fi

# --- (f) boot -------------------------------------------------------------------------------
now() { date +%s.%N; }
# Seconds from starting QEMU ("$@") to the first HTTP 200 on 127.0.0.1:$port.
time_to_page() {
    local port=$1 log=$2
    shift 2
    local start pid t
    start=$(now)
    "$@" -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:80" -device virtio-net-device,netdev=n0 \
        >"$log" 2>&1 &
    pid=$!
    qemu_pids+=("$pid")
    t=$(first_200 "$port" "$pid" "$start")
    if [ "$t" = fail ]; then
        echo "the VM ended before serving:" >&2
        tail -n 20 "$log" >&2
        kill "$pid" 2>/dev/null || true
        return 1
    fi
    echo "$t"
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}
if want boot; then
    command -v qemu-system-x86_64 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
    kernel=$(ls -v /boot/vmlinuz-*-cloud-amd64 | tail -n1)
    kver=${kernel#/boot/vmlinuz-}
    addr=10.0.2.15 gw=10.0.2.2
    # The same kernel as the baseline's, named: the default would be the oci2uk kernel once built.
    "$bin" build "$image" -o "$work/boot.elf" --kernel "$kernel" --net "$addr/24,$gw" \
        --cache "$work/cache" --quiet
    # The baseline: busybox, the same modules in the same order, a static address, httpd.
    mkdir -p "$work/bb/bin" "$work/bb/lib/modules" "$work/bb/www"
    cp /bin/busybox "$work/bb/bin/busybox"
    ln -s busybox "$work/bb/bin/sh"
    echo "Hello from busybox httpd" >"$work/bb/www/index.html"
    for m in virtio_pci virtio_mmio virtio_net button evdev; do
        modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' >"$work/bb/modules.list"
    : >"$work/bb/modules.order"
    while read -r ko; do
        base=$(basename "$ko")
        case $ko in
        *.xz) xz -dc "$ko" >"$work/bb/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.zst) zstd -dcq "$ko" >"$work/bb/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *) cp "$ko" "$work/bb/lib/modules/$base" ;;
        esac
        echo "$base" >>"$work/bb/modules.order"
    done <"$work/bb/modules.list"
    cat >"$work/bb/init" <<EOF
#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
while read -r m; do /bin/busybox insmod /lib/modules/\$m; done </modules.order
/bin/busybox ip link set lo up
/bin/busybox ip link set eth0 up
/bin/busybox ip addr add $addr/24 dev eth0
/bin/busybox ip route add default via $gw
exec /bin/busybox httpd -f -p 80 -h /www
EOF
    chmod +x "$work/bb/init"
    (cd "$work/bb" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -3 -q -c >"$work/bb.cpio.zst")
    # shellcheck disable=SC2054
    machine=(qemu-system-x86_64 -accel tcg -M microvm,isa-serial=on -nodefaults -no-user-config
        -display none -serial stdio -no-reboot -m 512)
    ours=() base=()
    for _ in $(seq "$runs"); do
        ours+=("$(time_to_page 18080 "$work/ours.log" "${machine[@]}" -kernel "$work/boot.elf")")
        base+=("$(time_to_page 18081 "$work/base.log" "${machine[@]}" -kernel "$kernel" \
            -initrd "$work/bb.cpio.zst" \
            -append "console=ttyS0 panic=-1 rdinit=/init quiet tsc_early_khz=$OCI2UK_TSC_KHZ")")
    done
    o=$(printf '%.2f\n' "${ours[@]}" | median)
    b=$(printf '%.2f\n' "${base[@]}" | median)
    r=$(ratio "$o" "$b")
    row "(f) boot to first HTTP 200 (TCG), s" "$o" "$b" "$r" "<=1.30" "$(verdict "$r" 1.30)"
fi

# --- (g) memory ---------------------------------------------------------------------------
memory_lines=""
if want memory && [ -x scripts/bench-memory.sh ]; then
    memory_lines=$(RUNS="$runs" scripts/bench-memory.sh 2>&1) || memory_lines+=$'\n(bench-memory.sh failed)'
fi

printf '\noci2uk bench: %s, median of %d runs, %s\n' "$image" "$runs" "$(date -u +%Y-%m-%dT%H:%MZ)"
printf '%-46s %12s %12s %8s %9s  %s\n' "figure" "oci2uk" "baseline" "ratio" "target" "result"
printf '%s\n' "${rows[@]}"
if [ -n "$memory_lines" ]; then
    printf '\n(g) scripts/bench-memory.sh:\n%s\n' "$memory_lines"
fi

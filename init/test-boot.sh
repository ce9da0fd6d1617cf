#!/usr/bin/env bash
# Boots the init for real: builds an initramfs by hand (the init, static busybox, the virtio
# modules from the kernel's module tree, a /rumpconfig.json), boots it under QEMU (TCG) on q35
# with virtio-net-pci and on microvm with virtio-net-device, and checks what the guest prints:
# the application's output, its identity, host name, DHCP address, a fetch from the host, a
# seeded volume, the final status line, and that QEMU exits by itself (power-off). Also checks
# the oci2uk.config= override, a missing program (127), ctrl-alt-del and the ACPI power button
# (the image's stop signal), and SIGKILL when the stop timeout is over.
#
# usage: init/test-boot.sh KERNEL OUTDIR
#   KERNEL   a bzImage (Debian's linux-image-cloud-amd64: /boot/vmlinuz-*-cloud-amd64)
#   OUTDIR   where the initramfs, logs and summary go (created)
# environment:
#   INIT      the init binary (default: built here for x86_64-unknown-linux-musl)
#   MODULES   the kernel's module directory (default: /lib/modules/VERSION read from KERNEL)
#   CASES     which cases to run (default: all: q35 microvm override notfound cad powerbutton
#             stoptimeout)
#   DEBUG=1   adds oci2uk.debug=1 (each init step with its time)
#   TIMEOUT   seconds per boot (default 120)
set -euo pipefail

[[ $# -eq 2 ]] || { sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d' >&2; exit 2; }
KERNEL=$(realpath "$1")
OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
QEMU=${QEMU:-qemu-system-x86_64}
TIMEOUT=${TIMEOUT:-120}
CASES=${CASES:-q35 microvm override notfound cad powerbutton stoptimeout}

mkdir -p "$OUT"
OUT=$(realpath "$OUT")

version=$(file -bL "$KERNEL" | sed -n 's/.*, version \([^ ]*\) .*/\1/p')
MODULES=${MODULES:-/lib/modules/$version}
[[ -f $MODULES/modules.dep ]] || { echo "no modules.dep in $MODULES (kernel version '$version')" >&2; exit 1; }

if [[ -z ${INIT:-} ]]; then
    (cd "$HERE/.." && cargo build -q -p oci2uk-init --target x86_64-unknown-linux-musl --release)
    INIT=$HERE/../target/x86_64-unknown-linux-musl/release/oci2uk-init
fi

# The modules in load order: each one's dependencies (modules.dep lists them nearest first,
# so reversed), then itself, each once.
declare -A seen=()
ordered=()
add_module() {
    local line path deps d i
    line=$(grep -E "(^|/)$1\.ko(\.[a-z]+)?:" "$MODULES/modules.dep" | head -1)
    [[ -n $line ]] || { grep -qE "/$1\.ko" "$MODULES/modules.builtin" && return; echo "no module $1" >&2; exit 1; }
    path=${line%%:*}
    read -r -a deps <<<"${line#*:}"
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        d=$(basename "${deps[i]}"); d=${d%%.ko*}
        add_module "$d"
    done
    [[ -n ${seen[$path]:-} ]] && return
    seen[$path]=1
    ordered+=("$path")
}
for m in virtio_pci virtio_mmio virtio_net button evdev; do add_module "$m"; done

root=$OUT/root
rm -rf "$root"
mkdir -p "$root"/{.oci2uk/modules,bin,dev,etc,work,data,www}
install -m 0755 "$INIT" "$root/.oci2uk/init"
install -m 0755 /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [[ -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
done
mknod -m 0600 "$root/dev/console" c 5 1
mod_json=()
for p in "${ordered[@]}"; do
    name=$(basename "$p"); name=${name%%.ko*}.ko
    case $p in
        *.ko.xz) xz -dc "$MODULES/$p" >"$root/.oci2uk/modules/$name" ;;
        *.ko.zst) zstd -qdc "$MODULES/$p" >"$root/.oci2uk/modules/$name" ;;
        *.ko.gz) gzip -dc "$MODULES/$p" >"$root/.oci2uk/modules/$name" ;;
        *) cp "$MODULES/$p" "$root/.oci2uk/modules/$name" ;;
    esac
    mod_json+=("\"/.oci2uk/modules/$name\"")
done
modules_json=$(IFS=,; echo "${mod_json[*]}")

# A volume seeded from the image: owned by the application's user, with content.
echo seeded-content >"$root/data/seed.txt"
chown -R 1000:1000 "$root/data"
chmod 0750 "$root/data"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "app:x:1000:1000::/work:/bin/sh" >>"$root/etc/passwd"

# A web server on the host, reached from the guest at 10.0.2.2 through QEMU's user network.
mkdir -p "$OUT/www"
echo hello-from-host >"$OUT/www/probe.txt"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$OUT/www" >"$OUT/http.log" 2>&1 &
http_pid=$!
trap 'kill $http_pid 2>/dev/null || true' EXIT

app='echo hello; id; echo "hostname=$(hostname)"; echo "pwd=$(pwd) GREETING=$GREETING"
ip -4 addr show eth0 2>/dev/null || ifconfig eth0
ip route 2>/dev/null
cat /etc/resolv.conf
wget -qO- http://10.0.2.2:'$port'/probe.txt || echo wget failed
cat /data/seed.txt; touch /data/new && echo data-writable; touch /tmp/t && echo tmp-writable
ls -ld /data /tmp
exit 7'
python3 - "$root/rumpconfig.json" "$app" "$modules_json" <<'EOF'
import json, sys
path, app, modules = sys.argv[1], sys.argv[2], json.loads("[" + sys.argv[3] + "]")
config = {
    "rc": [{"bin": "sh", "argv": ["-c", app], "workdir": "/work",
            "user": {"uid": 1000, "gid": 1000, "groups": [10]}}],
    "env": {"PATH": "/bin", "GREETING": "hi"},
    "hostname": "oci2uk-test",
    "mount": {"/data": {"source": "tmpfs"}},
    "oci2uk": {"modules": modules, "stop_signal": "SIGTERM", "stop_timeout": 5},
}
with open(path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
EOF

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc | gzip -6 >"$OUT/initrd.cpio.gz")
echo "initramfs: $OUT/initrd.cpio.gz ($(stat -c %s "$OUT/initrd.cpio.gz") bytes), modules: ${ordered[*]##*/}"

b64url() { python3 -c 'import base64,sys; print(base64.urlsafe_b64encode(sys.argv[1].encode()).decode().rstrip("="))' "$1"; }

base_append="console=ttyS0 panic=-1 rdinit=/.oci2uk/init quiet${DEBUG:+ oci2uk.debug=1}"
q35=(-M q35 -device virtio-net-pci,netdev=n0)
microvm=(-M microvm,isa-serial=on -device virtio-net-device,netdev=n0)
# Under TCG a microvm has no PIT speaker gate, HPET or ACPI PM timer to calibrate the TSC
# against, and this kernel hangs without a TSC frequency: give it the host's.
tsc_khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
microvm_append=" tsc_early_khz=${tsc_khz:-2000000}"

# Boots once; the log has one line per console line, prefixed with seconds since QEMU started.
# A `monitor` function in the environment, when set, gets the log path and the monitor socket.
boot() {
    local name=$1 append=$2; shift 2
    local log=$OUT/$name.log mon=$OUT/$name.mon start
    rm -f "$mon"
    : >"$log"
    start=${EPOCHREALTIME/./}
    {
        set +e
        timeout "$TIMEOUT" "$QEMU" -accel tcg -m 256 -nographic -no-reboot \
            -kernel "$KERNEL" -initrd "$OUT/initrd.cpio.gz" -append "$append" \
            -netdev user,id=n0 -monitor "unix:$mon,server,nowait" "$@" </dev/null 2>&1
        echo "@@ qemu exit $?"
    } | while IFS= read -r l; do
        local us=$((${EPOCHREALTIME/./} - start))
        printf '%d.%03d %s\n' $((us / 1000000)) $((us / 1000 % 1000)) "${l%$'\r'}"
    done >"$log" &
    local pipe=$!
    if [[ -n ${monitor_action:-} ]]; then $monitor_action "$log" "$mon"; fi
    wait "$pipe"
}

failures=0
check() { # case, description, command...
    local c=$1 what=$2; shift 2
    if "$@"; then echo "  ok   $c: $what"; else echo "  FAIL $c: $what"; failures=$((failures + 1)); fi
}
# A console line without its timestamp and terminal escapes (SeaBIOS and the kernel reset the
# terminal).
text() { cut -d' ' -f2- "$OUT/$1.log" | sed -E 's/\x1b(\[[0-9;?]*[a-zA-Z]|c)//g'; }
has() { grep -qE -- "$2" <(text "$1"); }
# The last line the guest's user space printed (the kernel's own lines start with '[').
last_user_line() { text "$1" | grep -v -e '^\[' -e '^@@' -e '^$' | tail -1; }
when() { sed -E 's/\x1b(\[[0-9;?]*[a-zA-Z]|c)//g' "$OUT/$1.log" | grep -m1 -E -- "^[0-9.]+ $2" | cut -d' ' -f1 || true; }

main_checks() {
    local c=$1
    check "$c" "application output" has "$c" '^hello$'
    check "$c" "uid/gid/groups" has "$c" '^uid=1000(\(app\))? gid=1000 groups=10$'
    check "$c" "host name" has "$c" '^hostname=oci2uk-test$'
    check "$c" "working directory and env" has "$c" '^pwd=/work GREETING=hi$'
    check "$c" "DHCP address 10.0.2.15/24" has "$c" 'inet 10\.0\.2\.15/24|inet addr:10\.0\.2\.15'
    check "$c" "default route" has "$c" '^default via 10\.0\.2\.2'
    check "$c" "resolv.conf from DHCP" has "$c" '^nameserver 10\.0\.2\.3$'
    check "$c" "fetch from the host" has "$c" '^hello-from-host$'
    check "$c" "volume seeded from the image" has "$c" '^seeded-content$'
    check "$c" "volume writable by the user" has "$c" '^data-writable$'
    check "$c" "/tmp writable" has "$c" '^tmp-writable$'
    check "$c" "volume keeps owner and mode" has "$c" '^drwxr-x--- +[0-9]+ (app|1000) +1000 .* /data$'
    check "$c" "final line" test "$(last_user_line "$c")" = "oci2uk: exit status 7"
    check "$c" "QEMU exited by itself" has "$c" '^@@ qemu exit 0$'
}

# Sends `$key` to the QEMU monitor once the guest printed "ready".
send_when_ready() {
    local log=$1 mon=$2 i
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        grep -q 'ready$' "$log" 2>/dev/null && break
        sleep 0.1
    done
    python3 - "$mon" "$key" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try:
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.1)
time.sleep(0.2)
s.sendall((sys.argv[2] + "\n").encode())
time.sleep(0.5)
EOF
}

summary=$OUT/summary.txt
: >"$summary"
figures() {
    local c=$1 first end
    first=$(when "$c" "${2:-hello$}")
    end=$(when "$c" '@@ qemu exit')
    echo "$c: first application output at ${first:-?} s, QEMU gone at ${end:-?} s" | tee -a "$summary"
}

for c in $CASES; do
    case $c in
        q35)
            boot q35 "$base_append" "${q35[@]}"
            main_checks q35; figures q35 ;;
        microvm)
            boot microvm "$base_append$microvm_append" "${microvm[@]}"
            main_checks microvm; figures microvm ;;
        override)
            over=$(b64url '{"env": {"GREETING": "overridden"}, "cmdline": "sh -c '"'"'echo greeting=$GREETING argv=$0; exit 3'"'"' zero"}')
            boot override "$base_append$microvm_append oci2uk.config=$over" "${microvm[@]}"
            check override "env and argv from oci2uk.config" has override '^greeting=overridden argv=zero$'
            check override "final line" test "$(last_user_line override)" = "oci2uk: exit status 3"
            check override "QEMU exited by itself" has override '^@@ qemu exit 0$'
            figures override 'greeting=' ;;
        notfound)
            over=$(b64url '{"cmdline": "no-such-program x"}')
            boot notfound "$base_append$microvm_append oci2uk.config=$over" "${microvm[@]}"
            check notfound "clear error" has notfound '^oci2uk: error: exec "no-such-program": executable file not found in \$PATH$'
            check notfound "status 127" test "$(last_user_line notfound)" = "oci2uk: exit status 127"
            check notfound "QEMU exited by itself" has notfound '^@@ qemu exit 0$' ;;
        cad | powerbutton)
            # The image's stop signal (SIGUSR1 here) reaches the application on a shutdown
            # request: ctrl-alt-del on the keyboard, or the ACPI power button.
            over=$(b64url '{"cmdline": "sh -c '"'"'trap \"echo got USR1; exit 5\" USR1; echo ready; while :; do sleep 1; done'"'"'", "oci2uk": {"stop_signal": "USR1"}}')
            if [[ $c == cad ]]; then key='sendkey ctrl-alt-delete'; else key='system_powerdown'; fi
            monitor_action=send_when_ready
            boot "$c" "$base_append oci2uk.config=$over" "${q35[@]}"
            monitor_action=
            check "$c" "stop signal delivered" has "$c" '^got USR1$'
            check "$c" "final line" test "$(last_user_line "$c")" = "oci2uk: exit status 5"
            check "$c" "QEMU exited by itself" has "$c" '^@@ qemu exit 0$' ;;
        stoptimeout)
            # An application that ignores the stop signal is killed when stop_timeout is over.
            over=$(b64url '{"cmdline": "sh -c '"'"'trap \"\" TERM; echo ready; while :; do sleep 1; done'"'"'", "oci2uk": {"stop_timeout": 1}}')
            key='sendkey ctrl-alt-delete'
            monitor_action=send_when_ready
            boot "$c" "$base_append oci2uk.config=$over" "${q35[@]}"
            monitor_action=
            check "$c" "SIGKILL after the stop timeout" test "$(last_user_line "$c")" = "oci2uk: killed by signal 9"
            check "$c" "QEMU exited by itself" has "$c" '^@@ qemu exit 0$' ;;
        *) echo "unknown case $c" >&2; exit 2 ;;
    esac
done

echo "init: $INIT ($(stat -c %s "$INIT") bytes)" | tee -a "$summary"
if ((failures)); then
    echo "$failures check(s) failed; logs in $OUT" >&2
    exit 1
fi
echo "all checks passed; logs in $OUT"

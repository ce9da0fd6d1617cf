#!/usr/bin/env bash
# Builds the Xen test host: Xen 4.17 and a Debian dom0 that boot under qemu-system-x86_64 with
# software emulation (TCG emulates AMD SVM with nested paging, so Xen runs PV and PVH guests).
#
#   build.sh path    print where the host is (or will be) cached; builds nothing
#   build.sh build   build it unless it is cached; print its directory
#
# The directory holds `xen` (the hypervisor, an ELF32 multiboot image QEMU's -kernel loads),
# `vmlinuz` (Debian's generic kernel: the cloud kernel has no CONFIG_XEN_DOM0) and `dom0.cpio.gz`
# (busybox, the xl toolstack and its libraries, the hotplug scripts, the backend and 9p modules,
# and testxen/dom0-init as /init). Everything comes from Debian's packages, installed with
# debootstrap into a tree of our own: never into the host's /boot, where a second kernel would
# change which kernel oci2uk picks by default.
#
# Cached under ${OCI2UK_XEN_CACHE:-~/.cache/oci2uk-xen}/KEY, KEY a hash of this script and of the
# dom0 init: debootstrap takes minutes, and the same recipe gives the same host.
set -Eeuo pipefail
trap 'printf "testxen: error: line %s: %s failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

script=$(readlink -f "${BASH_SOURCE[0]}")
here=$(dirname "$script")
cache_root=${OCI2UK_XEN_CACHE:-$HOME/.cache/oci2uk-xen}
key=$(cat "$script" "$here/dom0-init" | sha256sum | cut -c1-16)
final=$cache_root/$key

log() { printf 'testxen: %s\n' "$*" >&2; }

case ${1:-build} in
path) echo "$final"; exit 0 ;;
build) ;;
*) echo "usage: $0 path|build" >&2; exit 2 ;;
esac

if [[ -e $final/dom0.cpio.gz ]]; then
    echo "$final"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (debootstrap)"
    exit 1
fi
for tool in debootstrap cpio; do
    command -v "$tool" >/dev/null || { log "$tool is missing: apt-get install $tool"; exit 1; }
done

mkdir -p "$cache_root"
scratch=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# The packages dom0 needs: the hypervisor and toolstack, the generic kernel (dom0-capable, with
# the backends and 9p as modules), and the tools the hotplug scripts and the init call. The
# debootstrap tree is cached on its own, under the package list, so that a change to the
# initramfs recipe does not install everything again.
packages=xen-hypervisor-4.17-amd64,xen-utils-4.17,linux-image-amd64,busybox-static,bridge-utils,iproute2,kmod,udhcpd
root=$cache_root/tree-$(echo "$packages" | sha256sum | cut -c1-16)
if [[ ! -e $root/.complete ]]; then
    log "debootstrap bookworm with $packages (several minutes)"
    rm -rf "$root"
    debootstrap --variant=minbase --include="$packages" bookworm "$root" >"$scratch/debootstrap.log" 2>&1 ||
        { tail -20 "$scratch/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
    touch "$root/.complete"
fi

kver=$(basename "$(ls -d "$root"/lib/modules/*-amd64 | sort -V | tail -1)")
xenbin=/usr/lib/xen-4.17/bin
zcat "$root"/boot/xen-4.17-amd64.gz >"$scratch/xen"
cp "$root/boot/vmlinuz-$kver" "$scratch/vmlinuz"

log "dom0 initramfs for kernel $kver"
init=$scratch/init
mkdir -p "$init"/{bin,sbin,etc,proc,sys,dev,run,tmp,var/log/xen/console,var/lib/xen,var/run/xen,share,lib64}
cp "$root/bin/busybox" "$init/bin/busybox"
for applet in $("$init/bin/busybox" --list); do
    [[ -e $init/bin/$applet ]] || ln -s busybox "$init/bin/$applet"
done

# The toolstack and what it execs, with their shared libraries (the ldd closure, plus
# libgcc_s.so.1: glibc dlopens it for pthread_cancel, ldd does not list it, and without it every
# `xl create` aborts after building the domain).
binaries=(
    "$xenbin/xl" "$xenbin/xenstored" "$xenbin/xenconsoled" "$xenbin/xenconsole"
    "$xenbin/xen-init-dom0" "$xenbin/libxl-save-helper" /usr/bin/xenstore
    /bin/bash /sbin/ip /usr/sbin/brctl /bin/kmod
)
copy_in() { # PATH: copy a file from the tree to the same path in the initramfs
    mkdir -p "$init/$(dirname "$1")"
    cp -aL "$root/$1" "$init/$1"
}
declare -A seen=()
for b in "${binaries[@]}"; do
    copy_in "$b"
    while read -r lib; do
        [[ -n $lib && -z ${seen[$lib]:-} ]] || continue
        seen[$lib]=1
        copy_in "$lib"
    done < <(chroot "$root" ldd "$b" | grep -o '/[^ ]*' | sort -u)
done
for lib in "$root"/lib/x86_64-linux-gnu/libgcc_s.so.1; do copy_in "${lib#"$root"}"; done
for tool in xenstore-read xenstore-write xenstore-ls xenstore-rm xenstore-list xenstore-exists; do
    ln -s xenstore "$init/usr/bin/$tool"
done
ln -sf /bin/kmod "$init/sbin/modprobe"
ln -sf /bin/kmod "$init/sbin/depmod"
ln -sf /bin/kmod "$init/sbin/insmod"
mkdir -p "$init/usr/sbin"
ln -sf /usr/sbin/brctl "$init/sbin/brctl"
cp -a "$root/etc/xen" "$init/etc/"
mkdir -p "$init/usr/lib/xen-4.17"
cp -a "$root/usr/lib/xen-4.17/boot" "$init/usr/lib/xen-4.17/" 2>/dev/null || true
mkdir -p "$init/usr/share/xen"
echo 'root:x:0:0:root:/root:/bin/sh' >"$init/etc/passwd"
echo 'root:x:0:' >"$init/etc/group"

# Modules: the Xen drivers dom0 needs, the backends, the bridge, loop and the 9p share the
# host's tests use, with their dependencies (modprobe resolves them from modules.dep).
mods=$init/lib/modules/$kver
mkdir -p "$mods"
cp "$root/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$mods/"
want=(drivers/xen drivers/block/xen-blkback drivers/net/xen-netback net/bridge net/802 net/llc
    drivers/block/loop.ko drivers/net/tun.ko net/9p fs/9p fs/netfs fs/fscache drivers/virtio
    drivers/char/virtio_console.ko)
for w in "${want[@]}"; do
    src=$root/lib/modules/$kver/kernel/$w
    [[ -e $src || -e $src.xz ]] || continue
    (cd "$root/lib/modules/$kver" && find "kernel/$w"* -name '*.ko*' -print0 | cpio -0pdm --quiet "$mods")
done
depmod -b "$init" "$kver"

install -m 0755 "$here/dom0-init" "$init/init"
(cd "$init" && find . -print0 | LC_ALL=C sort -z | cpio -0o -H newc --quiet --reproducible | gzip -9n) >"$scratch/dom0.cpio.gz"

mkdir -p "$final.tmp"
mv "$scratch/xen" "$scratch/vmlinuz" "$scratch/dom0.cpio.gz" "$final.tmp/"
echo "$kver" >"$final.tmp/kernel-version"
rm -rf "$final"
mv "$final.tmp" "$final"
log "cached $final"
echo "$final"

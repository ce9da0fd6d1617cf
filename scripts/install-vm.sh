#!/usr/bin/env bash
# Installs what baking and booting need: QEMU and Debian's cloud kernel (the reference kernel:
# PVH and Xen built in, virtio as modules), Debian's Linux source and a compiler for
# `oci2uk kernel build`, squashfs-tools, and the musl target the guest init is built for.
set -euo pipefail

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || missing+=(linux-image-cloud-amd64)
# unsquashfs: an independent reader the SquashFS root's tests check against.
command -v unsquashfs >/dev/null || missing+=(squashfs-tools)
# run -v: mkfs.ext4 makes a new disk image's file system; virtiofsd shares a host directory
# (Debian 12 ships it with QEMU in qemu-system-common, Debian 13 as the package virtiofsd).
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v virtiofsd >/dev/null || [ -x /usr/libexec/virtiofsd ] || [ -x /usr/lib/qemu/virtiofsd ] ||
    missing+=(virtiofsd)
# oci2uk kernel build: Debian's Linux source and what building it takes.
[ -f /usr/src/linux-source-6.1.tar.xz ] || missing+=(linux-source-6.1)
for tool in make:make gcc:gcc flex:flex bison:bison bc:bc; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[ -f /usr/include/libelf.h ] || missing+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
# The kernel and bake tests compress with every codec Linux knows and disassemble the stub.
for tool in readelf:binutils objdump:binutils lzop:lzop lz4:lz4 zstd:zstd xz:xz-utils bzip2:bzip2 cpio:cpio; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-vm.sh: run as root to install: ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
        --no-install-recommends "${missing[@]}"
fi
if command -v rustup >/dev/null; then
    rustup target list --installed | grep -qx x86_64-unknown-linux-musl ||
        rustup target add x86_64-unknown-linux-musl
fi

#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into DIR/<target>/ (default fuzz/seeds).

The committed corpora (fuzz/corpus/<target>) grew from these seeds in ten-minute runs, were
minimised with `cargo fuzz cmin <target>`, then cut to a set that still covers every edge:

    fuzz/target/x86_64-unknown-linux-gnu/release/<target> -set_cover_merge=1 -use_counters=0 \
        NEW_DIR fuzz/corpus/<target>

The hostile images of tests/hostile are in the archive corpus as they are (hostile-*).
Standard library only, plus the compressors Linux uses for its bzImage payload (gzip, bzip2,
lzma, xz, lzop, lz4, zstd); a missing one is skipped.

    python3 fuzz/seeds.py [DIR]
"""

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFORMANCE = os.path.join(ROOT, "..", "shared", "conformance", "go-containerregistry")
HOSTILE = os.path.join(ROOT, "tests", "hostile")


def write(dir_, name, data):
    os.makedirs(dir_, exist_ok=True)
    with open(os.path.join(dir_, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def references(out):
    digest = "sha256:" + "a" * 64
    names = [
        "nginx",
        "nginx:1.25",
        "library/nginx:latest",
        "docker.io/library/nginx:latest",
        "index.docker.io/user/app",
        "127.0.0.1:5000/a/b:1@" + digest,
        "localhost:5000/nginx@" + digest,
        "[::1]:5000/x/y:z",
        "quay.io/org/repo-name_x.y:v1.2.3-rc.1",
        "docker://nginx",
        "docker://oci:5000/x",
        "oci:/tmp/layout:nginx",
        "oci:layout",
        "oci-archive:/tmp/hello.tar:latest",
        "docker-archive:t.tar:bazel/v1/tarball:test_image_1",
        "docker-archive:app.tar:@1",
        "UPPER/case",
        "nginx@sha256:zz",
        "a b",
        "nginx:",
        "oci:",
    ]
    for i, n in enumerate(names):
        write(out, "ref-%02d" % i, n)


SHA_EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def manifests(out):
    # The first byte picks the content type the transport claims (see the target): 0 none,
    # 1 OCI manifest, 2 OCI index, 3 Docker manifest, 4 Docker list, 5 schema 1.
    layer = lambda mt, i: {"mediaType": mt, "digest": "sha256:%064x" % i, "size": 100 + i}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": SHA_EMPTY, "size": 0},
        "layers": [
            layer("application/vnd.oci.image.layer.v1.tar+gzip", 1),
            layer("application/vnd.oci.image.layer.v1.tar+zstd", 2),
            layer("application/vnd.oci.image.layer.nondistributable.v1.tar", 3),
            layer("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", 4),
        ],
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }
    docker = dict(manifest, mediaType=DOCKER_MANIFEST)
    docker["config"] = dict(manifest["config"], mediaType="application/vnd.docker.container.image.v1+json")
    docker["layers"] = [layer("application/vnd.docker.image.rootfs.diff.tar.gzip", 5)]

    def entry(i, os_, arch, variant=None, mt=OCI_MANIFEST):
        p = {"os": os_, "architecture": arch}
        if variant:
            p["variant"] = variant
        return {"mediaType": mt, "digest": "sha256:%064x" % i, "size": 500, "platform": p}

    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            entry(1, "linux", "amd64"),
            entry(2, "linux", "arm64", "v8"),
            entry(3, "linux", "arm", "v7"),
            entry(4, "unknown", "unknown"),
            entry(5, "linux", "amd64", mt=OCI_INDEX),
            {"mediaType": OCI_MANIFEST, "digest": "sha256:%064x" % 6, "size": 1},
        ],
    }
    docker_list = dict(index, mediaType=DOCKER_LIST)
    docker_list["manifests"] = [entry(7, "linux", "amd64", mt=DOCKER_MANIFEST), entry(8, "linux", "arm64", mt=DOCKER_MANIFEST)]
    schema1 = {"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": [{"blobSum": SHA_EMPTY}]}
    both = dict(index, layers=[])
    docs = [
        (1, manifest),
        (0, manifest),
        (3, docker),
        (0, dict(docker, mediaType=None)),
        (2, index),
        (0, index),
        (4, docker_list),
        (1, index),
        (5, schema1),
        (0, both),
        (0, {"schemaVersion": 2}),
    ]
    for i, (ct, doc) in enumerate(docs):
        doc = {k: v for k, v in doc.items() if v is not None}
        write(out, "doc-%02d" % i, bytes([ct]) + json.dumps(doc).encode())


# ELF64 x86_64, as src/kernel/elf.rs's test builder writes them.
def elf(segs, notes, first_data=0x200):
    note_bytes = b""
    for name, kind, desc in notes:
        n = name.encode() + b"\0"
        note_bytes += struct.pack("<III", len(n), len(desc), kind) + n
        note_bytes += b"\0" * (-len(note_bytes) % 4) + desc
        note_bytes += b"\0" * (-len(note_bytes) % 4)
    phnum = len(segs) + 1
    out = bytearray(max(first_data, 64 + phnum * 56))
    phdrs = []
    for paddr, data, memsz in segs:
        out += b"\0" * (-len(out) % 16)
        phdrs.append((1, 7, len(out), 0xFFFFFFFF80000000 + paddr, paddr, len(data), memsz, 16))
        out += data
    out += b"\0" * (-len(out) % 4)
    phdrs.append((4, 4, len(out), 0, 0, len(note_bytes), len(note_bytes), 4))
    out += note_bytes
    out[0:16] = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    out[16:24] = struct.pack("<HHI", 2, 62, 1)
    out[24:32] = struct.pack("<Q", segs[0][0] if segs else 0)
    out[32:40] = struct.pack("<Q", 64)
    out[52:60] = struct.pack("<HHHH", 64, 56, phnum, 64)
    for i, p in enumerate(phdrs):
        out[64 + i * 56 : 64 + (i + 1) * 56] = struct.pack("<IIQQQQQQ", *p)
    return bytes(out)


def tiny_vmlinux(pvh=0x1000001, ikconfig=True):
    text = b"\x90\x90Linux version 6.1.0-99-test (builder@example) #1 SMP\n\0"
    if ikconfig:
        text += b"IKCFG_ST" + gzip.compress(b"CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n# CONFIG_RD_XZ is not set\n", mtime=0) + b"IKCFG_ED"
    text += bytes(range(256)) * 4
    notes = [("Xen", 6, b"linux\0")]
    if pvh is not None:
        notes.append(("Xen", 18, struct.pack("<Q", pvh)))
    notes.append(("GNU", 3, b"\xab" * 20))
    return elf([(0x1000000, text, 0x400000)], notes)


def fake_bzimage(payload):
    image = bytearray(5 * 512)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = struct.pack("<H", 0x20F)
    version = b"6.1.0-99-test (builder@example) #1 SMP\0"
    image[0x400 : 0x400 + len(version)] = version
    image[0x20E:0x210] = struct.pack("<H", 0x400 - 0x200)
    image[0x248:0x24C] = struct.pack("<I", 0x123)
    image[0x24C:0x250] = struct.pack("<I", len(payload))
    return bytes(image) + b"\xcc" * 0x123 + payload + b"\0" * 300


COMPRESSORS = [
    ("gzip", ["gzip", "-n", "-9", "-c"]),
    ("bzip2", ["bzip2", "-9", "-c"]),
    ("lzma", ["lzma", "-9", "-c"]),
    ("xz", ["xz", "--check=crc32", "--x86", "--lzma2=dict=1MiB", "-c"]),
    ("lzo", ["lzop", "-9", "-c"]),
    ("lz4", ["lz4", "-l", "-9", "-c"]),
    ("zstd", ["zstd", "-19", "-c", "-q"]),
]


def kernels(out):
    vmlinux = tiny_vmlinux()
    write(out, "vmlinux", vmlinux)
    write(out, "vmlinux-nopvh", tiny_vmlinux(pvh=None, ikconfig=False))
    write(out, "bzimage-elf", fake_bzimage(vmlinux))
    for name, cmd in COMPRESSORS:
        if shutil.which(cmd[0]) is None:
            print("skipped %s: %s is not installed" % (name, cmd[0]), file=sys.stderr)
            continue
        payload = subprocess.run(cmd, input=vmlinux, stdout=subprocess.PIPE, check=True).stdout
        if name == "lz4":
            payload += struct.pack("<I", len(vmlinux))  # the kernel appends the size
        write(out, "bzimage-" + name, fake_bzimage(payload))
    arm64 = bytearray(0x200)
    arm64[0x38:0x3C] = b"ARM\x64"
    arm64 += b"Linux version 6.1.0-99-arm64 (builder@example) #1 SMP\n\0"
    write(out, "arm64-image", bytes(arm64))
    write(out, "arm64-image-gz", gzip.compress(bytes(arm64), mtime=0))
    # The head of a real bzImage: the setup header, the start of the decompressor.
    for name in sorted(os.listdir("/boot")) if os.path.isdir("/boot") else []:
        if name.startswith("vmlinuz-"):
            with open(os.path.join("/boot", name), "rb") as f:
                write(out, "bzimage-head", f.read(16 * 1024))
            break


def good_archives(out):
    """Valid images with uncompressed layers of every entry kind, for mutations to start from."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make", os.path.join(HOSTILE, "make.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    lower = m.plain(
        m.dir_("usr/lib"),
        m.symlink("lib", "usr/lib"),
        m.file("lib/libc.so", b"\x7fELF" + bytes(60), mode=0o755),
        m.hardlink("usr/lib/libc.so.6", "usr/lib/libc.so"),
        m.header("dev-null", b"3"),
        m.header("fifo", b"6"),
        m.pax([("path", "long/" + "n" * 120), ("SCHILY.xattr.user.k", "v"), ("mtime", "1.5")]),
        m.file("long-name-placeholder", b"long"),
        m.file("gone", b"x"),
        m.dir_("opaque"),
        m.file("opaque/old", b"old"),
    )
    upper = m.plain(m.file(".wh.gone"), m.file("opaque/.wh..wh..opq"), m.file("opaque/new", b"new"))
    write(out, "good-docker.tar", m.docker_archive([lower, upper]))
    write(out, "good-oci.tar", m.Layout([lower, upper]).archive())


def archives(out):
    good_archives(out)
    for d in [CONFORMANCE, HOSTILE]:
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if os.path.isfile(path) and name.endswith((".tar", ".tar.gz", ".tar.zst")):
                with open(path, "rb") as f:
                    data = f.read()
                if len(data) <= 256 * 1024:
                    write(out, os.path.basename(d) + "-" + name, data)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "fuzz", "seeds")
    references(os.path.join(out, "reference"))
    manifests(os.path.join(out, "manifest"))
    kernels(os.path.join(out, "kernel"))
    archives(os.path.join(out, "docker_archive"))


if __name__ == "__main__":
    main()

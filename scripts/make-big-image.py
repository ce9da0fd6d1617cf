#!/usr/bin/env python3
"""Writes an OCI image layout holding one image of more than 1 GiB, for the memory bench.

    scripts/make-big-image.py DIR [--tag big] [--mib 1100]

Three gzip layers, generated from a fixed seed (the same bytes every time):
  1. the host's static busybox as /bin/busybox (the entrypoint) and /etc/passwd, then
     incompressible files of 64 MiB each (about 60% of the size);
  2. compressible files (text-like, repeated lines) and 20,000 small files in a deep tree;
  3. a whiteout of one large file of layer 1, an opaque directory, and a rewritten file.
Cmd ["/bin/busybox", "true"]. Python standard library only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile

MIB = 1 << 20
CHUNK = 4 * MIB
MTIME = 1700000000


class Digesting:
    """A file object that hashes and counts what is written through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


class Stream(io.RawIOBase):
    """Reads `size` bytes produced chunk by chunk by `gen`."""

    def __init__(self, gen):
        self.gen, self.buf = gen, b""

    def readable(self):
        return True

    def readinto(self, b):
        while not self.buf:
            try:
                self.buf = next(self.gen)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def random_chunks(rng, size):
    left = size
    while left:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def text_chunks(rng, size):
    words = [b"oci2uk", b"layer", b"flatten", b"kernel", b"initramfs", b"guest", b"tar"]
    line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    block = line * (CHUNK // len(line)) + line[: CHUNK % len(line)]
    left = size
    i = 0
    while left:
        n = min(CHUNK, left)
        # A counter per block so blocks differ (no file-level deduplication of everything).
        tag = b"%016d\n" % i
        yield tag + block[: n - len(tag)] if n > len(tag) else block[:n]
        left -= n
        i += 1


def info(name, size=0, kind=tarfile.REGTYPE, mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mode, ti.mtime = size, kind, mode, MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def add_file(tar, name, size, chunks, mode=0o644):
    tar.addfile(info(name, size, mode=mode), io.BufferedReader(Stream(chunks), CHUNK))


def add_dir(tar, name):
    tar.addfile(info(name, kind=tarfile.DIRTYPE, mode=0o755))


def write_layer(blobs, build):
    """Writes a gzip layer; returns (descriptor, diff_id)."""
    fd, tmp = tempfile.mkstemp(dir=blobs)
    with os.fdopen(fd, "wb") as raw:
        outer = Digesting(raw)
        with gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=1, mtime=0) as gz:
            inner = Digesting(gz)
            with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                build(tar)
    digest = outer.h.hexdigest()
    os.replace(tmp, os.path.join(blobs, digest))
    desc = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": "sha256:" + digest,
        "size": outer.n,
    }
    return desc, "sha256:" + inner.h.hexdigest(), inner.n


def put_json(blobs, obj, media_type):
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--tag", default="big")
    ap.add_argument("--mib", type=int, default=1100, help="total uncompressed MiB (about)")
    ap.add_argument("--busybox", default="/bin/busybox")
    args = ap.parse_args()

    rng = random.Random(20240601)
    random_files = max(1, int(args.mib * 0.6) // 64)
    text_mib = max(1, args.mib - random_files * 64 - 40)

    out = args.dir
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = os.path.join(tmp, "blobs", "sha256")
    os.makedirs(blobs)

    def layer1(tar):
        add_dir(tar, "bin")
        add_dir(tar, "etc")
        with open(args.busybox, "rb") as f:
            data = f.read()
        tar.addfile(info("bin/busybox", len(data), mode=0o755), io.BytesIO(data))
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        tar.addfile(info("etc/passwd", len(passwd)), io.BytesIO(passwd))
        add_dir(tar, "data")
        add_dir(tar, "data/random")
        for i in range(random_files):
            add_file(tar, "data/random/r%03d.bin" % i, 64 * MIB, random_chunks(rng, 64 * MIB))

    def layer2(tar):
        add_dir(tar, "data/text")
        per = 16 * MIB
        for i in range(max(1, text_mib // 16)):
            add_file(tar, "data/text/t%03d.txt" % i, per, text_chunks(rng, per))
        add_dir(tar, "data/small")
        for d in range(100):
            add_dir(tar, "data/small/d%02d" % d)
            for f in range(200):
                body = b"small file %d/%d\n" % (d, f) * (1 + (d * f) % 64)
                tar.addfile(info("data/small/d%02d/f%03d" % (d, f), len(body)), io.BytesIO(body))

    def layer3(tar):
        tar.addfile(info("data/random/.wh.r000.bin"))
        tar.addfile(info("data/small/d00/.wh..wh..opq"))
        body = b"rewritten\n"
        tar.addfile(info("data/small/d00/new", len(body)), io.BytesIO(body))
        tar.addfile(info("data/text/t000.txt", len(body)), io.BytesIO(body))

    layers, diff_ids, total = [], [], 0
    for build in (layer1, layer2, layer3):
        desc, diff_id, n = write_layer(blobs, build)
        layers.append(desc)
        diff_ids.append(diff_id)
        total += n
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "true"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "scripts/make-big-image.py"}],
    }
    cdesc = put_json(blobs, config, "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": layers,
    }
    mdesc = put_json(blobs, manifest, "application/vnd.oci.image.manifest.v1+json")
    mdesc["annotations"] = {"org.opencontainers.image.ref.name": args.tag}
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [mdesc]}, f)
    with open(os.path.join(tmp, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    print(
        "%s: %d MiB uncompressed in %d layers, %d MiB compressed"
        % (out, total // MIB, len(layers), sum(l["size"] for l in layers) // MIB),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the hostile-image corpus beside this script: one small image per way an image can
attack the converter, as docker-archive tars, oci-archive tars and OCI layout directories.

Every byte is fixed (mtimes 0, sorted JSON keys, gzip without a timestamp), so running it again
gives the same files; `tests/it/hostile.rs` runs oci2uk on each and says what must happen.
Decompression bombs are built by that test at run time: they are megabytes even when
compressed. Standard library only.

    python3 tests/hostile/make.py
"""

import gzip
import hashlib
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_DOCUMENT_SIZE = 4 * 1024 * 1024  # src/image/mod.rs

# ---------------------------------------------------------------------------------------------
# Tar members, written by hand so that names, links and sizes are exactly as given.


def octal(n, width):
    return ("%0*o" % (width - 1, n)).encode() + b"\0"


def header(name, typeflag=b"0", size=0, link="", mode=0o644, size_field=None):
    """A ustar header. `size_field` overrides what the size field says (for desync cases)."""
    name_b, link_b = name.encode(), link.encode()
    assert len(name_b) <= 100 and len(link_b) <= 100, name
    h = bytearray(512)
    h[0 : len(name_b)] = name_b
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = octal(size if size_field is None else size_field, 12)
    h[136:148] = octal(0, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157 : 157 + len(link_b)] = link_b
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = octal(0, 8)
    h[337:345] = octal(0, 8)
    h[148:156] = ("%06o" % sum(h)).encode() + b"\0 "
    return bytes(h)


def pad(data):
    return data + b"\0" * (-len(data) % 512)


def file(name, data=b"", mode=0o644):
    return header(name, b"0", len(data), mode=mode) + pad(data)


def dir_(name, mode=0o755):
    return header(name.rstrip("/") + "/", b"5", mode=mode)


def symlink(name, target):
    return header(name, b"2", link=target, mode=0o777)


def hardlink(name, target):
    return header(name, b"1", link=target)


def pax(records, name="PaxHeader"):
    """A pax extended header ('x') for the member that follows."""
    body = b""
    for k, v in records:
        rec = (" %s=%s\n" % (k, v)).encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n = len(str(n)) + len(rec)
        body += str(n).encode() + rec
    return header(name, b"x", len(body)) + pad(body)


def tar(*members, end=True):
    return b"".join(members) + (b"\0" * 1024 if end else b"")


def gz(data):
    return gzip.compress(data, compresslevel=9, mtime=0)


def is_gzip(data):
    return data[:2] == b"\x1f\x8b"


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dumps(doc):
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def config(diff_ids, pad_to=0):
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/true"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    data = dumps(doc)
    # JSON allows any amount of whitespace: an oversize document that is still valid.
    return data + b" " * max(0, pad_to - len(data))


# ---------------------------------------------------------------------------------------------
# Image containers.


def docker_archive(
    layers, diff_ids=None, compress=False, layer_names=None, extra=(), config_pad=0, manifest_pad=0
):
    """A `docker save` archive of one image. `layers` are the layer blobs (plain or gzip tars),
    stored as `N/layer.tar`; `layer_names` is what manifest.json lists instead of those names;
    `diff_ids` default to the sha256 of each uncompressed tar."""
    if diff_ids is None:
        diff_ids = [sha256(gzip.decompress(l) if is_gzip(l) else l) for l in layers]
    cfg = config(diff_ids, config_pad)
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    names = ["%d/layer.tar" % i for i in range(len(layers))]
    manifest = dumps(
        [{"Config": cfg_name, "RepoTags": ["hostile:latest"], "Layers": layer_names or names}]
    )
    manifest += b" " * max(0, manifest_pad - len(manifest))
    members = [file("manifest.json", manifest)]
    members.append(file(cfg_name, cfg))
    for name, layer in zip(names, layers):
        members.append(dir_(name.split("/")[0]))
        members.append(file(name, layer))
    members.extend(extra)
    out = tar(*members)
    return gz(out) if compress else out


class Layout:
    """An OCI image layout of one image, as files (path -> bytes)."""

    def __init__(self, layers, diff_ids=None, config_pad=0, index_pad=0, drop=(), sizes=None):
        sizes = sizes or {}
        if diff_ids is None:
            diff_ids = [sha256(gzip.decompress(l) if is_gzip(l) else l) for l in layers]
        self.files = {"oci-layout": dumps({"imageLayoutVersion": "1.0.0"})}
        cfg = config(diff_ids, config_pad)
        blob = lambda data, kind: self.blob(data, kind in drop)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": blob(cfg, "config"),
                "size": sizes.get("config", len(cfg)),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar"
                    + ("+gzip" if is_gzip(l) else ""),
                    "digest": blob(l, "layer"),
                    "size": len(l),
                }
                for l in layers
            ],
        }
        m = dumps(manifest)
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": blob(m, "manifest"),
                    "size": sizes.get("manifest", len(m)),
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }
            ],
        }
        data = dumps(index)
        self.files["index.json"] = data + b" " * max(0, index_pad - len(data))

    def blob(self, data, absent=False):
        d = sha256(data)
        if not absent:
            self.files["blobs/sha256/" + d.split(":")[1]] = data
        return d

    def write_dir(self, path):
        shutil.rmtree(path, ignore_errors=True)
        for name, data in sorted(self.files.items()):
            p = os.path.join(path, name)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)

    def archive(self, compress=False):
        members = []
        made = set()
        for name, data in sorted(self.files.items()):
            parts = name.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made:
                    made.add(d)
                    members.append(dir_(d))
            members.append(file(name, data))
        out = tar(*members)
        return gz(out) if compress else out


# ---------------------------------------------------------------------------------------------
# The cases. Each layer holds a harmless file besides the attack, so the image is otherwise a
# normal one.

BASE = [dir_("etc"), file("etc/hostname", b"hostile\n")]


def layer(*members):
    return gz(tar(*BASE, *members))


def plain(*members):
    return tar(*BASE, *members)


CASES = {}


def case(name, data):
    CASES[name] = data


# Escapes by name.
case("name-dotdot.tar", docker_archive([layer(file("../../sentinel/pwned", b"x"))]))
case("name-dotdot-inner.tar", docker_archive([layer(file("etc/../../pwned", b"x"))]))
case("name-absolute-dotdot.tar", docker_archive([layer(file("/../pwned", b"x"))]))
# An absolute name is read relative to the image root (as docker and containerd do).
case("name-absolute.tar", docker_archive([layer(file("/abs/pwned", b"abs\n"))]))
# The archive's own members: a layer named outside the archive, a layer that is a symlink out
# of it, members named outside it.
case("archive-layer-dotdot.tar", docker_archive([layer()], layer_names=["../../../etc/passwd"]))
case(
    "archive-layer-symlink.tar",
    docker_archive(
        [layer()], layer_names=["link.tar"], extra=[symlink("link.tar", "../../../etc/passwd")]
    ),
)
case("archive-member-dotdot.tar", docker_archive([layer()], extra=[file("../outside", b"x")]))
case("archive-member-absolute.tar", docker_archive([layer()], extra=[file("/tmp/outside", b"x")]))

# Symlink escapes: a symlink pointing out, then a file written through it (a later layer, and
# the same layer).
case(
    "symlink-escape.tar",
    docker_archive(
        [
            layer(symlink("evil", "../../../../../../../../sentinel")),
            layer(file("evil/pwned", b"through the link\n")),
        ]
    ),
)
case(
    "symlink-escape-absolute.tar",
    docker_archive(
        [layer(symlink("evil", "/tmp"), dir_("evil/sub"), file("evil/sub/pwned", b"x\n"))]
    ),
)
# A symlink to a file outside, then a file written over the link's name in a later layer: the
# link is replaced, its target is not written.
case(
    "symlink-overwrite.tar",
    docker_archive(
        [layer(symlink("passwd", "/etc/passwd")), layer(file("passwd", b"root::0:0::/:/bin/sh\n"))]
    ),
)

# Hardlink escapes.
case("hardlink-dotdot.tar", docker_archive([layer(hardlink("link", "../outside"))]))
case("hardlink-absent.tar", docker_archive([layer(hardlink("link", "etc/nothing"))]))
case("hardlink-dir.tar", docker_archive([layer(hardlink("link", "etc"))]))
case("hardlink-absolute.tar", docker_archive([layer(hardlink("link", "/etc/shadow"))]))
case(
    "hardlink-through-symlink.tar",
    docker_archive([layer(symlink("up", "../../.."), hardlink("link", "up/etc/shadow"))]),
)

# Invalid whiteouts.
case("whiteout-dotdot.tar", docker_archive([layer(), layer(file(".wh..."))]))
case("whiteout-empty.tar", docker_archive([layer(), layer(file("etc/.wh."))]))
case("whiteout-opaque-dir.tar", docker_archive([layer(), layer(file("etc/.wh..wh..opq/x"))]))
case("whiteout-reserved.tar", docker_archive([layer(), layer(file("etc/.wh..wh.plnk"))]))
case("whiteout-escape.tar", docker_archive([layer(), layer(file("../.wh.etc"))]))
# Whiteouts through a symlink that points out of the root act inside the root.
case(
    "whiteout-through-symlink.tar",
    docker_archive([layer(symlink("up", "../../../etc")), gz(tar(file("up/.wh.hostname")))]),
)

# DiffID mismatches: an uncompressed layer (caught while reading the archive), a gzip one
# (caught after the stream is read), and in an OCI layout.
WRONG = sha256(b"not the layer")
case("diffid-plain.tar", docker_archive([plain(file("a", b"a"))], diff_ids=[WRONG]))
case("diffid-gzip.tar", docker_archive([layer(file("a", b"a"))], diff_ids=[WRONG]))
case("diffid-oci.tar", Layout([layer(file("a", b"a"))], diff_ids=[WRONG]).archive())

# Missing layers.
EMPTY_LAYER = layer()
case(
    "missing-layer.tar",
    docker_archive(
        [EMPTY_LAYER],
        layer_names=["0/layer.tar", "1/layer.tar"],
        diff_ids=[sha256(gzip.decompress(EMPTY_LAYER))] * 2,
    ),
)
case("missing-blob-oci.tar", Layout([layer()], drop=("layer",)).archive())
case("missing-config-oci.tar", Layout([layer()], drop=("config",)).archive())

# Oversize documents (gzip-compressed archives, so the files stay small).
case(
    "oversize-manifest-json.tar.gz",
    docker_archive([layer()], manifest_pad=MAX_DOCUMENT_SIZE + 1, compress=True),
)
case("oversize-config.tar.gz", docker_archive([layer()], config_pad=MAX_DOCUMENT_SIZE + 1, compress=True))
case("oversize-index-oci.tar.gz", Layout([layer()], index_pad=MAX_DOCUMENT_SIZE + 1).archive(compress=True))
case(
    "oversize-config-oci.tar.gz",
    Layout([layer()], config_pad=MAX_DOCUMENT_SIZE + 1).archive(compress=True),
)

# Tar header desync in a layer: a pax size larger, then smaller, than the ustar size field,
# and a member cut short.
SMUGGLED = file("smuggled", b"hidden from readers of the ustar size\n")
case(
    "desync-pax-larger.tar",
    docker_archive(
        [layer(pax([("size", "1536")]), header("big", b"0", 1536, size_field=5) + pad(b"small") + SMUGGLED)]
    ),
)
case(
    "desync-pax-smaller.tar",
    docker_archive(
        [layer(pax([("size", "0")]), header("small", b"0", 0, size_field=len(SMUGGLED)) + SMUGGLED)]
    ),
)
case(
    "truncated-member.tar",
    docker_archive([gz(tar(*BASE, header("cut", b"0", 4096) + b"only this much", end=False))]),
)

# The archive transports' own tar, read with the same hardened reader as the layers: a pax
# record set larger than the reader's 1 MiB cap ahead of the first member (gzip-compressed, so
# the files stay small), and a member cut short.
MAX_SPECIAL = 1 << 20  # src/tar/mod.rs
BIG_PAX = pax([("comment", "x" * MAX_SPECIAL)])
case("archive-pax-oversize-docker.tar.gz", gz(BIG_PAX + docker_archive([layer()])))
case("archive-pax-oversize-oci.tar.gz", gz(BIG_PAX + Layout([layer()]).archive()))
CUT = docker_archive([layer()], extra=[file("padding", b"\0" * 4096)])
case("archive-truncated-docker.tar", CUT[: len(CUT) - 1024 - 2000])
CUT = Layout([layer()]).archive()
# The last member is `oci-layout`: cut ten bytes into its data.
case("archive-truncated-oci.tar", CUT[: len(CUT) - 1024 - 512 + 10])


def main():
    for name, data in sorted(CASES.items()):
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
    # OCI layout directories (oci: transport): a missing layer blob, and documents whose
    # descriptors announce more than MAX_DOCUMENT_SIZE.
    Layout([layer()], drop=("layer",)).write_dir(os.path.join(HERE, "missing-blob-layout"))
    Layout([layer()], sizes={"manifest": MAX_DOCUMENT_SIZE + 1}).write_dir(
        os.path.join(HERE, "oversize-manifest-layout")
    )
    Layout([layer()], sizes={"config": MAX_DOCUMENT_SIZE + 1}).write_dir(
        os.path.join(HERE, "oversize-config-layout")
    )


if __name__ == "__main__":
    main()

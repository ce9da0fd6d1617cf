#!/usr/bin/env python3
"""Checks that the library's modules import one way: no import cycle and no upward import.

    scripts/check-layers.py            # checks src/, config/src and init/src; exit 1 on a violation
    scripts/check-layers.py --graph    # also prints every module-to-module edge it found

Every `crate::`, `super::` and `self::` path outside test code (`#[cfg(test)]` items, `tests.rs`,
`tests/` folders and `testutil` modules) is resolved to the module it names. An edge between two
modules is counted between the two siblings under their nearest common ancestor, so
`image::layout -> image::docker_archive` is an edge inside `image/`, and `image::x ->
registry::y` an edge `image -> registry` between stages. A child naming its own ancestor (an
error type in `mod.rs`) is not an edge: the parent owns the child.

Two rules are checked:
- no cycle among the siblings of any module (Tarjan's strongly connected components);
- between the library's top-level modules, every edge points down `STAGES`, the pipeline's
  order from the bottom (no I/O) to the top (whole commands).
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The library's top-level modules, lowest first. A module may name only modules listed before
# it. `lib.rs` draws the same picture; docs/architecture.md explains each line.
STAGES = [
    "oci",  # the OCI document model: media types, documents, platforms (no I/O)
    "tar",  # the hardened tar reader
    "progress",
    "host",  # host probes: TSC, KVM, kernel discovery
    "reference",  # what the user names, parsed
    "input",  # a command's argument: a file on disk or an image reference
    "cache",  # content-addressed blobs and typed records
    "registry",  # the distribution protocol
    "image",  # one resolution walk over every transport
    "flatten",  # layers -> one tree
    "output",  # tree -> tar; the atomic hashed sink
    "kernel",  # kernel images read
    "plan",  # image config + tree -> launch configuration
    "init_blob",  # the embedded guest init
    "rootfs",  # tree + init + config -> initramfs / SquashFS
    "bake",  # kernel + initramfs -> one ELF; reading baked files back
    "launch",  # hypervisor launch models
    "bundle",  # the bundle directory
    "artifact",  # push, fetch and inspect of pushed unikernels
    "build",  # the build command's orchestration
    "run",  # a baked file booted
]

PATH_RE = re.compile(r"\b(crate|super|self)((?:\s*::\s*(?:[A-Za-z_][A-Za-z0-9_]*|\{))+)")
USE_RE = re.compile(r"\buse\s+((?:crate|super|self)\s*::[^;]*);", re.S)


def strip_comments_and_strings(text):
    """Blanks comments, string and char literals, keeping line structure."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(text, start):
    """Index just past the brace that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def strip_test_items(text):
    """Removes `#[cfg(test)]` items; returns the text and the names of test-only child modules."""
    test_mods = set()
    while True:
        m = re.search(r"#\[cfg\((?:test|all\(test[^)]*\)|any\(test[^)]*\))\)\]", text)
        if not m:
            return text, test_mods
        rest = text[m.end():]
        item = re.match(r"\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?", rest)
        body_at = m.end() + item.end()
        mod = re.match(r"mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;", text[body_at:])
        if mod:
            test_mods.add(mod.group(1))
            end = body_at + mod.end()
        else:
            semi = text.find(";", body_at)
            brace = text.find("{", body_at)
            if brace >= 0 and (semi < 0 or brace < semi):
                end = matching_brace(text, brace)
            else:
                end = semi + 1
        text = text[:m.start()] + "\n" * text.count("\n", m.start(), end) + text[end:]


def expand_use_tree(tree):
    """`crate::a::{b, c::{d, e}}` -> [['crate','a','b'], ['crate','a','c','d'], ...]."""
    tree = re.sub(r"\s+", "", tree)
    tree = re.sub(r"\bas[A-Za-z_][A-Za-z0-9_]*", "", tree)

    def parse(s, prefix):
        paths, i, seg = [], 0, ""
        while i < len(s):
            ch = s[i]
            if ch == "{":
                end, depth = i, 0
                for j in range(i, len(s)):
                    depth += {"{": 1, "}": -1}.get(s[j], 0)
                    if depth == 0:
                        end = j
                        break
                base = prefix + [p for p in seg.split("::") if p]
                for part in split_top(s[i + 1:end]):
                    paths += parse(part, base)
                seg, i = "", end + 1
                continue
            seg += ch
            i += 1
        if seg.strip(":"):
            paths.append(prefix + [p for p in seg.split("::") if p])
        elif not paths:
            paths.append(prefix)
        return paths

    return parse(tree, [])


def split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    if cur:
        parts.append(cur)
    return parts


def module_files(src):
    """Maps each non-test module path (a tuple) to its file."""
    mods = {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] in ("lib", "main") and len(parts) == 1:
            parts = []
        elif parts[-1] == "mod":
            parts = parts[:-1]
        if any(p in ("tests", "testutil") or p.endswith("_tests") for p in parts):
            continue
        if parts and parts[0] in ("bin", "cli") and src.name == "src" and src.parent == ROOT:
            continue  # the binary's modules sit above the whole library
        mods[tuple(parts)] = f
    return mods


def resolve(path, here, mods, is_dir_module):
    """The module (tuple) that a `crate::`/`super::`/`self::` path names, or None."""
    head, segs = path[0], path[1:]
    if head == "crate":
        base = ()
    else:
        # `self` is the module itself and `super` its parent, whatever file holds it.
        base = here
        if head == "super":
            base = base[:-1]
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
    best = None
    cur = base
    if cur in mods:
        best = cur
    for s in segs:
        cur = cur + (s,)
        if cur in mods:
            best = cur
        else:
            break
    return best


def edges_of(mods, test_children):
    edges = {}
    for mod, f in mods.items():
        text, test_mods = strip_test_items(strip_comments_and_strings(f.read_text()))
        test_children.update(mod + (t,) for t in test_mods)
        is_dir = f.name in ("mod.rs", "lib.rs", "main.rs")
        found = []
        for m in USE_RE.finditer(text):
            found += expand_use_tree(m.group(1))
        flat = USE_RE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for m in PATH_RE.finditer(flat):
            segs = [s for s in re.split(r"\s*::\s*", m.group(2).strip()) if s and s != "{"]
            found.append([m.group(1)] + segs)
        for p in found:
            target = resolve(p, mod, mods, is_dir)
            if target is None or target == mod:
                continue
            edges.setdefault(mod, set()).add(target)
    return edges


def sibling_edge(a, b):
    """The (parent, from-child, to-child) edge that a -> b makes, or None for ancestry."""
    k = 0
    while k < len(a) and k < len(b) and a[k] == b[k]:
        k += 1
    if k == len(a) or k == len(b):
        return None
    return a[:k], a[k], b[k]


def cycles(nodes, adj):
    """Strongly connected components of size > 1 (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def check(src, crate, stages, show):
    mods = module_files(src)
    test_children = set()
    edges = edges_of(mods, test_children)
    groups = {}
    for a, targets in edges.items():
        if any(a[:i] in test_children for i in range(1, len(a) + 1)):
            continue
        for b in targets:
            e = sibling_edge(a, b)
            if e:
                parent, x, y = e
                groups.setdefault(parent, {}).setdefault(x, set()).add(y)
    problems = []
    for parent, adj in sorted(groups.items()):
        name = crate + ("::" + "::".join(parent) if parent else "")
        if show:
            for x in sorted(adj):
                print(f"  {name}: {x} -> {', '.join(sorted(adj[x]))}")
        for comp in cycles(set(adj) | {y for ys in adj.values() for y in ys}, adj):
            problems.append(f"cycle in {name}: {' <-> '.join(comp)}")
        if not parent and stages is not None:
            rank = {m: i for i, m in enumerate(stages)}
            for x, ys in sorted(adj.items()):
                for y in sorted(ys):
                    if x not in rank or y not in rank:
                        missing = x if x not in rank else y
                        problems.append(f"{crate}::{missing} is not in STAGES (scripts/check-layers.py)")
                    elif rank[y] > rank[x]:
                        problems.append(f"upward import: {crate}::{x} uses {crate}::{y}")
    n_edges = sum(len(v) for g in groups.values() for v in g.values())
    return problems, len(mods), n_edges


def main():
    show = "--graph" in sys.argv[1:]
    problems = []
    for src, crate, stages in [
        (ROOT / "src", "oci2uk", STAGES),
        (ROOT / "config" / "src", "oci2uk_config", None),
        (ROOT / "init" / "src", "oci2uk_init", None),
    ]:
        p, n_mods, n_edges = check(src, crate, stages, show)
        print(f"{crate}: {n_mods} modules, {n_edges} edges between siblings, {len(p)} problems")
        problems += sorted(set(p))
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

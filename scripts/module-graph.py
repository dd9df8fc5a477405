"""Prints each module's imports inside the crate and checks two things
(`make lint` runs it):

- CYCLES: no import cycle, among top-level modules and among the
  submodules of each module (a child that imports from its parent's
  mod.rs while the parent imports the child is a cycle too);
- ORDER: every top-level module imports only modules listed above it in
  lib.rs's layout (the `//! - [`name`]` lines), as lib.rs says.

It reads `crate::`, `super::` and child-module paths outside `#[cfg(test)]`
(tests.rs files are unit-test modules and are skipped).
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else 'src'


def module_of(rel):
    parts = rel[:-3].split('/')
    if parts[-1] == 'mod':
        parts = parts[:-1]
    return tuple(parts)


files = {}
for dp, dn, fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs') or f == 'tests.rs':
            continue
        rel = os.path.relpath(os.path.join(dp, f), root)
        if rel in ('lib.rs', 'main.rs'):
            continue
        src = open(os.path.join(dp, f)).read()
        # `#[cfg(test)] mod tests;` declares a test file: drop the two
        # lines. A `#[cfg(test)]` before anything else (an inline test
        # module, last in the file) drops the rest.
        src = re.sub(r'#\[cfg\(test\)\]\s*mod \w+;', '', src)
        i = src.find('#[cfg(test)]')
        if i >= 0:
            src = src[:i]
        # Comments and docs name paths without importing them.
        src = re.sub(r'//[^\n]*', '', src)
        files[module_of(rel)] = src
modules = set(files)


def resolve(path):
    """The longest known module that `path` (a tuple of names) starts with."""
    for n in range(len(path), 0, -1):
        if path[:n] in modules:
            return path[:n]
    return None


def expand(prefix, body):
    """The paths of a use group's body, `b, c::{d, e}` under `prefix`."""
    paths, part, depth = [], '', 0
    for ch in body + ',':
        if ch == ',' and depth == 0:
            part = part.strip().split(' as ')[0].strip()
            if part == 'self':
                paths.append(prefix)
            elif '{' in part:
                head, inner = part.split('{', 1)
                paths += expand(prefix + '::' + head.rstrip(':'), inner.rsplit('}', 1)[0])
            elif part:
                paths.append(prefix + '::' + part)
            part = ''
            continue
        depth += {'{': 1, '}': -1}.get(ch, 0)
        part += ch
    return paths


def paths_in(src, me):
    """Every module path a file refers to, as tuples from the crate root."""
    children = set(re.findall(r'^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;', src, re.M))
    out = []
    # `use a::{b, c::{d, e}}` groups expanded at every depth.
    for m in re.finditer(r'\b((?:crate|super|\w+)(?:::\w+)*)::\{', src):
        depth, j = 1, m.end()
        while j < len(src) and depth:
            depth += {'{': 1, '}': -1}.get(src[j], 0)
            j += 1
        out += expand(m.group(1), src[m.end():j - 1])
    out += re.findall(r'\b((?:crate|super)(?:::\w+)+)', src)
    # A glob import (`use super::*`) uses the module it names.
    out += re.findall(r'\b((?:crate|super)(?:::\w+)*)::\*', src)
    out += [p for p in re.findall(r'\b(\w+(?:::\w+)+)', src) if p.split('::')[0] in children]
    for p in out:
        names = p.split('::')
        if names[0] == 'crate':
            base = tuple(names[1:])
        elif names[0] == 'super':
            up = me
            while names and names[0] == 'super':
                up, names = up[:-1], names[1:]
            base = up + tuple(names)
        elif names[0] in children:
            base = me + tuple(names)
        else:
            continue
        target = resolve(base)
        if target and target != me:
            yield target


edges = {m: set() for m in modules}
for me, src in files.items():
    edges[me].update(paths_in(src, me))


def cycles(nodes, deps):
    idx, low, st, on, out, c = {}, {}, [], set(), [], [0]

    def sc(v):
        idx[v] = low[v] = c[0]
        c[0] += 1
        st.append(v)
        on.add(v)
        for w in deps.get(v, ()):
            if w not in nodes:
                continue
            if w not in idx:
                sc(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in nodes:
        if v not in idx:
            sc(v)
    return [sorted(x) for x in out if len(x) > 1]


# Folders whose mod.rs holds the types its children share while it also
# calls into them: circles of a parent and its children, known and not yet
# untangled. A new circle anywhere else fails the check.
KNOWN_PARENT_CIRCLES = {'cli', 'config', 'effects', 'event', 'guard', 'store', 'tools::reconcile'}

# Top level: a module and everything under it is one node.
top = {}
for m, ds in edges.items():
    top.setdefault(m[0], set()).update(d[0] for d in ds if d[0] != m[0])
found = cycles(set(top), top)
known = []
# Inside each module: its direct children (and itself, for mod.rs) as nodes.
for parent in sorted({m[:-1] for m in modules if len(m) > 1}):
    group = {m for m in modules if m[:len(parent)] == parent and len(m) in (len(parent), len(parent) + 1)}
    local = {}
    for m in modules:
        if m[:len(parent)] != parent or len(m) < len(parent):
            continue
        me = m[:len(parent) + 1] if len(m) > len(parent) else parent
        for d in edges[m]:
            if d[:len(parent)] == parent:
                them = d[:len(parent) + 1] if len(d) > len(parent) else parent
                if them != me:
                    local.setdefault(me, set()).add(them)
    for comp in cycles(group, local):
        names = ['::'.join(x) for x in comp]
        # Known: a folder on the list, and its children alone form no circle.
        if '::'.join(parent) in KNOWN_PARENT_CIRCLES and not cycles(set(comp) - {parent}, local):
            known.append(names)
            continue
        found.append(names)

for m in sorted(top):
    print(m, '->', ' '.join(sorted(d for d in top[m] if d in top)))
for m in sorted(edges):
    if len(m) > 1:
        inner = sorted('::'.join(d) for d in edges[m] if d[0] == m[0] and d != m)
        if inner:
            print('  ' + '::'.join(m), '->', ' '.join(inner))
if known:
    print('KNOWN (a parent and its children, to untangle):', known)
print('CYCLES:', found if found else 'none')

lib = open(os.path.join(root, 'lib.rs')).read()
order = re.findall(r'^//!\s*(?:\d+\.|-)\s*\[`(\w+)`\]', lib, re.M)
wrong = []
for m, ds in top.items():
    if m not in order:
        wrong.append(f'{m} is not in lib.rs\'s layout')
        continue
    for d in ds:
        if d in order and order.index(d) > order.index(m):
            wrong.append(f'{m} -> {d} (listed below it)')
print('ORDER:', 'ok' if not wrong else '; '.join(sorted(wrong)))

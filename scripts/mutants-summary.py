#!/usr/bin/env python3
"""Per-module figures of a cargo-mutants run (`make mutants`): caught share
of the viable mutants (caught + missed + timeout; unviable ones do not
compile and do not count), and the missed ones by name.

A module is a file, or a folder for src/event/ and src/config/."""
import collections
import pathlib
import sys

TARGET = 95.0


def module(path):
    parts = pathlib.PurePath(path).parts
    return "/".join(parts[:2]) + "/" if parts[1] in ("event", "config") else path


def read(out, name):
    f = pathlib.Path(out) / f"{name}.txt"
    return [l for l in f.read_text().splitlines() if l.strip()] if f.exists() else []


def main(out):
    counts = collections.defaultdict(collections.Counter)
    missed = collections.defaultdict(list)
    for kind in ("caught", "missed", "timeout"):
        for line in read(out, kind):
            m = module(line.split(":", 1)[0])
            counts[m][kind] += 1
            if kind != "caught":
                missed[m].append(f"{kind}: {line}")
    if not counts:
        print(f"MUTANTS: no mutant was tested ({out} holds no outcomes): nothing to judge")
        return 1
    below = 0
    print(f"{'module':<22} {'caught':>6} {'missed':>6} {'timeout':>7} {'share':>7}")
    for m in sorted(counts):
        c = counts[m]
        viable = c["caught"] + c["missed"] + c["timeout"]
        share = 100.0 * (c["caught"] + c["timeout"]) / viable
        below += share < TARGET
        print(f"{m:<22} {c['caught']:>6} {c['missed']:>6} {c['timeout']:>7} {share:>6.1f}%")
    for m in sorted(missed):
        for line in missed[m]:
            print(f"  {line}")
    print(f"MUTANTS: {'all modules' if not below else f'{below} module(s) below'} >= {TARGET}% (timeouts count as caught)")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "mutants.out"))

#!/usr/bin/env python3
"""House limits (docs/development.md): no source file over 600 lines and no
function over 80 lines, outside tests, in Rust and in Lua alike. Prints
each excess and exits 1 if any; `make lint` runs it over src/ and
testbench/src/.

A Rust function is counted from its `fn` line to the closing brace at the
same indentation (rustfmt's layout), a Lua one from its `function` line
to the `end` at the same indentation; `#[cfg(test)]` modules and `tests/`
folders are skipped."""
import pathlib
import re
import sys

MAX_FILE_LINES = 600
MAX_FN_LINES = 80
FN = re.compile(r"^(\s*)(pub(\([^)]*\))? )?(const )?(async )?(unsafe )?fn \w+")
LUA_FN = re.compile(r"^(\s*)(local function [\w.]+|function [\w.:]+|[\w.\[\]]+ = function)\(")


def test_module_start(lines):
    """Index of a trailing `#[cfg(test)] mod tests {`, or len(lines)."""
    for i, line in enumerate(lines):
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"(pub(\([\w:]+\))? )?mod tests\b", lines[i + 1]):
            return i
    return len(lines)


def lua_excesses(path):
    lines = path.read_text().split("\n")
    if len(lines) > MAX_FILE_LINES:
        yield f"{path}: {len(lines)} lines (limit {MAX_FILE_LINES})"
    for i, line in enumerate(lines):
        m = LUA_FN.match(line)
        if not m or re.search(r"\bend\b[\s,)}]*$", line):
            continue
        indent = m.group(1)
        for j in range(i + 1, len(lines)):
            if re.match(re.escape(indent) + r"end\b", lines[j]):
                if j - i + 1 > MAX_FN_LINES:
                    name = m.group(2).replace("local function ", "").replace(" = function", "")
                    yield f"{path}:{i + 1}: {name} is {j - i + 1} lines (limit {MAX_FN_LINES})"
                break


def excesses(path):
    if path.suffix == ".lua":
        yield from lua_excesses(path)
        return
    lines = path.read_text().split("\n")
    code = lines[: test_module_start(lines)]
    if path.name == "tests.rs" or "tests" in path.parts:
        return
    if len(code) > MAX_FILE_LINES:
        yield f"{path}: {len(code)} lines (limit {MAX_FILE_LINES})"
    for i, line in enumerate(code):
        m = FN.match(line)
        if not m or line.rstrip().endswith(";"):
            continue
        indent = m.group(1)
        for j in range(i + 1, len(code)):
            if code[j] == indent + "}":
                if j - i + 1 > MAX_FN_LINES:
                    name = line.strip().split("(")[0]
                    yield f"{path}:{i + 1}: {name} is {j - i + 1} lines (limit {MAX_FN_LINES})"
                break


def main(roots):
    paths = [p for root in roots for ext in ("*.rs", "*.lua") for p in sorted(pathlib.Path(root).rglob(ext))]
    found = [e for p in paths for e in excesses(p)]
    for e in found:
        print(e)
    print(f"SIZES: {'ok' if not found else f'{len(found)} over the limits'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["src", "testbench/src"]))

#!/usr/bin/env python3
"""What a guard call's arguments cost Redis before the script decides anything.

docs/performance.md ("The script's time by part") uses it. It starts a
private redis-server (no persistence) on a free loopback port, sends calls
shaped like the guard's (92 events of 19 arguments, the bench's three data
fields with a 200-byte pad, with or without 4 keys per event) to scripts
that do nothing (`return 0`) or only read the arguments as read.lua does,
and prints EVALSHA's time per event from INFO commandstats.

    python3 scripts/argv-price.py [calls per variant, default 300]

Needs redis-server on PATH (scripts/services.sh installs it).
"""
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

EVENTS_PER_CALL = 92

# read.lua's work on a plain event, without the keys and the mutations.
READ = """
local e, a, out = {}, 10, {}
while a <= #ARGV do
  e.ctx = tonumber(ARGV[a])
  e.id, e.idh, e.fp, e.fp_hex, e.seq = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  e.offset = tonumber(ARGV[a + 6])
  e.op = ARGV[a + 7]
  e.nset = tonumber(ARGV[a + 8])
  e.set_from = a + 9
  e.nunset = tonumber(ARGV[e.set_from + 2 * e.nset])
  a = e.set_from + 2 * e.nset + 1 + e.nunset
  e.nkeys, e.type, e.nmutations = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  out[#out + 1], out[#out + 1] = 0, 0
end
return out
"""


def encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += [b"$%d\r\n" % len(a), a, b"\r\n"]
    return b"".join(out)


class Redis:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def read(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind in b"+-:":
            return rest
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        return [self.read() for _ in range(int(rest))]

    def call(self, *args):
        self.sock.sendall(encode(args))
        return self.read()


def event(n, rng):
    """A plain merge event's arguments, as src/guard/args.rs sends them."""
    return [
        "1", "evt-%032d" % n, rng.randbytes(8), rng.randbytes(8), "%016x" % rng.getrandbits(64),
        str(1000 + n), str(500000 + n), "merge", "3",
        "status", "active", "amount", "%d.25" % n, "pad", "x" * 200,
        "0", "0", "deposit", "0",
    ]


def evalsha_usec(r):
    for line in r.call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(p.split("=") for p in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), int(fields["usec"])
    return 0, 0


def measure(r, script, with_keys, calls, rng):
    sha = r.call("SCRIPT", "LOAD", script).decode()
    r.call("CONFIG", "RESETSTAT")
    for c in range(calls):
        keys, args = ["idem:epoch", "idem:outbox"], ["tok", "1", "1", "5", "99", "o:1:1", "123:", "", ""]
        for i in range(EVENTS_PER_CALL):
            n = c * EVENTS_PER_CALL + i
            args += event(n, rng)
            if with_keys:
                base = "idem:{acct:%d}" % (n % 10000)
                keys += [base + ":meta", base + ":state", base + ":ids:20431", base + ":ids:20430"]
        r.call("EVALSHA", sha, str(len(keys)), *keys, *args)
    n, usec = evalsha_usec(r)
    return usec / n / EVENTS_PER_CALL


def main():
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="argv-price-")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                r = Redis(port)
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit(f"redis-server did not answer on port {port}")
        rng = random.Random(7)
        print(f"EVALSHA µs per event, {EVENTS_PER_CALL} events per call, {calls} calls each (redis-server on port {port})")
        for name, script, with_keys in [
            ("return 0, arguments only", "return 0", False),
            ("return 0, arguments and 4 keys per event", "return 0", True),
            ("read.lua's reading, arguments only", READ, False),
            ("read.lua's reading, arguments and 4 keys per event", READ, True),
        ]:
            print(f"  {name}: {measure(r, script, with_keys, calls, rng):.2f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

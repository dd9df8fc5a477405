#!/usr/bin/env python3
"""Runs `make test`'s two passes from one queue of jobs (scripts/test-passes.sh
builds the binaries first and calls this).

A job is one test binary in one pass: every binary against standalone Redis,
and the integration tests named for the cluster pass again against the Redis
Cluster. Most of a test's time is waiting on Kafka and Redis, so JOBS of them
run at once (IDEM_TEST_JOBS, default 3), the longest first (by the last run's
times in target/test-passes/times.json, else the table below), so that no long
binary starts last. Each binary runs from its package's folder as `cargo test`
would, with stdin from /dev/null (a test's child that read stdin once ate the
runner's list).

Usage: test-passes.py <binaries file> <cluster url> "<cluster pass test names>"
Prints a line per finished job; a failed job's whole output (kept in
target/test-passes/<pass>/<binary>.log). Exits 1 if any job failed or a job
that should have run did not.
"""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

OUT = "target/test-passes"
# Seconds per (pass, binary) on the 2-core machine, for a first run without
# times of its own (docs/development.md, "The suite's time").
DEFAULT_SECONDS = {
    ("cluster", "redis_loss"): 185,
    ("standalone", "group"): 176,
    ("cluster", "changelog"): 130,
    ("standalone", "guard"): 120,
    ("standalone", "changelog"): 119,
    ("cluster", "group"): 110,
    ("standalone", "group_protocol"): 87,
    ("standalone", "conformance"): 75,
    ("cluster", "conformance"): 78,
    ("cluster", "operator_tools"): 72,
}


def jobs(binaries, cluster_tests):
    out = []
    for line in binaries:
        name, kind, folder, exe = line.split(" ", 3)
        out.append(("standalone", name, kind, folder, exe))
        if kind == "test" and name in cluster_tests:
            out.append(("cluster", name, kind, folder, exe))
    return out


def key(job):
    """A job's name in times.json: a package has a lib and a bin of one name."""
    pass_, name, kind = job[:3]
    return f"{pass_}/{name}/{kind}"


def main():
    binaries_file, cluster_url, cluster_names = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(binaries_file) as f:
        binaries = [line.strip() for line in f if line.strip()]
    todo = jobs(binaries, set(cluster_names.split()))
    times_path = os.path.join(OUT, "times.json")
    try:
        with open(times_path) as f:
            last = json.load(f)
    except (OSError, ValueError):
        last = {}
    todo.sort(key=lambda j: -last.get(key(j), DEFAULT_SECONDS.get((j[0], j[1]), 30)))
    workers = int(os.environ.get("IDEM_TEST_JOBS", "3"))
    lock = threading.Lock()
    seconds, failed = {}, []

    def run(job):
        pass_, name, kind, folder, exe = job
        env = dict(os.environ)
        args = [exe]
        if pass_ == "cluster":
            env["IDEM_REDIS_URL"] = cluster_url
            args.append("--skip")
            args.append("under_the_consumer_protocol")
        else:
            env["IDEM_TEST_PASS"] = "standalone"
        os.makedirs(os.path.join(OUT, pass_), exist_ok=True)
        log = os.path.join(OUT, pass_, f"{name}-{kind}.log")
        start = time.monotonic()
        with open(log, "w") as out:
            code = subprocess.call(args, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
        took = round(time.monotonic() - start)
        with lock:
            seconds[key(job)] = took
            if code == 0:
                print(f"[{pass_}] {name} ({kind}): ok in {took} s", flush=True)
            else:
                failed.append((pass_, name, kind, log))
                print(f"[{pass_}] {name} ({kind}): FAILED after {took} s", flush=True)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, todo))
    with open(times_path, "w") as f:
        json.dump(seconds, f, indent=1, sort_keys=True)
    for pass_, name, kind, log in failed:
        print(f"--- {pass_}: {name} ({kind}) failed: its output ({log})")
        with open(log) as f:
            sys.stdout.write(f.read())
    # Every job ran: a pass that skipped one has not proved it.
    if len(seconds) != len(todo):
        print(f"test-passes: ran {len(seconds)} jobs of {len(todo)}", file=sys.stderr)
        return 1
    if failed:
        return 1
    print(f"test-passes: both passes passed ({round(time.monotonic() - started)} s, "
          f"{len(todo)} jobs, {workers} at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# `make test`'s two passes: every test binary against standalone Redis, and
# the integration tests whose Redis behaviour differs against the Redis
# Cluster. The binaries are built once, by one cargo (never two builds at
# once), then run directly by scripts/test-passes.py: one queue of jobs
# (a binary in a pass), longest first, IDEM_TEST_JOBS of them at once (3).
# Most of a test's time is waiting on Kafka and Redis, so they overlap well
# on two cores; each binary still runs its own tests in parallel as cargo's
# harness does.
#
# Usage: scripts/test-passes.sh "<cluster url>" "<cluster pass test names>"
# Prints a line per finished job; a failed job's full output (kept in
# target/test-passes/<pass>/<binary>-<kind>.log). Exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
CLUSTER_URL=$1
CLUSTER_TESTS=" $2 "
OUT=target/test-passes
mkdir -p "$OUT"

# Every test executable: "<target name> <kind> <package dir> <path>".
$CARGO test --workspace --all-targets --no-run --message-format=json-render-diagnostics \
  | python3 -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    t = m["target"]
    print(t["name"], t["kind"][0], os.path.dirname(m["manifest_path"]), m["executable"])
' > "$OUT/binaries" || { echo "test-passes: the build failed" >&2; exit 1; }

# Every test uses a prefix of its own; what earlier runs left only slows
# Redis down (SCANs walk it, expiry cycles through it).
scripts/services.sh flush

# The jobs, longest first, JOBS at once (scripts/test-passes.py).
exec python3 scripts/test-passes.py "$OUT/binaries" "$CLUSTER_URL" "$CLUSTER_TESTS"

#!/usr/bin/env bash
# `make test`'s two passes at once: every test binary against standalone
# Redis, and the integration tests whose Redis behaviour differs against the
# Redis Cluster. The binaries are built once, by one cargo (never two builds
# at once), then run directly, one pass per process, each binary from its
# package's folder as `cargo test` would. Most of a test's time is waiting on
# Kafka and Redis, so the passes overlap well on two cores; each binary
# still runs its own tests in parallel as cargo's harness does.
#
# Usage: scripts/test-passes.sh "<cluster url>" "<cluster pass test names>"
# Prints a line per finished binary; a pass's full output when it fails
# (and in target/test-passes/<pass>.log). Exits 1 if either pass failed.
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

# run_pass <name> <only cluster tests: 0|1> [env assignments...]
run_pass() {
  local pass=$1 cluster_only=$2
  shift 2
  local log="$OUT/$pass.log" failed=0
  : > "$log"
  while read -r name kind dir exe <&3; do
    if [ "$cluster_only" = 1 ] && { [ "$kind" != test ] || [[ "$CLUSTER_TESTS" != *" $name "* ]]; }; then
      continue
    fi
    local args=()
    [ "$cluster_only" = 1 ] && args=(--skip under_the_consumer_protocol)
    local start=$SECONDS
    echo "== $pass: $name ($kind) $exe" >> "$log"
    # stdin from /dev/null: a test's child that reads stdin would eat the
    # list of binaries this loop reads (fd 3), skipping or garbling them.
    if (cd "$dir" && env "$@" "$exe" "${args[@]}") < /dev/null >> "$log" 2>&1; then
      echo "[$pass] $name ($kind): ok in $((SECONDS - start)) s"
    else
      echo "[$pass] $name ($kind): FAILED after $((SECONDS - start)) s"
      failed=1
    fi
  done 3< "$OUT/binaries"
  return $failed
}

run_pass standalone 0 IDEM_TEST_PASS=standalone &
standalone=$!
run_pass cluster 1 IDEM_REDIS_URL="$CLUSTER_URL" &
cluster=$!

status=0
wait $standalone || { status=1; echo "--- the standalone pass failed: its output ($OUT/standalone.log)"; cat "$OUT/standalone.log"; }
wait $cluster || { status=1; echo "--- the cluster pass failed: its output ($OUT/cluster.log)"; cat "$OUT/cluster.log"; }
# Every binary ran in the standalone pass, and every named one in the
# cluster pass: a pass that skipped one has not proved it.
ran=$(grep -c '^== standalone: ' "$OUT/standalone.log")
listed=$(wc -l < "$OUT/binaries")
if [ "$ran" != "$listed" ]; then
  echo "test-passes: the standalone pass ran $ran binaries of $listed" >&2
  status=1
fi
[ $status = 0 ] && echo "test-passes: both passes passed ($SECONDS s)"
exit $status

#!/usr/bin/env bash
# The front door's benchmark (docs/performance.md, "The front door"): an
# `idem run` and an `idem gateway` (release builds) on the local services,
# then wrk against the gateway for 10 s each:
#   - new keys: every request a new Idempotency-Key (bind, produce with
#     acks=all, store), over 1,000 entities;
#   - replays: 100 keys bound once, then asked again (bind answers the
#     stored response; nothing produced);
# beside Redis's own round trip (redis-benchmark PING) in the same run.
# Usage: scripts/bench-gateway.sh <idem binary> <out dir>
set -euo pipefail
cd "$(dirname "$0")/.."
IDEM=${1:-target/release/idem}
OUT=${2:-bench-out/gateway}
mkdir -p "$OUT"
command -v wrk >/dev/null || { echo "bench-gateway: wrk is missing (make services installs it)" >&2; exit 1; }

run_id="gwbench-$(date +%s)-$$"
topic="$run_id"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

printf 'bench %s *\n' "$(printf %s bench-token | sha256sum | cut -d' ' -f1)" > "$work/tokens"
cat > "$work/idem.toml" <<TOML
[kafka]
topics = ["$topic"]
group_id = "$run_id"
[redis]
key_prefix = "$run_id"
[dedupe]
dense_seq_topics = ["$topic"]
[state]
order = "per_field"
[gateway]
listen = "127.0.0.1:18080"
topics = ["$topic"]
tokens_file = "$work/tokens"
rate_per_caller = 1000000
[[effects]]
topic = "$topic"
types = ["deposit"]
counters = [{ field = "balance", from = "/amount", scale = 2 }]
TOML
export IDEM_CONFIG="$work/idem.toml" RUST_LOG=warn
mkdir -p "$work/topics"
printf '[[topic]]\nname = "%s"\npartitions = 6\nreplication_factor = 1\ndead_letter = "%s.dlq"\n' "$topic" "$topic" > "$work/topics/t.toml"
"$IDEM" topics apply --dir "$work/topics" >/dev/null

"$IDEM" run > "$OUT/idem-run.log" 2>&1 & pids+=($!)
IDEM__METRICS__LISTEN=127.0.0.1:0 "$IDEM" gateway > "$OUT/gateway.log" 2>&1 & pids+=($!)
for _ in $(seq 1 240); do
  [[ "$(curl -s http://127.0.0.1:18080/readyz)" == ready ]] && break
  sleep 0.5
done
[[ "$(curl -s http://127.0.0.1:18080/readyz)" == ready ]] || { echo "bench-gateway: the gateway did not become ready; see $OUT/gateway.log" >&2; exit 1; }

cat > "$work/writes.lua" <<'LUA'
-- One POST per request; args: topic, mode ("new": a new key each time;
-- "replay": 100 keys, each bound by its first request).
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
function init(args)
  topic, mode, n = args[1], args[2], 0
end
function request()
  n = n + 1
  local key, entity
  if mode == "new" then
    key, entity = "new-" .. tid .. "-" .. n, "acct:" .. (n % 1000)
  else
    local k = n % 100
    key, entity = "replay-" .. k, "acct:r" .. k
  end
  return wrk.format("POST", "/v1/topics/" .. topic .. "/entities/" .. entity .. "/events",
    { ["Authorization"] = "Bearer bench-token", ["Idempotency-Key"] = key,
      ["Content-Type"] = "application/json" },
    '{"type":"deposit","data":{"amount":"1.00"}}')
end
LUA

bench() { # $1 mode, $2 seconds
  wrk -t2 -c16 -d"$2"s --latency -s "$work/writes.lua" http://127.0.0.1:18080 -- "$topic" "$1"
}
bench replay 1 > /dev/null   # binds the 100 replay keys
{
  echo "== new keys (bind, produce acks=all, store), 16 connections, 10 s"
  bench new 10
  echo "== replays (the stored response), 16 connections, 10 s"
  bench replay 10
  echo "== Redis round trip, same run (redis-benchmark PING_INLINE, 16 clients, no pipelining)"
  redis-benchmark -t ping_inline -c 16 -n 200000 -q | tr '\r' '\n' | grep 'requests per second' | tail -1
} | tee "$OUT/report.txt"
summary() { # $1 section title prefix
  awk -v s="$1" '$0 ~ "^== "s {on=1; next} /^== / {on=0} on && /Requests\/sec/ {rps=$2} on && /^ +50%/ {p50=$2} on && /^ +99%/ {p99=$2} on && /Non-2xx/ {bad=$NF} END {printf "%-9s %10s req/s  p50 %8s  p99 %8s  non-2xx %s\n", s, rps, p50, p99, (bad==""?0:bad)}' "$OUT/report.txt"
}
echo "== summary" | tee -a "$OUT/report.txt"
{ summary "new keys"; summary "replays"; } | tee -a "$OUT/report.txt"

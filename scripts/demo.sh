#!/usr/bin/env bash
# The demo: topics from topics/demo.toml, idem consuming them, a sample stream
# with duplicates and out-of-order events, then the outcome counts and one
# entity's state. Expects `make services` and `cargo build` done (make demo does both).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

IDEM=./target/debug/idem
PORT="${DEMO_METRICS_PORT:-9464}"
RUN_ID="$(date +%s)"
export IDEM__KAFKA__TOPICS=demo
export IDEM__KAFKA__GROUP_ID=idem-demo
export IDEM__REDIS__KEY_PREFIX=idem-demo
export IDEM__METRICS__LISTEN="127.0.0.1:$PORT"
EVENTS="${DEMO_EVENTS:-20000}"

say() { printf '\n== %s\n' "$*"; }

metrics() { curl -fsS "http://127.0.0.1:$PORT/metrics" 2>/dev/null || true; }
count() { metrics | awk -v o="$1" '$1 ~ "^idem_events_total\\{" && $1 ~ "outcome=\""o"\"" && $1 ~ "topic=\"demo\"" {s+=$2} END {print s+0}'; }
total() { metrics | awk '$1 ~ "^idem_events_total\\{" && $1 ~ "topic=\"demo\"" {s+=$2} END {print s+0}'; }

say "topics (idem topics apply --dir topics)"
$IDEM topics apply --dir topics

say "starting idem (group idem-demo, metrics on http://127.0.0.1:$PORT/metrics)"
$IDEM run 2>demo-idem.log &
IDEM_PID=$!
stop_idem() { kill -TERM "$IDEM_PID" 2>/dev/null && wait "$IDEM_PID" 2>/dev/null || true; }
trap 'say "stopping idem"; stop_idem; exit 0' INT TERM

for _ in $(seq 1 100); do metrics | grep -q idem_build_info && break; sleep 0.1; done
BEFORE="$(total)"

say "producing a sample stream: $EVENTS events over 100 entities, 20% redelivered, 5% out of order"
OUT="$($IDEM sample --topic demo --events "$EVENTS" --entities 100 --duplicates 0.2 --out-of-order 0.05 --prefix "run$RUN_ID")"
echo "$OUT"

say "waiting until the group's lag is zero (idem inspect group idem-demo --topic demo)"
for _ in $(seq 1 600); do
  LAG="$($IDEM inspect group idem-demo --topic demo | awk '/^total lag/ {print $3}')"
  printf '\r  processed %s, lag %s     ' "$(( $(total) - BEFORE ))" "${LAG:-?}"
  [[ "$LAG" == "0" ]] && break
  sleep 0.5
done
echo
$IDEM inspect group idem-demo --topic demo

say "outcomes counted by this idem process (idem_events_total; includes any backlog of earlier demo runs)"
for o in applied duplicate stale conflict invalid; do printf '  %-10s %s\n' "$o" "$(count "$o")"; done

say "one entity (idem inspect entity run$RUN_ID:7)"
$IDEM inspect entity "run$RUN_ID:7"

if [[ -t 0 ]]; then
  say "idem keeps running; produce more with: $IDEM sample --topic demo --events 1000 --prefix more. Ctrl-C stops it cleanly."
  wait "$IDEM_PID"
else
  say "not on a terminal: stopping idem"
  stop_idem
fi

#!/usr/bin/env bash
# The demo: topics from topics/demo.toml, idem consuming them, a sample stream
# with redeliveries and out-of-order events, the arithmetic of the outcomes,
# then a replay of the whole topic that applies nothing, and the front door:
# a payment POSTed twice under one Idempotency-Key, applied once. Expects
# `make services-demo` and `cargo build` done (make demo does both).
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
# idem's own log and the tools' diagnostics go here, not to the screen.
LOG=demo-idem.log
: >"$LOG"

say() { printf '\n== %s\n' "$*"; }
# 1234567 -> 1,234,567
commas() { printf '%s' "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }
tool() { "$IDEM" "$@" 2>>"$LOG"; }

metrics() { curl -fsS "http://127.0.0.1:$PORT/metrics" 2>/dev/null || true; }
count() { metrics | awk -v o="$1" '$1 ~ "^idem_events_total\\{" && $1 ~ "outcome=\""o"\"" && $1 ~ "topic=\"demo\"" {s+=$2} END {print s+0}'; }
total() { metrics | awk '$1 ~ "^idem_events_total\\{" && $1 ~ "topic=\"demo\"" {s+=$2} END {print s+0}'; }
lag() { tool inspect group idem-demo --topic demo | awk '/^total lag/ {print $3}'; }

IDEM_PID=
start_idem() {
  "$IDEM" run 2>>"$LOG" &
  IDEM_PID=$!
  for _ in $(seq 1 100); do metrics | grep -q idem_build_info && return; sleep 0.1; done
  echo "idem did not start; see $LOG" >&2
  exit 1
}
stop_idem() { [[ -n "$IDEM_PID" ]] && kill -TERM "$IDEM_PID" 2>/dev/null && wait "$IDEM_PID" 2>/dev/null || true; }
trap 'say "stopping idem"; stop_idem; exit 0' INT TERM
trap 'stop_idem' EXIT

wait_caught_up() {
  local before="$1"
  for _ in $(seq 1 600); do
    local l
    l="$(lag || true)"
    printf '\r  processed %s, lag %s     ' "$(commas $(( $(total) - before )))" "${l:-?}"
    [[ "$l" == "0" ]] && break
    sleep 0.5
  done
  echo
}

say "topics (idem topics apply --dir topics)"
tool topics apply --dir topics

say "starting idem (group idem-demo, metrics on http://127.0.0.1:$PORT/metrics, log in $LOG)"
start_idem
declare -A BEFORE
for o in applied duplicate stale conflict invalid; do BEFORE[$o]="$(count "$o")"; done
START_TOTAL="$(total)"

say "producing a sample stream: $(commas "$EVENTS") events over 100 entities, 20% redelivered, 5% out of order"
OUT="$(tool sample --topic demo --events "$EVENTS" --entities 100 --duplicates 0.2 --out-of-order 0.05 --prefix "run$RUN_ID")"
echo "  $OUT"
RECORDS="$(awk '{print $2}' <<<"$OUT")"

say "waiting until the group's lag is zero (idem inspect group idem-demo --topic demo)"
wait_caught_up "$START_TOTAL"

declare -A DELTA
for o in applied duplicate stale conflict invalid; do DELTA[$o]=$(( $(count "$o") - BEFORE[$o] )); done
OUTCOMES=$(( DELTA[applied] + DELTA[stale] + DELTA[conflict] + DELTA[invalid] ))
say "what happened to the $(commas "$RECORDS") records"
echo "  $(commas "$EVENTS") events -> $(commas "$OUTCOMES") outcomes: $(commas "${DELTA[applied]}") applied + $(commas "${DELTA[stale]}") stale (arrived after a newer one)"
echo "  $(commas "${DELTA[duplicate]}") redeliveries had no effect (duplicate); conflicts ${DELTA[conflict]}, invalid ${DELTA[invalid]}"
if (( OUTCOMES != EVENTS || DELTA[duplicate] != RECORDS - EVENTS )); then
  echo "  (the counts include records of an earlier demo run that were still waiting)"
fi

say "one entity (idem inspect entity run$RUN_ID:7)"
tool inspect entity "run$RUN_ID:7"

say "replaying the whole topic: stop idem, move the group to the start, start idem again"
stop_idem
tool replay --topic demo --group idem-demo --to-earliest --execute
start_idem
REPLAY_START="$(total)"
wait_caught_up "$REPLAY_START"
REPLAYED=$(( $(total) - REPLAY_START ))
echo "  read $(commas "$REPLAYED") records again: $(count applied) applied, $(commas "$(count duplicate)") duplicate, $(commas "$(count stale)") stale: the replay changed nothing in Redis"

say "the front door: a payment POSTed twice under one Idempotency-Key (idem gateway, docs/gateway.md)"
GW_PORT="${DEMO_GATEWAY_PORT:-18081}"
# The gateway's topic has its own consumer and key prefix: dense seqs, per-field order.
PAYMENTS=(IDEM__KAFKA__TOPICS=payments IDEM__KAFKA__GROUP_ID=idem-demo-payments
  IDEM__REDIS__KEY_PREFIX=idem-demo-payments IDEM__DEDUPE__DENSE_SEQ_TOPICS=payments
  IDEM__STATE__ORDER=per_field IDEM__GATEWAY__TOPICS=payments
  IDEM__GATEWAY__TOKENS_FILE=deploy/gateway/tokens IDEM__GATEWAY__LISTEN="127.0.0.1:$GW_PORT")
env "${PAYMENTS[@]}" IDEM__METRICS__LISTEN="127.0.0.1:$((PORT + 1))" "$IDEM" run 2>>"$LOG" &
PAY_PID=$!
env "${PAYMENTS[@]}" IDEM__METRICS__LISTEN="127.0.0.1:$((PORT + 2))" "$IDEM" gateway 2>>"$LOG" &
GW_PID=$!
trap 'kill -TERM "$PAY_PID" "$GW_PID" 2>/dev/null || true; stop_idem' EXIT
for _ in $(seq 1 240); do
  [[ "$(curl -s "http://127.0.0.1:$GW_PORT/readyz")" == ready ]] && break
  sleep 0.5
done
ENTITY="acct:$RUN_ID"
pay() {
  curl -s -i -X POST "http://127.0.0.1:$GW_PORT/v1/topics/payments/entities/$ENTITY/events" \
    -H 'Authorization: Bearer demo-token' -H "Idempotency-Key: \"pay-$RUN_ID\"" \
    -H 'Content-Type: application/json' -d '{"type":"payment","data":{"amount":"12.50"}}' \
    | tr -d '\r' | grep -Ei '^HTTP/|^idempotent-replayed|^\{' | sed 's/^/    /'
}
echo "  the first try:"
pay
echo "  the client's retry (say its first answer timed out), the same key and body:"
pay
echo "  reading it back once idem applied seq 1 (GET ...?min_seq=1):"
curl -s "http://127.0.0.1:$GW_PORT/v1/topics/payments/entities/$ENTITY?min_seq=1&timeout=5s" \
  -H 'Authorization: Bearer demo-token' | sed 's/^/    /'
echo
echo "  applied once: idem inspect entity $ENTITY"
env "${PAYMENTS[@]}" "$IDEM" inspect entity "$ENTITY" 2>>"$LOG" | grep -E '^(seq|applied) ' | sed 's/^/  /'
kill -TERM "$PAY_PID" "$GW_PID" 2>/dev/null || true
wait "$PAY_PID" "$GW_PID" 2>/dev/null || true

if [[ -t 0 ]]; then
  say "idem keeps running; produce more with: $IDEM sample --topic demo --events 1000 --prefix more. Ctrl-C stops it cleanly."
  wait "$IDEM_PID"
else
  say "not on a terminal: stopping idem"
fi

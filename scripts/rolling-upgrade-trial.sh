#!/bin/bash
# A rolling upgrade tried on the local services (`make services`): the
# previous idem applies stream A alone, both versions share the group for
# stream B, the new one alone applies C; then its rewind counters and
# `idem reconcile` (the log against Redis) are printed.
#
#   scripts/rolling-upgrade-trial.sh OLD_IDEM_BINARY [NEW_IDEM_BINARY]
#
# Build the old binary from a tag in a worktree, e.g.
#   git worktree add /tmp/prev <rev> && (cd /tmp/prev && cargo build --bin idem) && cp /tmp/prev/target/debug/idem /tmp/idem-prev
set -u
cd "$(dirname "$0")/.."
OLD=${1:?usage: $0 OLD_IDEM_BINARY [NEW_IDEM_BINARY]}; NEW=${2:-target/debug/idem}
T=upgrade-trial-$(date +%s); W=$(mktemp -d)
export IDEM__KAFKA__BROKERS=127.0.0.1:9092 IDEM__REDIS__URL=redis://127.0.0.1:6379 IDEM__REDIS__KEY_PREFIX=$T IDEM__KAFKA__GROUP_ID=$T IDEM__KAFKA__TOPICS=$T IDEM__KAFKA__AUTO_OFFSET_RESET=earliest
mkdir -p $W/topics && printf '[[topic]]\nname = "%s"\npartitions = 4\nreplication_factor = 1\ndead_letter = "%s.dlq"\n' $T $T > $W/topics/t.toml
$NEW topics apply --dir $W/topics >/dev/null 2>&1 || echo "topics apply failed"
export IDEM__DLQ__TOPIC=$T.dlq
lag() { $NEW inspect group $T --topic $T 2>/dev/null | grep -o "total lag [0-9]*" ; }
wait0() { for i in $(seq 1 120); do l=$(lag); [ "$l" = "total lag 0" ] && return 0; sleep 1; done; echo "never caught up: $l"; }
$NEW sample --topic $T --events 3000 --entities 200 --seed 1 --prefix a >/dev/null 2>&1 || echo "sample failed"
IDEM__METRICS__LISTEN=127.0.0.1:9481 $OLD run > $W/old.log 2>&1 & OLDPID=$!
wait0; echo "A applied by the old version: $(lag)"
IDEM__METRICS__LISTEN=127.0.0.1:9482 $NEW run > $W/new.log 2>&1 & NEWPID=$!
for i in $(seq 1 60); do [ "$(curl -s 127.0.0.1:9482/readyz)" = ready ] && break; sleep 1; done  # joined the group
$NEW sample --topic $T --events 3000 --entities 200 --seed 2 --prefix b >/dev/null 2>&1
wait0; echo "B with both running: $(lag)"
kill -TERM $OLDPID; wait $OLDPID
$NEW sample --topic $T --events 3000 --entities 200 --seed 3 --prefix c >/dev/null 2>&1
wait0; echo "C with the new one alone: $(lag)"
curl -s 127.0.0.1:9482/metrics | grep -E "^idem_(rewound_records_total|redis_rewinds_total|redis_state_changes_total|events_total)" | sed 's/{group[^,]*,key_prefix="[^"]*",/{/'
kill -TERM $NEWPID; wait $NEWPID
$NEW reconcile --topic $T --report $W/reconcile.json 2>&1 | tail -2
echo "logs and report: $W"

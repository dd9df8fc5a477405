#!/usr/bin/env bash
# Local Kafka (KRaft, one node) and Redis on loopback for dev, demo and tests.
#
#   scripts/services.sh up      install what is missing, start what is not running
#   scripts/services.sh down    stop only what `up` started (pid files)
#   scripts/services.sh status  say what runs
#   scripts/services.sh flush   empty the Redis and Redis Cluster started here and
#                                delete the broker's topics (make test, before its
#                                jobs: each test prefix leaves keys, epoch markers
#                                per slot on the cluster, and SCANs slow down as
#                                they pile up; each test leaves topics, and a
#                                broker holding ~20k partitions runs out of file
#                                descriptors)
#   scripts/services.sh kill-kafka  SIGKILL the broker (fault injection; `up` restarts it)
#   scripts/services.sh pause-kafka / resume-kafka  SIGSTOP / SIGCONT the broker (fault injection)
#
# The broker also listens with SASL_SSL (SCRAM-SHA-512 and PLAIN) and with
# mutual-TLS SSL, for the security tests; the throwaway CA, certificates and
# test users are made here (.cache/kafka/tls, credentials below).
#
# Idempotent: `up` twice is fine and fast once the jars are cached.
# State lives in .cache/ (git-ignored). No Docker needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
KAFKA_DIR="$CACHE/kafka"
REDIS_DIR="$CACHE/redis"
KAFKA_PORT="${IDEM_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${IDEM_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_SASL_SSL_PORT="${IDEM_KAFKA_SASL_SSL_PORT:-9094}"
KAFKA_SSL_PORT="${IDEM_KAFKA_SSL_PORT:-9095}"
KAFKA_TLS_DIR="$KAFKA_DIR/tls"
# Test-only credentials of the local broker (tests/security.rs uses them).
KAFKA_SCRAM_USER="idem-scram"
KAFKA_SCRAM_PASSWORD="idem-scram-secret"
KAFKA_PLAIN_USER="idem-plain"
KAFKA_PLAIN_PASSWORD="idem-plain-secret"
KAFKA_STORE_PASSWORD="idem-local-store"
KAFKA_CLIENT_KEY_PASSWORD="idem-client-key-secret"
REDIS_PORT="${IDEM_REDIS_PORT:-6379}"
CLUSTER_PORTS="${IDEM_REDIS_CLUSTER_PORTS:-7000 7001 7002}"
CLUSTER_DIR="$CACHE/redis-cluster"
KAFKA_HEAP="${IDEM_KAFKA_HEAP:--Xms256m -Xmx768m}"
READY_TIMEOUT="${IDEM_SERVICES_TIMEOUT:-120}"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

is_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

need_root_install() {
  local pkgs=("$@")
  if [[ $(id -u) -ne 0 ]]; then
    die "missing packages: ${pkgs[*]}; install them with: sudo apt-get install -y ${pkgs[*]}"
  fi
  log "installing ${pkgs[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

# $1 = "demo": only what `make demo` needs (no Prometheus).
install_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  command -v kcat >/dev/null || missing+=(kcat)
  # openssl makes the throwaway certificates of the TLS tests.
  command -v openssl >/dev/null || missing+=(openssl)
  # librdkafka links OpenSSL (TLS listeners, SCRAM): headers to build idem.
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  # promtool and a Prometheus server for the alert-rule tests.
  [[ "${1:-}" == demo ]] || command -v promtool >/dev/null || missing+=(prometheus)
  # curl: the demo's requests to the front door; wrk: its benchmark (make bench).
  command -v curl >/dev/null || missing+=(curl)
  [[ "${1:-}" == demo ]] || command -v wrk >/dev/null || missing+=(wrk)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  if ((${#missing[@]})); then need_root_install "${missing[@]}"; fi
}

resolve_kafka_jars() {
  if [[ -f "$KAFKA_DIR/libs/.complete" ]]; then return; fi
  log "resolving Apache Kafka jars from Maven Central (first run only)"
  rm -rf "$KAFKA_DIR/libs.tmp"
  mkdir -p "$KAFKA_DIR"
  (cd "$ROOT/scripts/kafka" &&
    mvn -q -B dependency:copy-dependencies -DoutputDirectory="$KAFKA_DIR/libs.tmp") ||
    die "mvn could not resolve the Kafka jars (see the output above)"
  touch "$KAFKA_DIR/libs.tmp/.complete"
  rm -rf "$KAFKA_DIR/libs"
  mv "$KAFKA_DIR/libs.tmp" "$KAFKA_DIR/libs"
}

kafka_java() { java -cp "$KAFKA_DIR/libs/*" "$@"; }

# A throwaway CA, the broker's certificate (localhost, 127.0.0.1) in a
# PKCS12 keystore, and a client certificate for the mutual-TLS listener.
# Made again when missing or about to expire.
make_kafka_tls() {
  if [[ -f "$KAFKA_TLS_DIR/broker.p12" && -f "$KAFKA_TLS_DIR/client-encrypted.key" ]] &&
    openssl x509 -checkend 86400 -noout -in "$KAFKA_TLS_DIR/broker.crt" >/dev/null 2>&1; then
    return
  fi
  log "making a throwaway CA and certificates in $KAFKA_TLS_DIR"
  rm -rf "$KAFKA_TLS_DIR"
  mkdir -p "$KAFKA_TLS_DIR"
  (
    cd "$KAFKA_TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 \
      -subj "/CN=idem-local-test-ca"
    openssl req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr -subj "/CN=localhost"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out broker.crt -days 30 -extfile broker.ext
    openssl pkcs12 -export -in broker.crt -inkey broker.key -certfile ca.crt \
      -out broker.p12 -passout "pass:$KAFKA_STORE_PASSWORD"
    openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=idem-client"
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out client.crt -days 30 -extfile client.ext
    # The same key, encrypted, for the kafka.ssl_key_password test.
    openssl pkcs8 -topk8 -v2 aes256 -in client.key -out client-encrypted.key \
      -passout "pass:$KAFKA_CLIENT_KEY_PASSWORD"
  ) >"$KAFKA_DIR/tls.log" 2>&1 || die "making the TLS certificates failed; see $KAFKA_DIR/tls.log"
}

# SCRAM credentials live in the cluster metadata: (re)set them through the
# plaintext listener once the broker answers.
add_scram_user() {
  kafka_java kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --alter \
    --add-config "SCRAM-SHA-512=[password=$KAFKA_SCRAM_PASSWORD]" \
    --entity-type users --entity-name "$KAFKA_SCRAM_USER" >"$KAFKA_DIR/scram.log" 2>&1 ||
    die "creating the SCRAM user failed; see $KAFKA_DIR/scram.log"
}

write_kafka_config() {
  cat >"$KAFKA_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_PLAIN_USER="$KAFKA_PLAIN_PASSWORD";
ssl.keystore.type=PKCS12
ssl.keystore.location=$KAFKA_TLS_DIR/broker.p12
ssl.keystore.password=$KAFKA_STORE_PASSWORD
ssl.key.password=$KAFKA_STORE_PASSWORD
ssl.truststore.type=PEM
ssl.truststore.location=$KAFKA_TLS_DIR/ca.crt
listener.name.ssl.ssl.client.auth=required
log.dirs=$KAFKA_DIR/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Kafka 4's consumer group protocol (KIP-848) takes the session timeout and
# the heartbeat from the broker: 45 s (also the minimum) and 5 s by default.
# Here both protocols run at the tests' classic settings, a 6 s session
# (idem's kafka.session_timeout in tests) and librdkafka's 3 s heartbeat, so
# that a test or a measurement compares the protocols, not their timeouts.
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=3000
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=67108864
EOF
}

kafka_ready() { kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 3 >/dev/null 2>&1; }

start_kafka() {
  local pidfile="$KAFKA_DIR/kafka.pid"
  if is_alive "$pidfile"; then log "kafka already running (pid $(cat "$pidfile"))"; return; fi
  if kafka_ready; then log "a Kafka broker already answers on 127.0.0.1:$KAFKA_PORT; using it"; return; fi
  resolve_kafka_jars
  make_kafka_tls
  write_kafka_config
  if [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
    log "formatting KRaft storage"
    local cluster_id
    cluster_id="$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    kafka_java kafka.tools.StorageTool format --standalone -t "$cluster_id" \
      -c "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/format.log" 2>&1 ||
      die "formatting Kafka storage failed; see $KAFKA_DIR/format.log"
  fi
  log "starting kafka on 127.0.0.1:$KAFKA_PORT (log: $KAFKA_DIR/broker.log)"
  # shellcheck disable=SC2086
  nohup java $KAFKA_HEAP -XX:+UseG1GC -Dorg.slf4j.simpleLogger.defaultLogLevel=info \
    -cp "$KAFKA_DIR/libs/*" kafka.Kafka "$KAFKA_DIR/server.properties" \
    >"$KAFKA_DIR/broker.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  local waited=0
  until kafka_ready; do
    if ! is_alive "$pidfile"; then
      tail -n 30 "$KAFKA_DIR/broker.log" >&2 || true
      die "kafka exited during start-up; full log: $KAFKA_DIR/broker.log"
    fi
    if ((waited >= READY_TIMEOUT)); then
      tail -n 30 "$KAFKA_DIR/broker.log" >&2 || true
      die "kafka did not answer a metadata request within ${READY_TIMEOUT}s; full log: $KAFKA_DIR/broker.log"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  add_scram_user
  log "kafka ready after ${waited}s (SASL_SSL on $KAFKA_SASL_SSL_PORT, mutual TLS on $KAFKA_SSL_PORT)"
}

redis_ready() { redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG; }

# Waits up to 5 s until the Redis on port $1 answers PING; $2 names its log.
wait_redis() {
  local waited=0
  until redis_ready "$1"; do
    ((waited < 50)) || die "redis on port $1 did not answer PING; see $2"
    sleep 0.1
    waited=$((waited + 1))
  done
}

start_redis() {
  local pidfile="$REDIS_DIR/redis.pid"
  mkdir -p "$REDIS_DIR"
  if is_alive "$pidfile"; then log "redis already running (pid $(cat "$pidfile"))"; return; fi
  if redis_ready "$REDIS_PORT"; then log "a Redis already answers on 127.0.0.1:$REDIS_PORT; using it"; return; fi
  log "starting redis on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$pidfile" --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" \
    --save "" --appendonly no --maxclients 10000 >/dev/null
  wait_redis "$REDIS_PORT" "$REDIS_DIR/redis.log"
  log "redis ready"
}

# A local three-master Redis Cluster (no replicas) for the cluster tests.
start_redis_cluster() {
  local first="" nodes=()
  for port in $CLUSTER_PORTS; do
    first="${first:-$port}"
    nodes+=("127.0.0.1:$port")
    local dir="$CLUSTER_DIR/$port"
    mkdir -p "$dir"
    if is_alive "$dir/redis.pid" || redis_ready "$port"; then continue; fi
    redis-server --bind 127.0.0.1 --port "$port" --daemonize yes --pidfile "$dir/redis.pid" \
      --dir "$dir" --logfile "$dir/redis.log" --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
      --save "" --appendonly no >/dev/null
  done
  for port in $CLUSTER_PORTS; do wait_redis "$port" "$CLUSTER_DIR/$port/redis.log"; done
  if ! redis-cli -p "$first" cluster info | grep -q "cluster_state:ok"; then
    if ! redis-cli -p "$first" cluster info | grep -q "cluster_known_nodes:3"; then
      log "creating the redis cluster on ${nodes[*]}"
      redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    fi
    local waited=0
    until redis-cli -p "$first" cluster info | grep -q "cluster_state:ok"; do
      ((waited < 100)) || die "redis cluster did not reach cluster_state:ok"
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  log "redis cluster ready on ${nodes[*]}"
}

stop_pidfile() {
  local name="$1" pidfile="$2"
  if is_alive "$pidfile"; then
    local pid
    pid="$(cat "$pidfile")"
    log "stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 20s; killing"; kill -9 "$pid"; fi
  fi
  rm -f "$pidfile"
}

case "${1:-up}" in
  up)
    install_packages
    start_redis
    start_redis_cluster
    start_kafka
    log "up: kafka 127.0.0.1:$KAFKA_PORT, redis redis://127.0.0.1:$REDIS_PORT, redis cluster on ports $CLUSTER_PORTS"
    ;;
  up-demo)
    # What the demo needs: Redis and Kafka. No Redis Cluster and no
    # Prometheus (make test starts and installs those). The broker keeps its
    # TLS listeners: it is the same broker `make services` would start, so a
    # `make test` after the demo finds everything it needs.
    install_packages demo
    start_redis
    start_kafka
    log "up for the demo: kafka 127.0.0.1:$KAFKA_PORT, redis redis://127.0.0.1:$REDIS_PORT"
    ;;
  down)
    stop_pidfile kafka "$KAFKA_DIR/kafka.pid"
    stop_pidfile redis "$REDIS_DIR/redis.pid"
    for port in $CLUSTER_PORTS; do stop_pidfile "redis cluster node $port" "$CLUSTER_DIR/$port/redis.pid"; done
    # A restarted node would find its old cluster config: start clean next time.
    rm -rf "$CLUSTER_DIR"
    ;;
  kill-kafka)
    # For fault injection (make conformance): SIGKILL the broker started here.
    if is_alive "$KAFKA_DIR/kafka.pid"; then
      log "SIGKILL kafka (pid $(cat "$KAFKA_DIR/kafka.pid"))"
      kill -9 "$(cat "$KAFKA_DIR/kafka.pid")"
      while is_alive "$KAFKA_DIR/kafka.pid"; do sleep 0.1; done
      rm -f "$KAFKA_DIR/kafka.pid"
    else
      die "no kafka started by this script is running"
    fi
    ;;
  pause-kafka|resume-kafka)
    # For fault injection (make conformance): freeze or thaw the broker started here.
    is_alive "$KAFKA_DIR/kafka.pid" || die "no kafka started by this script is running"
    sig=STOP; [ "$1" = resume-kafka ] && sig=CONT
    log "SIG$sig kafka (pid $(cat "$KAFKA_DIR/kafka.pid"))"
    kill -"$sig" "$(cat "$KAFKA_DIR/kafka.pid")"
    ;;
  flush)
    # Only what `up` started (its pid files): never a Redis it found running.
    if is_alive "$REDIS_DIR/redis.pid"; then redis-cli -p "$REDIS_PORT" flushall >/dev/null; fi
    for port in $CLUSTER_PORTS; do
      if is_alive "$CLUSTER_DIR/$port/redis.pid"; then redis-cli -p "$port" flushall >/dev/null; fi
    done
    log "flushed the redis and redis cluster started here"
    # Every topic but the broker's own (__consumer_offsets, ...): the Redis
    # state they fed is gone with the flush, and the demo creates its own again.
    if is_alive "$KAFKA_DIR/kafka.pid"; then
      resolve_kafka_jars
      kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
        --delete --if-exists --topic '[^_].*' >"$KAFKA_DIR/flush.log" 2>&1 ||
        die "deleting the broker's topics failed; see $KAFKA_DIR/flush.log"
      log "deleted the topics of the broker started here"
    fi
    ;;
  status)
    is_alive "$KAFKA_DIR/kafka.pid" && echo "kafka: running (pid $(cat "$KAFKA_DIR/kafka.pid"))" || echo "kafka: not started here"
    is_alive "$REDIS_DIR/redis.pid" && echo "redis: running (pid $(cat "$REDIS_DIR/redis.pid"))" || echo "redis: not started here"
    ;;
  *) die "usage: $0 up|down|status|flush|kill-kafka|pause-kafka|resume-kafka" ;;
esac

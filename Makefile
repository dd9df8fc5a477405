# idem: the two set-up commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build services services-demo services-down demo test test-cluster check-deploy test-unit lint bench bench-handover conformance mutants clean-cache

all: build

build:
	$(CARGO) build

## Local Kafka (KRaft) and Redis on loopback; installs what is missing. Idempotent.
services:
	scripts/services.sh up

## Only what the demo needs: Kafka and Redis (no Redis Cluster, no Prometheus).
services-demo:
	scripts/services.sh up-demo

## Stops only what `make services` started.
services-down:
	scripts/services.sh down

## Services up, demo topic, idem processing a sample stream, outcome counts shown.
demo: services-demo build
	scripts/demo.sh

# The local Redis Cluster that `make services` starts.
REDIS_CLUSTER_URL ?= redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002

## The whole suite against the real Kafka and Redis: every test against
## standalone Redis and the integration tests again against the Redis
## Cluster (scripts/test-passes.sh: built once, run as one queue of jobs,
## three at once; docs/development.md, "The suite's time").
test: services
	CARGO='$(CARGO)' scripts/test-passes.sh '$(REDIS_CLUSTER_URL)' '$(CLUSTER_PASS_TESTS)'
	@# The idem the tests just ran (built with their features: no second build).
	scripts/check-deploy.sh target/debug/idem

## The deployment files, checked offline: compose schema, hadolint, Kubernetes
## schemas, and the example configs loaded by idem (tools from PyPI, cached).
check-deploy:
	$(CARGO) build -p idem --bin idem
	scripts/check-deploy.sh target/debug/idem

# The integration tests whose Redis follows IDEM_REDIS_URL. (cluster.rs runs
# on clusters in both passes; security.rs and decoder_props.rs do not depend
# on the shared Redis.) Add a new integration test file here too; conformance
# and bench_smoke are the test bench's (testbench/tests/).
CLUSTER_PASS_TESTS := foundation group dead_letters replay guard observability conformance bench_smoke redis_loss effects changelog operator_tools gateway

## The integration tests against the Redis Cluster only. The group protocol
## does not change what idem asks of Redis: the consumer-protocol variants
## run in the standalone pass only.
test-cluster: services
	IDEM_REDIS_URL='$(REDIS_CLUSTER_URL)' $(CARGO) test --workspace $(addprefix --test ,$(CLUSTER_PASS_TESTS)) -- --skip under_the_consumer_protocol

## Only the tests that need no services.
test-unit:
	$(CARGO) test --workspace --lib -- --skip with_redis

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 scripts/module-graph.py src > .module-graph.out; grep -qx 'CYCLES: none' .module-graph.out && grep -qx 'ORDER: ok' .module-graph.out || { cat .module-graph.out; rm -f .module-graph.out; exit 1; }; rm -f .module-graph.out
	python3 scripts/sizes.py src testbench/src

# The pure core that `make mutants` holds to >= 95% caught (docs/development.md).
# Globs are expanded here: after `--file` the shell would spread one glob
# over several words and cargo-mutants would refuse the rest.
MUTANTS_FILES := $(wildcard src/offsets.rs src/consumed.rs src/model/*.rs src/event/*.rs src/dlq/budget.rs src/config/*.rs)

## Mutation testing of the pure core with cargo-mutants against the library's
## unit tests alone (no services); report in mutants.out/. Two copies of the
## tree build side by side (the copies skip .gitignore'd files such as .cache/,
## whose Kafka index files are sparse). The whole core is ~1,070 mutants,
## ~27 s each on 2 cores: check a change on its files (MUTANTS_FILES=...)
## or a sample (MUTANTS_ARGS="--shard 0/4 --sharding round-robin").
mutants:
	command -v cargo-mutants >/dev/null || $(CARGO) install --locked cargo-mutants
	$(CARGO) mutants --package idem --test-workspace=false --cargo-test-arg=--lib \
	  --profile mutants --gitignore=true --jobs 2 --timeout 60 \
	  $(addprefix --file ,$(MUTANTS_FILES)) $(MUTANTS_ARGS) -- -- --skip with_redis; \
	  status=$$?; \
	  case $$status in 0|2|3) ;; *) echo "make mutants: cargo-mutants exited $$status (not a verdict on the mutants)"; exit $$status;; esac; \
	  python3 scripts/mutants-summary.py mutants.out

clean-cache:
	scripts/services.sh down
	rm -rf .cache

## The benchmark of docs/performance.md (release build; about 4 minutes), then its
## backlog phase again on a Zipf-skewed stream (s = 1.1: hot entities, a hot partition).
bench: services
	$(CARGO) build --release --workspace
	target/release/idem-testbench bench --out bench-out
	target/release/idem-testbench bench --zipf 1.1 --throughput-only --out bench-out/zipf
	scripts/bench-gateway.sh target/release/idem bench-out/gateway

## How long partitions go without an owner when the group changes, under each
## group protocol (docs/performance.md, "Hand-over under each group protocol"; ~25 minutes).
bench-handover: services
	$(CARGO) build --release --workspace
	target/release/idem-testbench handover --out bench-out/handover

## The full conformance suite of docs/conformance.md (kills and restarts the local broker);
## `make conformance GROUP_PROTOCOL=consumer` runs it under KIP-848's protocol.
GROUP_PROTOCOL ?= classic
conformance: services
	$(CARGO) build --release --workspace
	target/release/idem-testbench conformance --profile full --group-protocol $(GROUP_PROTOCOL) \
	  --out conformance-out/$(GROUP_PROTOCOL) \
	  --kafka-kill-cmd 'scripts/services.sh kill-kafka' --kafka-start-cmd 'scripts/services.sh up' \
	  --kafka-pause-cmd 'scripts/services.sh pause-kafka' --kafka-resume-cmd 'scripts/services.sh resume-kafka'

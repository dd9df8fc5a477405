# idem: the two set-up commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build services services-down demo test test-unit lint bench conformance clean-cache

all: build

build:
	$(CARGO) build

## Local Kafka (KRaft) and Redis on loopback; installs what is missing. Idempotent.
services:
	scripts/services.sh up

## Stops only what `make services` started.
services-down:
	scripts/services.sh down

## Services up, demo topic, idem processing a sample stream, outcome counts shown.
demo: services build
	scripts/demo.sh

## The whole suite (unit and integration) against the real Kafka and Redis.
test: services
	$(CARGO) test --all-targets

## Only the tests that need no services.
test-unit:
	$(CARGO) test --lib

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

clean-cache:
	scripts/services.sh down
	rm -rf .cache

## The benchmark of docs/performance.md (release build; about 4 minutes).
bench: services
	$(CARGO) build --release
	target/release/idem bench --out bench-out

## The full conformance suite of docs/conformance.md (kills and restarts the local broker).
conformance: services
	$(CARGO) build --release
	target/release/idem conformance --profile full --out conformance-out \
	  --kafka-kill-cmd 'scripts/services.sh kill-kafka' --kafka-start-cmd 'scripts/services.sh up'

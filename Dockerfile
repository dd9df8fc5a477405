# Multi-stage build of the idem binary.
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY config ./config
# The workspace names the test bench; only the idem binary is built and shipped.
COPY testbench ./testbench
# The commit `idem --version` and idem_build_info name (the build context has
# no .git): docker build --build-arg IDEM_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG IDEM_COMMIT=unknown
ENV IDEM_COMMIT=${IDEM_COMMIT}
RUN cargo build --release --locked -p idem --bin idem
# The release profile keeps line tables for profiles (debug = 1): ship the
# binary without them and keep them apart, linked by a .gnu_debuglink, so
# `perf` and gdb find them when the file is beside the binary or in
# /usr/lib/debug (docs/performance.md, "Symbols for a profile").
RUN objcopy --only-keep-debug target/release/idem target/release/idem.debug \
 && objcopy --strip-debug --add-gnu-debuglink=target/release/idem.debug target/release/idem

# The debug info alone: docker build --target symbols --output type=local,dest=symbols .
FROM scratch AS symbols
COPY --from=build /src/target/release/idem.debug /idem.debug

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/idem /usr/local/bin/idem
COPY topics /etc/idem/topics
# A writable working directory for the tools' files (reconcile reports).
WORKDIR /var/lib/idem
RUN chown 65534:65534 /var/lib/idem
USER 65534
EXPOSE 9464
ENTRYPOINT ["idem"]
CMD ["run"]

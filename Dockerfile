# syntax=docker/dockerfile:1
# The production image: the product binaries only (payout-worker,
# payout-producer, payout-admin, payoutctl), built without the `testkit`
# feature, so no mock gateway, stand-in, chaos harness or benchmark ships.
# Pick the process with the command (docker-compose.yml, deploy/k8s/).
#
#   docker build -t payouts:local .
#   docker build --target mock-gateway -t payouts-mock:local .   # local/dev only

# --- build ----------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# Everything the crate compiles from (config/ and migrations/ are embedded).
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY workers workers
COPY config config
COPY migrations migrations
# The checked statements' offline data (no database at build time), and the
# setting that says to use it.
COPY .sqlx .sqlx
COPY .cargo .cargo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bins \
 && mkdir -p /out \
 && find target/release -maxdepth 1 -type f -executable -exec cp {} /out/ \;

# --- the local mock gateway (testkit), for docker-compose only --------------------
FROM rust:1-bookworm AS mock-builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY workers workers
COPY config config
COPY migrations migrations
COPY .sqlx .sqlx
COPY .cargo .cargo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features testkit --bin mock-gateway \
 && mkdir -p /out && cp target/release/mock-gateway /out/

FROM debian:bookworm-slim AS mock-gateway
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin mock
COPY --from=mock-builder /out/mock-gateway /usr/local/bin/
USER 10001
EXPOSE 8085
CMD ["mock-gateway", "--listen", "0.0.0.0:8085"]

# --- run ------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates for a TLS gateway; curl for the health checks in docker-compose.yml.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 payouts \
 && useradd --system --uid 10001 --gid payouts --no-create-home --shell /usr/sbin/nologin payouts
COPY --from=builder /out/ /usr/local/bin/
USER 10001:10001
ENV PAYOUTS_LOG__FORMAT=json
# producer, worker
EXPOSE 9101 9102
CMD ["payout-worker"]

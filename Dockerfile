# syntax=docker/dockerfile:1
# One image for every binary of the fleet: payout-worker, payout-producer,
# payoutctl, mock-gateway and the rest of `cargo build --bins`. Pick the
# process with the command (docker-compose.yml, deploy/k8s/).
#
#   docker build -t payouts:local .

# --- build ----------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# Everything the crate compiles from (config/ and migrations/ are embedded).
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY workers workers
COPY config config
COPY migrations migrations
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && find target/release -maxdepth 1 -type f -executable -exec cp {} /out/ \;

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
# producer, worker, mock gateway
EXPOSE 9101 9102 8085
CMD ["payout-worker"]

#!/usr/bin/env bash
# Drain at the gateway's rate limit (issue #21 item 4, BENCHMARKS.md "Drain at
# the gateway's rate limit"): mock-gateway enforcing RATE requests/s with a
# token bucket (`--rate-limit-per-sec`, capacity BUCKET, 0 = its default of
# RATE/10), a fleet (producer + WORKERS workers) with
# gateway.rate_limit_per_sec = RATE, and a backlog of PAYOUTS payouts all due
# at once. Prints the drain rate (payouts paid per second from the first paid
# to the last, and the steady rate between the 10th and the 90th percentile
# of paid_at), both as a share of RATE, and the 429s the gateway sent.
#
#   scripts/rate-limit-drain.sh                      # release build, 100/s, 20,000 payouts (~205 s)
#   RATE=500 scripts/rate-limit-drain.sh
#   RATE=50 PAYOUTS=2000 scripts/rate-limit-drain.sh
#   BIN=/work/tgt/rel/release GW_BIN=target/release SKIP_BUILD=1 scripts/rate-limit-drain.sh   # another fleet build
#
# BIN holds payout-worker, payout-producer and payoutctl (default
# $CARGO_TARGET_DIR/release, built here unless SKIP_BUILD is set); GW_BIN holds
# the mock-gateway to use (default BIN; it must know --rate-limit-per-sec, so
# an older fleet is measured against this mock). FLEET_BURST sets
# gateway.rate_limit_burst (default: the fleet's own default). LATENCY_MS and
# JITTER_MS add gateway latency. Wrap it in `flock /tmp/bench.lock` on a
# shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-100}
BUCKET=${BUCKET:-0}
PAYOUTS=${PAYOUTS:-20000}
WORKERS=${WORKERS:-2}
LATENCY_MS=${LATENCY_MS:-0}
JITTER_MS=${JITTER_MS:-0}
DB=${DB:-payouts_rate_drain}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
GW_BIN=${GW_BIN:-$BIN}
OUT=${OUT:-.bench/rate-limit-drain-$(date -u +%Y%m%dT%H%M%S)}
TIMEOUT_SECS=${TIMEOUT_SECS:-$((PAYOUTS * 3 / RATE + 120))}

say() { printf 'rate-limit-drain: %s\n' "$*" >&2; }

if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --locked --bin payoutctl --bin mock-gateway --bin payout-worker --bin payout-producer
fi
for b in "$BIN/payoutctl" "$BIN/payout-worker" "$BIN/payout-producer" "$GW_BIN/mock-gateway"; do
  [ -x "$b" ] || { say "no $b (set BIN / GW_BIN or build it)"; exit 1; }
done
"$GW_BIN/mock-gateway" --help | grep -q -- --rate-limit-per-sec ||
  { say "$GW_BIN/mock-gateway has no --rate-limit-per-sec; set GW_BIN to a newer build"; exit 1; }
mkdir -p "$OUT"

export DATABASE_URL="$PG/$DB"
export REDIS_URL
export PAYOUTS_REDIS__PREFIX="rate-drain-$(date +%s)-$$"
export PAYOUTS_OPERATOR=rate-limit-drain
export RUST_LOG=${RUST_LOG:-warn}
export PAYOUTS_LOG__FORMAT=json PAYOUTS_PRODUCER__TICK_MS=100
export PAYOUTS_GATEWAY__RATE_LIMIT_PER_SEC="$RATE"
[ -n "${FLEET_BURST:-}" ] && export PAYOUTS_GATEWAY__RATE_LIMIT_BURST="$FLEET_BURST"
sql() { psql -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }

PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 -d "$PG/postgres" \
  -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
"$BIN/payoutctl" migrate >/dev/null
"$BIN/payoutctl" seed --count "$PAYOUTS" --payees 1000 >/dev/null

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(free_port)
GW="http://127.0.0.1:$GW_PORT"
export PAYOUTS_GATEWAY__BASE_URL="$GW"
MOCK_GATEWAY_LISTEN="127.0.0.1:$GW_PORT" "$GW_BIN/mock-gateway" --seed=42 \
  --latency-ms="$LATENCY_MS" --latency-jitter-ms="$JITTER_MS" \
  --rate-limit-per-sec="$RATE" --rate-limit-burst="$BUCKET" >"$OUT/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do curl -fs "$GW/health" >/dev/null && break; sleep 0.1; done
for i in $(seq "$WORKERS"); do
  PAYOUTS_WORKER__LISTEN="127.0.0.1:$(free_port)" "$BIN/payout-worker" >"$OUT/worker-$i.log" 2>&1 &
  pids+=($!)
done
sleep 1
PAYOUTS_PRODUCER__LISTEN="127.0.0.1:$(free_port)" "$BIN/payout-producer" >"$OUT/producer.log" 2>&1 &
pids+=($!)
say "$PAYOUTS payouts due, gateway at $RATE/s (bucket ${BUCKET/#0/default}), $WORKERS workers; logs in $OUT"
deadline=$(($(date +%s) + TIMEOUT_SECS))
while :; do
  left=$(sql -At -c "SELECT count(*) FROM payouts WHERE status <> 'paid'")
  [ "$left" = 0 ] && break
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { say "a fleet process exited; logs in $OUT"; exit 1; }; done
  [ "$(date +%s)" -lt "$deadline" ] || { say "timed out: $left payouts not paid"; break; }
  sleep 2
done

curl -fs "$GW/_mock/stats" >"$OUT/stats.json"
curl -fs "$GW/_mock/ledger" | jq -r '[.[].reference] | [length, (unique | length)] | @tsv' >"$OUT/ledger.tsv"
read -r ENTRIES UNIQUE_REFS <"$OUT/ledger.tsv"
sql -At -F ' ' -c "
  WITH p AS (SELECT extract(epoch FROM paid_at) AS t FROM payouts WHERE status = 'paid'),
       q AS (SELECT count(*) AS n, min(t) AS t0, max(t) AS t1,
                    percentile_disc(0.1) WITHIN GROUP (ORDER BY t) AS t10,
                    percentile_disc(0.9) WITHIN GROUP (ORDER BY t) AS t90 FROM p),
       s AS (SELECT count(*) AS c FROM p, q
             WHERE floor(p.t - q.t0) BETWEEN 1 AND floor(q.t1 - q.t0) - 1
             GROUP BY floor(p.t - q.t0))
  SELECT n, round((t1 - t0)::numeric, 2),
         round(((n - 1) / nullif(t1 - t0, 0))::numeric, 1),
         round(((n * 0.8) / nullif(t90 - t10, 0))::numeric, 1),
         (SELECT coalesce(min(c), 0) FROM s), (SELECT coalesce(max(c), 0) FROM s)
  FROM q" >"$OUT/drain.txt"
read -r PAID SECS DRAIN STEADY SLOWEST BUSIEST <"$OUT/drain.txt"
BUCKET_429=$(jq '.rate_limited // 0' "$OUT/stats.json")
ALL_429=$(jq '.by_status["429"] // 0' "$OUT/stats.json")
REQUESTS=$(jq '.requests' "$OUT/stats.json")
pct() { awk -v a="$1" -v r="$RATE" 'BEGIN { printf "%.1f %%", 100 * a / r }'; }
once=yes
[ "$ENTRIES" = "$PAID" ] && [ "$UNIQUE_REFS" = "$PAID" ] && [ "$PAID" = "$PAYOUTS" ] || once=NO
cat <<EOF

| gateway limit | payouts paid | first -> last paid | drain rate | steady (p10-p90) | slowest / busiest whole second | 429s (token bucket / all) | transfer requests | exactly once |
|---|---|---|---|---|---|---|---|---|
| $RATE/s, bucket $(jq -r --argjson r "$RATE" --argjson b "$BUCKET" -n 'if $b > 0 then $b else ([($r / 10 | floor), 1] | max) end') | $PAID of $PAYOUTS | $SECS s | $DRAIN/s ($(pct "$DRAIN")) | $STEADY/s ($(pct "$STEADY")) | $SLOWEST / $BUSIEST | $BUCKET_429 / $ALL_429 | $REQUESTS | $once |
EOF
[ "$once" = yes ]

#!/usr/bin/env bash
# The priority benchmark (#17 item 4; figures in BENCHMARKS.md, "Priority").
#
# On a fresh database: BACKLOG scheduled payouts, all due (payoutctl seed),
# drained by the real binaries (mock gateway at LATENCY_MS, WORKERS workers,
# one producer with the shipped defaults). Once the drain is under way,
# REQUESTS early-request payouts (priority 1, due now, as a payee's payout
# request inserts them) are inserted every INTERVAL seconds; each one's
# latency is paid_at - created_at. Prints p50 / p99 / max, the backlog left
# when the last request was made (the drain must still be going on), and the
# time the whole backlog took.
#
#   scripts/priority-bench.sh                              # 100,000 backlog, 40 requests
#   SKIP_BUILD=1 BIN=/path/to/release scripts/priority-bench.sh
#   BIN=target/debug SKIP_BUILD=1 scripts/priority-bench.sh # a debug build (slower drain)
#
# Needs Redis and Postgres as scripts/services.sh starts them; psql, curl.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKLOG=${BACKLOG:-100000}
PAYEES=${PAYEES:-1000}
REQUESTS=${REQUESTS:-40}
INTERVAL=${INTERVAL:-0.5}
WORKERS=${WORKERS:-2}
LATENCY_MS=${LATENCY_MS:-0}
DB=${DB:-payouts_priority_bench}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
OUT=${OUT:-.priority-bench}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
TIMEOUT_SECS=${TIMEOUT_SECS:-1800}

say() { printf 'priority-bench: %s\n' "$*" >&2; }

scripts/services.sh
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --locked --bin payoutctl --bin mock-gateway --bin payout-worker --bin payout-producer
fi
for b in payoutctl mock-gateway payout-worker payout-producer; do
  [ -x "$BIN/$b" ] || { say "no $BIN/$b (set BIN or build it)"; exit 1; }
done
rm -rf "$OUT" && mkdir -p "$OUT"

export DATABASE_URL="$PG/$DB"
export REDIS_URL
export PAYOUTS_REDIS__PREFIX="priority-bench-$(date +%s)-$$"
export PAYOUTS_OPERATOR=priority-bench
export RUST_LOG=${RUST_LOG:-warn}
sql() { psql -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }

# --- setup (not measured) -----------------------------------------------------
PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 -d "$PG/postgres" \
  -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
"$BIN/payoutctl" migrate >/dev/null
"$BIN/payoutctl" seed --count "$BACKLOG" --payees "$PAYEES" >/dev/null
sql -c "VACUUM ANALYZE payouts"
say "$BACKLOG scheduled payouts due over $PAYEES payees"

# --- the fleet drains them ------------------------------------------------------
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(free_port)
export PAYOUTS_GATEWAY__BASE_URL="http://127.0.0.1:$GW_PORT"
# The shipped producer defaults (tick_ms, refill_ms, window, [producer.priority]);
# no settlement (the backlog is seeded).
export PAYOUTS_PRODUCER__SETTLE_ON_TICK=false PAYOUTS_LOG__FORMAT=json
MOCK_GATEWAY_LISTEN="127.0.0.1:$GW_PORT" "$BIN/mock-gateway" --latency-ms="$LATENCY_MS" --seed=42 >"$OUT/gateway.log" 2>&1 &
pids+=($!)
for i in $(seq "$WORKERS"); do
  PAYOUTS_WORKER__LISTEN="127.0.0.1:$(free_port)" "$BIN/payout-worker" >"$OUT/worker-$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 300); do curl -fs "$PAYOUTS_GATEWAY__BASE_URL/health" >/dev/null && break; sleep 0.1; done
PAYOUTS_PRODUCER__LISTEN="127.0.0.1:$(free_port)" "$BIN/payout-producer" >"$OUT/producer.log" 2>&1 &
pids+=($!)
FLEET0=$(date +%s.%N)
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { say "a fleet process exited; logs in $OUT"; exit 1; }; done; }

# The drain is under way: 2% of the backlog paid.
deadline=$(($(date +%s) + TIMEOUT_SECS))
while [ "$(sql -At -c "SELECT count(*) FROM payouts WHERE status = 'paid'")" -lt $((BACKLOG / 50)) ]; do
  alive
  [ "$(date +%s)" -lt "$deadline" ] || { say "timed out before the drain started"; exit 1; }
  sleep 0.2
done

# --- measured: early requests during the drain ---------------------------------
REQ_PAYEE=$(sql -At -c "INSERT INTO payees (name, gateway_account, currency)
                        VALUES ('Early requester', 'acct_early', 'USD') RETURNING id")
for k in $(seq "$REQUESTS"); do
  alive
  sql -At -c "WITH ins AS (
      INSERT INTO payouts (payee_id, amount, currency, due_at, priority, created_at, updated_at)
      VALUES ($REQ_PAYEE, 25.00, 'USD', now(), 1, now(), now()) RETURNING id)
    INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
    SELECT id, NULL, 'pending', 'integration:bench', 'payout request', 0, now() FROM ins" >/dev/null
  sleep "$INTERVAL"
done
LEFT_AT_LAST=$(sql -At -c "SELECT count(*) FROM payouts WHERE priority = 0 AND status <> 'paid'")
[ "$LEFT_AT_LAST" -gt 0 ] || say "WARNING: the backlog was drained before the last request (raise BACKLOG)"

while :; do
  left=$(sql -At -c "SELECT count(*) FROM payouts WHERE status <> 'paid'")
  [ "$left" = 0 ] && break
  alive
  [ "$(date +%s)" -lt "$deadline" ] || { say "timed out: $left payouts not paid"; exit 1; }
  sleep 1
done
read -r N P50 P99 MAX < <(sql -At -F ' ' -c "
  WITH l AS (SELECT extract(epoch FROM paid_at - created_at) AS s FROM payouts WHERE priority = 1)
  SELECT count(*), round(percentile_disc(0.5) WITHIN GROUP (ORDER BY s)::numeric, 3),
         round(percentile_disc(0.99) WITHIN GROUP (ORDER BY s)::numeric, 3), round(max(s)::numeric, 3) FROM l")
read -r SCHED_P50 SCHED_MAX < <(sql -At -F ' ' -c "
  WITH l AS (SELECT extract(epoch FROM paid_at - created_at) AS s FROM payouts WHERE priority = 0)
  SELECT round(percentile_disc(0.5) WITHIN GROUP (ORDER BY s)::numeric, 1), round(max(s)::numeric, 1) FROM l")
LAST_PAID=$(sql -At -c "SELECT extract(epoch FROM max(paid_at)) FROM payouts WHERE priority = 0")
DRAIN_S=$(awk -v a="$FLEET0" -v b="$LAST_PAID" 'BEGIN { printf "%.1f", b - a }')
sql -At -F ' ' -c "SELECT id, round(extract(epoch FROM paid_at - created_at)::numeric, 3) FROM payouts
                   WHERE priority = 1 ORDER BY id" >"$OUT/requests.txt"
cat <<EOF

| backlog | workers, gateway | requests | request paid after (p50 / p99 / max) | backlog left at the last request | scheduled payouts paid after (p50 / max) | backlog drained in |
|---|---|---|---|---|---|---|
| $BACKLOG due | $WORKERS, $LATENCY_MS ms | $N, every $INTERVAL s | $P50 s / $P99 s / $MAX s | $LEFT_AT_LAST | $SCHED_P50 s / $SCHED_MAX s | $DRAIN_S s |

per request (id, seconds): $OUT/requests.txt
EOF

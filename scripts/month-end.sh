#!/usr/bin/env bash
# The month-end benchmark (issue 13; figures in BENCHMARKS.md, "Month-end").
#
# On a fresh database: PAYEES payees (SQL), a CSV of PAYEES x PER_PAYEE
# earnings completed inside closed weekly periods (their release, completion
# + the policy's 7-day hold, is at least 8 days ago), then, each timed with
# /usr/bin/time -v (wall clock and peak RSS):
#   payoutctl earnings import   rows/s
#   payoutctl settle            payees/s
# then the conservation check (gross settled = payouts + platform commission
# + fees + deductions + open balances, to the minor unit), then the fleet
# (mock gateway at 0 ms, WORKERS workers, a producer, as payout-bench starts
# them) until the last payout is paid, and the time from the start of the
# import to the last payout paid.
#
#   scripts/month-end.sh                      # 100,000 payees x 10 = 1,000,000 earnings
#   PAYEES=10000 scripts/month-end.sh         # a tenth
#   SKIP_BUILD=1 BIN=/path/to/release scripts/month-end.sh
#   IMPORT_ONLY=1 scripts/month-end.sh        # stop after the import
#
# Needs Redis and Postgres as scripts/services.sh starts them; psql, curl, jq.
set -euo pipefail
cd "$(dirname "$0")/.."

PAYEES=${PAYEES:-100000}
PER_PAYEE=${PER_PAYEE:-10}
WORKERS=${WORKERS:-2}
DB=${DB:-payouts_month_end}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
OUT=${OUT:-.month-end}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
TIMEOUT_SECS=${TIMEOUT_SECS:-3600}

say() { printf 'month-end: %s\n' "$*" >&2; }

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
export PAYOUTS_REDIS__PREFIX="month-end-$(date +%s)-$$"
export PAYOUTS_OPERATOR=month-end
export RUST_LOG=${RUST_LOG:-warn}
sql() { psql -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }

# --- setup (not measured) -----------------------------------------------------
PGOPTIONS='-c client_min_messages=warning' psql -X -q -v ON_ERROR_STOP=1 -d "$PG/postgres" \
  -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
"$BIN/payoutctl" migrate >/dev/null
sql -c "INSERT INTO payees (name, gateway_account, currency)
        SELECT 'Payee ' || g, 'acct_me_' || g, 'USD' FROM generate_series(1, $PAYEES) g"
# every 10th payee pays 5.00 USD booth rent per period
sql -c "INSERT INTO payee_deductions (payee_id, currency, label, amount, created_at)
        SELECT id, 'USD', 'booth rent', 5.00, now() FROM payees WHERE id % 10 = 0"
# Each payee's work falls in one of the last three closed weeks (by payee),
# PER_PAYEE pieces 37 minutes apart; 5.00 to 90.00 USD; file in time order.
CSV="$OUT/earnings.csv"
sql -c "COPY (
  SELECT p AS payee_id, 'booking' AS source, 'ME-' || p || '-' || k AS external_ref,
         (5 + ((p * 7919 + k * 104729) % 8501) / 100.0)::numeric(12,2) AS gross, 'USD' AS currency,
         to_char((date_trunc('second', now()) - interval '15 days' - (p % 3) * interval '7 days'
                  - (p % 997) * interval '1 minute' + k * interval '37 minutes') AT TIME ZONE 'UTC',
                 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS completed_at
  FROM generate_series(1, $PER_PAYEE) k, generate_series(1, $PAYEES) p
) TO STDOUT WITH (FORMAT csv, HEADER)" >"$CSV"
ROWS=$((PAYEES * PER_PAYEE))
say "$PAYEES payees, $ROWS earnings in $CSV ($(du -h "$CSV" | cut -f1))"

# --- measured -------------------------------------------------------------------
timed() { # name command...: runs it under /usr/bin/time -v; writes "seconds peak_rss_mb" to $OUT/name.stats
  local name=$1
  shift
  /usr/bin/time -v -o "$OUT/$name.time" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" ||
    { say "$name failed:"; cat "$OUT/$name.err" >&2; exit 1; }
  awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i] }
              /Maximum resident set size/ { rss = $2 / 1024 }
              END { printf "%.2f %.0f\n", s, rss }' "$OUT/$name.time" >"$OUT/$name.stats"
}

T0=$(date +%s.%N)
timed import "$BIN/payoutctl" earnings import "$CSV"
read -r IMPORT_S IMPORT_MB <"$OUT/import.stats"
say "import: $(cat "$OUT/import.out") ($IMPORT_S s, $IMPORT_MB MB)"
if [ -n "${IMPORT_ONLY:-}" ]; then
  printf '\n| `earnings import` | %s rows | %s s | %s rows/s | %s MB |\n' \
    "$ROWS" "$IMPORT_S" "$(awk -v n="$ROWS" -v s="$IMPORT_S" 'BEGIN { printf "%.0f", n / s }')" "$IMPORT_MB"
  exit 0
fi
timed settle "$BIN/payoutctl" settle
read -r SETTLE_S SETTLE_MB <"$OUT/settle.stats"
say "settle: $(head -3 "$OUT/settle.out") ($SETTLE_S s, $SETTLE_MB MB)"

read -r EARNINGS SETTLED PERIODS PAYOUTS < <(sql -At -F ' ' -c "
  SELECT (SELECT count(*) FROM earnings), (SELECT count(*) FROM earnings WHERE settlement_id IS NOT NULL),
         (SELECT count(*) FROM settlements), (SELECT count(*) FROM settlements WHERE outcome = 'payout')")
# Conservation, summed over every settlement (each row's CHECK holds it per
# period; carried balances, and the remainders a payout kept below the
# gateway's payout step, cancel out between the period that carried and the
# one that took them in, leaving the open ones).
CONSERVATION=$(sql -At -F ' ' -c "
  WITH t AS (SELECT
    (SELECT coalesce(sum(gross), 0) FROM earnings WHERE settlement_id IS NOT NULL) AS earned,
    (SELECT coalesce(sum(gross), 0) FROM settlements) AS gross,
    (SELECT coalesce(trim_scale(sum(p.amount)), 0) FROM payouts p JOIN settlements s ON s.payout_id = p.id) AS payouts,
    (SELECT coalesce(sum(platform_commission), 0) FROM settlements) AS platform,
    (SELECT coalesce(sum(fee), 0) FROM settlements) AS fees,
    (SELECT coalesce(sum(deductions), 0) FROM settlements) AS deductions,
    (SELECT coalesce(sum(net) FILTER (WHERE outcome <> 'payout' AND carried_into IS NULL), 0)
            + coalesce(sum(carried_out) FILTER (WHERE carried_out_into IS NULL), 0) FROM settlements) AS open)
  SELECT earned = gross AND gross = payouts + platform + fees + deductions + open,
         earned, payouts, platform, fees, deductions, open FROM t")
read -r HOLDS GROSS PAID_OUT PLATFORM FEES DEDUCTIONS OPEN <<<"$CONSERVATION"
[ "$EARNINGS" = "$ROWS" ] || { say "imported $EARNINGS earnings, expected $ROWS"; exit 1; }
[ "$HOLDS" = t ] || { say "conservation FAILED: $CONSERVATION"; exit 1; }

# --- the fleet pays them --------------------------------------------------------
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(free_port)
export PAYOUTS_GATEWAY__BASE_URL="http://127.0.0.1:$GW_PORT"
export PAYOUTS_PRODUCER__TICK_MS=100 PAYOUTS_PRODUCER__SETTLE_ON_TICK=false PAYOUTS_LOG__FORMAT=json
MOCK_GATEWAY_LISTEN="127.0.0.1:$GW_PORT" "$BIN/mock-gateway" --latency-ms=0 --seed=42 >"$OUT/gateway.log" 2>&1 &
pids+=($!)
for i in $(seq "$WORKERS"); do
  PAYOUTS_WORKER__LISTEN="127.0.0.1:$(free_port)" "$BIN/payout-worker" >"$OUT/worker-$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 300); do curl -fs "$PAYOUTS_GATEWAY__BASE_URL/health" >/dev/null && break; sleep 0.1; done
PAYOUTS_PRODUCER__LISTEN="127.0.0.1:$(free_port)" "$BIN/payout-producer" >"$OUT/producer.log" 2>&1 &
pids+=($!)
FLEET0=$(date +%s.%N)
deadline=$(($(date +%s) + TIMEOUT_SECS))
while :; do
  left=$(sql -At -c "SELECT count(*) FROM payouts WHERE status <> 'paid'")
  [ "$left" = 0 ] && break
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { say "a fleet process exited; logs in $OUT"; exit 1; }; done
  [ "$(date +%s)" -lt "$deadline" ] || { say "timed out: $left payouts not paid"; exit 1; }
  sleep 1
done
LAST_PAID=$(sql -At -c "SELECT extract(epoch FROM max(paid_at)) FROM payouts")
LEDGER=$(curl -fs "$PAYOUTS_GATEWAY__BASE_URL/_mock/ledger" | jq '[.[].reference] | [length, (unique | length)] | @tsv' -r)
read -r ENTRIES UNIQUE_REFS <<<"$LEDGER"
[ "$ENTRIES" = "$PAYOUTS" ] && [ "$UNIQUE_REFS" = "$PAYOUTS" ] ||
  { say "gateway ledger: $ENTRIES entries, $UNIQUE_REFS references, $PAYOUTS payouts"; exit 1; }

num() { printf '%d' "$1" | sed -e ':a' -e 's/\B[0-9]\{3\}\>/,&/' -e 'ta'; }
rate() { num "$(awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / (s > 0 ? s : 1e-9) }')"; }
FLEET_S=$(awk -v a="$FLEET0" -v b="$LAST_PAID" 'BEGIN { printf "%.1f", b - a }')
TOTAL_S=$(awk -v a="$T0" -v b="$LAST_PAID" 'BEGIN { printf "%.1f", b - a }')
cat <<EOF

| step | size | wall | rate | peak RSS |
|---|---|---|---|---|
| \`earnings import\` | $(num "$ROWS") rows | $IMPORT_S s | $(rate "$ROWS" "$IMPORT_S") rows/s | $IMPORT_MB MB |
| \`settle\` | $(num "$PAYEES") payees, $(num "$PERIODS") periods, $(num "$PAYOUTS") payouts | $SETTLE_S s | $(rate "$PAYEES" "$SETTLE_S") payees/s | $SETTLE_MB MB |
| fleet ($WORKERS workers, gateway 0 ms) | $(num "$PAYOUTS") payouts paid | $FLEET_S s | $(rate "$PAYOUTS" "$FLEET_S") payouts/s | |
| earnings in to last payout paid | | $TOTAL_S s | | |

conservation: $GROSS USD gross settled = $PAID_OUT payouts + $PLATFORM platform commission + $FEES fees + $DEDUCTIONS deductions + $OPEN open balances (holds)
settled $(num "$SETTLED") of $(num "$EARNINGS") earnings; gateway ledger: $ENTRIES transfers, one per payout
EOF

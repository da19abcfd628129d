#!/usr/bin/env bash
# How fast the admin API answers with millions of payouts: seeds a separate
# database (default 5,000,000 payouts over 30 days, ids growing with time as
# in production: 97% paid, 1% failed with four codes, 1% pending, the rest
# retrying and cancelled), starts
# payout-admin on it with the overview cache off, and times every view the
# dashboard uses (median and worst of 20 requests each, curl's time_total).
#
#   scripts/admin-at-scale.sh            # 5 M rows
#   ROWS=1000000 scripts/admin-at-scale.sh
#   SKIP_BUILD=1 BIN=/path/to/release scripts/admin-at-scale.sh   # other binaries
#   SCALE_DB=name PG_URL=postgres://... scripts/admin-at-scale.sh  # another database / server
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${ROWS:-5000000}"
DB="${SCALE_DB:-payouts_admin_scale}"
PG="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
scripts/services.sh >/dev/null
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked --bin payout-admin --bin payoutctl >/dev/null 2>&1
export DATABASE_URL="$PG/$DB"
export PAYOUTS_REDIS__PREFIX="scale_$$"
SEED_VERSION=2

if [ "$(psql "$PG/postgres" -Atc "SELECT count(*) FROM pg_database WHERE datname = '$DB'")" = 0 ] ||
   [ "$(psql "$DATABASE_URL" -Atc "SELECT count(*) || '/' || obj_description('payouts'::regclass) FROM payouts" 2>/dev/null || echo 0)" != "$ROWS/seed $SEED_VERSION" ]; then
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
  "$BIN"/payoutctl migrate >/dev/null
  echo "seeding $ROWS payouts..."
  psql "$DATABASE_URL" -q <<SQL
INSERT INTO payees (name, gateway_account, currency)
SELECT 'Payee ' || g, 'acct_' || g, 'USD' FROM generate_series(1, 10000) g;
INSERT INTO payouts (payee_id, amount, currency, status, due_at, attempt, next_attempt_at,
                     gateway_transfer_id, failure_code, failure_message, created_at, updated_at, paid_at)
SELECT 1 + g % 10000, 10 + (g % 5000) / 100.0, 'USD', s,
       now() - (1 - g::float / $ROWS) * interval '30 days', 1,
       CASE WHEN s = 'retrying' THEN now() + interval '10 minutes' END,
       CASE WHEN s = 'paid' THEN 'tr_' || g END,
       CASE WHEN s = 'failed' THEN (ARRAY['account_closed', 'account_frozen', 'invalid_account_number', 'attempts_exhausted'])[1 + g % 4] END,
       CASE WHEN s = 'failed' THEN 'seeded failure' END,
       now() - (1 - g::float / $ROWS) * interval '30 days',
       now() - (1 - g::float / $ROWS) * interval '30 days' + interval '2 seconds',
       CASE WHEN s = 'paid' THEN now() - (1 - g::float / $ROWS) * interval '30 days' + interval '2 seconds' END
FROM (SELECT g, CASE WHEN g % 100 < 97 THEN 'paid' WHEN g % 100 = 97 THEN 'failed'
                     WHEN g % 100 = 98 THEN 'pending' WHEN g % 200 = 99 THEN 'retrying' ELSE 'cancelled' END AS s
      FROM generate_series(1, $ROWS) g) x;
COMMENT ON TABLE payouts IS 'seed $SEED_VERSION';
VACUUM ANALYZE payouts;
SQL
fi
echo "payouts: $(psql "$DATABASE_URL" -Atc "SELECT count(*) FROM payouts")"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TOKEN=$(PAYOUTS_OPERATOR=scale "$BIN"/payoutctl --json token create --name "scale-$$" --role admin | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
PAYOUTS_ADMIN__LISTEN="127.0.0.1:$PORT" PAYOUTS_ADMIN__OVERVIEW_CACHE_MS=0 PAYOUTS_LOG__FORMAT=json \
  "$BIN"/payout-admin 2>/dev/null &
ADMIN=$!
trap 'kill $ADMIN 2>/dev/null; "$BIN"/payoutctl token revoke "scale-$$" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done

CURSOR=$(curl -fs -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/api/v1/payouts?limit=50" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["next_cursor"])')
FAILED_ID=$(psql "$DATABASE_URL" -Atc "SELECT id FROM payouts WHERE status = 'failed' ORDER BY id DESC LIMIT 1")
echo
echo "| view | request | median | worst of 20 |"
echo "|---|---|---:|---:|"
time_it() {
  local name="$1" path="$2" t
  t=$(for _ in $(seq 1 20); do
        curl -fs -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT$path"
      done | sort -n)
  printf '| %s | `%s` | %.1f ms | %.1f ms |\n' "$name" "$path" \
    "$(echo "$t" | sed -n 10p | awk '{print $1*1000}')" "$(echo "$t" | tail -1 | awk '{print $1*1000}')"
}
time_it "overview" "/api/v1/overview"
time_it "payouts, first page" "/api/v1/payouts?limit=50"
time_it "payouts, next page" "/api/v1/payouts?limit=50&cursor=$CURSOR"
time_it "failed payouts" "/api/v1/payouts?status=failed&limit=50"
time_it "failed by code" "/api/v1/payouts?status=failed&failure_code=account_frozen&limit=50"
time_it "one payee's payouts" "/api/v1/payouts?payee_id=4242&limit=50"
time_it "paid in a day" "/api/v1/payouts?paid_from=$(date -u -d '-3 days' +%Y-%m-%dT%H:%M:%SZ)&paid_to=$(date -u -d '-2 days' +%Y-%m-%dT%H:%M:%SZ)&limit=50"
time_it "failures view" "/api/v1/failures"
time_it "a payout page" "/api/v1/payouts/$FAILED_ID"

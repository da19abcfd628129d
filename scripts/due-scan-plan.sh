#!/usr/bin/env bash
# The producer's due scan against a large table: creates database
# payouts_scan, fills it with ROWS payouts (default 10,000,000: 99% paid,
# 1% pending and due), and prints EXPLAIN ANALYZE of one producer batch
# (500 rows), rolled back. The statement mirrors the pending step of
# db::payouts::queue_due_ranked (by rank time, `payouts_pending_rank_idx`).
# Used for BENCHMARKS.md.
#
#   SKIP_FILL=1 scripts/due-scan-plan.sh       # the plans again on the table already filled
#   SCAN_DB=name SKIP_BUILD=1 BIN=/path/to/release scripts/due-scan-plan.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-10000000}
DB=${SCAN_DB:-payouts_scan}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
PSQL="psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q"
scripts/services.sh
if [ -z "${SKIP_FILL:-}" ]; then
$PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked --bin payoutctl >/dev/null 2>&1
DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB "$BIN"/payoutctl migrate >/dev/null
echo "filling $ROWS rows..."
time $PSQL -d $DB <<SQL
INSERT INTO payees (name, gateway_account, currency)
SELECT 'p' || g, 'acct_' || g, 'USD' FROM generate_series(1, 10000) g;
ALTER TABLE payouts DISABLE TRIGGER payouts_transition;
INSERT INTO payouts (payee_id, amount, currency, status, due_at, rank_at, attempt, gateway_transfer_id, paid_at, created_at, updated_at)
SELECT 1 + g % 10000, 10 + (g % 500), 'USD',
       CASE WHEN g % 100 = 0 THEN 'pending' ELSE 'paid' END,
       now() - interval '30 days' + (g % 2592000) * interval '1 second',
       CASE WHEN g % 100 = 0 THEN now() - interval '30 days' + (g % 2592000) * interval '1 second' END,
       CASE WHEN g % 100 = 0 THEN 0 ELSE 1 END,
       CASE WHEN g % 100 = 0 THEN NULL ELSE 'tr_' || g END,
       CASE WHEN g % 100 = 0 THEN NULL ELSE now() END,
       now(), now()
FROM generate_series(1, $ROWS) g;
ALTER TABLE payouts ENABLE TRIGGER payouts_transition;
VACUUM ANALYZE payouts;
SQL
fi
$PSQL -d $DB -c "SELECT status, count(*) FROM payouts GROUP BY status" \
  -c "SELECT pg_size_pretty(pg_total_relation_size('payouts')) AS table_and_indexes"
echo "one producer batch (500), three times, rolled back:"
for i in 1 2 3; do
$PSQL -d $DB <<'SQL'
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
WITH due AS (
    SELECT id, status FROM payouts WHERE rank_at <= now() AND due_at <= now()
      AND NOT EXISTS (SELECT 1 FROM payees y WHERE y.id = payouts.payee_id AND y.status = 'suspended')
    ORDER BY rank_at LIMIT 500 FOR UPDATE SKIP LOCKED),
upd AS (
    UPDATE payouts p SET status = 'queued', lease_until = now() + interval '60 seconds', lease_owner = NULL, updated_at = now(),
        rank_at = NULL
    FROM due WHERE p.id = due.id AND due.status = 'pending'
    RETURNING p.id, due.status AS from_status, p.attempt),
ev AS (
    INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
    SELECT id, from_status, 'queued', 'producer:plan', 'due', attempt, now() FROM upd)
SELECT id FROM upd;
ROLLBACK;
SQL
done

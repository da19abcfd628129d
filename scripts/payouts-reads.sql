-- The reads of payouts that the Postgres diet (#21) moved to other indexes,
-- EXPLAIN (ANALYZE, BUFFERS) on a filled table (scripts/due-scan-plan.sh's),
-- with 1,000 payouts put in flight first; rolled back. Used for BENCHMARKS.md:
--   psql -h 127.0.0.1 -U postgres -d payouts_scan -f scripts/payouts-reads.sql
\pset pager off
BEGIN;
-- 1,000 in flight (a window), as a drain has
UPDATE payouts SET status = 'queued', lease_until = now() + interval '60 s', rank_at = NULL
 WHERE id IN (SELECT id FROM payouts WHERE rank_at IS NOT NULL ORDER BY rank_at LIMIT 1000);
\echo '--- sweep of expired leases (sweep_expired, 1,000 in flight, none expired)'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF)
SELECT id, status FROM payouts WHERE status IN ('queued', 'processing') AND lease_until < now()
 ORDER BY lease_until LIMIT 1000 FOR UPDATE SKIP LOCKED;
\echo '--- gauges: UNPAID_COUNTS'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF)
SELECT status, count(*) AS "count!" FROM payouts
     WHERE status IN ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'failed', 'cancelled', 'held')
     GROUP BY status;
\echo '--- window count (count_queued)'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) SELECT count(*) FROM payouts WHERE status = 'queued';
\echo '--- backlog age (oldest_due_unfinished)'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF)
SELECT least(
     (SELECT min(due_at) FROM payouts WHERE status = 'pending' AND due_at <= now()
        AND NOT EXISTS (SELECT 1 FROM payees y WHERE y.id = payouts.payee_id AND y.status = 'suspended')),
     (SELECT min(due_at) FROM payouts WHERE status IN ('queued', 'processing')));
\echo '--- listing: status=paid, first page (filter::page)'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) SELECT * FROM payouts WHERE status = 'paid' ORDER BY id DESC LIMIT 51;
\echo '--- listing: status=pending, first page'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) SELECT * FROM payouts WHERE status = 'pending' ORDER BY id DESC LIMIT 51;
\echo '--- listing: status=paid, one payee'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) SELECT * FROM payouts WHERE status = 'paid' AND payee_id = 4242 ORDER BY id DESC LIMIT 51;
ROLLBACK;

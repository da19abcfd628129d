-- The Postgres diet (#21 item 1), indexes: fewer index entries per status
-- update on the hot path. No update of a payout's status can be HOT
-- (`status` is in the key or predicate of most indexes, and an update that
-- changes any indexed column writes an entry into every index whose
-- predicate the new row meets). The full indexes (payouts_pkey,
-- payouts_payee_idx, payouts_status_id_idx) get one entry per update, the
-- partial ones only from the rows they hold.
--
-- payouts_status_id_idx leaves paid payouts out: the paid update (one per
-- payout) no longer writes into it, and at 10 M rows, mostly paid, it holds
-- the open and failed ones rather than every row. What read it for `paid`:
-- the gauges' paid count (past a million rows an estimate from
-- pg_class.reltuples, below that a count of the table) and the listing of
-- paid payouts, which walks the primary key backwards and keeps the paid
-- rows it meets (most rows).
DROP INDEX payouts_status_id_idx;
CREATE INDEX payouts_status_id_idx ON payouts (status, id) WHERE status <> 'paid';

-- payouts_leased_idx (lease_until of queued and processing payouts) got an
-- entry from the queued and from the processing update of every payout. The
-- sweep of expired leases reads the payouts in flight through
-- payouts_status_id_idx instead: the window bounds them (1,000 by default),
-- and the sweep runs once per producer tick. A lease renewal now changes no
-- indexed column: it is a HOT update.
DROP INDEX payouts_leased_idx;

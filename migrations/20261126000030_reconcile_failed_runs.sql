-- A reconciliation in which every look-up failed (the gateway could not be
-- asked at all) is kept in the history, marked failed with its reason, but it
-- is not a reconciliation: payout_reconcile_last_run_timestamp_seconds (and
-- the mismatch gauges) come from the latest run that did compare, so
-- PayoutReconcileStale still fires when only failed runs happen.
ALTER TABLE reconcile_runs
    ADD COLUMN failed BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN error  TEXT;

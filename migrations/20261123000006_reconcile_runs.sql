-- Every reconciliation run, so its result outlives the `payoutctl reconcile`
-- process: the leading producer publishes the latest run as the
-- payout_reconcile_mismatches gauges (and the time of the run), which the
-- reconciliation alerts read.
CREATE TABLE reconcile_runs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL,
    since       TIMESTAMPTZ NOT NULL,
    checked     BIGINT      NOT NULL CHECK (checked >= 0),
    fixed       BIGINT      NOT NULL CHECK (fixed >= 0),
    -- {"paid_in_db_unknown_to_gateway": 1, ...}: every kind, zeros included
    mismatches  JSONB       NOT NULL,
    actor       TEXT        NOT NULL
);

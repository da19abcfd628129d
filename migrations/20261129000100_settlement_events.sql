-- The outbox of settlement events, beside payout_events (whose rows are
-- payout transitions): `settlement.created` when a settlement is written and
-- `earning.released` when the settlement run takes a released earning (its
-- release_at before the period's end) into a settlement. Both are written in
-- the transaction that writes the settlement, so there is no event for a
-- settlement that rolled back. Like payout_events, each row records the
-- transaction that wrote it, and the webhook fan-out reads it in (tx_id, id)
-- order after its own cursor, only below the oldest transaction still running.
CREATE TABLE settlement_events (
    id            BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    kind          TEXT        NOT NULL CHECK (kind IN ('settlement.created', 'earning.released')),
    settlement_id BIGINT      NOT NULL REFERENCES settlements (id) ON DELETE CASCADE,
    -- the earning released (earning.released only)
    earning_id    BIGINT      REFERENCES earnings (id) ON DELETE CASCADE,
    at            TIMESTAMPTZ NOT NULL,
    CHECK ((kind = 'earning.released') = (earning_id IS NOT NULL))
);
CREATE INDEX settlement_events_tx_idx ON settlement_events (tx_id, id);

CREATE FUNCTION settlement_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'settlement_events is append-only';
END $$;
CREATE TRIGGER settlement_events_no_update BEFORE UPDATE ON settlement_events
    FOR EACH ROW EXECUTE FUNCTION settlement_events_append_only();

-- The fan-out's cursor in this outbox (shares the delivery lease of the
-- payout_events cursor: one process fans out both).
INSERT INTO webhook_cursors (name, tx_id, event_id)
VALUES ('settlement_events', pg_current_xact_id(), 0);

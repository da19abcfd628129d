-- The payout fleet's source of truth. The database refuses bad rows by itself.

CREATE TABLE payees (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    gateway_account TEXT        NOT NULL CHECK (length(gateway_account) BETWEEN 1 AND 255),
    currency        TEXT        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status          TEXT        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE payouts (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payee_id            BIGINT      NOT NULL REFERENCES payees (id),
    amount              NUMERIC(28, 8) NOT NULL CHECK (amount > 0),
    currency            TEXT        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status              TEXT        NOT NULL DEFAULT 'pending' CHECK (status IN
                            ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'paid', 'failed', 'cancelled')),
    due_at              TIMESTAMPTZ NOT NULL,
    attempt             INTEGER     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    next_attempt_at     TIMESTAMPTZ,
    lease_owner         TEXT,
    lease_until         TIMESTAMPTZ,
    gateway_transfer_id TEXT,
    failure_code        TEXT,
    failure_message     TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    paid_at             TIMESTAMPTZ,
    -- attempts before this one do not count against max_attempts (an operator retry resets the budget;
    -- attempt itself never decreases, because it is the fencing token)
    retry_base          INTEGER     NOT NULL DEFAULT 0,
    CHECK (status <> 'retrying' OR next_attempt_at IS NOT NULL),
    CHECK (status NOT IN ('queued', 'processing') OR lease_until IS NOT NULL),
    CHECK (status <> 'paid' OR gateway_transfer_id IS NOT NULL)
);

-- The due scan: pending rows by due time, retrying rows by next attempt. Partial,
-- so they hold only the rows the producer looks for, however large the table.
CREATE INDEX payouts_pending_due_idx ON payouts (due_at) WHERE status = 'pending';
CREATE INDEX payouts_retrying_next_idx ON payouts (next_attempt_at) WHERE status = 'retrying';
-- The sweep of expired leases, and the window count.
CREATE INDEX payouts_leased_idx ON payouts (lease_until) WHERE status IN ('queued', 'processing');
-- Operator listings.
CREATE INDEX payouts_status_id_idx ON payouts (status, id);
CREATE INDEX payouts_payee_idx ON payouts (payee_id, id);

CREATE TABLE payout_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payout_id   BIGINT      NOT NULL REFERENCES payouts (id),
    from_status TEXT,
    to_status   TEXT        NOT NULL,
    actor       TEXT        NOT NULL,
    reason      TEXT,
    attempt     INTEGER,
    at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX payout_events_payout_idx ON payout_events (payout_id, id);

-- payout_events is append-only.
CREATE FUNCTION payout_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payout_events is append-only';
END $$;
CREATE TRIGGER payout_events_no_update BEFORE UPDATE OR DELETE ON payout_events
    FOR EACH ROW EXECUTE FUNCTION payout_events_append_only();

-- Only legal lifecycle moves (mirrors PayoutStatus::can_move_to).
CREATE FUNCTION payouts_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NOT (
        (OLD.status, NEW.status) IN (
            ('pending', 'queued'), ('pending', 'cancelled'),
            ('queued', 'processing'), ('queued', 'cancelled'),
            ('processing', 'paid'), ('processing', 'in_transit'), ('processing', 'retrying'),
            ('processing', 'failed'), ('processing', 'queued'),
            ('retrying', 'queued'), ('retrying', 'cancelled'),
            ('in_transit', 'paid'), ('in_transit', 'failed'),
            ('failed', 'queued'), ('failed', 'cancelled'))
    ) THEN
        RAISE EXCEPTION 'illegal payout transition % -> % for payout %', OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER payouts_transition BEFORE UPDATE OF status ON payouts
    FOR EACH ROW EXECUTE FUNCTION payouts_legal_transition();

-- Early payout requests (#17 item 3): a payee (through the platform's
-- backend, or an operator) asks to be paid now what is released. The
-- request settles the payee's released, unsettled earnings at once into one
-- payout (`settlements.requested`), without moving the payee's schedule:
-- a requested settlement is not a period of the schedule (the scheduled run
-- ignores it when it looks for the end of the last settled period), so
-- its period may overlap a scheduled one.
ALTER TABLE settlements ADD COLUMN requested BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE settlements DROP CONSTRAINT settlements_payee_id_currency_period_start_key;
-- The same name as the constraint it replaces: a duplicate scheduled period
-- is refused with the same error as before.
CREATE UNIQUE INDEX settlements_payee_id_currency_period_start_key
    ON settlements (payee_id, currency, period_start) WHERE NOT requested;

-- Who asked, with what, and what it made; the idempotency key is unique per
-- payee (a replay answers the same payout).
CREATE TABLE payout_requests (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payee_id        BIGINT      NOT NULL REFERENCES payees (id),
    idempotency_key TEXT        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    currency        TEXT        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- the gross of earnings asked for; NULL: everything released
    amount          NUMERIC     CHECK (amount > 0),
    method          TEXT        NOT NULL,
    settlement_id   BIGINT      NOT NULL UNIQUE REFERENCES settlements (id),
    payout_id       BIGINT      NOT NULL UNIQUE REFERENCES payouts (id),
    requested_by    TEXT        NOT NULL,
    source          TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    UNIQUE (payee_id, idempotency_key)
);

-- Earnings and settlement: what payees earned, per completed piece of work,
-- and the periods that turned it into payouts. See src/domain/policy.rs for the
-- computation and src/settlement.rs for the run.

-- A payee's terms. NULL schedule = the policy's default_schedule.
ALTER TABLE payees
    ADD COLUMN schedule      TEXT CHECK (schedule ~ '^(daily|manual|(weekly|biweekly):(mon|tue|wed|thu|fri|sat|sun)|monthly:([1-9]|1[0-9]|2[0-8]))$'),
    ADD COLUMN payout_method TEXT NOT NULL DEFAULT 'standard'
        CHECK (payout_method IN ('standard', 'instant', 'bank_transfer'));

-- Agreed deductions per period (booth rent, supply fee, ...), per payee and currency.
CREATE TABLE payee_deductions (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payee_id   BIGINT         NOT NULL REFERENCES payees (id),
    currency   TEXT           NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    label      TEXT           NOT NULL CHECK (length(label) BETWEEN 1 AND 100),
    amount     NUMERIC        NOT NULL CHECK (amount > 0 AND scale(amount) <= 3),
    created_at TIMESTAMPTZ    NOT NULL,
    UNIQUE (payee_id, currency, label)
);

-- One row per (payee, currency, period) that had earnings: the period's
-- totals, and either the payout it made or the balance it carried over.
-- Unique per period, so a second (or concurrent) run creates nothing new.
CREATE TABLE settlements (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payee_id            BIGINT         NOT NULL REFERENCES payees (id),
    currency            TEXT           NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    period_start        TIMESTAMPTZ    NOT NULL,
    period_end          TIMESTAMPTZ    NOT NULL CHECK (period_end > period_start),
    schedule            TEXT           NOT NULL,
    payout_method       TEXT           NOT NULL,
    services            INTEGER        NOT NULL CHECK (services >= 1),
    gross               NUMERIC        NOT NULL CHECK (gross > 0),
    payee_percent       NUMERIC        NOT NULL,
    bonus_percent       NUMERIC        NOT NULL,
    payee_share         NUMERIC        NOT NULL,
    platform_commission NUMERIC        NOT NULL,
    deductions          NUMERIC        NOT NULL CHECK (deductions >= 0),
    carried_in          NUMERIC        NOT NULL,
    carried_gross_in    NUMERIC        NOT NULL CHECK (carried_gross_in >= 0),
    fee                 NUMERIC        NOT NULL CHECK (fee >= 0),
    -- the sum of the lines: the payout's amount, or the balance carried over
    net                 NUMERIC        NOT NULL,
    outcome             TEXT           NOT NULL CHECK (outcome IN ('payout', 'below_minimum', 'shortfall')),
    payout_id           BIGINT UNIQUE REFERENCES payouts (id),
    -- the later settlement that took this one's balance over
    carried_into        BIGINT REFERENCES settlements (id),
    actor               TEXT           NOT NULL,
    created_at          TIMESTAMPTZ    NOT NULL,
    UNIQUE (payee_id, currency, period_start),
    -- money is conserved, to the last minor unit
    CHECK (gross + carried_in = net + platform_commission + fee + deductions),
    CHECK ((outcome = 'payout') = (payout_id IS NOT NULL)),
    CHECK (outcome <> 'payout' OR (net > 0 AND carried_into IS NULL)),
    CHECK (outcome = 'payout' OR fee = 0)
);
CREATE INDEX settlements_open_carry_idx ON settlements (payee_id, currency)
    WHERE outcome <> 'payout' AND carried_into IS NULL;
CREATE INDEX settlements_latest_idx ON settlements (payee_id, currency, period_end);

-- What a payee earned: one row per completed piece of work.
CREATE TABLE earnings (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payee_id      BIGINT         NOT NULL REFERENCES payees (id),
    source        TEXT           NOT NULL CHECK (length(source) BETWEEN 1 AND 100),
    external_ref  TEXT           NOT NULL CHECK (length(external_ref) BETWEEN 1 AND 255),
    -- exact, at the currency's minor unit (no ISO 4217 currency has more than 3 decimals)
    gross         NUMERIC        NOT NULL CHECK (gross > 0 AND scale(gross) <= 3),
    currency      TEXT           NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    completed_at  TIMESTAMPTZ    NOT NULL,
    release_at    TIMESTAMPTZ    NOT NULL CHECK (release_at >= completed_at),
    -- the period that closed it (once, ever) ...
    settlement_id BIGINT REFERENCES settlements (id),
    -- ... and the payout that paid it (later than that when it was carried over)
    payout_id     BIGINT REFERENCES payouts (id),
    created_at    TIMESTAMPTZ    NOT NULL,
    UNIQUE (source, external_ref),
    CHECK (payout_id IS NULL OR settlement_id IS NOT NULL)
);
-- The settlement scan: released, unsettled earnings.
CREATE INDEX earnings_unsettled_idx ON earnings (payee_id, currency, release_at)
    WHERE settlement_id IS NULL;
CREATE INDEX earnings_settlement_idx ON earnings (settlement_id);
CREATE INDEX earnings_payout_idx ON earnings (payout_id);

-- A settled earning is never re-settled, moved or changed.
CREATE FUNCTION earnings_settle_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.settlement_id IS NOT NULL AND NEW.settlement_id IS DISTINCT FROM OLD.settlement_id THEN
        RAISE EXCEPTION 'earning % is already settled (settlement %)', OLD.id, OLD.settlement_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.payout_id IS NOT NULL AND NEW.payout_id IS DISTINCT FROM OLD.payout_id THEN
        RAISE EXCEPTION 'earning % is already paid (payout %)', OLD.id, OLD.payout_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF (NEW.payee_id, NEW.gross, NEW.currency, NEW.source, NEW.external_ref)
        IS DISTINCT FROM (OLD.payee_id, OLD.gross, OLD.currency, OLD.source, OLD.external_ref) THEN
        RAISE EXCEPTION 'earning % cannot be changed', OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER earnings_settle_once BEFORE UPDATE ON earnings
    FOR EACH ROW EXECUTE FUNCTION earnings_settle_once();

-- The line items of a settlement (and of its payout): each earning,
-- commission, bonus, each deduction, carried balances, fee. They sum to the
-- settlement's net, which is the payout's amount.
CREATE TABLE payout_lines (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    settlement_id BIGINT         NOT NULL REFERENCES settlements (id),
    payout_id     BIGINT REFERENCES payouts (id),
    position      INTEGER        NOT NULL,
    kind          TEXT           NOT NULL CHECK (kind IN
                      ('earning', 'commission', 'volume_bonus', 'deduction', 'carried_in', 'fee')),
    description   TEXT           NOT NULL,
    amount        NUMERIC        NOT NULL,
    earning_id    BIGINT REFERENCES earnings (id),
    carried_from  BIGINT REFERENCES settlements (id),
    UNIQUE (settlement_id, position),
    CHECK ((kind = 'earning') = (earning_id IS NOT NULL)),
    CHECK ((kind = 'carried_in') = (carried_from IS NOT NULL))
);
CREATE INDEX payout_lines_payout_idx ON payout_lines (payout_id);

-- Policy the product documents ask for, and a record of who posted each earning.

-- A custom schedule: every N days from an anchor date (every:<days>:<YYYY-MM-DD>).
ALTER TABLE payees DROP CONSTRAINT payees_schedule_check;
ALTER TABLE payees ADD CONSTRAINT payees_schedule_check CHECK (schedule ~
    '^(daily|manual|(weekly|biweekly):(mon|tue|wed|thu|fri|sat|sun)|monthly:([1-9]|1[0-9]|2[0-8])|every:[1-9][0-9]{0,2}:[0-9]{4}-[0-9]{2}-[0-9]{2})$');

-- A payee's own minimum payout per currency (the barber scheduler's
-- minimum_payout_amount), at or above the policy's minimum for it (checked
-- by the application, which knows the policy).
CREATE TABLE payee_minimums (
    payee_id   BIGINT      NOT NULL REFERENCES payees (id),
    currency   TEXT        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount     NUMERIC     NOT NULL CHECK (amount > 0 AND scale(amount) <= 3),
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (payee_id, currency)
);

-- Who posted each earning: the admin caller's actor (operator:NAME), or the
-- CLI's. Rows from before this column say 'unknown'.
ALTER TABLE earnings ADD COLUMN posted_by TEXT NOT NULL DEFAULT 'unknown'
    CHECK (length(posted_by) BETWEEN 1 AND 255);
ALTER TABLE earnings ALTER COLUMN posted_by DROP DEFAULT;

-- A payout whose payee cannot receive money yet (Stripe onboarding not
-- finished) is `held` with its reason, not failed: it is not a dead letter,
-- no attempt budget is spent on it, and the in-transit poll releases it to
-- `queued` once the account is ready. An operator may enqueue or cancel it.
ALTER TABLE payouts DROP CONSTRAINT payouts_status_check;
ALTER TABLE payouts ADD CONSTRAINT payouts_status_check CHECK (status IN
    ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'paid', 'failed', 'cancelled', 'held'));

CREATE INDEX payouts_held_idx ON payouts (payee_id) WHERE status = 'held';

-- The lifecycle of 20261123000004, plus processing -> held, held -> queued | cancelled.
CREATE OR REPLACE FUNCTION payouts_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NOT (
        (OLD.status, NEW.status) IN (
            ('pending', 'queued'), ('pending', 'cancelled'),
            ('queued', 'processing'), ('queued', 'cancelled'),
            ('processing', 'paid'), ('processing', 'in_transit'), ('processing', 'retrying'),
            ('processing', 'failed'), ('processing', 'queued'), ('processing', 'held'),
            ('retrying', 'queued'), ('retrying', 'cancelled'),
            ('in_transit', 'paid'), ('in_transit', 'failed'),
            ('paid', 'failed'),
            ('failed', 'queued'), ('failed', 'cancelled'),
            ('held', 'queued'), ('held', 'cancelled'))
        -- coalesce: an unset setting is NULL, and NOT (... OR NULL) would let anything through
        OR (coalesce(current_setting('payouts.reconcile', true), '') = 'on'
            AND NEW.status IN ('paid', 'in_transit')
            AND OLD.status IN ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'failed', 'cancelled', 'held'))
    ) THEN
        RAISE EXCEPTION 'illegal payout transition % -> % for payout %', OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

-- Reconciliation may put a payout on hold when the balance it carries was
-- returned from a settlement payout (cancelled) that the gateway paid after
-- all: paying it would pay that money twice. Only a payout no worker holds
-- and that is not finished (pending, queued, retrying), only inside a
-- reconciling transaction (SET LOCAL payouts.reconcile = 'on'). An operator
-- releases it (held -> queued) or cancels it.
--
-- The lifecycle of 20261123000007, plus that move.
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
        OR (coalesce(current_setting('payouts.reconcile', true), '') = 'on'
            AND NEW.status = 'held'
            AND OLD.status IN ('pending', 'queued', 'retrying'))
    ) THEN
        RAISE EXCEPTION 'illegal payout transition % -> % for payout %', OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

-- A returned balance the gateway paid after all. When reconciliation finds
-- the payout of a `returned` settlement paid at the gateway (cancelled after
-- an unanswered attempt that did move the money), that balance must not be
-- paid again: the settlement is flagged, and so is every settlement its
-- balance was (or will be) carried into; a payout not yet sent that carries
-- it is put on hold (`failure_code = 'returned_paid_at_gateway'`) for an
-- operator, whatever code path carries it (the trigger below).
ALTER TABLE settlements ADD COLUMN paid_at_gateway_at TIMESTAMPTZ;

-- Flags settlement `sid` and follows its balance: holds the payout of a
-- `payout` settlement when it is pending, queued or retrying, then goes on
-- to the settlement that carried the balance in. One row per payout met:
-- its status after, and whether it was held here.
CREATE FUNCTION settlements_flag_paid_at_gateway(sid BIGINT, at TIMESTAMPTZ, who TEXT, why TEXT)
RETURNS TABLE (carrier BIGINT, carrier_status TEXT, was_held BOOLEAN) LANGUAGE plpgsql AS $$
DECLARE
    s settlements%ROWTYPE;
    st TEXT;
    prev TEXT;
BEGIN
    SELECT * INTO s FROM settlements WHERE settlements.id = sid FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF s.paid_at_gateway_at IS NULL THEN
        UPDATE settlements SET paid_at_gateway_at = at WHERE settlements.id = sid;
    END IF;
    IF s.outcome = 'payout' THEN
        SELECT p.status INTO st FROM payouts p WHERE p.id = s.payout_id FOR UPDATE;
        IF st IN ('pending', 'queued', 'retrying') THEN
            prev := coalesce(current_setting('payouts.reconcile', true), '');
            PERFORM set_config('payouts.reconcile', 'on', true);
            UPDATE payouts p SET status = 'held', failure_code = 'returned_paid_at_gateway',
                   failure_message = why, lease_owner = NULL, lease_until = NULL,
                   next_attempt_at = NULL, updated_at = at
             WHERE p.id = s.payout_id;
            PERFORM set_config('payouts.reconcile', prev, true);
            INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
            SELECT p.id, st, 'held', who, why, p.attempt, at FROM payouts p WHERE p.id = s.payout_id;
            carrier := s.payout_id; carrier_status := 'held'; was_held := true;
        ELSE
            carrier := s.payout_id; carrier_status := st; was_held := false;
        END IF;
        RETURN NEXT;
    END IF;
    IF s.carried_into IS NOT NULL THEN
        RETURN QUERY SELECT * FROM settlements_flag_paid_at_gateway(s.carried_into, at, who, why);
    END IF;
END $$;

-- A flagged balance carried into a later settlement (by settlement, in any
-- code path) flags that one too and holds its payout.
CREATE FUNCTION settlements_carry_paid_at_gateway() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM settlements_flag_paid_at_gateway(NEW.carried_into, now(), 'system:reconcile',
        format('held: carries the balance of settlement %s, whose payout the gateway paid after all '
               '(returned_paid_at_gateway); enqueue it only once that money is accounted for', NEW.id));
    RETURN NULL;
END $$;
CREATE TRIGGER settlements_carry_paid_at_gateway AFTER UPDATE OF carried_into ON settlements
    FOR EACH ROW WHEN (NEW.paid_at_gateway_at IS NOT NULL AND OLD.carried_into IS NULL
                       AND NEW.carried_into IS NOT NULL)
    EXECUTE FUNCTION settlements_carry_paid_at_gateway();

-- #17, the platform's side of the fleet.
--
-- 1. An `integration` role for the platform's backend: it posts earnings,
--    reads payees, balances, earnings and payouts and asks for payouts; it
--    never retries, cancels or bulk-acts (src/admin/auth.rs checks each
--    action against the role's permissions, not an order of roles).
ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_role_check;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_role_check
    CHECK (role IN ('viewer', 'operator', 'admin', 'integration'));

-- 7. Where a payout was sent: the payee's gateway account at its first
--    claim, kept for every later attempt (the same idempotency key must go
--    to the same account), so a change of the payee's account applies to
--    payouts not yet sent only. NULL: never sent.
ALTER TABLE payouts ADD COLUMN destination TEXT;

-- 7. A suspended payee's payout that was queued but not yet claimed goes
--    back to `pending` (the claim, or the suspension itself, moves it) and
--    waits: the due scan skips suspended payees until they are resumed.
--    The lifecycle of 20261126000070, plus queued -> pending.
CREATE OR REPLACE FUNCTION payouts_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NOT (
        (OLD.status, NEW.status) IN (
            ('pending', 'queued'), ('pending', 'cancelled'),
            ('queued', 'processing'), ('queued', 'cancelled'), ('queued', 'pending'),
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

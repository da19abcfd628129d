-- Reconciliation may record what the gateway says happened: a payout the
-- gateway paid (or accepted) is recorded paid (or in_transit) whatever the
-- database thought. Only inside a transaction that says it is reconciling
-- (SET LOCAL payouts.reconcile = 'on'); everything else keeps the lifecycle.
CREATE OR REPLACE FUNCTION payouts_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
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
        -- coalesce: an unset setting is NULL, and NOT (... OR NULL) would let anything through
        OR (coalesce(current_setting('payouts.reconcile', true), '') = 'on'
            AND NEW.status IN ('paid', 'in_transit')
            AND OLD.status IN ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'failed', 'cancelled'))
    ) THEN
        RAISE EXCEPTION 'illegal payout transition % -> % for payout %', OLD.status, NEW.status, OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

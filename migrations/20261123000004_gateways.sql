-- Real gateways (Stripe Connect, a platform's release-funds API): webhook
-- replay protection, the look-up of a payout by the gateway's transfer id,
-- and one new lifecycle move: paid -> failed, when the gateway reports a
-- failure after the payout was recorded paid (a reversed Stripe transfer, a
-- bank payout that failed days later). It is recorded with an event and an
-- alert, never silently.

-- Every webhook event handled, once: a repeated event id changes nothing.
CREATE TABLE webhook_events (
    source      TEXT        NOT NULL CHECK (source IN ('gateway', 'stripe')),
    event_id    TEXT        NOT NULL CHECK (length(event_id) BETWEEN 1 AND 255),
    event_type  TEXT        NOT NULL,
    payout_id   BIGINT      REFERENCES payouts (id),
    -- what it did: paid, failed, reversed_after_paid, ignored, unmatched, ...
    outcome     TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX webhook_events_payout_idx ON webhook_events (payout_id) WHERE payout_id IS NOT NULL;

-- Webhooks name the gateway's transfer (or payout) id.
CREATE INDEX payouts_gateway_transfer_idx ON payouts (gateway_transfer_id)
    WHERE gateway_transfer_id IS NOT NULL;

-- The lifecycle of 20261123000002, plus ('paid', 'failed').
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
            ('paid', 'failed'),
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

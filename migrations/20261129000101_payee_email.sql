-- Email to payees (README "Email to payees"): a payee's address (optional;
-- no mail for a payee without one), and mail messages in the delivery table
-- of outbound webhooks, so mail has the same lease, retry schedule, delivery
-- log and replay as webhooks. A mail message has no endpoint; its recipient
-- is the payee's address when the event was fanned out.
ALTER TABLE payees ADD COLUMN email TEXT
    CHECK (email IS NULL OR (length(email) BETWEEN 3 AND 254 AND email ~ '^[^@[:space:]]+@[^@[:space:]]+$'));

ALTER TABLE webhook_deliveries
    ALTER COLUMN endpoint_id DROP NOT NULL,
    ADD COLUMN channel   TEXT NOT NULL DEFAULT 'webhook' CHECK (channel IN ('webhook', 'email')),
    ADD COLUMN payee_id  BIGINT REFERENCES payees (id) ON DELETE CASCADE,
    ADD COLUMN recipient TEXT,
    ADD COLUMN subject   TEXT,
    ADD CONSTRAINT webhook_deliveries_channel_fields CHECK (
        (channel = 'webhook' AND endpoint_id IS NOT NULL AND recipient IS NULL)
        OR (channel = 'email' AND endpoint_id IS NULL AND payee_id IS NOT NULL
            AND recipient IS NOT NULL AND subject IS NOT NULL));
-- One mail per event and payee, whatever happens.
CREATE UNIQUE INDEX webhook_deliveries_mail_once ON webhook_deliveries (payee_id, event_id)
    WHERE channel = 'email';

-- The booking worker's release per booking (#17 item 6): a `per_earning`
-- schedule (one payout per earning, due when it is released), and the
-- external reference of the one earning such a payout pays, sent to the
-- gateway (the release-funds API's `bookingId`).
ALTER TABLE payees DROP CONSTRAINT payees_schedule_check;
ALTER TABLE payees ADD CONSTRAINT payees_schedule_check CHECK (schedule ~
    '^(daily|manual|per_earning|(weekly|biweekly):(mon|tue|wed|thu|fri|sat|sun)|monthly:([1-9]|1[0-9]|2[0-8])|every:[1-9][0-9]{0,2}:[0-9]{4}-[0-9]{2}-[0-9]{2})$');

-- A nullable column without a default: no rewrite. The check is added NOT
-- VALID and validated apart, so the exclusive lock is not held over a scan
-- of a large payouts table.
ALTER TABLE payouts ADD COLUMN external_ref TEXT;
ALTER TABLE payouts ADD CONSTRAINT payouts_external_ref_check
    CHECK (external_ref IS NULL OR length(external_ref) BETWEEN 1 AND 255) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_external_ref_check;

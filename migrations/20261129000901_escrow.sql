-- Escrow actions (#17 item 5): an earning can be voided before it is
-- settled (with who, when and why); a voided earning is never settled, paid
-- or counted in a balance, and its reference stays taken, so the same work
-- posted again is not recorded anew. Released early is a change of
-- release_at (no column). Both are in audit_log with their actor.
--
-- Nullable columns without defaults: no rewrite. The check is added NOT
-- VALID and validated apart (no exclusive lock over a scan). The partial
-- index earnings_unsettled_idx (settlement_id IS NULL) still serves every
-- read of open earnings, which now also say voided_at IS NULL.
ALTER TABLE earnings
    ADD COLUMN voided_at   TIMESTAMPTZ,
    ADD COLUMN voided_by   TEXT,
    ADD COLUMN void_reason TEXT;
ALTER TABLE earnings ADD CONSTRAINT earnings_void_check CHECK (
    (voided_at IS NULL AND voided_by IS NULL AND void_reason IS NULL)
    OR (voided_at IS NOT NULL AND settlement_id IS NULL AND payout_id IS NULL
        AND length(voided_by) BETWEEN 1 AND 255
        AND length(void_reason) BETWEEN 1 AND 500)) NOT VALID;
ALTER TABLE earnings VALIDATE CONSTRAINT earnings_void_check;

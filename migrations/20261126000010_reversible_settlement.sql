-- Settlement that is a function of the earnings, and reversible.
--
-- 1. A settlement payout that is cancelled, or reversed after it was paid
--    (paid -> failed), returns its money to the payee's balance: in the
--    same transaction as the status change (whatever code path makes it:
--    admin API, CLI, webhooks, sync, reconciliation), its settlement becomes
--    `returned`, an open balance of `net + fee` (the fee is refunded: it is
--    charged again when the balance is paid out), with a line saying why and
--    an event on the payout; its earnings are unpaid again. The next period
--    of the payee carries the balance in and pays it.
-- 2. A payout whose money was returned is never retried (that would pay the
--    same earnings twice): failed -> queued is refused for it.
-- 3. A period may hold only returned balances (no new earnings), so a
--    returned balance is paid in the next period even when the payee earned
--    nothing new.

ALTER TABLE settlements ADD COLUMN returned_at TIMESTAMPTZ;

ALTER TABLE settlements DROP CONSTRAINT settlements_outcome_check;
ALTER TABLE settlements ADD CONSTRAINT settlements_outcome_check
    CHECK (outcome IN ('payout', 'below_minimum', 'shortfall', 'returned'));
ALTER TABLE settlements DROP CONSTRAINT settlements_check2;
ALTER TABLE settlements ADD CONSTRAINT settlements_payout_check
    CHECK ((outcome IN ('payout', 'returned')) = (payout_id IS NOT NULL));
ALTER TABLE settlements ADD CONSTRAINT settlements_returned_check
    CHECK ((outcome = 'returned') = (returned_at IS NOT NULL));
ALTER TABLE settlements DROP CONSTRAINT settlements_services_check;
ALTER TABLE settlements ADD CONSTRAINT settlements_services_check CHECK (services >= 0);
ALTER TABLE settlements DROP CONSTRAINT settlements_gross_check;
ALTER TABLE settlements ADD CONSTRAINT settlements_gross_check
    CHECK (gross >= 0 AND (services > 0) = (gross > 0));

-- Balances returned and not yet carried on, by the time they were returned.
CREATE INDEX settlements_returned_open_idx ON settlements (payee_id, currency, returned_at)
    WHERE outcome = 'returned' AND carried_into IS NULL;

ALTER TABLE payout_lines DROP CONSTRAINT payout_lines_kind_check;
ALTER TABLE payout_lines ADD CONSTRAINT payout_lines_kind_check CHECK (kind IN
    ('earning', 'commission', 'volume_bonus', 'deduction', 'carried_in', 'fee', 'returned'));

-- A settled earning is never re-settled, moved or changed; its payout is
-- cleared only when that payout's money was returned to the balance.
CREATE OR REPLACE FUNCTION earnings_settle_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.settlement_id IS NOT NULL AND NEW.settlement_id IS DISTINCT FROM OLD.settlement_id THEN
        RAISE EXCEPTION 'earning % is already settled (settlement %)', OLD.id, OLD.settlement_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.payout_id IS NOT NULL AND NEW.payout_id IS DISTINCT FROM OLD.payout_id
       AND NOT (NEW.payout_id IS NULL AND EXISTS (
           SELECT 1 FROM settlements s WHERE s.payout_id = OLD.payout_id AND s.outcome = 'returned')) THEN
        RAISE EXCEPTION 'earning % is already paid (payout %)', OLD.id, OLD.payout_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF (NEW.payee_id, NEW.gross, NEW.currency, NEW.source, NEW.external_ref)
        IS DISTINCT FROM (OLD.payee_id, OLD.gross, OLD.currency, OLD.source, OLD.external_ref) THEN
        RAISE EXCEPTION 'earning % cannot be changed', OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

-- Refuses to move a payout whose money went back to the balance anywhere but
-- to cancelled (an operator may still close a reversed one).
CREATE FUNCTION payouts_returned_stay() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sid BIGINT;
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status AND NEW.status IN ('queued', 'processing', 'retrying', 'pending') THEN
        SELECT id INTO sid FROM settlements WHERE payout_id = OLD.id AND outcome = 'returned';
        IF FOUND THEN
            RAISE EXCEPTION 'payout % was returned to the payee''s balance (settlement %): it cannot be retried; the balance is paid in the payee''s next period', OLD.id, sid
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER payouts_returned_stay BEFORE UPDATE OF status ON payouts
    FOR EACH ROW EXECUTE FUNCTION payouts_returned_stay();

-- Cancelled, or reversed after it was paid: the money is owed again.
CREATE FUNCTION payouts_return_to_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s settlements%ROWTYPE;
    owed NUMERIC;
    why TEXT;
BEGIN
    IF NOT (NEW.status = 'cancelled' OR (OLD.status = 'paid' AND NEW.status = 'failed')) THEN
        RETURN NULL;
    END IF;
    SELECT * INTO s FROM settlements WHERE payout_id = NEW.id AND outcome = 'payout' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    owed := s.net + s.fee;
    why := CASE WHEN NEW.status = 'cancelled' THEN 'cancelled' ELSE 'reversed after it was paid' END;
    UPDATE settlements SET outcome = 'returned', net = owed, fee = 0,
           returned_at = coalesce(NEW.updated_at, now())
     WHERE id = s.id;
    INSERT INTO payout_lines (settlement_id, payout_id, position, kind, description, amount)
    SELECT s.id, NEW.id, coalesce(max(position), 0) + 1, 'returned',
           format('payout %s %s: %s %s back in the balance (fee %s refunded), paid in the next period',
                  NEW.id, why, owed, s.currency, s.fee),
           s.fee
      FROM payout_lines WHERE settlement_id = s.id;
    UPDATE earnings SET payout_id = NULL WHERE payout_id = NEW.id;
    INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
    VALUES (NEW.id, NEW.status, NEW.status, 'system:settlement',
            format('%s %s returned to the payee''s balance (settlement %s): payout %s',
                   owed, s.currency, s.id, why),
            NEW.attempt, coalesce(NEW.updated_at, now()));
    RETURN NULL;
END $$;
CREATE TRIGGER payouts_return_to_balance AFTER UPDATE OF status ON payouts
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION payouts_return_to_balance();

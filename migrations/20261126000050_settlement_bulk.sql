-- Month-end settlement, set-based (src/settlement.rs settles 1,000 payees
-- per transaction).
--
-- 1. The settle-once trigger runs its function only when a row could break
--    a rule: an earning already settled or paid, or its identity changed.
--    Settling an unsettled earning (a million rows at month-end) skips the
--    PL/pgSQL call; what is refused is exactly what was refused before.
-- 2. The balances a settlement carried in, followed back (`carried_into`),
--    by index: marking the earnings of carried balances paid walks them.

DROP TRIGGER earnings_settle_once ON earnings;
CREATE TRIGGER earnings_settle_once BEFORE UPDATE ON earnings
    FOR EACH ROW
    WHEN (OLD.settlement_id IS NOT NULL OR OLD.payout_id IS NOT NULL
          OR (NEW.payee_id, NEW.gross, NEW.currency, NEW.source, NEW.external_ref)
             IS DISTINCT FROM (OLD.payee_id, OLD.gross, OLD.currency, OLD.source, OLD.external_ref))
    EXECUTE FUNCTION earnings_settle_once();

CREATE INDEX settlements_carried_into_idx ON settlements (carried_into) WHERE carried_into IS NOT NULL;

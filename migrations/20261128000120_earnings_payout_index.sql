-- Month-end speed (issue 13, item 4): one index fewer to keep up per
-- settled earning.
--
-- `earnings_payout_idx` served one statement: the return trigger clearing
-- the payout of the earnings a cancelled or reversed payout paid. Those are
-- the earnings of the settlement that made it and of the balances carried
-- into it (in turn), which the trigger now finds from the settlement by
-- `carried_into` and `earnings_settlement_idx`; settling a million earnings
-- no longer adds a million entries to it.

CREATE OR REPLACE FUNCTION payouts_return_to_balance() RETURNS trigger LANGUAGE plpgsql AS $$
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
    INSERT INTO settlement_lines (settlement_id, payout_id, position, kind, description, amount)
    SELECT s.id, NEW.id, coalesce(max(position), 0) + 1, 'returned',
           format('payout %s %s: %s %s back in the balance (fee %s refunded), paid in the next period',
                  NEW.id, why, owed, s.currency, s.fee),
           s.fee
      FROM payout_lines WHERE settlement_id = s.id;
    -- What it paid: its settlement's earnings and those of the balances
    -- carried into it, in turn (earnings::mark_paid_through_carry).
    WITH RECURSIVE chain AS (
        SELECT s.id
        UNION
        SELECT c.id FROM settlements c JOIN chain ON c.carried_into = chain.id)
    UPDATE earnings SET payout_id = NULL
     WHERE settlement_id IN (SELECT id FROM chain) AND payout_id = NEW.id;
    INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
    VALUES (NEW.id, NEW.status, NEW.status, 'system:settlement',
            format('%s %s returned to the payee''s balance (settlement %s): payout %s',
                   owed, s.currency, s.id, why),
            NEW.attempt, coalesce(NEW.updated_at, now()));
    RETURN NULL;
END $$;

DROP INDEX earnings_payout_idx;

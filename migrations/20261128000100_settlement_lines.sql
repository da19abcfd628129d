-- Month-end speed (issue 13, item 4): an earning's line is not written twice.
--
-- A settlement's earning lines repeated what the earnings themselves hold
-- (`source/external_ref`, gross, the settlement and its payout): at month-end
-- about a million rows, each with its heap tuple, three index entries and
-- four foreign-key checks, on top of marking the same million earnings
-- settled. Now the earning keeps its line's position (`line_position`, set
-- in the same UPDATE that settles it) and only the other lines (commission,
-- bonus, deductions, carried balances, fee, remainder, returned) are stored,
-- in `settlement_lines`. `payout_lines` is a view with the same columns as
-- the table it replaces, so every reader (status, the payout API, the
-- dashboard, the return trigger) sees the same lines. An earning line's `id`
-- is its earning's id, negated (stored lines keep their positive ids).

ALTER TABLE payout_lines RENAME TO settlement_lines;

ALTER TABLE earnings ADD COLUMN line_position INTEGER;
ALTER TABLE earnings ADD CONSTRAINT earnings_line_position_check
    CHECK (line_position IS NULL OR (settlement_id IS NOT NULL AND line_position > 0));

UPDATE earnings e SET line_position = l.position
  FROM settlement_lines l
 WHERE l.earning_id = e.id AND l.kind = 'earning';
DELETE FROM settlement_lines WHERE kind = 'earning';

ALTER TABLE settlement_lines DROP COLUMN earning_id;
ALTER TABLE settlement_lines ADD CONSTRAINT settlement_lines_not_earning_check
    CHECK (kind <> 'earning');

CREATE VIEW payout_lines AS
SELECT l.id, l.settlement_id, l.payout_id, l.position, l.kind, l.description, l.amount,
       NULL::bigint AS earning_id, l.carried_from
  FROM settlement_lines l
UNION ALL
SELECT -e.id, e.settlement_id, s.payout_id, e.line_position, 'earning'::text,
       e.source || '/' || e.external_ref, e.gross, e.id, NULL::bigint
  FROM earnings e JOIN settlements s ON s.id = e.settlement_id
 WHERE e.line_position IS NOT NULL;

COMMENT ON VIEW payout_lines IS
    'A settlement''s line items: settlement_lines, plus one earning line per settled earning (earnings.line_position; id = -earning id).';

-- A settled earning's line position never changes either.
CREATE OR REPLACE FUNCTION earnings_settle_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.settlement_id IS NOT NULL AND NEW.settlement_id IS DISTINCT FROM OLD.settlement_id THEN
        RAISE EXCEPTION 'earning % is already settled (settlement %)', OLD.id, OLD.settlement_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF OLD.line_position IS NOT NULL AND NEW.line_position IS DISTINCT FROM OLD.line_position THEN
        RAISE EXCEPTION 'earning % is already settled (line %)', OLD.id, OLD.line_position
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

-- The return trigger adds its line to the stored lines, after every line
-- of the settlement (earning lines included).
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
    UPDATE earnings SET payout_id = NULL WHERE payout_id = NEW.id;
    INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
    VALUES (NEW.id, NEW.status, NEW.status, 'system:settlement',
            format('%s %s returned to the payee''s balance (settlement %s): payout %s',
                   owed, s.currency, s.id, why),
            NEW.attempt, coalesce(NEW.updated_at, now()));
    RETURN NULL;
END $$;

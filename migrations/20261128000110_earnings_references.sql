-- Month-end speed (issue 13, item 4): an earning's settlement and payout
-- are checked once per statement, not once per row.
--
-- Settling marks about a million earnings at month-end; the foreign keys
-- `settlement_id` and `payout_id` checked each row with its own lookup and
-- row lock (two per earning, a third of the UPDATE's time). The same rule
-- now holds through triggers: every statement that sets them is checked
-- with one join over the rows it changed (an UPDATE: its transition table;
-- an INSERT, which records earnings unsettled: only a row that names one),
-- and a settlement or payout that an earning names cannot be deleted. Ids
-- never change, and TRUNCATE of either table is still refused without
-- CASCADE (other foreign keys reference both).

ALTER TABLE earnings DROP CONSTRAINT earnings_settlement_id_fkey;
ALTER TABLE earnings DROP CONSTRAINT earnings_payout_id_fkey;

CREATE FUNCTION earnings_references_exist() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad RECORD;
BEGIN
    SELECT n.id, n.settlement_id, n.payout_id INTO bad FROM earnings_new n
     WHERE (n.settlement_id IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.id = n.settlement_id))
        OR (n.payout_id IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM payouts p WHERE p.id = n.payout_id))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'earning % names settlement % and payout %, which do not both exist',
            bad.id, bad.settlement_id, bad.payout_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER earnings_references_update AFTER UPDATE ON earnings
    REFERENCING NEW TABLE AS earnings_new
    FOR EACH STATEMENT EXECUTE FUNCTION earnings_references_exist();

CREATE FUNCTION earnings_reference_exists() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.settlement_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM settlements WHERE id = NEW.settlement_id))
       OR (NEW.payout_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM payouts WHERE id = NEW.payout_id)) THEN
        RAISE EXCEPTION 'earning % names settlement % and payout %, which do not both exist',
            NEW.id, NEW.settlement_id, NEW.payout_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER earnings_references_insert AFTER INSERT ON earnings
    FOR EACH ROW WHEN (NEW.settlement_id IS NOT NULL OR NEW.payout_id IS NOT NULL)
    EXECUTE FUNCTION earnings_reference_exists();

CREATE FUNCTION earnings_referenced_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'settlements' AND EXISTS (SELECT 1 FROM earnings WHERE settlement_id = OLD.id)
       OR TG_TABLE_NAME = 'payouts' AND EXISTS (SELECT 1 FROM earnings WHERE payout_id = OLD.id) THEN
        RAISE EXCEPTION '% % is referenced by earnings', TG_TABLE_NAME, OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;

CREATE TRIGGER settlements_earnings_stay BEFORE DELETE ON settlements
    FOR EACH ROW EXECUTE FUNCTION earnings_referenced_stay();
CREATE TRIGGER payouts_earnings_stay BEFORE DELETE ON payouts
    FOR EACH ROW EXECUTE FUNCTION earnings_referenced_stay();

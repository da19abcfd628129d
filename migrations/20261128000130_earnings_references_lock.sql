-- The delete guard of migration 20261128000110 ran a plain EXISTS: a
-- transaction that set an earning's settlement_id or payout_id to a row
-- being deleted at the same moment could commit alongside the delete (neither
-- saw the other's uncommitted change), leaving the earning naming a row that
-- is gone. A foreign key prevents this with a KEY SHARE lock per referencing
-- row; settlement avoids those per-row locks on purpose. Instead, a delete of
-- a settlement or payout (rare: never on the payout path) takes earnings in
-- SHARE mode first: it waits for every transaction that wrote earnings to
-- end, and holds new writers off until it ends, so the EXISTS below (a fresh
-- snapshot, after the lock) sees every committed reference.
CREATE OR REPLACE FUNCTION earnings_referenced_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE earnings IN SHARE MODE;
    IF TG_TABLE_NAME = 'settlements' AND EXISTS (SELECT 1 FROM earnings WHERE settlement_id = OLD.id)
       OR TG_TABLE_NAME = 'payouts' AND EXISTS (SELECT 1 FROM earnings WHERE payout_id = OLD.id) THEN
        RAISE EXCEPTION '% % is referenced by earnings', TG_TABLE_NAME, OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END $$;

-- main's payouts indexes and triggers before the Postgres diet (#21): for before/after
-- measurements on one database (psql -f) or as TEMPLATE_SQL of scripts/pg-writes.sh.
-- back to main's indexes
DROP INDEX payouts_status_id_idx;
CREATE INDEX payouts_status_id_idx ON payouts (status, id);
CREATE INDEX payouts_leased_idx ON payouts (lease_until) WHERE status IN ('queued', 'processing');
-- back to main's triggers
DROP TRIGGER payouts_return_to_balance ON payouts;
CREATE TRIGGER payouts_return_to_balance AFTER UPDATE OF status ON payouts
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION payouts_return_to_balance();
DROP TRIGGER payouts_returned_stay ON payouts;
CREATE TRIGGER payouts_returned_stay BEFORE UPDATE OF status ON payouts
    FOR EACH ROW EXECUTE FUNCTION payouts_returned_stay();

-- The Postgres diet (#21 item 1), triggers: the hot path (pending -> queued
-- -> processing -> paid) calls only the trigger functions that can act on
-- it. Both functions are unchanged; their triggers' WHEN clauses now say
-- when they can do anything, so no call (and, for the AFTER trigger, no
-- queued trigger event) is made otherwise.
--
-- payouts_return_to_balance returns at once unless the payout became
-- cancelled or went from paid to failed: that is now its WHEN clause (it
-- fired on every status change, three times per payout).
DROP TRIGGER payouts_return_to_balance ON payouts;
CREATE TRIGGER payouts_return_to_balance AFTER UPDATE OF status ON payouts
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                       AND (NEW.status = 'cancelled' OR (OLD.status = 'paid' AND NEW.status = 'failed')))
    EXECUTE FUNCTION payouts_return_to_balance();

-- payouts_returned_stay refuses to move a payout whose settlement was
-- returned to the balance back into pending, queued, processing or
-- retrying; it looked the settlement up on every such move (twice per
-- payout). A settlement is returned only as its payout becomes cancelled or
-- failed (payouts_return_to_balance), and from then on this trigger keeps
-- the payout out of those four statuses: a payout already in one of them
-- has no returned settlement, so only a move from another status is
-- checked.
DROP TRIGGER payouts_returned_stay ON payouts;
CREATE TRIGGER payouts_returned_stay BEFORE UPDATE OF status ON payouts
    FOR EACH ROW WHEN (NEW.status IN ('queued', 'processing', 'retrying', 'pending')
                       AND OLD.status NOT IN ('pending', 'queued', 'processing', 'retrying'))
    EXECUTE FUNCTION payouts_returned_stay();

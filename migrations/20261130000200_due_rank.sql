-- The due scan's ranking (#17 item 4). A pending payout is queued in the order
-- of its rank time `rank_at` = `due_at` minus a bounded boost (its priority:
-- an early request, an operator's "process now"; the policy for scheduled
-- payouts: amount or payee tier), so a payout waiting longer than another's
-- boost goes first (aging: nothing starves). The boost comes from the
-- producer's configuration (`producer.priority`): the producer ranks pending
-- payouts whose `rank_at` is NULL (db::payouts::rank_pending) before its due
-- scan, which reads `payouts_pending_rank_idx` in rank order.

-- The payee's tier, for `producer.priority.scheduled = "tier"` (0 = standard).
ALTER TABLE payees ADD COLUMN tier SMALLINT NOT NULL DEFAULT 0 CHECK (tier BETWEEN 0 AND 9);

ALTER TABLE payouts ADD COLUMN rank_at TIMESTAMPTZ;

-- Scheduled payouts already pending rank at their due time (the default
-- policy's rank); the producer ranks the rest at its first pass.
UPDATE payouts SET rank_at = due_at WHERE status = 'pending' AND priority = 0;

-- Only pending payouts have a rank (the trigger below empties it when a payout
-- leaves pending), so the due scan needs no `status = 'pending'` clause: with
-- one, the planner counts the 1% of ranked rows twice (rank_at's null
-- fraction, then status), expects a few hundred due rows, and sorts all of
-- them (0.8 s at 5 M rows, 50,000 due) instead of reading this index in order.
CREATE INDEX payouts_pending_rank_idx ON payouts (rank_at) WHERE rank_at IS NOT NULL;
-- Pending payouts not ranked yet, early requests and "process now" first.
CREATE INDEX payouts_unranked_idx ON payouts (priority DESC, id)
    WHERE status = 'pending' AND rank_at IS NULL;

-- A payout that becomes pending again, or whose due time, priority or amount
-- changes while pending, is ranked again by the producer (unless the same
-- statement sets its rank); a payout that leaves pending loses its rank (the
-- due scan clears it itself). The WHEN clause keeps other updates free of it.
CREATE FUNCTION payouts_unrank() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.rank_at := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER payouts_unrank
    BEFORE UPDATE OF status, due_at, priority, amount ON payouts
    FOR EACH ROW
    WHEN ((NEW.status = 'pending'
           AND (OLD.status <> 'pending' OR NEW.due_at IS DISTINCT FROM OLD.due_at
                OR NEW.priority <> OLD.priority OR NEW.amount <> OLD.amount)
           AND NEW.rank_at IS NOT DISTINCT FROM OLD.rank_at)
          OR (NEW.status <> 'pending' AND NEW.rank_at IS NOT NULL))
    EXECUTE FUNCTION payouts_unrank();

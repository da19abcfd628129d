-- Why a payout is due: the schedule (0), a payee's early request (1), an
-- operator's "process now" (2). The due scan's ranking reads it (#17 item 4).
ALTER TABLE payouts ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0
    CHECK (priority BETWEEN 0 AND 2);

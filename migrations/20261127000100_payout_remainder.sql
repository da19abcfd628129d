-- The remainder a payout could not carry (issue 14, item 3).
--
-- Through Stripe some currencies are paid in steps coarser than their ISO
-- minor unit (HUF and TWD in whole units, three-decimal currencies in
-- hundredths). Settlement rounds such a payout down to the step; the rest is
-- the settlement's `carried_out` (a `carried_out` line, negative, so the
-- lines still sum to `net`), an open balance of the payee like a balance
-- below the minimum, until a later period takes it in (`carried_out_into`)
-- and pays it once it adds up to a step.
--
-- It has its own pointer because it lives apart from the settlement's
-- other balance: a payout that is cancelled or reversed returns `net + fee`
-- (`carried_into` then marks where that went), while the remainder was
-- never sent and is owed whatever happens to the payout.

ALTER TABLE settlements
    ADD COLUMN carried_out      NUMERIC NOT NULL DEFAULT 0,
    ADD COLUMN carried_out_into BIGINT REFERENCES settlements (id);

ALTER TABLE settlements ADD CONSTRAINT settlements_carried_out_check
    CHECK (carried_out >= 0
           AND (carried_out = 0 OR outcome IN ('payout', 'returned'))
           AND (carried_out_into IS NULL OR carried_out > 0));

-- Money is conserved, to the last minor unit, with the remainder.
ALTER TABLE settlements DROP CONSTRAINT settlements_check1;
ALTER TABLE settlements ADD CONSTRAINT settlements_conservation_check
    CHECK (gross + carried_in = net + carried_out + platform_commission + fee + deductions);

-- Open balances: the settlement's own (below the minimum, a shortfall, a
-- returned payout) and the remainder of a payout.
DROP INDEX settlements_open_carry_idx;
CREATE INDEX settlements_open_carry_idx ON settlements (payee_id, currency)
    WHERE (outcome <> 'payout' AND carried_into IS NULL)
       OR (carried_out > 0 AND carried_out_into IS NULL);

ALTER TABLE payout_lines DROP CONSTRAINT payout_lines_kind_check;
ALTER TABLE payout_lines ADD CONSTRAINT payout_lines_kind_check CHECK (kind IN
    ('earning', 'commission', 'volume_bonus', 'deduction', 'carried_in', 'fee', 'returned',
     'carried_out'));

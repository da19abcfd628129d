-- #17 item 2: a payee's earnings, newest first, paged by id (the platform's
-- `GET /api/v1/payees/{id}/earnings`); the unsettled index covers only
-- unsettled rows.
CREATE INDEX earnings_payee_idx ON earnings (payee_id, id);

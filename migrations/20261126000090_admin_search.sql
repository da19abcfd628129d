-- The dashboard's go-to box (GET /api/v1/search) and fleet banner, without
-- scanning a table: payee names by word prefix (full-text, no extension
-- needed), gateway accounts by exact value or prefix, and the newest audit
-- entry of an action (the last fleet pause). Payout ids, idempotency keys
-- and transfer ids already have their indexes.
CREATE INDEX payees_name_words_idx ON payees USING gin (to_tsvector('simple', name));
CREATE INDEX payees_gateway_account_idx ON payees (gateway_account text_pattern_ops);
CREATE INDEX audit_log_action_idx ON audit_log (action, id);

-- A payout's position in its idempotency-key chain (payout_<id>, payout_<id>-1, ...).
-- Stored, never derived: it advances only when the gateway proved that no
-- transfer was made under the current key (a saved refusal, or a stored 5xx
-- confirmed by a look-up); see src/gateway/stripe.rs.
ALTER TABLE payouts ADD COLUMN key_index integer NOT NULL DEFAULT 0 CHECK (key_index >= 0);
-- How many times the payout was held because its payee could not receive
-- money yet; past gateway.sync.max_holds it fails with its code instead.
ALTER TABLE payouts ADD COLUMN holds integer NOT NULL DEFAULT 0 CHECK (holds >= 0);

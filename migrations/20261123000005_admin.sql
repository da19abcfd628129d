-- The admin server: API tokens (stored as SHA-256 hashes, never in clear),
-- browser sessions made from a token login, and the indexes the dashboard's
-- views read so that no page view counts the whole table.

CREATE TABLE api_tokens (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         TEXT        NOT NULL CHECK (name ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    role         TEXT        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    -- hex SHA-256 of the whole token; the token itself is shown once, at creation
    token_hash   TEXT        NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ
);
-- One live token per name, so an actor name always means one credential.
CREATE UNIQUE INDEX api_tokens_live_name_idx ON api_tokens (name) WHERE revoked_at IS NULL;

CREATE TABLE admin_sessions (
    -- hex SHA-256 of the cookie value
    id_hash    TEXT        PRIMARY KEY CHECK (id_hash ~ '^[0-9a-f]{64}$'),
    token_id   BIGINT      NOT NULL REFERENCES api_tokens (id),
    csrf       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX admin_sessions_token_idx ON admin_sessions (token_id);

-- Overview: paid in the last hour/day, due-to-paid percentiles, per-minute series.
CREATE INDEX payouts_paid_at_idx ON payouts (paid_at) WHERE paid_at IS NOT NULL;
-- Failures view and filters: failed payouts by code.
CREATE INDEX payouts_failed_code_idx ON payouts (failure_code, id) WHERE status = 'failed';

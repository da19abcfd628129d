-- Security hardening of the admin surface (OWASP ASVS 4.0 level 2):
-- tokens may expire, token names are never reused (an actor name such as
-- `operator:alice` in the history always means one credential), browser
-- sessions end after an idle time, and every administrative change (tokens,
-- payees, fleet pause, policy-relevant settings) leaves a row in audit_log.

ALTER TABLE api_tokens ADD COLUMN expires_at TIMESTAMPTZ;

-- Names reused before this migration keep their history under a suffixed
-- name (revoked ones only: at most one live token had a name).
UPDATE api_tokens t
   SET name = left(t.name, 40) || '-revoked-' || t.id
 WHERE t.revoked_at IS NOT NULL
   AND EXISTS (SELECT 1 FROM api_tokens o WHERE o.name = t.name AND o.id > t.id);
DROP INDEX api_tokens_live_name_idx;
CREATE UNIQUE INDEX api_tokens_name_idx ON api_tokens (name);

ALTER TABLE admin_sessions ADD COLUMN last_seen_at TIMESTAMPTZ NOT NULL DEFAULT now();

CREATE TABLE audit_log (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL,
    -- who: `operator:NAME` (a token), `cli:USER`, `system`
    actor   TEXT        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    -- what: `token.create`, `token.revoke`, `payee.create`, `fleet.pause`, ...
    action  TEXT        NOT NULL CHECK (action ~ '^[a-z_]+\.[a-z_]+$'),
    -- on what: a token name, a payee id, ...
    target  TEXT        NOT NULL CHECK (length(target) <= 200),
    -- the change's details (never a secret)
    detail  JSONB       NOT NULL DEFAULT '{}'::jsonb,
    -- the request's source address, when it came over HTTP
    source  TEXT
);
CREATE INDEX audit_log_at_idx ON audit_log (at);

//! API tokens and browser sessions of the admin server.
//!
//! A token is `pat_` followed by 32 random bytes in hex. Only its SHA-256 is
//! stored, so a database dump holds no credential; the token is shown once,
//! when it is created. A browser session is a random cookie value (stored as
//! its SHA-256 too) bound to the token it was made from, with its own CSRF
//! secret; revoking the token ends its sessions.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// What a token may do. Operators' roles form a ladder (viewer < operator <
/// admin: [`Role::includes`]); `integration`, the platform's backend, stands
/// apart: it may do exactly its [`Permission`]s ([`Role::allows`]), so no
/// comparison of roles ever lets it retry, cancel or bulk-act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Read, and retry, cancel or enqueue one payout at a time; post earnings.
    Operator,
    /// Everything: bulk actions too.
    Admin,
    /// The platform's backend: post earnings; read payees, balances,
    /// earnings and payouts; ask for payouts. Nothing else.
    Integration,
}

/// One kind of action, checked against the caller's role ([`Role::allows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read payees, their balances, earnings and payouts (the platform's reads).
    ReadPayees,
    /// Read everything else: the overview, failures, search, settlements,
    /// reconciliation runs, the fleet, the dashboard.
    ReadFleet,
    /// Post earnings (`POST /v1/earnings`).
    PostEarnings,
    /// Ask for a payee's payout (an early payout request).
    RequestPayout,
    /// Retry, cancel or enqueue one payout.
    ActOnPayout,
    /// Suspend or resume a payee.
    SuspendPayee,
    /// Release a held earning early or void an unsettled one (escrow actions).
    ActOnEarning,
    /// Change a payee's gateway account (where money goes: admin only).
    ChangeAccount,
    /// Bulk actions, tokens, the fleet pause.
    Administer,
}

impl Role {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Integration => "integration",
        }
    }

    /// Whether this role may do `p`.
    pub fn allows(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Integration => matches!(p, ReadPayees | PostEarnings | RequestPayout),
            Role::Viewer => matches!(p, ReadPayees | ReadFleet),
            Role::Operator => !matches!(p, ChangeAccount | Administer),
            Role::Admin => true,
        }
    }

    /// Whether this role is `other` or above it on the operators' ladder
    /// (viewer < operator < admin). `integration` is on no ladder: it
    /// includes only itself.
    pub fn includes(self, other: Role) -> bool {
        fn rung(r: Role) -> Option<u8> {
            match r {
                Role::Viewer => Some(0),
                Role::Operator => Some(1),
                Role::Admin => Some(2),
                Role::Integration => None,
            }
        }
        match (rung(self), rung(other)) {
            (Some(a), Some(b)) => a >= b,
            _ => self == other,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            "integration" => Ok(Role::Integration),
            other => Err(format!(
                "unknown role {other:?} (expected viewer, operator, admin or integration)"
            )),
        }
    }
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Id.
    pub id: i64,
    /// Who holds it: the actor name in event histories.
    pub name: String,
    /// `viewer`, `operator`, `admin` or `integration`.
    pub role: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last request made with it (updated at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it stops working, if it was given an end.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Who a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's id.
    pub token_id: i64,
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

impl Principal {
    /// The actor written to payout events and audit rows:
    /// `integration:<name>` for the platform's backend, `operator:<name>`
    /// for every other role.
    pub fn actor(&self) -> String {
        match self.role {
            Role::Integration => format!("integration:{}", self.name),
            _ => format!("operator:{}", self.name),
        }
    }
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The name breaks the rule.
    #[error("token name must be 1 to 64 characters of A-Z a-z 0-9 _ . @ -, got {0:?}")]
    BadName(String),
    /// A token (live or revoked) already had the name: names are never
    /// reused, so an actor name in a history always means one credential.
    #[error("a token named {0:?} exists or existed; token names are never reused, pick another")]
    NameTaken(String),
    /// The expiry is not in the future.
    #[error("a token's expiry must be in the future")]
    BadExpiry,
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// The hex SHA-256 of `secret`.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
}

/// Creates a token that never expires, recorded in the audit log as made by
/// `system`; returns its id and the token (shown once, stored hashed).
pub async fn create(pool: &PgPool, name: &str, role: Role) -> Result<(i64, String), TokenError> {
    issue(
        pool,
        name,
        role,
        None,
        "system",
        None,
        crate::clock::Clock::now(&crate::clock::SystemClock),
    )
    .await
}

/// Creates a token (optionally expiring) for `actor`, with its audit row in
/// the same transaction; returns its id and the token (shown once, stored
/// hashed).
pub async fn issue(
    pool: &PgPool,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
    actor: &str,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(i64, String), TokenError> {
    if !valid_name(name) {
        return Err(TokenError::BadName(name.to_string()));
    }
    if expires_at.is_some_and(|e| e <= now) {
        return Err(TokenError::BadExpiry);
    }
    let token = format!("pat_{}", random_hex(32));
    let mut tx = pool.begin().await?;
    let id: Result<i64, sqlx::Error> = sqlx::query_scalar!(
        "INSERT INTO api_tokens (name, role, token_hash, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
        name,
        role.as_str(),
        hash(&token),
        now,
        expires_at,
    )
    .fetch_one(&mut *tx)
    .await;
    let id = match id {
        Ok(id) => id,
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(TokenError::NameTaken(name.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    super::audit::record(
        &mut *tx,
        now,
        actor,
        "token.create",
        name,
        serde_json::json!({"role": role.as_str(), "expires_at": expires_at}),
        source,
    )
    .await?;
    tx.commit().await?;
    Ok((id, token))
}

/// All tokens, newest first.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<TokenInfo>> {
    sqlx::query_as!(
        TokenInfo,
        "SELECT id, name, role, created_at, last_used_at, revoked_at, expires_at
         FROM api_tokens ORDER BY id DESC"
    )
    .fetch_all(pool)
    .await
}

/// Revokes the live token named `name` and ends its sessions; `false` when
/// there is none. Recorded in the audit log as done by `system`.
pub async fn revoke(pool: &PgPool, name: &str, now: DateTime<Utc>) -> sqlx::Result<bool> {
    revoke_by(pool, name, now, "system", None).await
}

/// [`revoke`] by `actor`, with its audit row in the same transaction.
pub async fn revoke_by(
    pool: &PgPool,
    name: &str,
    now: DateTime<Utc>,
    actor: &str,
    source: Option<&str>,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let id = sqlx::query_scalar!(
        "UPDATE api_tokens SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL RETURNING id",
        name,
        now,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(id) = id {
        sqlx::query!("DELETE FROM admin_sessions WHERE token_id = $1", id)
            .execute(&mut *tx)
            .await?;
        super::audit::record(
            &mut *tx,
            now,
            actor,
            "token.revoke",
            name,
            serde_json::json!({}),
            source,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(id.is_some())
}

fn principal(row: (i64, String, String)) -> Option<Principal> {
    let (token_id, name, role) = row;
    Some(Principal {
        token_id,
        name,
        role: role.parse().ok()?,
    })
}

/// The principal of a live token, and marks it used (at most once a minute).
pub async fn authenticate(
    pool: &PgPool,
    token: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<Principal>> {
    // The hash is looked up by equality: the comparison is on a digest of the
    // secret, so its timing tells nothing about the token. `last_used_at` is
    // written only when it is a minute old, not on every request.
    let row = sqlx::query!(
        "WITH t AS (
             SELECT id, name, role, last_used_at FROM api_tokens
             WHERE token_hash = $1 AND revoked_at IS NULL
               AND (expires_at IS NULL OR expires_at > $2)),
         touch AS (
             UPDATE api_tokens a SET last_used_at = $2 FROM t
             WHERE a.id = t.id AND (t.last_used_at IS NULL OR t.last_used_at < $2 - interval '1 minute'))
         SELECT id, name, role FROM t",
        hash(token),
        now,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|r| principal((r.id, r.name, r.role))))
}

/// A new browser session for `principal`: the cookie value and its CSRF secret.
pub async fn open_session(
    pool: &PgPool,
    principal: &Principal,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<(String, String)> {
    let cookie = random_hex(32);
    let csrf = random_hex(32);
    // Each login also clears sessions that have expired, so the table stays small.
    sqlx::query!("DELETE FROM admin_sessions WHERE expires_at <= $1", now)
        .execute(pool)
        .await?;
    sqlx::query!(
        "INSERT INTO admin_sessions (id_hash, token_id, csrf, expires_at, created_at, last_seen_at)
         VALUES ($1, $2, $3, $4, $5, $5)",
        hash(&cookie),
        principal.token_id,
        &csrf,
        expires_at,
        now,
    )
    .execute(pool)
    .await?;
    Ok((cookie, csrf))
}

/// The principal and CSRF secret of a live session: not expired, used
/// within the last `idle` (its last use is then moved forward, at most once
/// a minute), its token neither revoked nor expired.
pub async fn session(
    pool: &PgPool,
    cookie: &str,
    now: DateTime<Utc>,
    idle: chrono::Duration,
) -> sqlx::Result<Option<(Principal, String)>> {
    let row = sqlx::query!(
        "WITH s AS (
             SELECT t.id, t.name, t.role, s.csrf, s.id_hash, s.last_seen_at
             FROM admin_sessions s JOIN api_tokens t ON t.id = s.token_id
             WHERE s.id_hash = $1 AND s.expires_at > $2 AND s.last_seen_at > $2 - $3::interval
               AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > $2)),
         touch AS (
             UPDATE admin_sessions a SET last_seen_at = $2 FROM s
             WHERE a.id_hash = s.id_hash AND s.last_seen_at < $2 - interval '1 minute')
         SELECT id, name, role, csrf FROM s",
        hash(cookie),
        now,
        idle as _,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|r| Some((principal((r.id, r.name, r.role))?, r.csrf))))
}

/// Ends a session (and, in passing, sessions that expired).
pub async fn close_session(pool: &PgPool, cookie: &str, now: DateTime<Utc>) -> sqlx::Result<()> {
    sqlx::query!(
        "DELETE FROM admin_sessions WHERE id_hash = $1 OR expires_at <= $2",
        hash(cookie),
        now,
    )
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integration_may_post_read_and_request_and_nothing_else() {
        use Permission::*;
        let all = [
            ReadPayees,
            ReadFleet,
            PostEarnings,
            RequestPayout,
            ActOnPayout,
            SuspendPayee,
            ActOnEarning,
            ChangeAccount,
            Administer,
        ];
        let allowed: Vec<Permission> = all
            .into_iter()
            .filter(|p| Role::Integration.allows(*p))
            .collect();
        assert_eq!(allowed, [ReadPayees, PostEarnings, RequestPayout]);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert!(!Role::Integration.includes(r), "integration is not {r}");
            assert!(!r.includes(Role::Integration), "{r} is not integration");
        }
        assert!(Role::Operator.allows(ActOnPayout) && !Role::Operator.allows(Administer));
        assert!(Role::Operator.allows(ActOnEarning) && !Role::Viewer.allows(ActOnEarning));
        assert!(Role::Admin.allows(ChangeAccount) && !Role::Operator.allows(ChangeAccount));
    }

    #[test]
    fn names_and_roles() {
        assert!(valid_name("alice@ops.example"));
        assert!(!valid_name(""));
        assert!(!valid_name("has space"));
        assert!(!valid_name(&"x".repeat(65)));
        assert_eq!("operator".parse::<Role>().unwrap(), Role::Operator);
        assert!("root".parse::<Role>().unwrap_err().contains("unknown role"));
        assert!(Role::Admin.includes(Role::Operator) && Role::Operator.includes(Role::Viewer));
        assert!(!Role::Viewer.includes(Role::Operator));
        assert_eq!("integration".parse::<Role>().unwrap(), Role::Integration);
        assert_eq!(hash("x").len(), 64);
    }
}

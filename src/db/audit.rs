//! `audit_log`: one row per administrative change (tokens, payees, fleet
//! pause, policy-relevant changes), with who, what, on what, the details and
//! the request's source. Payout state changes have their own history in
//! `payout_events`; this is for everything else an operator can change.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};

/// One administrative change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Its id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who (`operator:NAME`, `cli:USER`, `system`).
    pub actor: String,
    /// What (`token.create`, `token.revoke`, ...).
    pub action: String,
    /// On what (a token name, a payee id).
    pub target: String,
    /// Details as JSON text (never a secret).
    pub detail: String,
    /// The request's source address, when it came over HTTP.
    pub source: Option<String>,
}

/// Records a change, in the caller's transaction when given one.
pub async fn record<'e>(
    db: impl PgExecutor<'e>,
    at: DateTime<Utc>,
    actor: &str,
    action: &str,
    target: &str,
    detail: Value,
    source: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO audit_log (at, actor, action, target, detail, source)
         VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)",
        at,
        actor,
        action,
        target,
        detail.to_string(),
        source,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The newest `limit` entries, newest first.
pub async fn recent(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<AuditEntry>> {
    sqlx::query_as!(
        AuditEntry,
        r#"SELECT id, at, actor, action, target, detail::text AS "detail!", source
           FROM audit_log ORDER BY id DESC LIMIT $1"#,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// The newest entry whose action is one of `actions` (e.g. the last fleet
/// pause or resume), if any.
pub async fn latest_of(pool: &PgPool, actions: &[&str]) -> sqlx::Result<Option<AuditEntry>> {
    let actions: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
    sqlx::query_as!(
        AuditEntry,
        r#"SELECT id, at, actor, action, target, detail::text AS "detail!", source
           FROM audit_log WHERE action = ANY($1) ORDER BY id DESC LIMIT 1"#,
        &actions,
    )
    .fetch_optional(pool)
    .await
}

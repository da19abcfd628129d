//! The `payees` table: who gets paid, and where.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::domain::{Currency, PayeeId};

/// A payee row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Payee {
    /// Id.
    #[schema(value_type = i64)]
    pub id: PayeeId,
    /// Display name.
    pub name: String,
    /// The payee's account at the gateway (e.g. `acct_123`).
    pub gateway_account: String,
    /// Default currency.
    pub currency: String,
    /// `active` or `suspended`.
    pub status: String,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// Where mail about its payouts goes (README "Email to payees"); none:
    /// no mail.
    pub email: Option<String>,
}

/// Adds a payee.
pub async fn create<'e>(
    db: impl sqlx::PgExecutor<'e>,
    name: &str,
    gateway_account: &str,
    currency: Currency,
) -> sqlx::Result<Payee> {
    sqlx::query_as!(
        Payee,
        r#"INSERT INTO payees (name, gateway_account, currency) VALUES ($1, $2, $3)
         RETURNING id AS "id: PayeeId", name, gateway_account, currency, status, created_at, email"#,
        name,
        gateway_account,
        currency.code(),
    )
    .fetch_one(db)
    .await
}

/// One payee.
pub async fn get(pool: &PgPool, id: PayeeId) -> sqlx::Result<Option<Payee>> {
    sqlx::query_as!(
        Payee,
        r#"SELECT id AS "id: PayeeId", name, gateway_account, currency, status, created_at, email FROM payees WHERE id = $1"#,
        id.get(),
    )
    .fetch_optional(pool)
    .await
}

/// Adds `count` demo payees in one statement; returns their ids.
pub async fn create_demo(pool: &PgPool, count: i64, currency: Currency) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar!(
        "INSERT INTO payees (name, gateway_account, currency)
         SELECT 'Demo payee ' || g, 'acct_demo_' || g, $2 FROM generate_series(1, $1::bigint) g
         RETURNING id",
        count,
        currency.code(),
    )
    .fetch_all(pool)
    .await
}

/// A page of payees, newest first, only those with `status` when given: at
/// most `limit`, below `before_id` when given.
pub async fn page_with_status(
    pool: &PgPool,
    status: Option<&str>,
    before_id: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<Payee>> {
    sqlx::query_as!(
        Payee,
        r#"SELECT id AS "id: PayeeId", name, gateway_account, currency, status, created_at, email FROM payees
         WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3"#,
        status,
        before_id,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// Payee `id`, its row locked (`FOR NO KEY UPDATE`, as settlement locks it)
/// until the transaction ends.
pub async fn lock(conn: &mut PgConnection, id: PayeeId) -> sqlx::Result<Option<Payee>> {
    sqlx::query_as!(
        Payee,
        r#"SELECT id AS "id: PayeeId", name, gateway_account, currency, status, created_at, email FROM payees
         WHERE id = $1 FOR NO KEY UPDATE"#,
        id.get(),
    )
    .fetch_optional(&mut *conn)
    .await
}

/// Sets payee `id`'s status (`active` or `suspended`); returns the row.
pub async fn set_status(conn: &mut PgConnection, id: PayeeId, status: &str) -> sqlx::Result<Payee> {
    sqlx::query_as!(
        Payee,
        r#"UPDATE payees SET status = $2 WHERE id = $1
         RETURNING id AS "id: PayeeId", name, gateway_account, currency, status, created_at, email"#,
        id.get(),
        status,
    )
    .fetch_one(&mut *conn)
    .await
}

/// Sets payee `id`'s gateway account; returns the row.
pub async fn set_account(
    conn: &mut PgConnection,
    id: PayeeId,
    account: &str,
) -> sqlx::Result<Payee> {
    sqlx::query_as!(
        Payee,
        r#"UPDATE payees SET gateway_account = $2 WHERE id = $1
         RETURNING id AS "id: PayeeId", name, gateway_account, currency, status, created_at, email"#,
        id.get(),
        account,
    )
    .fetch_one(&mut *conn)
    .await
}

/// Sets payee `id`'s tier (`producer.priority.scheduled = "tier"`); returns
/// the tier before, `None` when there is no such payee.
pub async fn set_tier(
    conn: &mut PgConnection,
    id: PayeeId,
    tier: i16,
) -> sqlx::Result<Option<i16>> {
    sqlx::query_scalar!(
        r#"UPDATE payees y SET tier = $2 FROM payees old WHERE y.id = $1 AND old.id = y.id
           RETURNING old.tier AS "before!""#,
        id.get(),
        tier,
    )
    .fetch_optional(&mut *conn)
    .await
}

/// Payee `id`'s tier, if it exists.
pub async fn tier(pool: &PgPool, id: PayeeId) -> sqlx::Result<Option<i16>> {
    sqlx::query_scalar!("SELECT tier FROM payees WHERE id = $1", id.get())
        .fetch_optional(pool)
        .await
}

/// The gateway accounts of payees `ids` (tooling: the demo seeds them at the
/// Stripe stand-in).
#[cfg(feature = "testkit")]
pub async fn gateway_accounts(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!("SELECT gateway_account FROM payees WHERE id = ANY($1)", ids)
        .fetch_all(pool)
        .await
}

/// Sets (or, with `None`, clears) payee `id`'s email address; returns the row.
pub async fn set_email(
    conn: &mut PgConnection,
    id: PayeeId,
    email: Option<&str>,
) -> sqlx::Result<Payee> {
    sqlx::query_as!(
        Payee,
        r#"UPDATE payees SET email = $2 WHERE id = $1
         RETURNING id AS "id: PayeeId", name, gateway_account, currency, status, created_at, email"#,
        id.get(),
        email,
    )
    .fetch_one(&mut *conn)
    .await
}

/// (id, name, email) of those of payees `ids` that have an address.
pub async fn addresses(
    conn: &mut PgConnection,
    ids: &[i64],
) -> sqlx::Result<Vec<(i64, String, String)>> {
    let rows = sqlx::query!(
        r#"SELECT id, name, email AS "email!" FROM payees WHERE id = ANY($1) AND email IS NOT NULL"#,
        ids,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.name, r.email)).collect())
}

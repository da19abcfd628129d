//! `webhook_cursors`: where the webhook fan-out stands in each outbox, and
//! the lease that lets one process fan out and deliver at a time.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The outbox of payout events.
pub const PAYOUT_EVENTS: &str = "payout_events";

/// Takes or renews the lease on cursor `name` for `owner` until `until`;
/// `true` when `owner` holds it.
pub async fn hold(
    pool: &PgPool,
    name: &str,
    owner: &str,
    until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "UPDATE webhook_cursors SET owner = $2, lease_until = $3
         WHERE name = $1 AND (owner = $2 OR owner IS NULL OR lease_until IS NULL OR lease_until < $4)",
        name,
        owner,
        until,
        now,
    )
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Gives the lease up (a graceful stop), if `owner` holds it.
pub async fn release(pool: &PgPool, name: &str, owner: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE webhook_cursors SET owner = NULL, lease_until = NULL WHERE name = $1 AND owner = $2",
        name,
        owner,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The cursor (`tx_id`, `event_id`), locked for the fan-out's transaction,
/// when `owner` still holds the lease.
pub async fn lock(
    db: &mut sqlx::PgConnection,
    name: &str,
    owner: &str,
) -> sqlx::Result<Option<(i64, i64)>> {
    let row = sqlx::query!(
        r#"SELECT tx_id::text::bigint AS "tx_id!", event_id FROM webhook_cursors
           WHERE name = $1 AND owner = $2 FOR UPDATE"#,
        name,
        owner,
    )
    .fetch_optional(&mut *db)
    .await?;
    Ok(row.map(|r| (r.tx_id, r.event_id)))
}

/// Moves the cursor forward to (`tx_id`, `event_id`) (never back).
pub async fn advance(
    db: &mut sqlx::PgConnection,
    name: &str,
    tx_id: i64,
    event_id: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE webhook_cursors SET tx_id = $2::bigint::text::xid8, event_id = $3
         WHERE name = $1 AND (tx_id, event_id) < ($2::bigint::text::xid8, $3)",
        name,
        tx_id,
        event_id,
    )
    .execute(&mut *db)
    .await?;
    Ok(())
}

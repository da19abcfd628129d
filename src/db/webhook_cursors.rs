//! `webhook_cursors`: where the webhook fan-out stands in each outbox, and
//! the lease that lets one process fan out and deliver at a time (held on
//! the `payout_events` row; it covers every cursor).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The outbox of payout events (its row holds the delivery lease).
pub const PAYOUT_EVENTS: &str = "payout_events";
/// The outbox of settlement events.
pub const SETTLEMENT_EVENTS: &str = "settlement_events";

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

/// The cursor `name` (`tx_id`, `event_id`), when `owner` holds the lease.
pub async fn get(
    db: &mut sqlx::PgConnection,
    name: &str,
    owner: &str,
) -> sqlx::Result<Option<(i64, i64)>> {
    let row = sqlx::query!(
        r#"SELECT c.tx_id::text::bigint AS "tx_id!", c.event_id FROM webhook_cursors c
           JOIN webhook_cursors l ON l.name = 'payout_events' AND l.owner = $2
           WHERE c.name = $1"#,
        name,
        owner,
    )
    .fetch_optional(&mut *db)
    .await?;
    Ok(row.map(|r| (r.tx_id, r.event_id)))
}

/// Moves the cursor from `from` to `to` if `owner` still holds the lease
/// and the cursor is still at `from`; `false` otherwise (the caller's
/// transaction must then roll back: another process fanned out meanwhile).
pub async fn advance(
    db: &mut sqlx::PgConnection,
    name: &str,
    owner: &str,
    from: (i64, i64),
    to: (i64, i64),
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "UPDATE webhook_cursors c SET tx_id = $5::bigint::text::xid8, event_id = $6
         WHERE c.name = $1 AND c.tx_id = $3::bigint::text::xid8 AND c.event_id = $4
           AND EXISTS (SELECT 1 FROM webhook_cursors l WHERE l.name = 'payout_events' AND l.owner = $2)",
        name,
        owner,
        from.0,
        from.1,
        to.0,
        to.1,
    )
    .execute(&mut *db)
    .await?;
    Ok(r.rows_affected() == 1)
}

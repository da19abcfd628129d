//! The `webhook_events` table: every gateway webhook received, once per
//! `(source, event_id)`, with what it did (`paid`, `failed`, `duplicate`
//! never: a repeat is not recorded again, `unmatched`, `ignored`, ...) and
//! the payout it named. The row is written in the transaction that applies
//! the event, so a webhook is applied at most once.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// A recorded webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebhookEvent {
    /// `gateway` or `stripe`.
    pub source: String,
    /// The gateway's event id.
    pub event_id: String,
    /// The gateway's event type (`transfer.paid`, ...).
    pub event_type: String,
    /// What it did.
    pub outcome: String,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
}

/// Records the arrival of event `event_id` from `source` (outcome
/// `received`); `false` when it was recorded before (a redelivery).
pub async fn record_received(
    conn: &mut PgConnection,
    source: &str,
    event_id: &str,
    event_type: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let fresh = sqlx::query_scalar!(
        "INSERT INTO webhook_events (source, event_id, event_type, outcome, received_at)
         VALUES ($1, $2, $3, 'received', $4) ON CONFLICT DO NOTHING RETURNING 1",
        source,
        event_id,
        event_type,
        now,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(fresh.is_some())
}

/// Records what event `event_id` from `source` did, and the payout it is linked to.
pub async fn set_outcome(
    conn: &mut PgConnection,
    source: &str,
    event_id: &str,
    outcome: &str,
    payout_id: Option<i64>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE webhook_events SET outcome = $3, payout_id = $4 WHERE source = $1 AND event_id = $2",
        source,
        event_id,
        outcome,
        payout_id,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The webhooks linked to payout `payout_id`, oldest first.
pub async fn for_payout(pool: &PgPool, payout_id: i64) -> sqlx::Result<Vec<WebhookEvent>> {
    sqlx::query_as!(
        WebhookEvent,
        "SELECT source, event_id, event_type, outcome, received_at FROM webhook_events
         WHERE payout_id = $1 ORDER BY received_at",
        payout_id,
    )
    .fetch_all(pool)
    .await
}

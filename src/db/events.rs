//! The append-only `payout_events` table: every transition, who, why, when.
//! The statements that change a payout write their event in the same
//! statement (see `payouts.rs`); this module reads them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// One recorded transition.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PayoutEvent {
    /// Id (orders events).
    pub id: i64,
    /// The payout.
    pub payout_id: i64,
    /// Status before (`None` at creation).
    pub from_status: Option<String>,
    /// Status after.
    pub to_status: String,
    /// Who: `worker:<id>`, `producer:<id>`, `operator:<name>`, `system`.
    pub actor: String,
    /// Why.
    pub reason: Option<String>,
    /// The attempt number at the time.
    pub attempt: Option<i32>,
    /// When.
    pub at: DateTime<Utc>,
}

/// A payout's history, oldest first.
pub async fn for_payout(pool: &PgPool, payout_id: i64) -> sqlx::Result<Vec<PayoutEvent>> {
    sqlx::query_as::<_, PayoutEvent>("SELECT * FROM payout_events WHERE payout_id = $1 ORDER BY id")
        .bind(payout_id)
        .fetch_all(pool)
        .await
}

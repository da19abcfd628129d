//! The append-only `payout_events` table: every transition, who, why, when.
//! The statements that change a payout write their event in the same
//! statement (see `payouts.rs`); this module reads them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// One recorded transition.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    sqlx::query_as!(
        PayoutEvent,
        "SELECT id, payout_id, from_status, to_status, actor, reason, attempt, at
         FROM payout_events WHERE payout_id = $1 ORDER BY id",
        payout_id,
    )
    .fetch_all(pool)
    .await
}

// ------------------------------------------------------------ tooling ----
// What the chaos harness reads (and tries) to check the fleet's history.

/// One transition, as the chaos harness replays histories.
#[cfg(feature = "testkit")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The payout.
    pub payout_id: i64,
    /// Status before (`None` at creation).
    pub from_status: Option<String>,
    /// Status after.
    pub to_status: String,
}

/// Every event, by payout then in order.
#[cfg(feature = "testkit")]
pub async fn all_transitions(pool: &PgPool) -> sqlx::Result<Vec<Transition>> {
    sqlx::query_as!(
        Transition,
        "SELECT payout_id, from_status, to_status FROM payout_events ORDER BY payout_id, id"
    )
    .fetch_all(pool)
    .await
}

/// Whether the database refuses to rewrite the history of `payout_id`
/// (append-only): tried in a transaction that is rolled back.
#[cfg(feature = "testkit")]
pub async fn refuses_rewrite(pool: &PgPool, payout_id: i64) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let tried = sqlx::query!(
        "UPDATE payout_events SET reason = 'rewritten' WHERE payout_id = $1",
        payout_id,
    )
    .execute(&mut *tx)
    .await;
    tx.rollback().await?;
    Ok(tried.is_err())
}

/// The highest event id (0 when there is none).
#[cfg(feature = "testkit")]
pub async fn max_id(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT coalesce(max(id), 0) AS "max!" FROM payout_events"#)
        .fetch_one(pool)
        .await
}

/// The newest event after `after_id` that moved a payout to `queued` by an
/// actor LIKE `actor_like`: its actor and time.
#[cfg(feature = "testkit")]
pub async fn latest_queued_by(
    pool: &PgPool,
    after_id: i64,
    actor_like: &str,
) -> sqlx::Result<Option<(String, DateTime<Utc>)>> {
    let row = sqlx::query!(
        "SELECT actor, at FROM payout_events
         WHERE id > $1 AND actor LIKE $2 AND to_status = 'queued'
         ORDER BY id DESC LIMIT 1",
        after_id,
        actor_like,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.actor, r.at)))
}

/// How many outcomes (paid, failed, retrying, in transit) an actor LIKE
/// `actor_like` recorded for `payout_ids` after `after`.
#[cfg(feature = "testkit")]
pub async fn outcomes_by_after(
    pool: &PgPool,
    payout_ids: &[i64],
    actor_like: &str,
    after: DateTime<Utc>,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM payout_events
           WHERE payout_id = ANY($1) AND actor LIKE $2 AND at > $3
             AND to_status IN ('paid', 'failed', 'retrying', 'in_transit')"#,
        payout_ids,
        actor_like,
        after,
    )
    .fetch_one(pool)
    .await
}

/// When payout `payout_id` was first claimed under an attempt above `attempt`.
#[cfg(feature = "testkit")]
pub async fn first_claim_above(
    pool: &PgPool,
    payout_id: i64,
    attempt: i32,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        "SELECT min(at) FROM payout_events
         WHERE payout_id = $1 AND to_status = 'processing' AND attempt > $2",
        payout_id,
        attempt,
    )
    .fetch_one(pool)
    .await
}

/// How many claims went back to `queued` by the producer's rescue (the
/// worker's liveness beat stopped) and by the lease sweep.
#[cfg(feature = "testkit")]
pub async fn released_counts(pool: &PgPool) -> sqlx::Result<(i64, i64)> {
    let r = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE reason = 'worker gone (liveness beat stopped)') AS "rescued!",
                  count(*) FILTER (WHERE reason = 'lease expired') AS "swept!"
           FROM payout_events WHERE from_status = 'processing' AND to_status = 'queued'"#
    )
    .fetch_one(pool)
    .await?;
    Ok((r.rescued, r.swept))
}

/// The payouts `actor` moved to `queued` at `at` (one producer batch), each
/// with its first claim since.
#[cfg(feature = "testkit")]
pub async fn claims_after_queued(
    pool: &PgPool,
    actor: &str,
    at: DateTime<Utc>,
) -> sqlx::Result<Vec<(i64, Option<DateTime<Utc>>)>> {
    let rows = sqlx::query!(
        "SELECT e.payout_id,
                (SELECT min(c.at) FROM payout_events c
                 WHERE c.payout_id = e.payout_id AND c.to_status = 'processing' AND c.at >= e.at)
                 AS claimed
         FROM payout_events e
         WHERE e.actor = $1 AND e.at = $2 AND e.to_status = 'queued'",
        actor,
        at,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.payout_id, r.claimed)).collect())
}

/// How many payouts moved to `queued` since `since` were first claimed only
/// `lease_secs` or more after it (the chaos harness's rolling restart: jobs
/// left stranded until the sweep).
#[cfg(feature = "testkit")]
pub async fn queued_claimed_late(
    pool: &PgPool,
    since: Option<DateTime<Utc>>,
    lease_secs: f64,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM payout_events q
           WHERE q.to_status = 'queued' AND q.at >= $1
             AND (SELECT min(c.at) FROM payout_events c
                  WHERE c.payout_id = q.payout_id AND c.to_status = 'processing' AND c.at >= q.at)
                 >= q.at + make_interval(secs => $2)"#,
        since,
        lease_secs,
    )
    .fetch_one(pool)
    .await
}

// ------------------------------------------------------------- outbox ----
// `payout_events` is the outbox of outbound webhooks: the fan-out reads it in
// (tx_id, id) order after its cursor, only below the oldest transaction still
// running, so an event of a transaction still open is never skipped.

/// One event as the fan-out reads it, with its payout's current fields.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// The writing transaction (`xid8`, as a number): the cursor's first half.
    pub tx_id: i64,
    /// The event id: the cursor's second half.
    pub id: i64,
    /// The payout.
    pub payout_id: i64,
    /// Status before (`None` at creation).
    pub from_status: Option<String>,
    /// Status after.
    pub to_status: String,
    /// Why.
    pub reason: Option<String>,
    /// The attempt number at the time.
    pub attempt: Option<i32>,
    /// When.
    pub at: DateTime<Utc>,
    /// The payee.
    pub payee_id: i64,
    /// The amount.
    pub amount: rust_decimal::Decimal,
    /// The currency.
    pub currency: String,
    /// When it fell (falls) due.
    pub due_at: DateTime<Utc>,
    /// The gateway's transfer id, once known.
    pub gateway_transfer_id: Option<String>,
    /// The failure code, if any.
    pub failure_code: Option<String>,
}

/// Up to `limit` settled events after the cursor (`tx_id`, `id`), in order.
pub async fn outbox_after(
    db: &mut sqlx::PgConnection,
    tx_id: i64,
    id: i64,
    limit: i64,
) -> sqlx::Result<Vec<OutboxEvent>> {
    sqlx::query_as!(
        OutboxEvent,
        r#"SELECT e.tx_id::text::bigint AS "tx_id!", e.id, e.payout_id, e.from_status, e.to_status, e.reason, e.attempt, e.at,
                  p.payee_id, p.amount, p.currency, p.due_at, p.gateway_transfer_id, p.failure_code
           FROM payout_events e JOIN payouts p ON p.id = e.payout_id
           WHERE (e.tx_id, e.id) > ($1::bigint::text::xid8, $2)
             AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY e.tx_id, e.id
           LIMIT $3"#,
        tx_id,
        id,
        limit,
    )
    .fetch_all(&mut *db)
    .await
}

/// The newest settled event (`tx_id`, `id`): where a fan-out with no
/// endpoint moves its cursor to.
pub async fn outbox_last_settled(db: &mut sqlx::PgConnection) -> sqlx::Result<Option<(i64, i64)>> {
    let row = sqlx::query!(
        r#"SELECT e.tx_id::text::bigint AS "tx_id!", e.id FROM payout_events e
           WHERE e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY e.tx_id DESC, e.id DESC LIMIT 1"#
    )
    .fetch_optional(&mut *db)
    .await?;
    Ok(row.map(|r| (r.tx_id, r.id)))
}

//! `webhook_deliveries` (one message to one endpoint) and `webhook_attempts`
//! (the delivery log: every retry, and every first attempt that failed; a
//! first attempt that succeeded is on the message itself). The fan-out writes
//! a message once, after its first attempt; a retry's claim pushes the
//! message's next attempt past the delivery lease, so a deliverer that dies
//! mid-delivery loses nothing: the message is due again once the lease ends.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

/// One message, written once after its first attempt (or unsent, due now,
/// when its endpoint was failing).
#[derive(Debug, Clone)]
pub struct SentDelivery {
    /// The endpoint.
    pub endpoint_id: i64,
    /// The `webhook-id`.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// The body, exactly as signed and sent.
    pub body: String,
    /// `delivered`, `pending` or `failed`.
    pub status: &'static str,
    /// Attempts made (0: not sent yet).
    pub attempts: i32,
    /// When to try (again).
    pub next_attempt_at: DateTime<Utc>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
    /// The HTTP status of the attempt.
    pub status_code: Option<i32>,
    /// What went wrong.
    pub error: Option<String>,
    /// Latency of the attempt, ms.
    pub latency_ms: i32,
    /// The start of the answer.
    pub response: Option<String>,
}

/// Writes `rows` (a message already written for an endpoint is left as it
/// is), and a log entry for each failed first attempt, in one statement.
pub async fn insert_sent(
    db: &mut sqlx::PgConnection,
    rows: &[SentDelivery],
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let endpoint: Vec<i64> = rows.iter().map(|r| r.endpoint_id).collect();
    let event: Vec<String> = rows.iter().map(|r| r.event_id.clone()).collect();
    let kind: Vec<String> = rows.iter().map(|r| r.event_type.clone()).collect();
    let body: Vec<String> = rows.iter().map(|r| r.body.clone()).collect();
    let status: Vec<String> = rows.iter().map(|r| r.status.to_string()).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
    let next: Vec<DateTime<Utc>> = rows.iter().map(|r| r.next_attempt_at).collect();
    let delivered: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.delivered_at).collect();
    let code: Vec<Option<i32>> = rows.iter().map(|r| r.status_code).collect();
    let error: Vec<Option<String>> = rows.iter().map(|r| r.error.clone()).collect();
    let latency: Vec<i32> = rows.iter().map(|r| r.latency_ms).collect();
    let response: Vec<Option<String>> = rows.iter().map(|r| r.response.clone()).collect();
    sqlx::query!(
        "WITH u AS (
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::int[], $7::timestamptz[], $8::timestamptz[], $9::int[],
                                  $10::text[], $11::int[], $12::text[])
                 AS u(e, i, t, b, s, a, n, d, c, err, l, r)),
         ins AS (
             INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, body, status, attempts,
                                             next_attempt_at, created_at, delivered_at, last_status, last_error)
             SELECT e, i, t, b, s, a, n, $13, d, c, err FROM u
             ON CONFLICT (endpoint_id, event_id) DO NOTHING
             RETURNING id, endpoint_id, event_id)
         INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, latency_ms, error, response)
         SELECT ins.id, 1, $13, u.c, u.l, u.err, u.r
         FROM ins JOIN u ON u.e = ins.endpoint_id AND u.i = ins.event_id
         WHERE u.a > 0 AND u.s <> 'delivered'",
        &endpoint,
        &event,
        &kind,
        &body,
        &status,
        &attempts,
        &next,
        &delivered as &[Option<DateTime<Utc>>],
        &code as &[Option<i32>],
        &error as &[Option<String>],
        &latency,
        &response as &[Option<String>],
        now,
    )
    .execute(&mut *db)
    .await?;
    Ok(())
}

/// A message claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The delivery.
    pub id: i64,
    /// The endpoint.
    pub endpoint_id: i64,
    /// The `webhook-id`.
    pub event_id: String,
    /// The body.
    pub body: String,
    /// This attempt's number (the fence of its outcome).
    pub attempts: i32,
    /// When the message was created.
    pub created_at: DateTime<Utc>,
}

/// Claims up to `limit` due messages for one attempt each, leased until
/// `lease_until`.
pub async fn claim(
    pool: &PgPool,
    limit: i64,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<Claimed>> {
    sqlx::query_as!(
        Claimed,
        "UPDATE webhook_deliveries d SET attempts = d.attempts + 1, next_attempt_at = $2
         WHERE d.id IN (SELECT id FROM webhook_deliveries
                        WHERE status = 'pending' AND next_attempt_at <= $3
                        ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING d.id, d.endpoint_id, d.event_id, d.body, d.attempts, d.created_at",
        limit,
        lease_until,
        now,
    )
    .fetch_all(pool)
    .await
}

/// One attempt's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The delivery.
    pub id: i64,
    /// The attempt (fence: an outcome for an older attempt changes nothing).
    pub attempt: i32,
    /// What the message becomes: `delivered`, `pending` (retry) or `failed`.
    pub status: &'static str,
    /// When to try again (`pending`).
    pub next_attempt_at: DateTime<Utc>,
    /// The HTTP status, if an answer came.
    pub status_code: Option<i32>,
    /// Latency of the attempt, ms.
    pub latency_ms: i32,
    /// What went wrong (no secret, no body).
    pub error: Option<String>,
    /// The start of the answer's body, capped.
    pub response: Option<String>,
}

/// Records `outcomes` (messages and log) in one transaction, at `now`.
pub async fn finish(pool: &PgPool, outcomes: &[Outcome], now: DateTime<Utc>) -> sqlx::Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let id: Vec<i64> = outcomes.iter().map(|o| o.id).collect();
    let attempt: Vec<i32> = outcomes.iter().map(|o| o.attempt).collect();
    let status: Vec<String> = outcomes.iter().map(|o| o.status.to_string()).collect();
    let next: Vec<DateTime<Utc>> = outcomes.iter().map(|o| o.next_attempt_at).collect();
    let code: Vec<Option<i32>> = outcomes.iter().map(|o| o.status_code).collect();
    let latency: Vec<i32> = outcomes.iter().map(|o| o.latency_ms).collect();
    let error: Vec<Option<String>> = outcomes.iter().map(|o| o.error.clone()).collect();
    let response: Vec<Option<String>> = outcomes.iter().map(|o| o.response.clone()).collect();
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "UPDATE webhook_deliveries d SET status = u.s, next_attempt_at = u.n,
                delivered_at = CASE WHEN u.s = 'delivered' THEN $7 ELSE d.delivered_at END,
                last_status = u.c, last_error = u.e
         FROM unnest($1::bigint[], $2::int[], $3::text[], $4::timestamptz[], $5::int[], $6::text[])
              AS u(i, a, s, n, c, e)
         WHERE d.id = u.i AND d.attempts = u.a AND d.status = 'pending'",
        &id,
        &attempt,
        &status,
        &next,
        &code as &[Option<i32>],
        &error as &[Option<String>],
        now,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, latency_ms, error, response)
         SELECT i, a, $7, c, l, e, r
         FROM unnest($1::bigint[], $2::int[], $3::int[], $4::int[], $5::text[], $6::text[]) AS u(i, a, c, l, e, r)",
        &id,
        &attempt,
        &code as &[Option<i32>],
        &latency,
        &error as &[Option<String>],
        &response as &[Option<String>],
        now,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// A message as listed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// Its id.
    pub id: i64,
    /// The endpoint.
    pub endpoint_id: i64,
    /// The `webhook-id`.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The next attempt (pending).
    pub next_attempt_at: DateTime<Utc>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
    /// The last HTTP status.
    pub last_status: Option<i32>,
    /// The last error.
    pub last_error: Option<String>,
}

/// The newest `limit` messages to `endpoint_id`.
pub async fn for_endpoint(
    pool: &PgPool,
    endpoint_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<Delivery>> {
    sqlx::query_as!(
        Delivery,
        "SELECT id, endpoint_id, event_id, event_type, status, attempts, next_attempt_at, created_at,
                delivered_at, last_status, last_error
         FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY id DESC LIMIT $2",
        endpoint_id,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// One attempt in the log.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = DeliveryAttempt)]
pub struct Attempt {
    /// Its number.
    pub attempt: i32,
    /// When it ended.
    pub at: DateTime<Utc>,
    /// The HTTP status, if an answer came.
    pub status_code: Option<i32>,
    /// Latency, ms.
    pub latency_ms: i32,
    /// What went wrong.
    pub error: Option<String>,
    /// The start of the answer.
    pub response: Option<String>,
}

/// The log of delivery `id`, oldest first.
pub async fn attempts(pool: &PgPool, id: i64) -> sqlx::Result<Vec<Attempt>> {
    sqlx::query_as!(
        Attempt,
        "SELECT attempt, at, status_code, latency_ms, error, response
         FROM webhook_attempts WHERE delivery_id = $1 ORDER BY id",
        id,
    )
    .fetch_all(pool)
    .await
}

/// One attempt in the log, with its message (a page of messages' logs).
#[derive(Debug, Clone, Serialize)]
pub struct MessageAttempt {
    /// The message.
    pub delivery_id: i64,
    /// Its number.
    pub attempt: i32,
    /// When it ended.
    pub at: DateTime<Utc>,
    /// The HTTP status, if an answer came.
    pub status_code: Option<i32>,
    /// Latency, ms.
    pub latency_ms: i32,
    /// What went wrong.
    pub error: Option<String>,
    /// The start of the answer.
    pub response: Option<String>,
}

/// The logs of the messages `ids` (a page of them), each oldest first.
pub async fn attempts_of(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<MessageAttempt>> {
    sqlx::query_as!(
        MessageAttempt,
        "SELECT delivery_id, attempt, at, status_code, latency_ms, error, response
         FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY delivery_id, id",
        ids,
    )
    .fetch_all(pool)
    .await
}

/// Sends delivery `id` again now (whatever its status); `true` when it exists.
pub async fn replay<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $2 WHERE id = $1",
        id,
        now,
    )
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Sends again now every message to `endpoint_id` created since `since`; how many.
pub async fn replay_since<'e>(
    db: impl PgExecutor<'e>,
    endpoint_id: i64,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<u64> {
    let r = sqlx::query!(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $3
         WHERE endpoint_id = $1 AND created_at >= $2",
        endpoint_id,
        since,
        now,
    )
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// When the oldest message still undelivered was created (the backlog gauge).
pub async fn oldest_pending(pool: &PgPool) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!("SELECT min(created_at) FROM webhook_deliveries WHERE status = 'pending'")
        .fetch_one(pool)
        .await
}

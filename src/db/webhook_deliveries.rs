//! `webhook_deliveries` (one message to one endpoint, or one mail to one
//! payee: channel `email`) and `webhook_attempts`
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
    /// The endpoint (a webhook).
    pub endpoint_id: Option<i64>,
    /// The `webhook-id` (a mail's Message-ID is made of it).
    pub event_id: String,
    /// The body (a mail's plain text).
    pub body: String,
    /// This attempt's number (the fence of its outcome).
    pub attempts: i32,
    /// When the message was created.
    pub created_at: DateTime<Utc>,
    /// `webhook` or `email`.
    pub channel: String,
    /// The address a mail goes to.
    pub recipient: Option<String>,
    /// A mail's subject.
    pub subject: Option<String>,
}

/// A mail to a payee, written by the fan-out with the cursor's move and
/// sent by the deliverer (due at once).
#[derive(Debug, Clone)]
pub struct NewMail {
    /// The payee.
    pub payee_id: i64,
    /// The event's `webhook-id` (one mail per event and payee).
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// The payee's address at the fan-out.
    pub recipient: String,
    /// The subject.
    pub subject: String,
    /// The plain text.
    pub body: String,
}

/// Writes `mails`, due at `now` (one already written for its event and
/// payee is left as it is).
pub async fn insert_mail(
    db: &mut sqlx::PgConnection,
    mails: &[NewMail],
    now: DateTime<Utc>,
) -> sqlx::Result<u64> {
    if mails.is_empty() {
        return Ok(0);
    }
    let payee: Vec<i64> = mails.iter().map(|m| m.payee_id).collect();
    let event: Vec<String> = mails.iter().map(|m| m.event_id.clone()).collect();
    let kind: Vec<String> = mails.iter().map(|m| m.event_type.clone()).collect();
    let to: Vec<String> = mails.iter().map(|m| m.recipient.clone()).collect();
    let subject: Vec<String> = mails.iter().map(|m| m.subject.clone()).collect();
    let body: Vec<String> = mails.iter().map(|m| m.body.clone()).collect();
    let r = sqlx::query!(
        "INSERT INTO webhook_deliveries (channel, payee_id, event_id, event_type, recipient, subject, body,
                                         status, attempts, next_attempt_at, created_at)
         SELECT 'email', p, i, t, r, s, b, 'pending', 0, $7, $7
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             AS u(p, i, t, r, s, b)
         ON CONFLICT (payee_id, event_id) WHERE channel = 'email' DO NOTHING",
        &payee,
        &event,
        &kind,
        &to,
        &subject,
        &body,
        now,
    )
    .execute(&mut *db)
    .await?;
    Ok(r.rows_affected())
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
         RETURNING d.id, d.endpoint_id, d.event_id, d.body, d.attempts, d.created_at, d.channel,
                   d.recipient, d.subject",
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

/// Records `outcomes` at `now` in one statement: each message whose
/// attempt is still `attempt` (its lease did not move on to another
/// attempt) takes its outcome, and only those get their line in the log.
/// Returns how many were recorded.
pub async fn finish(pool: &PgPool, outcomes: &[Outcome], now: DateTime<Utc>) -> sqlx::Result<u64> {
    if outcomes.is_empty() {
        return Ok(0);
    }
    let id: Vec<i64> = outcomes.iter().map(|o| o.id).collect();
    let attempt: Vec<i32> = outcomes.iter().map(|o| o.attempt).collect();
    let status: Vec<String> = outcomes.iter().map(|o| o.status.to_string()).collect();
    let next: Vec<DateTime<Utc>> = outcomes.iter().map(|o| o.next_attempt_at).collect();
    let code: Vec<Option<i32>> = outcomes.iter().map(|o| o.status_code).collect();
    let latency: Vec<i32> = outcomes.iter().map(|o| o.latency_ms).collect();
    let error: Vec<Option<String>> = outcomes.iter().map(|o| o.error.clone()).collect();
    let response: Vec<Option<String>> = outcomes.iter().map(|o| o.response.clone()).collect();
    let r = sqlx::query!(
        "WITH u AS (
             SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::timestamptz[], $5::int[],
                                  $6::text[], $7::int[], $8::text[])
                 AS u(i, a, s, n, c, e, l, r)),
         done AS (
             UPDATE webhook_deliveries d SET status = u.s, next_attempt_at = u.n,
                    delivered_at = CASE WHEN u.s = 'delivered' THEN $9 ELSE d.delivered_at END,
                    last_status = u.c, last_error = u.e
             FROM u
             WHERE d.id = u.i AND d.attempts = u.a AND d.status = 'pending'
             RETURNING d.id, d.attempts)
         INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, latency_ms, error, response)
         SELECT u.i, u.a, $9, u.c, u.l, u.e, u.r
         FROM done JOIN u ON u.i = done.id AND u.a = done.attempts",
        &id,
        &attempt,
        &status,
        &next,
        &code as &[Option<i32>],
        &error as &[Option<String>],
        &latency,
        &response as &[Option<String>],
        now,
    )
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Renews the leases of the messages `held` ((id, attempt), still pending at
/// that attempt) until `until`: a deliverer still working on them keeps them.
pub async fn extend(pool: &PgPool, held: &[(i64, i32)], until: DateTime<Utc>) -> sqlx::Result<u64> {
    let id: Vec<i64> = held.iter().map(|h| h.0).collect();
    let attempt: Vec<i32> = held.iter().map(|h| h.1).collect();
    let r = sqlx::query!(
        "UPDATE webhook_deliveries d SET next_attempt_at = $3
         FROM unnest($1::bigint[], $2::int[]) AS u(i, a)
         WHERE d.id = u.i AND d.attempts = u.a AND d.status = 'pending' AND d.next_attempt_at < $3",
        &id,
        &attempt,
        until,
    )
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
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
        r#"SELECT id, endpoint_id AS "endpoint_id!", event_id, event_type, status, attempts,
                  next_attempt_at, created_at, delivered_at, last_status, last_error
           FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY id DESC LIMIT $2"#,
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

impl From<MessageAttempt> for Attempt {
    fn from(a: MessageAttempt) -> Self {
        Attempt {
            attempt: a.attempt,
            at: a.at,
            status_code: a.status_code,
            latency_ms: a.latency_ms,
            error: a.error,
            response: a.response,
        }
    }
}

/// A message with its delivery log (an endpoint's page of messages): the
/// message's fields and `log`, every attempt recorded, oldest first. A
/// first attempt that succeeded is not in the log; it is on the message
/// itself (`delivered_at`, `last_status`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryWithLog {
    /// The message.
    #[serde(flatten)]
    pub delivery: Delivery,
    /// Its attempts, oldest first.
    pub log: Vec<Attempt>,
}

impl DeliveryWithLog {
    /// Each of `deliveries` with its lines of `attempts` (in their order).
    pub fn join(deliveries: Vec<Delivery>, attempts: Vec<MessageAttempt>) -> Vec<DeliveryWithLog> {
        let mut logs: std::collections::HashMap<i64, Vec<Attempt>> =
            std::collections::HashMap::new();
        for a in attempts {
            logs.entry(a.delivery_id).or_default().push(a.into());
        }
        deliveries
            .into_iter()
            .map(|d| DeliveryWithLog {
                log: logs.remove(&d.id).unwrap_or_default(),
                delivery: d,
            })
            .collect()
    }
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

/// When the oldest message of `channel` (`webhook`, `email`) still
/// undelivered was created (the backlog gauges).
pub async fn oldest_pending(pool: &PgPool, channel: &str) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        "SELECT min(created_at) FROM webhook_deliveries WHERE status = 'pending' AND channel = $1",
        channel,
    )
    .fetch_one(pool)
    .await
}

/// The mails to payee `payee_id`, newest first (at most `limit`).
pub async fn mails_for_payee(pool: &PgPool, payee_id: i64, limit: i64) -> sqlx::Result<Vec<Mail>> {
    sqlx::query_as!(
        Mail,
        r#"SELECT id, event_id, event_type, recipient AS "recipient!", subject AS "subject!", status,
                  attempts, created_at, delivered_at, last_error
           FROM webhook_deliveries WHERE channel = 'email' AND payee_id = $1
           ORDER BY id DESC LIMIT $2"#,
        payee_id,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// A mail as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Mail {
    /// Its id (a delivery: `payoutctl webhooks attempts`/`replay` take it).
    pub id: i64,
    /// The event's id.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// Where it goes.
    pub recipient: String,
    /// Its subject.
    pub subject: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When the server took it.
    pub delivered_at: Option<DateTime<Utc>>,
    /// The last error.
    pub last_error: Option<String>,
}

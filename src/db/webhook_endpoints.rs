//! `webhook_endpoints`: where the platform wants to hear of events, which
//! types, and the secrets that sign them. A secret is read only to sign and
//! returned only when it is made (create, rotate): listings never show it.

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

/// An endpoint as listed (no secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Endpoint {
    /// Its id.
    pub id: i64,
    /// Where messages are POSTed.
    pub url: String,
    /// A note for people.
    pub description: String,
    /// The event types wanted (`*`: every type).
    pub event_types: Vec<String>,
    /// Whether messages are sent to it.
    pub enabled: bool,
    /// Why it was disabled by the fleet (failing too long), if it was.
    pub disabled_reason: Option<String>,
    /// Until when the previous secret still signs, after a rotation.
    pub previous_until: Option<DateTime<Utc>>,
    /// Since when every attempt to it has failed (`None`: the last succeeded).
    pub failing_since: Option<DateTime<Utc>>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// What the fan-out needs of an enabled endpoint.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// Its id.
    pub id: i64,
    /// The event types wanted (`*`: every type).
    pub event_types: Vec<String>,
    /// Events before this are not sent to it.
    pub created_at: DateTime<Utc>,
    /// Where and how to send (read in the same statement, so the fan-out
    /// reads the endpoints once per batch).
    pub target: Target,
}

/// What the deliverer needs of an endpoint: where, and the secrets that sign.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its id.
    pub id: i64,
    /// Where.
    pub url: String,
    /// Whether it is still enabled.
    pub enabled: bool,
    /// The current secret (`whsec_…`).
    pub secret: SecretString,
    /// The previous secret and until when it still signs.
    pub previous: Option<(SecretString, DateTime<Utc>)>,
    /// Since when it has been failing.
    pub failing_since: Option<DateTime<Utc>>,
}

/// Registers an endpoint with `secret`; its id.
pub async fn create<'e>(
    db: impl PgExecutor<'e>,
    url: &str,
    description: &str,
    event_types: &[String],
    enabled: bool,
    secret: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        "INSERT INTO webhook_endpoints (url, description, event_types, enabled, secret, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING id",
        url,
        description,
        event_types,
        enabled,
        secret,
        now,
    )
    .fetch_one(db)
    .await
}

/// Every endpoint, by id.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<Endpoint>> {
    sqlx::query_as!(
        Endpoint,
        "SELECT id, url, description, event_types, enabled, disabled_reason, previous_until,
                failing_since, created_at, updated_at
         FROM webhook_endpoints ORDER BY id"
    )
    .fetch_all(pool)
    .await
}

/// One endpoint.
pub async fn get<'e>(db: impl PgExecutor<'e>, id: i64) -> sqlx::Result<Option<Endpoint>> {
    sqlx::query_as!(
        Endpoint,
        "SELECT id, url, description, event_types, enabled, disabled_reason, previous_until,
                failing_since, created_at, updated_at
         FROM webhook_endpoints WHERE id = $1",
        id,
    )
    .fetch_optional(db)
    .await
}

/// Changes what is given; `true` when the endpoint exists. Enabling clears
/// the fleet's reason for disabling it and its run of failures.
#[allow(clippy::too_many_arguments)]
pub async fn update<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    url: Option<&str>,
    description: Option<&str>,
    event_types: Option<&[String]>,
    enabled: Option<bool>,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "UPDATE webhook_endpoints SET
             url = coalesce($2, url),
             description = coalesce($3, description),
             event_types = coalesce($4, event_types),
             enabled = coalesce($5, enabled),
             disabled_reason = CASE WHEN $5 IS NOT NULL THEN NULL ELSE disabled_reason END,
             failing_since = CASE WHEN $5 THEN NULL ELSE failing_since END,
             updated_at = $6
         WHERE id = $1",
        id,
        url,
        description,
        event_types,
        enabled,
        now,
    )
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Deletes an endpoint and its deliveries; `true` when it existed.
pub async fn delete<'e>(db: impl PgExecutor<'e>, id: i64) -> sqlx::Result<bool> {
    let r = sqlx::query!("DELETE FROM webhook_endpoints WHERE id = $1", id)
        .execute(db)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Makes `secret` the signing secret; the current one keeps signing until
/// `previous_until`. `true` when the endpoint exists.
pub async fn rotate<'e>(
    db: impl PgExecutor<'e>,
    id: i64,
    secret: &str,
    previous_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = $3, secret = $2,
                updated_at = $4
         WHERE id = $1",
        id,
        secret,
        previous_until,
        now,
    )
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The enabled endpoints (the fan-out's subscribers), with their targets.
pub async fn subscribers(db: &mut sqlx::PgConnection) -> sqlx::Result<Vec<Subscriber>> {
    let rows = sqlx::query!(
        "SELECT id, event_types, created_at, url, enabled, secret, previous_secret, previous_until,
                failing_since
         FROM webhook_endpoints WHERE enabled ORDER BY id"
    )
    .fetch_all(&mut *db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Subscriber {
            id: r.id,
            event_types: r.event_types,
            created_at: r.created_at,
            target: Target {
                id: r.id,
                url: r.url,
                enabled: r.enabled,
                secret: SecretString::from(r.secret),
                previous: r
                    .previous_secret
                    .zip(r.previous_until)
                    .map(|(s, u)| (SecretString::from(s), u)),
                failing_since: r.failing_since,
            },
        })
        .collect())
}

/// The endpoints `ids`, with their secrets (the deliverer's).
pub async fn targets(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<Target>> {
    let rows = sqlx::query!(
        "SELECT id, url, enabled, secret, previous_secret, previous_until, failing_since
         FROM webhook_endpoints WHERE id = ANY($1)",
        ids,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Target {
            id: r.id,
            url: r.url,
            enabled: r.enabled,
            secret: SecretString::from(r.secret),
            previous: r
                .previous_secret
                .zip(r.previous_until)
                .map(|(s, u)| (SecretString::from(s), u)),
            failing_since: r.failing_since,
        })
        .collect())
}

/// Records that an attempt to each of `ok` succeeded (the run of failures
/// ends) and to each of `failed` failed (a run starts, if none had).
pub async fn record_outcomes(
    pool: &PgPool,
    ok: &[i64],
    failed: &[i64],
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE webhook_endpoints SET
             failing_since = CASE WHEN id = ANY($1) THEN NULL ELSE coalesce(failing_since, $3) END
         WHERE (id = ANY($1) AND failing_since IS NOT NULL)
            OR (id = ANY($2) AND NOT id = ANY($1) AND failing_since IS NULL)",
        ok,
        failed,
        now,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Disables the enabled endpoints failing since before `cutoff`, with
/// `reason`; their ids.
pub async fn disable_failing(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar!(
        "UPDATE webhook_endpoints SET enabled = false, disabled_reason = $2, updated_at = $3
         WHERE enabled AND failing_since < $1 RETURNING id",
        cutoff,
        reason,
        now,
    )
    .fetch_all(pool)
    .await
}

/// How many enabled endpoints have been failing since before `cutoff`.
pub async fn count_failing(pool: &PgPool, cutoff: DateTime<Utc>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM webhook_endpoints WHERE enabled AND failing_since < $1"#,
        cutoff,
    )
    .fetch_one(pool)
    .await
}

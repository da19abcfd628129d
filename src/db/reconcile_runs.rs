//! The `reconcile_runs` table: one row per reconciliation, with what it
//! compared and the mismatches it found by kind. A run in which nothing could
//! be compared is kept too, marked failed with its reason; the latest run that
//! did compare feeds the reconciliation gauges (and the staleness alert).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// A recorded reconciliation run (the dashboard's reconcile view).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Run {
    /// Its id.
    pub id: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
    /// The payouts it compared were changed since then.
    pub since: DateTime<Utc>,
    /// How many payouts it compared.
    pub checked: i64,
    /// How many mismatches it fixed.
    pub fixed: i64,
    /// Mismatches by kind, zeros included.
    #[schema(value_type = std::collections::BTreeMap<String, i64>)]
    pub mismatches: serde_json::Value,
    /// Who ran it.
    pub actor: String,
    /// Nothing could be looked up: not a reconciliation.
    pub failed: bool,
    /// Why it failed.
    pub error: Option<String>,
}

/// A run to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun<'a> {
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// The payouts compared were changed since then.
    pub since: DateTime<Utc>,
    /// How many payouts it compared.
    pub checked: i64,
    /// How many mismatches it fixed.
    pub fixed: i64,
    /// Mismatches by kind label, zeros included.
    pub mismatches: &'a BTreeMap<String, i64>,
    /// Who ran it.
    pub actor: &'a str,
    /// Why nothing could be compared, when nothing could.
    pub failed: Option<&'a str>,
}

/// Records a finished run (its end is the database's clock).
pub async fn insert(pool: &PgPool, run: &NewRun<'_>) -> sqlx::Result<()> {
    let mismatches =
        serde_json::to_string(run.mismatches).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query!(
        "INSERT INTO reconcile_runs (started_at, finished_at, since, checked, fixed, mismatches, actor, failed, error)
         VALUES ($1, now(), $2, $3, $4, $5::text::jsonb, $6, $7, $8)",
        run.started_at,
        run.since,
        run.checked,
        run.fixed,
        mismatches,
        run.actor,
        run.failed.is_some(),
        run.failed,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// When the latest run that compared something (failed runs are skipped)
/// finished, and its mismatches by kind label; `None` before the first.
pub async fn last_counted(
    pool: &PgPool,
) -> sqlx::Result<Option<(DateTime<Utc>, BTreeMap<String, i64>)>> {
    let row = sqlx::query!(
        r#"SELECT finished_at, mismatches::text AS "mismatches!" FROM reconcile_runs
           WHERE NOT failed ORDER BY id DESC LIMIT 1"#
    )
    .fetch_optional(pool)
    .await?;
    row.map(|r| Ok((r.finished_at, counts(&r.mismatches)?)))
        .transpose()
}

/// A stored `mismatches` object as counts by kind label (a count that is not
/// a whole number reads as 0).
fn counts(text: &str) -> sqlx::Result<BTreeMap<String, i64>> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(value
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default())
}

/// A page of runs, newest first: at most `limit`, below `before_id` when given.
pub async fn page(pool: &PgPool, before_id: Option<i64>, limit: i64) -> sqlx::Result<Vec<Run>> {
    let rows = sqlx::query!(
        r#"SELECT id, started_at, finished_at, since, checked, fixed, mismatches::text AS "mismatches!",
                  actor, failed, error
           FROM reconcile_runs WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2"#,
        before_id,
        limit,
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Run {
                id: r.id,
                started_at: r.started_at,
                finished_at: r.finished_at,
                since: r.since,
                checked: r.checked,
                fixed: r.fixed,
                mismatches: serde_json::from_str(&r.mismatches)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                actor: r.actor,
                failed: r.failed,
                error: r.error,
            })
        })
        .collect()
}

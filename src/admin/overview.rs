//! The fleet overview: counts by status, success rate and throughput over the
//! last hour and day, due-to-paid percentiles, backlog age, window depth,
//! workers and the producer leader.
//!
//! Built to stay cheap with millions of payouts: counts by status read the
//! `(status, id)` index for every status but `paid`, whose count is the
//! planner's row estimate less the others once the table passes a million
//! rows (exact below); the hour and day figures read the
//! `paid_at` index for that window only; percentiles sample at most the last
//! 10,000 payouts paid in the hour. One computation is shared by every viewer
//! for `admin.overview_cache_ms`.

use std::{collections::BTreeMap, sync::Arc};

use tokio::time::Instant;

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::Serialize;
use tokio::sync::Mutex;

use super::AdminState;
use crate::{
    db::payouts::{self, Lateness},
    domain::status::ALL_STATUSES,
    producer::Leadership,
};

/// Paid and failed in one window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Window {
    /// Payouts recorded paid in the window.
    pub paid: i64,
    /// Payouts that failed in the window (by last change).
    pub failed: i64,
    /// paid / (paid + failed); `None` when neither happened.
    pub success_rate: Option<f64>,
    /// Paid per minute, averaged over the window.
    pub throughput_per_min: f64,
}

/// Due-to-paid latency percentiles, in seconds.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 95th.
    pub p95: Option<f64>,
    /// 99th.
    pub p99: Option<f64>,
    /// How many payouts the figures are over.
    pub sample: i64,
}

/// The queue window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QueueWindow {
    /// Payouts `queued` in Postgres (jobs handed to Redis and not yet claimed).
    pub queued: i64,
    /// Jobs waiting in Redis; `None` when Redis did not answer.
    pub redis_waiting: Option<u64>,
}

/// One apalis consumer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    /// Its name (`host-pid-n`).
    pub name: String,
    /// Its last heartbeat.
    pub last_heartbeat: DateTime<Utc>,
    /// Jobs it holds.
    pub in_flight: u64,
    /// Heartbeat within four intervals (plus 2 s).
    pub alive: bool,
}

/// Paid and failed in one minute.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Minute {
    /// The minute's start.
    pub t: DateTime<Utc>,
    /// Paid in it.
    pub paid: i64,
    /// Failed in it.
    pub failed: i64,
}

/// The whole overview.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// When computed.
    pub generated_at: DateTime<Utc>,
    /// Payouts by status (every status present).
    #[schema(value_type = BTreeMap<String, i64>)]
    pub counts: BTreeMap<&'static str, i64>,
    /// `paid` is an estimate (see the module docs).
    pub paid_is_estimate: bool,
    /// The last hour.
    pub last_hour: Window,
    /// The last 24 hours.
    pub last_day: Window,
    /// Due-to-paid over the last hour.
    pub due_to_paid_seconds: Percentiles,
    /// How long the oldest due, unfinished payout has waited; `None` when none waits.
    pub backlog_age_seconds: Option<f64>,
    /// The window of jobs in Redis.
    pub window: QueueWindow,
    /// Consumers registered with the queue, latest heartbeat first (at most 200).
    pub workers: Vec<WorkerInfo>,
    /// The leading producer replica.
    pub producer_leader: Option<String>,
    /// Paid and failed per minute over the last hour, oldest first.
    pub series: Vec<Minute>,
}

/// One cached overview, shared.
#[derive(Debug, Default)]
pub struct Cache(Mutex<Option<(Instant, Arc<Overview>)>>);

impl Cache {
    /// The cached overview if fresh, else a new one (computed once however
    /// many callers wait).
    pub async fn get(&self, state: &AdminState) -> anyhow::Result<Arc<Overview>> {
        let ttl = std::time::Duration::from_millis(state.settings.admin.overview_cache_ms);
        let mut slot = self.0.lock().await;
        if let Some((at, o)) = slot.as_ref()
            && at.elapsed() < ttl
        {
            return Ok(o.clone());
        }
        let o = Arc::new(compute(state).await?);
        *slot = Some((Instant::now(), o.clone()));
        Ok(o)
    }
}

async fn window(state: &AdminState, now: DateTime<Utc>, span: Duration) -> sqlx::Result<Window> {
    let since = now - span;
    let (paid, failed) = payouts::done_since(&state.pool, since).await?;
    let done = paid + failed;
    Ok(Window {
        paid,
        failed,
        success_rate: (done > 0).then(|| paid as f64 / done as f64),
        throughput_per_min: paid as f64 / span.num_minutes().max(1) as f64,
    })
}

async fn percentiles(state: &AdminState, now: DateTime<Utc>) -> sqlx::Result<Percentiles> {
    let Lateness {
        p50,
        p95,
        p99,
        sample,
    } = payouts::lateness_since(&state.pool, now - Duration::hours(1)).await?;
    Ok(Percentiles {
        p50,
        p95,
        p99,
        sample,
    })
}

async fn series(state: &AdminState, now: DateTime<Utc>) -> sqlx::Result<Vec<Minute>> {
    let end = now.duration_trunc(Duration::minutes(1)).unwrap_or(now);
    let start = end - Duration::minutes(59);
    let rows = payouts::done_per_minute(&state.pool, start).await?;
    let by: BTreeMap<DateTime<Utc>, (i64, i64)> =
        rows.into_iter().map(|(m, p, f)| (m, (p, f))).collect();
    Ok((0..60)
        .map(|i| {
            let t = start + Duration::minutes(i);
            let (paid, failed) = by.get(&t).copied().unwrap_or((0, 0));
            Minute { t, paid, failed }
        })
        .collect())
}

async fn workers(state: &AdminState, now: DateTime<Utc>) -> redis::RedisResult<Vec<WorkerInfo>> {
    let cfg = state.queue.config();
    let mut conn = state.queue.conn();
    // Members are each consumer's in-flight set key; scores its last heartbeat (unix seconds).
    let members: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
        .arg(cfg.workers_set())
        .arg(0)
        .arg(199)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let mut pipe = redis::pipe();
    for (key, _) in &members {
        pipe.scard(key);
    }
    let sizes: Vec<u64> = if members.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut conn).await?
    };
    let prefix = format!("{}:", cfg.inflight_jobs_set());
    let stale = (state.settings.worker.heartbeat_secs * 4 + 2) as f64;
    Ok(members
        .into_iter()
        .zip(sizes)
        .map(|((key, score), in_flight)| WorkerInfo {
            name: key.strip_prefix(&prefix).unwrap_or(&key).to_string(),
            last_heartbeat: DateTime::from_timestamp(score as i64, 0).unwrap_or(now),
            in_flight,
            alive: (now.timestamp() as f64 - score) <= stale,
        })
        .collect())
}

/// Computes the overview now.
pub async fn compute(state: &AdminState) -> anyhow::Result<Overview> {
    let now = state.clock.now();
    let mut counts: BTreeMap<&'static str, i64> =
        ALL_STATUSES.iter().map(|s| (s.as_str(), 0)).collect();
    let (by_status, paid_is_estimate) = payouts::status_counts_marked(&state.pool).await?;
    for (s, n) in by_status {
        counts.insert(s.as_str(), n);
    }
    let last_hour = window(state, now, Duration::hours(1)).await?;
    let last_day = window(state, now, Duration::hours(24)).await?;
    let due_to_paid_seconds = percentiles(state, now).await?;
    let backlog_age_seconds = payouts::oldest_due_unfinished(&state.pool, now)
        .await?
        .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
    let queued = payouts::count_queued(&state.pool).await?;
    let redis_waiting = state.queue.waiting().await.ok();
    let workers = workers(state, now).await.unwrap_or_else(|e| {
        tracing::warn!(error = %format_args!("{e:#}"), "overview: could not list workers from Redis");
        Vec::new()
    });
    let leadership = Leadership::new(
        state.queue.conn(),
        state.queue.prefix(),
        "admin",
        std::time::Duration::from_secs(1),
    );
    let producer_leader = leadership.leader().await.ok().flatten();
    let series = series(state, now).await?;
    Ok(Overview {
        generated_at: now,
        counts,
        paid_is_estimate,
        last_hour,
        last_day,
        due_to_paid_seconds,
        backlog_age_seconds,
        window: QueueWindow {
            queued,
            redis_waiting,
        },
        workers,
        producer_leader,
        series,
    })
}

//! The producer: finds due payouts and enqueues one job per payout, keeping
//! at most `producer.window` jobs in Redis (the backlog waits in Postgres);
//! releases what a dead worker held as soon as its liveness beat stops
//! (`producer.rescue_after_ms`, [`Producer::rescue`]); sweeps expired leases;
//! notices when Redis lost its data. Replicas elect one leader by a Redis
//! lock with a time-to-live; the others stand by.
//!
//! Priority (#17 item 4, [`crate::config::priority`]): due payouts are taken
//! by rank time, `due_at` minus a bounded boost (a payee's early request, an
//! operator's "process now", and the policy for scheduled payouts: amount or
//! payee tier), so they go ahead of the scheduled backlog yet a payout that
//! has waited longer than the boost still goes first (aging); boosted jobs
//! are pushed at the front of the Redis queue, ahead of the window.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    clock::SharedClock,
    config::{ProducerSettings, Settings},
    db::payouts,
    domain::{PayoutId, status::ALL_STATUSES},
    metrics,
    queue::{Queue, beat::Beats},
    server,
};

/// What one producer pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TickReport {
    /// Due payouts moved to `queued` and pushed.
    pub enqueued: usize,
    /// Payouts of workers whose liveness beat stopped, released and re-enqueued.
    pub rescued: usize,
    /// Expired leases re-enqueued.
    pub swept: usize,
    /// Queued payouts pushed again because Redis lost its data.
    pub recovered: usize,
    /// Queued payouts after the pass.
    pub window_depth: i64,
    /// The window was full: more may be due.
    pub window_full: bool,
}

/// One producer replica.
#[derive(Debug, Clone)]
pub struct Producer {
    /// The source of truth.
    pub pool: PgPool,
    /// The job queue.
    pub queue: Queue,
    /// Time.
    pub clock: SharedClock,
    /// Tick, window, leases.
    pub settings: ProducerSettings,
    /// `producer:<host>-<pid>`: event actor and leader lock value.
    pub actor: String,
}

fn chrono_secs(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(s as i64)
}

impl Producer {
    /// One pass: recover after Redis data loss, sweep expired leases, top up the window.
    pub async fn tick(&self) -> anyhow::Result<TickReport> {
        let mut report = TickReport::default();
        let now = self.clock.now();
        let lease_until = now + chrono_secs(self.settings.queue_lease_secs);
        // Earnings -> payouts first (only when producer.settle_on_tick is on),
        // so the payouts this pass creates are enqueued by this same pass.
        crate::services::settlement::on_producer_tick(&self.pool, &self.settings, now, &self.actor)
            .await;

        let epoch = self.queue.check_epoch().await?;
        if epoch.lost_jobs() {
            let ids = payouts::requeue_all_queued(&self.pool, lease_until, now).await?;
            if !ids.is_empty() {
                let why = match epoch {
                    crate::queue::Epoch::Missing => "Redis lost its data (epoch key missing)",
                    _ => "another Redis server holds the queue (failover or restart)",
                };
                tracing::warn!(
                    count = ids.len(),
                    "{why}: enqueueing every queued payout again"
                );
            }
            self.queue.push(&ids).await?;
            metrics::JOBS_ENQUEUED
                .with_label_values(&["redis_loss"])
                .inc_by(ids.len() as u64);
            report.recovered = ids.len();
        }

        // A rescue that fails (Redis) leaves the leases to run out: the
        // sweep below still runs.
        match self.rescue(now, lease_until).await {
            Ok(n) => report.rescued = n,
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "rescue of dead workers' payouts failed; their leases run out instead"
            ),
        }

        let swept = payouts::sweep_expired(
            &self.pool,
            now,
            self.settings.batch_size,
            lease_until,
            &self.actor,
        )
        .await?;
        if !swept.is_empty() {
            tracing::info!(
                count = swept.len(),
                "re-enqueueing payouts whose lease expired"
            );
            // Overdue: ahead of the window already waiting.
            self.queue.push_front(&swept).await?;
            metrics::JOBS_ENQUEUED
                .with_label_values(&["sweep"])
                .inc_by(swept.len() as u64);
            metrics::LEASES_RECOVERED.inc_by(swept.len() as u64);
        }
        report.swept = swept.len();

        let depth = payouts::count_queued(&self.pool).await?;
        let room = self.settings.window - depth;
        report.window_full = room <= 0;
        if room > 0 {
            let (enqueued, more) = self.fill(room, now, lease_until).await?;
            report.enqueued = enqueued;
            report.window_full = more;
        }
        let depth = depth + report.enqueued as i64;
        report.window_depth = depth;
        metrics::WINDOW_DEPTH.set(depth);
        Ok(report)
    }

    /// Releases every payout held by a worker whose liveness beat has been
    /// stale for `producer.rescue_after_ms` (SIGKILLed, OOM-killed, its
    /// node gone), instead of waiting for their leases: back to `queued`
    /// with a fresh queue lease, each with an event, and pushed at the front
    /// of the queue. A worker that was only paused finds them gone at its
    /// next renewal and starts no call for them; the fence refuses any late
    /// write. Returns how many.
    pub async fn rescue(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<usize> {
        if self.settings.rescue_after_ms == 0 {
            return Ok(0);
        }
        let beats = Beats::new(self.queue.conn(), self.queue.prefix());
        let stale = beats
            .stale(Duration::from_millis(self.settings.rescue_after_ms))
            .await?;
        if stale.is_empty() {
            return Ok(0);
        }
        let owners: Vec<String> = stale.iter().map(|s| s.owner.clone()).collect();
        let ids =
            payouts::release_owned_by(&self.pool, &owners, now, lease_until, &self.actor).await?;
        if !ids.is_empty() {
            tracing::warn!(
                count = ids.len(),
                workers = ?owners,
                "workers stopped beating: their payouts released and re-enqueued at the front of the queue"
            );
            // Marked queued first, pushed second: if this fails the queue
            // lease runs out and the sweep pushes them.
            self.queue.push_front(&ids).await?;
            metrics::JOBS_ENQUEUED
                .with_label_values(&["rescue"])
                .inc_by(ids.len() as u64);
            metrics::LEASES_RESCUED.inc_by(ids.len() as u64);
        }
        beats.forget(&stale).await?;
        Ok(ids.len())
    }

    /// Moves up to `room` due payouts to `queued` and pushes their jobs, in
    /// batches: the push of one batch overlaps the due scan of the next.
    /// Payouts are taken in rank order (`producer.priority`,
    /// [`payouts::queue_due_ranked`]); early requests' and "process now"
    /// jobs are pushed at the front of the queue.
    /// Returns how many, and whether `room` ran out with more perhaps due.
    ///
    /// Marked queued first, pushed second: if this process dies in between,
    /// the rows' lease expires and the sweep pushes them.
    pub async fn fill(
        &self,
        room: i64,
        now: chrono::DateTime<chrono::Utc>,
        lease_until: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<(usize, bool)> {
        let mut left = room;
        let mut enqueued = 0usize;
        let mut pushing: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
        let mut more = false;
        while left > 0 {
            let limit = left.min(self.settings.batch_size);
            let due = payouts::queue_due_ranked(
                &self.pool,
                &self.settings.priority,
                now,
                limit,
                lease_until,
                &self.actor,
            )
            .await?;
            if let Some(p) = pushing.take() {
                p.await??;
            }
            let n = due.len();
            metrics::JOBS_ENQUEUED
                .with_label_values(&["due"])
                .inc_by(n as u64);
            enqueued += n;
            left -= n as i64;
            // Early requests and "process now" go ahead of the window
            // already waiting in Redis; the rest join its end.
            let (front, back): (Vec<_>, Vec<_>) = due.into_iter().partition(|d| d.priority > 0);
            let front: Vec<PayoutId> = front.into_iter().map(|d| d.id).collect();
            let back: Vec<PayoutId> = back.into_iter().map(|d| d.id).collect();
            let queue = self.queue.clone();
            pushing = Some(tokio::spawn(async move {
                if !front.is_empty() {
                    queue.push_front(&front).await?;
                }
                queue.push(&back).await
            }));
            if (n as i64) < limit {
                break;
            }
            more = left <= 0;
        }
        if let Some(p) = pushing {
            p.await??;
        }
        Ok((enqueued, more))
    }

    /// Refreshes the status gauges and the backlog age. Index-backed counts
    /// (the `paid` count is the planner's estimate), run on their own interval,
    /// so they stay cheap with tens of millions of rows.
    pub async fn refresh_gauges(&self) -> anyhow::Result<()> {
        let now = self.clock.now();
        let counts = payouts::status_counts(&self.pool).await?;
        for s in ALL_STATUSES {
            let n = counts
                .iter()
                .find(|(k, _)| *k == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            metrics::PAYOUTS_BY_STATUS
                .with_label_values(&[s.as_str()])
                .set(n);
        }
        let oldest = payouts::oldest_due_unfinished(&self.pool, now).await?;
        let age = oldest.map(|t| (now - t).num_seconds().max(0)).unwrap_or(0);
        metrics::OLDEST_DUE_AGE.set(age);
        // Stuck in transit: the oldest payout the gateway accepted but never confirmed.
        let since = payouts::oldest_in_transit(&self.pool).await?;
        metrics::OLDEST_IN_TRANSIT_AGE.set(since.map_or(0, |t| (now - t).num_seconds().max(0)));
        crate::services::reconcile::publish_last_run(&self.pool).await?;
        Ok(())
    }
}

/// The leader lock among producer replicas.
#[derive(Clone)]
pub struct Leadership {
    conn: ConnectionManager,
    key: String,
    me: String,
    ttl: Duration,
    /// The last [`Leadership::hold`]'s answer, shared by the clones (the
    /// in-transit poll runs only while it is `true`).
    leading: Arc<AtomicBool>,
}

impl Leadership {
    /// Leadership under `{prefix}:producer:leader`.
    pub fn new(conn: ConnectionManager, prefix: &str, me: &str, ttl: Duration) -> Self {
        Leadership {
            conn,
            key: format!("{{{prefix}}}:producer:leader"),
            me: me.to_string(),
            ttl,
            leading: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the last [`Leadership::hold`] found this replica leading.
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// Renews if held, takes it if free; `true` when this replica leads.
    pub async fn hold(&self) -> redis::RedisResult<bool> {
        let held = self.try_hold().await;
        self.leading
            .store(matches!(held, Ok(true)), Ordering::Relaxed);
        held
    }

    async fn try_hold(&self) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let renewed: i64 = crate::queue::lock::RENEW
            .key(&self.key)
            .arg(&self.me)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        if renewed == 1 {
            return Ok(true);
        }
        let took: Option<String> = redis::cmd("SET")
            .arg(&self.key)
            .arg(&self.me)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        Ok(took.is_some())
    }

    /// Who leads now, if anyone.
    pub async fn leader(&self) -> redis::RedisResult<Option<String>> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(&self.key)
            .query_async(&mut conn)
            .await
    }

    /// Gives leadership up (graceful stop), if held.
    pub async fn resign(&self) -> redis::RedisResult<()> {
        self.leading.store(false, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let _: i64 = crate::queue::lock::RELEASE
            .key(&self.key)
            .arg(&self.me)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// The `payout-producer` process: leader election, ticks while leading.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    metrics::init();
    let pool = crate::db::connect(&settings.database).await?;
    let master =
        crate::queue::sentinel::MasterWatch::start(&settings.redis, shutdown.clone()).await?;
    let conn = crate::queue::connect(&settings.redis).await?;
    let queue = Queue::from_settings(conn.clone(), &settings);
    let me = crate::worker::worker_name();
    let producer = Producer {
        pool: pool.clone(),
        queue,
        clock: crate::clock::system(),
        settings: {
            // Settlement pays what this fleet's gateway can send.
            let mut p = settings.producer.clone();
            if p.settle_on_tick {
                p.policy = Some(std::sync::Arc::new(
                    crate::services::settlement::policy_for(&settings)?,
                ));
            }
            p
        },
        actor: format!("producer:{me}"),
    };
    let leadership = Leadership::new(
        conn.clone(),
        &settings.redis.prefix,
        &me,
        Duration::from_millis(settings.producer.leader_ttl_ms),
    );
    let sync = in_transit_sync(&settings, pool.clone(), conn.clone(), &me)?;
    let http = server::spawn(settings.producer.listen, pool, conn, shutdown.clone()).await?;
    tracing::info!(addr = %http, actor = %producer.actor, window = settings.producer.window, "producer started");
    tokio::spawn(sync_while_leading(
        sync,
        leadership.clone(),
        settings.gateway.sync.interval_secs,
        shutdown.clone(),
    ));
    run_loop(&producer, &leadership, &shutdown).await;
    let _ = leadership.resign().await;
    metrics::PRODUCER_LEADER.set(0);
    master.outcome()
}

/// The in-transit poll (`crate::services::sync`) with the configured gateway
/// (`gateway.kind`) and its onboarding check, if it has one. Every HTTP
/// request of both (look-ups, account checks) waits for the fleet-wide
/// limiter on Redis (`conn`) that the workers share.
pub fn in_transit_sync(
    settings: &Settings,
    pool: PgPool,
    conn: redis::aio::ConnectionManager,
    me: &str,
) -> anyhow::Result<crate::services::sync::InTransitSync> {
    use crate::gateway::select;
    let prefix = &settings.redis.prefix;
    let gateway = select::lookup_limited(&settings.gateway, conn.clone(), prefix)?;
    let accounts = select::account_check_limited(
        &settings.gateway,
        Some(select::fleet_limiter(&settings.gateway, conn, prefix)),
    )?;
    Ok(crate::services::sync::InTransitSync::new(
        pool,
        gateway,
        crate::clock::system(),
        settings.gateway.sync.clone(),
        format!("sync:{me}"),
    )
    .with_accounts(accounts))
}

/// Resolves `in_transit` payouts no webhook resolved, and releases payouts
/// held for onboarding, every `interval_secs` while this replica leads (the
/// standby stays quiet; a poll on both would only duplicate look-ups, the
/// writes are fenced either way).
async fn sync_while_leading(
    sync: crate::services::sync::InTransitSync,
    leadership: Leadership,
    interval_secs: u64,
    shutdown: CancellationToken,
) {
    let every = Duration::from_secs(interval_secs.max(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if !leadership.is_leading() {
            continue;
        }
        match sync.run_once().await {
            Ok(r) => tracing::debug!(?r, "in-transit poll"),
            Err(e) => {
                tracing::warn!(error = %format_args!("{e:#}"), "in-transit poll failed; next time")
            }
        }
        if let Err(e) = sync.release_onboarded().await {
            tracing::warn!(error = %format_args!("{e:#}"), "onboarding release failed; next time");
        }
    }
}

/// Leads or stands by until `shutdown`. Leadership is checked at least three
/// times per lock lifetime, so a standby takes over within one `leader_ttl_ms`.
pub async fn run_loop(producer: &Producer, leadership: &Leadership, shutdown: &CancellationToken) {
    let s = &producer.settings;
    let check_every = Duration::from_millis(s.leader_ttl_ms / 3);
    let mut next_tick = tokio::time::Instant::now();
    let mut leading = false;
    let mut ticks: u64 = 0;
    let mut next_gauges = tokio::time::Instant::now();
    loop {
        match leadership.hold().await {
            Ok(now_leading) => {
                if now_leading != leading {
                    tracing::info!(leading = now_leading, "producer leadership changed");
                    next_tick = tokio::time::Instant::now();
                }
                leading = now_leading;
            }
            Err(e) => {
                tracing::warn!(error = %format_args!("{e:#}"), "leader lock unavailable; standing by");
                leading = false;
            }
        }
        metrics::PRODUCER_LEADER.set(leading as i64);
        if leading && tokio::time::Instant::now() >= next_tick {
            let delay = match producer.tick().await {
                Ok(r) => {
                    if r.enqueued + r.rescued + r.swept + r.recovered > 0 {
                        tracing::debug!(?r, "producer tick");
                    }
                    if r.window_full || r.enqueued > 0 {
                        s.refill_ms
                    } else {
                        s.tick_ms
                    }
                }
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "producer tick failed; retrying");
                    s.tick_ms.min(1000)
                }
            };
            ticks += 1;
            if ticks % s.janitor_every_ticks.max(1) == 0 {
                if let Err(e) = producer.queue.janitor(10_000).await {
                    tracing::warn!(error = %format_args!("{e:#}"), "janitor failed");
                }
            }
            if tokio::time::Instant::now() >= next_gauges {
                if let Err(e) = producer.refresh_gauges().await {
                    tracing::warn!(error = %format_args!("{e:#}"), "gauge refresh failed");
                }
                next_gauges =
                    tokio::time::Instant::now() + Duration::from_secs(s.gauges_every_secs);
            }
            next_tick = tokio::time::Instant::now() + Duration::from_millis(delay);
        }
        let wake = if leading {
            next_tick.min(tokio::time::Instant::now() + check_every)
        } else {
            tokio::time::Instant::now() + check_every
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

//! The fault scenarios: what each injects into a running fleet,
//! when it heals, and the extra evidence some of them collect after the
//! drain (S3: the paused worker's late work was refused, by the fence or by
//! its own lease check; S11: the payouts the killed producer left `queued`
//! without a job were recovered by the lease sweep; S13: how long after
//! each kill every payout the dead worker held was claimed again; S14: that
//! every process stopped when the Redis master moved, and how soon payouts
//! flowed again through the new one; S15: how
//! soon payouts flowed again after the primary died; S16: how long the
//! payouts of a worker stopped by SIGTERM waited).
//!
//! Faults start `profile.fault_at` after seeding, while payouts are still
//! falling due, so there is always work in flight when they hit.

use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    Profile, Scenario,
    fleet::{Fleet, PREFIX, wait_ready},
    pg::PrivatePostgres,
    process::poll,
    proxy::Mode,
    redis::role,
    report::ScenarioReport,
};
use crate::{
    db::{events, payouts},
    domain::{PayoutId, PayoutStatus},
    testkit::mock_gateway::Faults,
};

/// What a scenario injected.
#[derive(Debug, Default)]
pub struct Injected {
    /// When the fault began.
    pub start: Option<DateTime<Utc>>,
    /// When it ended (everything restarted, resumed, reconnected).
    pub heal: Option<DateTime<Utc>>,
    /// What was done, for the report.
    pub notes: Vec<String>,
    /// Evidence to collect once the fleet drained.
    pub after: After,
}

/// Scenario-specific checks after the drain.
#[derive(Debug, Default)]
pub enum After {
    /// Nothing more.
    #[default]
    Nothing,
    /// S3: the paused worker's late work must have been refused.
    PausedWorker {
        /// Its slot.
        slot: usize,
        /// Its pid.
        pid: u32,
        /// Payouts it held (processing, its lease) when it was stopped.
        owned: Vec<i64>,
        /// When it was stopped.
        stopped_at: DateTime<Utc>,
    },
    /// S12: the workers must have counted the bad jobs as skipped.
    Skips {
        /// Jobs for unknown payout ids pushed.
        unknown: usize,
    },
    /// S11: batches the killed producers marked `queued` right before dying.
    Orphans {
        /// (producer actor, the batch's event time).
        batches: Vec<(String, DateTime<Utc>)>,
    },
    /// S13: every kill and what the dead worker held.
    KillStorm {
        /// The kills, in order.
        kills: Vec<Kill>,
    },
    /// S14: when the Redis master was killed and the replica promoted.
    RedisFailover {
        /// When the master was SIGKILLed.
        killed_at: DateTime<Utc>,
        /// When the sentinel had promoted the replica (`ROLE` says master).
        promoted_at: DateTime<Utc>,
        /// Fleet processes that exited after the failover, and how (restarted).
        exits: Vec<String>,
    },
    /// S15: when the primary was killed.
    Failover {
        /// When `pg_ctl stop -m immediate` returned.
        killed_at: DateTime<Utc>,
    },
    /// S16: every SIGTERM and what the stopping worker held.
    RollingRestart {
        /// The SIGTERMs, in order (`Kill::at` is when the signal was sent).
        stops: Vec<Kill>,
    },
}

/// One SIGKILL of S13.
#[derive(Debug, Clone)]
pub struct Kill {
    /// When (after the process was reaped).
    pub at: DateTime<Utc>,
    /// The payouts it held (`processing` under its lease) and their attempts.
    pub held: Vec<(i64, i32)>,
}

/// The gateway faults of issue #20, for S13: before applying, 503 (10%) and
/// 429 (3%); after applying, 500 (5%) or no answer until the client gives
/// up (2%, held 30 s).
pub fn storm_faults(profile: &Profile) -> Faults {
    Faults {
        latency_ms: 100,
        rate_5xx: 0.10,
        rate_429: 0.03,
        rate_apply_then_500: 0.05,
        rate_apply_then_timeout: 0.02,
        hang_ms: 30_000,
        ..profile.base_faults()
    }
}

/// The gateway faults a scenario starts with.
pub fn initial_faults(s: Scenario, profile: &Profile) -> Faults {
    let mut f = profile.base_faults();
    match s {
        // Answers slow enough that a killed worker dies with calls in flight.
        Scenario::S2 => f.latency_ms = 100,
        // Slow answers, so the worker is stopped with calls in flight.
        Scenario::S3 => f.latency_ms = 500,
        // Answers at 100 ms (a killed worker dies mid-call) and issue #20's faults.
        Scenario::S13 => f = storm_faults(profile),
        _ => {}
    }
    f
}

async fn paid_count(fleet: &Fleet) -> i64 {
    payouts::count_with_status(&fleet.pool, PayoutStatus::Paid)
        .await
        .unwrap_or(-1)
}

/// Injects scenario `s` into `fleet`; `t0` is when the payouts were seeded.
pub async fn inject(
    s: Scenario,
    fleet: &mut Fleet,
    pg: &mut PrivatePostgres,
    profile: &Profile,
    t0: tokio::time::Instant,
) -> anyhow::Result<Injected> {
    let mut out = Injected::default();
    if s == Scenario::S1 || (s == Scenario::S13 && !profile.kills) {
        if s == Scenario::S13 {
            out.notes.push(
                "no kills (the kill storm's baseline): the same gateway faults and settings".into(),
            );
        }
        return Ok(out);
    }
    tokio::time::sleep_until(t0 + profile.fault_at).await;
    if matches!(s, Scenario::S14 | Scenario::S15 | Scenario::S16) {
        // These faults are about work in flight: with the default producer
        // tick nothing may be claimed yet at `fault_at`.
        let pool = fleet.pool.clone();
        poll(
            Duration::from_secs(30),
            Duration::from_millis(20),
            "a payout to be in flight",
            || {
                let pool = pool.clone();
                async move {
                    let n = payouts::count_with_status(&pool, PayoutStatus::Processing)
                        .await
                        .ok()?;
                    (n > 0).then_some(())
                }
            },
        )
        .await?;
    }
    let paid_before = paid_count(fleet).await;
    out.start = Some(Utc::now());
    let mut rng = StdRng::seed_from_u64(profile.seed ^ s as u64);
    let d = profile.fault_for;
    match s {
        Scenario::S1 => {}
        Scenario::S2 => {
            let end = tokio::time::Instant::now() + d;
            let (mut kills, mut mid_attempt) = (0, 0);
            while tokio::time::Instant::now() < end {
                let slot = rng.random_range(0..fleet.workers.len());
                let pid = fleet.workers[slot].proc.pid();
                fleet.workers[slot].proc.kill9();
                let held =
                    payouts::processing_owned_like(&fleet.pool, &format!("worker:%-{pid}-%"))
                        .await?;
                mid_attempt += held.len() as i64;
                fleet.spawn_worker(Some(slot))?;
                kills += 1;
                // The fault's own cadence.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            out.notes.push(format!(
                "{kills} workers SIGKILLed (a random one every 2 s; gateway latency 100 ms) and restarted; \
                 they died holding {mid_attempt} payouts mid-attempt"
            ));
        }
        Scenario::S3 => {
            let (slot, pid, owned) = stop_a_busy_worker(fleet).await?;
            let stopped_at = Utc::now();
            // Longer than its lease and its lock, so others take its payouts over.
            let stall = Duration::from_secs(profile.lease_secs)
                + Duration::from_millis(profile.lock_ttl_ms);
            tokio::time::sleep(stall).await;
            fleet.workers[slot].proc.signal("CONT")?;
            out.notes.push(format!(
                "worker pid {pid} SIGSTOPped for {:.1} s (lease {} s, lock {} ms) holding {} payouts, then SIGCONT",
                stall.as_secs_f64(),
                profile.lease_secs,
                profile.lock_ttl_ms,
                owned.len()
            ));
            out.after = After::PausedWorker {
                slot,
                pid,
                owned,
                stopped_at,
            };
        }
        Scenario::S4 => {
            let faulty = Faults {
                rate_apply_then_500: 0.1,
                rate_apply_then_timeout: 0.1,
                rate_apply_then_reset: 0.1,
                hang_ms: 1500,
                ..profile.base_faults()
            };
            fleet.gateway.set_faults(&faulty).await?;
            tokio::time::sleep(d / 2).await;
            // The worst case of "applied, then no answer": the gateway dies.
            fleet.gateway.crash_and_restart().await?;
            fleet.gateway.set_faults(&faulty).await?;
            let reloaded = fleet.gateway.ledger().await?.len();
            tokio::time::sleep(d / 2).await;
            fleet.gateway.set_faults(&profile.base_faults()).await?;
            let st = fleet.gateway.stats().await?;
            out.notes.push(format!(
                "{:.0} s of apply-then-500 / apply-then-timeout (held 1.5 s; client timeout 1 s) / apply-then-reset at 10% each; \
                 midway the gateway was SIGKILLed and restarted, reloading {reloaded} ledger entries from its file; \
                 after the restart it answered {} requests, {} of them replays",
                d.as_secs_f64(),
                st.requests,
                st.replays
            ));
        }
        Scenario::S5 => {
            let faulty = Faults {
                rate_5xx: 0.15,
                rate_429: 0.15,
                retry_after_secs: 1,
                ..profile.base_faults()
            };
            fleet.gateway.set_faults(&faulty).await?;
            tokio::time::sleep(d).await;
            fleet.gateway.set_faults(&profile.base_faults()).await?;
            let st = fleet.gateway.stats().await?;
            out.notes.push(format!(
                "{:.0} s of 503 (15%) and 429 with Retry-After 1 s (15%) before applying; gateway answers by status: {:?}",
                d.as_secs_f64(),
                st.by_status
            ));
        }
        Scenario::S6 => {
            fleet.redis.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.redis.restart().await?;
            out.notes.push(format!(
                "Redis SIGKILLed with {paid_before} paid, down 1 s, restarted empty (no persistence)"
            ));
        }
        Scenario::S7 => {
            let waiting_before = fleet.queue.waiting().await.unwrap_or(0);
            fleet.redis.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            fleet.redis.restart().await?;
            let client = redis::Client::open(fleet.redis.url())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let epoch: Option<String> = redis::cmd("GET")
                .arg(format!("{{{PREFIX}}}:epoch"))
                .query_async(&mut conn)
                .await?;
            if epoch.is_none() {
                bail!(
                    "Redis restarted from its AOF without the epoch key: the AOF did not restore the data"
                );
            }
            out.notes.push(format!(
                "Redis (appendfsync always) SIGKILLed with {paid_before} paid and {waiting_before} jobs waiting, down 1 s, \
                 restarted from its AOF (epoch key restored)"
            ));
        }
        Scenario::S8 => {
            // Two regimes: past every lock TTL but within the clients' 5 s
            // response timeout (commands answered late, no error), then past
            // that timeout (commands fail).
            let short = Duration::from_millis(profile.lock_ttl_ms * 3 / 2);
            let long = Duration::from_secs(7);
            fleet.redis.signal("STOP")?;
            tokio::time::sleep(short).await;
            fleet.redis.signal("CONT")?;
            // The fault's own cadence: two seconds of service in between.
            tokio::time::sleep(Duration::from_secs(2)).await;
            fleet.redis.signal("STOP")?;
            tokio::time::sleep(long).await;
            fleet.redis.signal("CONT")?;
            out.notes.push(format!(
                "redis-server SIGSTOPped for {:.1} s (past the {} ms locks and 1.5 s leader lock, within the \
                 clients' 5 s response timeout), SIGCONT, 2 s later again for {:.1} s (past that timeout), SIGCONT",
                short.as_secs_f64(),
                profile.lock_ttl_ms,
                long.as_secs_f64()
            ));
        }
        Scenario::S9 => {
            pg.stop_immediate()?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            pg.start_server()?;
            out.notes.push(format!(
                "Postgres stopped with pg_ctl -m immediate with {paid_before} paid, down 1 s, restarted (crash recovery)"
            ));
        }
        Scenario::S10 => {
            let step = d / 4;
            let short = (d / 8).max(Duration::from_millis(500));
            let mut plan = vec![
                ("workers->gateway", Mode::Blackhole, step),
                ("workers->redis", Mode::Blackhole, step),
                (
                    "workers->gateway",
                    Mode::Delay(Duration::from_millis(300)),
                    step,
                ),
                ("workers->gateway", Mode::Reset, short),
                ("workers->redis", Mode::Reset, short),
            ];
            for (which, mode, len) in plan.drain(..) {
                let proxy = match which {
                    "workers->gateway" => &fleet.worker_gateway,
                    _ => &fleet.worker_redis,
                };
                proxy.set(mode);
                tokio::time::sleep(len).await;
                proxy.set(Mode::Pass);
                out.notes
                    .push(format!("{which}: {mode:?} for {:.1} s", len.as_secs_f64()));
            }
            let (g, r) = (fleet.worker_gateway.stats(), fleet.worker_redis.stats());
            use std::sync::atomic::Ordering::Relaxed;
            out.notes.push(format!(
                "proxies swallowed {} + {} bytes and reset {} + {} connections (gateway + redis)",
                g.swallowed_bytes.load(Relaxed),
                r.swallowed_bytes.load(Relaxed),
                g.reset.load(Relaxed),
                r.reset.load(Relaxed)
            ));
        }
        Scenario::S11 => {
            out.after = After::Orphans {
                batches: kill_producer_between_mark_and_push(fleet, 2).await?,
            };
            out.notes.push(
                "the producer's job pushes were dropped on the way to Redis (its lock and epoch \
                 traffic passed); it was SIGKILLed right after marking a batch queued, with that \
                 batch's push unanswered; twice, restarted each time"
                    .into(),
            );
        }
        Scenario::S12 => {
            let end = tokio::time::Instant::now() + d;
            let (mut twice, mut redelivered, mut unknown) = (0usize, 0usize, 0usize);
            fleet
                .queue
                .push_raw(b"{\"payout_id\": \"not a number\"}".to_vec())
                .await?;
            fleet.queue.push_raw(vec![0xff, 0x00, 0x13]).await?;
            while tokio::time::Instant::now() < end {
                // A producer that enqueues twice: mark due payouts queued (the
                // producer's own statement) and push two jobs for each.
                let now = Utc::now();
                let lease = now + chrono::Duration::seconds(profile.queue_lease_secs as i64);
                let ids = crate::db::payouts::queue_due(
                    &fleet.pool,
                    now,
                    50,
                    lease,
                    "producer:chaos-twice",
                )
                .await?;
                fleet.queue.push(&ids).await?;
                fleet.queue.push(&ids).await?;
                twice += ids.len();
                // And a second job for payouts the real producer queued.
                let queued =
                    payouts::ids_with_status(&fleet.pool, PayoutStatus::Queued, 500).await?;
                fleet.queue.push(&queued).await?;
                twice += queued.len();
                let paid = payouts::random_paid(&fleet.pool, 20).await?;
                fleet.queue.push(&paid).await?;
                redelivered += paid.len();
                fleet
                    .queue
                    .push(&[PayoutId::new(i64::MAX - unknown as i64)])
                    .await?;
                unknown += 1;
                // The fault's own cadence.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            out.notes.push(format!(
                "poison payouts (closed account, over-precise amount); {twice} queued payouts enqueued a second time, \
                 {redelivered} jobs for paid payouts, {unknown} for unknown ids, 2 malformed payloads"
            ));
            out.after = After::Skips { unknown };
        }
        Scenario::S13 => {
            let kills = kill_storm(fleet, profile, t0, &mut rng).await?;
            let held: usize = kills.iter().map(|k| k.held.len()).sum();
            out.notes.push(format!(
                "{} workers SIGKILLed (one of 3 every 2 s from {:.0} s after seeding until every payout was final) \
                 and restarted; they died holding {held} payouts mid-attempt; gateway at 100 ms with 10% 503 \
                 and 3% 429 before applying, 5% apply-then-500, 2% apply-then-hang",
                kills.len(),
                profile.fault_at.as_secs_f64()
            ));
            out.after = After::KillStorm { kills };
        }
        Scenario::S14 => {
            let replica = fleet
                .sentinel
                .as_ref()
                .context("S14 runs on a master, a replica and a sentinel")?
                .replica
                .port();
            fleet.redis.kill();
            let killed_at = Utc::now();
            let killed = std::time::Instant::now();
            poll(
                Duration::from_secs(60),
                Duration::from_millis(50),
                "the sentinel to promote the replica",
                || async move { (role(replica).await.as_deref() == Some("master")).then_some(()) },
            )
            .await?;
            let promoted_at = Utc::now();
            let promote_secs = killed.elapsed().as_secs_f64();
            let exits = supervise(fleet, profile, t0).await?;
            out.notes.push(format!(
                "Redis master SIGKILLed with {paid_before} paid; the sentinel (down-after 1 s, quorum 1) \
                 promoted the replica {promote_secs:.2} s later; {} fleet processes stopped on seeing the \
                 master move and were restarted as a supervisor would ({})",
                exits.len(),
                exits.join(", ")
            ));
            out.after = After::RedisFailover {
                killed_at,
                promoted_at,
                exits,
            };
        }
        Scenario::S15 => {
            let ha = fleet
                .ha
                .as_mut()
                .context("S15 runs on a primary and a standby")?;
            ha.primary.stop_immediate()?;
            let killed_at = Utc::now();
            let killed = std::time::Instant::now();
            ha.standby.promote()?;
            let promote_secs = killed.elapsed().as_secs_f64();
            let standby = std::net::SocketAddr::from(([127, 0, 0, 1], ha.standby.port()));
            fleet
                .postgres
                .as_ref()
                .context("S15 runs behind the Postgres proxy")?
                .set_upstream(standby);
            out.notes.push(format!(
                "primary (synchronous_commit = on, one synchronous streaming standby) stopped with pg_ctl -m immediate \
                 with {paid_before} paid; standby promoted (pg_ctl promote -w) {promote_secs:.2} s later and the \
                 fleet's address (a TCP proxy, as a DNS name or HAProxy would be) switched to it"
            ));
            out.after = After::Failover { killed_at };
        }
        Scenario::S16 => {
            let stops = rolling_restart(fleet, profile, t0).await?;
            let held: usize = stops.iter().map(|k| k.held.len()).sum();
            out.notes.push(format!(
                "{} workers replaced one at a time, as a Kubernetes rollout does (a new one started and ready, \
                 then an old one SIGTERMed and waited for); they held {held} payouts when signalled",
                stops.len()
            ));
            out.after = After::RollingRestart { stops };
        }
    }
    out.heal = Some(Utc::now());
    Ok(out)
}

/// S13: one of the workers, at random, SIGKILLed and restarted every 2 s
/// until every payout is final (or the drain deadline passes). Each kill
/// notes what the dead worker held.
async fn kill_storm(
    fleet: &mut Fleet,
    profile: &Profile,
    t0: tokio::time::Instant,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<Kill>> {
    let deadline = t0 + profile.spread + profile.drain_deadline;
    let mut kills = Vec::new();
    loop {
        let slot = rng.random_range(0..fleet.workers.len());
        let pid = fleet.workers[slot].proc.pid();
        fleet.workers[slot].proc.kill9();
        let at = Utc::now();
        let held =
            payouts::processing_owned_like(&fleet.pool, &format!("worker:%-{pid}-%")).await?;
        kills.push(Kill { at, held });
        fleet.spawn_worker(Some(slot))?;
        // The fault's own cadence, watching for the end of the run.
        let next = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < next {
            if open_count(fleet).await == Some(0) || tokio::time::Instant::now() >= deadline {
                return Ok(kills);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// S16: rounds of a rolling restart until every payout is final (at least
/// one round): for each worker, a replacement is started and
/// waited for (ready), then the old one gets SIGTERM and is waited for; it
/// must exit on its own, successfully, within its shutdown deadline.
async fn rolling_restart(
    fleet: &mut Fleet,
    profile: &Profile,
    t0: tokio::time::Instant,
) -> anyhow::Result<Vec<Kill>> {
    let n = fleet.workers.len();
    let shutdown = fleet.settings.worker.shutdown_deadline_secs;
    let mut stops = Vec::new();
    loop {
        for _ in 0..n {
            let port = fleet.spawn_worker(None)?;
            wait_ready(port).await?;
            let mut old = fleet.workers.remove(0);
            let pid = old.proc.pid();
            old.proc.signal("TERM")?;
            let at = Utc::now();
            let held =
                payouts::processing_owned_like(&fleet.pool, &format!("worker:%-{pid}-%")).await?;
            let name = old.proc.name().to_string();
            let status = poll(
                Duration::from_secs(shutdown + 10),
                Duration::from_millis(20),
                &format!("{name} to exit after SIGTERM"),
                || {
                    let st = old.proc.exited();
                    async move { st }
                },
            )
            .await?;
            if !status.success() {
                bail!("{name} exited with {status} after SIGTERM");
            }
            stops.push(Kill { at, held });
        }
        let deadline = t0 + profile.spread + profile.drain_deadline;
        if open_count(fleet).await == Some(0) || tokio::time::Instant::now() >= deadline {
            return Ok(stops);
        }
    }
}

/// S14: what compose's `restart: unless-stopped` and Kubernetes do: every
/// fleet process that exits is started again (same slot), until every
/// payout is final or the drain deadline passes. Returns each exit
/// (`name: status`).
async fn supervise(
    fleet: &mut Fleet,
    profile: &Profile,
    t0: tokio::time::Instant,
) -> anyhow::Result<Vec<String>> {
    let deadline = t0 + profile.spread + profile.drain_deadline;
    let mut exits = Vec::new();
    loop {
        if let Some(p) = fleet.producer.as_mut()
            && let Some(status) = p.exited()
        {
            exits.push(format!("{}: {status}", p.name()));
            fleet.spawn_producer()?;
        }
        for slot in 0..fleet.workers.len() {
            let w = &mut fleet.workers[slot].proc;
            if let Some(status) = w.exited() {
                exits.push(format!("{}: {status}", w.name()));
                fleet.spawn_worker(Some(slot))?;
            }
        }
        if open_count(fleet).await == Some(0) || tokio::time::Instant::now() >= deadline {
            return Ok(exits);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn open_count(fleet: &Fleet) -> Option<i64> {
    payouts::count_open(&fleet.pool).await.ok()
}

/// S3: SIGSTOPs a worker that holds payouts (processing under its lease):
/// the busiest one; if its calls all finished before the signal landed, it
/// is continued and the next busiest is tried. Returns its slot, pid and the
/// payouts it held when stopped.
async fn stop_a_busy_worker(fleet: &Fleet) -> anyhow::Result<(usize, u32, Vec<i64>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let busiest = payouts::busiest_owner(&fleet.pool).await?;
        let found = busiest.and_then(|owner| {
            fleet
                .workers
                .iter()
                .position(|w| owner.contains(&format!("-{}-", w.proc.pid())))
        });
        if let Some(slot) = found {
            let proc = &fleet.workers[slot].proc;
            let pid = proc.pid();
            proc.signal("STOP")?;
            let owned: Vec<i64> =
                payouts::processing_owned_like(&fleet.pool, &format!("worker:%-{pid}-%"))
                    .await?
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
            if !owned.is_empty() {
                return Ok((slot, pid, owned));
            }
            proc.signal("CONT")?;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no worker held a payout to be stopped with within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// S11: makes the producer's job pushes vanish on their way to Redis (its
/// leader lock and epoch checks still pass), waits until it marks a batch
/// `queued`, and SIGKILLs it while that batch's push hangs: the batch is in
/// Postgres as `queued` and nowhere in Redis. `times` times, restarting the
/// producer each time. Returns the orphaned batches.
async fn kill_producer_between_mark_and_push(
    fleet: &mut Fleet,
    times: usize,
) -> anyhow::Result<Vec<(String, DateTime<Utc>)>> {
    let mut batches = Vec::new();
    for _ in 0..times {
        // Every job payload carries `payout_id`; nothing else the producer sends does.
        fleet.producer_redis.set(Mode::DropContaining("payout_id"));
        let pid = fleet.producer.as_ref().context("no producer")?.pid();
        let actor_like = format!("producer:%-{pid}-%");
        let seen = events::max_id(&fleet.pool).await?;
        let pool = fleet.pool.clone();
        let (actor, at): (String, DateTime<Utc>) = poll(
            Duration::from_secs(30),
            Duration::from_millis(10),
            "the producer to mark a batch queued",
            || {
                let (pool, actor_like) = (pool.clone(), actor_like.clone());
                async move {
                    events::latest_queued_by(&pool, seen, &actor_like)
                        .await
                        .ok()
                        .flatten()
                }
            },
        )
        .await?;
        if let Some(p) = fleet.producer.as_mut() {
            p.kill9();
        }
        fleet.producer_redis.set(Mode::Pass);
        batches.push((actor, at));
        fleet.spawn_producer()?;
    }
    Ok(batches)
}

/// Scrapes one counter from a worker's `/metrics`.
async fn counter(port: u16, name: &str) -> Option<f64> {
    let body = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Collects the after-drain evidence of `after` into `report`.
pub async fn after_drain(
    after: &After,
    fleet: &Fleet,
    profile: &Profile,
    report: &mut ScenarioReport,
) -> anyhow::Result<()> {
    match after {
        After::Nothing => {}
        After::PausedWorker {
            slot,
            pid,
            owned,
            stopped_at,
        } => {
            let port = fleet.workers[*slot].port;
            // It finishes its old calls within seconds of SIGCONT (every call
            // times out after 1 s, and no new one starts: its lease is gone);
            // wait until it holds no job, then count.
            poll(
                Duration::from_secs(20),
                Duration::from_millis(100),
                "the resumed worker to finish its old jobs",
                || async move {
                    counter(port, "payout_jobs_in_flight")
                        .await
                        .filter(|n| *n == 0.0)
                },
            )
            .await?;
            let fenced = counter(port, "payout_stale_fence_writes_total")
                .await
                .context("the resumed worker's /metrics")?;
            // With leases renewed and a call margin, the paused worker may
            // make no late write at all: its lease check refuses to start
            // the calls (its payouts were taken over while it slept).
            let not_started = counter(port, "payout_lease_refused_calls_total")
                .await
                .context("the resumed worker's /metrics")?;
            let refused = fenced + not_started;
            let late = *stopped_at + chrono::Duration::seconds(1);
            let accepted =
                events::outcomes_by_after(&fleet.pool, owned, &format!("worker:%-{pid}-%"), late)
                    .await?;
            report.notes.push(format!(
                "after SIGCONT the paused worker's late work was refused: the fence refused {fenced} late writes \
                 (and accepted {accepted}), its lease check refused to start {not_started} calls"
            ));
            if accepted > 0 {
                report.violation(format!(
                    "{accepted} outcomes of the paused worker were recorded after its lease ran out"
                ));
            }
            if !owned.is_empty() && refused < 1.0 {
                report.violation(format!(
                    "the paused worker held {} payouts but neither the fence nor its lease check refused anything",
                    owned.len()
                ));
            }
        }
        After::Skips { unknown } => {
            // Every bad job is acknowledged and counted by whichever worker got it.
            let sum = |reason: &'static str| async move {
                let mut n = 0.0;
                for w in &fleet.workers {
                    let name = format!("payout_jobs_skipped_total{{reason=\"{reason}\"}}");
                    n += counter(w.port, &name).await.unwrap_or(0.0);
                }
                n
            };
            // Both malformed payloads reach the handler (the one that is not
            // JSON through the lenient codec); so do the unknown ids.
            let want_unknown = *unknown as f64;
            let counted = poll(
                Duration::from_secs(10),
                Duration::from_millis(100),
                "the workers to count the bad jobs",
                || async move {
                    let got = (sum("malformed").await, sum("not_found").await);
                    (got.0 >= 2.0 && got.1 >= want_unknown).then_some(got)
                },
            )
            .await;
            let dup = sum("not_claimable").await + sum("locked").await;
            match counted {
                Ok((m, u)) => report.notes.push(format!(
                    "workers counted {m} malformed and {u} unknown-payout jobs as skipped, and skipped {dup} \
                     duplicate or finished ones; none touched money"
                )),
                Err(_) => report.violation(format!(
                    "the workers did not count the bad jobs as skipped (malformed {}, unknown {}; wanted >= 2, {unknown})",
                    sum("malformed").await,
                    sum("not_found").await
                )),
            }
            // Nothing else in S12 ends an apalis worker: any restart is the garbage.
            let mut restarts = 0.0;
            for w in &fleet.workers {
                restarts += counter(w.port, "payout_worker_restarts_total")
                    .await
                    .unwrap_or(0.0);
            }
            if restarts > 0.0 {
                report.violation(format!(
                    "a bad payload ended an apalis worker instead of being counted: {restarts} restarts"
                ));
            }
        }
        After::KillStorm { kills } => {
            let mut secs = Vec::new();
            let mut never = 0usize;
            for k in kills {
                for (id, attempt) in &k.held {
                    let next = events::first_claim_above(&fleet.pool, *id, *attempt).await?;
                    match next {
                        Some(t) => secs.push((t - k.at).num_milliseconds().max(0) as f64 / 1000.0),
                        None => never += 1,
                    }
                }
            }
            secs.sort_by(f64::total_cmp);
            let q = |p| super::report::percentile(&secs, p).unwrap_or(0.0);
            let (p50, p99, max) = (q(0.5), q(0.99), secs.last().copied().unwrap_or(0.0));
            let (rescued, swept) = events::released_counts(&fleet.pool).await?;
            if !secs.is_empty() {
                report.reclaim_secs = Some([p50, p99, max]);
            }
            report.notes.push(format!(
                "{} payouts held by the killed workers; each claimed again after the kill in p50 {p50:.2} s, \
                 p99 {p99:.2} s, max {max:.2} s ({never} never claimed again); \
                 {rescued} released by the rescue (beat stopped), {swept} by the lease sweep",
                secs.len() + never
            ));
            let lease = if profile.defaults {
                crate::config::Settings::load_from(None, &[])?
                    .worker
                    .lease_secs as f64
            } else {
                profile.lease_secs as f64
            };
            if p99 > lease {
                report.findings.push(format!(
                    "kill -> re-claim p99 {p99:.2} s is longer than one lease ({lease} s)"
                ));
            }
        }
        After::RedisFailover {
            killed_at,
            promoted_at,
            exits,
        } => {
            let (first, last) = payouts::paid_span_after(&fleet.pool, *promoted_at).await?;
            let after = |t: Option<DateTime<Utc>>| {
                t.map(|t| (t - *killed_at).num_milliseconds() as f64 / 1000.0)
            };
            if exits.is_empty() {
                report.violation(
                    "no fleet process stopped after the Redis master moved: they kept using the old address"
                        .into(),
                );
            }
            match (after(first), after(last)) {
                (Some(first), Some(last)) => report.notes.push(format!(
                    "after the master died: the first payout paid after the promotion {first:.2} s after the \
                     kill; the last payout paid {last:.2} s after the kill"
                )),
                _ => report.violation(
                    "no payout was paid after the Redis failover: the scenario did not test what it says"
                        .into(),
                ),
            }
        }
        After::Failover { killed_at } => {
            let (first, last) = payouts::paid_span_after(&fleet.pool, *killed_at).await?;
            let after = |t: Option<DateTime<Utc>>| {
                t.map(|t| (t - *killed_at).num_milliseconds() as f64 / 1000.0)
            };
            match (after(first), after(last)) {
                (Some(first), Some(last)) => report.notes.push(format!(
                    "after the primary died: payouts flowing again (first paid on the promoted standby) in \
                     {first:.2} s; the last payout paid {last:.2} s after the kill"
                )),
                _ => report.violation(
                    "no payout was paid after the failover: the scenario did not test what it says".into(),
                ),
            }
        }
        After::RollingRestart { stops } => {
            let lease = if profile.defaults {
                crate::config::Settings::load_from(None, &[])?
                    .worker
                    .lease_secs
            } else {
                profile.lease_secs
            };
            let (mut held, mut reclaimed, mut waited) = (0usize, 0usize, 0f64);
            for k in stops {
                for (id, attempt) in &k.held {
                    held += 1;
                    let (now_attempt, ended) =
                        payouts::attempt_and_last_event(&fleet.pool, *id).await?;
                    if now_attempt > *attempt {
                        reclaimed += 1;
                    }
                    if let Some(t) = ended {
                        waited = waited.max((t - k.at).num_milliseconds() as f64 / 1000.0);
                    }
                }
            }
            // A payout whose job a stopping worker fetched and then left
            // stranded is claimed only once the sweep re-enqueues it, a
            // queue lease after it was marked queued.
            let queue_lease = if profile.defaults {
                crate::config::Settings::load_from(None, &[])?
                    .producer
                    .queue_lease_secs
            } else {
                profile.queue_lease_secs
            };
            let stranded = events::queued_claimed_late(
                &fleet.pool,
                stops.first().map(|k| k.at),
                queue_lease as f64 - 0.3,
            )
            .await?;
            report.notes.push(format!(
                "{held} payouts were held by workers when they got SIGTERM: {reclaimed} had to be claimed again \
                 by another worker; the longest took {waited:.2} s from the SIGTERM to its last event (lease {lease} s); \
                 {stranded} payouts waited for the sweep ({queue_lease} s queue lease) to be claimed"
            ));
            if stranded > 0 {
                report.violation(format!(
                    "{stranded} payouts were claimed only after their {queue_lease} s queue lease ran out: jobs \
                     fetched by a stopping worker were left stranded"
                ));
            }
            if waited > lease as f64 {
                report.violation(format!(
                    "a payout held by a stopping worker waited {waited:.2} s, more than one lease ({lease} s)"
                ));
            }
        }
        After::Orphans { batches } => {
            let mut orphaned = 0i64;
            let mut swept = 0i64;
            for (actor, at) in batches {
                // Each payout of the batch, and its first claim after being marked.
                let claims = events::claims_after_queued(&fleet.pool, actor, *at).await?;
                let lease =
                    chrono::Duration::milliseconds(profile.queue_lease_secs as i64 * 1000 - 300);
                for (_, claimed) in &claims {
                    orphaned += 1;
                    if claimed.is_some_and(|c| c >= *at + lease) {
                        swept += 1;
                    }
                }
            }
            report.notes.push(format!(
                "{orphaned} payouts were marked queued by the killed producers; {swept} of them were claimed only \
                 after their {} s queue lease ran out, i.e. recovered by the sweep (their job never reached Redis)",
                profile.queue_lease_secs
            ));
            if swept == 0 {
                report.violation(
                    "no kill landed between marking and pushing: the scenario did not test what it says".into(),
                );
            }
        }
    }
    Ok(())
}

//! The chaos harness: proves the one rule (nobody paid twice, nobody
//! forgotten) under fifteen fault scenarios, with real parts only.
//!
//! For each scenario [`run`] starts a fresh fleet (see [`fleet`]): its own
//! database on a private Postgres, a private redis-server, the mock gateway
//! binary with a durable ledger file, a producer and N worker processes,
//! with the workers' Redis and gateway traffic and the producer's Redis
//! traffic going through switchable TCP proxies ([`proxy`]). It seeds a few
//! thousand payouts falling due over the first seconds, injects the
//! scenario's fault while they are in flight ([`scenarios`]), waits (polling,
//! with a deadline) until every payout is final, stops the fleet, and checks
//! the invariants against the database and the gateway's ledger
//! ([`report`]). One table row per scenario.
//!
//! `payout-chaos` (the binary) runs the full suite; `tests/it/chaos.rs` runs
//! the short form with the test command.

pub mod fleet;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod report;
pub mod scenarios;

use std::{collections::HashMap, path::PathBuf, str::FromStr, time::Duration};

use anyhow::{Context, bail};
use chrono::Utc;
use rust_decimal::Decimal;
use serde::Serialize;

pub use fleet::Bins;
pub use report::ScenarioReport;

use crate::{
    db::{payees, payouts},
    domain::{Currency, Money},
    testkit::mock_gateway::Faults,
};
use fleet::{Fleet, FleetSpec};
use pg::PrivatePostgres;
use process::{TempDir, poll};
use report::{Expect, Ledgers};

/// One fault scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Scenario {
    /// No fault (baseline).
    S1 = 1,
    /// A random worker SIGKILLed every 2 s, and restarted.
    S2,
    /// A worker SIGSTOPped past its lock and lease, then continued.
    S3,
    /// The gateway applies, then times out, answers 500 or resets; and crashes.
    S4,
    /// The gateway answers 5xx and 429 before applying, 30% of the time.
    S5,
    /// Redis killed and restarted empty.
    S6,
    /// Redis killed and restarted from its AOF.
    S7,
    /// Redis stalled (SIGSTOP) past every lock TTL.
    S8,
    /// Postgres restarted with `pg_ctl -m immediate`.
    S9,
    /// Network cut (blackhole, delay, reset) between workers and Redis or gateway.
    S10,
    /// The producer killed between marking payouts queued and enqueuing them.
    S11,
    /// Poison payouts, and jobs enqueued twice (plus redeliveries and garbage).
    S12,
    /// Kill storm: one of three workers SIGKILLed every 2 s (and restarted)
    /// for the whole run, under the gateway faults of issue #20.
    S13,
    /// Redis Sentinel failover: the master SIGKILLed mid-run, the sentinel
    /// promotes the replica, every process stops, exits non-zero and is
    /// restarted (as compose or Kubernetes would) against the new master.
    S14,
    /// Postgres failover: the primary (synchronous streaming replication)
    /// killed mid-run, the standby promoted, the fleet's address switched to it.
    S15 = 15,
    /// Rolling restart: every worker SIGTERMed and replaced, one at a time,
    /// under load (what a Kubernetes rollout does).
    S16,
}

impl Scenario {
    /// Every scenario, in order.
    pub const ALL: [Scenario; 16] = [
        Scenario::S1,
        Scenario::S2,
        Scenario::S3,
        Scenario::S4,
        Scenario::S5,
        Scenario::S6,
        Scenario::S7,
        Scenario::S8,
        Scenario::S9,
        Scenario::S10,
        Scenario::S11,
        Scenario::S12,
        Scenario::S13,
        Scenario::S14,
        Scenario::S15,
        Scenario::S16,
    ];

    /// `S1` ... `S16`.
    pub fn id(self) -> String {
        format!("S{}", self as u8)
    }

    /// A few words for the table.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::S1 => "baseline",
            Scenario::S2 => "worker SIGKILL every 2 s",
            Scenario::S3 => "worker SIGSTOP > lease",
            Scenario::S4 => "gateway applies, then 500/timeout/reset; gateway crash",
            Scenario::S5 => "gateway 5xx/429 at 30%",
            Scenario::S6 => "Redis restarted empty",
            Scenario::S7 => "Redis restarted from AOF",
            Scenario::S8 => "Redis stalled > lock TTLs",
            Scenario::S9 => "Postgres restart -m immediate",
            Scenario::S10 => "network cut (blackhole/delay/reset)",
            Scenario::S11 => "producer killed between mark and push",
            Scenario::S12 => "poison payouts + jobs enqueued twice",
            Scenario::S13 => "kill storm: 1 of 3 workers SIGKILLed every 2 s, whole run",
            Scenario::S14 => "Redis Sentinel failover: master SIGKILLed, replica promoted",
            Scenario::S15 => "Postgres failover to a synchronous standby",
            Scenario::S16 => "rolling restart: each worker SIGTERMed and replaced in turn",
        }
    }

    /// Worker processes the scenario runs with: S13 is defined with three.
    pub fn workers(self, profile: &Profile) -> usize {
        match self {
            Scenario::S13 => 3,
            _ => profile.workers,
        }
    }
}

/// A scenario name that is not one of S1 ... S16.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scenario {0:?} (S1 ... S16)")]
pub struct UnknownScenario(pub String);

impl FromStr for Scenario {
    type Err = UnknownScenario;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownScenario(s.to_string());
        let n: u8 = s
            .trim()
            .trim_start_matches(['S', 's'])
            .parse()
            .map_err(|_| unknown())?;
        Scenario::ALL
            .into_iter()
            .find(|sc| *sc as u8 == n)
            .ok_or_else(unknown)
    }
}

/// Sizes and timings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Payouts per scenario (poison ones of S12 come on top).
    pub payouts: i64,
    /// Worker processes.
    pub workers: usize,
    /// Payouts fall due evenly over this long after seeding.
    pub spread: Duration,
    /// When the fault starts, after seeding.
    pub fault_at: Duration,
    /// How long a fault lasts (the scenario may scale it).
    pub fault_for: Duration,
    /// How long after the last due time the fleet may take to drain.
    pub drain_deadline: Duration,
    /// `worker.lease_secs` of the children.
    pub lease_secs: u64,
    /// `worker.lock_ttl_ms` of the children.
    pub lock_ttl_ms: u64,
    /// `producer.queue_lease_secs` of the children.
    pub queue_lease_secs: u64,
    /// Seed of the gateway's faults and the harness's choices.
    pub seed: u64,
    /// The children run with the *default* lease, lock, renewal, beat,
    /// rescue, timeout, retry and tick settings (only addresses and the log
    /// format are set): how the fleet recovers out of the box. Off: the fast
    /// timings below (`child_env`), so faults heal in seconds.
    pub defaults: bool,
    /// S13 kills workers (off: the same run without kills, its baseline).
    pub kills: bool,
}

impl Profile {
    /// The full suite: a few thousand payouts, faults of several seconds.
    pub fn full(payouts: i64, workers: usize) -> Profile {
        Profile {
            payouts,
            workers,
            spread: Duration::from_secs(12),
            fault_at: Duration::from_secs(3),
            fault_for: Duration::from_secs(8),
            drain_deadline: Duration::from_secs(120),
            lease_secs: 4,
            lock_ttl_ms: 2000,
            queue_lease_secs: 3,
            seed: 7,
            defaults: false,
            kills: true,
        }
    }

    /// The full form with the fleet's default settings (`--defaults`): the
    /// payouts all due within 2 s, and a drain deadline long enough for the
    /// default retry schedule (5 min before a second attempt).
    pub fn defaults(payouts: i64, workers: usize) -> Profile {
        Profile {
            spread: Duration::from_secs(2),
            fault_at: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(900),
            defaults: true,
            ..Profile::full(payouts, workers)
        }
    }

    /// The short form for the test command: few payouts, short faults.
    pub fn short(payouts: i64, workers: usize) -> Profile {
        Profile {
            spread: Duration::from_secs(3),
            fault_at: Duration::from_secs(1),
            fault_for: Duration::from_secs(4),
            drain_deadline: Duration::from_secs(60),
            ..Profile::full(payouts, workers)
        }
    }

    /// The gateway's behaviour outside faults: a few ms per call.
    pub fn base_faults(&self) -> Faults {
        Faults {
            latency_ms: 2,
            latency_jitter_ms: 6,
            retry_after_secs: 1,
            hang_ms: 1500,
            permanent_code: "account_closed".into(),
            ..Faults::default()
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Sizes and timings.
    pub profile: Profile,
    /// The fleet's binaries.
    pub bins: Bins,
    /// Where child logs go (kept); `None`: a temp dir, removed at the end.
    pub log_dir: Option<PathBuf>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// When it started.
    pub started_at: chrono::DateTime<Utc>,
    /// Sizes and timings used.
    pub profile: Profile,
    /// One row per scenario.
    pub scenarios: Vec<ScenarioReport>,
    /// Wall time, seconds.
    pub duration_secs: f64,
}

impl RunReport {
    /// Every scenario kept every invariant.
    pub fn ok(&self) -> bool {
        self.scenarios.iter().all(ScenarioReport::ok)
    }

    /// The table (Markdown).
    pub fn table(&self) -> String {
        report::table(&self.scenarios)
    }

    /// Notes, violations and errors per scenario.
    pub fn details(&self) -> String {
        report::details(&self.scenarios)
    }
}

/// Runs the scenarios one after another on one private Postgres; a scenario
/// that cannot run is a failed row, and the run goes on.
pub async fn run(opts: ChaosOptions) -> anyhow::Result<RunReport> {
    opts.bins.check()?;
    let started = std::time::Instant::now();
    let started_at = Utc::now();
    let tmp = TempDir::new("payouts-chaos")?;
    let log_root = opts
        .log_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("logs"));
    std::fs::create_dir_all(&log_root)?;
    let mut pg = PrivatePostgres::start(&tmp.path().join("pg")).context("private Postgres")?;
    let mut rows = Vec::new();
    for s in &opts.scenarios {
        tracing::info!(scenario = %s.id(), title = s.title(), "scenario starts");
        let row = run_scenario(*s, &mut pg, &opts, tmp.path(), &log_root).await;
        tracing::info!(scenario = %s.id(), ok = row.ok(), secs = row.duration_secs, "scenario done");
        rows.push(row);
    }
    drop(pg);
    Ok(RunReport {
        started_at,
        profile: opts.profile.clone(),
        scenarios: rows,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

async fn run_scenario(
    s: Scenario,
    pg: &mut PrivatePostgres,
    opts: &ChaosOptions,
    tmp: &std::path::Path,
    log_root: &std::path::Path,
) -> ScenarioReport {
    let started = std::time::Instant::now();
    let mut report = ScenarioReport {
        id: s.id(),
        title: s.title().into(),
        ..Default::default()
    };
    if let Err(e) = scenario_body(s, pg, opts, tmp, log_root, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    report
}

/// The account the mock gateway answers `account_closed` for (S12).
const POISON_ACCOUNT: &str = "acct_poison_closed";

async fn scenario_body(
    s: Scenario,
    pg: &mut PrivatePostgres,
    opts: &ChaosOptions,
    tmp: &std::path::Path,
    log_root: &std::path::Path,
    report: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let profile = &opts.profile;
    let spec = FleetSpec {
        aof: s == Scenario::S7,
        closed_destinations: if s == Scenario::S12 {
            vec![POISON_ACCOUNT.into()]
        } else {
            vec![]
        },
        pg_proxy: s == Scenario::S15,
        sentinel: s == Scenario::S14,
    };
    let dir = tmp.join(s.id());
    let logs = log_root.join(s.id());
    let _ = std::fs::remove_dir_all(&logs);
    let mut fleet = if s == Scenario::S15 {
        // Its own primary and synchronous standby: the shared Postgres of
        // the other scenarios is not killed for good.
        let primary =
            PrivatePostgres::start_sync_primary(&dir.join("pg-primary")).context("S15 primary")?;
        let standby = PrivatePostgres::standby_of(&primary, &dir.join("pg-standby"))
            .await
            .context("S15 standby")?;
        let mut fleet =
            Fleet::start(&s.id(), &dir, &logs, &primary, &opts.bins, profile, &spec).await?;
        fleet.ha = Some(fleet::HaPostgres { primary, standby });
        fleet
    } else {
        Fleet::start(&s.id(), &dir, &logs, pg, &opts.bins, profile, &spec).await?
    };
    fleet
        .gateway
        .set_faults(&scenarios::initial_faults(s, profile))
        .await?;
    fleet.start_processes(s.workers(profile)).await?;

    let t0 = tokio::time::Instant::now();
    let expect = seed(&fleet, s, profile).await?;
    let injected = scenarios::inject(s, &mut fleet, pg, profile, t0).await?;
    report.notes.extend(injected.notes.iter().cloned());
    report.fault_window = injected.start.zip(injected.heal);

    // Drain: every payout final, by the deadline.
    let deadline = (t0 + profile.spread + profile.drain_deadline)
        .saturating_duration_since(tokio::time::Instant::now());
    let pool = fleet.pool.clone();
    let drained = poll(
        deadline,
        Duration::from_millis(100),
        "every payout to be final",
        || {
            let pool = pool.clone();
            async move {
                let open = payouts::count_open(&pool).await.ok()?;
                (open == 0).then_some(())
            }
        },
    )
    .await;
    match &drained {
        Ok(()) => report.drain_secs = Some(t0.elapsed().as_secs_f64()),
        Err(e) => report.notes.push(format!("did not drain: {e}")),
    }
    if drained.is_ok() {
        scenarios::after_drain(&injected.after, &fleet, profile, report).await?;
    }
    report.findings.extend(fleet.unexpected_exits());

    // Quiesce: no fleet process may write while the invariants are read.
    fleet.kill_processes();
    let ledgers = quiesced_ledgers(&fleet).await?;
    report::check(&fleet.pool, &ledgers, &expect, injected.heal, report).await?;
    if drained.is_err() && report.stuck == 0 {
        report.violation("the fleet did not drain by the deadline".into());
    }
    Ok(())
}

/// Waits until the gateway has seen its last request (the killed workers'
/// calls may still be in its hands), then reads its ledger both ways.
async fn quiesced_ledgers(fleet: &Fleet) -> anyhow::Result<Ledgers> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut last: Option<u64> = None;
    loop {
        let now = fleet.gateway.stats().await.ok().map(|s| s.requests);
        if now.is_some() && now == last {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the gateway did not go quiet within 15 s after the fleet was stopped");
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(Ledgers {
        memory: fleet.gateway.ledger().await?,
        file: fleet.gateway.ledger_from_file()?,
    })
}

/// Creates the payees and payouts, due evenly over `profile.spread` from now
/// (S12 adds poison payouts); returns what each payout should end as.
async fn seed(
    fleet: &Fleet,
    s: Scenario,
    profile: &Profile,
) -> anyhow::Result<HashMap<i64, Expect>> {
    let pool = &fleet.pool;
    let usd: Currency = "USD".parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let payee_ids = payees::create_demo(pool, 50, usd).await?;
    let now = Utc::now();
    let step = Duration::from_millis(100);
    let batches = (profile.spread.as_millis() / step.as_millis()).max(1) as i64;
    let per = profile.payouts / batches;
    let mut left = profile.payouts;
    for b in 0..batches {
        let n = if b == batches - 1 { left } else { per };
        if n <= 0 {
            continue;
        }
        let due = now + chrono::Duration::from_std(step * b as u32)?;
        payouts::seed(pool, &payee_ids, n, "USD", due, now).await?;
        left -= n;
    }
    let mut expect: HashMap<i64, Expect> = HashMap::new();
    if s == Scenario::S12 {
        let poison = payees::create(pool, "Closed account", POISON_ACCOUNT, usd).await?;
        let n = (profile.payouts / 100).max(3);
        for i in 0..n {
            let due =
                now + chrono::Duration::milliseconds(i * profile.spread.as_millis() as i64 / n);
            let p = payouts::create(
                pool,
                poison.id,
                Money::parse("25.00", "USD").map_err(|e| anyhow::anyhow!("{e}"))?,
                due,
                "operator:chaos",
                now,
            )
            .await?;
            expect.insert(p.id.get(), Expect::Failed("account_closed".into()));
        }
        // Amounts finer than the currency allows (only SQL can write them):
        // the worker must refuse them without calling the gateway.
        let bad = payouts::create_unchecked(
            pool,
            payee_ids[0],
            Decimal::new(10_005, 3),
            "USD",
            3,
            "operator:chaos",
            now,
        )
        .await?;
        for id in bad {
            expect.insert(id, Expect::Failed("invalid_amount".into()));
        }
    }
    let count = payouts::count_all(pool).await?;
    if count < profile.payouts {
        bail!("seeded {count} payouts, wanted {}", profile.payouts);
    }
    Ok(expect)
}

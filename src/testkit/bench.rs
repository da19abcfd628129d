//! `payout-bench`: the fleet benchmark. For each case (K worker processes,
//! gateway latency L) and each run it starts a fresh database and Redis key
//! prefix, the mock gateway, K workers and a producer as processes, pays a
//! warm-up batch (not measured), then a burst of N payouts due at once, and
//! measures from the burst's first enqueue until its last payout is recorded:
//! payouts/s, due-to-paid percentiles (due = the burst's first enqueue),
//! worker CPU seconds and peak RSS, Postgres transactions and Redis commands
//! per payout (from the servers' own counters), and the exactly-once check
//! against the gateway's ledger. Each figure is reported as the median of the
//! runs with min and max.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chrono::Utc;
use redis::aio::ConnectionManager;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::{Connection, PgPool};

use crate::{
    config::Settings,
    db::{self, payees, payouts},
    testkit::demo::{Children, free_port},
};

/// One benchmark case.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// Worker processes.
    pub workers: usize,
    /// Gateway latency, ms.
    pub latency_ms: u64,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Payouts in the measured burst.
    pub payouts: i64,
    /// Payouts paid first to warm up (not measured).
    pub warmup: i64,
    /// Runs per case.
    pub runs: usize,
    /// Jobs in flight per worker process.
    pub concurrency: usize,
    /// Producer window.
    pub window: i64,
    /// Seed of the mock gateway's randomness.
    pub seed: u64,
    /// Where processes log.
    pub log_dir: PathBuf,
    /// Give up on a run after this long.
    pub timeout: Duration,
    /// Where the fleet's binaries are (default: beside this executable).
    pub bin_dir: Option<PathBuf>,
    /// Paid payouts already in the table before the run (a long-lived
    /// table's history; 0: an empty table). Built once into a template
    /// database `<db_name>_hist_<N>` and copied for each run.
    pub history: i64,
    /// The scratch database, dropped and created for every run.
    pub db_name: String,
    /// Register one local receiving webhook endpoint before the warm-up,
    /// subscribed to `webhook_events`, and wait for every `payout.paid`.
    pub webhook: bool,
    /// The event types the bench endpoint subscribes to (`payout.paid`, or
    /// `*` for every type: three messages per payout).
    pub webhook_events: Vec<String>,
}

/// One run's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Burst payouts per second, first enqueue to last recorded.
    pub payouts_per_sec: f64,
    /// Seconds from first enqueue to last recorded.
    pub seconds: f64,
    /// Due-to-paid percentiles, seconds.
    pub p50: f64,
    /// 95th.
    pub p95: f64,
    /// 99th.
    pub p99: f64,
    /// CPU seconds per worker process during the burst.
    pub worker_cpu_secs: Vec<f64>,
    /// Peak RSS per worker process, MiB.
    pub worker_peak_rss_mib: Vec<f64>,
    /// Producer CPU seconds during the burst.
    pub producer_cpu_secs: f64,
    /// Mock gateway CPU seconds during the burst.
    pub gateway_cpu_secs: f64,
    /// redis-server CPU seconds during the burst.
    pub redis_cpu_secs: f64,
    /// CPU seconds of every Postgres process during the burst.
    pub postgres_cpu_secs: f64,
    /// Postgres commits per payout during the burst (all clients of the bench database).
    pub pg_commits_per_payout: f64,
    /// Redis commands per payout during the burst (the whole server).
    pub redis_cmds_per_payout: f64,
    /// Every payout paid, exactly one ledger entry each.
    pub exactly_once: bool,
    /// WAL bytes per payout during the burst (the whole server's
    /// `pg_current_wal_lsn()`: meaningful on a server only the bench uses).
    pub wal_bytes_per_payout: f64,
    /// `payouts` rows updated per payout over the whole run (warm-up
    /// included; `pg_stat_user_tables` of the bench database).
    pub payout_updates_per_payout: f64,
    /// Of those updates, the share that was HOT (no index entry written), %.
    pub payout_hot_pct: f64,
    /// `payout_events` rows written per payout over the whole run.
    pub event_rows_per_payout: f64,
    /// With a webhook endpoint: payouts whose `payout.paid` the receiver got
    /// (warm-up included), and the lag from paid to received, p50 and p99 (s).
    pub webhook: Option<(usize, f64, f64)>,
    /// With a webhook endpoint: CPU seconds of this process (the receiver,
    /// and the bench's own polling) from the burst until the last
    /// `payout.paid` arrived.
    pub receiver_cpu_secs: Option<f64>,
}

/// Median, min and max of one figure over runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Min.
    pub min: f64,
    /// Max.
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// A case's runs and their spreads.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The case.
    pub case: Case,
    /// Payouts per run.
    pub payouts: i64,
    /// Each run.
    pub runs: Vec<RunResult>,
    /// Payouts/s.
    pub payouts_per_sec: Spread,
    /// Due-to-paid p50, s.
    pub p50: Spread,
    /// p95, s.
    pub p95: Spread,
    /// p99, s.
    pub p99: Spread,
    /// Worker CPU seconds (mean over workers).
    pub worker_cpu_secs: Spread,
    /// Worker peak RSS MiB (max over workers).
    pub worker_peak_rss_mib: Spread,
    /// Postgres commits per payout.
    pub pg_commits_per_payout: Spread,
    /// Redis commands per payout.
    pub redis_cmds_per_payout: Spread,
    /// All runs exactly once.
    pub exactly_once: bool,
}

fn with_db(url: &SecretString, name: &str) -> anyhow::Result<String> {
    let url = url.expose_secret();
    let (base, _) = url
        .rsplit_once('/')
        .context("database URL has no database name")?;
    Ok(format!("{base}/{name}"))
}

async fn fresh_database(settings: &Settings, name: &str, history: i64) -> anyhow::Result<String> {
    let admin_url = with_db(&settings.database.url, "postgres")?;
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .context("failed to connect to Postgres")?;
    db::drop_database(&mut admin, name).await?;
    if history > 0 {
        let template = format!("{name}_hist_{history}");
        if !db::database_exists(&mut admin, &template).await? {
            build_history(settings, &mut admin, &template, history).await?;
        }
        db::create_database_from(&mut admin, name, &template).await?;
    } else {
        db::create_database(&mut admin, name, false).await?;
    }
    with_db(&settings.database.url, name)
}

/// Builds the template database of a run with `rows` paid payouts of
/// history (under a temporary name, renamed when complete, so an
/// interrupted build is never taken for a finished one).
async fn build_history(
    settings: &Settings,
    admin: &mut sqlx::PgConnection,
    template: &str,
    rows: i64,
) -> anyhow::Result<()> {
    let building = format!("{template}_building");
    db::drop_database(admin, &building).await?;
    db::create_database(admin, &building, false).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&with_db(&settings.database.url, &building)?)
        .await?;
    db::migrate(&pool).await?;
    let payee_ids = payees::create_demo(&pool, 10_000, "USD".parse().expect("USD")).await?;
    let started = Instant::now();
    let chunk = 1_000_000;
    let mut done = 0;
    while done < rows {
        let n = chunk.min(rows - done);
        payouts::seed_paid_history(&pool, &payee_ids, n, "USD", Utc::now()).await?;
        done += n;
        eprintln!("  history: {done} of {rows} paid payouts");
    }
    payouts::vacuum_analyze(&pool).await?;
    pool.close().await;
    eprintln!(
        "  history of {rows} rows built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // A closed pool's backends end a moment after it closes: until then the
    // rename finds the database in use.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match db::rename_database(admin, &building, template).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %format_args!("{e:#}"), "template still in use; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" that closes the command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds so far of every process whose command name is `comm` (e.g. all Postgres backends), by pid.
fn comm_cpu(comm: &str) -> std::collections::HashMap<u32, f64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(|pid| (pid, proc_cpu_secs(pid)))
        .collect()
}

/// CPU used since `before` by the processes named `comm` (processes that exited in between are not counted).
fn comm_cpu_since(comm: &str, before: &std::collections::HashMap<u32, f64>) -> f64 {
    comm_cpu(comm)
        .iter()
        .map(|(pid, now)| now - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

fn proc_peak_rss_mib(pid: u32) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0.0;
    };
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn redis_commands(conn: &mut ConnectionManager) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO stats has no total_commands_processed")
}

async fn pg_commits(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(db::commits(pool).await?)
}

async fn wait_paid(
    pool: &PgPool,
    children: &mut Children,
    after: i64,
    n: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // Polled through the (status, id) index: the unfinished payouts are
        // few, the paid ones all of the table (and its history).
        let open = payouts::count_open(pool).await?;
        if open == 0 {
            let paid = payouts::count_paid_after(pool, after).await?;
            if paid >= n {
                return Ok(());
            }
            bail!("every payout finished, {paid} of {n} paid");
        }
        children.check_alive()?;
        if Instant::now() > deadline {
            bail!("timed out: {open} payouts of {n} not finished");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one case once.
pub async fn run_once(
    settings: &Settings,
    case: &Case,
    opts: &BenchOptions,
    run: usize,
) -> anyhow::Result<RunResult> {
    let db_url = fresh_database(settings, &opts.db_name, opts.history).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db_url)
        .await?;
    db::migrate(&pool).await?;
    // Only this run's payouts count (not the history's).
    let after = payouts::max_id(&pool).await?;
    let mut redis = crate::queue::connect(&settings.redis).await?;
    let prefix = format!("bench-{}", ulid::Ulid::new().to_string().to_lowercase());
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf(),
    };
    let log_dir = opts
        .log_dir
        .join(format!("k{}-l{}-r{run}", case.workers, case.latency_ms));
    std::fs::create_dir_all(&log_dir)?;

    let gw_port = free_port()?;
    let gateway_url = format!("http://127.0.0.1:{gw_port}");
    let base_env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db_url.clone()),
        (
            "REDIS_URL".into(),
            settings.redis.url.expose_secret().to_string(),
        ),
        ("PAYOUTS_REDIS__PREFIX".into(), prefix.clone()),
        ("PAYOUTS_GATEWAY__BASE_URL".into(), gateway_url.clone()),
        ("PAYOUTS_PRODUCER__TICK_MS".into(), "100".into()),
        ("PAYOUTS_PRODUCER__WINDOW".into(), opts.window.to_string()),
        (
            "PAYOUTS_WORKER__CONCURRENCY".into(),
            opts.concurrency.to_string(),
        ),
        ("PAYOUTS_LOG__FORMAT".into(), "json".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    let receiver = if opts.webhook {
        let r = crate::testkit::receiver::Receiver::start().await?;
        let policy = crate::services::webhooks_out::safety::Policy::new(&["127.0.0.0/8".into()]);
        let new = crate::services::webhooks_out::endpoints::NewEndpoint {
            url: r.url.clone(),
            event_types: opts.webhook_events.clone(),
            description: Some("payout-bench receiver".into()),
            enabled: Some(true),
        };
        crate::services::webhooks_out::endpoints::register(
            &pool,
            &policy,
            &new,
            "operator:bench",
            None,
            Utc::now(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("register the bench endpoint: {e}"))?;
        Some(r)
    } else {
        None
    };
    let mut base_env = base_env;
    base_env.push((
        "PAYOUTS_WEBHOOKS_OUT__ALLOW_PRIVATE".into(),
        r#"["127.0.0.0/8"]"#.into(),
    ));
    let mut children = Children(Vec::new());
    let mut gw_env = base_env.clone();
    gw_env.push(("MOCK_GATEWAY_LISTEN".into(), format!("127.0.0.1:{gw_port}")));
    let gw_args = [
        format!("--latency-ms={}", case.latency_ms),
        format!("--seed={}", opts.seed),
    ];
    children.spawn_with_args(
        &bin_dir,
        "mock-gateway",
        "mock-gateway",
        &gw_args,
        &gw_env,
        &log_dir,
    )?;
    let mut worker_pids = Vec::new();
    for i in 0..case.workers {
        let mut env = base_env.clone();
        env.push((
            "PAYOUTS_WORKER__LISTEN".into(),
            format!("127.0.0.1:{}", free_port()?),
        ));
        children.spawn(
            &bin_dir,
            "payout-worker",
            &format!("worker-{}", i + 1),
            &env,
            &log_dir,
        )?;
        worker_pids.push(children.0.last().expect("just spawned").1.id());
    }
    let http = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{gateway_url}/health"))
        .send()
        .await
        .is_err()
    {
        children.check_alive()?;
        if Instant::now() > until {
            bail!("mock gateway did not start; see {}", log_dir.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Warm-up: connections, JIT-free but cold caches, apalis registration.
    let payee_ids = payees::create_demo(&pool, 1000, "USD".parse().expect("USD")).await?;
    let now = Utc::now();
    payouts::seed(&pool, &payee_ids, opts.warmup, "USD", now, now).await?;
    let mut p_env = base_env.clone();
    p_env.push((
        "PAYOUTS_PRODUCER__LISTEN".into(),
        format!("127.0.0.1:{}", free_port()?),
    ));
    children.spawn(&bin_dir, "payout-producer", "producer", &p_env, &log_dir)?;
    let producer_pid = children.0.last().expect("just spawned").1.id();
    wait_paid(&pool, &mut children, after, opts.warmup, opts.timeout).await?;

    // The burst: N payouts, all due, visible at once (one INSERT).
    let cpu_before: Vec<f64> = worker_pids.iter().map(|p| proc_cpu_secs(*p)).collect();
    let producer_cpu_before = proc_cpu_secs(producer_pid);
    let gateway_pid = children.0[0].1.id();
    let gateway_cpu_before = proc_cpu_secs(gateway_pid);
    let (redis_cpu_before, pg_cpu_before) = (comm_cpu("redis-server"), comm_cpu("postgres"));
    let self_cpu_before = proc_cpu_secs(std::process::id());
    let commits_before = pg_commits(&pool).await?;
    let wal_before = db::wal_position(&pool).await?;
    let redis_before = redis_commands(&mut redis).await?;
    let seeded_at = Utc::now();
    payouts::seed(&pool, &payee_ids, opts.payouts, "USD", seeded_at, seeded_at).await?;
    wait_paid(
        &pool,
        &mut children,
        after,
        opts.warmup + opts.payouts,
        opts.timeout,
    )
    .await?;
    // Backends report their commits to pg_stat_database when they go idle,
    // up to about 10 s later (PostgreSQL 15's cumulative statistics): a run
    // shorter than that reads the count before the workers' commits arrive.
    let commits_after = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let c = pg_commits(&pool).await?;
            if c > commits_before || tokio::time::Instant::now() >= deadline {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let redis_after = redis_commands(&mut redis).await?;
    let wal_after = db::wal_position(&pool).await?;
    let worker_cpu_secs: Vec<f64> = worker_pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, b)| proc_cpu_secs(*p) - b)
        .collect();
    let producer_cpu_secs = proc_cpu_secs(producer_pid) - producer_cpu_before;
    let gateway_cpu_secs = proc_cpu_secs(gateway_pid) - gateway_cpu_before;
    let redis_cpu_secs = comm_cpu_since("redis-server", &redis_cpu_before);
    let postgres_cpu_secs = comm_cpu_since("postgres", &pg_cpu_before);
    let worker_peak_rss_mib: Vec<f64> = worker_pids.iter().map(|p| proc_peak_rss_mib(*p)).collect();

    let (start, end) = payouts::run_span(&pool, seeded_at).await?;
    let (p50, p95, p99) = payouts::paid_after_percentiles(&pool, seeded_at, start).await?;

    let ledger: Vec<serde_json::Value> = http
        .get(format!("{gateway_url}/_mock/ledger"))
        .send()
        .await?
        .json()
        .await?;
    let mut refs: Vec<&str> = ledger
        .iter()
        .filter_map(|e| e["reference"].as_str())
        .collect();
    let entries = refs.len();
    refs.sort_unstable();
    refs.dedup();
    let paid = payouts::count_paid_after(&pool, after).await?;
    let exactly_once =
        entries == refs.len() && entries as i64 == paid && paid == opts.warmup + opts.payouts;

    let webhook = match &receiver {
        Some(r) => {
            let want = (opts.warmup + opts.payouts) as usize;
            let until = Instant::now() + opts.timeout;
            while r.paid() < want && Instant::now() < until {
                children.check_alive()?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (p50, p99) = r.lag();
            Some((r.paid(), p50, p99))
        }
        None => None,
    };
    let receiver_cpu_secs = receiver
        .as_ref()
        .map(|_| proc_cpu_secs(std::process::id()) - self_cpu_before);
    drop(children);
    pool.close().await;
    let writes = run_writes(&db_url).await?;
    let total = (opts.warmup + opts.payouts) as f64;
    let seconds = (end - start).num_microseconds().unwrap_or(0) as f64 / 1e6;
    let n = opts.payouts as f64;
    Ok(RunResult {
        payouts_per_sec: n / seconds.max(1e-6),
        seconds,
        p50,
        p95,
        p99,
        worker_cpu_secs,
        worker_peak_rss_mib,
        producer_cpu_secs,
        gateway_cpu_secs,
        redis_cpu_secs,
        postgres_cpu_secs,
        pg_commits_per_payout: (commits_after - commits_before) as f64 / n,
        redis_cmds_per_payout: (redis_after - redis_before) as f64 / n,
        wal_bytes_per_payout: (wal_after - wal_before) as f64 / n,
        payout_updates_per_payout: writes.0.updated as f64 / total,
        payout_hot_pct: 100.0 * writes.0.hot_updated as f64 / writes.0.updated.max(1) as f64,
        event_rows_per_payout: writes.1.inserted as f64 / total,
        exactly_once,
        webhook,
        receiver_cpu_secs,
    })
}

/// What the run wrote to `payouts` and `payout_events`, once the fleet's
/// sessions have ended (a backend's counts reach the statistics when it
/// exits; waits up to 15 s for them to go).
async fn run_writes(db_url: &str) -> anyhow::Result<(db::TableWrites, db::TableWrites)> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(db_url)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while db::other_sessions(&pool).await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writes = (
        db::table_writes(&pool, "payouts").await?,
        db::table_writes(&pool, "payout_events").await?,
    );
    pool.close().await;
    Ok(writes)
}

/// Runs one case `opts.runs` times.
pub async fn run_case(
    settings: &Settings,
    case: Case,
    opts: &BenchOptions,
) -> anyhow::Result<CaseResult> {
    let mut runs = Vec::new();
    for r in 0..opts.runs {
        let res = run_once(settings, &case, opts, r)
            .await
            .with_context(|| format!("case {case:?}, run {r}"))?;
        eprintln!(
            "  k={} latency={}ms run {}: {:.0} payouts/s, p99 {:.2}s, exactly once: {}",
            case.workers,
            case.latency_ms,
            r + 1,
            res.payouts_per_sec,
            res.p99,
            res.exactly_once
        );
        if let Some((paid, p50, p99)) = res.webhook {
            eprintln!(
                "    webhooks: payout.paid received for {paid} of {} payouts; lag paid -> received p50 {p50:.2}s, p99 {p99:.2}s; receiver CPU {:.2}s, busiest worker CPU {:.2}s",
                opts.warmup + opts.payouts,
                res.receiver_cpu_secs.unwrap_or(0.0),
                res.worker_cpu_secs.iter().copied().fold(0.0, f64::max),
            );
        }
        runs.push(res);
    }
    let spread = |f: &dyn Fn(&RunResult) -> f64| Spread::of(runs.iter().map(f).collect());
    Ok(CaseResult {
        payouts: opts.payouts,
        payouts_per_sec: spread(&|r| r.payouts_per_sec),
        p50: spread(&|r| r.p50),
        p95: spread(&|r| r.p95),
        p99: spread(&|r| r.p99),
        worker_cpu_secs: spread(&|r| {
            r.worker_cpu_secs.iter().sum::<f64>() / r.worker_cpu_secs.len().max(1) as f64
        }),
        worker_peak_rss_mib: spread(&|r| r.worker_peak_rss_mib.iter().copied().fold(0.0, f64::max)),
        pg_commits_per_payout: spread(&|r| r.pg_commits_per_payout),
        redis_cmds_per_payout: spread(&|r| r.redis_cmds_per_payout),
        exactly_once: runs.iter().all(|r| r.exactly_once),
        runs,
        case,
    })
}

/// The results as a Markdown table.
pub fn table(results: &[CaseResult]) -> String {
    let s = |x: Spread, prec: usize| {
        format!("{:.p$} ({:.p$}–{:.p$})", x.median, x.min, x.max, p = prec)
    };
    let mut out = String::from(
        "| workers | gateway latency | payouts/s | due-to-paid p50 / p95 / p99 (s) | worker CPU s | worker peak RSS MiB | PG commits/payout | Redis cmds/payout | exactly once |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} ms | {} | {:.2} / {:.2} / {:.2} | {} | {} | {} | {} | {} |\n",
            r.case.workers,
            r.case.latency_ms,
            s(r.payouts_per_sec, 0),
            r.p50.median,
            r.p95.median,
            r.p99.median,
            s(r.worker_cpu_secs, 1),
            s(r.worker_peak_rss_mib, 0),
            s(r.pg_commits_per_payout, 2),
            s(r.redis_cmds_per_payout, 1),
            if r.exactly_once { "yes" } else { "NO" }
        ));
    }
    out
}

/// The producer's enqueue path alone ([`crate::producer::Producer::fill`]):
/// `n` due payouts moved to `queued` and pushed into Redis in batches of
/// `batch`, window ignored. Returns payouts/s
/// and the median time per batch (scan, mark queued, push; pipelined), in ms.
pub async fn producer_rate(
    settings: &Settings,
    db_name: &str,
    n: i64,
    batch: i64,
) -> anyhow::Result<(f64, f64)> {
    let db_url = fresh_database(settings, db_name, 0).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db_url)
        .await?;
    db::migrate(&pool).await?;
    let conn = crate::queue::connect(&settings.redis).await?;
    let prefix = format!(
        "bench-producer-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let queue = crate::queue::Queue::new(conn.clone(), &prefix, 32, Duration::from_secs(5));
    let payee_ids = payees::create_demo(&pool, 1000, "USD".parse().expect("USD")).await?;
    let now = Utc::now();
    payouts::seed(&pool, &payee_ids, n, "USD", now, now).await?;
    payouts::vacuum_analyze(&pool).await?;
    let producer = crate::producer::Producer {
        pool: pool.clone(),
        queue,
        clock: crate::clock::system(),
        settings: crate::config::ProducerSettings {
            batch_size: batch,
            ..settings.producer.clone()
        },
        actor: "producer:bench".into(),
    };
    let started = Instant::now();
    let mut scans = Vec::new();
    let mut total = 0usize;
    loop {
        let t = Instant::now();
        let now = Utc::now();
        let (n, _) = producer
            .fill(batch * 10, now, now + chrono::Duration::hours(1))
            .await?;
        scans.push(t.elapsed().as_secs_f64() * 1000.0 / 10.0);
        total += n;
        if n == 0 {
            break;
        }
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    // Remove the scratch jobs.
    let mut conn = conn;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}}}*"))
        .query_async(&mut conn)
        .await?;
    for chunk in keys.chunks(500) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
    }
    pool.close().await;
    Ok((rate, Spread::of(scans).median))
}

/// Where the CPU went, per case (medians of the runs), as a Markdown table.
pub fn cpu_table(results: &[CaseResult]) -> String {
    let mut out = String::from(
        "| workers | gateway latency | workers (all) | producer | mock gateway | redis-server | postgres | CPU µs per payout |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let med = |f: &dyn Fn(&RunResult) -> f64| Spread::of(r.runs.iter().map(f).collect()).median;
        let workers = med(&|x| x.worker_cpu_secs.iter().sum());
        let producer = med(&|x| x.producer_cpu_secs);
        let gateway = med(&|x| x.gateway_cpu_secs);
        let redis = med(&|x| x.redis_cpu_secs);
        let pg = med(&|x| x.postgres_cpu_secs);
        let per = (workers + producer + gateway + redis + pg) / r.payouts as f64 * 1e6;
        out.push_str(&format!(
            "| {} | {} ms | {workers:.2} s | {producer:.2} s | {gateway:.2} s | {redis:.2} s | {pg:.2} s | {per:.0} |\n",
            r.case.workers, r.case.latency_ms
        ));
    }
    out
}

/// What Postgres wrote, per case (medians of the runs), as a Markdown table.
pub fn writes_table(results: &[CaseResult]) -> String {
    let mut out = String::from(
        "| workers | gateway latency | payouts updates/payout | HOT % | payout_events rows/payout | WAL bytes/payout (burst) |\n|---|---|---|---|---|---|\n",
    );
    for r in results {
        let med = |f: &dyn Fn(&RunResult) -> f64| Spread::of(r.runs.iter().map(f).collect()).median;
        out.push_str(&format!(
            "| {} | {} ms | {:.2} | {:.1} | {:.2} | {:.0} |\n",
            r.case.workers,
            r.case.latency_ms,
            med(&|x| x.payout_updates_per_payout),
            med(&|x| x.payout_hot_pct),
            med(&|x| x.event_rows_per_payout),
            med(&|x| x.wal_bytes_per_payout),
        ));
    }
    out
}

/// Writes results as JSON.
pub fn write_json(path: &Path, results: &[CaseResult]) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(results)?)?;
    Ok(())
}

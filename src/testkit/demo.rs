//! The demo behind the README's first command: migrate, start the mock
//! gateway, a producer and N workers as child processes, seed due payouts (or,
//! with `--from-earnings`, earnings that settlement turns into payouts),
//! wait until each is final, check the gateway's ledger, reconcile against
//! the gateway, print a summary. The fleet speaks the gateway kind chosen
//! (`--gateway-kind`: the contract or the release-funds API, both served by
//! the mock, or Stripe, served by the Stripe stand-in `stripe-standin`, with
//! a connected account seeded for each demo payee through its stand-in-only
//! `POST /_standin/accounts`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::StreamExt;
use secrecy::ExposeSecret;
use sqlx::{Connection, PgPool};

use crate::{
    config::Settings,
    db::{self, payees, payouts},
};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Payouts to seed.
    pub count: i64,
    /// Worker processes.
    pub workers: usize,
    /// Give up after this long.
    pub timeout: Duration,
    /// Where children write their logs.
    pub log_dir: PathBuf,
    /// Seed earnings (released, in a closed period) and let settlement create
    /// the payouts, instead of seeding ready-made payouts.
    pub from_earnings: bool,
    /// Keep the fleet and the dashboard running after the summary, until
    /// Ctrl-C; two demo payees' accounts are closed at the mock gateway so
    /// the failures view and the retry action have something to show.
    pub serve: bool,
    /// `gateway.kind` of the fleet: one of [`crate::testkit::mock_gateway::MOCK_KINDS`].
    pub gateway_kind: String,
}

/// The summary line.
pub fn summary_line(s: &DemoSummary) -> String {
    format!(
        "summary ({}): {} seeded, {} paid, {} failed in {:.2} s = {:.0} payouts/s; gateway ledger {} entries, {} duplicates; reconciliation {} disagreements",
        s.gateway_kind,
        s.seeded,
        s.paid,
        s.failed,
        s.seconds,
        s.payouts_per_second,
        s.ledger_entries,
        s.duplicates,
        s.disagreements
    )
}

/// Demo earnings for `payee_ids` (3 each, released, in the default schedule's
/// last closed period), then one settlement run; returns the payouts it made.
pub async fn seed_from_earnings(
    pool: &PgPool,
    settings: &Settings,
    payee_ids: &[i64],
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<i64> {
    let policy = crate::services::settlement::policy_for(settings)?;
    let closed = policy
        .default_schedule
        .last_closed(now)
        .context("the demo needs an automatic policy default_schedule (not manual)")?;
    let release_at = closed.end - chrono::Duration::hours(1);
    let completed_at = release_at - chrono::Duration::days(i64::from(policy.hold_days));
    let usd = "USD".parse().expect("USD");
    let t = Instant::now();
    let n = crate::db::earnings::seed_demo(pool, payee_ids, 3, usd, completed_at, release_at, now)
        .await?;
    let opts = crate::services::settlement::Options {
        payee: None,
        actor: "demo:settlement".into(),
    };
    let report = crate::services::settlement::run(pool, &policy, now, &opts).await?;
    println!(
        "settled {n} earnings of {} payees (period {}): {} payouts, {} carried over, in {:.2} s",
        payee_ids.len(),
        closed,
        report.payouts(),
        report.settled.len() - report.payouts(),
        t.elapsed().as_secs_f64()
    );
    Ok(report.payouts() as i64)
}

/// The demo's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoSummary {
    /// Payouts seeded.
    pub seeded: i64,
    /// Paid.
    pub paid: i64,
    /// Failed.
    pub failed: i64,
    /// Seconds from seeding to the last one final.
    pub seconds: f64,
    /// Paid per second.
    pub payouts_per_second: f64,
    /// Ledger entries at the gateway for these payouts.
    pub ledger_entries: usize,
    /// References applied more than once at the gateway (must be 0).
    pub duplicates: usize,
    /// The gateway kind the fleet spoke.
    pub gateway_kind: String,
    /// What reconciliation against that gateway found out of step (must be 0;
    /// a failed reconciliation is an error).
    pub disagreements: usize,
}

/// A free loopback port.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Child processes of a local fleet, stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Children(pub(crate) Vec<(String, Child)>);

impl Children {
    pub(crate) fn spawn(
        &mut self,
        bin_dir: &Path,
        bin: &str,
        name: &str,
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<()> {
        self.spawn_with_args(bin_dir, bin, name, &[], env, log_dir)
    }

    pub(crate) fn spawn_with_args(
        &mut self,
        bin_dir: &Path,
        bin: &str,
        name: &str,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<()> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        let child = Command::new(bin_dir.join(bin))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {bin}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited early ({status}); see its log");
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &self.0 {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        for (_, child) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Creates the configured database if it does not exist.
pub async fn ensure_database(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database.url.expose_secret();
    let (base, name) = url
        .rsplit_once('/')
        .context("database URL has no database name")?;
    let name = name.split('?').next().unwrap_or(name);
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
        .await
        .context("failed to connect to Postgres")?;
    db::create_database(&mut admin, name, true).await
}

/// Reconciles the payouts this run touched (changed since `since`, its
/// start) against the gateway the fleet spoke (the demo's settings with
/// `gateway_env` over them), as `payoutctl reconcile --since` does; returns
/// the disagreements about money. A run that could compare nothing is an
/// error. Not "the last hour": the README's demos of other gateway kinds,
/// run one after the other on the same database, paid their payouts
/// elsewhere, and this gateway rightly knows nothing of them.
async fn reconcile_demo(
    pool: &PgPool,
    gateway_env: &[(String, String)],
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<usize> {
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.extend(gateway_env.iter().cloned());
    let settings = Settings::load_from(None, &env)?;
    let gateway_settings = settings.gateway.clone();
    // Its look-ups count against the fleet-wide limit, as every request does.
    let conn = crate::queue::connect(&settings.redis).await?;
    let gateway =
        crate::gateway::select::lookup_limited(&gateway_settings, conn, &settings.redis.prefix)?;
    let now = chrono::Utc::now();
    let opts = crate::services::reconcile::Options {
        since,
        fix: false,
        concurrency: 16,
        actor: "demo:reconcile".into(),
    };
    let report = crate::services::reconcile::run(pool, gateway.as_ref(), &opts, now).await?;
    if let Some(reason) = report.failed {
        bail!(
            "reconciliation against the {} gateway failed: {reason}",
            gateway_settings.kind
        );
    }
    println!(
        "reconciled {} payouts against the {} gateway: {} disagreements",
        report.checked,
        gateway_settings.kind,
        report.mismatches.len()
    );
    Ok(report.mismatches.len())
}

/// The secret key the demo's Stripe stand-in expects (a test key: stand-in only).
const STANDIN_KEY: &str = "sk_test_demo_standin";

/// The `PAYOUTS_*` settings that point a fleet at the Stripe stand-in on `base_url`.
fn stripe_env(base_url: &str) -> Vec<(String, String)> {
    [
        ("PAYOUTS_GATEWAY__KIND", "stripe"),
        ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base_url),
        ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", STANDIN_KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Creates a connected account, able to receive transfers, at the Stripe
/// stand-in for each demo payee (its stand-in-only `POST /_standin/accounts`;
/// real Stripe accounts are onboarded by their owners).
async fn seed_standin_accounts(
    http: &reqwest::Client,
    base_url: &str,
    pool: &PgPool,
    payee_ids: &[i64],
) -> anyhow::Result<()> {
    let accounts = payees::gateway_accounts(pool, payee_ids).await?;
    let url = format!("{base_url}/_standin/accounts");
    let mut posts = futures::stream::iter(accounts)
        .map(|id| {
            let req = http
                .post(&url)
                .json(&serde_json::json!({"id": id, "transfers": "active"}));
            async move { req.send().await?.error_for_status().map(|_| ()) }
        })
        .buffer_unordered(16);
    while let Some(r) = futures::StreamExt::next(&mut posts).await {
        r.context("failed to seed a connected account at the Stripe stand-in")?;
    }
    Ok(())
}

/// Runs the demo.
pub async fn run(settings: Settings, opts: DemoOptions) -> anyhow::Result<DemoSummary> {
    let run_started_at = chrono::Utc::now();
    ensure_database(&settings).await?;
    let pool: PgPool = db::connect(&settings.database).await?;
    db::migrate(&pool).await?;
    std::fs::create_dir_all(&opts.log_dir)?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();

    let gw_port = free_port()?;
    let gateway_url = format!("http://127.0.0.1:{gw_port}");
    let gw_secret = settings.gateway.secret.expose_secret().to_string();
    let stripe = opts.gateway_kind == "stripe";
    let gateway_env = if stripe {
        Some(stripe_env(&gateway_url))
    } else {
        crate::testkit::mock_gateway::fleet_env(&opts.gateway_kind, &gateway_url, &gw_secret)
    }
    .with_context(|| {
        format!(
            "the demo runs against the mock gateway, which speaks {:?}, not {:?}",
            crate::testkit::mock_gateway::MOCK_KINDS,
            opts.gateway_kind
        )
    })?;
    let mut base_env: Vec<(String, String)> = vec![
        (
            "DATABASE_URL".into(),
            settings.database.url.expose_secret().to_string(),
        ),
        (
            "REDIS_URL".into(),
            settings.redis.url.expose_secret().to_string(),
        ),
        (
            "PAYOUTS_REDIS__PREFIX".into(),
            settings.redis.prefix.clone(),
        ),
        ("PAYOUTS_PRODUCER__TICK_MS".into(), "500".into()),
        ("PAYOUTS_LOG__FORMAT".into(), "json".into()),
    ];
    base_env.extend(gateway_env.iter().cloned());
    if let Ok(v) = std::env::var("RUST_LOG") {
        base_env.push(("RUST_LOG".into(), v));
    }
    let mut children = Children(Vec::new());
    let mut gw_env = base_env.clone();
    gw_env.push(("MOCK_GATEWAY_LISTEN".into(), format!("127.0.0.1:{gw_port}")));
    gw_env.push(("MOCK_GATEWAY_SECRET".into(), gw_secret.clone()));
    let closed: Vec<String> = if opts.serve {
        ["acct_demo_3", "acct_demo_7"]
            .iter()
            .flat_map(|a| ["--closed-destination".to_string(), a.to_string()])
            .collect()
    } else {
        Vec::new()
    };
    if stripe {
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{gw_port}"),
            "--key".to_string(),
            STANDIN_KEY.to_string(),
        ];
        children.spawn_with_args(
            &bin_dir,
            "stripe-standin",
            "stripe-standin",
            &args,
            &gw_env,
            &opts.log_dir,
        )?;
    } else {
        children.spawn_with_args(
            &bin_dir,
            "mock-gateway",
            "mock-gateway",
            &closed,
            &gw_env,
            &opts.log_dir,
        )?;
    }
    // The admin server: on its configured port when free, else any.
    let admin_addr = if std::net::TcpListener::bind(settings.admin.listen).is_ok() {
        settings.admin.listen
    } else {
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?))
    };
    let mut a_env = base_env.clone();
    a_env.push(("PAYOUTS_ADMIN__LISTEN".into(), admin_addr.to_string()));
    children.spawn(&bin_dir, "payout-admin", "admin", &a_env, &opts.log_dir)?;
    let token_name = format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let (_, token) = db::tokens::create(&pool, &token_name, db::tokens::Role::Admin).await?;
    let mut p_env = base_env.clone();
    p_env.push((
        "PAYOUTS_PRODUCER__LISTEN".into(),
        format!("127.0.0.1:{}", free_port()?),
    ));
    children.spawn(
        &bin_dir,
        "payout-producer",
        "producer",
        &p_env,
        &opts.log_dir,
    )?;
    let mut worker_urls = Vec::new();
    for i in 0..opts.workers {
        let port = free_port()?;
        worker_urls.push(format!("http://127.0.0.1:{port}"));
        let mut w_env = base_env.clone();
        w_env.push(("PAYOUTS_WORKER__LISTEN".into(), format!("127.0.0.1:{port}")));
        children.spawn(
            &bin_dir,
            "payout-worker",
            &format!("worker-{}", i + 1),
            &w_env,
            &opts.log_dir,
        )?;
    }
    let http = reqwest::Client::new();
    // Any answer will do (the stand-in has no health endpoint).
    let health = if stripe {
        format!("{gateway_url}/_standin/transfers")
    } else {
        format!("{gateway_url}/health")
    };
    let until = Instant::now() + Duration::from_secs(30);
    while http.get(&health).send().await.is_err() {
        children.check_alive()?;
        if Instant::now() > until {
            bail!("mock gateway did not start; see {}", opts.log_dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} {gateway_url} (gateway.kind = {:?}), producer and {} workers started (logs in {})",
        if stripe {
            "stripe stand-in"
        } else {
            "mock gateway"
        },
        opts.gateway_kind,
        opts.workers,
        opts.log_dir.display()
    );
    for url in &worker_urls {
        println!("  worker metrics: {url}/metrics");
    }
    println!("  dashboard: http://{admin_addr}/login  (log in with the admin token below)");
    println!("  token ({token_name}, admin; revoke with `payoutctl token revoke {token_name}`):");
    println!("    {token}");

    let before = payouts::max_id(&pool).await?;
    // From earnings: one payee per payout, whose settlement makes the payout.
    let n_payees = if opts.from_earnings {
        opts.count
    } else {
        100.min(opts.count)
    };
    let payee_ids = payees::create_demo(&pool, n_payees, "USD".parse().expect("USD")).await?;
    if stripe {
        seed_standin_accounts(&http, &gateway_url, &pool, &payee_ids).await?;
    }
    let mut started = Instant::now();
    let now = chrono::Utc::now();
    let seeded = if opts.from_earnings {
        let n = seed_from_earnings(&pool, &settings, &payee_ids, now).await?;
        started = Instant::now();
        n
    } else {
        payouts::seed(&pool, &payee_ids, opts.count, "USD", now, now).await?;
        opts.count
    };
    println!("seeded {seeded} due payouts; waiting for the fleet to pay them");

    let deadline = Instant::now() + opts.timeout;
    let mut last_print = Instant::now();
    let (paid, failed) = loop {
        let (paid, failed, open) = payouts::outcomes_after(&pool, before).await?;
        if open == 0 {
            break (paid, failed);
        }
        children.check_alive()?;
        if Instant::now() > deadline {
            bail!("timed out with {open} payouts not final ({paid} paid, {failed} failed)");
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            println!("  {paid} paid, {failed} failed, {open} to go");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seconds = started.elapsed().as_secs_f64();

    let (path, reference) = if stripe {
        ("_standin/transfers", "transfer_group")
    } else {
        ("_mock/ledger", "reference")
    };
    let ledger: Vec<serde_json::Value> = http
        .get(format!("{gateway_url}/{path}"))
        .send()
        .await?
        .json()
        .await?;
    let mut refs: Vec<i64> = ledger
        .iter()
        .filter_map(|e| e[reference].as_str()?.strip_prefix("payout_")?.parse().ok())
        .filter(|id| *id > before)
        .collect();
    let entries = refs.len();
    refs.sort_unstable();
    refs.dedup();
    let disagreements = reconcile_demo(&pool, &gateway_env, run_started_at).await?;
    let summary = DemoSummary {
        seeded,
        paid,
        failed,
        seconds,
        payouts_per_second: paid as f64 / seconds.max(1e-9),
        ledger_entries: entries,
        duplicates: entries - refs.len(),
        gateway_kind: opts.gateway_kind.clone(),
        disagreements,
    };
    if opts.serve {
        println!("\n{}", summary_line(&summary));
        println!(
            "\nthe fleet and the dashboard keep running: http://{admin_addr}/login with the token above \
             (the failed payouts of acct_demo_3 and acct_demo_7 are in Failures). Ctrl-C stops everything."
        );
        tokio::signal::ctrl_c().await?;
    }
    Ok(summary)
}

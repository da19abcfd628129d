//! One scenario's fleet, all real processes: its own database on the private
//! Postgres, a private redis-server, the mock gateway binary with a durable
//! ledger file, one producer and N worker processes, and the three proxies
//! the network faults go through:
//!
//! ```text
//! producer --[producer_redis]--> redis <--[worker_redis]-- workers --[worker_gateway]--> mock-gateway
//!     \__________________________ postgres _________________________/
//! ```
//!
//! Configuration reaches the children only through `PAYOUTS_*` variables,
//! as in production. Everything is killed when the fleet is dropped.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use sqlx::PgPool;

use super::{
    Profile,
    pg::PrivatePostgres,
    process::{ChildProc, free_port, poll},
    proxy::Proxy,
    redis::{PrivateRedis, PrivateSentinel},
};
use crate::{
    config::Settings,
    queue::Queue,
    testkit::mock_gateway::{Faults, LedgerEntry, Stats},
};

/// Where the fleet's binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `payout-worker`.
    pub worker: PathBuf,
    /// `payout-producer`.
    pub producer: PathBuf,
    /// `mock-gateway`.
    pub gateway: PathBuf,
}

impl Bins {
    /// The binaries next to the running executable (`target/<profile>/`).
    pub fn next_to_current_exe() -> anyhow::Result<Bins> {
        let exe = std::env::current_exe().context("current executable")?;
        let dir = exe.parent().context("executable directory")?;
        let bins = Bins {
            worker: dir.join("payout-worker"),
            producer: dir.join("payout-producer"),
            gateway: dir.join("mock-gateway"),
        };
        bins.check()?;
        Ok(bins)
    }

    /// Fails naming the first binary that is missing.
    pub fn check(&self) -> anyhow::Result<()> {
        for b in [&self.worker, &self.producer, &self.gateway] {
            if !b.exists() {
                bail!(
                    "{} not found: build the fleet first (cargo build --release --bins)",
                    b.display()
                );
            }
        }
        Ok(())
    }
}

/// The key prefix of every scenario (each scenario has its own Redis anyway).
pub const PREFIX: &str = "chaos";

/// The mock gateway as a child process with its ledger in a file.
#[derive(Debug)]
pub struct GatewayProc {
    bin: PathBuf,
    port: u16,
    seed: u64,
    ledger_file: PathBuf,
    closed: Vec<String>,
    log: PathBuf,
    child: Option<ChildProc>,
    http: reqwest::Client,
    starts: u32,
}

impl GatewayProc {
    /// Starts `mock-gateway` on a free port with `--ledger-file`.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        logs: &Path,
        seed: u64,
        closed: &[String],
    ) -> anyhow::Result<GatewayProc> {
        let mut g = GatewayProc {
            bin: bin.to_path_buf(),
            port: free_port()?,
            seed,
            ledger_file: dir.join("gateway-ledger.jsonl"),
            closed: closed.to_vec(),
            log: logs.join("mock-gateway.log"),
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            starts: 0,
        };
        g.spawn().await?;
        Ok(g)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--ledger-file")
            .arg(&self.ledger_file)
            .arg("--seed")
            .arg((self.seed + u64::from(self.starts)).to_string())
            .env("RUST_LOG", "warn");
        for c in &self.closed {
            cmd.arg("--closed-destination").arg(c);
        }
        self.starts += 1;
        self.child = Some(ChildProc::spawn(cmd, "mock-gateway", &self.log)?);
        let url = format!("{}/health", self.base_url());
        let http = self.http.clone();
        poll(
            Duration::from_secs(20),
            Duration::from_millis(20),
            "the mock gateway to answer /health",
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let r = http.get(&url).send().await.ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await
    }

    /// `http://127.0.0.1:port`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The gateway's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL, then start again on the same port with the same ledger file.
    pub async fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
        self.spawn().await
    }

    /// Replaces the fault settings (`PUT /_mock/faults`); the fleet's closed
    /// destinations are kept (they are part of the fault settings).
    pub async fn set_faults(&self, faults: &Faults) -> anyhow::Result<()> {
        let mut faults = faults.clone();
        for c in &self.closed {
            if !faults.closed_destinations.contains(c) {
                faults.closed_destinations.push(c.clone());
            }
        }
        let r = self
            .http
            .put(format!("{}/_mock/faults", self.base_url()))
            .json(&faults)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("PUT /_mock/faults answered {}", r.status());
        }
        Ok(())
    }

    /// The ledger as the running gateway holds it in memory.
    pub async fn ledger(&self) -> anyhow::Result<Vec<LedgerEntry>> {
        Ok(self
            .http
            .get(format!("{}/_mock/ledger", self.base_url()))
            .timeout(Duration::from_secs(30))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The request counters since the last start.
    pub async fn stats(&self) -> anyhow::Result<Stats> {
        Ok(self
            .http
            .get(format!("{}/_mock/stats", self.base_url()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The durable ledger, read from its file: what survives a crash.
    pub fn ledger_from_file(&self) -> anyhow::Result<Vec<LedgerEntry>> {
        let text = std::fs::read_to_string(&self.ledger_file)
            .with_context(|| format!("read {}", self.ledger_file.display()))?;
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("ledger file line {} is not an entry", i + 1))
            })
            .collect()
    }
}

/// A worker process and the port of its `/metrics`.
#[derive(Debug)]
pub struct WorkerProc {
    /// The process.
    pub proc: ChildProc,
    /// Its `worker.listen` port.
    pub port: u16,
}

/// One scenario's fleet. Field order is drop order: the fleet processes go
/// first, then the proxies, the gateway and Redis.
#[derive(Debug)]
pub struct Fleet {
    /// The producer.
    pub producer: Option<ChildProc>,
    /// The workers, by slot.
    pub workers: Vec<WorkerProc>,
    /// Workers -> Redis.
    pub worker_redis: Proxy,
    /// Workers -> gateway.
    pub worker_gateway: Proxy,
    /// Producer -> Redis.
    pub producer_redis: Proxy,
    /// The mock gateway.
    pub gateway: GatewayProc,
    /// S14's replica and sentinel (before the master: dropped first).
    pub sentinel: Option<PrivateSentinel>,
    /// The private Redis (S14: the first master).
    pub redis: PrivateRedis,
    /// The harness's own pool on the scenario's database.
    pub pool: PgPool,
    /// The harness's own handle on the queue (straight to Redis, no proxy).
    pub queue: Queue,
    /// The settings the children run with (as the harness reads them).
    pub settings: Settings,
    /// Child logs.
    pub logs: PathBuf,
    bins: Bins,
    env: Vec<(String, String)>,
    spawned: u32,
    /// `gateway.kind` of the children: `PAYOUTS_CHAOS_GATEWAY_KIND`, one of
    /// the kinds the mock speaks (default `contract`).
    gateway_kind: String,
    /// Everyone (fleet and harness) -> Postgres, when the spec asks for it
    /// (S15: switched to the standby when it is promoted).
    pub postgres: Option<Proxy>,
    /// S15's primary and synchronous standby (dropped last).
    pub ha: Option<HaPostgres>,
}

/// A primary and its synchronous streaming standby (S15).
#[derive(Debug)]
pub struct HaPostgres {
    /// Takes the writes until it is killed.
    pub primary: PrivatePostgres,
    /// Promoted when the primary dies.
    pub standby: PrivatePostgres,
}

/// The gateway kind the chaos fleet runs with (`PAYOUTS_CHAOS_GATEWAY_KIND`).
fn chaos_gateway_kind() -> anyhow::Result<String> {
    let kind = std::env::var("PAYOUTS_CHAOS_GATEWAY_KIND").unwrap_or_else(|_| "contract".into());
    if !crate::testkit::mock_gateway::MOCK_KINDS.contains(&kind.as_str()) {
        anyhow::bail!(
            "PAYOUTS_CHAOS_GATEWAY_KIND must be one of {:?} (got {kind:?})",
            crate::testkit::mock_gateway::MOCK_KINDS
        );
    }
    Ok(kind)
}

/// The settings pointing `kind` at the mock on `base_url` (default secret).
fn gateway_env(kind: &str, base_url: &str) -> Vec<(String, String)> {
    crate::testkit::mock_gateway::fleet_env(kind, base_url, "sk_test_mock").unwrap_or_default()
}

/// Options of one fleet.
#[derive(Debug, Clone, Default)]
pub struct FleetSpec {
    /// Redis with an append-only file.
    pub aof: bool,
    /// Gateway accounts the mock answers `account_closed` for.
    pub closed_destinations: Vec<String>,
    /// Every Postgres connection (children and harness) through a proxy
    /// whose upstream can be switched (S15).
    pub pg_proxy: bool,
    /// Redis as a master, a replica and a sentinel; the children find the
    /// master through the sentinel (`redis.sentinels`), so the Redis proxies
    /// are not on their path (S14).
    pub sentinel: bool,
}

impl Fleet {
    /// Creates the database and starts everything but the producer and the
    /// workers ([`Fleet::start_processes`]).
    pub async fn start(
        name: &str,
        dir: &Path,
        logs: &Path,
        pg: &PrivatePostgres,
        bins: &Bins,
        profile: &Profile,
        spec: &FleetSpec,
    ) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(logs)?;
        let gateway_kind = chaos_gateway_kind()?;
        let db_name = format!(
            "chaos_{}_{}",
            name.to_lowercase(),
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let db_url = pg.create_database(&db_name).await?;
        let postgres = if spec.pg_proxy {
            let upstream = SocketAddr::from(([127, 0, 0, 1], pg.port()));
            Some(Proxy::start("fleet->postgres", upstream).await?)
        } else {
            None
        };
        let db_url = match &postgres {
            Some(p) => format!("postgres://postgres@{}/{db_name}", p.addr()),
            None => db_url,
        };
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&db_url)
            .await
            .context("connect to the scenario database")?;
        crate::db::migrate(&pool).await?;

        let redis =
            PrivateRedis::start(&dir.join("redis"), &logs.join("redis.log"), spec.aof).await?;
        let gateway = GatewayProc::start(
            &bins.gateway,
            dir,
            logs,
            profile.seed,
            &spec.closed_destinations,
        )
        .await?;
        gateway.set_faults(&profile.base_faults()).await?;
        let redis_addr = SocketAddr::from(([127, 0, 0, 1], redis.port()));
        let worker_redis = Proxy::start("workers->redis", redis_addr).await?;
        let worker_gateway = Proxy::start("workers->gateway", gateway.addr()).await?;
        let producer_redis = Proxy::start("producer->redis", redis_addr).await?;

        let sentinel = if spec.sentinel {
            Some(PrivateSentinel::start(dir, logs, &redis).await?)
        } else {
            None
        };
        let mut env = child_env(&db_url, profile);
        if let Some(s) = &sentinel {
            env.push((
                "PAYOUTS_REDIS__SENTINELS".into(),
                format!("[\"{}\"]", s.addr()),
            ));
            env.push((
                "PAYOUTS_REDIS__SENTINEL_MASTER".into(),
                super::redis::SENTINEL_MASTER.into(),
            ));
        }
        let mut harness_env = env.clone();
        harness_env.push(("REDIS_URL".into(), redis.url()));
        harness_env.extend(gateway_env(&gateway_kind, &gateway.base_url()));
        let settings = Settings::load_from(None, &harness_env)?;
        let conn = crate::queue::connect(&settings.redis).await?;
        let queue = Queue::from_settings(conn, &settings);
        Ok(Fleet {
            producer: None,
            workers: Vec::new(),
            worker_redis,
            worker_gateway,
            producer_redis,
            gateway,
            sentinel,
            redis,
            pool,
            queue,
            settings,
            logs: logs.to_path_buf(),
            bins: bins.clone(),
            env,
            spawned: 0,
            gateway_kind,
            postgres,
            ha: None,
        })
    }

    /// Starts the producer and `workers` workers and waits until each says
    /// it is ready (Postgres and Redis answer).
    pub async fn start_processes(&mut self, workers: usize) -> anyhow::Result<()> {
        let mut ports = vec![self.spawn_producer()?];
        for _ in 0..workers {
            ports.push(self.spawn_worker(None)?);
        }
        for port in ports {
            wait_ready(port).await?;
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        bin: &Path,
        role: &str,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<ChildProc> {
        self.spawned += 1;
        let name = format!("{role}-{}", self.spawned);
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env);
        ChildProc::spawn(cmd, &name, &self.logs.join(format!("{name}.log")))
    }

    /// Starts (or restarts) the producer; returns its HTTP port.
    pub fn spawn_producer(&mut self) -> anyhow::Result<u16> {
        let port = free_port()?;
        let mut env = self.env.clone();
        env.push((
            "REDIS_URL".into(),
            format!("redis://{}", self.producer_redis.addr()),
        ));
        env.push((
            "PAYOUTS_PRODUCER__LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ));
        // Its in-transit poll asks the gateway of the configured kind.
        env.extend(gateway_env(&self.gateway_kind, &self.gateway.base_url()));
        let bin = self.bins.producer.clone();
        let p = self.spawn(&bin, "producer", env)?;
        self.producer = Some(p);
        Ok(port)
    }

    /// Starts a worker in slot `slot` (replacing the process there) or in a
    /// new slot; returns its HTTP port.
    pub fn spawn_worker(&mut self, slot: Option<usize>) -> anyhow::Result<u16> {
        let port = free_port()?;
        let mut env = self.env.clone();
        env.push((
            "REDIS_URL".into(),
            format!("redis://{}", self.worker_redis.addr()),
        ));
        env.extend(gateway_env(
            &self.gateway_kind,
            &format!("http://{}", self.worker_gateway.addr()),
        ));
        env.push(("PAYOUTS_WORKER__LISTEN".into(), format!("127.0.0.1:{port}")));
        let bin = self.bins.worker.clone();
        let proc = self.spawn(&bin, "worker", env)?;
        let w = WorkerProc { proc, port };
        match slot {
            Some(i) => self.workers[i] = w,
            None => self.workers.push(w),
        }
        Ok(port)
    }

    /// Processes of the fleet that exited without the harness killing them.
    pub fn unexpected_exits(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let procs = self
            .producer
            .iter_mut()
            .chain(self.workers.iter_mut().map(|w| &mut w.proc));
        for p in procs {
            if let Some(status) = p.exited() {
                out.push(format!("{} exited on its own ({status})", p.name()));
            }
        }
        out
    }

    /// Kills the producer and every worker (the fleet must not write while
    /// the invariants are checked).
    pub fn kill_processes(&mut self) {
        if let Some(mut p) = self.producer.take() {
            p.kill9();
        }
        for w in &mut self.workers {
            w.proc.kill9();
        }
    }
}

/// The children's configuration: fast timings, so faults heal in seconds
/// (a lease of 4 s renewed every second, a call needing 1 s + 1 s of it,
/// beats every 250 ms, a rescue after 1.5 s of silence). With
/// `profile.defaults`, only what locates the fleet: every other setting is
/// the default.
fn child_env(db_url: &str, profile: &Profile) -> Vec<(String, String)> {
    let log_filter =
        std::env::var("PAYOUTS_CHAOS_RUST_LOG").unwrap_or_else(|_| "warn,payouts=info".into());
    if profile.defaults {
        return [
            ("DATABASE_URL", db_url),
            ("PAYOUTS_REDIS__PREFIX", PREFIX),
            ("PAYOUTS_LOG__FORMAT", "json"),
            // The children's log filter, e.g. `debug` when hunting a hang.
            ("RUST_LOG", &log_filter),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    }
    let lease = profile.lease_secs.to_string();
    let lock = profile.lock_ttl_ms.to_string();
    let queue_lease = profile.queue_lease_secs.to_string();
    [
        ("DATABASE_URL", db_url),
        ("PAYOUTS_REDIS__PREFIX", PREFIX),
        ("PAYOUTS_DATABASE__MAX_CONNECTIONS", "8"),
        ("PAYOUTS_DATABASE__ACQUIRE_TIMEOUT_MS", "3000"),
        ("PAYOUTS_GATEWAY__TIMEOUT_MS", "1000"),
        ("PAYOUTS_GATEWAY__CONNECT_TIMEOUT_MS", "500"),
        ("PAYOUTS_GATEWAY__BACKOFF_BASE_MS", "5"),
        ("PAYOUTS_GATEWAY__BACKOFF_CAP_MS", "50"),
        ("PAYOUTS_GATEWAY__BACKOFF_TRIES", "3"),
        // The breaker's cool-down scaled to the scenarios (the default is 30 s).
        ("PAYOUTS_GATEWAY__BREAKER_COOLDOWN_MS", "1000"),
        ("PAYOUTS_PRODUCER__TICK_MS", "100"),
        ("PAYOUTS_PRODUCER__REFILL_MS", "20"),
        ("PAYOUTS_PRODUCER__QUEUE_LEASE_SECS", &queue_lease),
        ("PAYOUTS_PRODUCER__LEADER_TTL_MS", "1500"),
        ("PAYOUTS_PRODUCER__JANITOR_EVERY_TICKS", "5"),
        ("PAYOUTS_WORKER__LEASE_SECS", &lease),
        ("PAYOUTS_WORKER__LOCK_TTL_MS", &lock),
        ("PAYOUTS_WORKER__RENEW_EVERY_MS", "1000"),
        ("PAYOUTS_WORKER__CALL_MARGIN_MS", "1000"),
        ("PAYOUTS_WORKER__BEAT_MS", "250"),
        ("PAYOUTS_PRODUCER__RESCUE_AFTER_MS", "1500"),
        ("PAYOUTS_WORKER__POLL_INTERVAL_MS", "20"),
        ("PAYOUTS_WORKER__HEARTBEAT_SECS", "1"),
        ("PAYOUTS_WORKER__SHUTDOWN_DEADLINE_SECS", "3"),
        ("PAYOUTS_WORKER__MAX_ATTEMPTS", "5"),
        ("PAYOUTS_WORKER__RETRY_SCHEDULE_SECS", "[1, 2]"),
        ("PAYOUTS_LOG__FORMAT", "json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain(std::iter::once((
        "RUST_LOG".to_string(),
        // The children's log filter, e.g. `debug` when hunting a hang.
        log_filter,
    )))
    .collect()
}

/// Polls a fleet process's `/health/ready` until it answers 200 (Postgres
/// and Redis answer it).
pub async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("http://127.0.0.1:{port}/health/ready");
    poll(
        Duration::from_secs(60),
        Duration::from_millis(50),
        &format!("{url} to answer 200"),
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        },
    )
    .await
}

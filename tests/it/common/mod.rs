//! Test support: a fresh database per test, a fresh Redis key prefix, an
//! in-process mock gateway on port 0, fast settings, and deadline polling.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

use std::{
    future::Future,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use payouts::{
    clock::{SharedClock, SystemClock},
    config::Settings,
    db::{self, payees},
    domain::{Currency, Money, PayeeId, PayoutId},
    gateway::{
        backoff::BackoffPolicy,
        guard::{GatewayGuard, GuardSettings},
        http::HttpGateway,
    },
    producer::Producer,
    queue::{Queue, lock::Locks},
    testkit::mock_gateway::{Faults, MockGateway, MockGatewayConfig, RunningMockGateway},
    worker::Worker,
};
use sqlx::{Connection, PgPool};

/// The server tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("PAYOUTS_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis tests use (each with its own key prefix).
pub fn redis_url() -> String {
    std::env::var("PAYOUTS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A unique lower-case name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// A fresh, migrated database; dropped when the value is.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = unique("payouts_test");
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to test Postgres");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("admin url has no database"),
        };
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .expect("connect test db");
        db::migrate(&pool).await.expect("migrate");
        TestDb { name, url, pool }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = std::process::Command::new("psql")
            .arg(admin_url())
            .arg("-qc")
            .arg(sql)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// The configuration of a test fleet as environment variables: its own
/// database and prefix, fast timings. Child processes get exactly these.
pub fn child_env(
    db_url: &str,
    redis_url: &str,
    prefix: &str,
    gateway_url: &str,
) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", db_url),
        ("REDIS_URL", redis_url),
        ("PAYOUTS_REDIS__PREFIX", prefix),
        ("PAYOUTS_GATEWAY__BASE_URL", gateway_url),
        ("PAYOUTS_GATEWAY__TIMEOUT_MS", "1000"),
        ("PAYOUTS_GATEWAY__BACKOFF_BASE_MS", "5"),
        ("PAYOUTS_GATEWAY__BACKOFF_CAP_MS", "50"),
        ("PAYOUTS_GATEWAY__BACKOFF_TRIES", "3"),
        ("PAYOUTS_PRODUCER__TICK_MS", "100"),
        ("PAYOUTS_PRODUCER__REFILL_MS", "20"),
        ("PAYOUTS_PRODUCER__QUEUE_LEASE_SECS", "3"),
        ("PAYOUTS_PRODUCER__LEADER_TTL_MS", "1500"),
        ("PAYOUTS_PRODUCER__LISTEN", "127.0.0.1:0"),
        ("PAYOUTS_PRODUCER__JANITOR_EVERY_TICKS", "5"),
        ("PAYOUTS_PRODUCER__GAUGES_EVERY_SECS", "1"),
        ("PAYOUTS_WORKER__LISTEN", "127.0.0.1:0"),
        ("PAYOUTS_WORKER__LEASE_SECS", "5"),
        ("PAYOUTS_WORKER__LOCK_TTL_MS", "2000"),
        ("PAYOUTS_WORKER__RENEW_EVERY_MS", "1000"),
        ("PAYOUTS_WORKER__CALL_MARGIN_MS", "1000"),
        ("PAYOUTS_WORKER__BEAT_MS", "250"),
        ("PAYOUTS_PRODUCER__RESCUE_AFTER_MS", "1500"),
        ("PAYOUTS_WORKER__POLL_INTERVAL_MS", "20"),
        ("PAYOUTS_WORKER__HEARTBEAT_SECS", "1"),
        ("PAYOUTS_WORKER__SHUTDOWN_DEADLINE_SECS", "5"),
        ("PAYOUTS_DATABASE__MAX_CONNECTIONS", "8"),
        ("PAYOUTS_LOG__FORMAT", "json"),
        ("RUST_LOG", "warn,payouts=info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Settings for an in-process test fleet: [`child_env`] plus `extra`.
pub fn settings(
    db_url: &str,
    redis_url: &str,
    prefix: &str,
    gateway_url: &str,
    extra: &[(&str, &str)],
) -> Settings {
    let mut env = child_env(db_url, redis_url, prefix, gateway_url);
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    Settings::load_from(None, &env).expect("test settings")
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One test's whole fleet, in-process: database, prefix, mock gateway, and
/// the producer and worker services built on them.
pub struct Fleet {
    pub db: TestDb,
    pub prefix: String,
    pub gateway: RunningMockGateway,
    pub settings: Settings,
    pub queue: Queue,
    pub clock: SharedClock,
}

impl Fleet {
    pub async fn start(faults: Faults) -> Fleet {
        Self::start_with(faults, &[], Arc::new(SystemClock)).await
    }

    pub async fn start_with(faults: Faults, extra: &[(&str, &str)], clock: SharedClock) -> Fleet {
        let db = TestDb::new().await;
        let prefix = unique("t");
        let gateway = MockGateway::start(MockGatewayConfig {
            faults,
            ..Default::default()
        })
        .await
        .expect("start mock gateway");
        let settings = settings(&db.url, &redis_url(), &prefix, &gateway.base_url, extra);
        let conn = payouts::queue::connect(&settings.redis)
            .await
            .expect("redis");
        let queue = Queue::from_settings(conn, &settings);
        Fleet {
            db,
            prefix,
            gateway,
            settings,
            queue,
            clock,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    pub fn producer(&self) -> Producer {
        Producer {
            pool: self.db.pool.clone(),
            queue: self.queue.clone(),
            clock: self.clock.clone(),
            settings: self.settings.producer.clone(),
            actor: "producer:test".into(),
        }
    }

    pub fn worker(&self, name: &str) -> Arc<Worker> {
        Arc::new(Worker {
            pool: self.db.pool.clone(),
            batcher: payouts::db::batch::Batcher::spawn(self.db.pool.clone(), 64),
            gateway: Arc::new(HttpGateway::new(&self.settings.gateway).expect("gateway client")),
            guard: Arc::new(GatewayGuard::new(
                self.queue.conn(),
                &self.prefix,
                GuardSettings::from_settings(&self.settings.gateway),
            )),
            locks: Locks::new(
                self.queue.conn(),
                &self.prefix,
                Duration::from_millis(self.settings.worker.lock_ttl_ms),
            ),
            leases: payouts::lease::Leases::from_settings(
                self.db.pool.clone(),
                &format!("worker:{name}"),
                self.clock.clone(),
                &self.settings,
            ),
            clock: self.clock.clone(),
            settings: self.settings.worker.clone(),
            backoff: BackoffPolicy::from_settings(&self.settings.gateway),
            actor: format!("worker:{name}"),
        })
    }

    /// A payee with account `account`.
    /// A worker of this fleet on the gateway `settings` select (any kind),
    /// acting as `actor`.
    pub fn worker_on(&self, settings: &Settings, actor: &str) -> Arc<Worker> {
        Arc::new(Worker {
            pool: self.pool().clone(),
            batcher: db::batch::Batcher::spawn(self.pool().clone(), 64),
            gateway: payouts::gateway::select::build(&settings.gateway)
                .expect("gateway from configuration"),
            guard: Arc::new(GatewayGuard::new(
                self.queue.conn(),
                &self.prefix,
                GuardSettings::from_settings(&settings.gateway),
            )),
            locks: Locks::new(
                self.queue.conn(),
                &self.prefix,
                Duration::from_millis(settings.worker.lock_ttl_ms),
            ),
            leases: payouts::lease::Leases::from_settings(
                self.pool().clone(),
                actor,
                self.clock.clone(),
                settings,
            ),
            clock: self.clock.clone(),
            settings: settings.worker.clone(),
            backoff: BackoffPolicy::from_settings(&settings.gateway),
            actor: actor.into(),
        })
    }

    /// A payout of 120.50 to a new payee at `account`, queued now (as an
    /// operator's enqueue would), for a worker to process.
    pub async fn due_payout(&self, account: &str) -> PayoutId {
        let payee = self.payee(account).await;
        let id = self.payout(payee, "120.50", chrono::Utc::now()).await;
        db::payouts::enqueue_now(
            self.pool(),
            id,
            "operator:test",
            chrono::Utc::now() + chrono::Duration::seconds(60),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
        id
    }

    pub async fn payee(&self, account: &str) -> PayeeId {
        payees::create(
            self.pool(),
            "Test payee",
            account,
            "USD".parse::<Currency>().unwrap(),
        )
        .await
        .expect("payee")
        .id
    }

    /// A pending payout of `amount` USD due at `due`.
    pub async fn payout(
        &self,
        payee: PayeeId,
        amount: &str,
        due: chrono::DateTime<chrono::Utc>,
    ) -> PayoutId {
        payouts::db::payouts::create(
            self.pool(),
            payee,
            Money::parse(amount, "USD").unwrap(),
            due,
            "operator:test",
            self.clock.now(),
        )
        .await
        .expect("payout")
        .id
    }

    /// Many due payouts over `payees` demo payees.
    pub async fn seed(&self, count: i64, payees_n: i64) {
        let ids = payees::create_demo(self.pool(), payees_n, "USD".parse().unwrap())
            .await
            .unwrap();
        let now = self.clock.now();
        payouts::db::payouts::seed(self.pool(), &ids, count, "USD", now, now)
            .await
            .unwrap();
    }

    pub async fn count(&self, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM payouts WHERE status = $1")
            .bind(status)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    pub async fn status(&self, id: i64) -> String {
        sqlx::query_scalar("SELECT status FROM payouts WHERE id = $1")
            .bind(id)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    /// Exactly-once check: every paid payout has one ledger entry keyed by
    /// it, and no key or reference appears twice.
    pub async fn assert_paid_exactly_once(&self) {
        let ledger = self.gateway.gateway.ledger();
        let mut keys: Vec<&str> = ledger.iter().map(|e| e.idempotency_key.as_str()).collect();
        keys.sort();
        let before = keys.len();
        keys.dedup();
        assert_eq!(before, keys.len(), "an idempotency key was applied twice");
        let mut refs: Vec<&str> = ledger.iter().map(|e| e.reference.as_str()).collect();
        refs.sort();
        refs.dedup();
        assert_eq!(before, refs.len(), "a payout reference was paid twice");
        let paid: Vec<(i64, Option<String>)> = sqlx::query_as(
            "SELECT id, gateway_transfer_id FROM payouts WHERE status = 'paid' ORDER BY id",
        )
        .fetch_all(self.pool())
        .await
        .unwrap();
        assert_eq!(
            paid.len(),
            ledger.len(),
            "paid rows {} != ledger entries {}",
            paid.len(),
            ledger.len()
        );
        for (id, tr) in paid {
            let entry = ledger
                .iter()
                .find(|e| e.reference == format!("payout_{id}"))
                .unwrap_or_else(|| {
                    panic!("payout {id} is paid in the database but not at the gateway")
                });
            assert_eq!(Some(&entry.id), tr.as_ref(), "payout {id} transfer id");
        }
    }
}

/// A child process of the fleet, killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(bin: &str, name: &str, env: &[(String, String)]) -> Proc {
        let log_dir = std::env::temp_dir().join("payouts-test-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = std::fs::File::create(log_dir.join(format!("{name}-{}.log", std::process::id())))
            .unwrap();
        let child = Command::new(bin)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        Proc {
            name: name.into(),
            child,
        }
    }

    pub fn worker(env: &[(String, String)], name: &str) -> Proc {
        Proc::spawn(env!("CARGO_BIN_EXE_payout-worker"), name, env)
    }

    pub fn producer(env: &[(String, String)], name: &str) -> Proc {
        Proc::spawn(env!("CARGO_BIN_EXE_payout-producer"), name, env)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {}", self.name);
    }

    pub fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{} died",
            self.name
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (polling, with a deadline) until the process exits; its status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let what = format!("{} to exit", self.name);
        let child = &mut self.child;
        eventually(deadline, &what, || {
            let s = child.try_wait().unwrap();
            async move { s }
        })
        .await
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `payoutctl` as a binary on a fresh database and Redis prefix.
pub struct Ctl {
    pub db: TestDb,
    pub prefix: String,
}

/// What a `payoutctl` run printed.
pub struct Out {
    pub ok: bool,
    /// The exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn of(out: std::process::Output) -> Out {
        Out {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }
}

impl Ctl {
    pub async fn new() -> Ctl {
        Ctl {
            db: TestDb::new().await,
            prefix: unique("ctl"),
        }
    }

    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_payoutctl"));
        c.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("DATABASE_URL", &self.db.url)
            .env("REDIS_URL", redis_url())
            .env("PAYOUTS_REDIS__PREFIX", &self.prefix)
            .env("PAYOUTS_OPERATOR", "alice")
            .envs(env.iter().copied());
        c
    }

    pub fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        Out::of(self.command(args, env).output().expect("run payoutctl"))
    }

    /// Runs a command with `input` on its standard input.
    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Out {
        use std::io::Write;
        let mut child = self
            .command(args, &[])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run payoutctl");
        child
            .stdin
            .take()
            .expect("stdin piped")
            .write_all(input)
            .expect("write payoutctl's stdin");
        Out::of(child.wait_with_output().expect("payoutctl's output"))
    }

    /// Runs a command (no extra environment).
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, &[])
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run_with(args, &[]);
        assert!(o.ok, "payoutctl {args:?} failed: {}", o.stderr);
        o.stdout
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(self.ok(&a).trim()).expect("JSON output")
    }

    /// A command that must fail: its one-line error.
    pub fn fails_with(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let o = self.run_with(args, env);
        assert!(!o.ok, "payoutctl {args:?} should have failed: {}", o.stdout);
        let line = o.stderr.trim().to_string();
        assert_eq!(line.lines().count(), 1, "one line: {line}");
        assert!(line.starts_with("error: "), "{line}");
        line
    }

    pub fn fails(&self, args: &[&str]) -> String {
        self.fails_with(args, &[])
    }
}

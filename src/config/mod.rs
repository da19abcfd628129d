//! One `Settings` for every binary: embedded defaults, then an optional TOML
//! file, then `PAYOUTS_*` environment variables (`__` separates nesting), then
//! `DATABASE_URL` / `REDIS_URL`. Validated once at load, with the bad key named.

pub mod email;
mod gateway;
pub mod priority;
pub mod webhooks_out;

pub use email::EmailSettings;
pub use gateway::{GatewaySettingsError, MOCK_SECRET, STATUS_MEANINGS, validate_gateway};
pub use priority::PrioritySettings;
pub use webhooks_out::WebhooksOutSettings;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../../config/default.toml");
/// The built-in payout policy, used when `policy.file` is empty.
const DEFAULT_POLICY: &str = include_str!("../../config/policy.toml");

/// Every setting of the fleet.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Postgres, the source of truth.
    pub database: DatabaseSettings,
    /// Redis, the transport and the lock service.
    pub redis: RedisSettings,
    /// The producer: due scan, window, sweep, leadership.
    pub producer: ProducerSettings,
    /// The worker: concurrency, leases, retries.
    pub worker: WorkerSettings,
    /// The payment gateway.
    pub gateway: GatewaySettings,
    /// Logging.
    pub log: LogSettings,
    /// The payout policy (commission, fees, minimums, hold, schedules).
    pub policy: PolicySettings,
    /// The admin server: API, dashboard, webhooks, earnings intake.
    pub admin: AdminSettings,
    /// Outbound webhooks to the platform (Standard Webhooks).
    pub webhooks_out: WebhooksOutSettings,
    /// Email to payees (SMTP), sent with the outbound webhooks.
    pub email: EmailSettings,
}

/// `payout-admin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Where it listens (`/health*`, `/metrics`, the API, the dashboard, the webhooks).
    pub listen: std::net::SocketAddr,
    /// How long a browser session lasts after its login, in seconds.
    pub session_ttl_secs: u64,
    /// A browser session unused for this long ends, in seconds.
    pub session_idle_secs: u64,
    /// Mark the session cookie `Secure` (browsers also send it to http://localhost).
    pub cookie_secure: bool,
    /// How long one computation of the fleet overview is served to every viewer, in ms.
    pub overview_cache_ms: u64,
    /// Most payouts one bulk retry moves.
    pub bulk_max: i64,
    /// Most seconds from a connection's start (or its previous request) to
    /// the end of the next request's headers; then the connection is closed.
    pub header_read_timeout_secs: u64,
    /// Most seconds one request may take, its body read included; then 408.
    pub request_timeout_secs: u64,
    /// Most connections open at once; more are closed when accepted.
    pub max_connections: usize,
    /// Most requests handled at once; more wait, within the request timeout.
    pub max_in_flight: usize,
    /// Postgres `statement_timeout` of the admin server's connections, in ms
    /// (a wide dashboard query cannot hold the pool).
    pub statement_timeout_ms: u64,
    /// Failed authentications (bad bearer token, bad login) one source may
    /// make per minute before it is locked out.
    pub auth_failures_per_minute: u32,
    /// How long a locked-out source is refused (429), in seconds.
    pub lockout_secs: u64,
    /// A header whose last address is the client's, set by a proxy you trust
    /// (e.g. `x-forwarded-for`); empty: the TCP peer's address.
    pub client_ip_header: String,
    /// Host names the listener answers besides IP addresses, single-label
    /// names (`localhost`, `payout-admin`) and cluster names (`*.svc`,
    /// `*.svc.cluster.local`): the dashboard's public name behind an
    /// ingress. Any other `Host` gets 421 (DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

/// Where the payout policy comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// A policy TOML file; empty means the built-in copy of `config/policy.toml`.
    pub file: String,
}

impl PolicySettings {
    /// Reads and validates the policy; the error names the file and the bad field.
    pub fn load(&self) -> anyhow::Result<crate::domain::Policy> {
        if self.file.trim().is_empty() {
            return DEFAULT_POLICY
                .parse()
                .map_err(|e| anyhow::anyhow!("built-in policy config/policy.toml: {e}"));
        }
        let text = std::fs::read_to_string(&self.file)
            .with_context(|| format!("failed to read policy file {}", self.file))?;
        text.parse()
            .map_err(|e| anyhow::anyhow!("policy file {}: {e}", self.file))
    }
}

/// Postgres connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL (`DATABASE_URL` overrides). May hold a password: never logged.
    pub url: SecretString,
    /// Pool size per process.
    pub max_connections: u32,
    /// How long to wait for a pooled connection before failing, in ms.
    pub acquire_timeout_ms: u64,
}

/// Redis connection and key namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Connection URL (`REDIS_URL` overrides). May hold a password: never logged.
    pub url: SecretString,
    /// Prefix of every key the fleet writes; the queue keys are hash-tagged with it.
    pub prefix: String,
    /// Redis Sentinel addresses (`host:port`). Empty: `url` is the Redis.
    /// Set: the master is asked of the sentinels (`url` then gives only the
    /// password and database), and a process whose master moves stops
    /// gracefully and exits non-zero, so its supervisor restarts it against
    /// the new master.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The master name the sentinels monitor.
    #[serde(default = "default_sentinel_master")]
    pub sentinel_master: String,
    /// How often a process asks the sentinels where the master is, in ms.
    #[serde(default = "default_sentinel_check_ms")]
    pub sentinel_check_ms: u64,
}

fn default_sentinel_master() -> String {
    "mymaster".into()
}

fn default_sentinel_check_ms() -> u64 {
    1000
}

/// The producer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerSettings {
    /// Interval between due scans when there is nothing to top up, in ms.
    pub tick_ms: u64,
    /// Interval between top-ups while a backlog is draining, in ms.
    pub refill_ms: u64,
    /// Most payouts moved to `queued` by one statement.
    pub batch_size: i64,
    /// Most payouts `queued` (in Redis) at once: the bounded window.
    pub window: i64,
    /// How long a `queued` payout may wait for a worker before the sweep enqueues it again, in s.
    pub queue_lease_secs: u64,
    /// Time-to-live of the leader lock, in ms; a standby takes over within this.
    pub leader_ttl_ms: u64,
    /// Every how many ticks the janitor trims finished jobs out of Redis.
    pub janitor_every_ticks: u64,
    /// How often the leader refreshes the status and backlog gauges, in s.
    pub gauges_every_secs: u64,
    /// Address of `/health`, `/health/ready` and `/metrics`.
    pub listen: SocketAddr,
    /// Run settlement (earnings -> payouts, `crate::services::settlement`) in the
    /// leading producer, on its tick (on by default: otherwise earnings never
    /// become payouts).
    pub settle_on_tick: bool,
    /// The settlement interval: at most one settlement pass every this many
    /// seconds, whichever replica leads (recorded in Postgres).
    pub settle_every_secs: u64,
    /// A worker whose liveness beat (`worker.beat_ms`) is older than this, in
    /// ms, is taken for dead: the leader releases what it held and re-enqueues
    /// it at the front of the queue (0: off; the lease runs out instead).
    pub rescue_after_ms: u64,
    /// The due scan's ranking (`[producer.priority]`, [`priority`]).
    pub priority: PrioritySettings,
    /// The policy that pass applies: `services::settlement::policy_for`, loaded
    /// at load when `settle_on_tick` is on (not a key of its own).
    #[serde(skip)]
    pub policy: Option<Arc<crate::domain::Policy>>,
}

/// The worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs in flight per process.
    pub concurrency: usize,
    /// Jobs fetched from Redis per round trip.
    pub fetch_batch: usize,
    /// Most claims (and most final writes) grouped into one Postgres statement.
    pub db_batch: usize,
    /// How often an idle worker polls Redis, in ms (apalis-redis otherwise waits for its heartbeat).
    pub poll_interval_ms: u64,
    /// apalis heartbeat interval, in s.
    pub heartbeat_secs: u64,
    /// How long a claim (or its latest renewal) holds a payout before another
    /// worker may take it over, in s.
    pub lease_secs: u64,
    /// How often a worker renews the leases of every payout it holds, in ms
    /// (one statement per process).
    pub renew_every_ms: u64,
    /// A gateway call starts only while the lease has `gateway.timeout_ms`
    /// plus this much left, in ms; otherwise the payout is released.
    pub call_margin_ms: u64,
    /// How often a worker writes its liveness beat to Redis, in ms.
    pub beat_ms: u64,
    /// Time-to-live of the per-payout Redis lock, in ms (renewed while held).
    pub lock_ttl_ms: u64,
    /// Attempts (claims) before a payout with transient failures is `failed`.
    pub max_attempts: i32,
    /// How many times a payout may be held (payee not onboarded) before it
    /// fails with its code instead of being held again (at least 1).
    pub max_holds: i32,
    /// Delay before attempt 2, 3, ... in s; the last value repeats.
    pub retry_schedule_secs: Vec<u64>,
    /// On SIGTERM, how long in-flight jobs may take to finish, in s.
    pub shutdown_deadline_secs: u64,
    /// Address of `/health`, `/health/ready` and `/metrics`.
    pub listen: SocketAddr,
}

/// Which gateway adapter the fleet pays through (`gateway.kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayKind {
    /// The generic HTTP contract (`../shared/gateway-contract.md`).
    #[default]
    Contract,
    /// Stripe Connect transfers.
    Stripe,
    /// A platform's own release-funds API.
    ReleaseFunds,
}

impl GatewayKind {
    /// Every kind.
    pub const ALL: [GatewayKind; 3] = [
        GatewayKind::Contract,
        GatewayKind::Stripe,
        GatewayKind::ReleaseFunds,
    ];

    /// The configuration's spelling (`contract`, `stripe`, `release_funds`).
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayKind::Contract => "contract",
            GatewayKind::Stripe => "stripe",
            GatewayKind::ReleaseFunds => "release_funds",
        }
    }
}

impl std::fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `gateway.kind` that names no adapter (the kind given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gateway.kind must be one of \"contract\", \"stripe\", \"release_funds\" (got {0:?})")]
pub struct UnknownGatewayKind(pub String);

impl std::str::FromStr for GatewayKind {
    type Err = UnknownGatewayKind;
    fn from_str(s: &str) -> Result<Self, UnknownGatewayKind> {
        GatewayKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownGatewayKind(s.to_string()))
    }
}

/// The payment gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// Which adapter: `contract` (the generic HTTP contract), `stripe`
    /// (Stripe Connect transfers) or `release_funds` (a platform's own
    /// `POST /api/Payment/release-funds`).
    pub kind: GatewayKind,
    /// Base URL of the gateway.
    pub base_url: String,
    /// Bearer secret. Never logged. The built-in `sk_test_mock` is the local
    /// mock gateway's and is refused for any other host.
    pub secret: SecretString,
    /// Hosts (besides loopback) that may be called over plain `http://`,
    /// e.g. the mock gateway on a compose network. Everything else must be
    /// `https://`, since the bearer secret travels with every request.
    pub insecure_http_hosts: Vec<String>,
    /// Whole-request timeout, in ms.
    pub timeout_ms: u64,
    /// Connect timeout, in ms.
    pub connect_timeout_ms: u64,
    /// First in-attempt backoff delay, in ms (full jitter).
    pub backoff_base_ms: u64,
    /// Largest in-attempt backoff delay, in ms.
    pub backoff_cap_ms: u64,
    /// Calls per attempt, the first included.
    pub backoff_tries: usize,
    /// Fleet-wide requests per second (all workers together); 0 = no limit.
    pub rate_limit_per_sec: u32,
    /// Requests allowed at once above the rate.
    pub rate_limit_burst: u32,
    /// How long the whole fleet pauses when the gateway refuses the platform
    /// (401, a restricted key's 403, the platform's balance short), in s.
    pub credential_pause_secs: u64,
    /// Calls in the breaker's window before it may open.
    pub breaker_min_calls: usize,
    /// Percent of failed calls (5xx, timeouts, connection errors, 401) that opens the breaker.
    pub breaker_error_ratio_pct: u32,
    /// The breaker's sliding window, in ms.
    pub breaker_window_ms: u64,
    /// How long the breaker stays open before a probe, in ms.
    pub breaker_cooldown_ms: u64,
    /// Stripe Connect (`kind = "stripe"`).
    pub stripe: StripeSettings,
    /// A platform's release-funds API (`kind = "release_funds"`).
    pub release_funds: ReleaseFundsSettings,
    /// Incoming webhooks of the contract gateway (`Gateway-Signature`).
    pub webhooks: WebhookSettings,
    /// The poll that resolves payouts left `in_transit`.
    pub sync: SyncSettings,
}

/// Stripe Connect: transfers to connected accounts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeSettings {
    /// API base URL: `https://api.stripe.com` (a local fake in tests).
    pub base_url: String,
    /// Secret key (`sk_test_…`, `sk_live_…`, or a restricted `rk_…`). Never logged.
    pub secret_key: SecretString,
    /// The pinned `Stripe-Version` header, e.g. `2025-04-30.basil`.
    pub stripe_version: String,
    /// Look the transfer up by `transfer_group` before every create, so a
    /// retry after Stripe forgot the idempotency key (24 h) cannot pay twice.
    /// One extra GET per call.
    pub lookup_before_create: bool,
    /// Webhook endpoint signing secrets (`whsec_…`); more than one during rotation. Never logged.
    pub webhook_secrets: Vec<SecretString>,
}

/// A platform's own payment API (`POST {base_url}{endpoint}`, JSON, cents).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseFundsSettings {
    /// `PaymentAPI.BaseUrl`, e.g. `http://localhost:8085`.
    pub base_url: String,
    /// `PaymentAPI.ReleaseFundsEndpoint`, e.g. `/api/Payment/release-funds`.
    pub endpoint: String,
    /// Look-up by reference (`GET {base_url}{lookup_endpoint}?reference=…`); empty: none.
    pub lookup_endpoint: String,
    /// Bearer token; empty: no `Authorization` header. Never logged.
    pub secret: SecretString,
    /// What an HTTP status means, by code: `paid`, `in_transit`, `permanent`,
    /// `transient` or `unknown`. Codes not listed: 2xx per the body, 5xx
    /// transient, anything else unknown. A transient 402 is the platform's
    /// balance short (`platform_balance_insufficient`).
    pub status_map: std::collections::BTreeMap<String, String>,
    /// Error codes meaning "the driver has not finished onboarding": the
    /// payout is `held` (no attempt spent), not failed.
    pub not_onboarded_codes: Vec<String>,
    /// Error codes meaning "the platform's balance is short" (any 4xx): retried
    /// later as `platform_balance_insufficient`, never a payee failure.
    pub balance_codes: Vec<String>,
    /// Onboarding check (`GET {base_url}{account_endpoint}`, `{account}`
    /// replaced by the payee's account) that releases `held` payouts; empty:
    /// none, held payouts wait for `payoutctl enqueue <id>`.
    pub account_endpoint: String,
}

/// Incoming gateway webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Signing secrets of the contract gateway's `Gateway-Signature`; more than one during rotation.
    pub secrets: Vec<SecretString>,
    /// Oldest (or furthest in the future) signed timestamp accepted, in s.
    pub tolerance_secs: u64,
}

/// The poll that resolves `in_transit` payouts no webhook resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// Interval between polls, in s.
    pub interval_secs: u64,
    /// Only payouts `in_transit` for at least this long are looked up, in s.
    pub min_age_secs: u64,
    /// Most payouts looked up per poll.
    pub batch: i64,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `pretty`, `json`, or `auto` (pretty on a terminal, JSON otherwise).
    pub format: String,
}

impl WorkerSettings {
    /// The delay before the next attempt, after `attempt` attempts have failed.
    pub fn retry_delay(&self, attempt: i32) -> Duration {
        let idx = (attempt.max(1) as usize - 1).min(self.retry_schedule_secs.len() - 1);
        Duration::from_secs(self.retry_schedule_secs[idx])
    }
}

impl Settings {
    /// How much lease a gateway call needs left to start: the request's
    /// whole timeout plus `worker.call_margin_ms`.
    pub fn call_margin(&self) -> Duration {
        Duration::from_millis(self.gateway.timeout_ms + self.worker.call_margin_ms)
    }
}

impl Settings {
    /// Loads defaults, then `file` (or `PAYOUTS_CONFIG`), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Like [`Settings::load`], with the environment given (for tests).
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut value: toml::Value = toml::from_str(DEFAULTS).context("embedded defaults")?;
        let from_env = env
            .iter()
            .find(|(k, _)| k == "PAYOUTS_CONFIG")
            .map(|(_, v)| std::path::PathBuf::from(v));
        if let Some(path) = file.map(Path::to_path_buf).or(from_env) {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("failed to read config file {}", path.display()))?;
            let overlay: toml::Value = toml::from_str(&text)
                .with_context(|| format!("failed to parse config file {}", path.display()))?;
            merge(&mut value, overlay);
        }
        for (key, raw) in env {
            let path: Vec<String> = match key.strip_prefix("PAYOUTS_") {
                Some(rest) if key != "PAYOUTS_CONFIG" => {
                    rest.split("__").map(|s| s.to_ascii_lowercase()).collect()
                }
                _ => match key.as_str() {
                    "DATABASE_URL" => vec!["database".into(), "url".into()],
                    "REDIS_URL" => vec!["redis".into(), "url".into()],
                    _ => continue,
                },
            };
            set_path(&mut value, &path, parse_env_value(raw))
                .with_context(|| format!("bad environment variable {key}"))?;
        }
        let mut settings: Settings = value.try_into().map_err(|e: toml::de::Error| {
            anyhow::anyhow!("invalid configuration: {}", redact_values(&e.to_string()))
        })?;
        settings.validate()?;
        if settings.producer.settle_on_tick {
            // The gateway's increments are applied by the producer
            // (`services::settlement::policy_for`): configuration names no gateway.
            settings.producer.policy = Some(Arc::new(settings.policy.load()?));
        }
        Ok(settings)
    }

    /// Checks ranges; the error names the bad key.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.webhooks_out.validate()?;
        self.email.validate()?;
        self.producer.priority.validate()?;
        if self.email.enabled {
            if !self.webhooks_out.enabled {
                bail!("email.enabled needs webhooks_out.enabled (the same worker sends both)");
            }
            let worst = self
                .email
                .timeout_ms
                .saturating_mul(1 + self.webhooks_out.immediate_retries as u64);
            if self.webhooks_out.lease_secs.saturating_mul(1000)
                < worst.saturating_add(webhooks_out::LEASE_MARGIN_MS)
            {
                bail!(
                    "email.timeout_ms x (1 + webhooks_out.immediate_retries) + 5 s must be <= webhooks_out.lease_secs"
                );
            }
        }
        let checks: [(bool, &str); 27] = [
            (
                self.database.max_connections >= 1,
                "database.max_connections must be >= 1",
            ),
            (
                self.redis.sentinels.iter().all(|s| {
                    s.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                    })
                }),
                "redis.sentinels must each be host:port",
            ),
            (
                self.redis.sentinel_check_ms >= 100,
                "redis.sentinel_check_ms must be >= 100",
            ),
            (
                valid_prefix(&self.redis.prefix),
                "redis.prefix must be 1-64 characters of [A-Za-z0-9_.-]",
            ),
            (
                self.producer.tick_ms >= 10,
                "producer.tick_ms must be >= 10",
            ),
            (
                self.producer.batch_size >= 1,
                "producer.batch_size must be >= 1",
            ),
            (self.producer.window >= 1, "producer.window must be >= 1"),
            (
                self.producer.settle_every_secs >= 1,
                "producer.settle_every_secs must be >= 1",
            ),
            (
                self.producer.window <= 5000,
                "producer.window must be <= 5000 (apalis-redis fails to fetch ~8,000 due jobs at once)",
            ),
            (
                self.producer.queue_lease_secs >= 1,
                "producer.queue_lease_secs must be >= 1",
            ),
            (
                self.producer.leader_ttl_ms >= 100,
                "producer.leader_ttl_ms must be >= 100",
            ),
            (
                (1..=10_000).contains(&self.worker.concurrency),
                "worker.concurrency must be 1..=10000",
            ),
            (
                (1..=1000).contains(&self.worker.fetch_batch),
                "worker.fetch_batch must be 1..=1000",
            ),
            (
                self.worker.max_attempts >= 1,
                "worker.max_attempts must be >= 1",
            ),
            (
                !self.worker.retry_schedule_secs.is_empty(),
                "worker.retry_schedule_secs must not be empty",
            ),
            (self.worker.db_batch >= 1, "worker.db_batch must be >= 1"),
            (
                self.worker.poll_interval_ms >= 1,
                "worker.poll_interval_ms must be >= 1",
            ),
            (
                self.worker.heartbeat_secs >= 1,
                "worker.heartbeat_secs must be >= 1",
            ),
            (
                self.worker.lock_ttl_ms >= 100,
                "worker.lock_ttl_ms must be >= 100",
            ),
            (
                self.worker.renew_every_ms >= 100,
                "worker.renew_every_ms must be >= 100",
            ),
            (self.worker.beat_ms >= 100, "worker.beat_ms must be >= 100"),
            (
                self.producer.rescue_after_ms == 0
                    || self.producer.rescue_after_ms >= 2 * self.worker.beat_ms,
                "producer.rescue_after_ms must be 0 (off) or at least twice worker.beat_ms",
            ),
            (
                self.gateway.backoff_tries >= 1,
                "gateway.backoff_tries must be >= 1",
            ),
            (
                (1..=100).contains(&self.gateway.breaker_error_ratio_pct),
                "gateway.breaker_error_ratio_pct must be 1..=100",
            ),
            (
                self.gateway.breaker_cooldown_ms >= 10,
                "gateway.breaker_cooldown_ms must be >= 10",
            ),
            (
                (60..=7 * 86_400).contains(&self.admin.session_ttl_secs),
                "admin.session_ttl_secs must be 60..=604800",
            ),
            (
                (1..=100_000).contains(&self.admin.bulk_max),
                "admin.bulk_max must be 1..=100000",
            ),
        ];
        let admin = &self.admin;
        let listener: [(bool, &str); 8] = [
            (
                (1..=300).contains(&admin.header_read_timeout_secs),
                "admin.header_read_timeout_secs must be 1..=300",
            ),
            (
                (1..=3600).contains(&admin.request_timeout_secs),
                "admin.request_timeout_secs must be 1..=3600",
            ),
            (
                admin.max_connections >= 1 && admin.max_in_flight >= 1,
                "admin.max_connections and admin.max_in_flight must be >= 1",
            ),
            (
                (60..=86_400).contains(&admin.session_idle_secs),
                "admin.session_idle_secs must be 60..=86400",
            ),
            (
                admin.statement_timeout_ms >= 100,
                "admin.statement_timeout_ms must be >= 100",
            ),
            (
                admin.auth_failures_per_minute >= 1,
                "admin.auth_failures_per_minute must be >= 1",
            ),
            (
                admin.client_ip_header.is_empty()
                    || axum::http::HeaderName::from_bytes(admin.client_ip_header.as_bytes())
                        .is_ok(),
                "admin.client_ip_header must be a header name (or empty)",
            ),
            (
                admin.allowed_hosts.iter().all(|h| valid_host_name(h)),
                "admin.allowed_hosts must be host names (letters, digits, '-' and '.'; no port, no scheme)",
            ),
        ];
        for (ok, msg) in checks.into_iter().chain(listener) {
            if !ok {
                bail!("invalid configuration: {msg}");
            }
        }
        if let Err(e) = self.policy.load() {
            bail!("invalid configuration: policy.file: {e:#}");
        }
        validate_gateway(&self.gateway)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        // A call may start just before a renewal is due; it must still have its
        // margin then. With renewals working, the lease never runs out under a
        // live worker, whatever the retry schedule.
        let lease_ms = self.worker.lease_secs * 1000;
        let needed = self.worker.renew_every_ms + self.call_margin().as_millis() as u64;
        if lease_ms < needed {
            bail!(
                "invalid configuration: worker.lease_secs ({} s) must cover worker.renew_every_ms + \
                 gateway.timeout_ms + worker.call_margin_ms ({needed} ms): a gateway call starts only \
                 with that much lease left, so a shorter lease would make calls wait for renewals",
                self.worker.lease_secs
            );
        }
        Ok(())
    }
}

/// A DNS name: labels of letters, digits and `-`, separated by dots.
pub fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_prefix(p: &str) -> bool {
    (1..=64).contains(&p.len())
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// A deserialization error without the values it quotes: serde quotes the
/// offending value (`invalid type: string "whsec_…", expected a sequence`),
/// and a configuration error is printed at every start, into the logs. Keys
/// are named in backticks and stay.
fn redact_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quoted = false;
    for c in msg.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

fn parse_env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if raw.starts_with('[') {
        if let Ok(toml::Value::Table(t)) = toml::from_str::<toml::Value>(&format!("v = {raw}")) {
            if let Some(v) = t.get("v") {
                return v.clone();
            }
        }
    }
    toml::Value::String(raw.to_string())
}

fn set_path(root: &mut toml::Value, path: &[String], v: toml::Value) -> anyhow::Result<()> {
    let (last, parents) = path.split_last().context("empty key")?;
    let mut cur = root;
    for p in parents {
        let table = cur.as_table_mut().context("not a table")?;
        cur = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = cur.as_table_mut().context("not a table")?;
    // A number given where the default is a string stays a string (e.g. a secret of digits).
    let v = match (table.get(last), v) {
        (Some(toml::Value::String(_)), toml::Value::Integer(i)) => {
            toml::Value::String(i.to_string())
        }
        (Some(toml::Value::String(_)), toml::Value::Boolean(b)) => {
            toml::Value::String(b.to_string())
        }
        // A list given as a plain string (the natural way to set one from a
        // Kubernetes Secret): comma-separated items, each trimmed.
        (Some(toml::Value::Array(_)), toml::Value::String(s)) => toml::Value::Array(
            s.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| toml::Value::String(i.to_string()))
                .collect(),
        ),
        (_, v) => v,
    };
    table.insert(last.clone(), v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_misspelled_key_is_an_error_naming_it_not_a_silent_default() {
        let e = Settings::load_from(None, &env(&[("PAYOUTS_WORKER__MAX_ATTEMPT", "3")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_attempt"), "{e}");
        // Variables that are not settings (one underscore) stay ignored.
        assert!(Settings::load_from(None, &env(&[("PAYOUTS_CHAOS_PG_BIN", "/x")])).is_ok());
        let e = Settings::load_from(None, &env(&[("PAYOUTS_WORKER__POLL_INTERVAL_MS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker.poll_interval_ms"), "{e}");
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load_from(None, &[]).unwrap();
        assert_eq!(s.producer.window, 1000);
        assert_eq!(s.worker.concurrency, 64);
        assert_eq!(s.worker.max_attempts, 5);
    }

    #[test]
    fn env_overrides_nested_keys_and_urls() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("PAYOUTS_WORKER__CONCURRENCY", "128"),
                ("PAYOUTS_WORKER__RETRY_SCHEDULE_SECS", "[1, 2]"),
                ("REDIS_URL", "redis://10.0.0.1:7000"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.concurrency, 128);
        assert_eq!(s.worker.retry_schedule_secs, vec![1, 2]);
        use secrecy::ExposeSecret;
        assert_eq!(s.redis.url.expose_secret(), "redis://10.0.0.1:7000");
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let err = Settings::load_from(None, &env(&[("PAYOUTS_PRODUCER__WINDOW", "9000")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("producer.window"), "{err}");
    }

    #[test]
    fn a_lease_without_room_for_a_call_between_renewals_is_refused() {
        let err = Settings::load_from(
            None,
            &env(&[
                ("PAYOUTS_WORKER__LEASE_SECS", "15"),
                ("PAYOUTS_GATEWAY__TIMEOUT_MS", "10000"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("worker.lease_secs"), "{err}");
        // Renewing more often makes room.
        Settings::load_from(
            None,
            &env(&[
                ("PAYOUTS_WORKER__LEASE_SECS", "15"),
                ("PAYOUTS_WORKER__RENEW_EVERY_MS", "2000"),
                ("PAYOUTS_GATEWAY__TIMEOUT_MS", "10000"),
            ]),
        )
        .unwrap();
    }

    /// Issue #20: a crashed worker costs about one short lease by default,
    /// and its payouts are rescued sooner when its beat stops.
    #[test]
    fn defaults_give_a_short_renewed_lease_and_a_rescue_within_it() {
        let s = Settings::load_from(None, &[]).unwrap();
        assert_eq!(s.worker.lease_secs, 15);
        assert!(s.worker.renew_every_ms * 3 <= s.worker.lease_secs * 1000);
        assert!(s.producer.rescue_after_ms > s.worker.lock_ttl_ms);
        assert!(s.producer.rescue_after_ms < s.worker.lease_secs * 1000);
        let err = Settings::load_from(None, &env(&[("PAYOUTS_PRODUCER__RESCUE_AFTER_MS", "1500")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("producer.rescue_after_ms"), "{err}");
    }

    #[test]
    fn retry_delay_follows_the_schedule_and_repeats_the_last() {
        let s = Settings::load_from(None, &[]).unwrap().worker;
        assert_eq!(s.retry_delay(1), Duration::from_secs(300));
        assert_eq!(s.retry_delay(4), Duration::from_secs(21600));
        assert_eq!(s.retry_delay(9), Duration::from_secs(21600));
    }

    /// Security finding 4: a secret given where a list is expected (the
    /// natural way from a Kubernetes Secret) was echoed in the error that
    /// every binary printed at start.
    #[test]
    fn a_secret_where_a_list_is_expected_is_taken_as_a_list_and_never_echoed() {
        let s = Settings::load_from(
            None,
            &env(&[
                (
                    "PAYOUTS_GATEWAY__WEBHOOKS__SECRETS",
                    "whsec_first_secret_value_1234567, whsec_second_secret_value_7654321",
                ),
                (
                    "PAYOUTS_GATEWAY__STRIPE__WEBHOOK_SECRETS",
                    "whsec_stripe_secret_value_12345",
                ),
            ]),
        )
        .unwrap();
        use secrecy::ExposeSecret;
        let got: Vec<&str> = s
            .gateway
            .webhooks
            .secrets
            .iter()
            .map(|x| x.expose_secret())
            .collect();
        assert_eq!(
            got,
            [
                "whsec_first_secret_value_1234567",
                "whsec_second_secret_value_7654321"
            ]
        );
        assert_eq!(s.gateway.stripe.webhook_secrets.len(), 1);
        // Any type error quotes no value.
        let e = Settings::load_from(
            None,
            &env(&[("PAYOUTS_GATEWAY__WEBHOOKS__SECRETS", "[1, 2]")]),
        );
        if let Err(e) = e {
            assert!(!format!("{e:#}").contains("[1, 2]"), "{e:#}");
        }
        let e = Settings::load_from(
            None,
            &env(&[("PAYOUTS_WORKER__CONCURRENCY", "whsec_not_a_number_secret")]),
        )
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(!e.contains("whsec_not_a_number_secret"), "{e}");
        assert!(e.contains("invalid configuration"), "{e}");
    }

    #[test]
    fn secrets_do_not_appear_in_debug() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("DATABASE_URL", "postgres://u:hunter2@h/db"),
                ("PAYOUTS_GATEWAY__SECRET", "sk_live_zzz"),
            ]),
        )
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("sk_live_zzz"),
            "{dbg}"
        );
    }
}

//! What stands between the fleet and a gateway that is throttling or down:
//!
//! - a **fleet-wide rate limit**: a GCRA in one Lua script on a Redis key
//!   shared by every worker, so all of them together stay under
//!   `gateway.rate_limit_per_sec`. Each request reserves its slot with one
//!   call and sleeps until it (pacing), [`RATE_MARGIN_PCT`] under the rate,
//!   with a burst of `gateway.rate_limit_burst` (1 by default): a gateway
//!   that enforces the same rate with a small token bucket answers no 429;
//! - a **fleet-wide pause on 429**: one worker's Retry-After is written to
//!   Redis and every worker waits it out, instead of each finding out alone;
//! - a **circuit breaker** per process: when the share of failed calls
//!   (5xx, timeouts, connection errors, 401) in a sliding window crosses
//!   `gateway.breaker_error_ratio_pct`, the process stops sending for
//!   `gateway.breaker_cooldown_ms`, then lets one probe through (half-open)
//!   and closes again on its success. Workers wait for a closed circuit
//!   *before* claiming a payout, so no attempt is burned while it is open;
//! - a **fleet pause on platform problems**: a 401 (the secret expired or
//!   was rolled), a 403 (a restricted key lacks a permission) or the
//!   platform's balance short at the gateway (the release-funds
//!   `platform_balance_insufficient`) are not the payee's fault: the whole
//!   fleet pauses for `gateway.credential_pause_secs` (then one worker
//!   probes again), `payout_gateway_platform_pauses_total` counts it and
//!   the `PayoutGatewayPlatformProblem` alert fires. Workers wait for the
//!   pause to end *before* claiming, so it burns no attempt either.
//!
//! The rate limit counts every HTTP request of a client that limits its own
//! requests ([`Gateway::limits_own_requests`], the Stripe client: transfer
//! POSTs, look-ups, account checks, polls), through the same Redis keys
//! ([`FleetLimiter`]); for the other clients, one per transfer call. With
//! `kind = "stripe"` a per-endpoint limit applies too (Stripe's default is 25
//! per second per endpoint, <https://docs.stripe.com/rate-limits>).

use std::{
    collections::VecDeque,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::{Script, aio::ConnectionManager};
use tokio::time::Instant;

use prometheus::{IntCounterVec, Opts};

use super::{
    Gateway, Keyed, Lookup, LookupError, Outcome, RejectReason, RequestLimiter, TransferRecord,
    TransferRequest, TransientKind,
};
use crate::{config::GatewaySettings, metrics};

/// Fleet pauses for a platform problem, by its code (`unauthorized`,
/// `forbidden`, `platform_balance_insufficient`). Read by the
/// `PayoutGatewayPlatformProblem` alert (prometheus/alerts.yml): any
/// increase pages, since no payout moves until someone fixes the platform.
pub static PLATFORM_PAUSES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "payout_gateway_platform_pauses_total",
            "Fleet pauses because the gateway refused the platform (credentials, permissions, platform balance), by code",
        ),
        &["code"],
    )
    .expect("valid metric");
    metrics::REGISTRY
        .register(Box::new(c.clone()))
        .expect("registered once");
    // Exported at 0 from the start, so the alert reads a series that exists.
    for code in super::PLATFORM_PROBLEMS {
        c.with_label_values(&[code]);
    }
    c
});

/// One rate: requests per second and how many may go at once above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second; 0 = no limit.
    pub per_sec: u32,
    /// Requests allowed at once above the rate (GCRA tolerance, in requests).
    pub burst: u32,
}

/// The limits one fleet keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// All requests together.
    pub global: Rate,
    /// Each endpoint on its own (Stripe), if any.
    pub per_endpoint: Option<Rate>,
}

/// Stripe's per-endpoint default (<https://docs.stripe.com/rate-limits>).
const STRIPE_ENDPOINT_LIMIT: u32 = 25;

/// The limits for `s`: the configured rate, or for Stripe
/// [`super::effective_rate`], with bursts small enough that no second ever
/// holds more than Stripe allows (a GCRA lets `burst + 1 + rate` through in
/// one second; one request of margin for network jitter), and a
/// per-endpoint limit below Stripe's 25.
pub fn limits(s: &GatewaySettings) -> Limits {
    let rate = super::effective_rate(s);
    if s.kind != crate::config::GatewayKind::Stripe {
        return Limits {
            global: Rate {
                per_sec: rate,
                burst: s.rate_limit_burst.max(1),
            },
            per_endpoint: None,
        };
    }
    let ceiling = if super::stripe::is_live_key(&s.stripe) {
        100
    } else {
        25
    };
    let headroom = |rate: u32, ceiling: u32| ceiling.saturating_sub(rate + 2);
    let endpoint = rate.min(STRIPE_ENDPOINT_LIMIT - 5);
    Limits {
        global: Rate {
            per_sec: rate,
            burst: s.rate_limit_burst.min(headroom(rate, ceiling)),
        },
        per_endpoint: Some(Rate {
            per_sec: endpoint,
            burst: s
                .rate_limit_burst
                .min(headroom(endpoint, STRIPE_ENDPOINT_LIMIT)),
        }),
    }
}

/// The fleet-wide limiter: a GCRA per limit on Redis keys shared by every
/// process (and the fleet pause). Redis errors let the request through: the
/// limiter protects the gateway, it must not stop payouts when Redis hiccups.
#[derive(Debug, Clone)]
pub struct FleetLimiter {
    conn: ConnectionManager,
    tat_key: String,
    pause_key: String,
    limits: Limits,
    /// The fleet pause as this process last saw it, shared by the clones of
    /// this limiter and by the guard built on it.
    pause_seen: Arc<Mutex<PauseGate>>,
}

impl FleetLimiter {
    /// The fleet-wide limiter of a fleet whose Redis keys are under
    /// `prefix`: the same keys (and limits) the workers' guards use, so every
    /// HTTP request of a client built with it (the in-transit poll,
    /// reconciliation, a cancel's look-up) counts against the one limit.
    pub fn new(conn: ConnectionManager, prefix: &str, limits: Limits) -> Self {
        FleetLimiter {
            conn,
            tat_key: format!("{{{prefix}}}:gateway:rate"),
            pause_key: pause_key(prefix),
            limits,
            pause_seen: Arc::new(Mutex::new(PauseGate::default())),
        }
    }

    /// Waits for this request's slot under `rate` on `key`: one script call
    /// reserves the next slot (pacing, see [`RESERVE_LUA`]), then the caller
    /// sleeps until it. A fleet pause (read again after a wait, at most every
    /// 100 ms) holds the request until it ends, then it reserves anew.
    async fn gcra(&self, key: &str, rate: Rate) {
        if rate.per_sec == 0 {
            return;
        }
        let mut conn = self.conn.clone();
        let interval = emission_interval(rate.per_sec).as_secs_f64() * 1000.0;
        let burst = interval * rate.burst as f64;
        for _ in 0..1000 {
            let answer: redis::RedisResult<(i64, i64)> = RESERVE
                .key(key)
                .key(&self.pause_key)
                .arg(interval)
                .arg(burst)
                .invoke_async(&mut conn)
                .await;
            match answer {
                Ok((1, wait_us)) if wait_us <= 0 => return,
                Ok((1, wait_us)) => {
                    metrics::GATEWAY_THROTTLED
                        .with_label_values(&["rate_limit"])
                        .inc();
                    tokio::time::sleep(Duration::from_micros(wait_us as u64)).await;
                    // A 429 met meanwhile paused the fleet: the slot is
                    // given up (the fleet sends nothing until the pause ends).
                    if self.pause_left().await.is_zero() {
                        return;
                    }
                }
                Ok((_, pause_ms)) => {
                    metrics::GATEWAY_THROTTLED
                        .with_label_values(&["fleet_pause"])
                        .inc();
                    tokio::time::sleep(
                        Duration::from_millis(pause_ms.max(1) as u64).min(PAUSE_STEP),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::debug!(error = %format_args!("{e:#}"), "rate limiter unavailable; sending");
                    return;
                }
            }
        }
    }

    /// How long the fleet pause still lasts (zero when none), read from Redis
    /// at most every 100 ms per process ([`PauseGate`], shared with the
    /// guard); a Redis error reads as no pause.
    async fn pause_left(&self) -> Duration {
        pause_left_with(&self.pause_seen, || self.read_pause_key()).await
    }

    /// Waits until no fleet pause is in force, through the same cache.
    async fn wait_unpaused(&self) {
        wait_unpaused_with(&self.pause_seen, || self.read_pause_key()).await
    }

    /// The pause key's time to live; a Redis error reads as no pause.
    async fn read_pause_key(&self) -> Option<Duration> {
        let mut conn = self.conn.clone();
        read_pause(&mut conn, &self.pause_key).await.unwrap_or(None)
    }

    /// Notes a pause this process just set, so its own waiters see it at once.
    fn saw_pause(&self, for_: Duration) {
        self.pause_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen(Instant::now(), Some(for_));
    }
}

/// The safety margin under the configured rate every limiter keeps, in
/// percent: the fleet sends at most `rate_limit_per_sec * (1 - 2%)` requests a
/// second. A gateway that enforces the same rate with a small bucket refills
/// it a little faster than the fleet drains it, so the bucket is full again
/// soon after requests that network or scheduling delays bunched together,
/// and the next bunch finds tokens. Costs 2% of the rate; the drain target is
/// 95% (issue #21, BENCHMARKS.md "Drain at the gateway's rate limit").
pub const RATE_MARGIN_PCT: u32 = 2;

/// Time between two requests at `per_sec` less [`RATE_MARGIN_PCT`].
pub fn emission_interval(per_sec: u32) -> Duration {
    let paced = f64::from(per_sec) * f64::from(100 - RATE_MARGIN_PCT) / 100.0;
    Duration::from_secs_f64(1.0 / paced.max(f64::MIN_POSITIVE))
}

#[async_trait]
impl RequestLimiter for FleetLimiter {
    async fn acquire(&self, endpoint: &str) {
        if let Some(rate) = self.limits.per_endpoint {
            self.gcra(&format!("{}:{endpoint}", self.tat_key), rate)
                .await;
        }
        self.gcra(&self.tat_key, self.limits.global).await;
    }
}

/// The same limits in one process, for a client used without Redis (a CLI
/// run, a test): each process alone keeps under them.
#[derive(Debug)]
pub struct LocalLimiter {
    limits: Limits,
    /// Theoretical arrival time per limit key (`""`: global).
    tat: Mutex<std::collections::HashMap<String, Instant>>,
}

impl LocalLimiter {
    /// A limiter for `limits`.
    pub fn new(limits: Limits) -> Self {
        LocalLimiter {
            limits,
            tat: Mutex::new(Default::default()),
        }
    }

    /// Reserves the next slot of `key` under `rate`; how long to wait for it.
    fn reserve(&self, key: &str, rate: Rate) -> Duration {
        if rate.per_sec == 0 {
            return Duration::ZERO;
        }
        let interval = emission_interval(rate.per_sec);
        let tolerance = interval * rate.burst;
        let now = Instant::now();
        let mut tat = self.tat.lock().expect("limiter lock");
        let t = tat.get(key).copied().unwrap_or(now).max(now);
        let go = (t.checked_sub(tolerance).unwrap_or(now)).max(now);
        tat.insert(key.to_string(), t + interval);
        go - now
    }
}

#[async_trait]
impl RequestLimiter for LocalLimiter {
    async fn acquire(&self, endpoint: &str) {
        let mut wait = Duration::ZERO;
        if let Some(rate) = self.limits.per_endpoint {
            wait = wait.max(self.reserve(endpoint, rate));
        }
        wait = wait.max(self.reserve("", self.limits.global));
        if !wait.is_zero() {
            metrics::GATEWAY_THROTTLED
                .with_label_values(&["rate_limit"])
                .inc();
            tokio::time::sleep(wait).await;
        }
    }
}

/// The GCRA as a reservation (pacing): every call takes the next slot, so
/// each request makes one script call and sleeps until exactly its slot,
/// instead of every waiting request polling for the next free one (a herd
/// that wakes together, races, and sends in bunches a gateway's bucket
/// refuses). Returns `{1, µs to wait}` with a slot reserved, or `{0, ms}`
/// while a fleet pause lasts (no slot reserved).
/// KEYS[1] theoretical arrival time (ms), KEYS[2] fleet pause;
/// ARGV[1] ms between requests, ARGV[2] burst tolerance in ms.
/// The TAT only moves forward: a slot given up (a pause met while waiting
/// for it) stays spent, so the fleet never sends above the rate afterwards.
static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE_LUA));
const RESERVE_LUA: &str = r#"
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return {0, pause} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local go = tat - burst
if go < now then go = now end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now + burst) + 1000)
return {1, math.floor((go - now) * 1000)}
"#;

/// The longest single wait on a fleet pause before the key is read again.
const PAUSE_STEP: Duration = Duration::from_secs(1);

/// How long a read of the fleet pause key is trusted by the process.
const PAUSE_READ_EVERY: Duration = Duration::from_millis(100);

/// One process's view of the fleet pause, apart from Redis: when the key was
/// last read and until when it pauses (as read, or as this process set it).
/// Pure, times passed in; [`wait_unpaused_with`] is the wait on it. Tested
/// on tokio's paused clock (Redis time cannot be paused).
#[derive(Debug, Default, Clone, Copy)]
struct PauseGate {
    /// When the key was last read (or written by this process).
    read_at: Option<Instant>,
    /// Until when the fleet is paused, as of that read.
    until: Option<Instant>,
}

impl PauseGate {
    /// Whether the key must be read again at `now`: never read, or read
    /// more than [`PAUSE_READ_EVERY`] ago.
    fn stale(&self, now: Instant) -> bool {
        self.read_at
            .is_none_or(|t| now.duration_since(t) > PAUSE_READ_EVERY)
    }

    /// Whether the caller at `now` is the one to read the key: it is stale
    /// ([`PauseGate::stale`]). The read is claimed at once, so until it
    /// lands the other callers use the last value: one read per process per
    /// [`PAUSE_READ_EVERY`] however many jobs wait (at 64 jobs in flight,
    /// every job used to read it at once, #21). Before the first read,
    /// every caller reads.
    fn claim_read(&mut self, now: Instant) -> bool {
        let stale = self.stale(now);
        if stale && self.read_at.is_some() {
            self.read_at = Some(now);
        }
        stale
    }

    /// A read (or this process's own write) at `now` found the pause
    /// lasting `left` more (`None`: no pause).
    fn seen(&mut self, now: Instant, left: Option<Duration>) {
        *self = PauseGate {
            read_at: Some(now),
            until: left.map(|l| now + l),
        };
    }

    /// How long the pause still lasts at `now`, as last seen (zero: none).
    fn left(&self, now: Instant) -> Duration {
        self.until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }
}

/// How long the fleet pause still lasts (zero when none): from `gate`
/// while its last read is fresh (or another caller is refreshing it), else
/// from `read` (the key's PTTL; `None` for no pause or an error), which
/// `gate` then remembers.
async fn pause_left_with<F, Fut>(gate: &Mutex<PauseGate>, read: F) -> Duration
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Option<Duration>>,
{
    let now = Instant::now();
    let (read_now, last) = {
        let mut g = gate.lock().unwrap_or_else(|p| p.into_inner());
        (g.claim_read(now), g.left(now))
    };
    if !read_now {
        return last;
    }
    let left = read().await;
    let mut g = gate.lock().unwrap_or_else(|p| p.into_inner());
    g.seen(now, left);
    g.left(now)
}

/// Waits until no fleet pause holds, reading it through `gate` and `read`
/// ([`pause_left_with`]), in steps of at most [`PAUSE_STEP`]: an operator's
/// resume deletes the key, and a week-long pause must not be slept in one go.
async fn wait_unpaused_with<F, Fut>(gate: &Mutex<PauseGate>, mut read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Duration>>,
{
    loop {
        let left = pause_left_with(gate, &mut read).await;
        if left.is_zero() {
            return;
        }
        metrics::GATEWAY_THROTTLED
            .with_label_values(&["fleet_pause"])
            .inc();
        tokio::time::sleep(left.min(PAUSE_STEP)).await;
    }
}

/// The Redis key of the fleet pause under `prefix`: while it lives, no
/// worker claims a payout or calls the gateway.
pub fn pause_key(prefix: &str) -> String {
    format!("{{{prefix}}}:gateway:pause")
}

/// How long the fleet pause at `key` still lasts (`None`: no pause): the
/// read every worker's guard makes before a claim and a gateway call.
pub async fn read_pause(
    conn: &mut ConnectionManager,
    key: &str,
) -> redis::RedisResult<Option<Duration>> {
    let pttl: i64 = redis::cmd("PTTL").arg(key).query_async(conn).await?;
    Ok((pttl > 0).then(|| Duration::from_millis(pttl as u64)))
}

/// Pauses the fleet at `key` for `for_` (an operator's pause; a longer pause
/// already set stays); `true` when this call set it.
pub async fn pause_fleet_for(
    conn: &mut ConnectionManager,
    key: &str,
    for_: Duration,
) -> redis::RedisResult<bool> {
    let set: i64 = PAUSE
        .key(key)
        .arg(for_.as_millis().max(1) as u64)
        .invoke_async(conn)
        .await?;
    Ok(set == 1)
}

/// Ends the fleet pause at `key`, whoever set it; `true` when one was set.
pub async fn resume_fleet(conn: &mut ConnectionManager, key: &str) -> redis::RedisResult<bool> {
    let n: i64 = redis::cmd("DEL").arg(key).query_async(conn).await?;
    Ok(n > 0)
}

/// Extends the fleet pause to ARGV[1] ms unless it already lasts longer.
static PAUSE: LazyLock<Script> = LazyLock::new(|| Script::new(PAUSE_LUA));
const PAUSE_LUA: &str = r#"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  return 1
end
return 0
"#;

/// The code of the outcome an open circuit answers in the gateway's place.
pub const CIRCUIT_OPEN: &str = "circuit_open";

/// The circuit's state (also the `gateway_circuit_state` gauge: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Calls flow.
    Closed,
    /// The cool-down is over and one probe call is in flight; its outcome
    /// closes or reopens the circuit, and every other call waits.
    HalfOpen,
    /// No calls until then.
    Open {
        /// When the cool-down ends.
        until: Instant,
    },
}

#[derive(Debug)]
struct Breaker {
    state: Circuit,
    window: VecDeque<(Instant, bool)>,
    /// Calls in the window before it may open.
    min_calls: usize,
    /// Failed share (percent) that opens it.
    error_ratio_pct: u32,
    /// The sliding window.
    span: Duration,
    /// How long it stays open.
    cooldown: Duration,
}

impl Breaker {
    /// A closed breaker with `s`'s thresholds.
    fn new(s: &GuardSettings) -> Self {
        Breaker {
            state: Circuit::Closed,
            window: VecDeque::new(),
            min_calls: s.min_calls,
            error_ratio_pct: s.error_ratio_pct,
            span: s.window,
            cooldown: s.cooldown,
        }
    }

    /// Whether a call may go at `now`: always while closed; once the
    /// cool-down is over, to exactly one probe (the circuit turns half-open).
    fn allows(&mut self, now: Instant) -> bool {
        match self.state {
            Circuit::Closed => true,
            Circuit::Open { until } if now >= until => {
                self.state = Circuit::HalfOpen;
                metrics::CIRCUIT_STATE.set(1);
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen => false,
        }
    }

    /// A half-open probe that was never sent: back to open with the
    /// cool-down over, so the next call probes.
    fn probe_not_sent(&mut self, now: Instant) {
        if self.state == Circuit::HalfOpen {
            self.state = Circuit::Open { until: now };
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = Circuit::Open {
            until: now + self.cooldown,
        };
        metrics::CIRCUIT_STATE.set(2);
        metrics::CIRCUIT_OPENED.inc();
    }

    /// A call's outcome at `now`: a half-open probe closes or reopens the
    /// circuit; while closed, the window slides and the circuit opens when
    /// at least `min_calls` calls in it failed at `error_ratio_pct` or more.
    fn record(&mut self, now: Instant, failed: bool) {
        match self.state {
            Circuit::HalfOpen => {
                if failed {
                    self.open(now);
                } else {
                    self.state = Circuit::Closed;
                    self.window.clear();
                    metrics::CIRCUIT_STATE.set(0);
                    tracing::info!("gateway circuit closed again after a successful probe");
                }
            }
            Circuit::Open { .. } => {}
            Circuit::Closed => {
                self.window.push_back((now, failed));
                while self
                    .window
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > self.span)
                {
                    self.window.pop_front();
                }
                let n = self.window.len();
                let errors = self.window.iter().filter(|(_, f)| *f).count();
                if n >= self.min_calls.max(1) && errors * 100 >= n * self.error_ratio_pct as usize {
                    self.open(now);
                    tracing::warn!(errors, calls = n, cooldown = ?self.cooldown, "gateway circuit opened: too many failed calls");
                }
            }
        }
    }
}

/// Breaker and limiter settings.
#[derive(Debug, Clone, Copy)]
pub struct GuardSettings {
    /// Fleet-wide requests per second; 0 = no limit.
    pub rate_per_sec: u32,
    /// Requests that may go at once above the rate.
    pub burst: u32,
    /// Calls in the window before the breaker may open.
    pub min_calls: usize,
    /// Failed share (percent) that opens it.
    pub error_ratio_pct: u32,
    /// Sliding window.
    pub window: Duration,
    /// How long it stays open.
    pub cooldown: Duration,
    /// The limits of every request (see [`limits`]).
    pub limits: Limits,
    /// How long a platform problem pauses the fleet.
    pub platform_pause: Duration,
}

impl GuardSettings {
    /// From settings.
    pub fn from_settings(s: &GatewaySettings) -> Self {
        let limits = limits(s);
        GuardSettings {
            rate_per_sec: limits.global.per_sec,
            burst: limits.global.burst,
            limits,
            platform_pause: Duration::from_secs(s.credential_pause_secs.max(1)),
            min_calls: s.breaker_min_calls,
            error_ratio_pct: s.breaker_error_ratio_pct,
            window: Duration::from_millis(s.breaker_window_ms),
            cooldown: Duration::from_millis(s.breaker_cooldown_ms),
        }
    }
}

/// The rate limiter, fleet pause and circuit breaker of one process.
#[derive(Debug)]
pub struct GatewayGuard {
    conn: ConnectionManager,
    tat_key: String,
    pause_key: String,
    settings: GuardSettings,
    breaker: Mutex<Breaker>,
    /// Jobs holding before their claim while the circuit is open.
    waiting: AtomicUsize,
    /// Every request's limiter, on the same Redis keys.
    limiter: Arc<FleetLimiter>,
}

fn fails_the_gateway(o: &Outcome) -> bool {
    match o {
        Outcome::Transient { kind, .. } => *kind != TransientKind::RateLimited,
        Outcome::Unknown { .. } => true,
        Outcome::Rejected { reason, .. } => *reason == RejectReason::Unauthorized,
        Outcome::Paid { .. } | Outcome::InTransit { .. } => false,
    }
}

impl GatewayGuard {
    /// A guard under `{prefix}:gateway:*`.
    pub fn new(conn: ConnectionManager, prefix: &str, settings: GuardSettings) -> Self {
        metrics::CIRCUIT_STATE.set(0);
        LazyLock::force(&PLATFORM_PAUSES);
        let limiter = FleetLimiter::new(conn.clone(), prefix, settings.limits);
        let tat_key = limiter.tat_key.clone();
        let pause_key = limiter.pause_key.clone();
        GatewayGuard {
            limiter: Arc::new(limiter),
            conn,
            tat_key,
            pause_key,
            settings,
            breaker: Mutex::new(Breaker::new(&settings)),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The circuit now.
    pub fn circuit(&self) -> Circuit {
        self.breaker.lock().expect("breaker lock").state
    }

    /// How long to wait before the circuit lets a claim through (zero when closed or half-open).
    pub fn wait_for_circuit(&self) -> Duration {
        match self.circuit() {
            Circuit::Open { until } => until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    /// Waits until a claim may proceed: the circuit is not open.
    pub async fn wait_closed(&self) {
        if self.wait_for_circuit().is_zero() {
            return;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        metrics::GATEWAY_THROTTLED
            .with_label_values(&["circuit_open"])
            .inc();
        loop {
            let wait = self.wait_for_circuit();
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// The fleet-wide limiter every request of a self-limiting client waits for.
    pub fn limiter(&self) -> Arc<dyn RequestLimiter> {
        self.limiter.clone()
    }

    /// Waits until no fleet pause holds (before a claim: a paused fleet
    /// burns no attempts). The key is read from Redis at most every 100 ms
    /// ([`PauseGate`]); a Redis error reads as no pause.
    pub async fn wait_unpaused(&self) {
        self.limiter.wait_unpaused().await
    }

    /// Pauses the whole fleet for a platform problem (`code`), counts it and
    /// logs the alert once per pause.
    pub async fn pause_for_platform(&self, code: &str) {
        PLATFORM_PAUSES.with_label_values(&[code]).inc();
        tracing::error!(
            code,
            pause = ?self.settings.platform_pause,
            alert = true,
            "the gateway refused the platform (credentials, permissions or platform balance): pausing the whole fleet; no payout is failed for it"
        );
        self.pause_fleet(self.settings.platform_pause).await;
    }

    /// How long a platform problem pauses the fleet.
    pub fn platform_pause(&self) -> Duration {
        self.settings.platform_pause
    }

    /// Jobs holding before their claim because the circuit is open.
    pub fn waiting_claims(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether a call may go now (see [`Breaker::allows`]).
    fn breaker_allows(&self) -> bool {
        self.breaker
            .lock()
            .expect("breaker lock")
            .allows(Instant::now())
    }

    /// A half-open probe that was never sent: the next call probes.
    fn probe_not_sent(&self) {
        self.breaker
            .lock()
            .expect("breaker lock")
            .probe_not_sent(Instant::now());
    }

    fn record(&self, failed: bool) {
        self.breaker
            .lock()
            .expect("breaker lock")
            .record(Instant::now(), failed);
    }

    /// Waits for the fleet-wide rate limit and any fleet pause. Redis errors
    /// let the call through: the limiter protects the gateway, it must not
    /// stop payouts when Redis hiccups.
    async fn throttle(&self) {
        if self.settings.rate_per_sec > 0 {
            // The GCRA script answers a fleet pause too.
            let rate = Rate {
                per_sec: self.settings.rate_per_sec,
                burst: self.settings.burst.max(1),
            };
            self.limiter.gcra(&self.tat_key, rate).await;
        } else {
            self.wait_unpaused().await;
        }
    }

    async fn pause_fleet(&self, for_: Duration) {
        let mut conn = self.conn.clone();
        let ms = for_.as_millis().max(1) as u64;
        let set: redis::RedisResult<i64> = PAUSE
            .key(&self.pause_key)
            .arg(ms)
            .invoke_async(&mut conn)
            .await;
        if let Ok(1) = set {
            metrics::FLEET_PAUSES.inc();
            tracing::warn!(
                pause_ms = ms,
                "gateway rate limited us: pausing the whole fleet"
            );
        }
        self.limiter.saw_pause(for_);
    }

    /// The gateway as seen through this guard.
    pub fn wrap<'a>(&'a self, inner: &'a dyn Gateway) -> Guarded<'a> {
        Guarded { inner, guard: self }
    }
}

/// A gateway whose calls pass through a [`GatewayGuard`].
#[derive(Debug)]
pub struct Guarded<'a> {
    inner: &'a dyn Gateway,
    guard: &'a GatewayGuard,
}

#[async_trait]
impl Lookup for Guarded<'_> {
    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError> {
        self.inner.lookup(reference).await
    }

    fn limits_own_requests(&self) -> bool {
        self.inner.limits_own_requests()
    }

    fn use_limiter(&self, limiter: Arc<dyn RequestLimiter>) {
        self.inner.use_limiter(limiter)
    }
}

#[async_trait]
impl Gateway for Guarded<'_> {
    async fn transfer(&self, req: &TransferRequest) -> Outcome {
        self.transfer_keyed(req).await.outcome
    }

    async fn transfer_keyed(&self, req: &TransferRequest) -> Keyed {
        if !self.guard.breaker_allows() {
            return Keyed {
                outcome: Outcome::Transient {
                    kind: TransientKind::CircuitOpen,
                    message: "gateway circuit is open; not sending".into(),
                    retry_after: Some(self.guard.wait_for_circuit()),
                },
                key_index: req.key_index,
            };
        }
        if self.inner.limits_own_requests() {
            // Each of its requests waits for the limiter; here only the pause.
            self.guard.wait_unpaused().await;
        } else {
            self.guard.throttle().await;
        }
        let keyed = self.inner.transfer_keyed(req).await;
        let outcome = &keyed.outcome;
        if outcome.is_lease_refusal() {
            // Nothing was sent: not a gateway call. A probe that was not
            // sent leaves the next caller to probe.
            self.guard.probe_not_sent();
            return keyed;
        }
        self.guard.record(fails_the_gateway(outcome));
        if outcome.pauses_fleet() {
            if let Outcome::Transient { kind, .. } = outcome {
                self.guard.pause_for_platform(&kind.code()).await;
            }
        } else if let Outcome::Transient {
            kind: TransientKind::RateLimited,
            retry_after,
            ..
        } = outcome
        {
            self.guard
                .pause_fleet(retry_after.unwrap_or(Duration::from_secs(1)))
                .await;
        }
        keyed
    }

    fn minor_units(&self, money: &crate::domain::Money) -> Result<i64, super::AmountError> {
        self.inner.minor_units(money)
    }
}

#[cfg(test)]
mod tests {
    //! The breaker's state machine on tokio's paused clock: cool-downs and
    //! sliding windows are walked through with `advance`, not waited out.
    use super::*;

    fn breaker() -> Breaker {
        Breaker {
            state: Circuit::Closed,
            window: VecDeque::new(),
            min_calls: 4,
            error_ratio_pct: 50,
            span: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
        }
    }

    async fn advance(secs: u64) {
        tokio::time::advance(Duration::from_secs(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_error_ratio_once_enough_calls_are_in_the_window() {
        let mut b = breaker();
        for _ in 0..3 {
            b.record(Instant::now(), true);
        }
        assert_eq!(b.state, Circuit::Closed, "3 calls are below min_calls");
        b.record(Instant::now(), false);
        // 3 failed of 4: 75% >= 50%.
        assert!(matches!(b.state, Circuit::Open { .. }), "{:?}", b.state);
        assert!(!b.allows(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_do_not_count() {
        let mut b = breaker();
        b.record(Instant::now(), true);
        b.record(Instant::now(), true);
        advance(11).await;
        b.record(Instant::now(), false);
        b.record(Instant::now(), false);
        b.record(Instant::now(), true);
        // The two old failures slid out: 1 failed of 3, and too few calls.
        assert_eq!(b.state, Circuit::Closed);
        b.record(Instant::now(), false);
        // 1 of 4 = 25% < 50%.
        assert_eq!(b.state, Circuit::Closed);
        assert_eq!(b.window.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_cool_down_one_probe_goes_and_its_success_closes() {
        let mut b = breaker();
        for _ in 0..4 {
            b.record(Instant::now(), true);
        }
        advance(29).await;
        assert!(!b.allows(Instant::now()), "still cooling down");
        advance(1).await;
        assert!(b.allows(Instant::now()), "the probe");
        assert_eq!(b.state, Circuit::HalfOpen);
        assert!(!b.allows(Instant::now()), "only one probe at a time");
        b.record(Instant::now(), false);
        assert_eq!(b.state, Circuit::Closed);
        assert!(
            b.window.is_empty(),
            "a closed circuit starts a fresh window"
        );
        assert!(b.allows(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_a_whole_cool_down() {
        let mut b = breaker();
        for _ in 0..4 {
            b.record(Instant::now(), true);
        }
        advance(30).await;
        assert!(b.allows(Instant::now()));
        b.record(Instant::now(), true);
        assert!(matches!(b.state, Circuit::Open { .. }));
        advance(29).await;
        assert!(
            !b.allows(Instant::now()),
            "the cool-down starts again at the failed probe"
        );
        advance(1).await;
        assert!(b.allows(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_was_never_sent_lets_the_next_call_probe_at_once() {
        let mut b = breaker();
        for _ in 0..4 {
            b.record(Instant::now(), true);
        }
        advance(30).await;
        assert!(b.allows(Instant::now()));
        b.probe_not_sent(Instant::now());
        assert!(matches!(b.state, Circuit::Open { .. }));
        assert!(b.allows(Instant::now()), "no second cool-down");
        // Outcomes recorded while open are ignored.
        let mut open = breaker();
        for _ in 0..4 {
            open.record(Instant::now(), true);
        }
        let before = open.state;
        open.record(Instant::now(), false);
        assert_eq!(open.state, before);
    }

    // The fleet pause, process side: the Redis key is stood in for by a
    // pause that ends at a paused-clock instant (`None`: deleted), and every
    // read of it is counted.

    /// A stand-in for the pause key: its end, and the reads made of it.
    #[derive(Debug, Default)]
    struct Key {
        until: Mutex<Option<Instant>>,
        reads: AtomicUsize,
    }

    impl Key {
        fn pause(&self, for_: Duration) {
            *self.until.lock().unwrap() = Some(Instant::now() + for_);
        }

        fn resume(&self) {
            *self.until.lock().unwrap() = None;
        }

        /// The key's PTTL, as `read_pause` answers it.
        async fn read(&self) -> Option<Duration> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let left = self
                .until
                .lock()
                .unwrap()
                .map(|u| u.saturating_duration_since(Instant::now()));
            left.filter(|l| !l.is_zero())
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::Relaxed)
        }
    }

    async fn wait(gate: &Mutex<PauseGate>, key: &Key) {
        wait_unpaused_with(gate, || key.read()).await
    }

    #[tokio::test(start_paused = true)]
    async fn no_pause_goes_at_once_after_one_read() {
        let (gate, key) = (Mutex::new(PauseGate::default()), Key::default());
        let start = Instant::now();
        wait(&gate, &key).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(key.reads(), 1);
        // Within 100 ms the read is trusted: no second one.
        advance_ms(100).await;
        wait(&gate, &key).await;
        assert_eq!(key.reads(), 1);
        advance_ms(1).await;
        wait(&gate, &key).await;
        assert_eq!(
            key.reads(),
            2,
            "read again once the last read is older than 100 ms"
        );
    }

    async fn advance_ms(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_waited_out_to_its_end_in_steps_of_a_second() {
        let (gate, key) = (Mutex::new(PauseGate::default()), Key::default());
        key.pause(Duration::from_millis(2500));
        let start = Instant::now();
        wait(&gate, &key).await;
        assert_eq!(start.elapsed(), Duration::from_millis(2500));
        // Read at 0, 1 s, 2 s (one-second steps), then at 2.5 s: over.
        assert_eq!(key.reads(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resume_is_noticed_within_one_step() {
        let gate = Arc::new(Mutex::new(PauseGate::default()));
        let key = Arc::new(Key::default());
        key.pause(Duration::from_secs(7 * 24 * 3600));
        let waiting = tokio::spawn({
            let (gate, key) = (gate.clone(), key.clone());
            async move { wait(&gate, &key).await }
        });
        tokio::task::yield_now().await;
        advance_ms(1500).await;
        assert!(!waiting.is_finished(), "a week-long pause holds");
        key.resume();
        let resumed = Instant::now();
        waiting.await.unwrap();
        assert!(
            resumed.elapsed() <= PAUSE_STEP,
            "the next step's read sees the key gone: {:?} after the resume",
            resumed.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_process_own_pause_holds_without_a_read_and_a_later_read_extends_it() {
        let (gate, key) = (Mutex::new(PauseGate::default()), Key::default());
        // This process met the 429 and set the pause: it knows without asking.
        gate.lock()
            .unwrap()
            .seen(Instant::now(), Some(Duration::from_millis(300)));
        key.pause(Duration::from_millis(300));
        let left = pause_left_with(&gate, || key.read()).await;
        assert_eq!((left, key.reads()), (Duration::from_millis(300), 0));
        advance_ms(50).await;
        let left = pause_left_with(&gate, || key.read()).await;
        assert_eq!(
            (left, key.reads()),
            (Duration::from_millis(250), 0),
            "counts down between reads"
        );
        // Another worker's longer Retry-After is learnt at the next read.
        key.pause(Duration::from_secs(5));
        advance_ms(51).await;
        let left = pause_left_with(&gate, || key.read()).await;
        assert_eq!(key.reads(), 1);
        assert_eq!(left, Duration::from_millis(4949));
        let start = Instant::now();
        wait(&gate, &key).await;
        assert_eq!(start.elapsed(), Duration::from_millis(4949));
    }

    #[tokio::test(start_paused = true)]
    async fn one_caller_refreshes_a_stale_read_and_the_others_use_the_last_value() {
        let (gate, key) = (Mutex::new(PauseGate::default()), Key::default());
        key.pause(Duration::from_secs(5));
        // Before the first read, every caller reads.
        let slow_read = || async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            key.read().await
        };
        let (a, b) = tokio::join!(
            pause_left_with(&gate, slow_read),
            pause_left_with(&gate, slow_read)
        );
        assert_eq!((a, b, key.reads()), (a, a, 2));
        advance_ms(200).await;
        // Stale now: 64 jobs ask at once, one reads.
        let answers =
            futures::future::join_all((0..64).map(|_| pause_left_with(&gate, slow_read))).await;
        assert_eq!(key.reads(), 3, "one read for 64 callers");
        assert!(answers.iter().all(|l| !l.is_zero()), "{answers:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_that_cannot_be_read_is_no_pause() {
        let gate = Mutex::new(PauseGate::default());
        gate.lock()
            .unwrap()
            .seen(Instant::now(), Some(Duration::from_secs(60)));
        advance_ms(101).await;
        let start = Instant::now();
        // A Redis error reads as `None` (`read_pause(..).unwrap_or(None)`).
        wait_unpaused_with(&gate, || async { None }).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}

//! What stands between the fleet and a gateway that is throttling or down:
//!
//! - a **fleet-wide rate limit**: a GCRA in one Lua script on a Redis key
//!   shared by every worker, so all of them together stay under
//!   `gateway.rate_limit_per_sec`;
//! - a **fleet-wide pause on 429**: one worker's Retry-After is written to
//!   Redis and every worker waits it out, instead of each finding out alone;
//! - a **circuit breaker** per process: when the share of failed calls
//!   (5xx, timeouts, connection errors, 401) in a sliding window crosses
//!   `gateway.breaker_error_ratio_pct`, the process stops sending for
//!   `gateway.breaker_cooldown_ms`, then lets one probe through (half-open)
//!   and closes again on its success. Workers wait for a closed circuit
//!   *before* claiming a payout, so no attempt is burned while it is open.

use std::{
    collections::VecDeque,
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::{Script, aio::ConnectionManager};
use tokio::time::Instant;

use super::{Gateway, LookupError, Outcome, TransferRecord, TransferRequest};
use crate::{config::GatewaySettings, metrics};

/// GCRA: returns 0 when a request may go now, else how many ms to wait.
/// KEYS[1] theoretical arrival time, KEYS[2] fleet pause;
/// ARGV[1] ms between requests, ARGV[2] burst tolerance in ms.
static GCRA: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA_LUA));
const GCRA_LUA: &str = r#"
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return pause end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - burst > now then return math.ceil(tat - burst - now) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now + burst) + 1000)
return 0
"#;

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
}

impl GuardSettings {
    /// From settings.
    pub fn from_settings(s: &GatewaySettings) -> Self {
        GuardSettings {
            rate_per_sec: s.rate_limit_per_sec,
            burst: s.rate_limit_burst,
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
    /// (last time the pause was read from Redis, paused until).
    pause_seen: Mutex<(Option<Instant>, Option<Instant>)>,
    /// Jobs holding before their claim while the circuit is open.
    waiting: AtomicUsize,
}

fn fails_the_gateway(o: &Outcome) -> bool {
    match o {
        Outcome::Transient { code, .. } => code != "rate_limited",
        Outcome::Unknown { .. } => true,
        Outcome::Rejected { code, .. } => code == "unauthorized",
        Outcome::Paid { .. } | Outcome::InTransit { .. } => false,
    }
}

impl GatewayGuard {
    /// A guard under `{prefix}:gateway:*`.
    pub fn new(conn: ConnectionManager, prefix: &str, settings: GuardSettings) -> Self {
        metrics::CIRCUIT_STATE.set(0);
        GatewayGuard {
            conn,
            tat_key: format!("{{{prefix}}}:gateway:rate"),
            pause_key: format!("{{{prefix}}}:gateway:pause"),
            settings,
            breaker: Mutex::new(Breaker {
                state: Circuit::Closed,
                window: VecDeque::new(),
            }),
            pause_seen: Mutex::new((None, None)),
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

    /// Jobs holding before their claim because the circuit is open.
    pub fn waiting_claims(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether a call may go now: always while closed; once the cool-down is
    /// over, to exactly one probe (the circuit turns half-open).
    fn breaker_allows(&self) -> bool {
        let mut b = self.breaker.lock().expect("breaker lock");
        match b.state {
            Circuit::Closed => true,
            Circuit::Open { until } if Instant::now() >= until => {
                b.state = Circuit::HalfOpen;
                metrics::CIRCUIT_STATE.set(1);
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen => false,
        }
    }

    fn record(&self, failed: bool) {
        let mut b = self.breaker.lock().expect("breaker lock");
        let now = Instant::now();
        match b.state {
            Circuit::HalfOpen => {
                if failed {
                    b.state = Circuit::Open {
                        until: now + self.settings.cooldown,
                    };
                    metrics::CIRCUIT_STATE.set(2);
                    metrics::CIRCUIT_OPENED.inc();
                } else {
                    b.state = Circuit::Closed;
                    b.window.clear();
                    metrics::CIRCUIT_STATE.set(0);
                    tracing::info!("gateway circuit closed again after a successful probe");
                }
            }
            Circuit::Open { .. } => {}
            Circuit::Closed => {
                b.window.push_back((now, failed));
                while b
                    .window
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > self.settings.window)
                {
                    b.window.pop_front();
                }
                let n = b.window.len();
                let errors = b.window.iter().filter(|(_, f)| *f).count();
                if n >= self.settings.min_calls.max(1)
                    && errors * 100 >= n * self.settings.error_ratio_pct as usize
                {
                    b.state = Circuit::Open {
                        until: now + self.settings.cooldown,
                    };
                    metrics::CIRCUIT_STATE.set(2);
                    metrics::CIRCUIT_OPENED.inc();
                    tracing::warn!(errors, calls = n, cooldown = ?self.settings.cooldown, "gateway circuit opened: too many failed calls");
                }
            }
        }
    }

    /// Waits for the fleet-wide rate limit and any fleet pause. Redis errors
    /// let the call through: the limiter protects the gateway, it must not
    /// stop payouts when Redis hiccups.
    async fn throttle(&self) {
        let mut conn = self.conn.clone();
        if self.settings.rate_per_sec > 0 {
            let interval = 1000.0 / self.settings.rate_per_sec as f64;
            let burst = interval * self.settings.burst.max(1) as f64;
            for _ in 0..1000 {
                let wait: redis::RedisResult<u64> = GCRA
                    .key(&self.tat_key)
                    .key(&self.pause_key)
                    .arg(interval)
                    .arg(burst)
                    .invoke_async(&mut conn)
                    .await;
                match wait {
                    Ok(0) => return,
                    Ok(ms) => {
                        metrics::GATEWAY_THROTTLED
                            .with_label_values(&["rate_limit"])
                            .inc();
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "rate limiter unavailable; sending");
                        return;
                    }
                }
            }
            return;
        }
        // No rate limit: honour a fleet pause, read from Redis at most every 100 ms.
        let now = Instant::now();
        let (stale, until) = {
            let seen = self.pause_seen.lock().expect("pause lock");
            (
                seen.0
                    .is_none_or(|t| now.duration_since(t) > Duration::from_millis(100)),
                seen.1,
            )
        };
        let until = if stale {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&self.pause_key)
                .query_async(&mut conn)
                .await
                .unwrap_or(-2);
            let until = (pttl > 0).then(|| now + Duration::from_millis(pttl as u64));
            *self.pause_seen.lock().expect("pause lock") = (Some(now), until);
            until
        } else {
            until
        };
        if let Some(until) = until.filter(|u| *u > now) {
            metrics::GATEWAY_THROTTLED
                .with_label_values(&["fleet_pause"])
                .inc();
            tokio::time::sleep_until(until).await;
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
        *self.pause_seen.lock().expect("pause lock") =
            (Some(Instant::now()), Some(Instant::now() + for_));
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
impl Gateway for Guarded<'_> {
    async fn transfer(&self, req: &TransferRequest) -> Outcome {
        if !self.guard.breaker_allows() {
            return Outcome::Transient {
                code: CIRCUIT_OPEN.into(),
                message: "gateway circuit is open; not sending".into(),
                retry_after: Some(self.guard.wait_for_circuit()),
            };
        }
        self.guard.throttle().await;
        let outcome = self.inner.transfer(req).await;
        self.guard.record(fails_the_gateway(&outcome));
        if let Outcome::Transient {
            code, retry_after, ..
        } = &outcome
        {
            if code == "rate_limited" {
                self.guard
                    .pause_fleet(retry_after.unwrap_or(Duration::from_secs(1)))
                    .await;
            }
        }
        outcome
    }

    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError> {
        self.inner.lookup(reference).await
    }
}

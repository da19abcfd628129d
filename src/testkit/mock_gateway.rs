//! A mock payment gateway that speaks the project's gateway HTTP contract
//! (`shared/gateway-contract.md`): `POST /v1/transfers` with idempotency keys,
//! look-ups by reference and by id, and bearer-secret auth.
//!
//! It exists for development, integration tests and benchmarks. Besides the
//! happy path it can inject the failures a real gateway produces — latency,
//! transient 5xx, 429 with `Retry-After`, permanent errors, and the nasty
//! ones where money moved but the client never heard (apply-then-500,
//! apply-then-hang, apply-then-reset) — either at random (seeded, so
//! reproducible) or from a FIFO script of forced statuses.
//!
//! With [`MockGatewayConfig::ledger_file`] the ledger is durable: every
//! applied transfer is appended as one JSON line and fsynced *before* its
//! answer leaves, and the file is loaded at start, so a mock that is killed
//! and restarted keeps its idempotency ledger (a retry after the crash gets
//! the stored transfer, not a second payment). The chaos harness relies on it.
//!
//! Operators and tests drive it through [`MockGateway`] or the unauthenticated
//! admin endpoints under `/_mock/` (`ledger`, `stats`, `faults`, `reset`).
//!
//! With [`Faults::rate_limit_per_sec`] (`--rate-limit-per-sec N`) it enforces
//! a rate limit the way a real gateway does: a token bucket of
//! [`Faults::rate_limit_burst`] tokens refilled at N per second; a transfer
//! request that finds no token is answered `429` with `Retry-After` and the
//! contract's `rate_limited` error, before anything else is looked at, and is
//! counted in [`Stats::rate_limited`] (`GET /_mock/stats`). Stripe documents
//! its limits as requests per second per account (100 in live mode, 25 in a
//! sandbox, 25 per endpoint; over them, `429`:
//! <https://docs.stripe.com/rate-limits>) and describes its request limiter as
//! a token bucket (<https://stripe.com/blog/rate-limiters>), without giving
//! the bucket's size. Where this stand-in differs: only transfer requests
//! (`POST /v1/transfers`, `POST /api/Payment/release-funds`) take a token,
//! where Stripe counts every request (the fleet's contract clients limit only
//! their transfer calls); the bucket's size is ours, a tenth of a second of
//! the rate by default (small on purpose: a client that keeps to the rate
//! needs no more, and one that bursts is caught); and `Retry-After` is whole
//! seconds, at least 1, the contract's unit.
//!
//! It also serves the platform "release funds" API of the booking worker
//! (`crate::gateway::release_funds`, product document 000), over the same
//! ledger, idempotency store, faults and script, so the fleet runs locally
//! with `gateway.kind = "release_funds"`:
//! - `POST /api/Payment/release-funds` with `Idempotency-Key` and the camelCase
//!   body (`bookingId`, `driverStripeAccountId`, `amount` in cents, lower-case
//!   `currency`, `reference`); answers `{"success":true,"transferId","status",…}`
//!   or `{"success":false,"error":{"code","message"}}`. A destination in
//!   [`Faults::not_onboarded_destinations`] gets 403 `driver_not_onboarded`
//!   and a scripted 402 is `insufficient_funds` (the platform's balance); like
//!   every refusal before applying, neither is kept for the key, so a retry
//!   after onboarding or a top-up can pay;
//! - `GET /api/Payment/transfers?reference=` (`{"data":[…]}`), the look-up;
//! - `GET /api/Payment/accounts/{account}` (`{"account","onboarded"}`), the
//!   onboarding check that releases held payouts.
//!
//! Order of decisions for one `POST /v1/transfers`: latency -> auth ->
//! `Idempotency-Key` present -> parse/validate body -> replay check (same
//! params: stored answer; other params: 409) -> script -> closed destinations
//! -> random pre-apply faults (5xx, 429, permanent) -> apply (`rate_pending`
//! picks the status; the ledger file is written) -> post-apply faults (500,
//! hang, reset).
//!
//! All state sits behind one `std::sync::Mutex`, never held across an await,
//! so two requests with the same key apply at most once.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, Seek, Write};
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path as FsPath, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, Query, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Default `Retry-After` (seconds) when [`Faults::retry_after_secs`] is 0.
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
/// Default hold time (ms) for apply-then-hang when [`Faults::hang_ms`] is 0.
const DEFAULT_HANG_MS: u64 = 30_000;
/// Default permanent error code when [`Faults::permanent_code`] is empty.
const DEFAULT_PERMANENT_CODE: &str = "account_closed";

/// Configuration of a [`MockGateway`].
#[derive(Clone, Debug)]
pub struct MockGatewayConfig {
    /// The bearer secret clients must send (`Authorization: Bearer {secret}`).
    pub secret: String,
    /// Initial fault injection settings.
    pub faults: Faults,
    /// Seed of the random generator behind latency jitter and random faults.
    pub seed: u64,
    /// Where the ledger is kept durably (one JSON [`LedgerEntry`] per line,
    /// fsynced before the answer is sent, loaded at start); `None` keeps it in
    /// memory only.
    pub ledger_file: Option<PathBuf>,
}

impl Default for MockGatewayConfig {
    fn default() -> Self {
        Self {
            secret: "sk_test_mock".to_owned(),
            faults: Faults::default(),
            seed: 42,
            ledger_file: None,
        }
    }
}

/// Fault injection settings. Rates are probabilities in `0.0..=1.0`.
///
/// Pre-apply rates (`rate_5xx`, `rate_429`, `rate_permanent`) share one draw,
/// so they are exact and mutually exclusive (their sum should be <= 1); the
/// same holds for the post-apply rates (`rate_apply_then_500`,
/// `rate_apply_then_timeout`, `rate_apply_then_reset`).
///
/// Also a set of command-line flags (`clap::Args`), used by the
/// `mock-gateway` binary: `--latency-ms`, `--rate-5xx`, … one per field.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, clap::Args)]
#[serde(default)]
#[command(next_help_heading = "Fault injection")]
pub struct Faults {
    /// Base latency added to every `POST /v1/transfers`.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Plus a uniform random `0..=latency_jitter_ms`.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Probability of answering 503 before applying (nothing stored).
    #[arg(long, default_value_t = 0.0)]
    pub rate_5xx: f64,
    /// Probability of answering 429 before applying (nothing stored).
    #[arg(long, default_value_t = 0.0)]
    pub rate_429: f64,
    /// `Retry-After` value for 429 answers (1 when 0).
    #[arg(long, default_value_t = DEFAULT_RETRY_AFTER_SECS)]
    pub retry_after_secs: u64,
    /// Probability of a permanent error before applying (nothing stored).
    #[arg(long, default_value_t = 0.0)]
    pub rate_permanent: f64,
    /// Code of that permanent error (`account_closed` when empty). HTTP status:
    /// 402 for `insufficient_funds`, 403 for `account_not_onboarded`, else 422.
    #[arg(long, default_value = DEFAULT_PERMANENT_CODE)]
    pub permanent_code: String,
    /// Probability of applying the transfer, then holding the answer for
    /// `hang_ms` before answering 200 (the client normally times out first).
    #[arg(long, default_value_t = 0.0)]
    pub rate_apply_then_timeout: f64,
    /// Probability of applying the transfer, then answering 500.
    #[arg(long, default_value_t = 0.0)]
    pub rate_apply_then_500: f64,
    /// Probability of applying the transfer, then resetting the connection
    /// (TCP RST, no answer at all).
    #[arg(long, default_value_t = 0.0)]
    pub rate_apply_then_reset: f64,
    /// Hold time for apply-then-hang (30 000 when 0).
    #[arg(long, default_value_t = DEFAULT_HANG_MS)]
    pub hang_ms: u64,
    /// Probability that an applied transfer is `pending` instead of `paid`.
    #[arg(long, default_value_t = 0.0)]
    pub rate_pending: f64,
    /// Destinations that always get 422 `account_closed`, stored for the key.
    #[arg(long = "closed-destination", value_name = "ACCOUNT")]
    pub closed_destinations: Vec<String>,
    /// Destinations whose owner has not finished onboarding: 403
    /// `account_not_onboarded` (`driver_not_onboarded` on the release-funds
    /// API), not stored for the key; the account endpoint reports them not
    /// onboarded. Remove one (PUT `/_mock/faults`) to onboard it.
    #[arg(long = "not-onboarded-destination", value_name = "ACCOUNT")]
    pub not_onboarded_destinations: Vec<String>,
    /// FIFO of forced HTTP statuses, one consumed per `POST /v1/transfers`
    /// that reaches the script step (i.e. not a replay nor a validation error).
    /// 500/502/503/504 (any other 5xx too): transient before applying;
    /// 429: rate limited; 2xx: apply and answer 200 (random faults skipped);
    /// 600: apply then 500; 601: apply then hang; 602: apply then reset the
    /// connection; 401: unauthorized; other 4xx: permanent error before
    /// applying (not stored). Closed destinations still win over
    /// 2xx/600/601/602. Unknown values: normal processing.
    #[arg(long, value_delimiter = ',', value_name = "STATUS,...")]
    pub script: Vec<u16>,
    /// Transfer requests per second the gateway accepts, enforced by a token
    /// bucket (see the module docs); over it, `429` `rate_limited` with
    /// `Retry-After`, counted in [`Stats::rate_limited`]. 0 = no limit.
    #[arg(long, default_value_t = 0)]
    pub rate_limit_per_sec: u32,
    /// The bucket's capacity in tokens: how many requests may arrive at once
    /// after a quiet spell. 0 = the default, a tenth of a second of the rate
    /// (`rate_limit_per_sec / 10`, at least 1: 10 at 100/s).
    #[arg(long, default_value_t = 0)]
    pub rate_limit_burst: u32,
}

impl Faults {
    /// The token bucket's capacity: [`Faults::rate_limit_burst`], or when 0 a
    /// tenth of a second of [`Faults::rate_limit_per_sec`] (at least 1).
    pub fn bucket_capacity(&self) -> u32 {
        if self.rate_limit_burst > 0 {
            self.rate_limit_burst
        } else {
            (self.rate_limit_per_sec / 10).max(1)
        }
    }
}

/// One applied transfer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LedgerEntry {
    /// `tr_` + ULID.
    pub id: String,
    /// The `Idempotency-Key` of the request that applied it.
    pub idempotency_key: String,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 currency, upper case.
    pub currency: String,
    /// Payee's gateway account.
    pub destination: String,
    /// The fleet's payout id.
    pub reference: String,
    /// `paid` or `pending`.
    pub status: String,
    /// When the transfer was applied.
    pub applied_at: DateTime<Utc>,
    /// The release-funds API's `bookingId` (none on the contract's API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booking_id: Option<String>,
}

/// Counters about `POST /v1/transfers`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// `POST /v1/transfers` requests received (all outcomes).
    pub requests: u64,
    /// Transfers applied (money moved).
    pub applied: u64,
    /// Requests answered from a stored answer for their key (a stored
    /// transfer or a stored permanent error).
    pub replays: u64,
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// `429`s the token bucket sent ([`Faults::rate_limit_per_sec`]); also
    /// in `by_status`, beside any injected or scripted 429s.
    #[serde(default)]
    pub rate_limited: u64,
}

/// The mock gateway. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MockGateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MockGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockGateway").finish_non_exhaustive()
    }
}

struct Inner {
    /// `Bearer {secret}`, precomputed.
    auth: String,
    seed: u64,
    state: Mutex<GatewayState>,
    /// Cancelled when the serving server shuts down, so hung answers return.
    release: Mutex<CancellationToken>,
}

struct GatewayState {
    faults: Faults,
    /// The durable ledger, when configured.
    journal: Option<File>,
    rng: StdRng,
    ledger: Vec<LedgerEntry>,
    by_id: HashMap<String, usize>,
    by_reference: HashMap<String, Vec<usize>>,
    keys: HashMap<String, KeyRecord>,
    stats: Stats,
    /// The rate limit's token bucket: (tokens, when last refilled).
    bucket: Option<(f64, tokio::time::Instant)>,
}

struct KeyRecord {
    amount_minor: i64,
    currency: String,
    destination: String,
    reference: String,
    outcome: Outcome,
}

enum Outcome {
    /// Index into the ledger.
    Applied(usize),
    /// A stored permanent error.
    Failed {
        status: StatusCode,
        code: String,
        message: String,
    },
}

#[derive(Deserialize)]
struct TransferRequest {
    amount_minor: i64,
    currency: String,
    destination: String,
    reference: String,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<HashMap<String, String>>,
    /// The release-funds API's `bookingId`.
    #[serde(skip)]
    booking_id: Option<String>,
}

/// The release-funds request body (ASP.NET binds camelCase).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReleaseRequest {
    booking_id: String,
    driver_stripe_account_id: String,
    amount: i64,
    currency: String,
    #[serde(default)]
    reference: Option<String>,
}

impl From<ReleaseRequest> for TransferRequest {
    fn from(r: ReleaseRequest) -> Self {
        TransferRequest {
            amount_minor: r.amount,
            currency: r.currency.to_ascii_uppercase(),
            destination: r.driver_stripe_account_id,
            reference: r.reference.unwrap_or_else(|| r.booking_id.clone()),
            metadata: None,
            booking_id: Some(r.booking_id),
        }
    }
}

/// Which API a request came in on: the answer's shape and codes follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// The gateway contract (`/v1/transfers`).
    Contract,
    /// The release-funds API (`/api/Payment/…`).
    Release,
}

impl Api {
    fn not_onboarded_code(self) -> &'static str {
        match self {
            Api::Contract => "account_not_onboarded",
            Api::Release => "driver_not_onboarded",
        }
    }
}

/// A transfer as the release-funds API shows it.
fn release_view(v: &TransferView) -> serde_json::Value {
    serde_json::json!({
        "success": true,
        "transferId": v.id,
        "status": v.status,
        "amount": v.amount_minor,
        "currency": v.currency.to_ascii_lowercase(),
        "driverStripeAccountId": v.destination,
        "reference": v.reference,
    })
}

#[derive(Serialize)]
struct TransferView {
    id: String,
    status: String,
    amount_minor: i64,
    currency: String,
    destination: String,
    reference: String,
}

impl From<&LedgerEntry> for TransferView {
    fn from(e: &LedgerEntry) -> Self {
        Self {
            id: e.id.clone(),
            status: e.status.clone(),
            amount_minor: e.amount_minor,
            currency: e.currency.clone(),
            destination: e.destination.clone(),
            reference: e.reference.clone(),
        }
    }
}

/// An answer decided under the lock, rendered to HTTP outside it.
enum Answer {
    Transfer(StatusCode, TransferView),
    Error {
        status: StatusCode,
        code: String,
        message: String,
        retry_after: Option<u64>,
    },
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Answer::Transfer(s, _) | Answer::Error { status: s, .. } => *s,
        }
    }

    fn error(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        Answer::Error {
            status,
            code: code.into(),
            message: message.into(),
            retry_after: None,
        }
    }
}

impl Answer {
    /// The answer in `api`'s shape.
    fn render(self, api: Api) -> Response {
        match (api, self) {
            (Api::Release, Answer::Transfer(status, view)) => {
                (status, Json(release_view(&view))).into_response()
            }
            (
                Api::Release,
                Answer::Error {
                    status,
                    code,
                    message,
                    retry_after,
                },
            ) => {
                let body = serde_json::json!({"success": false, "error": {"code": code, "message": message}});
                let mut resp = (status, Json(body)).into_response();
                if let Some(secs) = retry_after {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                resp
            }
            (Api::Contract, a) => a.into_response(),
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Transfer(status, view) => (status, Json(view)).into_response(),
            Answer::Error {
                status,
                code,
                message,
                retry_after,
            } => {
                let body = serde_json::json!({"error": {"code": code, "message": message}});
                let mut resp = (status, Json(body)).into_response();
                if let Some(secs) = retry_after {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                resp
            }
        }
    }
}

/// What the handler does after the locked decision.
enum Decision {
    Answer(Answer),
    /// Applied; hold the answer for this long (or until server shutdown).
    Hang(Duration, Answer),
    /// Applied; reset the connection instead of answering.
    Reset(Answer),
}

enum PostFault {
    None,
    Fail500,
    Hang,
    Reset,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn valid_currency(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())
}

fn permanent_status(code: &str) -> StatusCode {
    match code {
        "insufficient_funds" => StatusCode::PAYMENT_REQUIRED,
        "account_not_onboarded" => StatusCode::FORBIDDEN,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn transient(status: StatusCode) -> Answer {
    let code = match status.as_u16() {
        500 => "internal_error",
        502 => "bad_gateway",
        504 => "gateway_timeout",
        _ => "service_unavailable",
    };
    Answer::error(
        status,
        code,
        "injected transient failure; retry with the same key",
    )
}

fn rate_limited(retry_after_secs: u64) -> Answer {
    let secs = if retry_after_secs == 0 {
        DEFAULT_RETRY_AFTER_SECS
    } else {
        retry_after_secs
    };
    Answer::Error {
        status: StatusCode::TOO_MANY_REQUESTS,
        code: "rate_limited".to_owned(),
        message: "too many requests".to_owned(),
        retry_after: Some(secs),
    }
}

fn unauthorized() -> Answer {
    Answer::error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer secret",
    )
}

impl GatewayState {
    fn new(faults: Faults, seed: u64) -> Self {
        Self {
            faults,
            journal: None,
            rng: StdRng::seed_from_u64(seed),
            ledger: Vec::new(),
            by_id: HashMap::new(),
            by_reference: HashMap::new(),
            keys: HashMap::new(),
            stats: Stats::default(),
            bucket: None,
        }
    }

    /// Takes a token from the rate limit's bucket for a request arriving
    /// now; `Some(answer)` (a 429) when there is none. Always `None` without
    /// a rate limit.
    fn take_token(&mut self) -> Option<Answer> {
        let rate = self.faults.rate_limit_per_sec;
        if rate == 0 {
            self.bucket = None;
            return None;
        }
        let capacity = f64::from(self.faults.bucket_capacity());
        let now = tokio::time::Instant::now();
        // A new bucket starts full.
        let (tokens, last) = self.bucket.unwrap_or((capacity, now));
        let tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * f64::from(rate))
            .min(capacity);
        if tokens >= 1.0 {
            self.bucket = Some((tokens - 1.0, now));
            return None;
        }
        self.bucket = Some((tokens, now));
        // When the next token is in: whole seconds, at least 1.
        let wait = (1.0 - tokens) / f64::from(rate);
        let secs = (wait.ceil() as u64).max(1);
        Some(Answer::Error {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited".to_owned(),
            message: "rate limit exceeded; retry after Retry-After".to_owned(),
            retry_after: Some(secs),
        })
    }

    fn permanent_from_faults(&self) -> Answer {
        let code = if self.faults.permanent_code.is_empty() {
            DEFAULT_PERMANENT_CODE
        } else {
            self.faults.permanent_code.as_str()
        };
        Answer::error(permanent_status(code), code, "injected permanent failure")
    }

    fn hang_duration(&self) -> Duration {
        Duration::from_millis(if self.faults.hang_ms == 0 {
            DEFAULT_HANG_MS
        } else {
            self.faults.hang_ms
        })
    }

    fn latency(&mut self) -> Duration {
        let jitter = match self.faults.latency_jitter_ms {
            0 => 0,
            j => self.rng.random_range(0..=j),
        };
        Duration::from_millis(self.faults.latency_ms.saturating_add(jitter))
    }

    /// One uniform draw in `0..1`, or `None` when all the rates are zero
    /// (so the generator is not advanced needlessly).
    fn draw(&mut self, total_rate: f64) -> Option<f64> {
        (total_rate > 0.0).then(|| self.rng.random::<f64>())
    }

    /// Everything after latency and auth, under the lock.
    fn decide(&mut self, headers: &HeaderMap, body: &[u8], api: Api) -> Decision {
        let key = match headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty())
        {
            Some(k) => k,
            None => {
                return Decision::Answer(Answer::error(
                    StatusCode::BAD_REQUEST,
                    "missing_idempotency_key",
                    "the Idempotency-Key header is required",
                ));
            }
        };
        let parsed = match api {
            Api::Contract => serde_json::from_slice::<TransferRequest>(body),
            Api::Release => serde_json::from_slice::<ReleaseRequest>(body).map(Into::into),
        };
        let req: TransferRequest = match parsed {
            Ok(r) => r,
            Err(e) => {
                return Decision::Answer(Answer::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("malformed body: {e}"),
                ));
            }
        };
        if req.amount_minor <= 0 {
            return Decision::Answer(Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_amount",
                "amount_minor must be a positive integer",
            ));
        }
        if !valid_currency(&req.currency) {
            return Decision::Answer(Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_currency",
                "currency must be 3 upper-case letters (ISO 4217)",
            ));
        }
        if req.destination.is_empty() {
            return Decision::Answer(Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_destination",
                "destination must not be empty",
            ));
        }
        if req.reference.is_empty() {
            return Decision::Answer(Answer::error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "reference must not be empty",
            ));
        }

        // Replay check.
        if let Some(rec) = self.keys.get(key) {
            let same = rec.amount_minor == req.amount_minor
                && rec.currency == req.currency
                && rec.destination == req.destination
                && rec.reference == req.reference;
            if !same {
                return Decision::Answer(Answer::error(
                    StatusCode::CONFLICT,
                    "idempotency_conflict",
                    "this Idempotency-Key was used with other parameters",
                ));
            }
            let answer = match &rec.outcome {
                Outcome::Applied(idx) => {
                    Answer::Transfer(StatusCode::OK, (&self.ledger[*idx]).into())
                }
                Outcome::Failed {
                    status,
                    code,
                    message,
                } => Answer::error(*status, code.clone(), message.clone()),
            };
            self.stats.replays += 1;
            return Decision::Answer(answer);
        }

        // Script.
        let mut post = PostFault::None;
        let mut scripted = false;
        if !self.faults.script.is_empty() {
            let forced = self.faults.script.remove(0);
            match forced {
                600 => {
                    post = PostFault::Fail500;
                    scripted = true;
                }
                601 => {
                    post = PostFault::Hang;
                    scripted = true;
                }
                602 => {
                    post = PostFault::Reset;
                    scripted = true;
                }
                429 => return Decision::Answer(rate_limited(self.faults.retry_after_secs)),
                401 => return Decision::Answer(unauthorized()),
                s @ 400..=499 => {
                    let status = StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST);
                    let code = match s {
                        402 => "insufficient_funds",
                        403 => api.not_onboarded_code(),
                        404 => "invalid_destination",
                        422 => "account_closed",
                        _ => "invalid_request",
                    };
                    return Decision::Answer(Answer::error(status, code, "scripted failure"));
                }
                s @ 500..=599 => {
                    let status = StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    return Decision::Answer(transient(status));
                }
                _ => scripted = (200..300).contains(&forced),
            }
        }

        // Closed destinations: a permanent error stored for the key.
        if self.faults.closed_destinations.contains(&req.destination) {
            let (status, code, message) = (
                StatusCode::UNPROCESSABLE_ENTITY,
                "account_closed".to_owned(),
                format!("destination {} is closed", req.destination),
            );
            let answer = Answer::error(status, code.clone(), message.clone());
            self.keys.insert(
                key.to_owned(),
                KeyRecord {
                    amount_minor: req.amount_minor,
                    currency: req.currency,
                    destination: req.destination,
                    reference: req.reference,
                    outcome: Outcome::Failed {
                        status,
                        code,
                        message,
                    },
                },
            );
            return Decision::Answer(answer);
        }

        // Payees still onboarding: refused, not stored (onboarding can finish).
        if self
            .faults
            .not_onboarded_destinations
            .contains(&req.destination)
        {
            return Decision::Answer(Answer::error(
                StatusCode::FORBIDDEN,
                api.not_onboarded_code(),
                format!(
                    "the owner of {} has not completed onboarding",
                    req.destination
                ),
            ));
        }

        // Random pre-apply faults (skipped when the script forced an outcome).
        if !scripted {
            let (r5, r429, rp) = (
                self.faults.rate_5xx,
                self.faults.rate_429,
                self.faults.rate_permanent,
            );
            if let Some(u) = self.draw(r5 + r429 + rp) {
                if u < r5 {
                    return Decision::Answer(transient(StatusCode::SERVICE_UNAVAILABLE));
                } else if u < r5 + r429 {
                    return Decision::Answer(rate_limited(self.faults.retry_after_secs));
                } else if u < r5 + r429 + rp {
                    return Decision::Answer(self.permanent_from_faults());
                }
            }
        }

        // Apply.
        let pending = self
            .draw(self.faults.rate_pending)
            .is_some_and(|u| u < self.faults.rate_pending);
        let entry = LedgerEntry {
            id: format!("tr_{}", ulid::Ulid::new()),
            idempotency_key: key.to_owned(),
            amount_minor: req.amount_minor,
            currency: req.currency.clone(),
            destination: req.destination.clone(),
            reference: req.reference.clone(),
            status: if pending { "pending" } else { "paid" }.to_owned(),
            applied_at: Utc::now(),
            booking_id: req.booking_id.clone(),
        };
        // Durable first: if the line cannot be written, nothing is applied and
        // the client is told to retry (the same key will apply later).
        if let Err(e) = self.journal_append(&entry) {
            tracing::error!(error = %format_args!("{e:#}"), "ledger file write failed; transfer not applied");
            return Decision::Answer(Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                "the ledger could not be written; retry with the same key",
            ));
        }
        let view = TransferView::from(&entry);
        self.insert_applied(entry);
        self.stats.applied += 1;

        // Post-apply faults.
        if !scripted {
            let (r500, rhang, rreset) = (
                self.faults.rate_apply_then_500,
                self.faults.rate_apply_then_timeout,
                self.faults.rate_apply_then_reset,
            );
            if let Some(u) = self.draw(r500 + rhang + rreset) {
                if u < r500 {
                    post = PostFault::Fail500;
                } else if u < r500 + rhang {
                    post = PostFault::Hang;
                } else if u < r500 + rhang + rreset {
                    post = PostFault::Reset;
                }
            }
        }
        match post {
            PostFault::None => Decision::Answer(Answer::Transfer(StatusCode::OK, view)),
            PostFault::Fail500 => Decision::Answer(Answer::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "injected failure after applying",
            )),
            PostFault::Hang => {
                Decision::Hang(self.hang_duration(), Answer::Transfer(StatusCode::OK, view))
            }
            PostFault::Reset => Decision::Reset(Answer::Transfer(StatusCode::OK, view)),
        }
    }

    /// Indexes an applied transfer (in memory): ledger, id, reference, key.
    fn insert_applied(&mut self, entry: LedgerEntry) {
        let idx = self.ledger.len();
        self.by_id.insert(entry.id.clone(), idx);
        self.by_reference
            .entry(entry.reference.clone())
            .or_default()
            .push(idx);
        self.keys.insert(
            entry.idempotency_key.clone(),
            KeyRecord {
                amount_minor: entry.amount_minor,
                currency: entry.currency.clone(),
                destination: entry.destination.clone(),
                reference: entry.reference.clone(),
                outcome: Outcome::Applied(idx),
            },
        );
        self.ledger.push(entry);
    }

    /// Appends one line to the ledger file and waits for the disk.
    fn journal_append(&mut self, entry: &LedgerEntry) -> std::io::Result<()> {
        let Some(file) = self.journal.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()
    }

    /// Opens (or creates) the ledger file and loads every entry in it. A torn
    /// last line (a crash mid-write, so never acknowledged) is cut off; a bad
    /// line anywhere else is an error, because the ledger would be wrong.
    fn open_journal(&mut self, path: &FsPath) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut reader = std::io::BufReader::new(&file);
        let mut good_len: u64 = 0;
        let mut line = String::new();
        let mut lineno = 0;
        loop {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 {
                break;
            }
            lineno += 1;
            if !line.ends_with('\n') {
                break; // torn: cut off below
            }
            let entry: LedgerEntry = serde_json::from_str(line.trim_end()).map_err(|e| {
                std::io::Error::other(format!(
                    "{}: line {lineno} is not a ledger entry: {e}",
                    path.display()
                ))
            })?;
            if self.keys.contains_key(&entry.idempotency_key) {
                return Err(std::io::Error::other(format!(
                    "{}: line {lineno}: key {} applied twice",
                    path.display(),
                    entry.idempotency_key
                )));
            }
            good_len += n as u64;
            self.insert_applied(entry);
        }
        drop(reader);
        if file.metadata()?.len() != good_len {
            tracing::warn!(path = %path.display(), "cutting a torn last line off the ledger file");
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        file.seek(std::io::SeekFrom::End(0))?;
        self.journal = Some(file);
        Ok(())
    }
}

impl MockGateway {
    /// A gateway with an empty ledger, or the one in `config.ledger_file`.
    ///
    /// # Panics
    /// If the ledger file cannot be opened or read; [`MockGateway::try_new`]
    /// returns the error instead.
    pub fn new(config: MockGatewayConfig) -> Self {
        match Self::try_new(config) {
            Ok(gw) => gw,
            Err(e) => panic!("mock gateway ledger file: {e}"),
        }
    }

    /// A gateway with an empty ledger, or the one loaded from
    /// `config.ledger_file` (created if missing).
    pub fn try_new(config: MockGatewayConfig) -> std::io::Result<Self> {
        let mut state = GatewayState::new(config.faults, config.seed);
        if let Some(path) = &config.ledger_file {
            state.open_journal(path)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                auth: format!("Bearer {}", config.secret),
                seed: config.seed,
                state: Mutex::new(state),
                release: Mutex::new(CancellationToken::new()),
            }),
        })
    }

    /// The HTTP routes: the contract (`/v1/transfers…`), the admin endpoints
    /// (`/_mock/…`, no auth) and `GET /health`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/transfers", post(create_transfer).get(list_transfers))
            .route("/v1/transfers/{id}", get(get_transfer))
            .route("/api/Payment/release-funds", post(create_release))
            .route("/api/Payment/transfers", get(list_releases))
            .route("/api/Payment/accounts/{account}", get(get_account))
            .route("/_mock/ledger", get(admin_ledger))
            .route("/_mock/stats", get(admin_stats))
            .route("/_mock/faults", get(admin_get_faults).put(admin_put_faults))
            .route("/_mock/reset", post(admin_reset))
            .route("/health", get(|| async { "ok" }))
            .fallback(|| async {
                Answer::error(StatusCode::NOT_FOUND, "not_found", "no such route")
            })
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` is cancelled, then shuts down
    /// gracefully. Answers held by apply-then-hang are released at shutdown.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let release = CancellationToken::new();
        *lock(&self.inner.release) = release.clone();
        let router = self.router();
        // Each connection carries a flag the handler can set to reset it.
        let service = router.into_make_service_with_connect_info::<ConnReset>();
        axum::serve(ResettableListener(listener), service)
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                release.cancel();
            })
            .await
    }

    /// Binds `127.0.0.1:0`, spawns [`MockGateway::serve`] and returns a handle.
    pub async fn start(config: MockGatewayConfig) -> std::io::Result<RunningMockGateway> {
        let gateway = MockGateway::try_new(config)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(gateway.clone().serve(listener, shutdown.clone()));
        Ok(RunningMockGateway {
            gateway,
            addr,
            base_url: format!("http://{addr}"),
            shutdown,
            join: Some(join),
        })
    }

    /// Every applied transfer once, in the order applied.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        lock(&self.inner.state).ledger.clone()
    }

    /// The current fault settings (with the script as still pending).
    pub fn faults(&self) -> Faults {
        lock(&self.inner.state).faults.clone()
    }

    /// Replaces the fault settings (including the script).
    pub fn set_faults(&self, faults: Faults) {
        lock(&self.inner.state).faults = faults;
    }

    /// Sets an applied transfer's status (`paid`, `failed`, ...), as the
    /// gateway does when money in flight lands or bounces; `false` when no
    /// such transfer. In memory only: the ledger file keeps the applied status.
    pub fn set_transfer_status(&self, id: &str, status: &str) -> bool {
        let mut st = lock(&self.inner.state);
        match st.by_id.get(id).copied() {
            Some(idx) => {
                st.ledger[idx].status = status.to_owned();
                true
            }
            None => false,
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        lock(&self.inner.state).stats.clone()
    }

    /// Clears the ledger (the ledger file too), the idempotency store, the
    /// stats and the script, and reseeds the random generator; other fault
    /// settings are kept.
    pub fn reset(&self) {
        let mut st = lock(&self.inner.state);
        let mut faults = std::mem::take(&mut st.faults);
        faults.script.clear();
        let journal = st.journal.take().and_then(|f| {
            match f.set_len(0).and_then(|()| f.sync_all()) {
                Ok(()) => Some(f),
                Err(e) => {
                    tracing::error!(error = %format_args!("{e:#}"), "could not truncate the ledger file; it is no longer written");
                    None
                }
            }
        });
        *st = GatewayState::new(faults, self.inner.seed);
        st.journal = journal;
    }

    fn release_token(&self) -> CancellationToken {
        lock(&self.inner.release).clone()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == self.inner.auth.as_bytes())
    }
}

/// The kinds of `gateway.kind` the mock speaks.
pub const MOCK_KINDS: [&str; 2] = ["contract", "release_funds"];

/// The `PAYOUTS_*` settings that point a fleet with `gateway.kind = kind` at
/// a mock gateway on `base_url` that expects `secret`; `None` for a kind the
/// mock does not speak (Stripe has a stand-in of its own).
pub fn fleet_env(kind: &str, base_url: &str, secret: &str) -> Option<Vec<(String, String)>> {
    let pairs: Vec<(&str, &str)> = match kind {
        "contract" => vec![
            ("PAYOUTS_GATEWAY__KIND", "contract"),
            ("PAYOUTS_GATEWAY__BASE_URL", base_url),
            ("PAYOUTS_GATEWAY__SECRET", secret),
        ],
        "release_funds" => vec![
            ("PAYOUTS_GATEWAY__KIND", "release_funds"),
            ("PAYOUTS_GATEWAY__RELEASE_FUNDS__BASE_URL", base_url),
            (
                "PAYOUTS_GATEWAY__RELEASE_FUNDS__ENDPOINT",
                "/api/Payment/release-funds",
            ),
            (
                "PAYOUTS_GATEWAY__RELEASE_FUNDS__LOOKUP_ENDPOINT",
                "/api/Payment/transfers",
            ),
            (
                "PAYOUTS_GATEWAY__RELEASE_FUNDS__ACCOUNT_ENDPOINT",
                "/api/Payment/accounts/{account}",
            ),
            ("PAYOUTS_GATEWAY__RELEASE_FUNDS__SECRET", secret),
        ],
        _ => return None,
    };
    Some(
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Sleeps for `d`, or less if the server is shutting down.
async fn sleep_or_release(gw: &MockGateway, d: Duration) {
    if d.is_zero() {
        return;
    }
    let release = gw.release_token();
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = release.cancelled() => {}
    }
}

async fn create_transfer(
    State(gw): State<MockGateway>,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
) -> Response {
    transfer(gw, headers, extensions, body, Api::Contract).await
}

async fn create_release(
    State(gw): State<MockGateway>,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
) -> Response {
    transfer(gw, headers, extensions, body, Api::Release).await
}

/// One transfer request on either API: latency, auth, the locked decision,
/// then the answer (held, reset or sent) in that API's shape.
async fn transfer(
    gw: MockGateway,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
    api: Api,
) -> Response {
    // The rate limit sees the request as it arrives, before any work.
    let latency = {
        let mut st = lock(&gw.inner.state);
        if let Some(answer) = st.take_token() {
            st.stats.requests += 1;
            st.stats.rate_limited += 1;
            *st.stats
                .by_status
                .entry(answer.status().as_u16())
                .or_default() += 1;
            drop(st);
            return answer.render(api);
        }
        st.latency()
    };
    sleep_or_release(&gw, latency).await;

    let authorized = gw.authorized(&headers);
    let decision = {
        let mut st = lock(&gw.inner.state);
        st.stats.requests += 1;
        let decision = if authorized {
            st.decide(&headers, &body, api)
        } else {
            Decision::Answer(unauthorized())
        };
        let status = match &decision {
            Decision::Answer(a) | Decision::Hang(_, a) | Decision::Reset(a) => a.status(),
        };
        *st.stats.by_status.entry(status.as_u16()).or_default() += 1;
        decision
    };
    match decision {
        Decision::Answer(a) => a.render(api),
        Decision::Hang(d, a) => {
            tracing::debug!(hang_ms = d.as_millis() as u64, "holding an applied answer");
            sleep_or_release(&gw, d).await;
            a.render(api)
        }
        Decision::Reset(a) => match extensions.get::<ConnectInfo<ConnReset>>() {
            // The answer is dropped: the connection's next write fails and the
            // socket is closed with SO_LINGER 0, i.e. a TCP RST.
            Some(ConnectInfo(conn)) => {
                conn.0.store(true, Ordering::SeqCst);
                a.render(api)
            }
            // Served without connect info (a bare `router()`): a body that
            // fails makes hyper drop the connection without an answer.
            None => {
                let failing = futures::stream::once(async {
                    Err::<Bytes, _>(std::io::Error::other("injected reset"))
                });
                (a.status(), axum::body::Body::from_stream(failing)).into_response()
            }
        },
    }
}

/// The listener behind [`MockGateway::serve`]: plain TCP whose connections
/// can be reset from a handler (apply-then-reset).
struct ResettableListener(TcpListener);

/// A connection that, once its flag is set, fails every read and write and
/// closes with SO_LINGER 0 (the peer sees `connection reset`).
struct ResettableIo {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

/// The connect info handed to handlers: the connection's reset flag.
#[derive(Clone)]
struct ConnReset(Arc<AtomicBool>);

impl axum::serve::Listener for ResettableListener {
    type Io = ResettableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        let io = ResettableIo {
            stream,
            reset: Arc::new(AtomicBool::new(false)),
        };
        (io, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl Connected<axum::serve::IncomingStream<'_, ResettableListener>> for ConnReset {
    fn connect_info(stream: axum::serve::IncomingStream<'_, ResettableListener>) -> Self {
        ConnReset(stream.io().reset.clone())
    }
}

impl ResettableIo {
    /// `Some(error)` once the connection is to be reset (and arms the RST).
    fn check_reset(&self) -> Option<std::io::Error> {
        if !self.reset.load(Ordering::SeqCst) {
            return None;
        }
        let _ = self.stream.set_zero_linger();
        Some(std::io::ErrorKind::ConnectionReset.into())
    }
}

impl AsyncRead for ResettableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.check_reset() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.check_reset() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.check_reset() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.check_reset() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.check_reset() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[derive(Deserialize)]
struct ListQuery {
    reference: Option<String>,
}

async fn list_transfers(
    State(gw): State<MockGateway>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if !gw.authorized(&headers) {
        return unauthorized().into_response();
    }
    let data: Vec<TransferView> = {
        let st = lock(&gw.inner.state);
        match &q.reference {
            Some(r) => st
                .by_reference
                .get(r)
                .map(|idxs| idxs.iter().map(|i| (&st.ledger[*i]).into()).collect())
                .unwrap_or_default(),
            None => st.ledger.iter().map(TransferView::from).collect(),
        }
    };
    Json(serde_json::json!({ "data": data })).into_response()
}

/// The release-funds look-up: `{"data":[…]}` in the release-funds shape.
async fn list_releases(
    State(gw): State<MockGateway>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if !gw.authorized(&headers) {
        return unauthorized().render(Api::Release);
    }
    let data: Vec<serde_json::Value> = {
        let st = lock(&gw.inner.state);
        let idxs: Vec<usize> = match &q.reference {
            Some(r) => st.by_reference.get(r).cloned().unwrap_or_default(),
            None => (0..st.ledger.len()).collect(),
        };
        idxs.iter()
            .map(|i| release_view(&TransferView::from(&st.ledger[*i])))
            .collect()
    };
    Json(serde_json::json!({ "data": data })).into_response()
}

/// The onboarding check: `{"account","onboarded"}`.
async fn get_account(
    State(gw): State<MockGateway>,
    headers: HeaderMap,
    Path(account): Path<String>,
) -> Response {
    if !gw.authorized(&headers) {
        return unauthorized().render(Api::Release);
    }
    let onboarded = !lock(&gw.inner.state)
        .faults
        .not_onboarded_destinations
        .contains(&account);
    Json(serde_json::json!({"account": account, "onboarded": onboarded})).into_response()
}

async fn get_transfer(
    State(gw): State<MockGateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !gw.authorized(&headers) {
        return unauthorized().into_response();
    }
    let found: Option<TransferView> = {
        let st = lock(&gw.inner.state);
        st.by_id.get(&id).map(|i| (&st.ledger[*i]).into())
    };
    match found {
        Some(view) => Json(view).into_response(),
        None => {
            Answer::error(StatusCode::NOT_FOUND, "not_found", "no such transfer").into_response()
        }
    }
}

async fn admin_ledger(State(gw): State<MockGateway>) -> Json<Vec<LedgerEntry>> {
    Json(gw.ledger())
}

async fn admin_stats(State(gw): State<MockGateway>) -> Json<Stats> {
    Json(gw.stats())
}

async fn admin_get_faults(State(gw): State<MockGateway>) -> Json<Faults> {
    Json(gw.faults())
}

async fn admin_put_faults(State(gw): State<MockGateway>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(faults) => {
            gw.set_faults(faults.clone());
            Json(faults).into_response()
        }
        Err(e) => Answer::error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("malformed faults: {e}"),
        )
        .into_response(),
    }
}

async fn admin_reset(State(gw): State<MockGateway>) -> StatusCode {
    gw.reset();
    StatusCode::NO_CONTENT
}

/// A [`MockGateway`] serving on a local port; derefs to the gateway.
/// Dropping it without [`RunningMockGateway::stop`] still signals shutdown.
pub struct RunningMockGateway {
    /// The gateway (shares state with the server).
    pub gateway: MockGateway,
    /// The bound address.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:{port}`.
    pub base_url: String,
    shutdown: CancellationToken,
    join: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningMockGateway {
    /// Shuts the server down gracefully and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(join) = self.join.take() {
            match join.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %format_args!("{e:#}"), "mock gateway server failed")
                }
                Err(e) => {
                    tracing::warn!(error = %format_args!("{e:#}"), "mock gateway task failed")
                }
            }
        }
    }
}

impl Deref for RunningMockGateway {
    type Target = MockGateway;
    fn deref(&self) -> &MockGateway {
        &self.gateway
    }
}

impl Drop for RunningMockGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_ledger(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mock-ledger-{}-{}",
            std::process::id(),
            ulid::Ulid::new()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    async fn post(gw: &RunningMockGateway, key: &str) -> reqwest::Result<reqwest::Response> {
        reqwest::Client::new()
            .post(format!("{}/v1/transfers", gw.base_url))
            .bearer_auth("sk_test_mock")
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({
                "amount_minor": 500, "currency": "USD",
                "destination": "acct_1", "reference": key,
            }))
            .send()
            .await
    }

    async fn start_with(ledger: &FsPath, faults: Faults) -> RunningMockGateway {
        MockGateway::start(MockGatewayConfig {
            faults,
            ledger_file: Some(ledger.to_path_buf()),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_restarted_gateway_keeps_its_ledger_and_replays_instead_of_paying_twice() {
        let path = temp_ledger("ledger.jsonl");
        let gw = start_with(&path, Faults::default()).await;
        let first: serde_json::Value = post(&gw, "payout_1").await.unwrap().json().await.unwrap();
        post(&gw, "payout_2").await.unwrap();
        gw.stop().await;

        let gw = start_with(&path, Faults::default()).await;
        assert_eq!(gw.ledger().len(), 2, "both entries loaded");
        let again: serde_json::Value = post(&gw, "payout_1").await.unwrap().json().await.unwrap();
        assert_eq!(
            first["id"], again["id"],
            "the retry got the stored transfer"
        );
        assert_eq!(gw.ledger().len(), 2, "no second payment");
        assert_eq!(gw.stats().replays, 1);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 2);
        gw.stop().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_corrupt_one_is_refused() {
        let path = temp_ledger("ledger.jsonl");
        let entry = LedgerEntry {
            id: "tr_1".into(),
            idempotency_key: "payout_1".into(),
            amount_minor: 100,
            currency: "USD".into(),
            destination: "acct_1".into(),
            reference: "payout_1".into(),
            status: "paid".into(),
            applied_at: Utc::now(),
            booking_id: None,
        };
        let good = format!("{}\n", serde_json::to_string(&entry).unwrap());
        std::fs::write(&path, format!("{good}{{\"id\":\"tr_")).unwrap();
        let config = MockGatewayConfig {
            ledger_file: Some(path.clone()),
            ..Default::default()
        };
        let gw = MockGateway::try_new(config.clone()).unwrap();
        assert_eq!(gw.ledger(), vec![entry]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);

        std::fs::write(&path, format!("not json\n{good}")).unwrap();
        let err = MockGateway::try_new(config).expect_err("corrupt ledger refused");
        assert!(err.to_string().contains("line 1"), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn apply_then_reset_moves_money_once_and_the_client_sees_a_reset() {
        let path = temp_ledger("ledger.jsonl");
        let gw = start_with(
            &path,
            Faults {
                script: vec![602],
                ..Default::default()
            },
        )
        .await;
        let err = post(&gw, "payout_9").await.expect_err("no answer");
        assert!(!err.is_timeout(), "{err:?}");
        assert_eq!(gw.ledger().len(), 1, "applied before the reset");
        let retry = post(&gw, "payout_9").await.unwrap();
        assert_eq!(retry.status(), StatusCode::OK);
        assert_eq!(gw.ledger().len(), 1, "the retry is a replay");
        gw.reset();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "reset truncates the file"
        );
        gw.stop().await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn fleet_env_configures_each_kind_the_mock_speaks_and_refuses_others() {
        for kind in MOCK_KINDS {
            let env = fleet_env(kind, "http://127.0.0.1:1", "sk_test_mock").unwrap();
            let s = crate::config::Settings::load_from(None, &env).unwrap();
            assert_eq!(s.gateway.kind.as_str(), kind);
            let gw = crate::gateway::select::build(&s.gateway).unwrap();
            assert!(crate::gateway::select::lookup_unavailable(&s.gateway).is_none());
            let dbg = format!("{gw:?}");
            assert!(!dbg.contains("sk_test_mock"), "{dbg}");
        }
        assert!(fleet_env("stripe", "http://127.0.0.1:1", "x").is_none());
    }

    #[tokio::test]
    async fn random_resets_follow_their_rate() {
        let gw = MockGateway::start(MockGatewayConfig {
            faults: Faults {
                rate_apply_then_reset: 1.0,
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
        for i in 0..5 {
            assert!(post(&gw, &format!("payout_{i}")).await.is_err());
        }
        assert_eq!(gw.ledger().len(), 5);
        gw.stop().await;
    }
}

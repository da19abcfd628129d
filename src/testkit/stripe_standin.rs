//! A Stripe stand-in: a real HTTP server (axum) that answers the part of
//! Stripe's API the fleet uses the way Stripe documents it, so the Stripe
//! adapter is tested against Stripe's rules rather than against what our
//! code expects. Where this file and Stripe's documentation disagree, the
//! documentation wins.
//!
//! Sources (cited where each rule is applied):
//! - the published API definition, `github.com/stripe/openapi`,
//!   `openapi/spec3.json` (and the SDK variant `spec3.sdk.json`): the form
//!   parameters of `PostTransfers` (`POST /v1/transfers`: `amount`,
//!   `currency`, `description`, `destination`, `expand`, `metadata`,
//!   `source_transaction`, `source_type`, `transfer_group`), of
//!   `GetTransfers` (`created`, `destination`, `ending_before`, `expand`,
//!   `limit`, `starting_after`, `transfer_group`), of
//!   `GetTransfersTransfer` and `GetAccountsAccount` (`expand`) and of
//!   `PostTransfersIdReversals` (`amount`, `description`, `expand`,
//!   `metadata`, `refund_application_fee`); the `transfer`,
//!   `transfer_reversal` and `account` objects;
//! - idempotency, <https://docs.stripe.com/api/idempotent_requests> and
//!   <https://docs.stripe.com/error-low-level#idempotency>: the status code
//!   and body of the first request for a key are saved once the endpoint
//!   begins executing, whatever the status (400s and 500s included), and
//!   replayed for later requests with the same key (`Idempotent-Replayed:
//!   true`); a request that fails validation, or that conflicts with a
//!   concurrent one, saves nothing; the same key with other parameters is
//!   an `idempotency_error`; keys may be pruned once at least 24 h old;
//! - errors, <https://docs.stripe.com/api/errors> and
//!   <https://docs.stripe.com/error-codes> (`balance_insufficient`,
//!   `transfers_not_allowed`, `insufficient_capabilities_for_transfer`,
//!   `resource_missing`, `parameter_unknown`, `parameter_missing`,
//!   `parameter_invalid_integer`, `idempotency_key_in_use`, `rate_limit`),
//!   and the `Stripe-Should-Retry` header
//!   (<https://docs.stripe.com/error-low-level#server-errors>);
//! - authentication, <https://docs.stripe.com/keys> and
//!   <https://docs.stripe.com/keys#limit-access>: an unknown or revoked key
//!   is a 401; a restricted key (`rk_…`) without the permission an
//!   endpoint needs is a 403;
//! - rate limits, <https://docs.stripe.com/rate-limits>: 100 operations per
//!   second in live mode, 25 in a sandbox (test mode), and a default of 25
//!   per second for each endpoint; over them, `429` with code `rate_limit`;
//! - currencies, <https://docs.stripe.com/currencies#special-cases> and
//!   <https://docs.stripe.com/currencies#three-decimal>: ISK is represented
//!   as a two-decimal currency and its amounts must be divisible by 100;
//!   the last digit of a three-decimal currency's amount must be 0;
//! - webhooks, <https://docs.stripe.com/webhooks#verify-manually>: the
//!   `Stripe-Signature` header is `t={unix seconds},v1={hex
//!   HMAC-SHA256(endpoint secret, "{t}.{raw body}")}`; an endpoint for
//!   Connect events (`account.updated`, `payout.*` on a connected account,
//!   which carry `account`) is a separate endpoint with its own secret
//!   (<https://docs.stripe.com/connect/webhooks>).
//!
//! Besides the API, a control surface under `/_standin/…` sets the platform
//! balance, accounts and their capabilities, scripts faults, emits signed
//! events and lists what the stand-in saw; the same controls are methods on
//! [`StandIn`] for in-process tests.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

/// The platform account the stand-in plays.
pub const PLATFORM_ACCOUNT: &str = "acct_standin_platform";

/// A webhook endpoint Stripe delivers to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Where events are POSTed.
    pub url: String,
    /// Its signing secret (`whsec_…`).
    pub secret: String,
}

/// How the stand-in starts.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// Secret keys with full access (`sk_test_…` or `sk_live_…`).
    pub secret_keys: Vec<String>,
    /// Restricted keys (`rk_…`) that may read but not create transfers.
    pub read_only_keys: Vec<String>,
    /// Operations per second for the whole account; `None`: Stripe's (25 in
    /// test mode, 100 in live mode).
    pub rate_per_sec: Option<u32>,
    /// Operations per second for each endpoint (Stripe's default: 25).
    pub endpoint_rate_per_sec: u32,
    /// The platform's endpoint (events on the platform account: `transfer.*`).
    pub platform_endpoint: Option<Endpoint>,
    /// The Connect endpoint (events on connected accounts: `account.updated`, `payout.*`).
    pub connect_endpoint: Option<Endpoint>,
    /// The platform's available balance by lower-case currency, in minor units.
    pub balance: BTreeMap<String, i64>,
}

impl Default for StandInConfig {
    fn default() -> Self {
        StandInConfig {
            secret_keys: vec!["sk_test_standin".into()],
            read_only_keys: Vec::new(),
            rate_per_sec: None,
            endpoint_rate_per_sec: 25,
            platform_endpoint: None,
            connect_endpoint: None,
            balance: [("usd".to_string(), 1_000_000_000)].into(),
        }
    }
}

/// A scripted answer for the next `POST /v1/transfers` that reaches execution.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// The transfer is created, then a 500 is saved for the key and
    /// answered: the answer of a request that moved money is lost.
    ServerErrorAfterCreate,
    /// Execution began and failed before anything was created: a 500 is
    /// saved for the key (every retry with it replays the 500).
    ServerErrorBeforeCreate,
    /// An answer of the given status and error code, not saved (a conflict
    /// with a concurrent request, a lock), with `Stripe-Should-Retry` as given.
    Unsaved {
        /// HTTP status.
        status: u16,
        /// Stripe's error code.
        code: String,
        /// The `Stripe-Should-Retry` header, if any.
        should_retry: Option<bool>,
    },
}

/// One request the stand-in answered.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, `POST`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The request's headers (lower-case names).
    pub headers: BTreeMap<String, String>,
    /// The form (POST) or query (GET) parameters.
    pub params: Vec<(String, String)>,
    /// The answer's status.
    pub status: u16,
    /// Whether the answer was a replay of a saved one.
    pub replayed: bool,
    /// When it arrived.
    pub at: Instant,
}

/// A connected account.
#[derive(Debug, Clone)]
struct Account {
    /// Status of its `transfers` capability: `active`, `inactive`, `pending`.
    transfers: String,
    /// Stripe refuses transfers to it (`transfers_not_allowed`).
    transfers_not_allowed: bool,
    /// Its Stripe balance by currency (what transfers brought in).
    balance: BTreeMap<String, i64>,
}

#[derive(Debug, Clone)]
struct Saved {
    path: String,
    params: Vec<(String, String)>,
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

#[derive(Debug)]
struct Inner {
    cfg: StandInConfig,
    balance: BTreeMap<String, i64>,
    accounts: BTreeMap<String, Account>,
    transfers: Vec<Value>,
    idem: HashMap<String, Saved>,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
    /// Requests let through in the last second: (when, endpoint).
    window: VecDeque<(Instant, String)>,
    revoked: Vec<String>,
    next: u64,
    delivered: Vec<(String, u16)>,
}

/// The stand-in; clones share one state.
#[derive(Debug, Clone)]
pub struct StandIn(Arc<Mutex<Inner>>);

type HmacSha256 = Hmac<Sha256>;

/// Minor-unit exponent of the currencies the stand-in knows, as Stripe
/// counts them (<https://docs.stripe.com/currencies#zero-decimal>,
/// `#three-decimal`, `#special-cases`: ISK, HUF, TWD are two-decimal in the API).
fn stripe_exponent(currency: &str) -> Option<u32> {
    const ZERO: &[&str] = &[
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
        "xaf", "xof", "xpf",
    ];
    const THREE: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];
    const TWO: &[&str] = &[
        "usd", "eur", "gbp", "chf", "cad", "aud", "nzd", "sek", "nok", "dkk", "pln", "czk", "huf",
        "isk", "twd", "mxn", "brl", "inr", "sgd", "hkd", "ron", "bgn", "zar", "thb", "myr", "php",
        "idr", "aed", "ils", "try",
    ];
    if ZERO.contains(&currency) {
        Some(0)
    } else if THREE.contains(&currency) {
        Some(3)
    } else if TWO.contains(&currency) {
        Some(2)
    } else {
        None
    }
}

/// Stripe's error body (`{"error":{…}}`, <https://docs.stripe.com/api/errors>).
fn error_body(kind: &str, code: Option<&str>, message: &str, param: Option<&str>) -> Value {
    let mut e = json!({"type": kind, "message": message});
    if let Some(c) = code {
        e["code"] = json!(c);
        e["doc_url"] = json!(format!(
            "https://stripe.com/docs/error-codes/{}",
            c.replace('_', "-")
        ));
    }
    if let Some(p) = param {
        e["param"] = json!(p);
    }
    json!({ "error": e })
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
    replayed: bool,
}

impl Answer {
    fn new(status: u16, body: Value) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body,
            replayed: false,
        }
    }

    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }

    fn into_response(self, request_id: &str) -> Response {
        let mut resp = (
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(self.body),
        )
            .into_response();
        let h = resp.headers_mut();
        h.insert(
            "request-id",
            HeaderValue::from_str(request_id).expect("ascii"),
        );
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (
                axum::http::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                h.insert(k, v);
            }
        }
        resp
    }
}

/// Whether the form/query names only parameters in `allowed` (top level:
/// `metadata[k]`, `expand[]`, `created[gte]` count as `metadata`, `expand`,
/// `created`). Stripe answers `parameter_unknown` otherwise.
fn unknown_param<'a>(params: &'a [(String, String)], allowed: &[&str]) -> Option<&'a str> {
    params
        .iter()
        .map(|(k, _)| k.as_str())
        .find(|k| !allowed.contains(&k.split('[').next().unwrap_or(k)))
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn metadata(params: &[(String, String)]) -> BTreeMap<String, String> {
    params
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `Stripe-Signature` for `payload` at `t` under `secret`, as Stripe's
/// libraries compute it (<https://docs.stripe.com/webhooks#verify-manually>).
pub fn stripe_signature(secret: &str, t: i64, payload: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(payload);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn mask(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let head = key.splitn(3, '_').take(2).collect::<Vec<_>>().join("_");
    format!("{head}_****{tail}")
}

/// The key's mode: `true` for live keys.
fn live(key: &str) -> bool {
    key.starts_with("sk_live_") || key.starts_with("rk_live_")
}

enum Auth {
    Full,
    ReadOnly(String),
}

impl StandIn {
    /// A stand-in with `cfg`.
    pub fn new(cfg: StandInConfig) -> Self {
        let balance = cfg.balance.clone();
        StandIn(Arc::new(Mutex::new(Inner {
            cfg,
            balance,
            accounts: BTreeMap::new(),
            transfers: Vec::new(),
            idem: HashMap::new(),
            faults: VecDeque::new(),
            seen: Vec::new(),
            window: VecDeque::new(),
            revoked: Vec::new(),
            next: 0,
            delivered: Vec::new(),
        })))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("stand-in state")
    }

    /// The API and the control surface.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/transfers", post(create_transfer).get(list_transfers))
            .route("/v1/transfers/{id}", get(get_transfer))
            .route("/v1/transfers/{id}/reversals", post(reverse_transfer))
            .route("/v1/accounts/{id}", get(get_account))
            .route("/_standin/balance", post(ctl_balance))
            .route("/_standin/accounts", post(ctl_account))
            .route("/_standin/faults", post(ctl_fault))
            .route("/_standin/events", post(ctl_event))
            .route("/_standin/forget_keys", post(ctl_forget))
            .route("/_standin/requests", get(ctl_requests))
            .route("/_standin/transfers", get(ctl_transfers))
            .with_state(self.clone())
    }

    /// Serves on `listener` until the task is dropped; returns the base URL.
    pub async fn spawn(&self, listener: tokio::net::TcpListener) -> std::io::Result<String> {
        let addr = listener.local_addr()?;
        let app = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %format_args!("{e:#}"), "stripe stand-in stopped");
            }
        });
        Ok(format!("http://{addr}"))
    }

    /// Starts on 127.0.0.1 on a free port; returns the stand-in and its base URL.
    pub async fn start(cfg: StandInConfig) -> std::io::Result<(StandIn, String)> {
        let s = StandIn::new(cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = s.spawn(listener).await?;
        Ok((s, base))
    }

    /// Sets the platform's available balance in `currency` (minor units).
    pub fn set_balance(&self, currency: &str, amount: i64) {
        self.inner()
            .balance
            .insert(currency.to_ascii_lowercase(), amount);
    }

    /// The platform's available balance in `currency`.
    pub fn balance(&self, currency: &str) -> i64 {
        self.inner()
            .balance
            .get(&currency.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Creates or changes a connected account; when its `transfers`
    /// capability changes and a Connect endpoint is set, sends
    /// `account.updated` (and waits for the delivery; its HTTP status is returned).
    pub async fn set_account(
        &self,
        id: &str,
        transfers: &str,
        transfers_not_allowed: bool,
    ) -> Option<u16> {
        let changed = {
            let mut st = self.inner();
            let acct = st.accounts.entry(id.to_string()).or_insert(Account {
                transfers: String::new(),
                transfers_not_allowed: false,
                balance: BTreeMap::new(),
            });
            let changed = !acct.transfers.is_empty() && acct.transfers != transfers;
            acct.transfers = transfers.to_string();
            acct.transfers_not_allowed = transfers_not_allowed;
            changed
        };
        if changed {
            let object = self.account_object(id)?;
            return self
                .emit(true, "account.updated", object, Some(id))
                .await
                .ok();
        }
        None
    }

    /// An account ready for transfers (capability `active`).
    pub async fn add_account(&self, id: &str) {
        self.set_account(id, "active", false).await;
    }

    /// The next `POST /v1/transfers` that reaches execution answers `fault`.
    pub fn push_fault(&self, fault: Fault) {
        self.inner().faults.push_back(fault);
    }

    /// Forgets every saved idempotency key (as Stripe may once a key is 24 h old).
    pub fn forget_keys(&self) {
        self.inner().idem.clear();
    }

    /// Revokes a secret key (rolled in the Dashboard): it answers 401 from now on.
    pub fn revoke(&self, key: &str) {
        self.inner().revoked.push(key.to_string());
    }

    /// Every request seen, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner().seen.clone()
    }

    /// The `POST /v1/transfers` requests seen.
    pub fn transfer_posts(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.path == "/v1/transfers")
            .collect()
    }

    /// Every transfer created, oldest first.
    pub fn transfers(&self) -> Vec<Value> {
        self.inner().transfers.clone()
    }

    /// Webhook deliveries: (event type, HTTP status; 0 when unreachable).
    pub fn deliveries(&self) -> Vec<(String, u16)> {
        self.inner().delivered.clone()
    }

    /// Reverses `amount` (all that is left when `None`) of transfer `id`, as
    /// `POST /v1/transfers/{id}/reversals` does, and sends `transfer.reversed`
    /// to the platform endpoint. The transfer after it.
    pub async fn reverse(&self, id: &str, amount: Option<i64>) -> Option<Value> {
        let t = {
            let mut st = self.inner();
            reverse_in(&mut st, id, amount).ok()?
        };
        let _ = self.emit(false, "transfer.reversed", t.clone(), None).await;
        Some(t)
    }

    fn account_object(&self, id: &str) -> Option<Value> {
        let st = self.inner();
        st.accounts.get(id).map(|a| account_json(id, a))
    }

    /// Sends a signed event of `kind` about `object` to the Connect endpoint
    /// (`connect`, with `account`) or the platform endpoint, as Stripe does;
    /// the delivery's HTTP status (0 when unreachable). `Err` when no such
    /// endpoint is configured.
    pub async fn emit(
        &self,
        connect: bool,
        kind: &str,
        object: Value,
        account: Option<&str>,
    ) -> Result<u16, String> {
        let (endpoint, id, live_mode) = {
            let mut st = self.inner();
            let ep = if connect {
                st.cfg.connect_endpoint.clone()
            } else {
                st.cfg.platform_endpoint.clone()
            };
            st.next += 1;
            let live_mode = st.cfg.secret_keys.first().is_some_and(|k| live(k));
            (ep, format!("evt_standin{}", st.next), live_mode)
        };
        let endpoint = endpoint.ok_or("no endpoint configured for this event")?;
        let mut event = json!({
            "id": id, "object": "event", "api_version": "2025-04-30.basil",
            "created": unix_now(), "type": kind, "livemode": live_mode,
            "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null},
            "data": {"object": object},
        });
        if let Some(a) = account {
            event["account"] = json!(a);
        }
        let payload = event.to_string();
        let sig = stripe_signature(&endpoint.secret, unix_now(), payload.as_bytes());
        let status = match reqwest::Client::new()
            .post(&endpoint.url)
            .header("Stripe-Signature", sig)
            .header("Content-Type", "application/json; charset=utf-8")
            .header(
                "User-Agent",
                "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            )
            .body(payload)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        self.inner().delivered.push((kind.to_string(), status));
        Ok(status)
    }

    /// Authenticates the request and applies the rate limits; `Err` is the
    /// answer Stripe gives instead (401, 429: never saved).
    fn gate(&self, st: &mut Inner, headers: &HeaderMap, endpoint: &str) -> Result<Auth, Answer> {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ").map(str::to_string).or_else(|| {
                    // Basic auth: the key is the user name, no password.
                    v.strip_prefix("Basic ")
                        .and_then(base64_basic::decode)
                        .map(|s| s.trim_end_matches(':').to_string())
                })
            })
            .unwrap_or_default();
        let revoked = st.revoked.contains(&key);
        let auth = if st.cfg.secret_keys.contains(&key) && !revoked {
            Auth::Full
        } else if st.cfg.read_only_keys.contains(&key) && !revoked {
            Auth::ReadOnly(key.clone())
        } else {
            let message = if key.is_empty() {
                "You did not provide an API key.".to_string()
            } else {
                format!("Invalid API Key provided: {}", mask(&key))
            };
            return Err(Answer::new(
                401,
                error_body("invalid_request_error", None, &message, None),
            ));
        };
        // https://docs.stripe.com/rate-limits: a global limit per mode and a
        // default per-endpoint limit; refused requests do not count.
        let now = Instant::now();
        while st
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
        {
            st.window.pop_front();
        }
        let global = st
            .cfg
            .rate_per_sec
            .unwrap_or(if live(&key) { 100 } else { 25 }) as usize;
        let on_endpoint = st.window.iter().filter(|(_, e)| e == endpoint).count();
        if st.window.len() >= global || on_endpoint >= st.cfg.endpoint_rate_per_sec as usize {
            return Err(Answer::new(
                429,
                error_body(
                    "invalid_request_error",
                    Some("rate_limit"),
                    "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
                    None,
                ),
            ));
        }
        st.window.push_back((now, endpoint.to_string()));
        Ok(auth)
    }

    fn record(
        &self,
        st: &mut Inner,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        params: Vec<(String, String)>,
        a: &Answer,
    ) {
        st.seen.push(Seen {
            method: method.to_string(),
            path: path.to_string(),
            idempotency_key: header_str(headers, "idempotency-key"),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            params,
            status: a.status,
            replayed: a.replayed,
            at: Instant::now(),
        });
    }
}

/// A minimal Basic-auth decoder (the key as user name); no extra crate.
mod base64_basic {
    pub fn decode(s: &str) -> Option<String> {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut buf = 0u32;
        let mut bits = 0;
        for c in s.trim().bytes().filter(|c| *c != b'=') {
            let v = T.iter().position(|t| *t == c)? as u32;
            buf = (buf << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((buf >> bits) as u8);
                buf &= (1 << bits) - 1;
            }
        }
        String::from_utf8(out).ok()
    }
}

fn account_json(id: &str, a: &Account) -> Value {
    json!({
        "id": id, "object": "account", "type": "express",
        "capabilities": {"transfers": a.transfers},
        "charges_enabled": a.transfers == "active",
        "payouts_enabled": a.transfers == "active",
        "details_submitted": a.transfers == "active",
        "metadata": {},
    })
}

fn reverse_in(st: &mut Inner, id: &str, amount: Option<i64>) -> Result<Value, Answer> {
    st.next += 1;
    let n = st.next;
    let Some(t) = st.transfers.iter_mut().find(|t| t["id"] == id) else {
        return Err(Answer::new(
            404,
            error_body(
                "invalid_request_error",
                Some("resource_missing"),
                &format!("No such transfer: '{id}'"),
                Some("id"),
            ),
        ));
    };
    let total = t["amount"].as_i64().unwrap_or(0);
    let done = t["amount_reversed"].as_i64().unwrap_or(0);
    let amount = amount.unwrap_or(total - done);
    if amount <= 0 || done + amount > total {
        return Err(Answer::new(
            400,
            error_body(
                "invalid_request_error",
                None,
                &format!(
                    "Refund amount ({amount}) is greater than unrefunded amount on transfer ({})",
                    total - done
                ),
                Some("amount"),
            ),
        ));
    }
    let reversal = json!({
        "id": format!("trr_standin{n}"), "object": "transfer_reversal", "amount": amount,
        "balance_transaction": format!("txn_standin{n}"), "created": unix_now(),
        "currency": t["currency"], "destination_payment_refund": format!("pyr_standin{n}"),
        "metadata": {}, "source_refund": null, "transfer": id,
    });
    t["amount_reversed"] = json!(done + amount);
    // `reversed`: "Whether the transfer has been fully reversed" (spec3, transfer).
    t["reversed"] = json!(done + amount == total);
    t["reversals"]["data"]
        .as_array_mut()
        .expect("list")
        .insert(0, reversal);
    t["reversals"]["total_count"] = json!(t["reversals"]["data"].as_array().map_or(0, Vec::len));
    let currency = t["currency"].as_str().unwrap_or_default().to_string();
    let destination = t["destination"].as_str().unwrap_or_default().to_string();
    let t = t.clone();
    *st.balance.entry(currency.clone()).or_default() += amount;
    if let Some(a) = st.accounts.get_mut(&destination) {
        *a.balance.entry(currency).or_default() -= amount;
    }
    Ok(t)
}

fn form(body: &[u8]) -> Result<Vec<(String, String)>, Answer> {
    serde_urlencoded::from_bytes(body).map_err(|_| {
        Answer::new(
            400,
            error_body(
                "invalid_request_error",
                None,
                "Invalid request body: expected application/x-www-form-urlencoded",
                None,
            ),
        )
    })
}

fn query(raw: Option<String>) -> Result<Vec<(String, String)>, Answer> {
    form(raw.unwrap_or_default().as_bytes())
}

fn refuse_unknown(params: &[(String, String)], allowed: &[&str]) -> Result<(), Answer> {
    match unknown_param(params, allowed) {
        Some(p) => Err(Answer::new(
            400,
            error_body(
                "invalid_request_error",
                Some("parameter_unknown"),
                &format!("Received unknown parameter: {p}"),
                Some(p),
            ),
        )),
        None => Ok(()),
    }
}

fn saved_error(code: &str, message: &str, param: Option<&str>) -> Answer {
    // A refusal made while executing: saved for the key; Stripe says a
    // retry of the same request will not help.
    Answer::new(
        400,
        error_body("invalid_request_error", Some(code), message, param),
    )
    .header("Stripe-Should-Retry", "false")
}

/// spec3 `PostTransfers` form parameters.
const TRANSFER_CREATE_PARAMS: &[&str] = &[
    "amount",
    "currency",
    "description",
    "destination",
    "expand",
    "metadata",
    "source_transaction",
    "source_type",
    "transfer_group",
];

/// Validation (nothing saved): parameters the definition does not have,
/// required ones missing, types, and currency rules.
fn validate_transfer(params: &[(String, String)]) -> Result<(i64, String, String), Answer> {
    refuse_unknown(params, TRANSFER_CREATE_PARAMS)?;
    let invalid = |code: &str, msg: String, p: &str| {
        Answer::new(
            400,
            error_body("invalid_request_error", Some(code), &msg, Some(p)),
        )
    };
    let currency = param(params, "currency")
        .ok_or_else(|| {
            invalid(
                "parameter_missing",
                "Missing required param: currency.".into(),
                "currency",
            )
        })?
        .to_string();
    let destination = param(params, "destination")
        .ok_or_else(|| {
            invalid(
                "parameter_missing",
                "Missing required param: destination.".into(),
                "destination",
            )
        })?
        .to_string();
    let raw = param(params, "amount").ok_or_else(|| {
        invalid(
            "parameter_missing",
            "Missing required param: amount.".into(),
            "amount",
        )
    })?;
    let amount: i64 = raw.parse().ok().filter(|a| *a > 0).ok_or_else(|| {
        invalid(
            "parameter_invalid_integer",
            format!("Invalid integer: {raw}"),
            "amount",
        )
    })?;
    let Some(exp) = stripe_exponent(&currency) else {
        return Err(Answer::new(
            400,
            error_body(
                "invalid_request_error",
                None,
                &format!(
                    "Invalid currency: {currency}. Stripe currently supports these currencies: usd, eur, ..."
                ),
                Some("currency"),
            ),
        ));
    };
    // https://docs.stripe.com/currencies#special-cases (ISK: divisible by 100)
    // and #three-decimal (last digit 0).
    if currency == "isk" && amount % 100 != 0 {
        return Err(invalid(
            "amount_invalid",
            "ISK amounts must be evenly divisible by 100 (Stripe represents ISK as a two-decimal currency).".into(),
            "amount",
        ));
    }
    if exp == 3 && amount % 10 != 0 {
        return Err(invalid(
            "amount_invalid",
            format!(
                "{} amounts must end in 0 (the last digit of a three-decimal currency amount must be 0).",
                currency.to_uppercase()
            ),
            "amount",
        ));
    }
    Ok((amount, currency, destination))
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn create_transfer(State(s): State<StandIn>, headers: HeaderMap, body: Bytes) -> Response {
    let key = header_str(&headers, "idempotency-key");
    let (answer, events) = {
        let mut st = s.inner();
        let params = match form(&body) {
            Ok(p) => p,
            Err(a) => {
                s.record(&mut st, "POST", "/v1/transfers", &headers, Vec::new(), &a);
                return a.into_response("req_standin");
            }
        };
        let (answer, events) = create_in(&s, &mut st, &headers, key.as_deref(), &params);
        s.record(&mut st, "POST", "/v1/transfers", &headers, params, &answer);
        (answer, events)
    };
    for (kind, object) in events {
        let s = s.clone();
        tokio::spawn(async move {
            let _ = s.emit(false, &kind, object, None).await;
        });
    }
    answer.into_response("req_standin")
}

fn create_in(
    s: &StandIn,
    st: &mut Inner,
    headers: &HeaderMap,
    key: Option<&str>,
    params: &[(String, String)],
) -> (Answer, Vec<(String, Value)>) {
    let auth = match s.gate(st, headers, "POST /v1/transfers") {
        Ok(a) => a,
        Err(a) => return (a, Vec::new()),
    };
    if let Auth::ReadOnly(k) = auth {
        return (
            Answer::new(
                403,
                error_body(
                    "invalid_request_error",
                    None,
                    &format!(
                        "The provided key '{}' does not have the required permissions for this endpoint on account '{PLATFORM_ACCOUNT}'. Having the 'rak_transfer_write' permission would allow this request to continue.",
                        mask(&k)
                    ),
                    None,
                ),
            ),
            Vec::new(),
        );
    }
    // The idempotency layer: a saved answer is replayed, whatever its status,
    // if the parameters are the same; other parameters are an error.
    let mut sorted = params.to_vec();
    sorted.sort();
    if let Some(k) = key {
        if let Some(saved) = st.idem.get(k).cloned() {
            if saved.path != "/v1/transfers" || saved.params != sorted {
                return (
                    Answer::new(
                        400,
                        error_body(
                            "idempotency_error",
                            None,
                            &format!(
                                "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{k}' if you meant to execute a different request."
                            ),
                            None,
                        ),
                    ),
                    Vec::new(),
                );
            }
            let mut a = Answer::new(saved.status, saved.body);
            a.headers = saved.headers;
            a.headers.retain(|(h, _)| h != "Stripe-Should-Retry");
            a.headers
                .push(("Idempotent-Replayed".into(), "true".into()));
            if saved.status >= 400 {
                // A replayed failure stays a failure: retrying the key cannot help.
                a.headers
                    .push(("Stripe-Should-Retry".into(), "false".into()));
            }
            a.replayed = true;
            return (a, Vec::new());
        }
    }
    // Validation: refused before execution, nothing saved.
    let (amount, currency, destination) = match validate_transfer(params) {
        Ok(v) => v,
        Err(a) => return (a, Vec::new()),
    };
    let fault = st.faults.pop_front();
    if let Some(Fault::Unsaved {
        status,
        code,
        should_retry,
    }) = &fault
    {
        let mut a = Answer::new(
            *status,
            error_body(
                "invalid_request_error",
                Some(code),
                &format!("stand-in fault: {code}"),
                None,
            ),
        );
        if let Some(r) = should_retry {
            a = a.header("Stripe-Should-Retry", if *r { "true" } else { "false" });
        }
        return (a, Vec::new());
    }
    // Execution begins: from here on the answer is saved for the key.
    let mut events = Vec::new();
    let answer = execute_transfer(
        st,
        amount,
        &currency,
        &destination,
        params,
        fault.as_ref(),
        &mut events,
    );
    if let Some(k) = key {
        st.idem.insert(
            k.to_string(),
            Saved {
                path: "/v1/transfers".into(),
                params: sorted,
                status: answer.status,
                headers: answer.headers.clone(),
                body: answer.body.clone(),
            },
        );
    }
    (answer, events)
}

fn execute_transfer(
    st: &mut Inner,
    amount: i64,
    currency: &str,
    destination: &str,
    params: &[(String, String)],
    fault: Option<&Fault>,
    events: &mut Vec<(String, Value)>,
) -> Answer {
    let server_error = || {
        Answer::new(
            500,
            error_body("api_error", None, "An unknown error occurred", None),
        )
    };
    if fault == Some(&Fault::ServerErrorBeforeCreate) {
        return server_error();
    }
    let Some(acct) = st.accounts.get(destination) else {
        return saved_error(
            "resource_missing",
            &format!("No such destination: '{destination}'"),
            Some("destination"),
        );
    };
    if acct.transfers_not_allowed {
        return saved_error(
            "transfers_not_allowed",
            "The requested transfer cannot be created. Contact us for more information.",
            None,
        );
    }
    if acct.transfers != "active" {
        return saved_error(
            "insufficient_capabilities_for_transfer",
            "Your destination account needs to have at least one of the following capabilities enabled: transfers, crypto_transfers, legacy_payments",
            Some("destination"),
        );
    }
    let available = st.balance.get(currency).copied().unwrap_or(0);
    if available < amount {
        return saved_error(
            "balance_insufficient",
            "You have insufficient available funds in your Stripe account. Try adding funds directly to your available balance by creating Charges using the 4000000000000077 test card. See: https://stripe.com/docs/testing#available-balance",
            None,
        );
    }
    st.next += 1;
    let n = st.next;
    let id = format!("tr_standin{n}");
    let transfer = json!({
        "id": id, "object": "transfer", "amount": amount, "amount_reversed": 0,
        "balance_transaction": format!("txn_standin{n}"), "created": unix_now(),
        "currency": currency, "description": param(params, "description"),
        "destination": destination, "destination_payment": format!("py_standin{n}"),
        "livemode": st.cfg.secret_keys.first().is_some_and(|k| live(k)),
        "metadata": metadata(params),
        "reversals": {"object": "list", "data": [], "has_more": false, "total_count": 0,
            "url": format!("/v1/transfers/{id}/reversals")},
        "reversed": false, "source_transaction": param(params, "source_transaction"),
        "source_type": param(params, "source_type").unwrap_or("card"),
        "transfer_group": param(params, "transfer_group"),
    });
    *st.balance.entry(currency.to_string()).or_default() -= amount;
    if let Some(a) = st.accounts.get_mut(destination) {
        *a.balance.entry(currency.to_string()).or_default() += amount;
    }
    st.transfers.push(transfer.clone());
    events.push(("transfer.created".into(), transfer.clone()));
    if fault == Some(&Fault::ServerErrorAfterCreate) {
        return server_error();
    }
    Answer::new(200, transfer)
}

async fn list_transfers(
    State(s): State<StandIn>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let mut st = s.inner();
    let params = query(raw).unwrap_or_default();
    let a = (|| {
        s.gate(&mut st, &headers, "GET /v1/transfers")?;
        // spec3 `GetTransfers` query parameters.
        refuse_unknown(
            &params,
            &[
                "created",
                "destination",
                "ending_before",
                "expand",
                "limit",
                "starting_after",
                "transfer_group",
            ],
        )?;
        let limit = match param(&params, "limit") {
            None => 10,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=100).contains(l))
                .ok_or_else(|| {
                    Answer::new(
                        400,
                        error_body(
                            "invalid_request_error",
                            Some("parameter_invalid_integer"),
                            "This value must be between 1 and 100 (it currently is too large).",
                            Some("limit"),
                        ),
                    )
                })?,
        };
        let group = param(&params, "transfer_group");
        let dest = param(&params, "destination");
        let all: Vec<Value> = st
            .transfers
            .iter()
            .rev()
            .filter(|t| group.is_none_or(|g| t["transfer_group"] == g))
            .filter(|t| dest.is_none_or(|d| t["destination"] == d))
            .cloned()
            .collect();
        let has_more = all.len() > limit;
        let data: Vec<Value> = all.into_iter().take(limit).collect();
        Ok::<_, Answer>(Answer::new(
            200,
            json!({"object": "list", "url": "/v1/transfers", "has_more": has_more, "data": data}),
        ))
    })()
    .unwrap_or_else(|a| a);
    s.record(&mut st, "GET", "/v1/transfers", &headers, params, &a);
    a.into_response("req_standin")
}

async fn get_transfer(
    State(s): State<StandIn>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let mut st = s.inner();
    let params = query(raw).unwrap_or_default();
    let a = (|| {
        s.gate(&mut st, &headers, "GET /v1/transfers/{id}")?;
        refuse_unknown(&params, &["expand"])?;
        st.transfers
            .iter()
            .find(|t| t["id"] == id.as_str())
            .map(|t| Answer::new(200, t.clone()))
            .ok_or_else(|| {
                Answer::new(
                    404,
                    error_body(
                        "invalid_request_error",
                        Some("resource_missing"),
                        &format!("No such transfer: '{id}'"),
                        Some("id"),
                    ),
                )
            })
    })()
    .unwrap_or_else(|a| a);
    let path = format!("/v1/transfers/{id}");
    s.record(&mut st, "GET", &path, &headers, params, &a);
    a.into_response("req_standin")
}

async fn reverse_transfer(
    State(s): State<StandIn>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (a, reversed) = {
        let mut st = s.inner();
        let params = form(&body).unwrap_or_default();
        let r = (|| {
            if let Auth::ReadOnly(_) =
                s.gate(&mut st, &headers, "POST /v1/transfers/{id}/reversals")?
            {
                return Err(Answer::new(
                    403,
                    error_body(
                        "invalid_request_error",
                        None,
                        "The provided key does not have the required permissions for this endpoint.",
                        None,
                    ),
                ));
            }
            // spec3 `PostTransfersIdReversals` form parameters.
            refuse_unknown(
                &params,
                &[
                    "amount",
                    "description",
                    "expand",
                    "metadata",
                    "refund_application_fee",
                ],
            )?;
            let amount = match param(&params, "amount") {
                None => None,
                Some(a) => Some(a.parse::<i64>().map_err(|_| {
                    Answer::new(
                        400,
                        error_body(
                            "invalid_request_error",
                            Some("parameter_invalid_integer"),
                            &format!("Invalid integer: {a}"),
                            Some("amount"),
                        ),
                    )
                })?),
            };
            let t = reverse_in(&mut st, &id, amount)?;
            let reversal = t["reversals"]["data"][0].clone();
            Ok((Answer::new(200, reversal), t))
        })();
        let path = format!("/v1/transfers/{id}/reversals");
        match r {
            Ok((a, t)) => {
                s.record(&mut st, "POST", &path, &headers, params, &a);
                (a, Some(t))
            }
            Err(a) => {
                s.record(&mut st, "POST", &path, &headers, params, &a);
                (a, None)
            }
        }
    };
    if let Some(t) = reversed {
        let s = s.clone();
        tokio::spawn(async move {
            let _ = s.emit(false, "transfer.reversed", t, None).await;
        });
    }
    a.into_response("req_standin")
}

async fn get_account(
    State(s): State<StandIn>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let mut st = s.inner();
    let params = query(raw).unwrap_or_default();
    let a = (|| {
        s.gate(&mut st, &headers, "GET /v1/accounts/{id}")?;
        refuse_unknown(&params, &["expand"])?;
        st.accounts
            .get(&id)
            .map(|a| Answer::new(200, account_json(&id, a)))
            .ok_or_else(|| {
                // Stripe answers an account the platform cannot see like this.
                Answer::new(
                    403,
                    error_body(
                        "invalid_request_error",
                        Some("account_invalid"),
                        "The provided key does not have access to account (or that account does not exist). Application access may have been revoked.",
                        None,
                    ),
                )
            })
    })()
    .unwrap_or_else(|a| a);
    let path = format!("/v1/accounts/{id}");
    s.record(&mut st, "GET", &path, &headers, params, &a);
    a.into_response("req_standin")
}

// --- control surface --------------------------------------------------------

#[derive(Deserialize)]
struct BalanceBody {
    currency: String,
    amount: i64,
}

async fn ctl_balance(State(s): State<StandIn>, Json(b): Json<BalanceBody>) -> Response {
    s.set_balance(&b.currency, b.amount);
    Json(json!({"currency": b.currency.to_ascii_lowercase(), "available": s.balance(&b.currency)}))
        .into_response()
}

#[derive(Deserialize)]
struct AccountBody {
    id: String,
    #[serde(default = "active")]
    transfers: String,
    #[serde(default)]
    transfers_not_allowed: bool,
}

fn active() -> String {
    "active".into()
}

async fn ctl_account(State(s): State<StandIn>, Json(b): Json<AccountBody>) -> Response {
    let delivered = s
        .set_account(&b.id, &b.transfers, b.transfers_not_allowed)
        .await;
    Json(json!({"id": b.id, "transfers": b.transfers, "account_updated_delivery": delivered}))
        .into_response()
}

async fn ctl_fault(State(s): State<StandIn>, Json(f): Json<Fault>) -> Response {
    s.push_fault(f);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct EventBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    account: Option<String>,
    object: Value,
}

async fn ctl_event(State(s): State<StandIn>, Json(e): Json<EventBody>) -> Response {
    let connect = e.account.is_some();
    match s
        .emit(connect, &e.kind, e.object, e.account.as_deref())
        .await
    {
        Ok(status) => Json(json!({"delivered": status})).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    }
}

async fn ctl_forget(State(s): State<StandIn>) -> Response {
    s.forget_keys();
    StatusCode::NO_CONTENT.into_response()
}

/// Stand-in only: every transfer made, reversed ones included (the demo's
/// ledger check; Stripe has no such endpoint).
async fn ctl_transfers(State(s): State<StandIn>) -> Response {
    Json(Value::Array(s.transfers())).into_response()
}

async fn ctl_requests(State(s): State<StandIn>, method: Method) -> Response {
    let _ = method;
    let seen: Vec<Value> = s
        .seen()
        .into_iter()
        .map(|r| {
            json!({"method": r.method, "path": r.path, "idempotency_key": r.idempotency_key,
                "status": r.status, "replayed": r.replayed})
        })
        .collect();
    Json(json!({ "data": seen })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_parameters_are_named_and_nested_ones_count_by_their_top_level_name() {
        let p = |k: &str| vec![(k.to_string(), "x".to_string())];
        assert_eq!(
            unknown_param(&p("metadata[payout_id]"), TRANSFER_CREATE_PARAMS),
            None
        );
        assert_eq!(unknown_param(&p("expand[]"), TRANSFER_CREATE_PARAMS), None);
        assert_eq!(
            unknown_param(&p("reference"), TRANSFER_CREATE_PARAMS),
            Some("reference")
        );
    }

    #[test]
    fn the_signature_is_stripes_documented_scheme() {
        // Stripe's own vector (stripe-dotnet EventUtilityTest): secret
        // `webhook_secret`, t = 1533204620, payload tests/fixtures/stripe/event_test_signature.json.
        let payload = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/stripe/event_test_signature.json"
        ))
        .unwrap();
        assert_eq!(
            stripe_signature("webhook_secret", 1_533_204_620, &payload),
            "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7"
        );
        assert_eq!(
            base64_basic::decode("c2tfdGVzdF94Og==").as_deref(),
            Some("sk_test_x:")
        );
    }
}

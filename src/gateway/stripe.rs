//! Stripe Connect adapter: pays a payee by creating a
//! [transfer](https://docs.stripe.com/api/transfers/create) to their
//! connected account.
//!
//! The wire format is Stripe's own: `POST {base}/v1/transfers`, form-encoded
//! (`amount` in minor units, lower-case `currency`, `destination`,
//! `transfer_group` = the payout's reference, `metadata[payout_id]`), with
//! `Authorization: Bearer sk_…`, `Idempotency-Key` and a pinned
//! `Stripe-Version`. Errors come back as
//! `{"error":{"type","code","decline_code","message",…}}` and are mapped to
//! the fleet's [`Outcome`]s by [`classify_stripe`].
//!
//! **The key chain, and the rule that keeps it honest.** Stripe saves the
//! status and body of the first request for an idempotency key once the
//! endpoint begins executing, *whatever the status* (a 400 such as
//! `balance_insufficient` or a 500 included), and replays it for 24 h at
//! least (<https://docs.stripe.com/api/idempotent_requests>). So a payout
//! owns a numbered chain of keys (`payout_42`, `payout_42-1`, …) and its
//! position, `payouts.key_index`, is **stored with the payout** (the claim
//! returns it, the worker's final write stores the new one); it is never
//! derived from anything Stripe reports (such as a count of reversed
//! transfers). The rule:
//!
//! > *The key is the same for every retry that could have moved money.* It
//! > advances only after an answer that proves no transfer was made under
//! > it: a 4xx refusal made while executing (saved, so Stripe would replay
//! > it: `balance_insufficient`, a capability refusal, `transfers_not_allowed`,
//! > `resource_missing`, a validation error), or a stored 5xx
//! > (`Idempotent-Replayed` / `Stripe-Should-Retry: false`) after a look-up
//! > by `transfer_group` found no standing transfer.
//!
//! Nothing else advances it: not a timeout, a fresh 5xx, a 401/403 (refused
//! before the idempotency layer), a 429, a 409 (a concurrent request with
//! the key may still be executing) or an `idempotency_error`. A replayed 2xx
//! is checked (`GET /v1/transfers/{id}`) before it is believed: the replay
//! carries the body of the day it was made, and a transfer reversed in full
//! since then is not a payment; its key then proves nothing stands under it
//! and the chain moves on (an operator who retries a reversed payout pays
//! it again, on purpose, under a new key). With `lookup_before_create` (the
//! default) every call after a payout's first claim starts with the look-up,
//! which also covers a retry after Stripe has forgotten a key (24 h).
//!
//! **Every request is rate-limited** ([`crate::gateway::RequestLimiter`]):
//! transfer POSTs, look-ups, reads of a transfer and account checks alike,
//! by default below Stripe's limits (see [`crate::gateway::effective_rate`]).
//!
//! A created transfer is [`Outcome::Paid`]: the funds are in the connected
//! account's Stripe balance at once. A later `transfer.reversed` (or a
//! `payout.failed` of a payout tagged with `metadata[payout_id]`) reaches the
//! fleet by webhook (`crate::admin::webhooks`) and turns the payout `failed`, with an
//! alert.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use reqwest::{StatusCode, header::HeaderMap};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use std::sync::{Arc, RwLock};

use super::{
    Gateway, Keyed, Lookup, LookupError, Outcome, RejectReason, RequestLimiter, TransferRecord,
    TransferRequest, TransientKind,
    guard::{LocalLimiter, limits},
    stripe_currency,
};
use crate::config::{GatewaySettings, StripeSettings};

/// Whether the configured key is a live-mode key (`sk_live_…`, `rk_live_…`).
pub fn is_live_key(s: &StripeSettings) -> bool {
    let k = s.secret_key.expose_secret();
    k.starts_with("sk_live_") || k.starts_with("rk_live_")
}

/// How many idempotency keys one payout may use before the adapter gives up
/// for this call (each new key only after a look-up found no transfer).
pub const MAX_KEYS: usize = 8;

/// Stripe's bank-payout failure codes (`payout.failure_code`,
/// <https://docs.stripe.com/api/payouts/failures>). They are not answers to
/// `POST /v1/transfers`: they arrive on a connected account's `payout.failed`
/// event. Should one ever come back from a transfer, it is permanent with the
/// code kept.
pub const PAYEE_FAILURE_CODES: &[&str] = &[
    "account_closed",
    "account_frozen",
    "bank_account_restricted",
    "bank_ownership_changed",
    "could_not_process",
    "debit_not_authorized",
    "declined",
    "incorrect_account_holder_address",
    "incorrect_account_holder_name",
    "incorrect_account_holder_tax_id",
    "invalid_account_number",
    "invalid_currency",
    "no_account",
    "unsupported_card",
    "account_number_invalid",
    "bank_account_unusable",
];

/// Codes that mean the *platform's* balance cannot cover the transfer
/// (`balance_insufficient`; `insufficient_funds` is the payout twin). Not
/// the payee's fault: retried later on the long schedule under the next key
/// (see [`classify_stripe`]).
pub const PLATFORM_BALANCE_CODES: &[&str] = &["balance_insufficient", "insufficient_funds"];

/// Codes that mean the connected account cannot receive transfers *yet*
/// (its `transfers` capability is not active: onboarding not finished):
/// recorded as `account_not_onboarded` and held. Not `transfers_not_allowed`
/// ("The requested transfer cannot be created. Contact us for more
/// information.", <https://docs.stripe.com/error-codes>): that is no
/// onboarding step a payee can finish, so it fails with its code.
pub const NOT_ONBOARDED_CODES: &[&str] = &["insufficient_capabilities_for_transfer"];

/// The Stripe Connect client.
#[derive(Clone)]
pub struct StripeGateway {
    client: reqwest::Client,
    transfers_url: String,
    secret: SecretString,
    version: String,
    lookup_before_create: bool,
    /// What every request waits for: in-process until [`Gateway::use_limiter`]
    /// hands it the fleet-wide one.
    limiter: Arc<RwLock<Arc<dyn RequestLimiter>>>,
}

impl std::fmt::Debug for StripeGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeGateway")
            .field("transfers_url", &self.transfers_url)
            .field("stripe_version", &self.version)
            .field("lookup_before_create", &self.lookup_before_create)
            .finish_non_exhaustive()
    }
}

/// A transfer object as Stripe returns it (the fields the fleet reads).
#[derive(Debug, Clone, Deserialize)]
pub struct StripeTransfer {
    /// `tr_…`.
    pub id: String,
    /// Minor units.
    #[serde(default)]
    pub amount: i64,
    /// How much of it was reversed, in minor units.
    #[serde(default)]
    pub amount_reversed: i64,
    /// Lower-case ISO code.
    #[serde(default)]
    pub currency: String,
    /// The connected account (`acct_…`).
    #[serde(default)]
    pub destination: Option<String>,
    /// The payout's reference (`payout_<id>`).
    #[serde(default)]
    pub transfer_group: Option<String>,
    /// Whether it was reversed (in full or in part).
    #[serde(default)]
    pub reversed: bool,
    /// String metadata (`payout_id`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl StripeTransfer {
    /// Reversed in full: the money went back to the platform.
    pub fn fully_reversed(&self) -> bool {
        self.amount > 0 && self.amount_reversed >= self.amount
    }

    /// As the fleet's [`TransferRecord`]: `failed` when fully reversed, else `paid`.
    pub fn to_record(&self, reference: &str) -> TransferRecord {
        TransferRecord {
            id: self.id.clone(),
            status: if self.fully_reversed() {
                "failed".into()
            } else {
                "paid".into()
            },
            amount_minor: self.amount,
            currency: self.currency.to_ascii_uppercase(),
            destination: self.destination.clone().unwrap_or_default(),
            reference: self
                .transfer_group
                .clone()
                .unwrap_or_else(|| reference.to_string()),
        }
    }
}

#[derive(Deserialize)]
struct TransferList {
    data: Vec<StripeTransfer>,
}

/// Stripe's error object (`{"error":{…}}`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StripeError {
    /// `api_error`, `card_error`, `idempotency_error`, `invalid_request_error`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The error code, when Stripe gives one.
    #[serde(default)]
    pub code: Option<String>,
    /// For declines: the issuer's reason.
    #[serde(default)]
    pub decline_code: Option<String>,
    /// Human-readable detail.
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: StripeError,
}

/// The headers of a Stripe answer that change what it means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StripeHeaders {
    /// `Stripe-Should-Retry`: Stripe's own advice, when given.
    pub should_retry: Option<bool>,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<Duration>,
    /// `Idempotent-Replayed: true`: this is the stored answer of an earlier request.
    pub replayed: bool,
}

impl StripeHeaders {
    /// Reads them from a response's headers.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        StripeHeaders {
            should_retry: get("stripe-should-retry").and_then(|v| match v {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            }),
            retry_after: get("retry-after")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs),
            replayed: get("idempotent-replayed") == Some("true"),
        }
    }
}

/// The form body Stripe expects for a transfer (`application/x-www-form-urlencoded`).
pub fn transfer_form(req: &TransferRequest) -> Vec<(String, String)> {
    let mut form = vec![
        ("amount".to_string(), req.amount_minor.to_string()),
        ("currency".to_string(), req.currency.to_ascii_lowercase()),
        ("destination".to_string(), req.destination.clone()),
        ("transfer_group".to_string(), req.reference.clone()),
    ];
    for (k, v) in &req.metadata {
        form.push((format!("metadata[{k}]"), v.clone()));
    }
    if !req.metadata.contains_key("payout_id") {
        if let Some(id) = req.reference.strip_prefix("payout_") {
            form.push(("metadata[payout_id]".to_string(), id.to_string()));
        }
    }
    form
}

/// The `n`-th idempotency key of a payout's chain: the fleet's key itself,
/// then `{key}-1`, `{key}-2`, … (the same for every worker).
pub fn chain_key(key: &str, n: usize) -> String {
    if n == 0 {
        key.to_string()
    } else {
        format!("{key}-{n}")
    }
}

/// Whether an answer is a stored 5xx that retrying the same key would only
/// replay: a new key is needed (after a look-up).
pub fn is_poisoned(status: StatusCode, headers: &StripeHeaders) -> bool {
    status.is_server_error() && (headers.replayed || headers.should_retry == Some(false))
}

fn label(e: &StripeError, status: StatusCode) -> String {
    e.code
        .clone()
        .or_else(|| e.decline_code.clone())
        .filter(|c| !c.is_empty())
        .or_else(|| (!e.kind.is_empty()).then(|| e.kind.clone()))
        .unwrap_or_else(|| format!("http_{}", status.as_u16()))
}

/// Maps one Stripe answer to an outcome. `Stripe-Should-Retry` comes first,
/// both ways (<https://docs.stripe.com/error-low-level#server-errors>);
/// credentials next; then the status and code.
///
/// - 2xx with a transfer object: [`Outcome::Paid`] (the funds are in the
///   connected account's balance).
/// - 401: transient `unauthorized`; 403 (a restricted key without the
///   permission): transient `forbidden`. Both pause the whole fleet
///   ([`Outcome::pauses_fleet`]); no payee is failed for a platform problem.
/// - `Stripe-Should-Retry: true`: transient, same key, code kept.
/// - `Stripe-Should-Retry: false` on a 5xx: transient `http_5xx` (a stored
///   5xx: the caller looks up and moves to the next key, see
///   [`is_poisoned`]); on a 4xx: never retried under the same key: the
///   codes below that have their own meaning keep it (the platform balance
///   is retried later under the *next* key), every other code is permanent.
/// - 5xx: transient `http_5xx`; 429 (`rate_limit`): transient `rate_limited`
///   with Retry-After (the fleet pauses); `lock_timeout`: transient.
/// - 409 (any, `idempotency_key_in_use` included): transient, as Stripe's
///   SDKs retry every 409.
/// - `balance_insufficient` / `insufficient_funds`: **transient**, code
///   kept. The platform's balance is short, not the payee at fault; the
///   saved 400 proves nothing was transferred, so the next attempt uses the
///   next key and pays once the balance is topped up.
/// - The connected account's `transfers` capability is not active:
///   permanent `account_not_onboarded` (the worker holds the payout).
/// - `idempotency_error`: permanent `idempotency_conflict`; every other
///   4xx: permanent with Stripe's code kept.
pub fn classify_stripe(status: StatusCode, headers: &StripeHeaders, body: &[u8]) -> Outcome {
    if status.is_success() {
        return match serde_json::from_slice::<StripeTransfer>(body) {
            Ok(t) if !t.id.is_empty() => Outcome::Paid { transfer_id: t.id },
            _ => Outcome::Unknown {
                message: "stripe answered 2xx with an unreadable transfer".into(),
            },
        };
    }
    let err = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error)
        .unwrap_or_default();
    let mut code = label(&err, status);
    if status.as_u16() == 429 && code != "lock_timeout" {
        code = "rate_limited".into();
    }
    let message = match &err.message {
        Some(m) if !err.kind.is_empty() => format!("stripe {}: {m}", err.kind),
        Some(m) => format!("stripe: {m}"),
        None => format!("stripe answered {}", status.as_u16()),
    };
    let s = status.as_u16();
    let transient = |code: String| Outcome::transient(code, message.clone(), headers.retry_after);
    if s == 401 || s == 403 {
        let kind = if s == 401 {
            TransientKind::Unauthorized
        } else {
            TransientKind::Forbidden
        };
        return Outcome::Transient {
            kind,
            message: format!(
                "{message} (the platform's Stripe key was refused: the fleet pauses; no payout fails for it)"
            ),
            retry_after: None,
        };
    }
    if headers.should_retry == Some(true) {
        return transient(code);
    }
    if status.is_server_error() {
        return transient(format!("http_{s}"));
    }
    if err.kind == "api_connection_error" {
        return transient("connect".into());
    }
    let not_onboarded = NOT_ONBOARDED_CODES.contains(&code.as_str());
    if PLATFORM_BALANCE_CODES.contains(&code.as_str()) {
        return Outcome::transient(
            code,
            format!(
                "{message} (the platform's Stripe balance is short; retried later under a new key)"
            ),
            None,
        );
    }
    if not_onboarded {
        return Outcome::Rejected {
            reason: RejectReason::NotOnboarded,
            message: format!(
                "the payee's Stripe account cannot receive transfers yet (onboarding not finished; stripe code {code}): {message}"
            ),
        };
    }
    if err.kind == "idempotency_error" {
        return Outcome::rejected("idempotency_conflict", message);
    }
    if headers.should_retry == Some(false) {
        // Stripe says a retry of this request cannot succeed.
        return Outcome::rejected(code, message);
    }
    if s == 429 {
        return transient(code);
    }
    if err.code.as_deref() == Some("lock_timeout") || s == 409 {
        return transient(code);
    }
    if status.is_client_error() {
        return Outcome::rejected(code, message);
    }
    Outcome::Unknown {
        message: format!("stripe answered unexpected status {s}"),
    }
}

/// Whether an error answer proves that no transfer was made under its key,
/// so the chain may move on: a 4xx Stripe made while executing or
/// validating. Not a 401/403 (refused before the idempotency layer), a 409
/// (a concurrent request with the key may still be executing), a 429, an
/// `idempotency_error` (the key holds another request's answer), or anything
/// Stripe says to retry as it is.
pub fn proves_nothing_made(status: StatusCode, headers: &StripeHeaders, body: &[u8]) -> bool {
    let kind = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error.kind)
        .unwrap_or_default();
    status.is_client_error()
        && ![401, 403, 409, 429].contains(&status.as_u16())
        && kind != "idempotency_error"
        && headers.should_retry != Some(true)
}

impl StripeGateway {
    /// A client for `settings.stripe`, with the fleet's timeouts.
    pub fn new(settings: &GatewaySettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .user_agent(concat!("payouts/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let s = &settings.stripe;
        let local: Arc<dyn RequestLimiter> = Arc::new(LocalLimiter::new(limits(settings)));
        Ok(StripeGateway {
            client,
            transfers_url: format!("{}/v1/transfers", s.base_url.trim_end_matches('/')),
            secret: s.secret_key.clone(),
            version: s.stripe_version.clone(),
            lookup_before_create: s.lookup_before_create,
            limiter: Arc::new(RwLock::new(local)),
        })
    }

    /// Waits for the rate limit of `endpoint`.
    async fn acquire(&self, endpoint: &str) {
        let limiter = self.limiter.read().expect("limiter lock").clone();
        limiter.acquire(endpoint).await;
    }

    async fn post(&self, req: &TransferRequest, key: &str) -> Result<super::Answer, Outcome> {
        let body =
            serde_urlencoded::to_string(transfer_form(req)).map_err(|e| Outcome::Rejected {
                reason: RejectReason::Gateway("invalid_request".into()),
                message: format!("transfer could not be form-encoded: {e}"),
            })?;
        let request = self
            .client
            .post(&self.transfers_url)
            .bearer_auth(self.secret.expose_secret())
            .header("Stripe-Version", &self.version)
            .header("Idempotency-Key", key)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        self.acquire("POST /v1/transfers").await;
        super::send_transfer(request, "stripe").await
    }

    /// The transfer `id` as Stripe holds it now (`GET /v1/transfers/{id}`).
    pub async fn get_transfer(&self, id: &str) -> Result<StripeTransfer, LookupError> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(LookupError(format!("{id:?} is not a Stripe transfer id")));
        }
        self.acquire("GET /v1/transfers/{id}").await;
        let resp = self
            .client
            .get(format!("{}/{id}", self.transfers_url))
            .bearer_auth(self.secret.expose_secret())
            .header("Stripe-Version", &self.version)
            .send()
            .await
            .map_err(|_| LookupError("request to stripe failed".into()))?;
        if !resp.status().is_success() {
            return Err(LookupError(format!("stripe answered {}", resp.status())));
        }
        resp.json::<StripeTransfer>()
            .await
            .map_err(|_| LookupError("unreadable transfer from stripe".into()))
    }

    /// Whether connected account `account` can receive transfers now
    /// (`GET /v1/accounts/{id}`: its `transfers` capability is `active`).
    pub async fn account_ready(&self, account: &str) -> Result<bool, LookupError> {
        if account.is_empty()
            || !account
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(LookupError(format!(
                "{account:?} is not a Stripe account id"
            )));
        }
        let base = self.transfers_url.trim_end_matches("/transfers");
        self.acquire("GET /v1/accounts/{id}").await;
        let resp = self
            .client
            .get(format!("{base}/accounts/{account}"))
            .bearer_auth(self.secret.expose_secret())
            .header("Stripe-Version", &self.version)
            .send()
            .await
            .map_err(|_| LookupError("request to stripe failed".into()))?;
        if !resp.status().is_success() {
            return Err(LookupError(format!("stripe answered {}", resp.status())));
        }
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|_| LookupError("unreadable account from stripe".into()))?;
        Ok(v.pointer("/capabilities/transfers")
            .and_then(|c| c.as_str())
            == Some("active"))
    }

    /// Every transfer Stripe holds with `transfer_group = reference`.
    pub async fn find(&self, reference: &str) -> Result<Vec<StripeTransfer>, LookupError> {
        self.acquire("GET /v1/transfers").await;
        let resp = self
            .client
            .get(&self.transfers_url)
            .query(&[("transfer_group", reference), ("limit", "100")])
            .bearer_auth(self.secret.expose_secret())
            .header("Stripe-Version", &self.version)
            .send()
            .await
            .map_err(|e| {
                LookupError(if e.is_timeout() {
                    "stripe timed out".into()
                } else {
                    "request to stripe failed".into()
                })
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            let code = serde_json::from_slice::<ErrorEnvelope>(&body)
                .ok()
                .map(|e| label(&e.error, status))
                .unwrap_or_else(|| format!("http_{}", status.as_u16()));
            return Err(LookupError(format!("stripe answered {status} ({code})")));
        }
        let list = resp
            .json::<TransferList>()
            .await
            .map_err(|_| LookupError("unreadable transfer list from stripe".into()))?;
        Ok(list
            .data
            .into_iter()
            .filter(|t| t.transfer_group.as_deref() == Some(reference))
            .collect())
    }
}

/// The transfer that still stands among `transfers` (not reversed in full).
fn standing(transfers: &[StripeTransfer]) -> Option<&StripeTransfer> {
    transfers.iter().find(|t| !t.fully_reversed())
}

fn lookup_failed(e: LookupError) -> Outcome {
    Outcome::Transient {
        kind: TransientKind::Other("lookup_failed".into()),
        message: format!("could not check stripe for an earlier transfer: {}", e.0),
        retry_after: None,
    }
}

#[async_trait]
impl crate::gateway::AccountCheck for StripeGateway {
    async fn account_ready(&self, account: &str) -> Result<bool, LookupError> {
        StripeGateway::account_ready(self, account).await
    }
}

#[async_trait]
impl Lookup for StripeGateway {
    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError> {
        Ok(self
            .find(reference)
            .await?
            .iter()
            .map(|t| t.to_record(reference))
            .collect())
    }

    fn limits_own_requests(&self) -> bool {
        true
    }

    fn use_limiter(&self, limiter: Arc<dyn RequestLimiter>) {
        *self.limiter.write().expect("limiter lock") = limiter;
    }
}

#[async_trait]
impl Gateway for StripeGateway {
    async fn transfer(&self, req: &TransferRequest) -> Outcome {
        self.transfer_keyed(req).await.outcome
    }

    async fn transfer_keyed(&self, req: &TransferRequest) -> Keyed {
        let mut n = req.key_index as usize;
        let done = |outcome: Outcome, n: usize| Keyed {
            outcome,
            key_index: n as u32,
        };
        // On a payout's first claim nothing was posted for it before: no
        // look-up (a repeated call reuses the key; a key poisoned by a
        // stored 5xx is looked up below).
        if self.lookup_before_create && !req.first_attempt {
            match self.find(&req.reference).await {
                Ok(ts) => {
                    if let Some(t) = standing(&ts) {
                        tracing::info!(transfer_id = %t.id, "stripe already holds a transfer for this payout");
                        return done(
                            Outcome::Paid {
                                transfer_id: t.id.clone(),
                            },
                            n,
                        );
                    }
                }
                Err(e) => return done(lookup_failed(e), n),
            }
        }
        for _ in 0..MAX_KEYS {
            let key = chain_key(&req.idempotency_key, n);
            let (status, headers, body) = match self.post(req, &key).await {
                Ok(a) => (a.status, StripeHeaders::from_headers(&a.headers), a.body),
                // No answer: the money may have moved under this key; keep it.
                Err(outcome) => return done(outcome, n),
            };
            if status.is_success() && headers.replayed {
                // A replay carries the transfer as it was when made: believe
                // it only if the transfer still stands.
                let Ok(t) = serde_json::from_slice::<StripeTransfer>(&body) else {
                    return done(classify_stripe(status, &headers, &body), n);
                };
                match self.get_transfer(&t.id).await {
                    Ok(now) if now.fully_reversed() => {
                        tracing::warn!(key, transfer_id = %t.id, "stripe replays a transfer that was reversed in full; moving to the next key");
                        n += 1;
                        continue;
                    }
                    Ok(_) => return done(Outcome::Paid { transfer_id: t.id }, n),
                    Err(e) => return done(lookup_failed(e), n),
                }
            }
            if is_poisoned(status, &headers) {
                // The key holds a stored 5xx. The money may have moved before
                // it: look before using a new key, so a lost answer never pays twice.
                match self.find(&req.reference).await {
                    Ok(ts) => {
                        if let Some(t) = standing(&ts) {
                            return done(
                                Outcome::Paid {
                                    transfer_id: t.id.clone(),
                                },
                                n,
                            );
                        }
                    }
                    Err(e) => return done(lookup_failed(e), n),
                }
                tracing::warn!(
                    key,
                    next = n + 1,
                    "stripe replays a stored 5xx for this key and holds no transfer; moving to the next key"
                );
                n += 1;
                continue;
            }
            let outcome = classify_stripe(status, &headers, &body);
            if proves_nothing_made(status, &headers, &body) {
                // Saved (or refused before anything was made): the next call
                // must use the next key, or it would only get this answer again.
                n += 1;
            }
            return done(outcome, n);
        }
        done(
            Outcome::Transient {
                kind: TransientKind::Other("idempotency_keys_exhausted".into()),
                message: format!(
                    "stripe answered a stored 5xx or a reversed transfer for {MAX_KEYS} keys in a row"
                ),
                retry_after: None,
            },
            n,
        )
    }

    fn minor_units(&self, money: &crate::domain::Money) -> Result<i64, super::AmountError> {
        Ok(stripe_currency::stripe_minor_units(money)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(should_retry: Option<bool>) -> StripeHeaders {
        StripeHeaders {
            should_retry,
            ..Default::default()
        }
    }

    fn err(kind: &str, code: Option<&str>) -> Vec<u8> {
        serde_json::json!({"error": {"type": kind, "code": code, "message": "m"}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_form_is_what_stripe_expects() {
        let req = TransferRequest {
            amount_minor: 12345,
            currency: "USD".into(),
            destination: "acct_1".into(),
            reference: "payout_42".into(),
            metadata: [("payout_id".to_string(), "42".to_string())].into(),
            idempotency_key: "payout_42".into(),
            key_index: 0,
            first_attempt: false,
        };
        let body = serde_urlencoded::to_string(transfer_form(&req)).unwrap();
        assert_eq!(
            body,
            "amount=12345&currency=usd&destination=acct_1&transfer_group=payout_42&metadata%5Bpayout_id%5D=42"
        );
    }

    #[test]
    fn insufficient_platform_balance_is_retried_later_not_a_payee_failure() {
        let o = classify_stripe(
            StatusCode::BAD_REQUEST,
            &h(None),
            &err("invalid_request_error", Some("balance_insufficient")),
        );
        assert!(
            matches!(&o, Outcome::Transient { kind, .. } if kind.code() == "balance_insufficient"),
            "{o:?}"
        );
    }

    #[test]
    fn payee_failure_codes_are_permanent_with_the_code_kept() {
        for code in PAYEE_FAILURE_CODES {
            let o = classify_stripe(
                StatusCode::BAD_REQUEST,
                &h(Some(false)),
                &err("invalid_request_error", Some(code)),
            );
            assert!(
                matches!(&o, Outcome::Rejected { reason, .. } if reason.code() == *code),
                "{o:?}"
            );
        }
    }

    #[test]
    fn a_stored_500_poisons_the_key_but_a_fresh_one_does_not() {
        assert!(is_poisoned(
            StatusCode::INTERNAL_SERVER_ERROR,
            &h(Some(false))
        ));
        assert!(!is_poisoned(StatusCode::INTERNAL_SERVER_ERROR, &h(None)));
        assert!(!is_poisoned(StatusCode::BAD_REQUEST, &h(Some(false))));
        assert_eq!(chain_key("payout_7", 0), "payout_7");
        assert_eq!(chain_key("payout_7", 2), "payout_7-2");
    }

    #[test]
    fn should_retry_true_makes_a_conflict_transient() {
        let o = classify_stripe(
            StatusCode::CONFLICT,
            &h(Some(true)),
            &err("invalid_request_error", Some("idempotency_key_in_use")),
        );
        assert!(o.is_retryable(), "{o:?}");
        let o = classify_stripe(
            StatusCode::BAD_REQUEST,
            &h(None),
            &err("idempotency_error", None),
        );
        assert!(
            matches!(&o, Outcome::Rejected { reason, .. } if reason.code() == "idempotency_conflict")
        );
    }
}

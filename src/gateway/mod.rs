//! Payment gateways: the [`Gateway`] trait the worker calls, its one outcome
//! type, the HTTP contract client, and the in-attempt backoff.

pub mod backoff;
pub mod guard;
pub mod http;
pub mod release_funds;
pub mod select;
pub mod stripe;
pub mod stripe_currency;

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use serde::Serialize;

/// The metadata key of the payout's id (every transfer has it).
pub const PAYOUT_ID: &str = "payout_id";
/// The metadata key of the external reference (the booking) of the one
/// earning a `per_earning` payout pays: the release-funds API's `bookingId`.
pub const EXTERNAL_REF: &str = "external_ref";

/// A transfer's metadata: the payout's id and, when it has one, the
/// external reference of the earning it pays.
pub fn transfer_metadata(
    payout_id: crate::domain::PayoutId,
    external_ref: Option<&str>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([(PAYOUT_ID.to_string(), payout_id.to_string())]);
    if let Some(r) = external_ref {
        m.insert(EXTERNAL_REF.to_string(), r.to_string());
    }
    m
}

/// One transfer, in the gateway's terms (integer minor units).
#[derive(Debug, Clone, Serialize)]
pub struct TransferRequest {
    /// Amount in minor units (cents; yen).
    pub amount_minor: i64,
    /// ISO 4217, upper case.
    pub currency: String,
    /// The payee's gateway account.
    pub destination: String,
    /// The fleet's payout id, for reconciliation.
    pub reference: String,
    /// String metadata.
    pub metadata: BTreeMap<String, String>,
    /// Stable for one payout across all attempts. Sent as a header, not in the body.
    /// The base of the payout's key chain (see [`TransferRequest::key_index`]).
    #[serde(skip)]
    pub idempotency_key: String,
    /// The payout's position in its idempotency-key chain, as stored with the
    /// payout (`payouts.key_index`): an adapter whose gateway keeps the first
    /// answer of a key (Stripe) sends `{idempotency_key}-{key_index}` (the
    /// bare key at 0) and says, with [`Gateway::transfer_keyed`], when the
    /// gateway proved that no transfer was made under it. Gateways whose key
    /// never changes ignore it.
    #[serde(skip)]
    pub key_index: u32,
    /// The payout's first claim: no earlier attempt can have posted anything
    /// for it, so an adapter may skip looking for an earlier transfer (the
    /// attempt number only grows, so every later claim is `false`).
    #[serde(skip)]
    pub first_attempt: bool,
}

/// Why a gateway refused a transfer for good ([`Outcome::Rejected`]). The
/// codes the fleet acts on are variants; every other code the gateway gave
/// is kept as [`RejectReason::Gateway`]. [`RejectReason::code`] is the string
/// stored as the payout's failure code and shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// The payee's account cannot receive money yet ([`NOT_ONBOARDED`]): the
    /// worker holds the payout instead of failing it.
    NotOnboarded,
    /// The gateway refused the fleet's credentials for good (`unauthorized`):
    /// counts against the circuit breaker.
    Unauthorized,
    /// Any other code, as the gateway gave it (e.g. `account_closed`).
    Gateway(String),
}

impl RejectReason {
    /// The reason a gateway's `code` names: a known code becomes its
    /// variant, so `RejectReason::from_code(r.code())` is `r`.
    pub fn from_code(code: impl Into<String>) -> Self {
        let code = code.into();
        match code.as_str() {
            NOT_ONBOARDED => RejectReason::NotOnboarded,
            UNAUTHORIZED => RejectReason::Unauthorized,
            _ => RejectReason::Gateway(code),
        }
    }

    /// The code (stored as the payout's failure code).
    pub fn code(&self) -> &str {
        match self {
            RejectReason::NotOnboarded => NOT_ONBOARDED,
            RejectReason::Unauthorized => UNAUTHORIZED,
            RejectReason::Gateway(code) => code,
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// What kind of passing failure a call met ([`Outcome::Transient`]). The
/// kinds the fleet acts on are variants; every other code is kept as
/// [`TransientKind::Other`]. [`TransientKind::code`] is the string stored
/// with the payout's retry and used as a metrics label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransientKind {
    /// The connection was refused: nothing was sent (`connect`).
    Connect,
    /// The gateway rate-limited us (`rate_limited`): the fleet pauses for
    /// its Retry-After; not a failure of the gateway.
    RateLimited,
    /// An HTTP status worth retrying, as `http_<status>` (`http_503`).
    Http(u16),
    /// The fleet's circuit breaker is open: nothing was sent
    /// ([`guard::CIRCUIT_OPEN`]).
    CircuitOpen,
    /// The worker's lease was too short to start the call: nothing was sent
    /// ([`LEASE_SHORT`]).
    LeaseShort,
    /// The gateway refused the fleet's secret ([`UNAUTHORIZED`]): the fleet pauses.
    Unauthorized,
    /// The secret lacks a permission ([`FORBIDDEN`]): the fleet pauses.
    Forbidden,
    /// The platform's balance cannot cover transfers
    /// ([`PLATFORM_BALANCE_INSUFFICIENT`]): the fleet pauses.
    PlatformBalance,
    /// Any other code (e.g. Stripe's `lock_timeout`, `lookup_failed`).
    Other(String),
}

impl TransientKind {
    /// The kind `code` names: a known code becomes its variant, so
    /// `TransientKind::from_code(k.code())` is `k`.
    pub fn from_code(code: impl Into<String>) -> Self {
        let code = code.into();
        match code.as_str() {
            "connect" => TransientKind::Connect,
            "rate_limited" => TransientKind::RateLimited,
            guard::CIRCUIT_OPEN => TransientKind::CircuitOpen,
            LEASE_SHORT => TransientKind::LeaseShort,
            UNAUTHORIZED => TransientKind::Unauthorized,
            FORBIDDEN => TransientKind::Forbidden,
            PLATFORM_BALANCE_INSUFFICIENT => TransientKind::PlatformBalance,
            c => match c.strip_prefix("http_").and_then(|n| n.parse::<u16>().ok()) {
                // Only the canonical spelling: the code must read back the same.
                Some(status) if format!("http_{status}") == c => TransientKind::Http(status),
                _ => TransientKind::Other(code),
            },
        }
    }

    /// The code (stored with the payout, a metrics label).
    pub fn code(&self) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        match self {
            TransientKind::Connect => Cow::Borrowed("connect"),
            TransientKind::RateLimited => Cow::Borrowed("rate_limited"),
            TransientKind::Http(status) => Cow::Owned(format!("http_{status}")),
            TransientKind::CircuitOpen => Cow::Borrowed(guard::CIRCUIT_OPEN),
            TransientKind::LeaseShort => Cow::Borrowed(LEASE_SHORT),
            TransientKind::Unauthorized => Cow::Borrowed(UNAUTHORIZED),
            TransientKind::Forbidden => Cow::Borrowed(FORBIDDEN),
            TransientKind::PlatformBalance => Cow::Borrowed(PLATFORM_BALANCE_INSUFFICIENT),
            TransientKind::Other(code) => Cow::Borrowed(code),
        }
    }

    /// A problem of the platform, not of the payee (see [`Outcome::pauses_fleet`]).
    pub fn is_platform_problem(&self) -> bool {
        matches!(
            self,
            TransientKind::Unauthorized | TransientKind::Forbidden | TransientKind::PlatformBalance
        )
    }
}

impl std::fmt::Display for TransientKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.code())
    }
}

/// What a gateway call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Money moved; final.
    Paid {
        /// The gateway's transfer id.
        transfer_id: String,
    },
    /// Accepted; money in flight, final word by webhook or look-up.
    InTransit {
        /// The gateway's transfer id.
        transfer_id: String,
    },
    /// Permanent: do not retry.
    Rejected {
        /// Why (its code, e.g. `account_closed`, is stored).
        reason: RejectReason,
        /// Its message.
        message: String,
    },
    /// Transient: retry with the same key, no sooner than `retry_after` if given.
    Transient {
        /// Class (its code, e.g. `http_503`, `rate_limited`, `connect`, is stored).
        kind: TransientKind,
        /// Detail.
        message: String,
        /// The gateway's Retry-After.
        retry_after: Option<Duration>,
    },
    /// No answer (timeout, reset): the money may or may not have moved; retry with the same key.
    Unknown {
        /// Detail.
        message: String,
    },
}

impl Outcome {
    /// A permanent refusal with the gateway's `code` (a known code becomes
    /// its [`RejectReason`] variant).
    pub fn rejected(code: impl Into<String>, message: impl Into<String>) -> Self {
        Outcome::Rejected {
            reason: RejectReason::from_code(code),
            message: message.into(),
        }
    }

    /// A passing failure with `code` (a known code becomes its
    /// [`TransientKind`] variant).
    pub fn transient(
        code: impl Into<String>,
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        Outcome::Transient {
            kind: TransientKind::from_code(code),
            message: message.into(),
            retry_after,
        }
    }

    /// Worth another call with the same key.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Outcome::Transient { .. } | Outcome::Unknown { .. })
    }

    /// A bounded label for metrics. `transient` is any other answer worth
    /// retrying (a Stripe `lock_timeout`, the platform's balance short), not
    /// a failure of the gateway itself.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Paid { .. } | Outcome::InTransit { .. } => "2xx",
            Outcome::Rejected { .. } => "4xx",
            Outcome::Transient { kind, .. } => match kind {
                TransientKind::RateLimited => "429",
                // `http_5…`: every status whose digits start with 5.
                TransientKind::Http(status) if status.to_string().starts_with('5') => "5xx",
                TransientKind::Connect => "connect",
                _ => "transient",
            },
            Outcome::Unknown { .. } => "timeout",
        }
    }

    /// Whether the fleet's own guard answered, without calling the gateway
    /// (an open circuit): not a gateway request.
    pub fn is_guard_refusal(&self) -> bool {
        matches!(
            self,
            Outcome::Transient {
                kind: TransientKind::CircuitOpen,
                ..
            }
        )
    }

    /// Whether the worker refused to start the call: its lease on the payout
    /// had less than the call margin left (`crate::lease::LeaseGated`).
    /// Nothing was sent; the attempt ends without another call.
    pub fn is_lease_refusal(&self) -> bool {
        matches!(
            self,
            Outcome::Transient {
                kind: TransientKind::LeaseShort,
                ..
            }
        )
    }

    /// A problem of the platform, not of the payee (the gateway refused our
    /// credentials, or the platform's balance cannot cover transfers): the
    /// whole fleet pauses and an alert fires; no payout fails for it and the
    /// attempt does not count against its budget.
    pub fn pauses_fleet(&self) -> bool {
        matches!(self, Outcome::Transient { kind, .. } if kind.is_platform_problem())
    }
}

/// The code of a call the worker did not start because its lease was short
/// ([`Outcome::is_lease_refusal`]).
pub const LEASE_SHORT: &str = "lease_short";
/// The gateway refused the fleet's secret (401: expired, rolled, revoked).
pub const UNAUTHORIZED: &str = "unauthorized";
/// The secret lacks a permission (403 from a restricted key).
pub const FORBIDDEN: &str = "forbidden";
/// The platform's own balance at the gateway cannot cover transfers (the
/// release-funds API's 402 `insufficient_platform_balance`). The
/// release-funds client answers `Outcome::Transient` with this code.
pub const PLATFORM_BALANCE_INSUFFICIENT: &str = "platform_balance_insufficient";
/// Codes of [`Outcome::Transient`] that pause the fleet (see [`Outcome::pauses_fleet`]).
pub const PLATFORM_PROBLEMS: [&str; 3] = [UNAUTHORIZED, FORBIDDEN, PLATFORM_BALANCE_INSUFFICIENT];

/// What a transfer call came to, and the position of the payout's key chain
/// the next call must use (the same unless the gateway proved that nothing
/// was transferred under the current key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    /// The outcome.
    pub outcome: Outcome,
    /// The key index for the next call (and to store with the payout).
    pub key_index: u32,
}

/// Why an amount cannot be sent through a gateway ([`Gateway::minor_units`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not an amount of its currency (ISO 4217 minor units).
    #[error(transparent)]
    Money(#[from] crate::domain::MoneyError),
    /// Stripe counts the currency differently and the amount breaks its rule.
    #[error(transparent)]
    Stripe(#[from] stripe_currency::StripeAmountError),
}

/// Something every HTTP request to a gateway waits for (a rate limit).
#[async_trait]
pub trait RequestLimiter: Send + Sync + std::fmt::Debug {
    /// Waits until one request to `endpoint` (`"POST /v1/transfers"`) may go.
    async fn acquire(&self, endpoint: &str);
}

/// A transfer as the gateway reports it (look-ups, reconciliation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TransferRecord {
    /// The gateway's id.
    pub id: String,
    /// `paid`, `pending`, `failed`, ...
    pub status: String,
    /// Minor units.
    pub amount_minor: i64,
    /// ISO 4217.
    pub currency: String,
    /// The payee's account.
    pub destination: String,
    /// The fleet's reference (`payout_<id>`).
    pub reference: String,
}

/// Why a look-up gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gateway look-up failed: {0}")]
pub struct LookupError(pub String);

/// The look-up half of a gateway: what the fleet may ask without paying
/// (the producer's in-transit poll, reconciliation, the cancel check). The
/// producer, sync and reconciliation hold only this; only the worker holds a
/// [`Gateway`], which pays.
#[async_trait]
pub trait Lookup: Send + Sync + std::fmt::Debug {
    /// Every transfer the gateway holds for `reference` (reconciliation).
    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError>;

    /// Whether the client rate-limits each of its own HTTP requests (then a
    /// guard in front of it only honours fleet pauses).
    fn limits_own_requests(&self) -> bool {
        false
    }

    /// Makes every HTTP request of this client wait for `limiter` (the
    /// fleet-wide limit) instead of its own in-process one.
    fn use_limiter(&self, _limiter: std::sync::Arc<dyn RequestLimiter>) {}
}

/// A payment gateway: the half that moves money (and, as a [`Lookup`], the
/// half that asks).
#[async_trait]
pub trait Gateway: Lookup {
    /// One call: POST the transfer with its idempotency key.
    async fn transfer(&self, req: &TransferRequest) -> Outcome;

    /// [`Gateway::transfer`], and the key index the next call must use.
    /// Gateways whose key never changes keep this default.
    async fn transfer_keyed(&self, req: &TransferRequest) -> Keyed {
        Keyed {
            outcome: self.transfer(req).await,
            key_index: req.key_index,
        }
    }

    /// `money` in the integer minor units this gateway counts (ISO 4217 by
    /// default; Stripe differs, see [`stripe_currency`]); `Err` names why it
    /// cannot be sent.
    fn minor_units(&self, money: &crate::domain::Money) -> Result<i64, AmountError> {
        Ok(money.to_minor_units()?)
    }
}

/// A gateway that can tell whether a payee's account can receive money now.
#[async_trait]
pub trait AccountCheck: Send + Sync + std::fmt::Debug {
    /// `true` once `account` can be paid (e.g. Stripe onboarding finished).
    async fn account_ready(&self, account: &str) -> Result<bool, LookupError>;
}

/// The failure code of a payout whose payee cannot receive money yet (the
/// payout is `held` until the account is ready).
pub const NOT_ONBOARDED: &str = "account_not_onboarded";

/// The rate a fleet keeps to with `settings`: the configured
/// `gateway.rate_limit_per_sec`, or for `kind = "stripe"` when it is 0, below
/// Stripe's own limits (<https://docs.stripe.com/rate-limits>: 25 requests per
/// second in test mode, 100 in live mode): 20 with a test key, 80 with a live one.
pub fn effective_rate(settings: &crate::config::GatewaySettings) -> u32 {
    if settings.kind == crate::config::GatewayKind::Stripe && settings.rate_limit_per_sec == 0 {
        if stripe::is_live_key(&settings.stripe) {
            80
        } else {
            20
        }
    } else {
        settings.rate_limit_per_sec
    }
}

/// An HTTP answer to a transfer request: its status, its `Retry-After` (in
/// seconds) and its body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: reqwest::StatusCode,
    pub retry_after: Option<Duration>,
    pub headers: reqwest::header::HeaderMap,
    pub body: axum::body::Bytes,
}

/// Sends a transfer request to `who` (a name for messages) and reads the
/// whole answer, or says what a transport failure means for the money: a
/// refused connection sent nothing (transient); a timeout or a cut-off answer
/// may have moved it (unknown). Messages never carry the request (or its
/// credentials).
pub(crate) async fn send_transfer(
    req: reqwest::RequestBuilder,
    who: &str,
) -> Result<Answer, Outcome> {
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => {
            return Err(Outcome::Transient {
                kind: TransientKind::Connect,
                message: format!("connection to {who} failed"),
                retry_after: None,
            });
        }
        Err(e) if e.is_timeout() => {
            return Err(Outcome::Unknown {
                message: format!("{who} timed out"),
            });
        }
        Err(_) => {
            return Err(Outcome::Unknown {
                message: format!("request to {who} failed"),
            });
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match resp.bytes().await {
        Ok(body) => Ok(Answer {
            status,
            retry_after,
            headers,
            body,
        }),
        Err(e) if e.is_timeout() => Err(Outcome::Unknown {
            message: format!("{who} timed out reading the answer"),
        }),
        Err(_) => Err(Outcome::Unknown {
            message: format!("{who}'s answer was cut off"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(code: &str) -> Outcome {
        Outcome::transient(code, "", None)
    }

    #[test]
    fn only_a_refused_connection_is_a_connect_error_and_an_open_circuit_is_no_request() {
        assert_eq!(transient("connect").class(), "connect");
        assert_eq!(transient("lock_timeout").class(), "transient");
        assert_eq!(transient("http_503").class(), "5xx");
        assert!(transient(guard::CIRCUIT_OPEN).is_guard_refusal());
        assert!(!transient("connect").is_guard_refusal());
    }

    #[test]
    fn codes_read_back_as_they_were_given() {
        for code in [
            "connect",
            "rate_limited",
            "http_503",
            "http_400",
            "http_0503",
            "http_5x",
            guard::CIRCUIT_OPEN,
            LEASE_SHORT,
            UNAUTHORIZED,
            FORBIDDEN,
            PLATFORM_BALANCE_INSUFFICIENT,
            "lock_timeout",
        ] {
            assert_eq!(TransientKind::from_code(code).code(), code);
        }
        assert_eq!(
            TransientKind::from_code("http_503"),
            TransientKind::Http(503)
        );
        assert_eq!(
            TransientKind::from_code("http_0503"),
            TransientKind::Other("http_0503".into())
        );
        for code in [NOT_ONBOARDED, UNAUTHORIZED, "account_closed"] {
            assert_eq!(RejectReason::from_code(code).code(), code);
        }
        assert_eq!(
            RejectReason::from_code(NOT_ONBOARDED),
            RejectReason::NotOnboarded
        );
    }

    #[test]
    fn the_metrics_class_and_the_fleet_pause_follow_the_kind() {
        assert_eq!(transient("rate_limited").class(), "429");
        assert_eq!(transient("http_599").class(), "5xx");
        assert_eq!(transient("http_429").class(), "transient");
        assert_eq!(Outcome::rejected("account_closed", "").class(), "4xx");
        for code in PLATFORM_PROBLEMS {
            assert!(transient(code).pauses_fleet(), "{code}");
        }
        assert!(!transient("balance_insufficient").pauses_fleet());
        assert!(transient(LEASE_SHORT).is_lease_refusal());
    }
}

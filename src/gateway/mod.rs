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
pub fn transfer_metadata(payout_id: i64, external_ref: Option<&str>) -> BTreeMap<String, String> {
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
        /// The gateway's error code (e.g. `account_closed`).
        code: String,
        /// Its message.
        message: String,
    },
    /// Transient: retry with the same key, no sooner than `retry_after` if given.
    Transient {
        /// Class (e.g. `http_503`, `rate_limited`, `connect`).
        code: String,
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
            Outcome::Transient { code, .. } if code == "rate_limited" => "429",
            Outcome::Transient { code, .. } if code.starts_with("http_5") => "5xx",
            Outcome::Transient { code, .. } if code == "connect" => "connect",
            Outcome::Transient { .. } => "transient",
            Outcome::Unknown { .. } => "timeout",
        }
    }

    /// Whether the fleet's own guard answered, without calling the gateway
    /// (an open circuit): not a gateway request.
    pub fn is_guard_refusal(&self) -> bool {
        matches!(self, Outcome::Transient { code, .. } if code == crate::gateway::guard::CIRCUIT_OPEN)
    }

    /// Whether the worker refused to start the call: its lease on the payout
    /// had less than the call margin left (`crate::lease::LeaseGated`).
    /// Nothing was sent; the attempt ends without another call.
    pub fn is_lease_refusal(&self) -> bool {
        matches!(self, Outcome::Transient { code, .. } if code == LEASE_SHORT)
    }

    /// A problem of the platform, not of the payee (the gateway refused our
    /// credentials, or the platform's balance cannot cover transfers): the
    /// whole fleet pauses and an alert fires; no payout fails for it and the
    /// attempt does not count against its budget.
    pub fn pauses_fleet(&self) -> bool {
        matches!(self, Outcome::Transient { code, .. } if PLATFORM_PROBLEMS.contains(&code.as_str()))
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
    fn minor_units(&self, money: &crate::domain::Money) -> Result<i64, String> {
        money.to_minor_units().map_err(|e| e.to_string())
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
                code: "connect".into(),
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
        Outcome::Transient {
            code: code.into(),
            message: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn only_a_refused_connection_is_a_connect_error_and_an_open_circuit_is_no_request() {
        assert_eq!(transient("connect").class(), "connect");
        assert_eq!(transient("lock_timeout").class(), "transient");
        assert_eq!(transient("http_503").class(), "5xx");
        assert!(transient(guard::CIRCUIT_OPEN).is_guard_refusal());
        assert!(!transient("connect").is_guard_refusal());
    }
}

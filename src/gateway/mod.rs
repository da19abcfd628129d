//! Payment gateways: the [`Gateway`] trait the worker calls, its one outcome
//! type, the HTTP contract client, and the in-attempt backoff.

pub mod backoff;
pub mod guard;
pub mod http;
pub mod mock;
pub mod release_funds;
pub mod select;
pub mod stripe;

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use serde::Serialize;

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
    #[serde(skip)]
    pub idempotency_key: String,
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

    /// A bounded label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Outcome::Paid { .. } | Outcome::InTransit { .. } => "2xx",
            Outcome::Rejected { .. } => "4xx",
            Outcome::Transient { code, .. } if code == "rate_limited" => "429",
            Outcome::Transient { code, .. } if code.starts_with("http_5") => "5xx",
            Outcome::Transient { .. } => "connect",
            Outcome::Unknown { .. } => "timeout",
        }
    }
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

/// A payment gateway.
#[async_trait]
pub trait Gateway: Send + Sync + std::fmt::Debug {
    /// One call: POST the transfer with its idempotency key.
    async fn transfer(&self, req: &TransferRequest) -> Outcome;

    /// Every transfer the gateway holds for `reference` (reconciliation).
    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError>;
}

//! The HTTP client for the generic gateway contract
//! (`shared/gateway-contract.md`): bearer secret, Idempotency-Key, timeouts,
//! and the mapping of answers to [`Outcome`]s.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{
    Gateway, Lookup, LookupError, Outcome, RejectReason, TransferRecord, TransferRequest,
    TransientKind,
};
use crate::config::GatewaySettings;

/// The contract client.
#[derive(Clone)]
pub struct HttpGateway {
    client: reqwest::Client,
    transfers_url: String,
    secret: SecretString,
}

impl std::fmt::Debug for HttpGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpGateway")
            .field("transfers_url", &self.transfers_url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TransferBody {
    id: String,
    status: String,
}

#[derive(Deserialize)]
struct TransferList {
    data: Vec<TransferRecord>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

impl HttpGateway {
    /// A client for `settings.base_url`.
    pub fn new(settings: &GatewaySettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()?;
        Ok(HttpGateway {
            client,
            transfers_url: format!("{}/v1/transfers", settings.base_url.trim_end_matches('/')),
            secret: settings.secret.clone(),
        })
    }
}

#[async_trait]
impl Lookup for HttpGateway {
    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError> {
        let resp = self
            .client
            .get(&self.transfers_url)
            .query(&[("reference", reference)])
            .bearer_auth(self.secret.expose_secret())
            .send()
            .await
            .map_err(|e| {
                LookupError(if e.is_timeout() {
                    "timed out".into()
                } else {
                    "request failed".into()
                })
            })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(LookupError(format!("gateway answered {status}")));
        }
        resp.json::<TransferList>()
            .await
            .map(|l| l.data)
            .map_err(|_| LookupError("unreadable look-up answer".into()))
    }
}

#[async_trait]
impl Gateway for HttpGateway {
    async fn transfer(&self, req: &TransferRequest) -> Outcome {
        let req_builder = self
            .client
            .post(&self.transfers_url)
            .bearer_auth(self.secret.expose_secret())
            .header("Idempotency-Key", &req.idempotency_key)
            .json(req);
        match super::send_transfer(req_builder, "the gateway").await {
            Ok(a) => classify(a.status, a.retry_after, &a.body),
            Err(outcome) => outcome,
        }
    }
}

/// Maps one answer to an outcome, per the contract's table.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    let error = || {
        serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .map(|b| b.error)
    };
    match status.as_u16() {
        200 | 201 => match serde_json::from_slice::<TransferBody>(body) {
            Ok(t) if t.status == "paid" => Outcome::Paid { transfer_id: t.id },
            Ok(t) if t.status == "pending" => Outcome::InTransit { transfer_id: t.id },
            Ok(t) => Outcome::Unknown {
                message: format!("gateway answered unknown transfer status {:?}", t.status),
            },
            Err(_) => Outcome::Unknown {
                message: "gateway answered 2xx with an unreadable body".into(),
            },
        },
        429 => Outcome::Transient {
            kind: TransientKind::RateLimited,
            message: "gateway rate limited the request".into(),
            retry_after,
        },
        401 => Outcome::Rejected {
            reason: RejectReason::Unauthorized,
            message: "gateway refused the secret".into(),
        },
        409 => {
            let e = error();
            Outcome::rejected(
                e.as_ref()
                    .map(|e| e.code.clone())
                    .unwrap_or_else(|| "idempotency_conflict".into()),
                e.map(|e| e.message).unwrap_or_default(),
            )
        }
        400 | 402 | 403 | 404 | 422 => {
            let e = error();
            Outcome::rejected(
                e.as_ref()
                    .map(|e| e.code.clone())
                    .unwrap_or_else(|| format!("http_{}", status.as_u16())),
                e.map(|e| e.message).unwrap_or_default(),
            )
        }
        s if s >= 500 => Outcome::Transient {
            kind: TransientKind::Http(s),
            message: format!("gateway answered {s}"),
            retry_after,
        },
        s => Outcome::Unknown {
            message: format!("gateway answered unexpected status {s}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_table_maps_to_outcomes() {
        let ok = br#"{"id":"tr_1","status":"paid"}"#;
        assert_eq!(
            classify(StatusCode::OK, None, ok),
            Outcome::Paid {
                transfer_id: "tr_1".into()
            }
        );
        let pending = br#"{"id":"tr_2","status":"pending"}"#;
        assert_eq!(
            classify(StatusCode::CREATED, None, pending),
            Outcome::InTransit {
                transfer_id: "tr_2".into()
            }
        );
        let closed = br#"{"error":{"code":"account_closed","message":"closed"}}"#;
        assert!(
            matches!(classify(StatusCode::UNPROCESSABLE_ENTITY, None, closed),
            Outcome::Rejected { reason, .. } if reason.code() == "account_closed")
        );
        assert!(matches!(classify(StatusCode::CONFLICT, None, b"{}"),
            Outcome::Rejected { reason, .. } if reason.code() == "idempotency_conflict"));
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, None, b""),
            Outcome::Rejected {
                reason: RejectReason::Unauthorized,
                ..
            }
        ));
        assert_eq!(
            classify(
                StatusCode::TOO_MANY_REQUESTS,
                Some(Duration::from_secs(3)),
                b""
            ),
            Outcome::Transient {
                kind: TransientKind::RateLimited,
                message: "gateway rate limited the request".into(),
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, None, b"").is_retryable());
        assert!(classify(StatusCode::OK, None, b"garbage").is_retryable());
    }
}

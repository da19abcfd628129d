//! The platform "release funds" adapter: the payment API the booking worker
//! of the product documents calls, `POST {PaymentAPI.BaseUrl}{ReleaseFundsEndpoint}`
//! (`/api/Payment/release-funds`), JSON, amounts in cents.
//!
//! Request (camelCase, as an ASP.NET API binds it):
//!
//! ```json
//! {"bookingId":"payout_42","driverStripeAccountId":"acct_123","amount":12345,
//!  "currency":"usd","reference":"payout_42"}
//! ```
//!
//! `bookingId` is the payout's `booking_id` metadata when it has one, else its
//! reference. Headers: `Idempotency-Key` (the fleet's key, stable across
//! attempts) and `Authorization: Bearer …` when a secret is configured.
//!
//! Answers are mapped by HTTP status through `gateway.release_funds.status_map`
//! (`paid`, `in_transit`, `permanent`, `transient`, `unknown`); a status not
//! in the map follows the contract's rules: 2xx by the body's `status`
//! (`paid`/`succeeded`/`released`/`completed` → paid, `pending`/`processing`/
//! `in_transit` → in transit, none → paid), 5xx transient, anything else
//! unknown. Error bodies are read leniently: `{"error":{"code","message"}}`,
//! `{"code","message"}`, `{"error":"…"}` or ASP.NET's ProblemDetails
//! (`{"title","detail","status"}`).

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{Gateway, LookupError, Outcome, TransferRecord, TransferRequest};
use crate::config::GatewaySettings;

/// The release-funds client.
#[derive(Clone)]
pub struct ReleaseFundsGateway {
    client: reqwest::Client,
    url: String,
    lookup_url: Option<String>,
    secret: Option<SecretString>,
    status_map: BTreeMap<u16, String>,
}

impl std::fmt::Debug for ReleaseFundsGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseFundsGateway")
            .field("url", &self.url)
            .field("lookup_url", &self.lookup_url)
            .field("status_map", &self.status_map)
            .finish_non_exhaustive()
    }
}

/// The JSON body of one release.
pub fn release_body(req: &TransferRequest) -> Value {
    let booking = req
        .metadata
        .get("booking_id")
        .cloned()
        .unwrap_or_else(|| req.reference.clone());
    serde_json::json!({
        "bookingId": booking,
        "driverStripeAccountId": req.destination,
        "amount": req.amount_minor,
        "currency": req.currency.to_ascii_lowercase(),
        "reference": req.reference,
    })
}

fn str_field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| v.get(*n).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
}

/// `(code, message)` of an error body, whatever its shape.
fn error_of(body: &[u8]) -> (Option<String>, String) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body);
        return (None, text.chars().take(200).collect());
    };
    let inner = match v.get("error") {
        Some(e @ Value::Object(_)) => e,
        Some(Value::String(s)) => return (None, s.clone()),
        _ => &v,
    };
    let code = str_field(inner, &["code", "errorCode", "type"]).map(str::to_string);
    let message = str_field(inner, &["message", "detail", "title"])
        .unwrap_or_default()
        .to_string();
    (code, message)
}

fn success(status: StatusCode, body: &[u8], reference: &str) -> Outcome {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return if body.iter().all(u8::is_ascii_whitespace) {
            // An empty 200: released, but the API gave no id of its own.
            Outcome::Paid {
                transfer_id: format!("release:{reference}"),
            }
        } else {
            Outcome::Unknown {
                message: format!("release-funds API answered {status} with an unreadable body"),
            }
        };
    };
    if v.get("success").and_then(Value::as_bool) == Some(false) {
        let (code, message) = error_of(body);
        return Outcome::Rejected {
            code: code.unwrap_or_else(|| "release_refused".into()),
            message,
        };
    }
    let id = str_field(&v, &["transferId", "transfer_id", "id", "paymentId"])
        .map(str::to_string)
        .unwrap_or_else(|| format!("release:{reference}"));
    match str_field(&v, &["status"])
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("paid" | "succeeded" | "released" | "completed" | "success") => {
            Outcome::Paid { transfer_id: id }
        }
        Some("pending" | "processing" | "in_transit" | "accepted") => {
            Outcome::InTransit { transfer_id: id }
        }
        Some("failed" | "rejected") => {
            let (code, message) = error_of(body);
            Outcome::Rejected {
                code: code.unwrap_or_else(|| "release_failed".into()),
                message,
            }
        }
        Some(other) => Outcome::Unknown {
            message: format!("release-funds API answered unknown status {other:?}"),
        },
    }
}

/// Maps one answer to an outcome, through `status_map` first.
pub fn classify_release(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    reference: &str,
    status_map: &BTreeMap<u16, String>,
) -> Outcome {
    let s = status.as_u16();
    let meaning = status_map.get(&s).map(String::as_str).unwrap_or({
        if status.is_success() {
            "body"
        } else if status.is_server_error() {
            "transient"
        } else {
            "unknown"
        }
    });
    let (code, message) = if status.is_success() {
        (None, String::new())
    } else {
        error_of(body)
    };
    match meaning {
        "body" => success(status, body, reference),
        "paid" | "in_transit" => {
            let id = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| {
                    str_field(&v, &["transferId", "transfer_id", "id"]).map(str::to_string)
                })
                .unwrap_or_else(|| format!("release:{reference}"));
            if meaning == "paid" {
                Outcome::Paid { transfer_id: id }
            } else {
                Outcome::InTransit { transfer_id: id }
            }
        }
        "permanent" => Outcome::Rejected {
            code: code.unwrap_or_else(|| {
                if s == 401 {
                    "unauthorized".into()
                } else {
                    format!("http_{s}")
                }
            }),
            message,
        },
        "transient" => Outcome::Transient {
            code: if s == 429 {
                "rate_limited".into()
            } else {
                format!("http_{s}")
            },
            message: if message.is_empty() {
                format!("release-funds API answered {s}")
            } else {
                message
            },
            retry_after,
        },
        _ => Outcome::Unknown {
            message: format!("release-funds API answered {s}: {message}"),
        },
    }
}

impl ReleaseFundsGateway {
    /// A client for `settings.release_funds`, with the fleet's timeouts.
    pub fn new(settings: &GatewaySettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        let r = &settings.release_funds;
        let base = r.base_url.trim_end_matches('/');
        let status_map = r
            .status_map
            .iter()
            .filter_map(|(k, v)| k.parse::<u16>().ok().map(|k| (k, v.clone())))
            .collect();
        Ok(ReleaseFundsGateway {
            client,
            url: format!("{base}{}", r.endpoint),
            lookup_url: (!r.lookup_endpoint.is_empty())
                .then(|| format!("{base}{}", r.lookup_endpoint)),
            secret: (!r.secret.expose_secret().is_empty()).then(|| r.secret.clone()),
            status_map,
        })
    }

    fn auth(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.secret {
            Some(s) => b.bearer_auth(s.expose_secret()),
            None => b,
        }
    }
}

fn record_of(v: &Value, reference: &str) -> Option<TransferRecord> {
    let id = str_field(v, &["transferId", "transfer_id", "id"])?.to_string();
    let status = match str_field(v, &["status"])
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("paid" | "succeeded" | "released" | "completed" | "success") => "paid",
        Some("pending" | "processing" | "in_transit" | "accepted") => "pending",
        Some(_) => "failed",
    };
    Some(TransferRecord {
        id,
        status: status.into(),
        amount_minor: ["amount", "amount_minor", "amountInCents"]
            .iter()
            .find_map(|n| v.get(*n).and_then(Value::as_i64))
            .unwrap_or_default(),
        currency: str_field(v, &["currency"])
            .unwrap_or_default()
            .to_ascii_uppercase(),
        destination: str_field(v, &["driverStripeAccountId", "destination"])
            .unwrap_or_default()
            .to_string(),
        reference: str_field(v, &["reference"])
            .unwrap_or(reference)
            .to_string(),
    })
}

#[async_trait]
impl Gateway for ReleaseFundsGateway {
    async fn transfer(&self, req: &TransferRequest) -> Outcome {
        let request = self
            .auth(self.client.post(&self.url))
            .header("Idempotency-Key", &req.idempotency_key)
            .json(&release_body(req));
        match super::send_transfer(request, "the release-funds API").await {
            Ok(a) => classify_release(
                a.status,
                a.retry_after,
                &a.body,
                &req.reference,
                &self.status_map,
            ),
            Err(outcome) => outcome,
        }
    }

    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError> {
        let Some(url) = &self.lookup_url else {
            return Err(LookupError(
                "the release-funds API has no look-up endpoint configured (gateway.release_funds.lookup_endpoint)".into(),
            ));
        };
        let resp = self
            .auth(self.client.get(url))
            .query(&[("reference", reference)])
            .send()
            .await
            .map_err(|_| LookupError("request to the release-funds API failed".into()))?;
        if !resp.status().is_success() {
            return Err(LookupError(format!(
                "release-funds API answered {}",
                resp.status()
            )));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|_| LookupError("unreadable look-up answer".into()))?;
        let items = match &v {
            Value::Array(a) => a.clone(),
            _ => v
                .get("data")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        };
        Ok(items
            .iter()
            .filter_map(|i| record_of(i, reference))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(u16, &str)]) -> BTreeMap<u16, String> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn the_status_map_decides_before_the_default_rules() {
        let m = map(&[(409, "paid"), (402, "transient")]);
        let o = classify_release(
            StatusCode::CONFLICT,
            None,
            br#"{"transferId":"tr_9"}"#,
            "payout_1",
            &m,
        );
        assert_eq!(
            o,
            Outcome::Paid {
                transfer_id: "tr_9".into()
            }
        );
        let o = classify_release(
            StatusCode::PAYMENT_REQUIRED,
            None,
            br#"{"error":"Insufficient funds"}"#,
            "payout_1",
            &m,
        );
        assert!(o.is_retryable(), "{o:?}");
        let o = classify_release(StatusCode::BAD_GATEWAY, None, b"", "payout_1", &m);
        assert!(matches!(o, Outcome::Transient { ref code, .. } if code == "http_502"));
        let o = classify_release(StatusCode::IM_A_TEAPOT, None, b"", "payout_1", &m);
        assert!(matches!(o, Outcome::Unknown { .. }));
    }

    #[test]
    fn problem_details_and_pending_bodies_are_understood() {
        let m = map(&[(400, "permanent")]);
        let o = classify_release(
            StatusCode::BAD_REQUEST,
            None,
            br#"{"type":"invalid_driver_account","title":"Bad Request","status":400,"detail":"Driver has no Stripe account"}"#,
            "payout_1",
            &m,
        );
        assert_eq!(
            o,
            Outcome::Rejected {
                code: "invalid_driver_account".into(),
                message: "Driver has no Stripe account".into()
            }
        );
        let o = classify_release(
            StatusCode::ACCEPTED,
            None,
            br#"{"success":true,"transferId":"tr_5","status":"Pending"}"#,
            "payout_1",
            &m,
        );
        assert_eq!(
            o,
            Outcome::InTransit {
                transfer_id: "tr_5".into()
            }
        );
    }
}

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
//! `bookingId` is the payout's `external_ref` metadata when it has one (the
//! booking of the one earning a `per_earning` payout pays), else its
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
//!
//! Two refusals are not the payee's failure, whatever the status table says
//! (the product document's "Error Scenarios"):
//! - a code in `gateway.release_funds.not_onboarded_codes` ("driver hasn't
//!   completed Stripe onboarding") becomes [`crate::gateway::NOT_ONBOARDED`], so the
//!   worker holds the payout until the account is ready (the API's own code
//!   stays in the message);
//! - a code in `gateway.release_funds.balance_codes`, or a 402 the table calls
//!   transient ("Insufficient Funds: check platform Stripe account balance"),
//!   becomes the transient [`PLATFORM_BALANCE`]: retried later, never failed.
//!
//! With `gateway.release_funds.account_endpoint` the adapter is also the
//! onboarding check ([`crate::gateway::AccountCheck`]) that releases held payouts.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{
    Gateway, Lookup, LookupError, Outcome, RejectReason, TransferRecord, TransferRequest,
    TransientKind,
};
use crate::config::{GatewaySettings, ReleaseFundsSettings};

/// The transient code of "the platform's balance is short": the worker pauses
/// the fleet and alerts on exactly this code; the payout is retried, never failed.
pub const PLATFORM_BALANCE: &str = super::PLATFORM_BALANCE_INSUFFICIENT;

/// How the API's answers are read: the status table and the two refusals
/// that are not the payee's failure.
#[derive(Debug, Clone, Default)]
pub struct AnswerRules {
    /// What an HTTP status means (`gateway.release_funds.status_map`).
    pub status_map: BTreeMap<u16, String>,
    /// Codes that hold the payout (`gateway.release_funds.not_onboarded_codes`).
    pub not_onboarded_codes: Vec<String>,
    /// Codes of a platform balance short (`gateway.release_funds.balance_codes`).
    pub balance_codes: Vec<String>,
}

impl AnswerRules {
    /// The rules `settings` configure (bad status keys were refused at load).
    pub fn from_settings(r: &ReleaseFundsSettings) -> Self {
        AnswerRules {
            status_map: r
                .status_map
                .iter()
                .filter_map(|(k, v)| k.parse::<u16>().ok().map(|k| (k, v.clone())))
                .collect(),
            not_onboarded_codes: r.not_onboarded_codes.clone(),
            balance_codes: r.balance_codes.clone(),
        }
    }

    /// A refusal that is not the payee's failure: held (not onboarded) or
    /// retried (platform balance short). `None`: read it by the status table.
    fn special(
        &self,
        status: u16,
        code: Option<&str>,
        message: &str,
        meaning: &str,
        retry_after: Option<Duration>,
    ) -> Option<Outcome> {
        let said = match code {
            Some(c) if message.is_empty() => c.to_string(),
            Some(c) => format!("{c}: {message}"),
            None => message.to_string(),
        };
        let listed = |list: &[String]| code.is_some_and(|c| list.iter().any(|l| l == c));
        if listed(&self.not_onboarded_codes) {
            return Some(Outcome::Rejected {
                reason: RejectReason::NotOnboarded,
                message: format!("release-funds API answered {status} {said}"),
            });
        }
        if listed(&self.balance_codes) || (status == 402 && meaning == "transient") {
            return Some(Outcome::Transient {
                kind: TransientKind::PlatformBalance,
                message: format!("release-funds API answered {status} {said}"),
                retry_after,
            });
        }
        None
    }
}

/// The release-funds client.
#[derive(Clone)]
pub struct ReleaseFundsGateway {
    client: reqwest::Client,
    url: String,
    lookup_url: Option<String>,
    account_url: Option<String>,
    secret: Option<SecretString>,
    rules: AnswerRules,
}

impl std::fmt::Debug for ReleaseFundsGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseFundsGateway")
            .field("url", &self.url)
            .field("lookup_url", &self.lookup_url)
            .field("account_url", &self.account_url)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// The JSON body of one release.
pub fn release_body(req: &TransferRequest) -> Value {
    let booking = req
        .metadata
        .get(crate::gateway::EXTERNAL_REF)
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
    // ProblemDetails' `type` is usually a URI (ASP.NET's default is the RFC
    // section of the status): not a code.
    let code = ["code", "errorCode", "type"]
        .iter()
        .filter_map(|n| inner.get(*n).and_then(Value::as_str))
        .find(|c| !c.is_empty() && !c.contains(':') && !c.contains('/'))
        .map(str::to_string);
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
        return Outcome::rejected(code.unwrap_or_else(|| "release_refused".into()), message);
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
            Outcome::rejected(code.unwrap_or_else(|| "release_failed".into()), message)
        }
        Some(other) => Outcome::Unknown {
            message: format!("release-funds API answered unknown status {other:?}"),
        },
    }
}

/// Maps one answer to an outcome: a refusal that is not the payee's failure
/// first (held, platform balance), then the status table, then the defaults.
pub fn classify_release(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    reference: &str,
    rules: &AnswerRules,
) -> Outcome {
    let s = status.as_u16();
    let outcome = classify_by_status(status, retry_after, body, reference, &rules.status_map);
    let meaning = rules.status_map.get(&s).map(String::as_str).unwrap_or("");
    let refused = match &outcome {
        // A 2xx whose body says it was refused (`"success": false`).
        Outcome::Rejected { .. } if status.is_success() => true,
        _ => status.is_client_error(),
    };
    if refused && !matches!(meaning, "paid" | "in_transit") {
        let (code, message) = error_of(body);
        if let Some(special) = rules.special(s, code.as_deref(), &message, meaning, retry_after) {
            return special;
        }
    }
    outcome
}

fn classify_by_status(
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
        "permanent" => match code {
            Some(code) => Outcome::rejected(code, message),
            None if s == 401 => Outcome::Rejected {
                reason: RejectReason::Unauthorized,
                message,
            },
            None => Outcome::rejected(format!("http_{s}"), message),
        },
        "transient" => Outcome::Transient {
            kind: if s == 429 {
                TransientKind::RateLimited
            } else {
                TransientKind::Http(s)
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
        Ok(ReleaseFundsGateway {
            client,
            url: format!("{base}{}", r.endpoint),
            lookup_url: (!r.lookup_endpoint.is_empty())
                .then(|| format!("{base}{}", r.lookup_endpoint)),
            account_url: (!r.account_endpoint.is_empty())
                .then(|| format!("{base}{}", r.account_endpoint)),
            secret: (!r.secret.expose_secret().is_empty()).then(|| r.secret.clone()),
            rules: AnswerRules::from_settings(r),
        })
    }

    /// Whether `account_ready` can be asked (an account endpoint is configured).
    pub fn has_account_check(&self) -> bool {
        self.account_url.is_some()
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
impl Lookup for ReleaseFundsGateway {
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
                &self.rules,
            ),
            Err(outcome) => outcome,
        }
    }
}

/// `account` for a URL path segment: unreserved characters kept, the rest
/// percent-encoded (an account id cannot reach another path).
fn path_segment(account: &str) -> String {
    account
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The onboarding check: `GET {account_endpoint}` answers
/// `{"onboarded": bool}` (also read: `payoutsEnabled`, `payouts_enabled`,
/// `transfersEnabled`); a 404 is an account not ready.
#[async_trait]
impl crate::gateway::AccountCheck for ReleaseFundsGateway {
    async fn account_ready(&self, account: &str) -> Result<bool, LookupError> {
        let Some(template) = &self.account_url else {
            return Err(LookupError(
                "the release-funds API has no account endpoint configured (gateway.release_funds.account_endpoint)".into(),
            ));
        };
        let url = template.replace("{account}", &path_segment(account));
        let resp = self
            .auth(self.client.get(url))
            .send()
            .await
            .map_err(|_| LookupError("request to the release-funds API failed".into()))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !resp.status().is_success() {
            return Err(LookupError(format!(
                "release-funds API answered {} to the account check",
                resp.status()
            )));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|_| LookupError("unreadable account answer".into()))?;
        [
            "onboarded",
            "payoutsEnabled",
            "payouts_enabled",
            "transfersEnabled",
        ]
        .iter()
        .find_map(|n| v.get(*n).and_then(Value::as_bool))
        .ok_or_else(|| LookupError("the account answer has no \"onboarded\" field".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(u16, &str)]) -> AnswerRules {
        AnswerRules {
            status_map: pairs.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn shipped() -> AnswerRules {
        let s = crate::config::Settings::load_from(None, &[]).unwrap();
        AnswerRules::from_settings(&s.gateway.release_funds)
    }

    #[test]
    fn a_driver_not_onboarded_is_held_with_the_apis_own_code_in_the_message() {
        for (status, body) in [
            (
                StatusCode::FORBIDDEN,
                &br#"{"error":{"code":"driver_not_onboarded","message":"Driver has not completed Stripe onboarding"}}"#[..],
            ),
            (
                StatusCode::OK,
                &br#"{"success":false,"code":"account_not_onboarded","message":"onboarding"}"#[..],
            ),
        ] {
            let o = classify_release(status, None, body, "payout_1", &shipped());
            match o {
                Outcome::Rejected { reason, message } => {
                    assert_eq!(reason, RejectReason::NotOnboarded);
                    assert_eq!(reason.code(), crate::gateway::NOT_ONBOARDED);
                    assert!(message.contains("_not_onboarded"), "{message}");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        // Other refusals stay the payee's failure.
        let o = classify_release(
            StatusCode::BAD_REQUEST,
            None,
            br#"{"error":{"code":"invalid_driver_account","message":"no account"}}"#,
            "payout_1",
            &shipped(),
        );
        assert!(
            matches!(o, Outcome::Rejected { ref reason, .. } if reason.code() == "invalid_driver_account")
        );
    }

    #[test]
    fn insufficient_platform_balance_is_transient_by_default_never_permanent() {
        let problem = br#"{"type":"https://tools.ietf.org/html/rfc9110#section-15.5.3","title":"Payment Required","status":402,"detail":"Insufficient funds"}"#;
        let o = classify_release(
            StatusCode::PAYMENT_REQUIRED,
            Some(Duration::from_secs(60)),
            problem,
            "payout_1",
            &shipped(),
        );
        assert_eq!(
            o,
            Outcome::Transient {
                kind: TransientKind::PlatformBalance,
                message: "release-funds API answered 402 Insufficient funds".into(),
                retry_after: Some(Duration::from_secs(60)),
            }
        );
        // By its code, whatever the status and even where the table says permanent.
        let o = classify_release(
            StatusCode::BAD_REQUEST,
            None,
            br#"{"error":{"code":"insufficient_funds","message":"Check platform Stripe account balance"}}"#,
            "payout_1",
            &shipped(),
        );
        assert!(
            matches!(&o, Outcome::Transient { kind, message, .. } if kind.code() == PLATFORM_BALANCE && message.contains("insufficient_funds")),
            "{o:?}"
        );
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
        assert!(matches!(
            o,
            Outcome::Transient {
                kind: TransientKind::Http(502),
                ..
            }
        ));
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
                reason: RejectReason::Gateway("invalid_driver_account".into()),
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

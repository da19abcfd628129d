//! The platform's side of the admin API (#17): payee management (suspend,
//! resume, change of gateway account) and, for the platform's backend
//! (the `integration` role), a payee's balances, earnings, payouts and
//! upcoming payout. Mounted by [`super::router`] behind
//! [`super::auth::authenticate`]; every handler checks its own
//! [`Permission`].

use std::collections::BTreeMap;

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    middleware,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AdminState, ApiError,
    api::{at_exponent, json_body, next_cursor, pairs, positive_id, short},
    auth::{self, Caller, Source},
};
use crate::{
    db::{platform as reads, tokens::Permission},
    metrics,
    services::payees::{self as payee_service, By, PayeeError},
};

/// The routes of this module, authenticated.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/api/v1/payees/{id}/suspend", post(suspend))
        .route("/api/v1/payees/{id}/resume", post(resume))
        .route("/api/v1/payees/{id}/account", post(account).put(account))
        .route("/api/v1/payees/{id}/email", post(email).put(email))
        .route("/api/v1/payees/{id}/balance", get(balance))
        .route("/api/v1/payees/{id}/earnings", get(earnings))
        .route("/api/v1/payees/{id}/payouts", get(payee_payouts))
        .route("/api/v1/payees/{id}/upcoming", get(upcoming))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .with_state(state)
}

/// The `status` filter of a payee list: `active`, `suspended` or absent.
pub fn payee_status_filter(raw: Option<&String>) -> Result<Option<&'static str>, ApiError> {
    match raw.map(String::as_str) {
        None | Some("") => Ok(None),
        Some("active") => Ok(Some("active")),
        Some("suspended") => Ok(Some("suspended")),
        Some(other) => Err(ApiError::BadRequest(format!(
            "status: expected active or suspended, got {:?}",
            super::api::short(other)
        ))),
    }
}

fn refused(e: PayeeError, action: &str) -> ApiError {
    let outcome = match &e {
        PayeeError::NotFound(_) => "not_found",
        PayeeError::Conflict(_) => "conflict",
        PayeeError::Invalid(_) => "bad_input",
        PayeeError::Db(_) => "error",
    };
    metrics::ADMIN_ACTIONS
        .with_label_values(&[action, outcome])
        .inc();
    match e {
        PayeeError::NotFound(id) => ApiError::NotFound(format!("payee {id} not found")),
        PayeeError::Conflict(m) => ApiError::Conflict {
            message: m,
            status: None,
        },
        PayeeError::Invalid(m) => ApiError::BadRequest(m),
        PayeeError::Db(e) => e.into(),
    }
}

fn done(action: &str) {
    metrics::ADMIN_ACTIONS
        .with_label_values(&[action, "ok"])
        .inc();
}

/// The body of a suspension (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendBody {
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/v1/payees/{id}/suspend` (operator): the payee is not settled
/// and its payouts wait; its queued payouts go back to pending. 409 when
/// suspended already.
async fn suspend(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.permit(Permission::SuspendPayee, "suspend a payee")?;
    let id = positive_id(&raw, "payee id")?;
    let body: SuspendBody = json_body(&body)?;
    let (actor, src) = (c.actor(), source.0.to_string());
    let by = By {
        actor: &actor,
        source: Some(&src),
        now: s.clock.now(),
    };
    let r = payee_service::suspend(&s.pool, id, body.reason.as_deref(), by)
        .await
        .map_err(|e| refused(e, "payee_suspend"))?;
    done("payee_suspend");
    Ok(Json(json!({"payee": r.payee, "parked": r.parked})))
}

/// `POST /api/v1/payees/{id}/resume` (operator): settled again, its due
/// payouts go out. 409 when not suspended.
async fn resume(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.permit(Permission::SuspendPayee, "resume a payee")?;
    let id = positive_id(&raw, "payee id")?;
    let _: SuspendBody = json_body(&body)?;
    let (actor, src) = (c.actor(), source.0.to_string());
    let by = By {
        actor: &actor,
        source: Some(&src),
        now: s.clock.now(),
    };
    let payee = payee_service::resume(&s.pool, id, by)
        .await
        .map_err(|e| refused(e, "payee_resume"))?;
    done("payee_resume");
    Ok(Json(json!({"payee": payee})))
}

/// The body of a change of account.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountBody {
    #[serde(default)]
    gateway_account: Option<String>,
}

/// `PUT` (or `POST`) `/api/v1/payees/{id}/account` (admin), body
/// `{"gateway_account": "acct_…"}`: where the payee's payouts not yet sent
/// go; payouts sent keep their destination. 400 for an account the
/// configured gateway cannot pay, 409 when it is the account already.
async fn account(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.permit(
        Permission::ChangeAccount,
        "change a payee's gateway account (admin only)",
    )?;
    let id = positive_id(&raw, "payee id")?;
    let body: AccountBody = json_body(&body)?;
    let Some(account) = body.gateway_account else {
        return Err(ApiError::BadRequest(
            "gateway_account: required (the payee's new account at the gateway)".into(),
        ));
    };
    let (actor, src) = (c.actor(), source.0.to_string());
    let by = By {
        actor: &actor,
        source: Some(&src),
        now: s.clock.now(),
    };
    let r = payee_service::set_account(&s.pool, s.settings.gateway.kind, id, &account, by)
        .await
        .map_err(|e| refused(e, "payee_account"))?;
    done("payee_account");
    Ok(Json(serde_json::to_value(r).map_err(anyhow::Error::from)?))
}

/// The body of a change of email address.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailBody {
    /// The address, or `null` to clear it (absent: refused).
    #[serde(default)]
    email: Option<Value>,
}

/// `PUT` (or `POST`) `/api/v1/payees/{id}/email` (admin), body
/// `{"email": "name@domain"}` or `{"email": null}`: where the payee's payout
/// notices are mailed (README "Email to payees"); null clears it (no more
/// mail). 400 for a bad address, 409 when it is that already.
async fn email(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.permit(
        Permission::ChangeAccount,
        "change a payee's email address (admin only)",
    )?;
    let id = positive_id(&raw, "payee id")?;
    let body: EmailBody = json_body(&body)?;
    let email = match body.email {
        Some(Value::String(e)) => Some(e),
        Some(Value::Null) => None,
        _ => {
            return Err(ApiError::BadRequest(
                "email: required (an address, or null to clear it)".into(),
            ));
        }
    };
    let (actor, src) = (c.actor(), source.0.to_string());
    let by = By {
        actor: &actor,
        source: Some(&src),
        now: s.clock.now(),
    };
    let p = payee_service::set_email(&s.pool, id, email.as_deref(), by)
        .await
        .map_err(|e| refused(e, "payee_email"))?;
    done("payee_email");
    Ok(Json(serde_json::json!({ "payee": p })))
}

// ---------- Reads for a payee (#17 item 2) ----------

/// A payee's list query: `limit` (1 to 200, default 50), `cursor` (the
/// previous page's `next_cursor`) and the filters `allowed`, each once.
struct Query {
    limit: i64,
    before_id: Option<i64>,
    filters: BTreeMap<String, String>,
}

fn query(q: &Option<String>, allowed: &[&str]) -> Result<Query, ApiError> {
    let mut out = Query {
        limit: 50,
        before_id: None,
        filters: BTreeMap::new(),
    };
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in pairs(q)? {
        if !seen.insert(k.clone()) {
            return Err(ApiError::BadRequest(format!("{}: given twice", short(&k))));
        }
        let v = v.trim().to_string();
        match k.as_str() {
            "limit" => {
                out.limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=200).contains(n))
                    .ok_or_else(|| ApiError::BadRequest("limit: expected 1 to 200".into()))?
            }
            "cursor" => {
                out.before_id = Some(v.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ApiError::BadRequest("cursor: expected the next_cursor of a page".into())
                })?)
            }
            other if allowed.contains(&other) => {
                if !v.is_empty() {
                    out.filters.insert(k, v);
                }
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {:?} (expected limit, cursor{})",
                    short(other),
                    allowed.iter().map(|a| format!(", {a}")).collect::<String>()
                )));
            }
        }
    }
    Ok(out)
}

fn currency_filter(v: Option<&String>) -> Result<Option<String>, ApiError> {
    v.map(|c| {
        c.to_ascii_uppercase()
            .parse::<crate::domain::Currency>()
            .map(|c| c.code().to_string())
            .map_err(|e| ApiError::BadRequest(format!("currency: {e}")))
    })
    .transpose()
}

fn time_filter(
    name: &str,
    v: Option<&String>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    v.map(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|_| ApiError::BadRequest(format!("{name}: expected an RFC 3339 time")))
    })
    .transpose()
}

/// The payee named by the path, or a 404 naming it.
async fn known_payee(s: &AdminState, raw: &str) -> Result<crate::db::payees::Payee, ApiError> {
    let id = positive_id(raw, "payee id")?;
    crate::db::payees::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("payee {id} not found")))
}

fn policy(s: &AdminState) -> Result<crate::domain::Policy, ApiError> {
    crate::services::settlement::policy_for(&s.settings).map_err(ApiError::Unavailable)
}

/// `GET /api/v1/payees/{id}/balance`: per currency, the gross of earnings
/// held and releasable, the balance carried over, payouts in flight and
/// paid in the current period.
async fn balance(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.permit(Permission::ReadPayees, "read payees")?;
    let id = positive_id(&raw, "payee id")?;
    let b = payee_service::balance(&s.pool, &policy(&s)?, id, s.clock.now())
        .await
        .map_err(|e| refused(e, "payee_balance"))?
        .ok_or_else(|| ApiError::NotFound(format!("payee {id} not found")))?;
    Ok(Json(serde_json::to_value(b).map_err(anyhow::Error::from)?))
}

/// `GET /api/v1/payees/{id}/earnings`: newest first, each with its state
/// (`held` until `release_at`, `released`, `carried`, `settled` into
/// `payout_id`). Filters: `state`, `currency`, `source`, `completed_from`,
/// `completed_to`; `limit`, `cursor`.
async fn earnings(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    c.permit(Permission::ReadPayees, "read payees")?;
    let q = query(
        &q,
        &[
            "state",
            "currency",
            "source",
            "completed_from",
            "completed_to",
        ],
    )?;
    let state = match q.filters.get("state") {
        Some(st) if !reads::EARNING_STATES.contains(&st.as_str()) => {
            return Err(ApiError::BadRequest(format!(
                "state: expected one of {}, got {:?}",
                reads::EARNING_STATES.join(", "),
                short(st)
            )));
        }
        st => st.cloned(),
    };
    let f = reads::EarningFilter {
        state,
        currency: currency_filter(q.filters.get("currency"))?,
        source: q.filters.get("source").cloned(),
        completed_from: time_filter("completed_from", q.filters.get("completed_from"))?,
        completed_to: time_filter("completed_to", q.filters.get("completed_to"))?,
    };
    let p = known_payee(&s, &raw).await?;
    let rows = reads::earnings_page(&s.pool, p.id, &f, s.clock.now(), q.before_id, q.limit).await?;
    let next = next_cursor(rows.iter().map(|e| e.id), rows.len(), q.limit);
    let items: Vec<Value> = rows
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
            v["gross"] = json!(at_exponent(e.gross, &e.currency));
            v
        })
        .collect();
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

/// `GET /api/v1/payees/{id}/payouts`: newest first, each with its line
/// items (a settlement payout's; none for one made by hand). Filters:
/// `status`, `currency`; `limit`, `cursor`.
async fn payee_payouts(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    c.permit(Permission::ReadPayees, "read payees")?;
    let q = query(&q, &["status", "currency"])?;
    let status = q
        .filters
        .get("status")
        .map(|st| {
            st.parse::<crate::domain::PayoutStatus>()
                .map(|st| st.as_str())
                .map_err(|e| ApiError::BadRequest(format!("status: {e}")))
        })
        .transpose()?;
    let currency = currency_filter(q.filters.get("currency"))?;
    let p = known_payee(&s, &raw).await?;
    let rows = reads::payouts_page(
        &s.pool,
        p.id,
        status,
        currency.as_deref(),
        q.before_id,
        q.limit,
    )
    .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut lines: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    let currency_of: BTreeMap<i64, &str> =
        rows.iter().map(|r| (r.id, r.currency.as_str())).collect();
    for l in reads::lines_of(&s.pool, &ids).await? {
        let cur = currency_of.get(&l.payout_id).copied().unwrap_or("");
        lines.entry(l.payout_id).or_default().push(json!({
            "position": l.position, "kind": l.kind, "description": l.description,
            "amount": at_exponent(l.amount, cur), "earning_id": l.earning_id,
        }));
    }
    let next = next_cursor(ids.iter().copied(), rows.len(), q.limit);
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
            v["amount"] = json!(at_exponent(r.amount, &r.currency));
            v["lines"] = json!(lines.remove(&r.id).unwrap_or_default());
            v
        })
        .collect();
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

/// `GET /api/v1/payees/{id}/upcoming`: the payee's next payout, computed
/// line by line as `payoutctl preview` does (writes nothing).
async fn upcoming(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.permit(Permission::ReadPayees, "read payees")?;
    let p = known_payee(&s, &raw).await?;
    let preview = crate::services::settlement::preview(&s.pool, &policy(&s)?, p.id, s.clock.now())
        .await
        .map_err(ApiError::Unavailable)?;
    let mut v = serde_json::to_value(&preview).map_err(anyhow::Error::from)?;
    v["payee_status"] = json!(p.status);
    Ok(Json(v))
}

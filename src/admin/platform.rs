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
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    AdminState, ApiError,
    api::{ListPage, json_body, next_cursor, pairs, positive_id, rescaled, short},
    auth::{self, Caller, Source},
    openapi::{ErrorBody, IdParam, ListParams},
};
use crate::{
    db::{
        payees::Payee,
        platform::{self as reads, EarningView, PayoutView},
        tokens::Permission,
    },
    domain::{DecimalString, PayeeId},
    metrics,
    services::{
        escrow,
        payees::{self as payee_service, By, PayeeError},
    },
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
        .route("/api/v1/earnings/{id}/release", post(release_earning))
        .route("/api/v1/earnings/{id}/void", post(void_earning))
        .route("/api/v1/holds", get(holds))
        .route("/api/v1/payees/{id}/payout-requests", post(payout_request))
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
        PayeeError::NotFound(..) => "not_found",
        PayeeError::Conflict(_) => "conflict",
        PayeeError::Invalid(_) => "bad_input",
        PayeeError::Db(_) => "error",
    };
    metrics::ADMIN_ACTIONS
        .with_label_values(&[action, outcome])
        .inc();
    match e {
        e @ PayeeError::NotFound(..) => ApiError::NotFound(e.to_string()),
        PayeeError::Conflict(m) => ApiError::Conflict {
            message: m,
            status: None,
        },
        PayeeError::Invalid(m) => ApiError::BadRequest(m),
        PayeeError::Db(e) => e.into(),
    }
}

fn done_action(action: &str) {
    metrics::ADMIN_ACTIONS
        .with_label_values(&[action, "ok"])
        .inc();
}

/// The body of a suspension (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SuspendBody {
    /// Why (at most 500 characters kept), in the audit log.
    #[serde(default)]
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// A payee after a change.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PayeeAnswer {
    /// The payee now.
    pub payee: Payee,
}

/// `POST /api/v1/payees/{id}/suspend` (operator): the payee is not settled
/// and its payouts wait; its queued payouts go back to pending. 409 when
/// suspended already.
#[utoipa::path(
    post,
    path = "/api/v1/payees/{id}/suspend",
    tag = "payees",
    params(IdParam),
    request_body(content = Option<SuspendBody>, description = "Optional"),
    security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "Suspended", body = crate::services::payees::Suspended),
        (status = 400, description = "The id or the body is not valid", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
        (status = 409, description = "The payee is suspended already", body = ErrorBody),
    )
)]
pub(crate) async fn suspend(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<crate::services::payees::Suspended>, ApiError> {
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
    done_action("payee_suspend");
    Ok(Json(r))
}

/// `POST /api/v1/payees/{id}/resume` (operator): settled again, its due
/// payouts go out. 409 when not suspended.
#[utoipa::path(
    post,
    path = "/api/v1/payees/{id}/resume",
    tag = "payees",
    params(IdParam),
    request_body(content = Option<SuspendBody>, description = "Optional"),
    security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "Resumed", body = PayeeAnswer),
        (status = 400, description = "The id or the body is not valid", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
        (status = 409, description = "The payee is not suspended", body = ErrorBody),
    )
)]
pub(crate) async fn resume(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<PayeeAnswer>, ApiError> {
    c.permit(Permission::SuspendPayee, "resume a payee")?;
    let id = positive_id(&raw, "payee id")?;
    let body: SuspendBody = json_body(&body)?;
    let (actor, src) = (c.actor(), source.0.to_string());
    let by = By {
        actor: &actor,
        source: Some(&src),
        now: s.clock.now(),
    };
    let payee = payee_service::resume(&s.pool, id, body.reason.as_deref(), by)
        .await
        .map_err(|e| refused(e, "payee_resume"))?;
    done_action("payee_resume");
    Ok(Json(PayeeAnswer { payee }))
}

/// The body of a change of account.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccountBody {
    /// The payee's new account at the gateway (with `gateway.kind` stripe or
    /// release_funds: a Stripe connected account, `acct_` followed by
    /// letters or digits).
    #[serde(default)]
    #[schema(value_type = String, min_length = 1, max_length = 255)]
    gateway_account: Option<String>,
}

/// `PUT` (or `POST`) `/api/v1/payees/{id}/account` (admin), body
/// `{"gateway_account": "acct_…"}`: where the payee's payouts not yet sent
/// go; payouts sent keep their destination. 400 for an account the
/// configured gateway cannot pay, 409 when it is the account already.
#[utoipa::path(
    method(put, post),
    path = "/api/v1/payees/{id}/account",
    tag = "payees",
    params(IdParam),
    request_body = AccountBody,
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "Changed", body = crate::services::payees::AccountChanged),
        (status = 400, description = "The id or the body is not valid, or the configured gateway cannot pay that account (the message names gateway_account)", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
        (status = 409, description = "It is the payee's account already", body = ErrorBody),
    )
)]
pub(crate) async fn account(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<crate::services::payees::AccountChanged>, ApiError> {
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
    done_action("payee_account");
    Ok(Json(r))
}

// ---------- Escrow actions (#17 item 5) ----------

/// The body of an escrow action: `{"reason": "…"}` (required for a void).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EscrowBody {
    /// Why (at most 500 characters), in the audit log; required for a void.
    #[serde(default)]
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// `POST /api/v1/earnings/{id}/release` (operator), body optional
/// `{"reason": "…"}`: a held earning is payable now (in the payee's current
/// period). 409 once released, settled or voided.
#[utoipa::path(
    post,
    path = "/api/v1/earnings/{id}/release",
    tag = "earnings",
    params(IdParam),
    request_body(content = Option<EscrowBody>, description = "Optional"),
    security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "Released: payable in the payee's current period", body = escrow::Done),
        (status = 400, description = "The id or the body is not valid", body = ErrorBody),
        (status = 404, description = "No such earning", body = ErrorBody),
        (status = 409, description = "Released already, settled or voided", body = ErrorBody),
    )
)]
pub(crate) async fn release_earning(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<escrow::Done>, ApiError> {
    escrow_action(s, c, source, raw, body, false).await
}

/// `POST /api/v1/earnings/{id}/void` (operator), body `{"reason": "…"}`
/// (required): the earning is never paid; its reference stays taken. 409
/// once settled (cancel or reverse the payout instead) or voided.
#[utoipa::path(
    post,
    path = "/api/v1/earnings/{id}/void",
    tag = "earnings",
    params(IdParam),
    request_body(content = EscrowBody, description = "`reason` is required"),
    security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "Voided: never settled, paid or counted; its reference stays taken", body = escrow::Done),
        (status = 400, description = "The id is not valid or the reason is missing", body = ErrorBody),
        (status = 404, description = "No such earning", body = ErrorBody),
        (status = 409, description = "Settled (cancel or reverse its payout instead) or voided already", body = ErrorBody),
    )
)]
pub(crate) async fn void_earning(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<escrow::Done>, ApiError> {
    escrow_action(s, c, source, raw, body, true).await
}

async fn escrow_action(
    s: AdminState,
    c: Caller,
    source: Source,
    raw: String,
    body: Bytes,
    void: bool,
) -> Result<Json<escrow::Done>, ApiError> {
    let (action, what) = if void {
        ("earning_void", "void an earning")
    } else {
        ("earning_release", "release an earning early")
    };
    c.permit(Permission::ActOnEarning, what)?;
    let id = positive_id(&raw, "earning id")?;
    let body: EscrowBody = json_body(&body)?;
    let (actor, src) = (c.actor(), source.0.to_string());
    let by = By {
        actor: &actor,
        source: Some(&src),
        now: s.clock.now(),
    };
    let done = if void {
        escrow::void(&s.pool, id, body.reason.as_deref(), by).await
    } else {
        escrow::release(&s.pool, id, body.reason.as_deref(), by).await
    }
    .map_err(|e| refused(e, action))?;
    done_action(action);
    Ok(Json(done))
}

/// `GET /api/v1/holds` (any operator role): held earnings' totals per payee
/// and per source, each per currency, largest first; filters `payee`,
/// `source`, `currency`; `limit` groups of each (default 50, at most 200).
#[utoipa::path(
    get,
    path = "/api/v1/holds",
    tag = "earnings",
    params(
        ("payee" = Option<i64>, Query, description = "Only this payee", minimum = 1),
        ("source" = Option<String>, Query, description = "Only this source"),
        ("currency" = Option<String>, Query, description = "ISO 4217 code", pattern = "^[A-Za-z]{3}$"),
        ("limit" = Option<i64>, Query, description = "Groups of each listing (default 50)", minimum = 1, maximum = 200),
    ),
    security(("bearer" = ["viewer", "operator", "admin"])),
    responses(
        (status = 200, description = "Held earnings' totals per payee and per source, each per currency, largest gross first", body = escrow::Holds),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
    )
)]
pub(crate) async fn holds(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    RawQuery(q): RawQuery,
) -> Result<Json<escrow::Holds>, ApiError> {
    c.permit(Permission::ReadFleet, "list holds")?;
    let q = query(&q, &["payee", "source", "currency"])?;
    let payee_id = q
        .filters
        .get("payee")
        .map(|p| positive_id(p, "payee"))
        .transpose()?
        .map(crate::domain::PayeeId::new);
    let f = crate::db::earnings::HoldFilter {
        payee_id,
        source: q.filters.get("source").cloned(),
        currency: currency_filter(q.filters.get("currency"))?,
    };
    let h = escrow::holds(&s.pool, &f, s.clock.now(), q.limit).await?;
    Ok(Json(h))
}

/// The body of a change of email address.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmailBody {
    /// The address, or `null` to clear it (absent: refused).
    #[serde(default)]
    #[schema(value_type = Option<String>, max_length = 254)]
    email: Option<Value>,
}

/// `PUT` (or `POST`) `/api/v1/payees/{id}/email` (admin), body
/// `{"email": "name@domain"}` or `{"email": null}`: where the payee's payout
/// notices are mailed (README "Email to payees"); null clears it (no more
/// mail). 400 for a bad address, 409 when it is that already.
#[utoipa::path(
    method(put, post),
    path = "/api/v1/payees/{id}/email",
    tag = "payees",
    params(IdParam),
    request_body = EmailBody,
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "Changed", body = PayeeAnswer),
        (status = 400, description = "The id or the body is not valid, or the address is not one (the message names email)", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
        (status = 409, description = "It is the payee's address already", body = ErrorBody),
    )
)]
pub(crate) async fn email(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Result<Json<PayeeAnswer>, ApiError> {
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
    done_action("payee_email");
    Ok(Json(PayeeAnswer { payee: p }))
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
    crate::db::payees::get(&s.pool, PayeeId::new(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("payee {id} not found")))
}

fn policy(s: &AdminState) -> Result<crate::domain::Policy, ApiError> {
    crate::services::settlement::policy_for(&s.settings).map_err(ApiError::Unavailable)
}

/// `GET /api/v1/payees/{id}/balance`: per currency, the gross of earnings
/// held and releasable, the balance carried over, payouts in flight and
/// paid in the current period.
#[utoipa::path(
    get,
    path = "/api/v1/payees/{id}/balance",
    tag = "payees",
    params(IdParam),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "The balance", body = crate::services::payees::Balance),
        (status = 400, description = "The id is not a positive integer", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
    )
)]
pub(crate) async fn balance(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<crate::services::payees::Balance>, ApiError> {
    c.permit(Permission::ReadPayees, "read payees")?;
    let id = positive_id(&raw, "payee id")?;
    let b = payee_service::balance(&s.pool, &policy(&s)?, id, s.clock.now())
        .await
        .map_err(|e| refused(e, "payee_balance"))?
        .ok_or_else(|| ApiError::NotFound(format!("payee {id} not found")))?;
    Ok(Json(b))
}

/// `GET /api/v1/payees/{id}/earnings`: newest first, each with its state
/// (`held` until `release_at`, `released`, `carried`, `settled` into
/// `payout_id`). Filters: `state`, `currency`, `source`, `completed_from`,
/// `completed_to`; `limit`, `cursor`.
#[utoipa::path(
    get,
    path = "/api/v1/payees/{id}/earnings",
    tag = "payees",
    params(
        IdParam,
        ("state" = Option<String>, Query, description = "Only earnings in this state", pattern = "^(held|released|carried|settled|voided)$"),
        ("currency" = Option<String>, Query, description = "ISO 4217 code", pattern = "^[A-Za-z]{3}$"),
        ("source" = Option<String>, Query, description = "Only from this source"),
        ("completed_from" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "Completed at or after (RFC 3339)"),
        ("completed_to" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "Completed before (RFC 3339)"),
        ListParams,
    ),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "A page", body = ListPage<EarningView>),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
    )
)]
pub(crate) async fn earnings(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<ListPage<EarningView>>, ApiError> {
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
    let rows =
        reads::earnings_page(&s.pool, p.id.get(), &f, s.clock.now(), q.before_id, q.limit).await?;
    let next = next_cursor(rows.iter().map(|e| e.id), rows.len(), q.limit);
    let items = rows
        .into_iter()
        .map(|mut e| {
            e.gross = rescaled(e.gross, &e.currency);
            e
        })
        .collect();
    Ok(Json(ListPage {
        items,
        next_cursor: next,
    }))
}

/// A line item of a payee's payout.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PayoutLine {
    /// Order within the settlement.
    pub position: i32,
    /// `earning`, `commission`, `volume_bonus`, `deduction`, `carried_in`, `fee`, `carried_out`, `returned`.
    pub kind: String,
    /// Human text.
    pub description: String,
    /// Signed amount, at the payout currency's exponent.
    #[schema(value_type = DecimalString)]
    pub amount: rust_decimal::Decimal,
    /// The earning, for earning lines.
    pub earning_id: Option<i64>,
}

/// A payee's payout with its line items.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PayeePayout {
    /// The payout (its amount at its currency's exponent).
    #[serde(flatten)]
    pub payout: PayoutView,
    /// A settlement payout's line items (none for one made by hand).
    pub lines: Vec<PayoutLine>,
}

/// `GET /api/v1/payees/{id}/payouts`: newest first, each with its line
/// items (a settlement payout's; none for one made by hand). Filters:
/// `status`, `currency`; `limit`, `cursor`.
#[utoipa::path(
    get,
    path = "/api/v1/payees/{id}/payouts",
    tag = "payees",
    params(
        IdParam,
        ("status" = Option<crate::domain::PayoutStatus>, Query, description = "Only this status"),
        ("currency" = Option<String>, Query, description = "ISO 4217 code", pattern = "^[A-Za-z]{3}$"),
        ListParams,
    ),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "A page", body = ListPage<PayeePayout>),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
    )
)]
pub(crate) async fn payee_payouts(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<ListPage<PayeePayout>>, ApiError> {
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
        p.id.get(),
        status,
        currency.as_deref(),
        q.before_id,
        q.limit,
    )
    .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut lines: BTreeMap<i64, Vec<PayoutLine>> = BTreeMap::new();
    let currency_of: BTreeMap<i64, &str> =
        rows.iter().map(|r| (r.id, r.currency.as_str())).collect();
    for l in reads::lines_of(&s.pool, &ids).await? {
        let cur = currency_of.get(&l.payout_id).copied().unwrap_or("");
        lines.entry(l.payout_id).or_default().push(PayoutLine {
            position: l.position,
            kind: l.kind,
            description: l.description,
            amount: rescaled(l.amount, cur),
            earning_id: l.earning_id,
        });
    }
    let next = next_cursor(ids.iter().copied(), rows.len(), q.limit);
    let items = rows
        .into_iter()
        .map(|mut r| {
            r.amount = rescaled(r.amount, &r.currency);
            PayeePayout {
                lines: lines.remove(&r.id).unwrap_or_default(),
                payout: r,
            }
        })
        .collect();
    Ok(Json(ListPage {
        items,
        next_cursor: next,
    }))
}

/// The payee's upcoming payout.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Upcoming {
    /// The preview.
    #[serde(flatten)]
    pub preview: crate::services::settlement::Preview,
    /// The payee's status (a suspended payee is not settled).
    pub payee_status: String,
}

/// `GET /api/v1/payees/{id}/upcoming`: the payee's next payout, computed
/// line by line as `payoutctl preview` does (writes nothing).
#[utoipa::path(
    get,
    path = "/api/v1/payees/{id}/upcoming",
    tag = "payees",
    params(IdParam),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "The preview", body = Upcoming),
        (status = 400, description = "The id is not a positive integer", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
    )
)]
pub(crate) async fn upcoming(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<Upcoming>, ApiError> {
    c.permit(Permission::ReadPayees, "read payees")?;
    let p = known_payee(&s, &raw).await?;
    let preview =
        crate::services::settlement::preview(&s.pool, &policy(&s)?, p.id.get(), s.clock.now())
            .await
            .map_err(ApiError::Unavailable)?;
    Ok(Json(Upcoming {
        preview,
        payee_status: p.status,
    }))
}

// ---------- Early payout requests (#17 item 3) ----------

/// The body of an early payout request.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PayoutRequestBody {
    /// ISO 4217 code (default: the payee's currency).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z]{3}$")]
    currency: Option<String>,
    /// The gross of released earnings to settle at most, a decimal string at
    /// most as fine as the currency (default: everything released). Whole
    /// earnings are taken in release order while their sum stays at or
    /// below it; an earning is never split.
    #[serde(default)]
    #[schema(value_type = Option<crate::domain::DecimalString>)]
    amount: Option<String>,
    /// `standard` or `instant` (or `bank_transfer`): the policy's fee for it
    /// applies (default: the payee's method).
    #[serde(default)]
    #[schema(pattern = "^(standard|instant|bank_transfer)$")]
    method: Option<String>,
    /// The caller's key, unique per payee (1 to 255 characters): a replay
    /// answers the first request. Or the `Idempotency-Key` header.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255)]
    idempotency_key: Option<String>,
}

/// A refusal of a payout request that names the releasable balance.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RequestRefusal {
    /// What is wrong.
    error: String,
    /// The releasable balance (gross of released, unsettled earnings), when
    /// the refusal is about it.
    #[schema(value_type = Option<crate::domain::DecimalString>)]
    available: Option<rust_decimal::Decimal>,
    /// Its currency.
    currency: Option<String>,
}

/// `POST /api/v1/payees/{id}/payout-requests` (integration, operator):
/// settles the payee's released, unsettled earnings now (up to `amount`)
/// into one payout with its lines, due now ahead of the scheduled backlog;
/// the payee's schedule is not moved. 201 with what it made; 200 with the
/// same answer for a replay of the idempotency key. 409 for a suspended
/// payee or a key used with other parameters; 422 for an unknown currency
/// or method, a bad amount, more than the releasable balance or nothing
/// released (naming `available`), or a payout the policy would not make.
#[utoipa::path(
    post,
    path = "/api/v1/payees/{id}/payout-requests",
    tag = "payees",
    params(
        IdParam,
        ("Idempotency-Key" = Option<String>, Header, description = "The idempotency key, instead of `idempotency_key` in the body"),
    ),
    request_body = PayoutRequestBody,
    security(("bearer" = ["operator", "admin", "integration"])),
    responses(
        (status = 201, description = "Requested: the payout made, its settlement and lines", body = crate::services::payout_requests::Requested),
        (status = 200, description = "A replay: the first request's answer (`replayed`), nothing done", body = crate::services::payout_requests::Requested),
        (status = 400, description = "The id or the body is not valid, or the idempotency key is missing", body = ErrorBody),
        (status = 404, description = "No such payee", body = ErrorBody),
        (status = 409, description = "The payee is suspended, or the idempotency key was used with other parameters (named)", body = ErrorBody),
        (status = 422, description = "An unknown currency or method, an amount not positive or finer than the currency, more than the releasable balance or nothing released (`available` named), or a payout the policy would not make", body = RequestRefusal),
    )
)]
pub(crate) async fn payout_request(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(raw): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<axum::response::Response, ApiError> {
    use axum::{http::StatusCode, response::IntoResponse};

    use crate::services::payout_requests::{self as requests, RequestError};
    const ACTION: &str = "payout_request";
    c.permit(Permission::RequestPayout, "request a payout")?;
    let id = positive_id(&raw, "payee id")?;
    let body: PayoutRequestBody = json_body(&body)?;
    let header = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key: not visible ASCII".into()))?,
        ),
    };
    let key = match (body.idempotency_key.as_deref(), header) {
        (Some(b), Some(h)) if b != h => {
            return Err(ApiError::BadRequest(
                "idempotency_key: the body and the Idempotency-Key header differ".into(),
            ));
        }
        (Some(k), _) | (None, Some(k)) => k.to_string(),
        (None, None) => {
            return Err(ApiError::BadRequest(
                "idempotency_key: required (in the body or the Idempotency-Key header)".into(),
            ));
        }
    };
    let (actor, src) = (c.actor(), source.0.to_string());
    let by = By {
        actor: &actor,
        source: Some(&src),
        now: s.clock.now(),
    };
    let ask = requests::Ask {
        payee_id: id,
        currency: body.currency.as_deref(),
        amount: body.amount.as_deref(),
        method: body.method.as_deref(),
        idempotency_key: &key,
    };
    let count = |result: &str| {
        metrics::ADMIN_ACTIONS
            .with_label_values(&[ACTION, result])
            .inc()
    };
    match requests::request(&s.pool, &policy(&s)?, &ask, by).await {
        Ok(r) => {
            count(if r.replayed { "replayed" } else { "ok" });
            let code = if r.replayed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((code, Json(r)).into_response())
        }
        Err(RequestError::NotFound(id)) => {
            count("not_found");
            Err(ApiError::NotFound(format!("payee {id} not found")))
        }
        Err(RequestError::Conflict(m)) => {
            count("conflict");
            Err(ApiError::Conflict {
                message: m,
                status: None,
            })
        }
        Err(RequestError::Invalid(m)) => {
            count("bad_input");
            Err(ApiError::BadRequest(m))
        }
        Err(RequestError::Unprocessable {
            message,
            available,
            currency,
        }) => {
            count("refused");
            metrics::ADMIN_REFUSED
                .with_label_values(&["bad_input"])
                .inc();
            let body = RequestRefusal {
                error: message,
                available,
                currency,
            };
            Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response())
        }
        Err(RequestError::Db(e)) => {
            count("error");
            Err(e.into())
        }
    }
}

//! The platform's side of the admin API (#17): payee management (suspend,
//! resume, change of gateway account) and, for the platform's backend
//! (the `integration` role), a payee's balances, earnings, payouts and
//! upcoming payout. Mounted by [`super::router`] behind
//! [`super::auth::authenticate`]; every handler checks its own
//! [`Permission`].

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, State},
    middleware,
    routing::post,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AdminState, ApiError,
    api::{json_body, positive_id},
    auth::{self, Caller, Source},
};
use crate::{
    db::tokens::Permission,
    metrics,
    services::payees::{self as payee_service, By, PayeeError},
};

/// The routes of this module, authenticated.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/api/v1/payees/{id}/suspend", post(suspend))
        .route("/api/v1/payees/{id}/resume", post(resume))
        .route("/api/v1/payees/{id}/account", post(account).put(account))
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

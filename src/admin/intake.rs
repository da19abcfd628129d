//! `POST /v1/earnings`: the platform posts completed work. Idempotent by
//! (source, external_ref): `201` when recorded, `200` when the same work was
//! recorded before (nothing added), `409` when the reference is taken by
//! different work, `422` naming the bad field, `400` when the body is not
//! JSON. The same checks as `payoutctl earnings add`, including the
//! policy's per-currency maximum earning and completion-time horizon. Each
//! refusal is counted (`payout_earnings_refused_total`, by field); who
//! posted each earning (the caller's actor, `operator:NAME`) is stored with
//! it and logged.
//!
//! A `Router` only: mounting it into a server binary belongs to the admin
//! server (DESIGN.md `src/admin/`); tests serve it on port 0.

use std::sync::Arc;

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::json;
use sqlx::PgPool;

use crate::{
    admin::auth::Caller,
    clock::SharedClock,
    db::{earnings, payee_terms},
    domain::{Policy, earning::FieldError, earning::RawEarning},
    metrics,
};

/// What the endpoint needs.
#[derive(Clone)]
pub struct EarningsApi {
    /// The source of truth.
    pub pool: PgPool,
    /// The policy (hold period, payable currencies).
    pub policy: Arc<Policy>,
    /// Time.
    pub clock: SharedClock,
}

/// The router with `POST /v1/earnings`.
pub fn router(api: EarningsApi) -> Router {
    Router::new()
        .route("/v1/earnings", post(post_earning))
        .with_state(api)
}

fn unprocessable(e: FieldError) -> Response {
    metrics::EARNINGS_REFUSED
        .with_label_values(&[earnings::refused_label(&e.field)])
        .inc();
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"error": e.to_string(), "field": e.field})),
    )
        .into_response()
}

fn internal(e: sqlx::Error) -> Response {
    tracing::error!(error = %format_args!("{e:#}"), "failed to record an earning");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "the database is unavailable; try again"})),
    )
        .into_response()
}

/// The body of `POST /v1/earnings`: every value a string (an amount as a
/// JSON number would be a float).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EarningBody {
    /// The payee (a positive integer, as a string or a number).
    payee_id: String,
    /// Where the work comes from (`rides`, `bookings`, ...).
    source: String,
    /// The source's id for it; with `source`, the idempotency key of the post.
    external_ref: String,
    /// Gross amount, at most the currency's decimals.
    #[schema(value_type = crate::domain::DecimalString)]
    gross: String,
    /// ISO 4217 code, one the policy pays.
    currency: String,
    /// When the work was completed (RFC 3339; default now); held for the
    /// policy's hold period from then.
    completed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What `POST /v1/earnings` recorded.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EarningRecorded {
    /// `true` (201) when recorded now, `false` (200) when the same earning
    /// was recorded before.
    created: bool,
    /// The earning.
    earning: crate::db::earnings::Earning,
}

/// `POST /v1/earnings`: records completed work, idempotent by `source` and
/// `external_ref`. Operator, admin or integration.
#[utoipa::path(
    post,
    path = "/v1/earnings",
    tag = "intake",
    request_body = EarningBody,
    security(("bearer" = ["operator", "admin", "integration"])),
    responses(
        (status = 201, description = "Recorded", body = EarningRecorded),
        (status = 200, description = "Recorded before (the same body)", body = EarningRecorded),
        (status = 400, description = "The body is not JSON", body = crate::admin::openapi::ErrorBody),
        (status = 409, description = "Recorded before with other values; `field` names the first that differs", body = crate::admin::openapi::ErrorBody),
        (status = 422, description = "A field is missing or not valid (an unknown payee, currency, a bad amount); `field` names it", body = crate::admin::openapi::ErrorBody),
    )
)]
pub(crate) async fn post_earning(
    State(api): State<EarningsApi>,
    caller: Option<Extension<Caller>>,
    body: Bytes,
) -> Response {
    // Who posts is recorded with the earning and logged (the admin server
    // authenticates every request to this router; `unknown` only in tests
    // that serve the router bare).
    let actor = caller.map_or_else(|| "unknown".to_string(), |Extension(c)| c.actor());
    let value: serde_json::Value = match crate::admin::strict_json::parse(&body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("the body is not JSON: {e}")})),
            )
                .into_response();
        }
    };
    let now = api.clock.now();
    let earning = match RawEarning::from_json(&value).and_then(|raw| raw.validate(&api.policy, now))
    {
        Ok(e) => e,
        Err(e) => return unprocessable(e),
    };
    let mut conn = match api.pool.acquire().await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    match payee_terms::existing(&mut conn, &[earning.payee_id]).await {
        Ok(found) if found.is_empty() => {
            return unprocessable(FieldError {
                field: "payee_id".into(),
                message: format!("payee {} not found", earning.payee_id),
            });
        }
        Ok(_) => {}
        Err(e) => return internal(e),
    }
    let recorded = match earnings::record(&mut conn, &earning, &actor, now).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    if let earnings::Recorded::Created(row) = &recorded {
        tracing::info!(
            earning = row.id,
            payee = row.payee_id.get(),
            gross = %row.gross,
            currency = %row.currency,
            actor = %actor,
            "earning recorded"
        );
    }
    if let Some(e) = recorded.conflict_error() {
        metrics::EARNINGS_REFUSED
            .with_label_values(&[earnings::refused_label(&e.field)])
            .inc();
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": e.to_string(), "field": e.field})),
        )
            .into_response();
    }
    let (status, created) = match recorded {
        earnings::Recorded::Created(_) => (StatusCode::CREATED, true),
        _ => (StatusCode::OK, false),
    };
    (
        status,
        Json(json!({"created": created, "earning": recorded.earning()})),
    )
        .into_response()
}

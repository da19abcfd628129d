//! `/api/v1/webhook-endpoints` and `/api/v1/webhook-deliveries`: the
//! platform's outbound webhook endpoints and their delivery log. Reading
//! needs a viewer; replays an operator; registering, changing, deleting and
//! rotating secrets an admin. A secret is in the answer that made it, and
//! nowhere else.

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AdminState, ApiError,
    api::json_body,
    auth::{Caller, Source},
};
use crate::{
    db::{tokens::Role, webhook_deliveries, webhook_endpoints},
    services::webhooks_out::{
        endpoints::{self, EndpointChange, EndpointError, NewEndpoint},
        safety::Policy,
    },
};

/// The routes (mounted inside the authenticated API).
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/v1/webhook-endpoints", get(list).post(create))
        .route(
            "/api/v1/webhook-endpoints/{id}",
            get(show).patch(update).delete(remove),
        )
        .route("/api/v1/webhook-endpoints/{id}/rotate-secret", post(rotate))
        .route("/api/v1/webhook-endpoints/{id}/replay", post(replay_since))
        .route("/api/v1/webhook-deliveries/{id}", get(delivery))
        .route("/api/v1/webhook-deliveries/{id}/replay", post(replay))
}

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::BadInput(m) => ApiError::BadRequest(m),
            e @ (EndpointError::NotFound(_) | EndpointError::MessageNotFound(_)) => {
                ApiError::NotFound(e.to_string())
            }
            EndpointError::Db(e) => e.into(),
        }
    }
}

fn policy(s: &AdminState) -> Policy {
    Policy::new(&s.settings.webhooks_out.allow_private)
}

fn id_of(raw: &str) -> Result<i64, ApiError> {
    super::api::positive_id(raw, "id")
}

/// `GET /api/v1/webhook-endpoints` (viewer): every endpoint, no secrets.
#[utoipa::path(get, path = "/api/v1/webhook-endpoints", operation_id = "list_webhook_endpoints", tag = "webhooks-out",
    responses((status = 200, description = "The endpoints", body = crate::admin::openapi::EndpointList)))]
pub async fn list(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Viewer)?;
    let endpoints = webhook_endpoints::list(&s.pool).await?;
    Ok(Json(json!({ "endpoints": endpoints })))
}

/// `POST /api/v1/webhook-endpoints` (admin): registers one; 201 with its secret, shown once.
#[utoipa::path(post, path = "/api/v1/webhook-endpoints", operation_id = "create_webhook_endpoint", tag = "webhooks-out",
    request_body = crate::admin::openapi::EndpointBody, security(("bearer" = ["admin"])),
    responses(
        (status = 201, description = "Registered", body = crate::admin::openapi::EndpointCreated),
        (status = 400, description = "The url, an event type or the body is not valid", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn create(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    body: Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let new = NewEndpoint::from_json(json_body(&body)?)?;
    let src = source.0.to_string();
    let now = s.clock.now();
    let (id, secret) =
        endpoints::register(&s.pool, &policy(&s), &new, &c.actor(), Some(&src), now).await?;
    tracing::info!(actor = %c.actor(), endpoint_id = id, "webhook endpoint registered");
    let endpoint = webhook_endpoints::get(&s.pool, id).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"endpoint": endpoint, "secret": secret.expose_secret()})),
    )
        .into_response())
}

/// `GET /api/v1/webhook-endpoints/{id}` (viewer): the endpoint and its newest
/// messages, each with its delivery log (`log`, oldest attempt first).
#[utoipa::path(get, path = "/api/v1/webhook-endpoints/{id}", operation_id = "show_webhook_endpoint", tag = "webhooks-out",
    params(crate::admin::openapi::IdParam),
    responses(
        (status = 200, description = "The endpoint and its newest 100 messages", body = crate::admin::openapi::EndpointDetail),
        (status = 400, description = "The id is not a positive integer", body = crate::admin::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn show(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<crate::admin::openapi::EndpointDetail>, ApiError> {
    c.require(Role::Viewer)?;
    let id = id_of(&id)?;
    let endpoint = webhook_endpoints::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("webhook endpoint {id} not found")))?;
    let deliveries = webhook_deliveries::for_endpoint(&s.pool, id, 100).await?;
    let ids: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    let attempts = webhook_deliveries::attempts_of(&s.pool, &ids).await?;
    Ok(Json(crate::admin::openapi::EndpointDetail {
        endpoint,
        deliveries: webhook_deliveries::DeliveryWithLog::join(deliveries, attempts),
    }))
}

/// `PATCH /api/v1/webhook-endpoints/{id}` (admin): url, event_types, description, enabled.
#[utoipa::path(patch, path = "/api/v1/webhook-endpoints/{id}", operation_id = "update_webhook_endpoint", tag = "webhooks-out",
    params(crate::admin::openapi::IdParam), request_body = crate::admin::openapi::EndpointBody, security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "Changed", body = crate::admin::openapi::EndpointChanged),
        (status = 400, description = "The id or the body is not valid", body = crate::admin::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn update(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Admin)?;
    let id = id_of(&id)?;
    let change = EndpointChange::from_json(json_body(&body)?)?;
    let src = source.0.to_string();
    endpoints::change(
        &s.pool,
        &policy(&s),
        id,
        &change,
        &c.actor(),
        Some(&src),
        s.clock.now(),
    )
    .await?;
    let endpoint = webhook_endpoints::get(&s.pool, id).await?;
    Ok(Json(json!({ "endpoint": endpoint })))
}

/// `DELETE /api/v1/webhook-endpoints/{id}` (admin): the endpoint and its messages.
#[utoipa::path(delete, path = "/api/v1/webhook-endpoints/{id}", operation_id = "delete_webhook_endpoint", tag = "webhooks-out",
    params(crate::admin::openapi::IdParam), security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "Deleted, with its messages", body = crate::admin::openapi::EndpointDeleted),
        (status = 400, description = "The id is not a positive integer", body = crate::admin::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn remove(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Admin)?;
    let id = id_of(&id)?;
    let src = source.0.to_string();
    endpoints::remove(&s.pool, id, &c.actor(), Some(&src), s.clock.now()).await?;
    Ok(Json(json!({ "deleted": id })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    #[serde(default)]
    overlap_secs: Option<u64>,
}

/// `POST /api/v1/webhook-endpoints/{id}/rotate-secret` (admin): a new
/// secret (shown once); the old one signs too for `overlap_secs`.
#[utoipa::path(post, path = "/api/v1/webhook-endpoints/{id}/rotate-secret", operation_id = "rotate_webhook_secret", tag = "webhooks-out",
    params(crate::admin::openapi::IdParam), request_body(content = Option<crate::admin::openapi::RotateBody>, description = "Optional"),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "A new secret", body = crate::admin::openapi::SecretRotated),
        (status = 400, description = "The id or the body is not valid", body = crate::admin::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn rotate(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Admin)?;
    let id = id_of(&id)?;
    let r: Rotate = json_body(&body)?;
    let overlap = r
        .overlap_secs
        .unwrap_or(s.settings.webhooks_out.rotation_overlap_secs);
    let src = source.0.to_string();
    let (secret, until) =
        endpoints::rotate(&s.pool, id, overlap, &c.actor(), Some(&src), s.clock.now()).await?;
    tracing::info!(actor = %c.actor(), endpoint_id = id, "webhook secret rotated");
    Ok(Json(
        json!({"id": id, "secret": secret.expose_secret(), "previous_until": until}),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Since {
    #[serde(default)]
    since: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /api/v1/webhook-endpoints/{id}/replay` (operator) `{"since": RFC 3339}`:
/// every message to it created since then, sent again; audited.
#[utoipa::path(post, path = "/api/v1/webhook-endpoints/{id}/replay", operation_id = "replay_webhook_endpoint", tag = "webhooks-out",
    params(crate::admin::openapi::IdParam), request_body = crate::admin::openapi::ReplayBody, security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "Queued again", body = crate::admin::openapi::Replayed),
        (status = 400, description = "The id is not valid or `since` is missing", body = crate::admin::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn replay_since(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Operator)?;
    let id = id_of(&id)?;
    let b: Since = json_body(&body)?;
    let since = b
        .since
        .ok_or_else(|| ApiError::BadRequest("since is required (RFC 3339)".into()))?;
    let src = source.0.to_string();
    let n =
        endpoints::replay_since(&s.pool, id, since, &c.actor(), Some(&src), s.clock.now()).await?;
    tracing::info!(actor = %c.actor(), endpoint_id = id, replayed = n, "webhook messages replayed");
    Ok(Json(json!({"endpoint_id": id, "replayed": n})))
}

/// `GET /api/v1/webhook-deliveries/{id}` (viewer): the delivery log of one message.
#[utoipa::path(get, path = "/api/v1/webhook-deliveries/{id}", operation_id = "show_webhook_delivery", tag = "webhooks-out",
    params(crate::admin::openapi::IdParam),
    responses(
        (status = 200, description = "The delivery log", body = crate::admin::openapi::DeliveryLog),
        (status = 400, description = "The id is not a positive integer", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn delivery(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Viewer)?;
    let id = id_of(&id)?;
    let attempts = webhook_deliveries::attempts(&s.pool, id).await?;
    Ok(Json(json!({"id": id, "attempts": attempts})))
}

/// `POST /api/v1/webhook-deliveries/{id}/replay` (operator): send it again now; audited.
#[utoipa::path(post, path = "/api/v1/webhook-deliveries/{id}/replay", operation_id = "replay_webhook_delivery", tag = "webhooks-out",
    params(crate::admin::openapi::IdParam), security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "Queued again", body = crate::admin::openapi::DeliveryReplayed),
        (status = 400, description = "The id is not a positive integer", body = crate::admin::openapi::ErrorBody),
        (status = 404, description = "No such message", body = crate::admin::openapi::ErrorBody),
    ))]
pub async fn replay(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Operator)?;
    let id = id_of(&id)?;
    let src = source.0.to_string();
    endpoints::replay(&s.pool, id, &c.actor(), Some(&src), s.clock.now()).await?;
    tracing::info!(actor = %c.actor(), delivery_id = id, "webhook message replayed");
    Ok(Json(json!({"id": id, "status": "pending"})))
}

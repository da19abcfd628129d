//! The JSON API under `/api/v1` (described by the OpenAPI document that
//! [`super::openapi`] generates from these handlers' annotations and
//! answer types). Every handler runs after [`super::auth::authenticate`], so
//! a [`Caller`] is always there.

use std::collections::BTreeMap;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{
    AdminState, ApiError,
    auth::Caller,
    auth::Source,
    auth::Via,
    openapi::{IdParam, ListParams, PageParams},
};
use crate::{
    db::{
        audit::AuditEntry,
        events::{self, PayoutEvent},
        filter::{self, FailureGroup, PageRequest, PayoutFilter},
        payees::{self, Payee},
        payouts::{self, ActionError, Payout},
        reconcile_runs::Run,
        search::Hit,
        settlements::{LineRow, SettlementRow},
        tokens::{self, Role, TokenInfo},
        webhook_events,
    },
    domain::{DecimalString, PayeeId, PayoutId, PayoutStatus},
    metrics,
};

/// `GET /api/v1/session`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionInfo {
    /// The token's name (the actor in event histories).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// How actions are recorded (`operator:<name>`, ...).
    pub actor: String,
    /// A browser session's CSRF secret, to send as `X-CSRF-Token` with every
    /// request but a GET; `null` for a bearer token.
    pub csrf: Option<String>,
}

/// `GET /api/v1/session`: who you are, and the CSRF secret of a browser session.
#[utoipa::path(
    get,
    path = "/api/v1/session",
    tag = "access",
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses((status = 200, description = "The caller", body = SessionInfo))
)]
pub async fn session(Extension(c): Extension<Caller>) -> Json<SessionInfo> {
    let csrf = match &c.via {
        Via::Session { csrf } => Some(csrf.clone()),
        Via::Bearer => None,
    };
    Json(SessionInfo {
        name: c.principal.name.clone(),
        role: c.principal.role,
        actor: c.actor(),
        csrf,
    })
}

/// `GET /api/v1/overview`: the fleet at a glance (cached for
/// `admin.overview_cache_ms`).
#[utoipa::path(
    get,
    path = "/api/v1/overview",
    tag = "fleet",
    responses((status = 200, description = "Overview", body = super::overview::Overview))
)]
pub async fn overview(State(s): State<AdminState>) -> Result<Response, ApiError> {
    let o = s.overview.get(&s).await?;
    Ok(Json(&*o).into_response())
}

pub(crate) fn pairs(q: &Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|_| ApiError::BadRequest("the query string is not valid form encoding".into()))?;
    if let Some((k, _)) = pairs.iter().find(|(k, v)| has_control(k) || has_control(v)) {
        return Err(ApiError::BadRequest(format!(
            "query parameter {:?} contains a control character",
            short(k)
        )));
    }
    Ok(pairs)
}

/// A control character (a NUL, a terminal escape); tabs and line breaks
/// are text.
fn has_control(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

/// The first string of `v` (a JSON body) holding a control character, as
/// the path of its field.
fn control_in(v: &Value, path: &str) -> Option<String> {
    match v {
        Value::String(s) if has_control(s) => Some(if path.is_empty() {
            "body".into()
        } else {
            path.into()
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| control_in(x, &format!("{path}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            if has_control(k) {
                Some(p)
            } else {
                control_in(x, &p)
            }
        }),
        _ => None,
    }
}

/// Parses a list query (filters, `limit`, `cursor`).
pub fn parse_page(query: &Option<String>) -> Result<PageRequest, ApiError> {
    let pairs = pairs(query)?;
    PageRequest::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// `GET /api/v1/payouts?…`: a page, newest first, and the next page's cursor.
///
/// Keyset-paginated; the filters combine with AND.
#[utoipa::path(
    get,
    path = "/api/v1/payouts",
    operation_id = "list_payouts",
    tag = "payouts",
    params(PayoutFilter, PageParams),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "A page", body = filter::Page),
        (status = 400, description = "A filter, `limit` or `cursor` is not valid", body = super::openapi::ErrorBody),
    )
)]
pub async fn list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<filter::Page>, ApiError> {
    let req = parse_page(&q)?;
    Ok(Json(filter::page(&s.pool, &req).await?))
}

/// One attempt at the gateway, read off the event history: from the claim
/// (`-> processing`) to the event that left `processing`.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Attempt {
    /// The attempt number (the fencing token).
    pub attempt: i32,
    /// Claimed.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Left `processing`; `None` while running.
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Where it went (`paid`, `in_transit`, `retrying`, `failed`, `queued` after a lease expiry).
    pub outcome: Option<String>,
    /// Why (the gateway's code and message, or the sweep's reason).
    pub reason: Option<String>,
    /// Which worker.
    pub worker: String,
}

/// The attempts in `events` (oldest first).
pub fn attempts(events: &[PayoutEvent]) -> Vec<Attempt> {
    let mut out: Vec<Attempt> = Vec::new();
    for e in events {
        if e.to_status == "processing" {
            out.push(Attempt {
                attempt: e.attempt.unwrap_or(0),
                started_at: e.at,
                finished_at: None,
                outcome: None,
                reason: None,
                worker: e.actor.clone(),
            });
        } else if e.from_status.as_deref() == Some("processing")
            && let Some(a) = out.last_mut().filter(|a| a.finished_at.is_none())
        {
            a.finished_at = Some(e.at);
            a.outcome = Some(e.to_status.clone());
            a.reason = e.reason.clone();
        }
    }
    out
}

/// What an operator may do to a payout in `status`.
pub fn actions_for(status: PayoutStatus) -> Vec<&'static str> {
    let mut out = Vec::new();
    if status == PayoutStatus::Failed {
        out.push("retry");
    }
    if matches!(
        status,
        PayoutStatus::Pending
            | PayoutStatus::Queued
            | PayoutStatus::Retrying
            | PayoutStatus::Failed
            | PayoutStatus::Held
    ) {
        out.push("cancel");
    }
    if matches!(
        status,
        PayoutStatus::Pending | PayoutStatus::Retrying | PayoutStatus::Held
    ) {
        out.push("enqueue");
    }
    out
}

fn payout_id(raw: &str) -> Result<PayoutId, ApiError> {
    positive_id(raw, "payout id").map(PayoutId::new)
}

pub(crate) fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The payee of a payout, as its detail shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PayoutPayee {
    /// Id.
    #[schema(value_type = i64)]
    pub id: PayeeId,
    /// Display name.
    pub name: String,
    /// Its account at the gateway (where its payouts not yet sent go).
    pub gateway_account: String,
    /// Its currency.
    pub currency: String,
    /// `active` or `suspended`.
    pub status: String,
}

/// A gateway webhook that named a payout.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WebhookSeen {
    /// `gateway` or `stripe`.
    pub source: String,
    /// The event's id at the gateway.
    pub event_id: String,
    /// The event's type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// What it did (`paid`, `failed`, `duplicate`, `already_paid`, ...).
    pub outcome: String,
    /// When it arrived.
    pub received_at: chrono::DateTime<chrono::Utc>,
}

/// `GET /api/v1/payouts/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PayoutDetail {
    /// The payout (its amount at its currency's exponent).
    pub payout: Payout,
    /// The idempotency key its gateway requests carry now.
    pub idempotency_key: String,
    /// Its payee.
    pub payee: Option<PayoutPayee>,
    /// Its attempts at the gateway, oldest first.
    pub attempts: Vec<Attempt>,
    /// Its history, oldest first.
    pub events: Vec<PayoutEvent>,
    /// The gateway webhooks that named it.
    pub webhooks: Vec<WebhookSeen>,
    /// What the caller may do to it now (`retry`, `cancel`, `enqueue`).
    pub actions: Vec<&'static str>,
    /// A settlement payout's line items, in order (empty for other payouts).
    pub lines: Vec<LineRow>,
}

/// `GET /api/v1/payouts/{id}`: the payout, its payee, its history, its
/// attempts, the webhooks that named it, and the actions legal now.
#[utoipa::path(
    get,
    path = "/api/v1/payouts/{id}",
    operation_id = "show_payout",
    tag = "payouts",
    params(IdParam),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "The payout", body = PayoutDetail),
        (status = 400, description = "The id is not a positive integer", body = super::openapi::ErrorBody),
        (status = 404, description = "No such payout", body = super::openapi::ErrorBody),
    )
)]
pub async fn payout(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<PayoutDetail>, ApiError> {
    let id = payout_id(&raw)?;
    let p = payouts::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("payout {id} not found")))?
        .with_currency_scale();
    let payee = payees::get(&s.pool, p.payee_id).await?;
    let events = events::for_payout(&s.pool, id.get()).await?;
    let hooks = webhook_events::for_payout(&s.pool, id.get()).await?;
    let actions: Vec<&str> = if c.principal.role.allows(tokens::Permission::ActOnPayout) {
        actions_for(p.status)
    } else {
        Vec::new()
    };
    Ok(Json(PayoutDetail {
        idempotency_key: p.idempotency_key(),
        payout: p,
        payee: payee.map(|y| PayoutPayee {
            id: y.id,
            name: y.name,
            gateway_account: y.gateway_account,
            currency: y.currency,
            status: y.status,
        }),
        attempts: attempts(&events),
        events,
        webhooks: hooks
            .into_iter()
            .map(|h| WebhookSeen {
                source: h.source,
                event_id: h.event_id,
                event_type: h.event_type,
                outcome: h.outcome,
                received_at: h.received_at,
            })
            .collect(),
        actions,
        lines: crate::db::settlements::lines_for_payout(&s.pool, id.get()).await?,
    }))
}

/// The body of an action (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ActionBody {
    /// Why, in the operator's words (at most 500 characters kept); recorded
    /// in the payout's event.
    #[serde(default)]
    #[schema(max_length = 500)]
    reason: Option<String>,
}

pub(crate) fn json_body<T: for<'de> Deserialize<'de> + Default>(
    body: &Bytes,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) || body.as_ref() == b"null" {
        return Ok(T::default());
    }
    let value = super::strict_json::parse(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not the expected JSON: {e}")))?;
    if let Some(field) = control_in(&value, "") {
        return Err(ApiError::BadRequest(format!(
            "{} contains a control character",
            short(&field)
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("the body is not the expected JSON: {e}")))
}

fn conflict(e: ActionError, action: &str) -> ApiError {
    match e {
        ActionError::NotFound(id) => {
            metrics::ADMIN_ACTIONS
                .with_label_values(&[action, "not_found"])
                .inc();
            ApiError::NotFound(format!("payout {id} not found"))
        }
        ActionError::Illegal(t) => {
            metrics::ADMIN_ACTIONS
                .with_label_values(&[action, "conflict"])
                .inc();
            ApiError::Conflict {
                message: format!("cannot {action} payout {}: it is {}", t.id, t.from),
                status: Some(t.from.as_str().to_string()),
            }
        }
        e @ ActionError::PayeeSuspended { .. } => {
            metrics::ADMIN_ACTIONS
                .with_label_values(&[action, "conflict"])
                .inc();
            ApiError::Conflict {
                message: format!("cannot {action}: {e}"),
                status: None,
            }
        }
        ActionError::Db(e) => e.into(),
    }
}

/// A cancel refused: by the lifecycle (as [`conflict`]), or because the
/// gateway holds a transfer for the payout or could not be asked (409 with
/// the reason and the payout's status, when known).
fn cancel_refused(e: crate::services::reconcile::CancelError) -> ApiError {
    match e {
        crate::services::reconcile::CancelError::Action(e) => conflict(e, "cancel"),
        other => {
            metrics::ADMIN_ACTIONS
                .with_label_values(&["cancel", "conflict"])
                .inc();
            ApiError::Conflict {
                message: other.to_string(),
                status: other.status().map(|s| s.as_str().to_string()),
            }
        }
    }
}

async fn push(s: &AdminState, ids: &[PayoutId]) -> bool {
    match s.queue.push_manual(ids).await {
        Ok(()) => true,
        Err(e) => {
            // The payouts are `queued` with a lease in Postgres: the
            // producer's sweep pushes them when it expires.
            tracing::warn!(error = %format!("{e:#}"), n = ids.len(), "could not push jobs; the lease sweep will");
            false
        }
    }
}

/// [`push`] at the front of the queue.
async fn push_front(s: &AdminState, ids: &[PayoutId]) -> bool {
    match s.queue.push_manual_front(ids).await {
        Ok(()) => true,
        Err(e) => {
            // Queued with a lease in Postgres: the lease sweep pushes them.
            tracing::warn!(error = %format!("{e:#}"), n = ids.len(), "could not push jobs; the lease sweep will");
            false
        }
    }
}

/// What an action did.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ActionResult {
    /// The payout.
    #[schema(value_type = i64)]
    pub id: PayoutId,
    /// Its status before.
    pub from: PayoutStatus,
    /// Its status now.
    pub to: PayoutStatus,
    /// Whether its job was pushed to Redis now (`false`: the producer's
    /// lease sweep pushes it shortly).
    pub pushed: bool,
}

/// `POST /api/v1/payouts/{id}/{retry|cancel|enqueue}` (operator).
///
/// `retry`: failed -> queued; `cancel`: pending, queued, retrying, failed or
/// held -> cancelled (a payout that was sent and could have moved money is
/// looked up at the gateway first: a transfer there refuses the cancel and
/// is recorded; a failed look-up refuses it); `enqueue` ("process now"):
/// pending, retrying or held -> queued now, with priority 2 (process now)
/// and its job at the front of the queue. 409 when the payout's status does not allow it
/// (the body's `status` says which it is) or its payee is suspended.
#[utoipa::path(
    post,
    path = "/api/v1/payouts/{id}/{action}",
    operation_id = "act_on_payout",
    tag = "payouts",
    params(
        IdParam,
        ("action" = String, Path, description = "`retry`, `cancel` or `enqueue`", pattern = "^(retry|cancel|enqueue)$"),
    ),
    request_body(content = Option<ActionBody>, description = "Optional"),
    security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "Done", body = ActionResult),
        (status = 400, description = "The id or the body is not valid", body = super::openapi::ErrorBody),
        (status = 404, description = "No such payout, or no such action", body = super::openapi::ErrorBody),
        (status = 409, description = "Not legal from the payout's status (`status` says it), its payee is suspended, or the gateway holds a transfer for it (cancel)", body = super::openapi::ErrorBody),
    )
)]
pub async fn action(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path((raw, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<ActionResult>, ApiError> {
    c.require(Role::Operator)?;
    let id = payout_id(&raw)?;
    let body: ActionBody = json_body(&body)?;
    let reason = body
        .reason
        .map(|r| r.trim().chars().take(500).collect::<String>());
    let now = s.clock.now();
    let lease = now + chrono::Duration::seconds(s.settings.producer.queue_lease_secs as i64);
    let actor = c.actor();
    // The operator's words, when given, after the action's own.
    let said = |what: &str| match reason.as_deref().filter(|r| !r.is_empty()) {
        Some(r) => format!("{what}: {r}"),
        None => what.to_string(),
    };
    let (from, to) = match action.as_str() {
        "retry" => (
            payouts::retry_because(&s.pool, id, &actor, &said("operator retry"), lease, now)
                .await
                .map_err(|e| conflict(e, "retry"))?,
            PayoutStatus::Queued,
        ),
        "enqueue" => (
            payouts::enqueue_now_because(&s.pool, id, &actor, &said("manual enqueue"), lease, now)
                .await
                .map_err(|e| conflict(e, "enqueue"))?,
            PayoutStatus::Queued,
        ),
        "cancel" => {
            let why = reason
                .clone()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "cancelled by operator".into());
            // The one cancel: asks the gateway first (through the fleet's
            // limiter) when the payout was sent and no answer proved that
            // nothing moved.
            let gateway = async || {
                crate::gateway::select::lookup_limited(
                    &s.settings.gateway,
                    s.queue.conn(),
                    &s.settings.redis.prefix,
                )
            };
            (
                crate::services::reconcile::cancel(&s.pool, gateway, id, &actor, &why, now)
                    .await
                    .map_err(cancel_refused)?,
                PayoutStatus::Cancelled,
            )
        }
        other => {
            return Err(ApiError::NotFound(format!(
                "no action {:?} (retry, cancel or enqueue)",
                short(other)
            )));
        }
    };
    let pushed = to != PayoutStatus::Queued
        || if action == "enqueue" {
            // "Process now": ahead of the window already waiting.
            push_front(&s, &[id]).await
        } else {
            push(&s, &[id]).await
        };
    metrics::ADMIN_ACTIONS
        .with_label_values(&[action.as_str(), "ok"])
        .inc();
    tracing::info!(payout_id = id.get(), %actor, %action, from = %from, "operator action");
    Ok(Json(ActionResult {
        id,
        from,
        to,
        pushed,
    }))
}

/// The body of a bulk retry. Nothing moves unless the body says
/// `"dry_run": false` in so many words: a missing, empty or `null` body, or
/// one without `dry_run`, is a dry run (security finding 1: the derived
/// default used to retry everything).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkBody {
    /// The list's filters (`payee_id`, `currency`, `failure_code`, the time
    /// ranges), as strings; `status` may only be `failed`.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    filter: BTreeMap<String, Value>,
    /// The payouts selected by id (instead of a filter), 1 to 500: the
    /// failed ones never paid are retried one by one; the answer is a
    /// selection's.
    #[serde(default)]
    #[schema(value_type = Option<Vec<i64>>, min_items = 1, max_items = 500)]
    ids: Option<Vec<Value>>,
    /// Only `false` retries; absent or `true`: a dry run that counts.
    #[serde(default)]
    #[schema(default = true)]
    dry_run: Option<bool>,
}

/// The answer of a bulk retry or a bulk cancel: a count (`dry_run` true)
/// or what was done. Which fields appear depends on the request: by filter
/// (`matched`, `more_than_cap`, `cap`, `excluded_paid_before`, `filter` at
/// the count; `retried`, `pushed`, `first_id`, `last_id` when done) or by
/// selection (`selected`, `matched`, `not_found`, `skipped`, and when done
/// `retried` or `cancelled`, `ids`, `changed`, `refused`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BulkResult {
    /// Whether this only counted.
    pub dry_run: bool,
    /// How many payouts the filter or selection matched (that the action may move).
    pub matched: i64,
    /// By filter, counted: more than the cap matched.
    pub more_than_cap: Option<bool>,
    /// By filter, counted: `admin.bulk_max`.
    pub cap: Option<i64>,
    /// Failed payouts left out because they were paid before (reversed,
    /// returned): retry those by id.
    pub excluded_paid_before: Option<i64>,
    /// By filter, counted: the filter as understood.
    pub filter: Option<BTreeMap<String, String>>,
    /// By selection: how many ids were given (repeats dropped).
    pub selected: Option<i64>,
    /// By selection: ids that name no payout.
    pub not_found: Option<i64>,
    /// By selection: payouts the action does not apply to now.
    pub skipped: Option<Vec<BulkRow>>,
    /// Done: how many were retried.
    pub retried: Option<i64>,
    /// Done: how many were cancelled.
    pub cancelled: Option<i64>,
    /// Done: whether their jobs were pushed to Redis now.
    pub pushed: Option<bool>,
    /// Done by filter: the first and last id retried.
    pub first_id: Option<i64>,
    /// Done by filter: the last id retried.
    pub last_id: Option<i64>,
    /// Done by selection: the ids moved.
    pub ids: Option<Vec<i64>>,
    /// Done by selection: payouts that moved meanwhile (or whose payee is suspended).
    pub changed: Option<Vec<BulkRow>>,
    /// Done by selection (cancel): payouts the gateway check refused, with `error`.
    pub refused: Option<Vec<BulkRow>>,
}

/// One payout of a selection that was not moved, and why.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BulkRow {
    /// The payout.
    pub id: i64,
    /// Its status (when known).
    pub status: Option<String>,
    /// Paid before it failed (bulk retry).
    pub paid_before: Option<bool>,
    /// `suspended` when its payee is.
    pub payee: Option<String>,
    /// Why the gateway check refused a cancel.
    pub error: Option<String>,
}

fn filter_of(raw: &BTreeMap<String, Value>) -> Result<PayoutFilter, ApiError> {
    let mut f = PayoutFilter::default();
    for (k, v) in raw {
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Null => continue,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "filter {:?}: expected a string",
                    short(k)
                )));
            }
        };
        if k == "status" && !v.is_empty() && v != "failed" {
            return Err(ApiError::BadRequest(
                "bulk retry acts on failed payouts only: status must be failed or absent".into(),
            ));
        }
        f.set(k, &v)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    Ok(f)
}

/// `POST /api/v1/payouts/bulk-retry` (admin): a dry run (the default) only
/// counts the failed payouts the filter matches; `"dry_run": false` with a
/// filter that narrows the failed set retries them (at most
/// `admin.bulk_max`) and pushes their jobs. Payouts that were paid before
/// they failed (reversed, returned) are never part of a bulk retry: retrying
/// one pays again, so it is done by name (`/payouts/{id}/retry`). With `ids`
/// instead of a filter: the selected payouts (the dashboard's selected rows),
/// same rules.
#[utoipa::path(
    post,
    path = "/api/v1/payouts/bulk-retry",
    tag = "payouts",
    request_body(content = Option<BulkBody>, description = "Optional: without one, a dry run over every failed payout"),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The count, or what was retried", body = BulkResult),
        (status = 400, description = "The body is not valid, or a real run's filter does not narrow the failed payouts", body = super::openapi::ErrorBody),
    )
)]
pub async fn bulk_retry(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Admin)?;
    let body: BulkBody = json_body(&body)?;
    if let Some(ids) = &body.ids {
        if !body.filter.is_empty() {
            return Err(ApiError::BadRequest(
                "ids: give either ids or a filter, not both".into(),
            ));
        }
        let ids = selected_ids(ids, MAX_SELECTED.min(s.settings.admin.bulk_max))?;
        return bulk_retry_ids(&s, &c, &ids, body.dry_run != Some(false)).await;
    }
    let f = filter_of(&body.filter)?;
    let cap = s.settings.admin.bulk_max;
    if body.dry_run != Some(false) {
        let n = filter::count_failed(&s.pool, &f, cap).await?;
        let excluded = filter::count_failed_after_paid(&s.pool, &f, cap).await?;
        return Ok(Json(json!({
            "dry_run": true, "matched": n.min(cap), "more_than_cap": n > cap, "cap": cap,
            "excluded_paid_before": excluded, "filter": f.pairs(),
        })));
    }
    if !f.narrows_failed() {
        metrics::ADMIN_ACTIONS
            .with_label_values(&["bulk_retry", "refused"])
            .inc();
        return Err(ApiError::BadRequest(
            "a bulk retry (dry_run false) needs a filter that narrows the failed payouts \
             (payee_id, currency, failure_code or a time range); count first with a dry run"
                .into(),
        ));
    }
    let now = s.clock.now();
    let lease = now + chrono::Duration::seconds(s.settings.producer.queue_lease_secs as i64);
    let ids = payouts::bulk_retry(&s.pool, &f, cap, &c.actor(), lease, now).await?;
    let pushed = ids.is_empty() || push(&s, &ids).await;
    metrics::ADMIN_ACTIONS
        .with_label_values(&["bulk_retry", "ok"])
        .inc();
    tracing::info!(actor = %c.actor(), n = ids.len(), "operator bulk retry");
    Ok(Json(json!({
        "dry_run": false, "matched": ids.len(), "retried": ids.len(), "pushed": pushed,
        "first_id": ids.first(), "last_id": ids.last(),
    })))
}

/// The most payouts one selection may name: each moves through the single
/// action, one statement after another, within the request's timeout (a
/// filter moves more, in one statement).
const MAX_SELECTED: i64 = 500;

/// The ids of a selection: 1 to `cap` positive ids, repeats dropped.
fn selected_ids(ids: &[Value], cap: i64) -> Result<Vec<i64>, ApiError> {
    if ids.is_empty() || ids.len() as i64 > cap {
        return Err(ApiError::BadRequest(format!(
            "ids: expected 1 to {cap} payout ids, got {}",
            ids.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len());
    for v in ids {
        match v.as_i64().filter(|id| *id > 0) {
            Some(id) => out.push(id),
            None => {
                return Err(ApiError::BadRequest(format!(
                    "ids: {} is not a payout id",
                    short(&v.to_string())
                )));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A bulk retry of the payouts selected by id: the failed ones that were
/// never paid, each through the single retry (`failed` -> `queued`, fresh
/// budget, an event by the caller); the rest are reported and left alone.
async fn bulk_retry_ids(
    s: &AdminState,
    c: &Caller,
    ids: &[i64],
    dry_run: bool,
) -> Result<Json<Value>, ApiError> {
    let rows = filter::selected(&s.pool, ids).await?;
    let (eligible, rest): (Vec<_>, Vec<_>) = rows
        .into_iter()
        .partition(|r| r.status == "failed" && !r.paid_before);
    let paid_before = rest.iter().filter(|r| r.paid_before).count();
    let missing = ids.len() - eligible.len() - rest.len();
    let skipped: Vec<Value> = rest
        .iter()
        .map(|r| json!({"id": r.id, "status": r.status, "paid_before": r.paid_before}))
        .collect();
    if dry_run {
        return Ok(Json(json!({
            "dry_run": true, "selected": ids.len(), "matched": eligible.len(),
            "excluded_paid_before": paid_before, "not_found": missing, "skipped": skipped,
        })));
    }
    let now = s.clock.now();
    let lease = now + chrono::Duration::seconds(s.settings.producer.queue_lease_secs as i64);
    let actor = c.actor();
    let mut retried = Vec::new();
    let mut changed = Vec::new();
    for r in &eligible {
        match payouts::retry_because(
            &s.pool,
            PayoutId::new(r.id),
            &actor,
            "operator bulk retry",
            lease,
            now,
        )
        .await
        {
            Ok(_) => retried.push(PayoutId::new(r.id)),
            Err(ActionError::Db(e)) => return Err(e.into()),
            // Moved meanwhile (or its money went back to the balance).
            Err(ActionError::Illegal(t)) => {
                changed.push(json!({"id": r.id, "status": t.from.as_str()}))
            }
            Err(ActionError::PayeeSuspended { id, .. }) => {
                changed.push(json!({"id": id, "status": r.status.as_str(), "payee": "suspended"}))
            }
            Err(ActionError::NotFound(_)) => {}
        }
    }
    let pushed = retried.is_empty() || push(s, &retried).await;
    metrics::ADMIN_ACTIONS
        .with_label_values(&["bulk_retry", "ok"])
        .inc();
    tracing::info!(%actor, n = retried.len(), "operator bulk retry of selected payouts");
    Ok(Json(json!({
        "dry_run": false, "selected": ids.len(), "matched": eligible.len(),
        "retried": retried.len(), "pushed": pushed, "ids": retried,
        "excluded_paid_before": paid_before, "not_found": missing,
        "skipped": skipped, "changed": changed,
    })))
}

/// The body of a bulk cancel.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkCancelBody {
    /// The payouts selected, 1 to 500 (and at most `admin.bulk_max`).
    #[serde(default)]
    #[schema(value_type = Vec<i64>, min_items = 1, max_items = 500)]
    ids: Vec<Value>,
    /// Only `false` cancels; absent or `true`: a dry run that counts.
    #[serde(default)]
    #[schema(default = true)]
    dry_run: Option<bool>,
    /// Why (at most 500 characters kept), recorded in each payout's event.
    #[serde(default)]
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// `POST /api/v1/payouts/bulk-cancel` (operator): the payouts selected by
/// id. A dry run (the default, as for a bulk retry) counts those whose status
/// allows a cancel now; `"dry_run": false` cancels each through the single
/// cancel (`reconcile::cancel`, as `/payouts/{id}/cancel`: the gateway is
/// asked first about a payout that may have moved money; one event each) and
/// reports those that moved meanwhile (`changed`) or that the gateway check
/// refused (`refused`, with the reason).
#[utoipa::path(
    post,
    path = "/api/v1/payouts/bulk-cancel",
    tag = "payouts",
    request_body = BulkCancelBody,
    security(("bearer" = ["operator", "admin"])),
    responses(
        (status = 200, description = "The count, or what was cancelled", body = BulkResult),
        (status = 400, description = "The body or its ids are not valid", body = super::openapi::ErrorBody),
    )
)]
pub async fn bulk_cancel(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Operator)?;
    let body: BulkCancelBody = json_body(&body)?;
    let ids = selected_ids(&body.ids, MAX_SELECTED.min(s.settings.admin.bulk_max))?;
    let rows = filter::selected(&s.pool, &ids).await?;
    let can = |st: &str| {
        st.parse::<PayoutStatus>()
            .is_ok_and(|st| actions_for(st).contains(&"cancel"))
    };
    let (eligible, rest): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| can(&r.status));
    let missing = ids.len() - eligible.len() - rest.len();
    let skipped: Vec<Value> = rest
        .iter()
        .map(|r| json!({"id": r.id, "status": r.status}))
        .collect();
    if body.dry_run != Some(false) {
        return Ok(Json(json!({
            "dry_run": true, "selected": ids.len(), "matched": eligible.len(),
            "not_found": missing, "skipped": skipped,
        })));
    }
    let why = body
        .reason
        .map(|r| r.trim().chars().take(500).collect::<String>())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "cancelled by operator (bulk)".into());
    let now = s.clock.now();
    let actor = c.actor();
    let mut cancelled = Vec::new();
    let mut changed = Vec::new();
    let mut refused = Vec::new();
    for r in &eligible {
        // The one cancel, as `/payouts/{id}/cancel`: it asks the gateway
        // first when the payout was sent and nothing proved no money moved.
        let gateway = async || {
            crate::gateway::select::lookup_limited(
                &s.settings.gateway,
                s.queue.conn(),
                &s.settings.redis.prefix,
            )
        };
        match crate::services::reconcile::cancel(
            &s.pool,
            gateway,
            PayoutId::new(r.id),
            &actor,
            &why,
            now,
        )
        .await
        {
            Ok(_) => cancelled.push(r.id),
            Err(crate::services::reconcile::CancelError::Action(ActionError::Db(e))) => {
                return Err(e.into());
            }
            Err(crate::services::reconcile::CancelError::Action(ActionError::Illegal(t))) => {
                changed.push(json!({"id": r.id, "status": t.from.as_str()}))
            }
            Err(crate::services::reconcile::CancelError::Action(ActionError::NotFound(_))) => {}
            Err(e) => refused.push(json!({
                "id": r.id, "status": e.status().map(|st| st.as_str()), "error": e.to_string(),
            })),
        }
    }
    metrics::ADMIN_ACTIONS
        .with_label_values(&["bulk_cancel", "ok"])
        .inc();
    tracing::info!(%actor, n = cancelled.len(), "operator bulk cancel");
    Ok(Json(json!({
        "dry_run": false, "selected": ids.len(), "matched": eligible.len(),
        "cancelled": cancelled.len(), "ids": cancelled, "not_found": missing,
        "skipped": skipped, "changed": changed, "refused": refused,
    })))
}

/// `GET /api/v1/failures`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Failures {
    /// Largest group first.
    pub groups: Vec<FailureGroup>,
}

/// `GET /api/v1/failures`: failed payouts grouped by code.
#[utoipa::path(
    get,
    path = "/api/v1/failures",
    tag = "payouts",
    responses((status = 200, description = "Groups", body = Failures))
)]
pub async fn failures(State(s): State<AdminState>) -> Result<Json<Failures>, ApiError> {
    Ok(Json(Failures {
        groups: filter::failure_groups(&s.pool).await?,
    }))
}

/// `GET /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenList {
    /// Every token, revoked and expired ones included; never the secret.
    pub tokens: Vec<TokenInfo>,
}

/// `GET /api/v1/tokens` (admin): every token, never the secret.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "access",
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "Tokens", body = TokenList))
)]
pub async fn tokens(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<TokenList>, ApiError> {
    c.require(Role::Admin)?;
    Ok(Json(TokenList {
        tokens: tokens::list(&s.pool).await?,
    }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    /// Its name, the actor in event histories: 1 to 64 of letters, digits, `_.@-`.
    #[schema(pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    name: String,
    /// `viewer`, `operator`, `admin` or `integration`.
    #[schema(value_type = Role)]
    role: String,
    /// When it stops working (RFC 3339); none: until revoked.
    #[serde(default)]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A token made: the secret is in this answer only.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedToken {
    /// Id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The secret, shown once (send it as `Authorization: Bearer <token>`).
    pub token: String,
    /// When it stops working; `null`: until revoked.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /api/v1/tokens` (admin): a new token, shown once; audited.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "access",
    request_body = NewToken,
    security(("bearer" = ["admin"])),
    responses(
        (status = 201, description = "Created", body = CreatedToken),
        (status = 400, description = "The name, role or expiry is not valid", body = super::openapi::ErrorBody),
        (status = 409, description = "A live token has that name", body = super::openapi::ErrorBody),
    )
)]
pub async fn create_token(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    body: Bytes,
) -> Result<Response, ApiError> {
    c.require(Role::Admin)?;
    let body: NewToken = json_body(&body)?;
    let role: Role = body.role.parse().map_err(ApiError::BadRequest)?;
    let src = source.0.to_string();
    let now = s.clock.now();
    match tokens::issue(
        &s.pool,
        &body.name,
        role,
        body.expires_at,
        &c.actor(),
        Some(&src),
        now,
    )
    .await
    {
        Ok((id, token)) => {
            tracing::info!(actor = %c.actor(), name = %body.name, %role, "token created");
            Ok((
                StatusCode::CREATED,
                Json(CreatedToken {
                    id,
                    name: body.name,
                    role,
                    token,
                    expires_at: body.expires_at,
                }),
            )
                .into_response())
        }
        Err(e @ tokens::TokenError::NameTaken(_)) => Err(ApiError::Conflict {
            message: e.to_string(),
            status: None,
        }),
        Err(e @ (tokens::TokenError::BadName(_) | tokens::TokenError::BadExpiry)) => {
            Err(ApiError::BadRequest(e.to_string()))
        }
        Err(tokens::TokenError::Db(e)) => Err(e.into()),
    }
}

/// A token revoked.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Revoked {
    /// Its name.
    pub revoked: String,
}

/// `DELETE /api/v1/tokens/{name}` (admin): revokes it and ends its sessions; audited.
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{name}",
    tag = "access",
    params(("name" = String, Path, description = "The token's name")),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "Revoked", body = Revoked),
        (status = 404, description = "No live token has that name", body = super::openapi::ErrorBody),
    )
)]
pub async fn revoke_token(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(name): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    c.require(Role::Admin)?;
    let src = source.0.to_string();
    if tokens::revoke_by(&s.pool, &name, s.clock.now(), &c.actor(), Some(&src)).await? {
        tracing::info!(actor = %c.actor(), %name, "token revoked");
        Ok(Json(Revoked { revoked: name }))
    } else {
        Err(ApiError::NotFound(format!(
            "no live token named {:?}",
            short(&name)
        )))
    }
}

/// `GET /api/v1/audit`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditLog {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
}

/// `GET /api/v1/audit` (admin): the newest 200 administrative changes
/// (tokens, payees, the fleet pause, webhook endpoints): who, what, on what,
/// details, source address.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "access",
    security(("bearer" = ["admin"])),
    responses((status = 200, description = "Entries, newest first", body = AuditLog))
)]
pub async fn audit(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<AuditLog>, ApiError> {
    c.require(Role::Admin)?;
    let entries = crate::db::audit::recent(&s.pool, 200).await?;
    Ok(Json(AuditLog { entries }))
}

// ---------- Read-only views ----------

/// A page request of a plain list: `limit` (1 to 200, default 50),
/// `cursor` (continue below this id) and the extra keys `allowed`.
struct ListQuery {
    limit: i64,
    before_id: Option<i64>,
    extra: BTreeMap<String, String>,
}

fn list_query(q: &Option<String>, allowed: &[&str]) -> Result<ListQuery, ApiError> {
    let mut out = ListQuery {
        limit: 50,
        before_id: None,
        extra: BTreeMap::new(),
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
                out.extra.insert(k, v);
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {:?}",
                    short(other)
                )));
            }
        }
    }
    Ok(out)
}

/// The next page's cursor: the last id, when the page was full.
pub(crate) fn next_cursor(
    ids: impl DoubleEndedIterator<Item = i64>,
    n: usize,
    limit: i64,
) -> Option<String> {
    (n as i64 == limit)
        .then(|| ids.last().map(|id| id.to_string()))
        .flatten()
}

/// An amount at its currency's exponent when that loses nothing (`10.00`,
/// not the column's `10.00000000`); serialized as that string.
pub(crate) fn rescaled(mut d: rust_decimal::Decimal, currency: &str) -> rust_decimal::Decimal {
    if let Ok(c) = currency.parse::<crate::domain::Currency>()
        && d.scale() > c.exponent()
        && d.round_dp(c.exponent()) == d
    {
        d.rescale(c.exponent());
    }
    d
}

/// A page of a plain list, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ListPage<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// An id from the path: a positive integer, or a 400 naming `what` and the
/// (shortened) value given.
pub(crate) fn positive_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{what} must be a positive integer, got {:?}",
            short(raw)
        ))
    })
}

/// `GET /api/v1/payees`: payees, newest first (`status`, `limit`, `cursor`).
/// Any role, integration included.
#[utoipa::path(
    get,
    path = "/api/v1/payees",
    tag = "payees",
    params(
        ("status" = Option<String>, Query, description = "Only `active` or `suspended` payees", pattern = "^(active|suspended)$"),
        ListParams,
    ),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "A page", body = ListPage<Payee>),
        (status = 400, description = "A parameter is not valid", body = super::openapi::ErrorBody),
    )
)]
pub async fn payees_list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<ListPage<Payee>>, ApiError> {
    let lq = list_query(&q, &["status"])?;
    let status = super::platform::payee_status_filter(lq.extra.get("status"))?;
    let items = payees::page_with_status(&s.pool, status, lq.before_id, lq.limit).await?;
    let next = next_cursor(items.iter().map(|p| p.id.get()), items.len(), lq.limit);
    Ok(Json(ListPage {
        items,
        next_cursor: next,
    }))
}

/// A payee's settlement terms.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TermsView {
    /// Its own schedule (`null`: the policy's default).
    pub schedule: Option<String>,
    /// Its payout method.
    pub payout_method: String,
}

/// A standing deduction of a payee.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeductionView {
    /// Id.
    pub id: i64,
    /// Its currency.
    pub currency: String,
    /// What it is for.
    pub label: String,
    /// Taken from each settlement of that currency.
    #[schema(value_type = DecimalString)]
    pub amount: rust_decimal::Decimal,
    /// Set.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A payee's own minimum payout in a currency.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MinimumView {
    /// The currency.
    pub currency: String,
    /// Below it, a period's net is carried over.
    #[schema(value_type = DecimalString)]
    pub amount: rust_decimal::Decimal,
}

/// `GET /api/v1/payees/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PayeeDetail {
    /// The payee.
    pub payee: Payee,
    /// Its settlement terms (`null` when it has none of its own).
    pub terms: Option<TermsView>,
    /// Its standing deductions.
    pub deductions: Vec<DeductionView>,
    /// Its own minimums.
    pub minimums: Vec<MinimumView>,
    /// Its latest 20 settlements, newest first.
    pub settlements: Vec<SettlementRow>,
}

/// `GET /api/v1/payees/{id}`: a payee with its settlement terms (schedule,
/// payout method, deductions, own minimums) and its latest settlements.
/// Any role, integration included.
#[utoipa::path(
    get,
    path = "/api/v1/payees/{id}",
    tag = "payees",
    params(IdParam),
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses(
        (status = 200, description = "The payee", body = PayeeDetail),
        (status = 400, description = "The id is not a positive integer", body = super::openapi::ErrorBody),
        (status = 404, description = "No such payee", body = super::openapi::ErrorBody),
    )
)]
pub async fn payee(
    State(s): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Json<PayeeDetail>, ApiError> {
    let id = PayeeId::new(positive_id(&raw, "id")?);
    let p = payees::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("payee {id} not found")))?;
    let terms = {
        let mut conn = s.pool.acquire().await?;
        crate::db::payee_terms::get(&mut conn, id.get()).await?
    };
    let (deductions, mut minimums) = {
        let mut conn = s.pool.acquire().await?;
        (
            crate::db::payee_terms::deductions_many(&mut conn, &[id.get()]).await?,
            crate::db::payee_terms::minimums_many(&mut conn, &[id.get()]).await?,
        )
    };
    minimums.sort();
    let deductions = deductions
        .into_iter()
        .map(|d| DeductionView {
            id: d.id,
            amount: rescaled(d.amount, &d.currency),
            currency: d.currency,
            label: d.label,
            created_at: d.created_at,
        })
        .collect();
    let minimums = minimums
        .into_iter()
        .map(|(_, c, a)| MinimumView {
            amount: rescaled(a, &c),
            currency: c,
        })
        .collect();
    let settlements = crate::db::settlements::page(&s.pool, Some(id.get()), None, 20)
        .await?
        .into_iter()
        .map(settlement_view)
        .collect();
    Ok(Json(PayeeDetail {
        payee: p,
        terms: terms.map(|t| TermsView {
            schedule: t.schedule.map(|s| s.to_string()),
            payout_method: t.method.to_string(),
        }),
        deductions,
        minimums,
        settlements,
    }))
}

/// A settlement with its amounts at its currency's exponent.
fn settlement_view(mut x: SettlementRow) -> SettlementRow {
    let c = x.currency.clone();
    for d in [
        &mut x.gross,
        &mut x.payee_share,
        &mut x.platform_commission,
        &mut x.deductions,
        &mut x.carried_in,
        &mut x.carried_gross_in,
        &mut x.fee,
        &mut x.net,
        &mut x.carried_out,
    ] {
        *d = rescaled(*d, &c);
    }
    x
}

/// `GET /api/v1/settlements`: settlements, newest first (`payee_id`,
/// `limit`, `cursor`).
#[utoipa::path(
    get,
    path = "/api/v1/settlements",
    tag = "settlements",
    params(
        ("payee_id" = Option<i64>, Query, description = "Only this payee's", minimum = 1),
        ListParams,
    ),
    responses(
        (status = 200, description = "A page", body = ListPage<SettlementRow>),
        (status = 400, description = "A parameter is not valid", body = super::openapi::ErrorBody),
    )
)]
pub async fn settlements_list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<ListPage<SettlementRow>>, ApiError> {
    let lq = list_query(&q, &["payee_id"])?;
    let payee_id = match lq.extra.get("payee_id").filter(|v| !v.is_empty()) {
        Some(v) => Some(positive_id(v, "payee_id")?),
        None => None,
    };
    let rows = crate::db::settlements::page(&s.pool, payee_id, lq.before_id, lq.limit).await?;
    let next = next_cursor(rows.iter().map(|r| r.id), rows.len(), lq.limit);
    Ok(Json(ListPage {
        items: rows.into_iter().map(settlement_view).collect(),
        next_cursor: next,
    }))
}

/// The payee of a settlement, as its detail shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SettlementPayee {
    /// Id.
    #[schema(value_type = i64)]
    pub id: PayeeId,
    /// Display name.
    pub name: String,
    /// Its account at the gateway.
    pub gateway_account: String,
}

/// `GET /api/v1/settlements/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SettlementDetail {
    /// The settlement.
    pub settlement: SettlementRow,
    /// Its payee.
    pub payee: Option<SettlementPayee>,
    /// Its line items in order (they sum to its net).
    pub lines: Vec<LineRow>,
}

/// `GET /api/v1/settlements/{id}`: a settlement, its payee and its line
/// items, in order (they sum to its net).
#[utoipa::path(
    get,
    path = "/api/v1/settlements/{id}",
    tag = "settlements",
    params(IdParam),
    responses(
        (status = 200, description = "The settlement", body = SettlementDetail),
        (status = 400, description = "The id is not a positive integer", body = super::openapi::ErrorBody),
        (status = 404, description = "No such settlement", body = super::openapi::ErrorBody),
    )
)]
pub async fn settlement(
    State(s): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Json<SettlementDetail>, ApiError> {
    let id = positive_id(&raw, "id")?;
    let x = crate::db::settlements::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("settlement {id} not found")))?;
    let lines = crate::db::settlements::lines(&s.pool, id)
        .await?
        .into_iter()
        .map(|mut l| {
            l.amount = rescaled(l.amount, &x.currency);
            l
        })
        .collect();
    let payee = payees::get(&s.pool, PayeeId::new(x.payee_id)).await?;
    Ok(Json(SettlementDetail {
        settlement: settlement_view(x),
        payee: payee.map(|y| SettlementPayee {
            id: y.id,
            name: y.name,
            gateway_account: y.gateway_account,
        }),
        lines,
    }))
}

/// `GET /api/v1/reconcile-runs`: reconciliation runs, newest first
/// (`limit`, `cursor`); a failed run looked nothing up and is not a
/// reconciliation.
#[utoipa::path(
    get,
    path = "/api/v1/reconcile-runs",
    tag = "fleet",
    params(ListParams),
    responses(
        (status = 200, description = "A page", body = ListPage<Run>),
        (status = 400, description = "A parameter is not valid", body = super::openapi::ErrorBody),
    )
)]
pub async fn reconcile_runs(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<ListPage<Run>>, ApiError> {
    let lq = list_query(&q, &[])?;
    let items = crate::db::reconcile_runs::page(&s.pool, lq.before_id, lq.limit).await?;
    let next = next_cursor(items.iter().map(|r| r.id), items.len(), lq.limit);
    Ok(Json(ListPage {
        items,
        next_cursor: next,
    }))
}

// ---------- Search ----------

/// `GET /api/v1/search?q=`: the go-to box. `q` (1 to 200 characters) is read
/// as a payout id, an idempotency key, a gateway transfer id, a gateway
/// account (or its prefix) or words of a payee's name; at most 20 results,
/// exact matches first.
#[utoipa::path(
    get,
    path = "/api/v1/search",
    tag = "payouts",
    params(("q" = String, Query, description = "A payout id (or `#id`), an idempotency key \
(`payout_<id>`, `payout_<id>-<n>`), a gateway transfer id, a gateway account (exact or prefix) or \
words of a payee's name (word prefixes)", min_length = 1, max_length = 200)),
    responses(
        (status = 200, description = "What q names", body = SearchAnswer),
        (status = 400, description = "q is missing, empty or too long", body = super::openapi::ErrorBody),
    )
)]
pub async fn search(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<SearchAnswer>, ApiError> {
    let mut text = None;
    for (k, v) in pairs(&q)? {
        if k != "q" {
            return Err(ApiError::BadRequest(format!(
                "unknown query parameter {:?} (only q)",
                short(&k)
            )));
        }
        if text.replace(v).is_some() {
            return Err(ApiError::BadRequest("q: given twice".into()));
        }
    }
    let text = text.unwrap_or_default();
    let text = text.trim();
    if text.is_empty() || text.chars().count() > 200 {
        return Err(ApiError::BadRequest(
            "q: expected 1 to 200 characters (a payout id, idempotency key, transfer id, account or payee name)".into(),
        ));
    }
    let hits = crate::db::search::search(&s.pool, text).await?;
    Ok(Json(SearchAnswer {
        q: text.to_string(),
        results: hits,
        max: crate::db::search::MAX_RESULTS,
    }))
}

/// `GET /api/v1/search`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SearchAnswer {
    /// The query, trimmed.
    pub q: String,
    /// Exact matches first.
    pub results: Vec<Hit>,
    /// The most results given.
    pub max: usize,
}

// ---------- Fleet pause ----------

/// The longest an operator's pause lasts (the pause is a Redis key with a
/// time to live: a pause forgotten ends by itself).
const MAX_PAUSE_MINUTES: u64 = 7 * 24 * 60;

/// The body of a fleet pause (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PauseBody {
    /// How long, in minutes; the longest allowed (a week) when absent.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10080)]
    minutes: Option<u64>,
    /// Why (at most 500 characters kept), in the audit log.
    #[serde(default)]
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// Whether the fleet is paused.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FleetState {
    /// Paused: no worker claims a payout or calls the gateway.
    pub paused: bool,
    /// Until when (`null` when not paused).
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Seconds left (0 when not paused).
    pub remaining_secs: u64,
    /// The operator's pause (`null` when not paused or when the gateway
    /// guard paused the fleet itself: a rate limit, the platform refused).
    pub by: Option<PausedBy>,
}

/// Who paused the fleet.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PausedBy {
    /// The operator.
    pub actor: String,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
    /// What they gave (`minutes`, `reason`).
    #[schema(value_type = Object)]
    pub detail: Value,
}

async fn fleet_state(s: &AdminState) -> Result<FleetState, ApiError> {
    let key = crate::gateway::guard::pause_key(s.queue.prefix());
    let left = crate::gateway::guard::read_pause(&mut s.queue.conn(), &key)
        .await
        .map_err(|e| ApiError::Unavailable(anyhow::Error::new(e)))?;
    let last = crate::db::audit::latest_of(&s.pool, &["fleet.pause", "fleet.resume"]).await?;
    let now = s.clock.now();
    Ok(match left {
        Some(left) => {
            let until = now + chrono::Duration::milliseconds(left.as_millis() as i64);
            // Who paused it: the last operator pause, unless the gateway
            // paused the fleet itself (a rate limit, the platform refused).
            let by = last
                .filter(|e| e.action == "fleet.pause")
                .map(|e| PausedBy {
                    detail: serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null),
                    actor: e.actor,
                    at: e.at,
                });
            FleetState {
                paused: true,
                until: Some(until),
                remaining_secs: left.as_secs(),
                by,
            }
        }
        None => FleetState {
            paused: false,
            until: None,
            remaining_secs: 0,
            by: None,
        },
    })
}

/// `GET /api/v1/fleet`: whether the fleet is paused (by an operator or by
/// the gateway guard), until when and by whom.
#[utoipa::path(
    get,
    path = "/api/v1/fleet",
    tag = "fleet",
    responses((status = 200, description = "The fleet's state", body = FleetState))
)]
pub async fn fleet(State(s): State<AdminState>) -> Result<Json<FleetState>, ApiError> {
    Ok(Json(fleet_state(&s).await?))
}

/// `POST /api/v1/fleet/pause` (admin): no worker claims a payout or calls the
/// gateway until `/resume` (or `minutes`, at most a week, have passed); the
/// same Redis key the workers' guards read before every claim. Audited
/// (`fleet.pause`).
#[utoipa::path(
    post,
    path = "/api/v1/fleet/pause",
    tag = "fleet",
    request_body(content = Option<PauseBody>, description = "Optional"),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The fleet's state after the pause", body = FleetState),
        (status = 400, description = "`minutes` is out of range or the body is not valid", body = super::openapi::ErrorBody),
    )
)]
pub async fn fleet_pause(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    body: Bytes,
) -> Result<Json<FleetState>, ApiError> {
    c.require(Role::Admin)?;
    let body: PauseBody = json_body(&body)?;
    let minutes = body.minutes.unwrap_or(MAX_PAUSE_MINUTES);
    if !(1..=MAX_PAUSE_MINUTES).contains(&minutes) {
        metrics::ADMIN_ACTIONS
            .with_label_values(&["fleet_pause", "refused"])
            .inc();
        return Err(ApiError::BadRequest(format!(
            "minutes: expected 1 to {MAX_PAUSE_MINUTES} (a week)"
        )));
    }
    let reason = body
        .reason
        .map(|r| r.trim().chars().take(500).collect::<String>())
        .filter(|r| !r.is_empty());
    let now = s.clock.now();
    let key = crate::gateway::guard::pause_key(s.queue.prefix());
    // The audit row commits only once the pause is set: a Redis failure
    // leaves neither.
    let mut tx = s.pool.begin().await?;
    crate::db::audit::record(
        &mut *tx,
        now,
        &c.actor(),
        "fleet.pause",
        "fleet",
        json!({"minutes": minutes, "reason": reason}),
        Some(&source.0.to_string()),
    )
    .await?;
    crate::gateway::guard::pause_fleet_for(
        &mut s.queue.conn(),
        &key,
        std::time::Duration::from_secs(minutes * 60),
    )
    .await
    .map_err(|e| ApiError::Unavailable(anyhow::Error::new(e)))?;
    tx.commit().await?;
    metrics::ADMIN_ACTIONS
        .with_label_values(&["fleet_pause", "ok"])
        .inc();
    tracing::warn!(actor = %c.actor(), minutes, "fleet paused by an operator");
    Ok(Json(fleet_state(&s).await?))
}

/// `POST /api/v1/fleet/resume` (admin): ends the fleet pause, whoever set it
/// (an operator or the gateway guard). Audited (`fleet.resume`).
#[utoipa::path(
    post,
    path = "/api/v1/fleet/resume",
    tag = "fleet",
    request_body(content = Option<ActionBody>, description = "Optional"),
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The fleet's state after the resume", body = FleetState),
        (status = 400, description = "The body is not valid", body = super::openapi::ErrorBody),
    )
)]
pub async fn fleet_resume(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    body: Bytes,
) -> Result<Json<FleetState>, ApiError> {
    c.require(Role::Admin)?;
    let _: ActionBody = json_body(&body)?;
    let now = s.clock.now();
    let key = crate::gateway::guard::pause_key(s.queue.prefix());
    let mut tx = s.pool.begin().await?;
    let was = crate::gateway::guard::read_pause(&mut s.queue.conn(), &key)
        .await
        .map_err(|e| ApiError::Unavailable(anyhow::Error::new(e)))?;
    crate::db::audit::record(
        &mut *tx,
        now,
        &c.actor(),
        "fleet.resume",
        "fleet",
        json!({"was_paused": was.is_some()}),
        Some(&source.0.to_string()),
    )
    .await?;
    crate::gateway::guard::resume_fleet(&mut s.queue.conn(), &key)
        .await
        .map_err(|e| ApiError::Unavailable(anyhow::Error::new(e)))?;
    tx.commit().await?;
    metrics::ADMIN_ACTIONS
        .with_label_values(&["fleet_resume", "ok"])
        .inc();
    tracing::warn!(actor = %c.actor(), was_paused = was.is_some(), "fleet resumed by an operator");
    Ok(Json(fleet_state(&s).await?))
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    fn ev(
        id: i64,
        from: Option<&str>,
        to: &str,
        attempt: i32,
        reason: Option<&str>,
    ) -> PayoutEvent {
        PayoutEvent {
            id,
            payout_id: 1,
            from_status: from.map(str::to_string),
            to_status: to.into(),
            actor: "worker:w1".into(),
            reason: reason.map(str::to_string),
            attempt: Some(attempt),
            at: Utc.timestamp_opt(1_800_000_000 + id, 0).unwrap(),
        }
    }

    #[test]
    fn attempts_pair_claims_with_their_outcomes() {
        let events = [
            ev(1, None, "pending", 0, Some("created")),
            ev(2, Some("pending"), "queued", 0, None),
            ev(3, Some("queued"), "processing", 1, None),
            ev(
                4,
                Some("processing"),
                "retrying",
                1,
                Some("gateway_unavailable"),
            ),
            ev(5, Some("retrying"), "queued", 1, None),
            ev(6, Some("queued"), "processing", 2, None),
            ev(7, Some("processing"), "paid", 2, None),
            ev(8, Some("queued"), "processing", 3, None),
        ];
        let a = attempts(&events);
        assert_eq!(a.len(), 3);
        assert_eq!(
            (a[0].attempt, a[0].outcome.as_deref()),
            (1, Some("retrying"))
        );
        assert_eq!(a[0].reason.as_deref(), Some("gateway_unavailable"));
        assert_eq!((a[1].attempt, a[1].outcome.as_deref()), (2, Some("paid")));
        assert_eq!((a[2].attempt, a[2].finished_at), (3, None));
    }

    #[test]
    fn actions_follow_the_lifecycle() {
        for s in crate::domain::status::ALL_STATUSES {
            for a in actions_for(s) {
                let to = if a == "cancel" {
                    PayoutStatus::Cancelled
                } else {
                    PayoutStatus::Queued
                };
                assert!(s.can_move_to(to), "{a} offered from {s}");
            }
        }
        assert_eq!(actions_for(PayoutStatus::Paid), Vec::<&str>::new());
    }
}

//! The JSON API under `/api/v1` (described in `openapi.json`). Every handler
//! runs after [`super::auth::authenticate`], so a [`Caller`] is always there.

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

use super::{AdminState, ApiError, auth::Caller, auth::Source, auth::Via};
use crate::{
    db::{
        events::{self, PayoutEvent},
        filter::{self, PageRequest, PayoutFilter},
        payees,
        payouts::{self, ActionError},
        tokens::{self, Role},
        webhook_events,
    },
    domain::PayoutStatus,
    metrics,
};

/// `GET /api/v1/session`: who you are, and the CSRF secret of a browser session.
pub async fn session(Extension(c): Extension<Caller>) -> Json<Value> {
    let csrf = match &c.via {
        Via::Session { csrf } => Some(csrf.clone()),
        Via::Bearer => None,
    };
    Json(json!({
        "name": c.principal.name,
        "role": c.principal.role,
        "actor": c.actor(),
        "csrf": csrf,
    }))
}

/// `GET /api/v1/overview`.
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
        .map_err(ApiError::BadRequest)
}

/// `GET /api/v1/payouts?…`: a page, newest first, and the next page's cursor.
pub async fn list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<filter::Page>, ApiError> {
    let req = parse_page(&q)?;
    Ok(Json(filter::page(&s.pool, &req).await?))
}

/// One attempt at the gateway, read off the event history: from the claim
/// (`-> processing`) to the event that left `processing`.
#[derive(Debug, Clone, Serialize, PartialEq)]
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

fn payout_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "payout id must be a positive integer, got {:?}",
            short(raw)
        ))
    })
}

pub(crate) fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// `GET /api/v1/payouts/{id}`: the payout, its payee, its history, its
/// attempts, the webhooks that named it, and the actions legal now.
pub async fn payout(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = payout_id(&raw)?;
    let p = payouts::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("payout {id} not found")))?
        .with_currency_scale();
    let payee = payees::get(&s.pool, p.payee_id).await?;
    let events = events::for_payout(&s.pool, id).await?;
    let hooks = webhook_events::for_payout(&s.pool, id).await?;
    let actions: Vec<&str> = if c.principal.role.allows(tokens::Permission::ActOnPayout) {
        actions_for(p.status)
    } else {
        Vec::new()
    };
    Ok(Json(json!({
        "payout": p,
        "idempotency_key": p.idempotency_key(),
        "payee": payee.map(|y| json!({"id": y.id, "name": y.name, "gateway_account": y.gateway_account,
                                       "currency": y.currency, "status": y.status})),
        "attempts": attempts(&events),
        "events": events,
        "webhooks": hooks.into_iter().map(|h| json!({
            "source": h.source, "event_id": h.event_id, "type": h.event_type, "outcome": h.outcome,
            "received_at": h.received_at,
        })).collect::<Vec<_>>(),
        "actions": actions,
        // A settlement payout's line items (empty for other payouts).
        "lines": crate::db::settlements::lines_for_payout(&s.pool, id).await?,
    })))
}

/// The body of an action (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    #[serde(default)]
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

async fn push(s: &AdminState, ids: &[i64]) -> bool {
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

/// `POST /api/v1/payouts/{id}/{retry|cancel|enqueue}` (operator).
pub async fn action(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Path((raw, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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
    let pushed = to != PayoutStatus::Queued || push(&s, &[id]).await;
    metrics::ADMIN_ACTIONS
        .with_label_values(&[action.as_str(), "ok"])
        .inc();
    tracing::info!(payout_id = id, %actor, %action, from = %from, "operator action");
    Ok(Json(
        json!({"id": id, "from": from, "to": to, "pushed": pushed}),
    ))
}

/// The body of a bulk retry. Nothing moves unless the body says
/// `"dry_run": false` in so many words: a missing, empty or `null` body, or
/// one without `dry_run`, is a dry run (security finding 1: the derived
/// default used to retry everything).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    #[serde(default)]
    filter: BTreeMap<String, Value>,
    /// The payouts selected by id (instead of a filter).
    #[serde(default)]
    ids: Option<Vec<Value>>,
    #[serde(default)]
    dry_run: Option<bool>,
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
        f.set(k, &v).map_err(ApiError::BadRequest)?;
    }
    Ok(f)
}

/// `POST /api/v1/payouts/bulk-retry` (admin): a dry run (the default) only
/// counts the failed payouts the filter matches; `"dry_run": false` with a
/// filter that narrows the failed set retries them (at most
/// `admin.bulk_max`) and pushes their jobs. Payouts that were paid before
/// they failed (reversed, returned) are never part of a bulk retry: retrying
/// one pays again, so it is done by name (`/payouts/{id}/retry`).
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
        match payouts::retry_because(&s.pool, r.id, &actor, "operator bulk retry", lease, now).await
        {
            Ok(_) => retried.push(r.id),
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
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkCancelBody {
    #[serde(default)]
    ids: Vec<Value>,
    #[serde(default)]
    dry_run: Option<bool>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/v1/payouts/bulk-cancel` (operator): the payouts selected by
/// id. A dry run (the default, as for a bulk retry) counts those whose status
/// allows a cancel now; `"dry_run": false` cancels each through the single
/// cancel (`reconcile::cancel`, as `/payouts/{id}/cancel`: the gateway is
/// asked first about a payout that may have moved money; one event each) and
/// reports those that moved meanwhile (`changed`) or that the gateway check
/// refused (`refused`, with the reason).
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
        match crate::services::reconcile::cancel(&s.pool, gateway, r.id, &actor, &why, now).await {
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

/// `GET /api/v1/failures`: failed payouts grouped by code.
pub async fn failures(State(s): State<AdminState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"groups": filter::failure_groups(&s.pool).await?}),
    ))
}

/// `GET /api/v1/tokens` (admin): every token, never the secret.
pub async fn tokens(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Admin)?;
    Ok(Json(json!({"tokens": tokens::list(&s.pool).await?})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
    /// When it stops working (RFC 3339); none: until revoked.
    #[serde(default)]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `POST /api/v1/tokens` (admin): a new token, shown once; audited.
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
                Json(
                    json!({"id": id, "name": body.name, "role": role, "token": token,
                            "expires_at": body.expires_at}),
                ),
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

/// `DELETE /api/v1/tokens/{name}` (admin): revokes it and ends its sessions; audited.
pub async fn revoke_token(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Admin)?;
    let src = source.0.to_string();
    if tokens::revoke_by(&s.pool, &name, s.clock.now(), &c.actor(), Some(&src)).await? {
        tracing::info!(actor = %c.actor(), %name, "token revoked");
        Ok(Json(json!({"revoked": name})))
    } else {
        Err(ApiError::NotFound(format!(
            "no live token named {:?}",
            short(&name)
        )))
    }
}

/// `GET /api/v1/audit` (admin): the newest administrative changes.
pub async fn audit(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    c.require(Role::Admin)?;
    let entries = crate::db::audit::recent(&s.pool, 200).await?;
    Ok(Json(json!({"entries": entries})))
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
/// not the column's `10.00000000`), as a string.
pub(crate) fn at_exponent(mut d: rust_decimal::Decimal, currency: &str) -> String {
    if let Ok(c) = currency.parse::<crate::domain::Currency>()
        && d.scale() > c.exponent()
        && d.round_dp(c.exponent()) == d
    {
        d.rescale(c.exponent());
    }
    d.to_string()
}

pub(crate) fn positive_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("{what}: expected a positive integer id")))
}

/// `GET /api/v1/payees`: payees, newest first (`status`, `limit`, `cursor`).
pub async fn payees_list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let lq = list_query(&q, &["status"])?;
    let status = super::platform::payee_status_filter(lq.extra.get("status"))?;
    let items = payees::page_with_status(&s.pool, status, lq.before_id, lq.limit).await?;
    let next = next_cursor(items.iter().map(|p| p.id), items.len(), lq.limit);
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

/// `GET /api/v1/payees/{id}`: a payee with its settlement terms (schedule,
/// payout method, deductions, own minimums) and its latest settlements.
pub async fn payee(
    State(s): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = positive_id(&raw, "id")?;
    let p = payees::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("payee {id} not found")))?;
    let terms = {
        let mut conn = s.pool.acquire().await?;
        crate::db::payee_terms::get(&mut conn, id).await?
    };
    let (deductions, mut minimums) = {
        let mut conn = s.pool.acquire().await?;
        (
            crate::db::payee_terms::deductions_many(&mut conn, &[id]).await?,
            crate::db::payee_terms::minimums_many(&mut conn, &[id]).await?,
        )
    };
    minimums.sort();
    let deductions: Vec<Value> = deductions
        .into_iter()
        .map(|d| {
            json!({"id": d.id, "currency": d.currency, "label": d.label,
                   "amount": at_exponent(d.amount, &d.currency), "created_at": d.created_at})
        })
        .collect();
    let minimums: Vec<Value> = minimums
        .into_iter()
        .map(|(_, c, a)| json!({"currency": c, "amount": at_exponent(a, &c)}))
        .collect();
    let settlements: Vec<Value> = crate::db::settlements::page(&s.pool, Some(id), None, 20)
        .await?
        .iter()
        .map(settlement_json)
        .collect();
    Ok(Json(json!({
        "payee": p,
        "terms": terms.map(|t| json!({"schedule": t.schedule.map(|s| s.to_string()), "payout_method": t.method.to_string()})),
        "deductions": deductions,
        "minimums": minimums,
        "settlements": settlements,
    })))
}

fn settlement_json(x: &crate::db::settlements::SettlementRow) -> Value {
    let m = |d: rust_decimal::Decimal| at_exponent(d, &x.currency);
    json!({
        "id": x.id, "payee_id": x.payee_id, "currency": x.currency,
        "period_start": x.period_start, "period_end": x.period_end,
        "schedule": x.schedule, "payout_method": x.payout_method, "services": x.services,
        "gross": m(x.gross), "payee_percent": x.payee_percent, "bonus_percent": x.bonus_percent,
        "payee_share": m(x.payee_share), "platform_commission": m(x.platform_commission),
        "deductions": m(x.deductions), "carried_in": m(x.carried_in),
        "carried_gross_in": m(x.carried_gross_in), "fee": m(x.fee), "net": m(x.net),
        "carried_out": m(x.carried_out), "carried_out_into": x.carried_out_into,
        "outcome": x.outcome, "payout_id": x.payout_id, "carried_into": x.carried_into,
        "actor": x.actor, "created_at": x.created_at, "returned_at": x.returned_at,
    })
}

/// `GET /api/v1/settlements`: settlements, newest first (`payee_id`,
/// `limit`, `cursor`).
pub async fn settlements_list(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let lq = list_query(&q, &["payee_id"])?;
    let payee_id = match lq.extra.get("payee_id").filter(|v| !v.is_empty()) {
        Some(v) => Some(positive_id(v, "payee_id")?),
        None => None,
    };
    let rows = crate::db::settlements::page(&s.pool, payee_id, lq.before_id, lq.limit).await?;
    let next = next_cursor(rows.iter().map(|r| r.id), rows.len(), lq.limit);
    Ok(Json(json!({
        "items": rows.iter().map(settlement_json).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

/// `GET /api/v1/settlements/{id}`: a settlement and its line items, in order.
pub async fn settlement(
    State(s): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = positive_id(&raw, "id")?;
    let x = crate::db::settlements::get(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("settlement {id} not found")))?;
    let lines: Vec<Value> = crate::db::settlements::lines(&s.pool, id)
        .await?
        .into_iter()
        .map(|l| {
            json!({"id": l.id, "position": l.position, "kind": l.kind, "description": l.description,
                   "amount": at_exponent(l.amount, &x.currency), "payout_id": l.payout_id,
                   "earning_id": l.earning_id, "carried_from": l.carried_from})
        })
        .collect();
    let payee = payees::get(&s.pool, x.payee_id).await?;
    Ok(Json(json!({
        "settlement": settlement_json(&x),
        "payee": payee.map(|y| json!({"id": y.id, "name": y.name, "gateway_account": y.gateway_account})),
        "lines": lines,
    })))
}

/// `GET /api/v1/reconcile-runs`: reconciliation runs, newest first
/// (`limit`, `cursor`); a failed run compared nothing.
pub async fn reconcile_runs(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let lq = list_query(&q, &[])?;
    let items = crate::db::reconcile_runs::page(&s.pool, lq.before_id, lq.limit).await?;
    let next = next_cursor(items.iter().map(|r| r.id), items.len(), lq.limit);
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

// ---------- Search ----------

/// `GET /api/v1/search?q=`: the go-to box. `q` (1 to 200 characters) is read
/// as a payout id, an idempotency key, a gateway transfer id, a gateway
/// account (or its prefix) or words of a payee's name; at most 20 results,
/// exact matches first.
pub async fn search(
    State(s): State<AdminState>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(
        json!({"q": text, "results": hits, "max": crate::db::search::MAX_RESULTS}),
    ))
}

// ---------- Fleet pause ----------

/// The longest an operator's pause lasts (the pause is a Redis key with a
/// time to live: a pause forgotten ends by itself).
const MAX_PAUSE_MINUTES: u64 = 7 * 24 * 60;

/// The body of a fleet pause (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    /// How long; the longest allowed when absent.
    #[serde(default)]
    minutes: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

async fn fleet_state(s: &AdminState) -> Result<Value, ApiError> {
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
                .map(|e| json!({"actor": e.actor, "at": e.at, "detail": serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null)}));
            json!({"paused": true, "until": until, "remaining_secs": left.as_secs(), "by": by})
        }
        None => json!({"paused": false, "until": null, "remaining_secs": 0, "by": null}),
    })
}

/// `GET /api/v1/fleet`: whether the fleet is paused (by an operator or by
/// the gateway guard), until when and by whom.
pub async fn fleet(State(s): State<AdminState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(fleet_state(&s).await?))
}

/// `POST /api/v1/fleet/pause` (admin): no worker claims a payout or calls the
/// gateway until `/resume` (or `minutes`, at most a week, have passed); the
/// same Redis key the workers' guards read before every claim. Audited.
pub async fn fleet_pause(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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
/// (an operator or the gateway guard). Audited.
pub async fn fleet_resume(
    State(s): State<AdminState>,
    Extension(c): Extension<Caller>,
    Extension(source): Extension<Source>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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

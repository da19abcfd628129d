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

fn pairs(q: &Option<String>) -> Result<Vec<(String, String)>, ApiError> {
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
    let hooks: Vec<(
        String,
        String,
        String,
        String,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT source, event_id, event_type, outcome, received_at FROM webhook_events
         WHERE payout_id = $1 ORDER BY received_at",
    )
    .bind(id)
    .fetch_all(&s.pool)
    .await?;
    let actions: Vec<&str> = if c.principal.role >= Role::Operator {
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
        "webhooks": hooks.into_iter().map(|(source, event_id, event_type, outcome, at)| json!({
            "source": source, "event_id": event_id, "type": event_type, "outcome": outcome, "received_at": at,
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

fn json_body<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, ApiError> {
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
        ActionError::Db(e) => e.into(),
    }
}

/// A cancel refused: by the lifecycle (as [`conflict`]), or because the
/// gateway holds a transfer for the payout or could not be asked (409 with
/// the reason and the payout's status, when known).
fn cancel_refused(e: crate::reconcile::CancelError) -> ApiError {
    match e {
        crate::reconcile::CancelError::Action(e) => conflict(e, "cancel"),
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
                crate::gateway::select::build_limited(
                    &s.settings.gateway,
                    s.queue.conn(),
                    &s.settings.redis.prefix,
                )
            };
            (
                crate::reconcile::cancel(&s.pool, gateway, id, &actor, &why, now)
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
    let ids = filter::bulk_retry(&s.pool, &f, cap, &c.actor(), lease, now).await?;
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

//! The OpenAPI 3.1 description of the admin server, generated from the
//! handlers' `#[utoipa::path]` annotations and the response types'
//! `ToSchema` derives (no hand-written document: what the handlers return is
//! what it says). Served at `/api/openapi.json`, printed by
//! `payoutctl openapi`, and kept in the repository as `docs/openapi.json`,
//! which `tests/it/openapi.rs` compares with this output (and checks that every
//! route of the router is described and every described route exists).
//!
//! What the annotations leave to this module, the same for every route:
//! - security: an operation names the roles allowed as the bearer
//!   requirement's list (`security(("bearer" = ["operator", "admin"]))`); none
//!   named: any role of the operators' ladder. The same roles may use a
//!   dashboard session (never `integration`), which for every method but GET
//!   also needs the `X-CSRF-Token` header. `security(())` marks a public route;
//! - the error answers every authenticated route may give (401, 403, 429, 503),
//!   each an [`ErrorBody`].

use std::sync::LazyLock;

use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::domain::DecimalString;

/// The body of every error answer (4xx and 5xx) of the JSON API.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// What went wrong, safe to show: never a secret, never a database
    /// error's text; at most about 300 characters of any input it quotes.
    pub error: String,
    /// With a 409 on a payout: the payout's status now (`null` when the
    /// conflict is not about its status).
    #[schema(nullable)]
    pub status: Option<String>,
    /// With a 409 or 422 of `POST /v1/earnings`: the field at fault.
    pub field: Option<String>,
}

/// `limit` and `cursor`, the paging of the plain lists.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200, default = 50)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `limit` and `cursor` of the payouts list (keyset-paginated).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500, default = 50)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// The path's `id`: a positive integer.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdParam {
    /// The id (a positive integer).
    #[param(minimum = 1)]
    pub id: i64,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "payout-admin",
        version = "1.0.0",
        description = "The payout fleet's admin API. Authenticate with `Authorization: Bearer <token>` \
(tokens: `payoutctl token create`) or a dashboard session; a session's POST, PUT, PATCH and DELETE \
requests must carry `X-CSRF-Token` (from `GET /api/v1/session`). Roles: viewer reads; operator also \
retries, cancels and enqueues one payout, bulk-cancels selected payouts, suspends payees and posts \
earnings; admin also bulk-retries, manages tokens and webhook endpoints, pauses the fleet and changes \
payees' gateway accounts; integration (the platform's backend, on no ladder) posts earnings, reads \
payees, their balances, earnings and payouts, requests early payouts, and nothing else (no retry, cancel or bulk action, no \
dashboard session). Every action is a legal lifecycle move recorded in the payout's events with the \
caller as actor, or a 409 that says why not. Amounts are exact decimals as strings (`Decimal`), never \
JSON numbers. Every error is an `Error` body. Too many failed authentications from one source lock it \
out: 429 with `Retry-After`. Generated from the handlers (`payoutctl openapi`)."
    ),
    paths(
        super::api::session,
        super::api::overview,
        super::api::list,
        super::api::bulk_retry,
        super::api::bulk_cancel,
        super::api::payout,
        super::api::action,
        super::api::failures,
        super::api::search,
        super::api::payees_list,
        super::api::payee,
        super::api::settlements_list,
        super::api::settlement,
        super::api::reconcile_runs,
        super::api::fleet,
        super::api::fleet_pause,
        super::api::fleet_resume,
        super::api::tokens,
        super::api::create_token,
        super::api::revoke_token,
        super::api::audit,
        super::platform::suspend,
        super::platform::resume,
        super::platform::account,
        super::platform::email,
        super::platform::balance,
        super::platform::earnings,
        super::platform::payee_payouts,
        super::platform::upcoming,
        super::platform::release_earning,
        super::platform::void_earning,
        super::platform::holds,
        super::platform::payout_request,
        super::webhooks_out::list,
        super::webhooks_out::create,
        super::webhooks_out::show,
        super::webhooks_out::update,
        super::webhooks_out::remove,
        super::webhooks_out::rotate,
        super::webhooks_out::replay_since,
        super::webhooks_out::delivery,
        super::webhooks_out::replay,
        super::intake::post_earning,
        super::webhooks::gateway_hook,
        super::webhooks::stripe_hook,
        super::auth::login,
        super::auth::logout,
        super::pages::openapi_json,
        super::pages::root,
        super::pages::ui_redirect,
        super::pages::index,
        super::pages::app_js,
        super::pages::app_css,
        super::pages::login_page,
        super::pages::login_js,
        crate::server::health,
        crate::server::ready,
        crate::server::metrics,
    ),
    components(schemas(DecimalString, ErrorBody)),
    tags(
        (name = "payouts", description = "Payouts: list, detail, actions, bulk actions, failures, search"),
        (name = "payees", description = "Payees, their balances, earnings, payouts and settlement terms"),
        (name = "settlements", description = "Settlements and their line items"),
        (name = "fleet", description = "The fleet: overview, pause, reconciliation runs"),
        (name = "access", description = "Who you are, tokens, the audit log, the dashboard's login"),
        (name = "webhooks-out", description = "Outbound webhooks: endpoints and deliveries"),
        (name = "intake", description = "The platform's earnings"),
        (name = "earnings", description = "Escrow actions on held earnings: release early, void, holds"),
        (name = "gateway", description = "Events from the payment gateway, signed"),
        (name = "dashboard", description = "The dashboard's pages and assets"),
        (name = "operations", description = "Health and metrics (every binary serves these)"),
    )
)]
struct ApiDoc;

/// The roles of the operators' ladder, allowed where an operation names none.
const ANY_ROLE: [&str; 3] = ["viewer", "operator", "admin"];

/// The document, as served and committed (computed once).
pub fn document() -> &'static Value {
    static DOC: LazyLock<Value> = LazyLock::new(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
        finish(&mut doc);
        doc
    });
    &DOC
}

/// The document as pretty JSON with a final newline (`docs/openapi.json`).
pub fn pretty() -> String {
    let mut s = serde_json::to_string_pretty(document()).expect("the document serializes");
    s.push('\n');
    s
}

fn error_answer(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// Adds what is the same for every operation: the security schemes, each
/// operation's requirements and the error answers of authentication.
fn finish(doc: &mut Value) {
    doc["components"]["securitySchemes"] = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token (`payoutctl token create`, `POST /api/v1/tokens`). A requirement's list names \
    the roles allowed (viewer, operator, admin, integration); the operators' roles form a ladder \
    (viewer < operator < admin), integration stands apart and reaches only the routes that name it."
        },
        "session": {
            "type": "apiKey",
            "in": "cookie",
            "name": "__Host-payouts_session",
            "description": "A dashboard session (`POST /login` with a token of an operator's role; \
    `payouts_session` without `__Host-` on plain HTTP). Never for an integration token."
        },
        "csrf": {
            "type": "apiKey",
            "in": "header",
            "name": "X-CSRF-Token",
            "description": "The session's CSRF secret (`csrf` of `GET /api/v1/session`), required with a \
    session on every method but GET; a missing or wrong one is a 403."
        }
    });
    doc["security"] = json!([{"bearer": []}, {"session": []}]);
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    // One handler serving several methods (`PUT` and `POST` of a payee's
    // account) names one operation id: each gets its method appended.
    let mut ids = std::collections::BTreeMap::<String, usize>::new();
    for item in paths.values() {
        for op in item.as_object().into_iter().flat_map(Map::values) {
            if let Some(id) = op["operationId"].as_str() {
                *ids.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    for item in paths.values_mut() {
        for (method, op) in item.as_object_mut().into_iter().flat_map(|m| m.iter_mut()) {
            let id = op["operationId"].as_str().map(str::to_string);
            if let Some(id) = id.filter(|id| ids.get(id).is_some_and(|n| *n > 1)) {
                op["operationId"] = json!(format!("{id}_{method}"));
            }
        }
    }
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            finish_operation(method, op);
        }
    }
}

fn finish_operation(method: &str, op: &mut Map<String, Value>) {
    let named = op.get("security").and_then(Value::as_array).cloned();
    // `security(())`: public (no credentials).
    if named
        .as_ref()
        .is_some_and(|s| s.iter().all(|r| r.as_object().is_some_and(Map::is_empty)))
    {
        op.insert("security".into(), json!([]));
        return;
    }
    // A page of the dashboard: a session or a redirect to the login form.
    if named
        .as_ref()
        .is_some_and(|s| !s.iter().any(|r| r.get("bearer").is_some()))
    {
        return;
    }
    let roles: Vec<String> = named
        .as_ref()
        .and_then(|s| s.iter().find_map(|r| r.get("bearer")))
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let restricted = !roles.is_empty();
    let roles = if restricted {
        roles
    } else {
        ANY_ROLE.iter().map(|r| r.to_string()).collect()
    };
    let session_roles: Vec<&String> = roles.iter().filter(|r| *r != "integration").collect();
    let mut session = json!({"session": session_roles});
    if method != "get" {
        session["csrf"] = json!([]);
    }
    op.insert("security".into(), json!([{"bearer": roles}, session]));
    let responses = op
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("responses is an object");
    let mut add = |code: &str, description: &str| {
        responses
            .entry(code.to_string())
            .or_insert_with(|| error_answer(description));
    };
    add(
        "401",
        "No valid credentials: no token or session, or one unknown, revoked or expired \
         (`WWW-Authenticate: Bearer`)",
    );
    add(
        "403",
        "The caller's role may not do this (an integration token reaches only the routes that name \
         it), or a session's request came without its X-CSRF-Token or from another site",
    );
    add(
        "429",
        "Too many failed authentications from this source: locked out for `Retry-After` seconds",
    );
    add(
        "503",
        "A dependency (Postgres or Redis) is unavailable, or the query ran past \
         admin.statement_timeout_ms; try again (narrow the filter)",
    );
}

// ---- Outbound webhooks: the bodies `webhooks_out.rs` reads and writes ----
// (described here so that module keeps only its annotations; each mirrors
// the `json!` of its handler).

/// The body of `POST /api/v1/webhook-endpoints` (`url` and `event_types`
/// required) and of `PATCH /api/v1/webhook-endpoints/{id}` (every field optional).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EndpointBody {
    /// `https://…`, or `http://` to loopback; no private address outside
    /// `webhooks_out.allow_private`.
    pub url: Option<String>,
    /// The event types it receives: `*` or any of `payout.created`,
    /// `payout.queued`, `payout.held`, `payout.in_transit`, `payout.paid`,
    /// `payout.failed`, `payout.cancelled`, `payout.reversed`,
    /// `settlement.created`, `earning.released`.
    pub event_types: Option<Vec<String>>,
    /// Free text.
    #[schema(max_length = 200)]
    pub description: Option<String>,
    /// Whether it receives messages (enabling clears a disable by the fleet).
    pub enabled: Option<bool>,
}

/// `GET /api/v1/webhook-endpoints`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EndpointList {
    /// Every endpoint, never its secret.
    pub endpoints: Vec<crate::db::webhook_endpoints::Endpoint>,
}

/// An endpoint registered: its signing secret is in this answer only.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EndpointCreated {
    /// The endpoint.
    pub endpoint: crate::db::webhook_endpoints::Endpoint,
    /// Its signing secret (`whsec_…`), shown once.
    pub secret: String,
}

/// An endpoint and its newest 100 messages.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointDetail {
    /// The endpoint.
    pub endpoint: crate::db::webhook_endpoints::Endpoint,
    /// Its messages, newest first, each with its delivery log (`log`).
    pub deliveries: Vec<crate::db::webhook_deliveries::DeliveryWithLog>,
}

/// An endpoint after a change.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EndpointChanged {
    /// The endpoint now.
    pub endpoint: crate::db::webhook_endpoints::Endpoint,
}

/// An endpoint deleted.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EndpointDeleted {
    /// Its id.
    pub deleted: i64,
}

/// The body of a secret rotation (optional).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RotateBody {
    /// How long the previous secret also signs (default
    /// `webhooks_out.rotation_overlap_secs`).
    #[schema(minimum = 0, maximum = 2592000)]
    pub overlap_secs: Option<u64>,
}

/// A new signing secret.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct SecretRotated {
    /// The endpoint.
    pub id: i64,
    /// The new secret (`whsec_…`), shown once.
    pub secret: String,
    /// Until when the previous secret also signs.
    pub previous_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// The body of a replay of an endpoint's messages.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ReplayBody {
    /// Every message created since then is sent again (RFC 3339).
    pub since: chrono::DateTime<chrono::Utc>,
}

/// Messages sent again.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct Replayed {
    /// The endpoint.
    pub endpoint_id: i64,
    /// How many messages.
    pub replayed: u64,
}

/// The delivery log of one message.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct DeliveryLog {
    /// The message.
    pub id: i64,
    /// Every attempt, oldest first: its status, latency and the start of the answer.
    pub attempts: Vec<crate::db::webhook_deliveries::Attempt>,
}

/// One message queued again.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct DeliveryReplayed {
    /// The message.
    pub id: i64,
    /// `pending`: it goes out at once.
    pub status: String,
}

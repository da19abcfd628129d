//! `payout-admin`: the operators' server. One listener serves
//! - `/health`, `/health/ready`, `/metrics` (no credentials, like every binary);
//! - the JSON API under `/api/v1` and its OpenAPI description at
//!   `/api/openapi.json` (generated from the handlers, [`openapi`]);
//! - the dashboard under `/ui/` and its login at `/login`;
//! - `POST /webhooks/gateway` and `POST /webhooks/stripe` (signed by the gateway);
//! - `POST /v1/earnings` (the platform, with an operator token).
//!
//! Every other route needs a token or a session ([`auth`]); every action is
//! a legal transition written with its event and the caller as actor, or a
//! 409 that says why not.

pub mod api;
pub mod auth;
pub mod host;
pub mod intake;
pub mod limits;
pub mod openapi;
pub mod overview;
pub mod pages;
pub mod platform;
pub mod strict_json;
pub mod webhooks;
pub mod webhooks_out;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    http::{HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use self::{intake::EarningsApi, webhooks::WebhookState};
use crate::{clock::SharedClock, config::Settings, queue::Queue};

/// What every handler needs.
#[derive(Clone)]
pub struct AdminState {
    /// The source of truth.
    pub pool: PgPool,
    /// The payout queue (jobs pushed after a retry or an enqueue).
    pub queue: Queue,
    /// All settings.
    pub settings: Arc<Settings>,
    /// Time.
    pub clock: SharedClock,
    /// The shared overview.
    pub overview: Arc<overview::Cache>,
    /// Failed-authentication budgets and lockouts, per source.
    pub lockout: Arc<limits::Lockout>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// The state over a pool, a queue and settings.
    pub fn new(pool: PgPool, queue: Queue, settings: Arc<Settings>, clock: SharedClock) -> Self {
        let lockout = Arc::new(limits::Lockout::new(
            settings.admin.auth_failures_per_minute,
            std::time::Duration::from_secs(settings.admin.lockout_secs),
        ));
        AdminState {
            pool,
            queue,
            settings,
            lockout,
            clock,
            overview: Arc::default(),
        }
    }
}

/// An API error: its status and a message safe to show (never a secret, never
/// a database error's text).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is wrong; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no valid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: not allowed for this caller.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: not legal from the current state.
    #[error("{message}")]
    Conflict {
        /// Why.
        message: String,
        /// The payout's status now.
        status: Option<String>,
    },
    /// 429: the source is locked out after too many failed authentications.
    #[error("{message}")]
    TooManyRequests {
        /// Why.
        message: String,
        /// Seconds until the lockout ends.
        retry_after: u64,
    },
    /// 503: the query ran past `admin.statement_timeout_ms` (a filter too wide).
    #[error("the query took too long")]
    TooSlow,
    /// 503: a dependency failed (logged; the caller gets a generic message).
    #[error("unavailable: {0}")]
    Unavailable(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        match code.as_deref() {
            // query_canceled: admin.statement_timeout_ms ran out.
            Some("57014") => ApiError::TooSlow,
            // A NUL byte or a value Postgres cannot store (22021, 22P05), or
            // a value longer than its column (22001): the input is wrong, not
            // the database.
            Some("22021" | "22P05") => ApiError::BadRequest(
                "a value contains a NUL byte or a character that cannot be stored".into(),
            ),
            Some("22001") => ApiError::BadRequest("a value is longer than allowed".into()),
            _ => ApiError::Unavailable(anyhow::Error::new(e)),
        }
    }
}

/// At most 300 characters of an error message, with an ellipsis when cut.
fn capped(m: &str) -> String {
    const MAX: usize = 300;
    if m.chars().count() <= MAX {
        return m.to_string();
    }
    let mut s: String = m.chars().take(MAX).collect();
    s.push('…');
    s
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, body) = match &self {
            ApiError::BadRequest(m) => {
                crate::metrics::ADMIN_REFUSED
                    .with_label_values(&["bad_input"])
                    .inc();
                // An error may quote the input (serde names an unknown
                // field or variant): never echo more than a line of it.
                (StatusCode::BAD_REQUEST, json!({"error": capped(m)}))
            }
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, json!({"error": m})),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, json!({"error": m})),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({"error": m})),
            ApiError::Conflict { message, status } => (
                StatusCode::CONFLICT,
                json!({"error": message, "status": status}),
            ),
            ApiError::TooManyRequests { message, .. } => {
                (StatusCode::TOO_MANY_REQUESTS, json!({"error": message}))
            }
            ApiError::TooSlow => {
                crate::metrics::ADMIN_REFUSED
                    .with_label_values(&["statement_timeout"])
                    .inc();
                tracing::warn!("admin query cancelled by admin.statement_timeout_ms");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "the query took longer than the server allows (admin.statement_timeout_ms); narrow the filter or the time range"}),
                )
            }
            ApiError::Unavailable(e) => {
                tracing::error!(error = %format!("{e:#}"), "admin request failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "a dependency (Postgres or Redis) is unavailable; try again"}),
                )
            }
        };
        let mut resp = (code, Json(body)).into_response();
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&retry_after.to_string()).expect("digits"),
            );
        }
        if code == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"payouts\""),
            );
        }
        resp
    }
}

const LOGIN_HTML: &str = include_str!("assets/login.html");
const LOGIN_JS: &str = include_str!("assets/login.js");
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Pages: no framing, no third-party anything.
/// No inline script anywhere (the login page's behaviour is `/login.js`);
/// inline styles stay allowed for the SVG charts' attributes.
pub const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   script-src 'self'; object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            // same-origin, not no-referrer: with no-referrer Chrome sends
            // `Origin: null` on the login form, which the login refuses as cross-site.
            (header::REFERRER_POLICY, "same-origin"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The whole admin router (without `/health*` and `/metrics`, see [`serve`]).
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/api/v1/session", get(api::session))
        .route("/api/v1/overview", get(api::overview))
        .route("/api/v1/payouts", get(api::list))
        .route("/api/v1/payouts/bulk-retry", post(api::bulk_retry))
        .route("/api/v1/payouts/bulk-cancel", post(api::bulk_cancel))
        .route("/api/v1/payouts/{id}", get(api::payout))
        .route("/api/v1/payouts/{id}/{action}", post(api::action))
        .route("/api/v1/failures", get(api::failures))
        .route("/api/v1/search", get(api::search))
        .route("/api/v1/payees", get(api::payees_list))
        .route("/api/v1/payees/{id}", get(api::payee))
        .route("/api/v1/settlements", get(api::settlements_list))
        .route("/api/v1/settlements/{id}", get(api::settlement))
        .route("/api/v1/reconcile-runs", get(api::reconcile_runs))
        .route("/api/v1/fleet", get(api::fleet))
        .route("/api/v1/fleet/pause", post(api::fleet_pause))
        .route("/api/v1/fleet/resume", post(api::fleet_resume))
        .route("/api/v1/tokens", get(api::tokens).post(api::create_token))
        .route("/api/v1/audit", get(api::audit))
        .route(
            "/api/v1/tokens/{name}",
            axum::routing::delete(api::revoke_token),
        )
        .route("/api/openapi.json", get(pages::openapi_json))
        .route("/logout", post(auth::logout))
        .merge(webhooks_out::routes())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .with_state(state.clone());

    let policy = state
        .settings
        .policy
        .load()
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("the policy was validated with the settings: {e}"));
    let earnings = intake::router(EarningsApi {
        pool: state.pool.clone(),
        policy,
        clock: state.clock.clone(),
    })
    .route_layer(middleware::from_fn(auth::require_operator))
    .route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::authenticate,
    ));

    let pages = Router::new()
        .route("/ui/", get(pages::index))
        .route("/ui/app.js", get(pages::app_js))
        .route("/ui/app.css", get(pages::app_css))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::page_session,
        ))
        .with_state(state.clone());

    let public = Router::new()
        .route("/", get(pages::root))
        .route("/ui", get(pages::ui_redirect))
        .route("/login", get(pages::login_page).post(auth::login))
        .route("/login.js", get(pages::login_js))
        .with_state(state.clone());

    let hooks = webhooks::router(WebhookState::from_settings(
        state.pool.clone(),
        state.clock.clone(),
        &state.settings.gateway,
    ));

    Router::new()
        .merge(api)
        .merge(earnings)
        .merge(platform::router(state.clone()))
        .merge(pages)
        .merge(public)
        .merge(hooks)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no such route"})),
            )
        })
}

/// Serves the admin router plus `/health*` and `/metrics` on `addr` until
/// `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: AdminState,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to bind {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let a = &state.settings.admin;
    let limits = crate::server::HttpLimits {
        header_read: std::time::Duration::from_secs(a.header_read_timeout_secs),
        max_connections: a.max_connections,
    };
    let request_timeout = std::time::Duration::from_secs(a.request_timeout_secs);
    let app = router(state.clone())
        .merge(crate::server::router(
            state.pool.clone(),
            state.queue.conn(),
        ))
        // Inner to outer: at most `max_in_flight` handled at once (the rest
        // wait), and the whole request, body and waiting included, within
        // `request_timeout_secs` or a 408 (a body declared and never sent
        // used to hold its connection for ever).
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            a.max_in_flight,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        .layer(middleware::from_fn(timed_out))
        // A Host the listener does not answer (DNS rebinding) reaches
        // nothing, not even /metrics.
        .layer(middleware::from_fn_with_state(
            host::AllowedHosts::new(&a.allowed_hosts, &a.client_ip_header),
            host::check,
        ))
        // Every request gets an `x-request-id` (the caller's when it sent
        // one, else a fresh ULID), answered back and carried by the trace
        // span of the request, so a log line and an operator's report of a
        // failed call meet. The span logs method, path and status at DEBUG
        // (never the query string, headers or body: they may hold tokens).
        .layer(tower_http::request_id::PropagateRequestIdLayer::new(
            REQUEST_ID.clone(),
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    let id = req
                        .headers()
                        .get(&REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!(
                        "request",
                        request_id = %id,
                        method = %req.method(),
                        path = %api::short(req.uri().path()),
                    )
                })
                .on_request(())
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::DEBUG),
                )
                .on_failure(()),
        )
        .layer(tower_http::request_id::SetRequestIdLayer::new(
            REQUEST_ID.clone(),
            MakeUlid,
        ))
        .layer(middleware::from_fn(drop_odd_request_id))
        // Every answer, JSON and errors included, is read as what it says it is.
        .layer(
            tower_http::set_header::SetResponseHeaderLayer::if_not_present(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        );
    let handle = tokio::spawn(crate::server::serve_hardened(
        listener, app, limits, shutdown,
    ));
    Ok((bound, handle))
}

/// The request id header, set by the caller or by [`MakeUlid`].
static REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// A fresh ULID for a request that came without an `x-request-id`. A
/// caller's own id is kept when it is a short printable token, replaced
/// otherwise (it is logged).
#[derive(Clone, Copy)]
struct MakeUlid;

impl tower_http::request_id::MakeRequestId for MakeUlid {
    fn make_request_id<B>(
        &mut self,
        _req: &axum::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        HeaderValue::from_str(&ulid::Ulid::new().to_string())
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

/// Removes a caller's `x-request-id` that is not a short token (1-64 of
/// letters, digits, `-`, `_`, `.`, `:`), so [`MakeUlid`] replaces it: it is
/// logged and answered back.
async fn drop_odd_request_id(mut req: axum::extract::Request, next: middleware::Next) -> Response {
    let odd = req.headers().get(&REQUEST_ID).is_some_and(|v| {
        let b = v.as_bytes();
        b.is_empty()
            || b.len() > 64
            || !b
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    });
    if odd {
        req.headers_mut().remove(&REQUEST_ID);
    }
    next.run(req).await
}

/// Counts and logs the requests the timeout layer answered 408.
async fn timed_out(req: axum::extract::Request, next: middleware::Next) -> Response {
    let source = limits::source(req.extensions(), req.headers(), "");
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if resp.status() == StatusCode::REQUEST_TIMEOUT {
        crate::metrics::ADMIN_REFUSED
            .with_label_values(&["timeout"])
            .inc();
        tracing::warn!(%source, path = %api::short(&path), "request refused: it took longer than admin.request_timeout_secs");
    }
    resp
}

/// The `payout-admin` process: serves until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metrics::init();
    let pool = crate::db::connect_with_statement_timeout(
        &settings.database,
        std::time::Duration::from_millis(settings.admin.statement_timeout_ms),
    )
    .await?;
    let master =
        crate::queue::sentinel::MasterWatch::start(&settings.redis, shutdown.clone()).await?;
    let conn = crate::queue::connect(&settings.redis).await?;
    let queue = Queue::from_settings(conn, &settings);
    let listen = settings.admin.listen;
    let state = AdminState::new(pool, queue, Arc::new(settings), crate::clock::system());
    let (addr, handle) = serve(listen, state, shutdown).await?;
    tracing::info!(%addr, "payout-admin listening: dashboard at http://{addr}/ui/, API at http://{addr}/api/v1");
    handle.await?;
    master.outcome()
}

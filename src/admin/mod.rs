//! `payout-admin`: the operators' server. One listener serves
//! - `/health`, `/health/ready`, `/metrics` (no credentials, like every binary);
//! - the JSON API under `/api/v1` and its OpenAPI description at `/api/openapi.json`;
//! - the dashboard under `/ui/` and its login at `/login`;
//! - `POST /webhooks/gateway` and `POST /webhooks/stripe` (signed by the gateway);
//! - `POST /v1/earnings` (the platform, with an operator token).
//!
//! Every other route needs a token or a session ([`auth`]); every action is
//! a legal transition written with its event and the caller as actor, or a
//! 409 that says why not.

pub mod api;
pub mod auth;
pub mod overview;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    http::{HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    clock::SharedClock,
    config::Settings,
    earnings_api::{self, EarningsApi},
    queue::Queue,
    webhooks::{self, WebhookState},
};

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
        AdminState {
            pool,
            queue,
            settings,
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
    /// 503: a dependency failed (logged; the caller gets a generic message).
    #[error("unavailable: {0}")]
    Unavailable(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Unavailable(anyhow::Error::new(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, body) = match &self {
            ApiError::BadRequest(m) => {
                crate::metrics::ADMIN_REFUSED
                    .with_label_values(&["bad_input"])
                    .inc();
                (StatusCode::BAD_REQUEST, json!({"error": m}))
            }
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, json!({"error": m})),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, json!({"error": m})),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({"error": m})),
            ApiError::Conflict { message, status } => (
                StatusCode::CONFLICT,
                json!({"error": message, "status": status}),
            ),
            ApiError::Unavailable(e) => {
                tracing::error!(error = %format!("{e:#}"), "admin request failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "a dependency (Postgres or Redis) is unavailable; try again"}),
                )
            }
        };
        let mut resp = (code, Json(body)).into_response();
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
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const OPENAPI: &str = include_str!("openapi.json");

/// Pages: no framing, no third-party anything.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   script-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

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
        .route("/api/v1/payouts/{id}", get(api::payout))
        .route("/api/v1/payouts/{id}/{action}", post(api::action))
        .route("/api/v1/failures", get(api::failures))
        .route("/api/v1/tokens", get(api::tokens).post(api::create_token))
        .route(
            "/api/v1/tokens/{name}",
            axum::routing::delete(api::revoke_token),
        )
        .route(
            "/api/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/logout", post(auth::logout))
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
    let earnings = earnings_api::router(EarningsApi {
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
        .route(
            "/ui/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::page_session,
        ))
        .with_state(state.clone());

    let public = Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route(
            "/login",
            get(|| async { asset(LOGIN_HTML, "text/html; charset=utf-8") }).post(auth::login),
        )
        .with_state(state.clone());

    let hooks = webhooks::router(WebhookState::from_settings(
        state.pool.clone(),
        state.clock.clone(),
        &state.settings.gateway,
    ));

    Router::new()
        .merge(api)
        .merge(earnings)
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
    let app = router(state.clone()).merge(crate::server::router(
        state.pool.clone(),
        state.queue.conn(),
    ));
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, handle))
}

/// The `payout-admin` process: serves until `shutdown`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metrics::init();
    let pool = crate::db::connect(&settings.database).await?;
    let conn = crate::queue::connect(&settings.redis).await?;
    let queue = Queue::from_settings(conn, &settings);
    let listen = settings.admin.listen;
    let state = AdminState::new(pool, queue, Arc::new(settings), crate::clock::system());
    let (addr, handle) = serve(listen, state, shutdown).await?;
    tracing::info!(%addr, "payout-admin listening: dashboard at http://{addr}/ui/, API at http://{addr}/api/v1");
    handle.await?;
    Ok(())
}

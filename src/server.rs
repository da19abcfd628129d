//! The small HTTP server every long-running binary runs: `/health` (the
//! process is up), `/health/ready` (Postgres and Redis answer) and `/metrics`;
//! and [`serve_hardened`], the listener for clients we do not trust (the
//! admin server: dashboard, API, webhooks, earnings intake).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, State},
    http::Request,
    http::StatusCode,
    routing::get,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

#[derive(Clone)]
pub(crate) struct Deps {
    pool: PgPool,
    redis: ConnectionManager,
}

/// `GET /health`: the process is up.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    security(()),
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String))
)]
pub(crate) async fn health() -> &'static str {
    "ok\n"
}

/// `GET /metrics`: every metric, in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The Prometheus text format", content_type = "text/plain; version=0.0.4", body = String))
)]
pub(crate) async fn metrics() -> String {
    crate::metrics::render()
}

/// `GET /health/ready`: Postgres and Redis answer.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready: `postgres: ok`, `redis: ok`", content_type = "text/plain", body = String),
        (status = 503, description = "Not ready: which dependency is unavailable", content_type = "text/plain", body = String),
    )
)]
pub(crate) async fn ready(State(d): State<Deps>) -> (StatusCode, String) {
    let pg = crate::db::ping(&d.pool).await.is_ok();
    let mut conn = d.redis.clone();
    let rd = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok();
    let code = if pg && rd {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("postgres: {}\nredis: {}\n", ok(pg), ok(rd)))
}

fn ok(b: bool) -> &'static str {
    if b { "ok" } else { "unavailable" }
}

/// The router.
pub fn router(pool: PgPool, redis: ConnectionManager) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Deps { pool, redis })
}

/// Binds `addr` (port 0 for any) and serves until `shutdown`; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    pool: PgPool,
    redis: ConnectionManager,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to bind {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let app = router(pool, redis);
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(bound)
}

/// What a listener that faces untrusted clients allows.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// From a connection's first byte (or its last request) to the end of
    /// the next request's headers; a client that sends half a header, or
    /// idles on a kept-alive connection, is closed after it.
    pub header_read: Duration,
    /// Open connections at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown`, then finishes the requests in
/// flight. Each connection gets hyper's header-read timeout (axum's own
/// `serve` sets none, so half a request header held a connection open for
/// ever), the number of connections is capped, and every request carries
/// the peer's address as [`ConnectInfo`] (for refusal logs and per-source
/// limits). Request and body timeouts and the in-flight limit are layers on
/// `app` (see `admin::serve`).
pub async fn serve_hardened(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment
                    // rather than spin.
                    tracing::warn!(error = %format_args!("{e:#}"), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::metrics::HTTP_CONNECTIONS_REFUSED.inc();
            tracing::warn!(source = %peer.ip(), limit = limits.max_connections, "connection refused: too many open connections");
            drop(stream);
            continue;
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read);
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

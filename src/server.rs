//! The small HTTP server every long-running binary runs: `/health` (the
//! process is up), `/health/ready` (Postgres and Redis answer) and `/metrics`.

use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Deps {
    pool: PgPool,
    redis: ConnectionManager,
}

async fn ready(State(d): State<Deps>) -> (StatusCode, String) {
    let pg = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&d.pool)
        .await
        .is_ok();
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
        .route("/health", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(|| async { crate::metrics::render() }))
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

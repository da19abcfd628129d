//! Postgres repositories: every SQL statement on a table lives in that
//! table's module. Time is always passed in (the clock seam), never `now()`.

pub mod audit;
pub mod batch;
pub mod earnings;
pub mod events;
pub mod filter;
pub mod payee_terms;
pub mod payees;
pub mod payouts;
pub mod search;
pub mod settlements;
pub mod tokens;

use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::config::DatabaseSettings;

/// The migrations in `migrations/`, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect(settings.url.expose_secret())
        .await
        .context("failed to connect to Postgres")
}

/// Opens a pool whose statements are cancelled after `statement_timeout`
/// (the admin server's: a wide dashboard query cannot hold the pool).
pub async fn connect_with_statement_timeout(
    settings: &DatabaseSettings,
    statement_timeout: Duration,
) -> anyhow::Result<PgPool> {
    let options: sqlx::postgres::PgConnectOptions = settings
        .url
        .expose_secret()
        .parse()
        .context("failed to parse the Postgres URL")?;
    let ms = statement_timeout.as_millis().to_string();
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect_with(options.options([("statement_timeout", ms.as_str())]))
        .await
        .context("failed to connect to Postgres")
}

/// The versions of this binary's embedded migrations that the database has
/// not applied yet (empty: the schema is current for this binary). A
/// database never migrated has them all pending.
pub async fn pending_migrations(pool: &PgPool) -> anyhow::Result<Vec<i64>> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await
        .context("failed to read the migration table")?;
    let applied: Vec<i64> = match table {
        Some(_) => sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .context("failed to read the applied migrations")?,
        None => Vec::new(),
    };
    Ok(MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("failed to run database migrations")
}

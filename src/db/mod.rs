//! Postgres repositories: every SQL statement on a table lives in that
//! table's module, and nowhere else in the crate (`tests/it/architecture.rs`
//! checks it). Time is always passed in (the clock seam), never `now()`.
//!
//! Statements are checked at compile time against the schema
//! (`sqlx::query!`, `query_as!`, `query_scalar!`), with their offline data
//! committed in `.sqlx/` so a build needs no database; `scripts/sqlx-prepare.sh`
//! rewrites it after a statement or a migration changes, and the test command
//! fails when it is stale. A statement whose shape depends on its input (the
//! payout filters) is built with `QueryBuilder`, every value bound. This
//! module holds what is not about a table: connecting, migrating, the health
//! check, and creating databases (names cannot be bound).

pub mod audit;
pub mod batch;
pub mod earnings;
pub mod earnings_import;
pub mod events;
pub mod filter;
pub mod payee_terms;
pub mod payees;
pub mod payout_requests;
pub mod payouts;
pub mod platform;
pub mod reconcile_runs;
pub mod search;
pub mod settlement_events;
pub mod settlements;
pub mod tokens;
pub mod webhook_cursors;
pub mod webhook_deliveries;
pub mod webhook_endpoints;
pub mod webhook_events;

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
    // sqlx's own table, which a database never migrated does not have:
    // read at run time, not checked against a schema.
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

/// Whether the database answers (the readiness check).
pub async fn ping(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query_scalar!(r#"SELECT 1 AS "one!""#)
        .fetch_one(pool)
        .await?;
    Ok(())
}

/// A database name safe to put in a statement: `[A-Za-z0-9_]` only (a
/// database name cannot be a bound parameter).
fn database_name(name: &str) -> anyhow::Result<&str> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        anyhow::bail!("database name {name:?} must be [A-Za-z0-9_]");
    }
    Ok(name)
}

/// Creates database `name` on the server of `admin` (a connection to another
/// database of it); with `if_missing`, only when it does not exist yet.
/// Tooling: the demo, the chaos harness, the benchmark.
pub async fn create_database(
    admin: &mut sqlx::PgConnection,
    name: &str,
    if_missing: bool,
) -> anyhow::Result<()> {
    let name = database_name(name)?;
    if if_missing {
        let exists = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS "exists!""#,
            name,
        )
        .fetch_one(&mut *admin)
        .await?;
        if exists {
            return Ok(());
        }
    }
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

/// Creates database `name` as a copy of database `template` (which must
/// have no sessions: a benchmark's prepared history).
#[cfg(feature = "testkit")]
pub async fn create_database_from(
    admin: &mut sqlx::PgConnection,
    name: &str,
    template: &str,
) -> anyhow::Result<()> {
    let (name, template) = (database_name(name)?, database_name(template)?);
    sqlx::raw_sql(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

/// Renames database `from` to `to` (neither may have sessions).
#[cfg(feature = "testkit")]
pub async fn rename_database(
    admin: &mut sqlx::PgConnection,
    from: &str,
    to: &str,
) -> anyhow::Result<()> {
    let (from, to) = (database_name(from)?, database_name(to)?);
    sqlx::raw_sql(&format!("ALTER DATABASE {from} RENAME TO {to}"))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

/// Whether database `name` exists.
#[cfg(feature = "testkit")]
pub async fn database_exists(admin: &mut sqlx::PgConnection, name: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS "exists!""#,
        name,
    )
    .fetch_one(&mut *admin)
    .await?)
}

/// Drops database `name` if it exists, ending its sessions.
pub async fn drop_database(admin: &mut sqlx::PgConnection, name: &str) -> anyhow::Result<()> {
    let name = database_name(name)?;
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

/// Transactions committed in the pool's database so far (`pg_stat_database`;
/// the benchmark's commits per payout).
pub async fn commits(pool: &PgPool) -> sqlx::Result<i64> {
    let n = sqlx::query_scalar!(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    .fetch_one(pool)
    .await?;
    Ok(n.unwrap_or(0))
}

/// The server's WAL insert position, in bytes from the start (the benchmark's
/// WAL bytes per payout: the difference across a burst, on a server nothing
/// else writes to).
pub async fn wal_position(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint AS "bytes!""#)
        .fetch_one(pool)
        .await
}

/// Rows written to one table of the current database so far
/// (`pg_stat_user_tables`): what a benchmark run wrote, per payout.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TableWrites {
    /// Rows inserted.
    pub inserted: i64,
    /// Rows updated.
    pub updated: i64,
    /// Of those, HOT updates (no index entry written).
    pub hot_updated: i64,
}

/// [`TableWrites`] of `table` (zero when it has no statistics yet). The
/// counts of a backend reach the statistics when it goes idle or exits.
pub async fn table_writes(pool: &PgPool, table: &str) -> sqlx::Result<TableWrites> {
    let row = sqlx::query!(
        r#"SELECT n_tup_ins AS "ins!", n_tup_upd AS "upd!", n_tup_hot_upd AS "hot!"
           FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname = $1"#,
        table
    )
    .fetch_optional(pool)
    .await?;
    Ok(row
        .map(|r| TableWrites {
            inserted: r.ins,
            updated: r.upd,
            hot_updated: r.hot,
        })
        .unwrap_or_default())
}

/// Other sessions connected to the pool's database (the benchmark waits for
/// the fleet's to end, so that their counts have reached the statistics).
pub async fn other_sessions(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()"#
    )
    .fetch_one(pool)
    .await
}

/// How many standbys replicate from this server synchronously, streaming
/// (the chaos harness's failover scenario waits for one).
#[cfg(feature = "testkit")]
pub async fn synchronous_standbys(conn: &mut sqlx::PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM pg_stat_replication
           WHERE state = 'streaming' AND sync_state = 'sync'"#
    )
    .fetch_one(&mut *conn)
    .await
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("failed to run database migrations")
}

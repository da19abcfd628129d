//! `earnings_import`: the temporary table an earnings import copies each
//! batch into (`COPY`), to record it with one `INSERT … SELECT` (see
//! [`crate::db::earnings::import_rows`]). It lives only in the import's
//! transaction (`ON COMMIT DROP`), so the database the statements are checked
//! against at compile time never has it: these are the repository's runtime
//! statements, and the only ones (`tests/it/architecture.rs` allows this file
//! by name for that reason).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Makes the staging table empty: creates it (`create`, the first batch of
/// the transaction) or truncates the previous batch's rows.
pub async fn prepare(conn: &mut PgConnection, create: bool) -> sqlx::Result<()> {
    if create {
        sqlx::query(
            "CREATE TEMPORARY TABLE earnings_import (
                 line BIGINT NOT NULL, payee_id BIGINT NOT NULL, source TEXT NOT NULL,
                 external_ref TEXT NOT NULL, gross NUMERIC NOT NULL, currency TEXT NOT NULL,
                 completed_at TIMESTAMPTZ NOT NULL, release_at TIMESTAMPTZ NOT NULL
             ) ON COMMIT DROP",
        )
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query("TRUNCATE earnings_import")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Copies `data` (`COPY` text format, the table's columns in order) into the
/// staging table.
pub async fn copy(conn: &mut PgConnection, data: Vec<u8>) -> sqlx::Result<()> {
    let mut copy = conn.copy_in_raw("COPY earnings_import FROM STDIN").await?;
    copy.send(data).await?;
    copy.finish().await?;
    Ok(())
}

/// Records the staged rows as earnings, in line order, posted by
/// `posted_by` at `now`; a reference already in the table records nothing.
/// Returns the (source, external_ref) of the rows recorded.
pub async fn record(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    posted_by: &str,
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "INSERT INTO earnings (payee_id, source, external_ref, gross, currency, completed_at, release_at, created_at, posted_by)
         SELECT payee_id, source, external_ref, gross, currency, completed_at, release_at, $1, $2
         FROM earnings_import ORDER BY line
         ON CONFLICT (source, external_ref) DO NOTHING
         RETURNING source, external_ref",
    )
    .bind(now)
    .bind(posted_by)
    .fetch_all(conn)
    .await
}

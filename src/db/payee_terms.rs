//! A payee's settlement terms: its schedule and payout method (columns of
//! `payees` added for settlement) and its agreed deductions
//! (`payee_deductions`) and own minimum payouts (`payee_minimums`). Kept apart from `payees.rs` so the payout core does
//! not depend on settlement.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};

use crate::domain::{Money, PayoutMethod, Schedule};

/// What settlement needs to know about a payee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Terms {
    /// The payee.
    pub payee_id: i64,
    /// `active` or `suspended` (suspended payees are not settled).
    pub status: String,
    /// Its own schedule; `None` = the policy's default.
    pub schedule: Option<Schedule>,
    /// How it is paid (decides the fee).
    pub method: PayoutMethod,
}

struct TermsRow {
    id: i64,
    status: String,
    schedule: Option<String>,
    payout_method: String,
}

impl TermsRow {
    fn into_terms(self) -> sqlx::Result<Terms> {
        let decode = |e: String| sqlx::Error::Decode(e.into());
        Ok(Terms {
            payee_id: self.id,
            status: self.status,
            schedule: self
                .schedule
                .map(|s| s.parse::<Schedule>().map_err(|e| decode(e.to_string())))
                .transpose()?,
            method: self.payout_method.parse().map_err(decode)?,
        })
    }
}

/// A payee's terms; `None` when there is no such payee.
pub async fn get(conn: &mut PgConnection, payee_id: i64) -> sqlx::Result<Option<Terms>> {
    sqlx::query_as!(
        TermsRow,
        "SELECT id, status, schedule, payout_method FROM payees WHERE id = $1",
        payee_id,
    )
    .fetch_optional(conn)
    .await?
    .map(TermsRow::into_terms)
    .transpose()
}

/// Like [`get`], and locks the payee row until the transaction ends: the
/// settlement of one payee is serialized across processes. (`NO KEY UPDATE`
/// still lets earnings for the payee be inserted meanwhile.)
pub async fn lock(conn: &mut PgConnection, payee_id: i64) -> sqlx::Result<Option<Terms>> {
    sqlx::query_as!(
        TermsRow,
        "SELECT id, status, schedule, payout_method FROM payees WHERE id = $1 FOR NO KEY UPDATE",
        payee_id,
    )
    .fetch_optional(conn)
    .await?
    .map(TermsRow::into_terms)
    .transpose()
}

/// Sets the schedule (`Some(None)` = back to the policy default) and/or the
/// payout method; returns the new terms, `None` when there is no such payee.
pub async fn set<'e>(
    db: impl PgExecutor<'e>,
    payee_id: i64,
    schedule: Option<Option<Schedule>>,
    method: Option<PayoutMethod>,
) -> sqlx::Result<Option<Terms>> {
    sqlx::query_as!(
        TermsRow,
        "UPDATE payees SET
             schedule = CASE WHEN $2 THEN $3 ELSE schedule END,
             payout_method = COALESCE($4, payout_method)
         WHERE id = $1 RETURNING id, status, schedule, payout_method",
        payee_id,
        schedule.is_some(),
        schedule.flatten().map(|s| s.to_string()),
        method.map(|m| m.as_str()),
    )
    .fetch_optional(db)
    .await?
    .map(TermsRow::into_terms)
    .transpose()
}

/// Which of `ids` are payees.
pub async fn existing(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar!("SELECT id FROM payees WHERE id = ANY($1)", ids)
        .fetch_all(conn)
        .await
}

/// An agreed deduction, charged once per settled period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deduction {
    /// Id.
    pub id: i64,
    /// The payee.
    pub payee_id: i64,
    /// Its currency.
    pub currency: String,
    /// What it is (`booth rent`).
    pub label: String,
    /// How much per period.
    pub amount: Decimal,
    /// When it was agreed.
    pub created_at: DateTime<Utc>,
}

/// Adds a deduction, or changes the amount of the one with this label.
pub async fn set_deduction<'e>(
    db: impl PgExecutor<'e>,
    payee_id: i64,
    label: &str,
    amount: Money,
    now: DateTime<Utc>,
) -> sqlx::Result<Deduction> {
    let currency = amount.currency();
    sqlx::query_as!(
        Deduction,
        "INSERT INTO payee_deductions (payee_id, currency, label, amount, created_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (payee_id, currency, label) DO UPDATE SET amount = EXCLUDED.amount
         RETURNING id, payee_id, currency, label, amount, created_at",
        payee_id,
        currency.code(),
        label,
        crate::domain::money::at_minor_unit(&amount),
        now,
    )
    .fetch_one(db)
    .await
}

/// Removes a deduction; `false` when there was none.
pub async fn remove_deduction<'e>(
    db: impl PgExecutor<'e>,
    payee_id: i64,
    currency: &str,
    label: &str,
) -> sqlx::Result<bool> {
    let res = sqlx::query!(
        "DELETE FROM payee_deductions WHERE payee_id = $1 AND currency = $2 AND label = $3",
        payee_id,
        currency,
        label,
    )
    .execute(db)
    .await?;
    Ok(res.rows_affected() > 0)
}

/// A payee's deductions in `currency`, in the order they were agreed.
pub async fn deductions(
    conn: &mut PgConnection,
    payee_id: i64,
    currency: &str,
) -> sqlx::Result<Vec<Deduction>> {
    sqlx::query_as!(
        Deduction,
        "SELECT id, payee_id, currency, label, amount, created_at
         FROM payee_deductions WHERE payee_id = $1 AND currency = $2 ORDER BY id",
        payee_id,
        currency,
    )
    .fetch_all(conn)
    .await
}

/// Sets (or with `None` removes) the payee's own minimum payout in
/// `currency`; the caller has checked it against the policy.
pub async fn set_minimum<'e>(
    db: impl PgExecutor<'e>,
    payee_id: i64,
    currency: crate::domain::Currency,
    amount: Option<Money>,
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    match amount {
        Some(m) => {
            sqlx::query!(
                "INSERT INTO payee_minimums (payee_id, currency, amount, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (payee_id, currency) DO UPDATE SET amount = EXCLUDED.amount",
                payee_id,
                currency.code(),
                crate::domain::money::at_minor_unit(&m),
                now,
            )
            .execute(db)
            .await?;
        }
        None => {
            sqlx::query!(
                "DELETE FROM payee_minimums WHERE payee_id = $1 AND currency = $2",
                payee_id,
                currency.code(),
            )
            .execute(db)
            .await?;
        }
    }
    Ok(())
}

/// The payee's own minimum payout in `currency`, if it has one.
pub async fn minimum(
    conn: &mut PgConnection,
    payee_id: i64,
    currency: &str,
) -> sqlx::Result<Option<Decimal>> {
    sqlx::query_scalar!(
        "SELECT amount FROM payee_minimums WHERE payee_id = $1 AND currency = $2",
        payee_id,
        currency,
    )
    .fetch_optional(conn)
    .await
}

// ---------------------------------------------------------------- bulk ----
// The settlement run's chunked reads: many payees per statement.

/// Like [`lock`] for many payees at once, locked in id order (so two runs
/// locking overlapping chunks never deadlock). A payee whose stored terms do
/// not decode is returned with the error, so it fails alone.
pub async fn lock_many(
    conn: &mut PgConnection,
    payee_ids: &[i64],
) -> sqlx::Result<Vec<(i64, sqlx::Result<Terms>)>> {
    let rows = sqlx::query_as!(
        TermsRow,
        "SELECT id, status, schedule, payout_method FROM payees WHERE id = ANY($1)
         ORDER BY id FOR NO KEY UPDATE",
        payee_ids,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.into_terms())).collect())
}

/// The deductions of many payees (any currency), by payee, currency, then
/// the order they were agreed (as [`deductions`]).
pub async fn deductions_many(
    conn: &mut PgConnection,
    payee_ids: &[i64],
) -> sqlx::Result<Vec<Deduction>> {
    sqlx::query_as!(
        Deduction,
        "SELECT id, payee_id, currency, label, amount, created_at
         FROM payee_deductions WHERE payee_id = ANY($1) ORDER BY payee_id, currency, id",
        payee_ids,
    )
    .fetch_all(conn)
    .await
}

/// The own minimum payouts of many payees: (payee, currency, amount).
pub async fn minimums_many(
    conn: &mut PgConnection,
    payee_ids: &[i64],
) -> sqlx::Result<Vec<(i64, String, Decimal)>> {
    let rows = sqlx::query!(
        "SELECT payee_id, currency, amount FROM payee_minimums WHERE payee_id = ANY($1)",
        payee_ids,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.payee_id, r.currency, r.amount))
        .collect())
}

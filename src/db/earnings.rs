//! The `earnings` table: what payees earned, one row per completed piece of
//! work, unique by (source, external reference) so recording the same work
//! twice adds nothing. A row is written once; settlement only fills in the
//! settlement that closed it and the payout that paid it (a trigger refuses
//! anything else).

use std::collections::HashSet;

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::{
    db::payee_terms,
    domain::{
        Currency, Money, Policy,
        earning::{FieldError, NewEarning, Row},
    },
};

/// An earnings row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Earning {
    /// Id.
    pub id: i64,
    /// Who earned it.
    pub payee_id: i64,
    /// Where it comes from (`booking`).
    pub source: String,
    /// The source's id for it.
    pub external_ref: String,
    /// Gross amount.
    pub gross: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// When the work was completed.
    pub completed_at: DateTime<Utc>,
    /// When it becomes payable (completed + hold).
    pub release_at: DateTime<Utc>,
    /// The settlement that closed it.
    pub settlement_id: Option<i64>,
    /// The payout that paid it.
    pub payout_id: Option<i64>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// Who posted it (`operator:NAME`, `cli:USER`).
    pub posted_by: String,
}

impl Earning {
    /// `source/external_ref`, for line items.
    pub fn label(&self) -> String {
        format!("{}/{}", self.source, self.external_ref)
    }
}

/// The amount at its currency's scale (`120.50`, `1500`, `12.345`): what is
/// stored and shown.
pub fn at_minor_unit(m: &Money) -> Decimal {
    let mut a = m.amount();
    a.rescale(m.currency().exponent());
    a
}

/// What recording an earning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A new row.
    Created(Earning),
    /// The same work (source, reference, payee, amount) was already recorded: nothing added.
    AlreadyHad(Earning),
    /// The reference is taken by different work (another payee or amount): refused.
    Conflict(Earning),
}

impl Recorded {
    /// The row, whichever it is.
    pub fn earning(&self) -> &Earning {
        match self {
            Recorded::Created(e) | Recorded::AlreadyHad(e) | Recorded::Conflict(e) => e,
        }
    }

    /// The refusal of a conflicting reference, naming the field.
    pub fn conflict_error(&self) -> Option<FieldError> {
        match self {
            Recorded::Conflict(e) => Some(FieldError {
                field: "external_ref".into(),
                message: format!(
                    "{} is already recorded (earning {}) for payee {} with {} {}",
                    e.label(),
                    e.id,
                    e.payee_id,
                    e.gross.normalize(),
                    e.currency
                ),
            }),
            _ => None,
        }
    }
}

/// Records one earning, idempotently by (source, external_ref), with who
/// posted it. The payee must exist (checked by the caller; the foreign key
/// is the backstop).
pub async fn record(
    conn: &mut PgConnection,
    e: &NewEarning,
    posted_by: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Recorded> {
    let created: Option<Earning> = sqlx::query_as(
        "INSERT INTO earnings (payee_id, source, external_ref, gross, currency, completed_at, release_at, created_at, posted_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (source, external_ref) DO NOTHING RETURNING *",
    )
    .bind(e.payee_id)
    .bind(&e.source)
    .bind(&e.external_ref)
    .bind(at_minor_unit(&e.gross))
    .bind(e.gross.currency().code())
    .bind(e.completed_at.trunc_subsecs(6))
    .bind(e.release_at.trunc_subsecs(6))
    .bind(now)
    .bind(posted_by)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = created {
        return Ok(Recorded::Created(row));
    }
    let existing: Earning =
        sqlx::query_as("SELECT * FROM earnings WHERE source = $1 AND external_ref = $2")
            .bind(&e.source)
            .bind(&e.external_ref)
            .fetch_one(conn)
            .await?;
    // The same work is the same payee and amount; the completion time of the
    // first report stands (a re-sent report may carry a later one).
    let same = existing.payee_id == e.payee_id
        && existing.gross == e.gross.amount()
        && existing.currency == e.gross.currency().code();
    Ok(if same {
        Recorded::AlreadyHad(existing)
    } else {
        Recorded::Conflict(existing)
    })
}

/// A row of an import that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// 1-based line in the file.
    pub line: usize,
    /// The bad field.
    pub field: String,
    /// Why.
    pub message: String,
}

/// The bounded `field` label of `payout_earnings_refused_total`.
pub fn refused_label(field: &str) -> &'static str {
    match field {
        "payee_id" => "payee_id",
        "source" => "source",
        "external_ref" => "external_ref",
        "gross" => "gross",
        "currency" => "currency",
        "completed_at" => "completed_at",
        "body" | "row" => "body",
        _ => "other",
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Rows read (blank lines not counted).
    pub rows: usize,
    /// New earnings recorded.
    pub created: usize,
    /// Rows already recorded before (nothing added).
    pub already_had: usize,
    /// Rows refused, with their line numbers.
    pub rejected: Vec<Rejected>,
    /// All or nothing was asked for.
    pub atomic: bool,
    /// Whether anything was written (false when `atomic` and a row was refused).
    pub committed: bool,
}

/// Imports rows: each is checked like `earnings add`; refused rows are
/// reported with their line numbers and the good rows recorded, in one
/// transaction; with `atomic`, one refused row means nothing is written.
pub async fn import(
    pool: &PgPool,
    rows: Vec<Row>,
    policy: &Policy,
    posted_by: &str,
    now: DateTime<Utc>,
    atomic: bool,
) -> sqlx::Result<ImportReport> {
    let mut report = ImportReport {
        rows: rows.len(),
        atomic,
        ..Default::default()
    };
    let reject = |report: &mut ImportReport, line: usize, e: FieldError| {
        crate::metrics::EARNINGS_REFUSED
            .with_label_values(&[refused_label(&e.field)])
            .inc();
        report.rejected.push(Rejected {
            line,
            field: e.field,
            message: e.message,
        })
    };
    let mut good: Vec<(usize, NewEarning)> = Vec::with_capacity(rows.len());
    for row in rows {
        match row.fields.and_then(|raw| raw.validate(policy, now)) {
            Ok(e) => good.push((row.line, e)),
            Err(e) => reject(&mut report, row.line, e),
        }
    }
    let mut tx = pool.begin().await?;
    let ids: Vec<i64> = good.iter().map(|(_, e)| e.payee_id).collect();
    let known: HashSet<i64> = payee_terms::existing(&mut tx, &ids)
        .await?
        .into_iter()
        .collect();
    good.retain(|(line, e)| {
        let ok = known.contains(&e.payee_id);
        if !ok {
            reject(
                &mut report,
                *line,
                FieldError {
                    field: "payee_id".into(),
                    message: format!("payee {} not found", e.payee_id),
                },
            );
        }
        ok
    });
    if atomic && !report.rejected.is_empty() {
        report.rejected.sort_by_key(|r| r.line);
        return Ok(report);
    }
    for (line, e) in &good {
        let recorded = record(&mut tx, e, posted_by, now).await?;
        if let Some(err) = recorded.conflict_error() {
            reject(&mut report, *line, err);
            continue;
        }
        match recorded {
            Recorded::Created(_) => report.created += 1,
            _ => report.already_had += 1,
        }
    }
    report.rejected.sort_by_key(|r| r.line);
    if atomic && !report.rejected.is_empty() {
        tx.rollback().await?;
        report.created = 0;
        report.already_had = 0;
        return Ok(report);
    }
    tx.commit().await?;
    report.committed = true;
    Ok(report)
}

/// One earning by id.
pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<Earning>> {
    sqlx::query_as("SELECT * FROM earnings WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// A payee's unsettled earnings in `currency` released before `release_before`,
/// oldest first; with `lock`, locked until the transaction ends.
pub async fn unsettled(
    conn: &mut PgConnection,
    payee_id: i64,
    currency: &str,
    release_before: DateTime<Utc>,
    lock: bool,
) -> sqlx::Result<Vec<Earning>> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    sqlx::query_as(&format!(
        "SELECT * FROM earnings
         WHERE payee_id = $1 AND currency = $2 AND settlement_id IS NULL AND release_at < $3
         ORDER BY release_at, id{lock}"
    ))
    .bind(payee_id)
    .bind(currency)
    .bind(release_before)
    .fetch_all(conn)
    .await
}

/// Earnings still held: unsettled, released at or after `after`, by currency
/// (count, gross, first release).
pub async fn held(
    conn: &mut PgConnection,
    payee_id: i64,
    after: DateTime<Utc>,
) -> sqlx::Result<Vec<(String, i64, Decimal, DateTime<Utc>)>> {
    sqlx::query_as(
        "SELECT currency, count(*), sum(gross), min(release_at) FROM earnings
         WHERE payee_id = $1 AND settlement_id IS NULL AND release_at >= $2
         GROUP BY currency ORDER BY currency",
    )
    .bind(payee_id)
    .bind(after)
    .fetch_all(conn)
    .await
}

/// Currencies in which the payee has unsettled earnings.
pub async fn unsettled_currencies(
    conn: &mut PgConnection,
    payee_id: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT currency FROM earnings WHERE payee_id = $1 AND settlement_id IS NULL ORDER BY currency",
    )
    .bind(payee_id)
    .fetch_all(conn)
    .await
}

/// Marks `ids` settled by `settlement_id` (and paid by `payout_id`), only
/// those still unsettled; returns how many.
pub async fn mark_settled(
    conn: &mut PgConnection,
    ids: &[i64],
    settlement_id: i64,
    payout_id: Option<i64>,
) -> sqlx::Result<u64> {
    let res = sqlx::query(
        "UPDATE earnings SET settlement_id = $2, payout_id = $3
         WHERE id = ANY($1) AND settlement_id IS NULL",
    )
    .bind(ids)
    .bind(settlement_id)
    .bind(payout_id)
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// Marks the earnings of carried-over settlements (`settlement_ids` and all
/// they carried in turn) paid by `payout_id`.
pub async fn mark_paid_through_carry(
    conn: &mut PgConnection,
    settlement_ids: &[i64],
    payout_id: i64,
) -> sqlx::Result<u64> {
    let res = sqlx::query(
        "WITH RECURSIVE chain AS (
             SELECT id FROM settlements WHERE id = ANY($1)
             UNION
             SELECT s.id FROM settlements s JOIN chain ON s.carried_into = chain.id)
         UPDATE earnings SET payout_id = $2
         WHERE settlement_id IN (SELECT id FROM chain) AND payout_id IS NULL",
    )
    .bind(settlement_ids)
    .bind(payout_id)
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// Earnings settled into `settlement_id`.
pub async fn for_settlement(pool: &PgPool, settlement_id: i64) -> sqlx::Result<Vec<Earning>> {
    sqlx::query_as("SELECT * FROM earnings WHERE settlement_id = $1 ORDER BY id")
        .bind(settlement_id)
        .fetch_all(pool)
        .await
}

/// Demo data: `per_payee` earnings for each of `payee_ids`, completed at
/// `completed_at` and released at `release_at` (20 to 200 in the currency,
/// at its minor unit), in one statement; returns how many.
pub async fn seed_demo(
    pool: &PgPool,
    payee_ids: &[i64],
    per_payee: i64,
    currency: Currency,
    completed_at: DateTime<Utc>,
    release_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<u64> {
    let res = sqlx::query(
        "INSERT INTO earnings (payee_id, source, external_ref, gross, currency, completed_at, release_at, created_at, posted_by)
         SELECT p, 'demo', 'demo-' || p || '-' || g || '-' || $7,
                round((20 + (p * 7919 + g * 104729) % 180)::numeric + ((p * 31 + g * 17) % 100)::numeric / 100, $8),
                $3, $4, $5, $6, 'demo'
         FROM unnest($1::bigint[]) p, generate_series(1, $2) g",
    )
    .bind(payee_ids)
    .bind(per_payee)
    .bind(currency.code())
    .bind(completed_at)
    .bind(release_at)
    .bind(now)
    .bind(ulid::Ulid::new().to_string())
    .bind(currency.exponent() as i32)
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

// ---------------------------------------------------------------- bulk ----
// The settlement run's chunked reads and marks: many (payee, currency)
// groups per statement.

/// [`unsettled`] for many groups at once, locked: the unsettled earnings of
/// each (`payee_ids[i]`, `currencies[i]`) released before `release_before[i]`,
/// by payee, currency, then oldest first. Each (payee, currency) at most once.
pub async fn unsettled_many(
    conn: &mut PgConnection,
    payee_ids: &[i64],
    currencies: &[&str],
    release_before: &[DateTime<Utc>],
) -> sqlx::Result<Vec<Earning>> {
    sqlx::query_as(
        "SELECT e.* FROM unnest($1::bigint[], $2::text[], $3::timestamptz[]) AS g(payee_id, currency, before)
         JOIN earnings e ON e.payee_id = g.payee_id AND e.currency = g.currency
                        AND e.settlement_id IS NULL AND e.release_at < g.before
         ORDER BY e.payee_id, e.currency, e.release_at, e.id
         FOR UPDATE OF e",
    )
    .bind(payee_ids)
    .bind(currencies)
    .bind(release_before)
    .fetch_all(conn)
    .await
}

/// [`mark_settled`] for many settlements: earning `ids[i]` settled by
/// `settlement_ids[i]` and paid by `payout_ids[i]`, only those still
/// unsettled; returns how many.
pub async fn mark_settled_many(
    conn: &mut PgConnection,
    ids: &[i64],
    settlement_ids: &[i64],
    payout_ids: &[Option<i64>],
) -> sqlx::Result<u64> {
    let res = sqlx::query(
        "UPDATE earnings e SET settlement_id = u.sid, payout_id = u.pid
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(id, sid, pid)
         WHERE e.id = u.id AND e.settlement_id IS NULL",
    )
    .bind(ids)
    .bind(settlement_ids)
    .bind(payout_ids)
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// [`mark_paid_through_carry`] for many payouts: the earnings of carried
/// settlement `settlement_ids[i]` (and all it carried in turn) paid by
/// `payout_ids[i]`. A settlement is carried into one payout only.
pub async fn mark_paid_through_carry_many(
    conn: &mut PgConnection,
    settlement_ids: &[i64],
    payout_ids: &[i64],
) -> sqlx::Result<u64> {
    let res = sqlx::query(
        "WITH RECURSIVE chain AS (
             SELECT u.id, u.pid FROM unnest($1::bigint[], $2::bigint[]) AS u(id, pid)
             UNION
             SELECT s.id, chain.pid FROM settlements s JOIN chain ON s.carried_into = chain.id)
         UPDATE earnings e SET payout_id = chain.pid FROM chain
         WHERE e.settlement_id = chain.id AND e.payout_id IS NULL",
    )
    .bind(settlement_ids)
    .bind(payout_ids)
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

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
    db::{earnings_import, payee_terms},
    domain::{
        Currency, PayeeId, PayoutId, Policy,
        earning::{FieldError, NewEarning, Row},
    },
};

/// An earnings row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Earning {
    /// Id.
    pub id: i64,
    /// Who earned it.
    #[schema(value_type = i64)]
    pub payee_id: PayeeId,
    /// Where it comes from (`booking`).
    pub source: String,
    /// The source's id for it.
    pub external_ref: String,
    /// Gross amount.
    #[schema(value_type = crate::domain::DecimalString)]
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
    #[schema(value_type = Option<i64>)]
    pub payout_id: Option<PayoutId>,
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

pub use crate::domain::money::at_minor_unit;

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
    let currency = e.gross.currency();
    let created: Option<Earning> = sqlx::query_as!(
        Earning,
        r#"INSERT INTO earnings (payee_id, source, external_ref, gross, currency, completed_at, release_at, created_at, posted_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (source, external_ref) DO NOTHING
         RETURNING id, payee_id AS "payee_id: PayeeId", source, external_ref, gross, currency, completed_at, release_at,
                settlement_id, payout_id AS "payout_id: PayoutId", created_at, posted_by"#,
        e.payee_id,
        &e.source,
        &e.external_ref,
        at_minor_unit(&e.gross),
        currency.code(),
        e.completed_at.trunc_subsecs(6),
        e.release_at.trunc_subsecs(6),
        now,
        posted_by,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = created {
        return Ok(Recorded::Created(row));
    }
    let existing: Earning = sqlx::query_as!(
        Earning,
        r#"SELECT id, payee_id AS "payee_id: PayeeId", source, external_ref, gross, currency, completed_at, release_at,
                settlement_id, payout_id AS "payout_id: PayoutId", created_at, posted_by
         FROM earnings WHERE source = $1 AND external_ref = $2"#,
        &e.source,
        &e.external_ref,
    )
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

/// Rows per batch of an import: one `COPY` and one `INSERT` each (and,
/// without `atomic`, one transaction). About 5 MB of rows in memory.
pub const IMPORT_BATCH_ROWS: usize = 20_000;

/// A row of an import after [`RawEarning::validate`](crate::domain::earning::RawEarning::validate).
type Checked = (usize, Result<NewEarning, FieldError>);

/// Imports rows: each is checked like `earnings add`; refused rows are
/// reported with their line numbers and the good rows recorded; with
/// `atomic`, one refused row means nothing is written. See [`import_rows`].
pub async fn import(
    pool: &PgPool,
    rows: Vec<Row>,
    policy: &Policy,
    posted_by: &str,
    now: DateTime<Utc>,
    atomic: bool,
) -> sqlx::Result<ImportReport> {
    let rows = rows.into_iter().map(Ok);
    import_rows(
        pool,
        rows,
        policy,
        posted_by,
        now,
        atomic,
        IMPORT_BATCH_ROWS,
    )
    .await
}

/// Imports rows as they are read (a [`RowReader`](crate::domain::earning::RowReader)
/// over a file of any size), `batch_rows` at a time: a blocking thread reads
/// and validates the next batch while this one is written. Each batch is
/// copied (`COPY`) into a temporary table and recorded with one
/// `INSERT … SELECT … ON CONFLICT DO NOTHING`, which does what [`record`]
/// does row by row: the first line of a reference wins, a later line (or an
/// earlier import) with the same payee and amount is already had, with other
/// work it is refused naming `external_ref`. Refused rows are reported by
/// line, sorted.
///
/// With `atomic`, the whole import is one transaction and one refused row
/// means nothing is written. Without it, each batch commits on its own: an
/// import stopped midway (a crash, a lost connection) leaves its first
/// batches recorded, and running it again finishes it, since the rows
/// already recorded are only counted as already had.
pub async fn import_rows<I>(
    pool: &PgPool,
    rows: I,
    policy: &Policy,
    posted_by: &str,
    now: DateTime<Utc>,
    atomic: bool,
    batch_rows: usize,
) -> sqlx::Result<ImportReport>
where
    I: Iterator<Item = std::io::Result<Row>> + Send + 'static,
{
    let batch_rows = batch_rows.max(1);
    let (send, mut batches) = tokio::sync::mpsc::channel::<std::io::Result<Vec<Checked>>>(1);
    let policy = policy.clone();
    let reading = tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(batch_rows);
        for row in rows {
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    let _ = send.blocking_send(Err(e));
                    return;
                }
            };
            batch.push((
                row.line,
                row.fields.and_then(|raw| raw.validate(&policy, now)),
            ));
            if batch.len() == batch_rows {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_rows));
                if send.blocking_send(Ok(full)).is_err() {
                    return; // the writer stopped
                }
            }
        }
        if !batch.is_empty() {
            let _ = send.blocking_send(Ok(batch));
        }
    });
    let report = write_batches(pool, &mut batches, posted_by, now, atomic).await;
    drop(batches);
    if let Err(e) = reading.await {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    report
}

fn rejected(line: usize, e: FieldError) -> Rejected {
    Rejected {
        line,
        field: e.field,
        message: e.message,
    }
}

async fn write_batches(
    pool: &PgPool,
    batches: &mut tokio::sync::mpsc::Receiver<std::io::Result<Vec<Checked>>>,
    posted_by: &str,
    now: DateTime<Utc>,
    atomic: bool,
) -> sqlx::Result<ImportReport> {
    let mut report = ImportReport {
        atomic,
        ..Default::default()
    };
    // Refused before anything is recorded (a bad field, an unknown payee) ...
    let mut refused: Vec<Rejected> = Vec::new();
    // ... and by what is recorded (a reference taken by other work).
    let mut conflicts: Vec<Rejected> = Vec::new();
    let mut whole = if atomic {
        Some(pool.begin().await?)
    } else {
        None
    };
    let mut staging_ready = false;
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        report.rows += batch.len();
        let mut good: Vec<(usize, NewEarning)> = Vec::with_capacity(batch.len());
        for (line, checked) in batch {
            match checked {
                Ok(e) => good.push((line, e)),
                Err(e) => refused.push(rejected(line, e)),
            }
        }
        let mut per_batch: Option<sqlx::Transaction<'static, sqlx::Postgres>> = None;
        let conn: &mut PgConnection = match whole.as_mut() {
            Some(tx) => tx,
            None => {
                staging_ready = false;
                per_batch.insert(pool.begin().await?)
            }
        };
        let mut ids: Vec<i64> = good.iter().map(|(_, e)| e.payee_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let known: HashSet<i64> = payee_terms::existing(conn, &ids)
            .await?
            .into_iter()
            .collect();
        good.retain(|(line, e)| {
            let ok = known.contains(&e.payee_id);
            if !ok {
                refused.push(rejected(
                    *line,
                    FieldError {
                        field: "payee_id".into(),
                        message: format!("payee {} not found", e.payee_id),
                    },
                ));
            }
            ok
        });
        // With `atomic` and a refused row nothing will be written: read on
        // only to report every refused row.
        let writing = !atomic || refused.is_empty();
        if writing && !good.is_empty() {
            let created = write_batch(conn, &mut good, posted_by, now, !staging_ready).await?;
            staging_ready = true;
            report.created += created.created;
            report.already_had += created.already_had;
            conflicts.extend(created.conflicts);
        }
        if let Some(tx) = per_batch {
            tx.commit().await?;
        }
    }
    if atomic && !refused.is_empty() {
        // As with one row at a time: a refused row stops the import before
        // anything is recorded, so no reference is found taken.
        conflicts.clear();
    }
    refused.append(&mut conflicts);
    refused.sort_by_key(|r| r.line);
    for r in &refused {
        crate::metrics::EARNINGS_REFUSED
            .with_label_values(&[refused_label(&r.field)])
            .inc();
    }
    report.rejected = refused;
    if let Some(tx) = whole {
        if !report.rejected.is_empty() {
            tx.rollback().await?;
            report.created = 0;
            report.already_had = 0;
            return Ok(report);
        }
        tx.commit().await?;
    }
    report.committed = true;
    Ok(report)
}

/// What one batch recorded.
struct BatchOutcome {
    created: usize,
    already_had: usize,
    conflicts: Vec<Rejected>,
}

/// Appends `s` to a `COPY … FROM STDIN` (text format) row.
fn copy_text(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// Records one batch of checked rows of known payees (sorted here by line).
async fn write_batch(
    conn: &mut PgConnection,
    good: &mut [(usize, NewEarning)],
    posted_by: &str,
    now: DateTime<Utc>,
    create_staging: bool,
) -> sqlx::Result<BatchOutcome> {
    use std::io::Write as _;

    good.sort_by_key(|(line, _)| *line);
    earnings_import::prepare(&mut *conn, create_staging).await?;
    let time = |t: DateTime<Utc>| {
        t.trunc_subsecs(6)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    };
    // The first line of each reference is the one recorded (as one row at a
    // time would); the later ones are compared with what is recorded.
    let mut firsts: HashSet<(&str, &str)> = HashSet::with_capacity(good.len());
    let mut others: Vec<(usize, &NewEarning)> = Vec::new();
    let mut data: Vec<u8> = Vec::with_capacity(good.len() * 128);
    for (line, e) in good.iter() {
        if !firsts.insert((e.source.as_str(), e.external_ref.as_str())) {
            others.push((*line, e));
            continue;
        }
        write!(data, "{line}\t{}\t", e.payee_id)?;
        copy_text(&mut data, &e.source);
        data.push(b'\t');
        copy_text(&mut data, &e.external_ref);
        writeln!(
            data,
            "\t{}\t{}\t{}\t{}",
            at_minor_unit(&e.gross),
            e.gross.currency().code(),
            time(e.completed_at),
            time(e.release_at)
        )?;
    }
    earnings_import::copy(&mut *conn, data).await?;

    // A reference already in the table records nothing.
    let inserted = earnings_import::record(&mut *conn, now, posted_by).await?;
    let mut fresh: HashSet<(&str, &str)> = inserted
        .iter()
        .map(|(s, r)| (s.as_str(), r.as_str()))
        .collect();
    let mut outcome = BatchOutcome {
        created: 0,
        already_had: 0,
        conflicts: Vec::new(),
    };
    let mut later = std::mem::take(&mut others);
    for (line, e) in good.iter() {
        let key = (e.source.as_str(), e.external_ref.as_str());
        if firsts.remove(&key) {
            if fresh.remove(&key) {
                outcome.created += 1;
            } else {
                others.push((*line, e));
            }
        }
    }
    others.append(&mut later);
    if others.is_empty() {
        return Ok(outcome);
    }
    // The rest name a reference recorded before: by an earlier line or
    // import, or by another writer meanwhile.
    let mut keys: Vec<(&str, &str)> = others
        .iter()
        .map(|(_, e)| (e.source.as_str(), e.external_ref.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let (sources, refs): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    let existing: Vec<Earning> = sqlx::query_as!(
        Earning,
        r#"SELECT e.id, e.payee_id AS "payee_id: PayeeId", e.source, e.external_ref, e.gross, e.currency, e.completed_at,
                e.release_at, e.settlement_id, e.payout_id AS "payout_id: PayoutId", e.created_at, e.posted_by
         FROM earnings e
         JOIN unnest($1::text[], $2::text[]) AS k (source, external_ref) USING (source, external_ref)"#,
        &sources as &[&str],
        &refs as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?;
    let existing: std::collections::HashMap<(&str, &str), &Earning> = existing
        .iter()
        .map(|e| ((e.source.as_str(), e.external_ref.as_str()), e))
        .collect();
    for (line, e) in others {
        let had = *existing
            .get(&(e.source.as_str(), e.external_ref.as_str()))
            .ok_or(sqlx::Error::RowNotFound)?;
        // The same work is the same payee and amount, as in `record`.
        let same = had.payee_id == e.payee_id
            && had.gross == e.gross.amount()
            && had.currency == e.gross.currency().code();
        if same {
            outcome.already_had += 1;
        } else if let Some(err) = Recorded::Conflict(had.clone()).conflict_error() {
            outcome.conflicts.push(rejected(line, err));
        }
    }
    Ok(outcome)
}

/// One earning by id.
pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<Earning>> {
    sqlx::query_as!(
        Earning,
        r#"SELECT id, payee_id AS "payee_id: PayeeId", source, external_ref, gross, currency, completed_at, release_at,
                settlement_id, payout_id AS "payout_id: PayoutId", created_at, posted_by
         FROM earnings WHERE id = $1"#,
        id,
    )
    .fetch_optional(pool)
    .await
}

/// A payee's unsettled earnings in `currency` released before `release_before`,
/// oldest first; with `lock`, locked until the transaction ends.
pub async fn unsettled(
    conn: &mut PgConnection,
    payee_id: PayeeId,
    currency: &str,
    release_before: DateTime<Utc>,
    lock: bool,
) -> sqlx::Result<Vec<Earning>> {
    // Two statements, the same but for the lock (the macros take literals).
    if lock {
        sqlx::query_as!(
            Earning,
            r#"SELECT id, payee_id AS "payee_id: PayeeId", source, external_ref, gross, currency, completed_at, release_at,
                settlement_id, payout_id AS "payout_id: PayoutId", created_at, posted_by
         FROM earnings
         WHERE payee_id = $1 AND currency = $2 AND settlement_id IS NULL AND voided_at IS NULL AND release_at < $3
         ORDER BY release_at, id FOR UPDATE"#,
            payee_id.get(),
            currency,
            release_before,
        )
        .fetch_all(conn)
        .await
    } else {
        sqlx::query_as!(
            Earning,
            r#"SELECT id, payee_id AS "payee_id: PayeeId", source, external_ref, gross, currency, completed_at, release_at,
                settlement_id, payout_id AS "payout_id: PayoutId", created_at, posted_by
         FROM earnings
         WHERE payee_id = $1 AND currency = $2 AND settlement_id IS NULL AND voided_at IS NULL AND release_at < $3
         ORDER BY release_at, id"#,
            payee_id.get(),
            currency,
            release_before,
        )
        .fetch_all(conn)
        .await
    }
}

/// Earnings still held: unsettled, released at or after `after`, by currency
/// (count, gross, first release).
pub async fn held(
    conn: &mut PgConnection,
    payee_id: PayeeId,
    after: DateTime<Utc>,
) -> sqlx::Result<Vec<(String, i64, Decimal, DateTime<Utc>)>> {
    let rows = sqlx::query!(
        r#"SELECT currency, count(*) AS "count!", sum(gross) AS "sum!", min(release_at) AS "min!" FROM earnings
         WHERE payee_id = $1 AND settlement_id IS NULL AND voided_at IS NULL AND release_at >= $2
         GROUP BY currency ORDER BY currency"#,
        payee_id.get(),
        after,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.currency, r.count, r.sum, r.min))
        .collect())
}

/// Currencies in which the payee has unsettled earnings.
pub async fn unsettled_currencies(
    conn: &mut PgConnection,
    payee_id: PayeeId,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "SELECT DISTINCT currency FROM earnings WHERE payee_id = $1 AND settlement_id IS NULL AND voided_at IS NULL ORDER BY currency",
        payee_id.get(),
    )
    .fetch_all(conn)
    .await
}

/// Marks `ids` settled by `settlement_id` (and paid by `payout_id`), each
/// at its line's position `positions[i]` among the settlement's lines (its
/// earning line in `payout_lines`), only those still unsettled; returns how many.
pub async fn mark_settled(
    conn: &mut PgConnection,
    ids: &[i64],
    positions: &[i32],
    settlement_id: i64,
    payout_id: Option<PayoutId>,
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "UPDATE earnings e SET settlement_id = $3, payout_id = $4, line_position = u.pos
         FROM unnest($1::bigint[], $2::int[]) AS u(id, pos)
         WHERE e.id = u.id AND e.settlement_id IS NULL AND e.voided_at IS NULL",
        ids,
        positions,
        settlement_id,
        payout_id.map(PayoutId::get),
    )
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// Marks the earnings of carried-over settlements (`settlement_ids` and all
/// they carried in turn) paid by `payout_id`.
pub async fn mark_paid_through_carry(
    conn: &mut PgConnection,
    settlement_ids: &[i64],
    payout_id: PayoutId,
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "WITH RECURSIVE chain AS (
             SELECT id FROM settlements WHERE id = ANY($1)
             UNION
             SELECT s.id FROM settlements s JOIN chain ON s.carried_into = chain.id)
         UPDATE earnings SET payout_id = $2
         WHERE settlement_id IN (SELECT id FROM chain) AND payout_id IS NULL",
        settlement_ids,
        payout_id.get(),
    )
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// Earnings settled into `settlement_id`.
pub async fn for_settlement(pool: &PgPool, settlement_id: i64) -> sqlx::Result<Vec<Earning>> {
    sqlx::query_as!(
        Earning,
        r#"SELECT id, payee_id AS "payee_id: PayeeId", source, external_ref, gross, currency, completed_at, release_at,
                settlement_id, payout_id AS "payout_id: PayoutId", created_at, posted_by
         FROM earnings WHERE settlement_id = $1 ORDER BY id"#,
        settlement_id,
    )
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
    // The casts give the parameters the types they were bound with.
    let res = sqlx::query!(
        "INSERT INTO earnings (payee_id, source, external_ref, gross, currency, completed_at, release_at, created_at, posted_by)
         SELECT p, 'demo', 'demo-' || p || '-' || g || '-' || $7::text,
                round((20 + (p * 7919 + g * 104729) % 180)::numeric + ((p * 31 + g * 17) % 100)::numeric / 100, $8::int),
                $3::text, $4::timestamptz, $5::timestamptz, $6::timestamptz, 'demo'
         FROM unnest($1::bigint[]) p, generate_series(1, $2::bigint) g",
        payee_ids,
        per_payee,
        currency.code(),
        completed_at,
        release_at,
        now,
        ulid::Ulid::new().to_string(),
        currency.exponent() as i32,
    )
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

// ---------------------------------------------------------------- bulk ----
// The settlement run's chunked reads and marks: many (payee, currency)
// groups per statement.

/// [`unsettled`] for many groups at once: the unsettled earnings of each
/// (`payee_ids[i]`, `currencies[i]`) released before `release_before[i]`,
/// by payee, currency, then oldest first. Each (payee, currency) at most once.
///
/// Not locked: the caller holds the payees' locks, which every settlement
/// takes, and nothing else changes an unsettled earning; the mark
/// ([`mark_settled_many`]) re-checks that each is still unsettled.
pub async fn unsettled_many(
    conn: &mut PgConnection,
    payee_ids: &[i64],
    currencies: &[&str],
    release_before: &[DateTime<Utc>],
) -> sqlx::Result<Vec<Earning>> {
    sqlx::query_as!(
        Earning,
        r#"SELECT e.id, e.payee_id AS "payee_id: PayeeId", e.source, e.external_ref, e.gross, e.currency, e.completed_at,
                e.release_at, e.settlement_id, e.payout_id AS "payout_id: PayoutId", e.created_at, e.posted_by
         FROM unnest($1::bigint[], $2::text[], $3::timestamptz[]) AS g(payee_id, currency, before)
         JOIN earnings e ON e.payee_id = g.payee_id AND e.currency = g.currency
                        AND e.settlement_id IS NULL AND e.voided_at IS NULL AND e.release_at < g.before
         ORDER BY e.payee_id, e.currency, e.release_at, e.id"#,
        payee_ids,
        currencies as &[&str],
        release_before,
    )
    .fetch_all(conn)
    .await
}

/// [`mark_settled`] for many settlements: earning `ids[i]` settled by
/// `settlement_ids[i]` at line `positions[i]` and paid by `payout_ids[i]`,
/// only those still unsettled; returns how many.
pub async fn mark_settled_many(
    conn: &mut PgConnection,
    ids: &[i64],
    positions: &[i32],
    settlement_ids: &[i64],
    payout_ids: &[Option<i64>],
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "UPDATE earnings e SET settlement_id = u.sid, payout_id = u.pid, line_position = u.pos
         FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bigint[]) AS u(id, pos, sid, pid)
         WHERE e.id = u.id AND e.settlement_id IS NULL AND e.voided_at IS NULL",
        ids,
        positions,
        settlement_ids,
        payout_ids as &[Option<i64>],
    )
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
    let res = sqlx::query!(
        "WITH RECURSIVE chain AS (
             SELECT u.id, u.pid FROM unnest($1::bigint[], $2::bigint[]) AS u(id, pid)
             UNION
             SELECT s.id, chain.pid FROM settlements s JOIN chain ON s.carried_into = chain.id)
         UPDATE earnings e SET payout_id = chain.pid FROM chain
         WHERE e.settlement_id = chain.id AND e.payout_id IS NULL",
        settlement_ids,
        payout_ids,
    )
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

// ---------- Escrow actions (#17 item 5) ----------

/// An earning as an escrow action reads it, locked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EscrowRow {
    /// Id.
    pub id: i64,
    /// Who earned it.
    #[schema(value_type = i64)]
    pub payee_id: PayeeId,
    /// Where it comes from.
    pub source: String,
    /// The source's id for it.
    pub external_ref: String,
    /// Gross amount.
    #[schema(value_type = crate::domain::DecimalString)]
    pub gross: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// When the work was completed.
    pub completed_at: DateTime<Utc>,
    /// When it is (or was) released.
    pub release_at: DateTime<Utc>,
    /// The settlement that closed it.
    pub settlement_id: Option<i64>,
    /// The payout that paid it.
    #[schema(value_type = Option<i64>)]
    pub payout_id: Option<PayoutId>,
    /// When it was voided.
    pub voided_at: Option<DateTime<Utc>>,
}

/// The payee of earning `id` (unlocked: an earning never changes payee),
/// so that an escrow action can lock the payee first, as settlement does.
pub async fn payee_of(conn: &mut PgConnection, id: i64) -> sqlx::Result<Option<PayeeId>> {
    sqlx::query_scalar!(
        r#"SELECT payee_id AS "payee_id: PayeeId" FROM earnings WHERE id = $1"#,
        id
    )
    .fetch_optional(conn)
    .await
}

/// Earning `id`, locked (its payee locked before by the caller).
pub async fn lock_for_escrow(conn: &mut PgConnection, id: i64) -> sqlx::Result<Option<EscrowRow>> {
    sqlx::query_as!(
        EscrowRow,
        r#"SELECT id, payee_id AS "payee_id: PayeeId", source, external_ref, gross, currency, completed_at, release_at,
                settlement_id, payout_id AS "payout_id: PayoutId", voided_at
         FROM earnings WHERE id = $1 FOR UPDATE"#,
        id,
    )
    .fetch_optional(conn)
    .await
}

/// Releases open earning `id` at `now` (or at its completion, if later);
/// returns the new release time, `None` when it is not open (settled or voided).
pub async fn release_now(
    conn: &mut PgConnection,
    id: i64,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        "UPDATE earnings SET release_at = greatest(completed_at, $2)
         WHERE id = $1 AND settlement_id IS NULL AND voided_at IS NULL
         RETURNING release_at",
        id,
        now,
    )
    .fetch_optional(conn)
    .await
}

/// Voids open earning `id`; whether it was open (not settled, not voided).
pub async fn void(
    conn: &mut PgConnection,
    id: i64,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "UPDATE earnings SET voided_at = $2, voided_by = $3, void_reason = $4
         WHERE id = $1 AND settlement_id IS NULL AND voided_at IS NULL",
        id,
        now,
        actor,
        reason,
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Held earnings (open, released after `now`) summed by one key: a payee
/// id or a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct HoldTotal {
    /// The payee (totals per payee) or the source (totals per source).
    pub key: String,
    /// ISO 4217 code.
    pub currency: String,
    /// How many earnings are held.
    pub earnings: i64,
    /// Their gross.
    #[schema(value_type = crate::domain::DecimalString)]
    pub gross: Decimal,
    /// The next release among them.
    pub next_release_at: Option<DateTime<Utc>>,
}

/// What a holds listing is narrowed to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldFilter {
    /// One payee.
    pub payee_id: Option<PayeeId>,
    /// One source.
    pub source: Option<String>,
    /// One currency.
    pub currency: Option<String>,
}

/// Held earnings at `now`, per payee (`by_source` false) or per source, and
/// currency; at most `limit` groups, largest gross first.
pub async fn hold_totals(
    pool: &PgPool,
    f: &HoldFilter,
    by_source: bool,
    now: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Vec<HoldTotal>> {
    sqlx::query_as!(
        HoldTotal,
        r#"SELECT CASE WHEN $5 THEN source ELSE payee_id::text END AS "key!", currency,
                  count(*) AS "earnings!", sum(gross) AS "gross!", min(release_at) AS next_release_at
           FROM earnings
           WHERE settlement_id IS NULL AND voided_at IS NULL AND release_at > $1
             AND ($2::bigint IS NULL OR payee_id = $2)
             AND ($3::text IS NULL OR source = $3)
             AND ($4::text IS NULL OR currency = $4)
           GROUP BY 1, currency
           ORDER BY sum(gross) DESC, 1, currency
           LIMIT $6"#,
        now,
        f.payee_id.map(PayeeId::get),
        f.source,
        f.currency,
        by_source,
        limit,
    )
    .fetch_all(pool)
    .await
}

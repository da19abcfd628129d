//! The `settlements` table and its line items: one settlement per payee,
//! currency and period (unique), with the payout it made or the balance it
//! carried over. Written only inside the settlement run's transaction
//! (`crate::services::settlement`).
//!
//! Line items are read from the `payout_lines` view (migration
//! 20261128000100): the stored lines (`settlement_lines`: commission, bonus,
//! deductions, carried balances, fee, remainder, returned) and one line per
//! settled earning, made from the earning itself (its `line_position`, set
//! when [`crate::db::earnings::mark_settled`] settles it), so an earning's
//! line is never written twice.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::domain::{
    Period, Schedule,
    policy::{Line, Settlement},
};

/// A settlement row (in the API, its amounts at its currency's exponent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[schema(as = Settlement)]
pub struct SettlementRow {
    /// Id.
    pub id: i64,
    /// The payee.
    pub payee_id: i64,
    /// The currency.
    pub currency: String,
    /// The period settled.
    pub period_start: DateTime<Utc>,
    /// End of the period (exclusive).
    pub period_end: DateTime<Utc>,
    /// The schedule that cut the period.
    pub schedule: String,
    /// The payout method the fee was computed for.
    pub payout_method: String,
    /// Earnings in the period.
    pub services: i32,
    /// Their gross.
    #[schema(value_type = crate::domain::DecimalString)]
    pub gross: Decimal,
    /// The payee's tier percentage.
    #[schema(value_type = crate::domain::DecimalString)]
    pub payee_percent: Decimal,
    /// Bonus points.
    #[schema(value_type = crate::domain::DecimalString)]
    pub bonus_percent: Decimal,
    /// The payee's share.
    #[schema(value_type = crate::domain::DecimalString)]
    pub payee_share: Decimal,
    /// What the platform kept.
    #[schema(value_type = crate::domain::DecimalString)]
    pub platform_commission: Decimal,
    /// Sum of deductions.
    #[schema(value_type = crate::domain::DecimalString)]
    pub deductions: Decimal,
    /// Balances carried in.
    #[schema(value_type = crate::domain::DecimalString)]
    pub carried_in: Decimal,
    /// Gross carried in without a fee yet.
    #[schema(value_type = crate::domain::DecimalString)]
    pub carried_gross_in: Decimal,
    /// The gateway fee.
    #[schema(value_type = crate::domain::DecimalString)]
    pub fee: Decimal,
    /// The sum of the lines: the payout's amount or the balance carried over.
    #[schema(value_type = crate::domain::DecimalString)]
    pub net: Decimal,
    /// With a payout: the part of the payable amount the gateway cannot send
    /// (below its payout step), kept in the payee's balance.
    #[schema(value_type = crate::domain::DecimalString)]
    pub carried_out: Decimal,
    /// `payout`, `below_minimum`, `shortfall`, or `returned` (its payout was
    /// cancelled or reversed; `net` is owed again).
    pub outcome: String,
    /// The payout made.
    pub payout_id: Option<i64>,
    /// The later settlement that took the balance over.
    pub carried_into: Option<i64>,
    /// The later settlement that took `carried_out` over.
    pub carried_out_into: Option<i64>,
    /// Who ran it.
    pub actor: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When its payout was cancelled or reversed and the money returned.
    pub returned_at: Option<DateTime<Utc>>,
    /// Made by an early payout request (`payout_requests`), not by the
    /// schedule: its period is not one of the schedule's.
    pub requested: bool,
}

/// A stored line item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct LineRow {
    /// The line's id: an earning's line is the settled earning itself and
    /// carries its id negated (`-earning_id`); other lines (commission, fee,
    /// deduction, carried balance) have positive ids.
    pub id: i64,
    /// Its settlement.
    pub settlement_id: i64,
    /// Its payout, when the settlement made one.
    pub payout_id: Option<i64>,
    /// Order within the settlement.
    pub position: i32,
    /// `earning`, `commission`, `volume_bonus`, `deduction`, `carried_in`,
    /// `fee`, `carried_out` (kept in the balance: below the gateway's payout
    /// step), `returned` (the fee refunded when the payout was cancelled or reversed).
    pub kind: String,
    /// Human text.
    pub description: String,
    /// Signed amount.
    #[schema(value_type = crate::domain::DecimalString)]
    pub amount: Decimal,
    /// The earning, for earning lines.
    pub earning_id: Option<i64>,
    /// The earlier settlement, for carried-in lines.
    pub carried_from: Option<i64>,
}

/// A (payee, currency) with something payable: released, unsettled
/// earnings, or a balance returned from a cancelled or reversed payout.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Candidate {
    /// The payee.
    pub payee_id: i64,
    /// The currency.
    pub currency: String,
    /// The payee's own schedule (`None`: the policy's default).
    pub schedule: Option<String>,
    /// `active` or `suspended`.
    pub status: String,
}

/// Every (payee, currency) with unsettled earnings released before `now` or
/// a balance returned before `now` (optionally of one payee), by payee: the
/// settlement run's worklist.
pub async fn candidates(
    pool: &PgPool,
    now: DateTime<Utc>,
    payee: Option<i64>,
) -> sqlx::Result<Vec<Candidate>> {
    sqlx::query_as!(
        Candidate,
        r#"SELECT c.payee_id AS "payee_id!", c.currency AS "currency!", p.schedule, p.status
         FROM (SELECT DISTINCT payee_id, currency FROM earnings
               WHERE settlement_id IS NULL AND voided_at IS NULL AND release_at < $1 AND ($2::bigint IS NULL OR payee_id = $2)
               UNION
               SELECT payee_id, currency FROM settlements
               WHERE outcome = 'returned' AND carried_into IS NULL AND returned_at < $1
                 AND ($2::bigint IS NULL OR payee_id = $2)) c
         JOIN payees p ON p.id = c.payee_id
         ORDER BY c.payee_id, c.currency"#,
        now,
        payee,
    )
    .fetch_all(pool)
    .await
}

/// When the payable things of (payee, currency) start: the earliest release
/// of an unsettled earning or return of a balance, and the earliest
/// completion of an unsettled earning (a first manual period starts there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Pending {
    /// Earliest release of an unsettled earning.
    pub first_release: Option<DateTime<Utc>>,
    /// Earliest completion of an unsettled earning.
    pub first_completed: Option<DateTime<Utc>>,
    /// Earliest return of an open returned balance.
    pub first_returned: Option<DateTime<Utc>>,
}

impl Pending {
    /// The earliest time something became payable.
    pub fn first(&self) -> Option<DateTime<Utc>> {
        match (self.first_release, self.first_returned) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// See [`Pending`].
pub async fn pending(
    conn: &mut PgConnection,
    payee_id: i64,
    currency: &str,
) -> sqlx::Result<Pending> {
    sqlx::query_as!(
        Pending,
        "SELECT (SELECT min(release_at) FROM earnings
                 WHERE payee_id = $1 AND currency = $2 AND settlement_id IS NULL AND voided_at IS NULL) AS first_release,
                (SELECT min(completed_at) FROM earnings
                 WHERE payee_id = $1 AND currency = $2 AND settlement_id IS NULL AND voided_at IS NULL) AS first_completed,
                (SELECT min(returned_at) FROM settlements
                 WHERE payee_id = $1 AND currency = $2 AND outcome = 'returned' AND carried_into IS NULL)
                    AS first_returned",
        payee_id,
        currency,
    )
    .fetch_one(conn)
    .await
}

/// The end of the latest settled period of (payee, currency) by its
/// schedule (a settlement made by an early payout request does not count:
/// requests never move the schedule).
pub async fn latest_end(
    conn: &mut PgConnection,
    payee_id: i64,
    currency: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        "SELECT max(period_end) FROM settlements WHERE payee_id = $1 AND currency = $2 AND NOT requested",
        payee_id,
        currency,
    )
    .fetch_one(conn)
    .await
}

/// Whether an early payout request of (payee, currency) made in
/// `[since, until)` (either end open when `None`) charged the payee's agreed
/// deductions: a request charges those of the scheduled period it is made
/// in, so a period's deductions are charged once (see
/// `services::payout_requests`).
pub async fn deductions_requested(
    conn: &mut PgConnection,
    payee_id: i64,
    currency: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM settlements
             WHERE payee_id = $1 AND currency = $2 AND requested AND deductions > 0
               AND ($3::timestamptz IS NULL OR created_at >= $3)
               AND ($4::timestamptz IS NULL OR created_at < $4)) AS "exists!""#,
        payee_id,
        currency,
        since,
        until,
    )
    .fetch_one(conn)
    .await
}

/// [`deductions_requested`] for many (payee, currency, since, until): those
/// (payee, currency) whose deductions a request in the window charged.
pub async fn deductions_requested_many(
    conn: &mut PgConnection,
    payee_ids: &[i64],
    currencies: &[&str],
    since: &[Option<DateTime<Utc>>],
    until: &[DateTime<Utc>],
) -> sqlx::Result<Vec<(i64, String)>> {
    if payee_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query!(
        r#"SELECT g.payee_id AS "payee_id!", g.currency AS "currency!"
         FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[])
              AS g(payee_id, currency, since, until)
         WHERE EXISTS (SELECT 1 FROM settlements s
             WHERE s.payee_id = g.payee_id AND s.currency = g.currency AND s.requested
               AND s.deductions > 0
               AND (g.since IS NULL OR s.created_at >= g.since) AND s.created_at < g.until)"#,
        payee_ids,
        currencies as &[&str],
        since as &[Option<DateTime<Utc>>],
        until,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.payee_id, r.currency)).collect())
}

/// A balance carried over (below the minimum, a shortfall, or returned
/// from a cancelled or reversed payout), or the remainder a payout kept
/// (below the gateway's payout step), not yet taken into a later settlement.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OpenCarry {
    /// The settlement that carried it.
    pub id: i64,
    /// `below_minimum`, `shortfall`, `returned`, or `payout` (a remainder).
    pub outcome: String,
    /// The payout whose money was returned (for `returned`), or that kept
    /// the remainder.
    pub payout_id: Option<i64>,
    /// The balance.
    pub net: Decimal,
    /// Gross that has not borne a fee: its own plus what it carried in (0
    /// for a remainder, whose payout paid the fee).
    pub fee_base: Decimal,
    /// Its period.
    pub period_start: DateTime<Utc>,
    /// End of its period.
    pub period_end: DateTime<Utc>,
    /// The remainder a payout kept (`carried_out`, taken over through
    /// `carried_out_into`), rather than the settlement's balance
    /// (`carried_into`). A settlement may have both open.
    pub remainder: bool,
}

impl OpenCarry {
    /// A balance returned from a cancelled or reversed payout: it is paid
    /// in the next period even without new work (the others wait for it).
    pub fn is_returned(&self) -> bool {
        self.outcome == "returned" && !self.remainder
    }
}

// The open balances of settlements `s` (in `open_carries` and
// `open_carries_many`, written out in each: the macros take literals only),
// one row per part (its balance, its remainder), from
//
//     CROSS JOIN LATERAL (VALUES
//         (false, s.net, s.gross + s.carried_gross_in,
//          s.outcome <> 'payout' AND s.carried_into IS NULL
//              AND (s.outcome <> 'returned' OR s.returned_at < BEFORE)),
//         (true, s.carried_out, 0::numeric, s.carried_out > 0 AND s.carried_out_into IS NULL))
//       AS part(remainder, net, fee_base, open)
//
// where BEFORE is the end of the period that takes them in (a returned
// balance only once it was returned before then), restricted to settlements
// with an open part by the partial index's predicate:
//
//     ((s.outcome <> 'payout' AND s.carried_into IS NULL)
//       OR (s.carried_out > 0 AND s.carried_out_into IS NULL))

/// Open carried balances of (payee, currency) that a period ending at
/// `before` takes in (a returned balance only once it was returned before
/// then), oldest first; with `lock`, locked until the transaction ends.
pub async fn open_carries(
    conn: &mut PgConnection,
    payee_id: i64,
    currency: &str,
    before: DateTime<Utc>,
    lock: bool,
) -> sqlx::Result<Vec<OpenCarry>> {
    // Two statements, the same but for the lock (the macros take literals).
    if lock {
        sqlx::query_as!(
            OpenCarry,
            r#"SELECT s.id, s.outcome, s.payout_id, part.net AS "net!", part.fee_base AS "fee_base!",
                s.period_start, s.period_end, part.remainder AS "remainder!"
         FROM settlements s CROSS JOIN LATERAL (VALUES
             (false, s.net, s.gross + s.carried_gross_in,
              s.outcome <> 'payout' AND s.carried_into IS NULL
                  AND (s.outcome <> 'returned' OR s.returned_at < $3)),
             (true, s.carried_out, 0::numeric, s.carried_out > 0 AND s.carried_out_into IS NULL))
           AS part(remainder, net, fee_base, open)
         WHERE s.payee_id = $1 AND s.currency = $2 AND ((s.outcome <> 'payout' AND s.carried_into IS NULL)
              OR (s.carried_out > 0 AND s.carried_out_into IS NULL)) AND part.open
         ORDER BY s.period_end, s.id, part.remainder FOR UPDATE OF s"#,
            payee_id,
            currency,
            before,
        )
        .fetch_all(conn)
        .await
    } else {
        sqlx::query_as!(
            OpenCarry,
            r#"SELECT s.id, s.outcome, s.payout_id, part.net AS "net!", part.fee_base AS "fee_base!",
                s.period_start, s.period_end, part.remainder AS "remainder!"
         FROM settlements s CROSS JOIN LATERAL (VALUES
             (false, s.net, s.gross + s.carried_gross_in,
              s.outcome <> 'payout' AND s.carried_into IS NULL
                  AND (s.outcome <> 'returned' OR s.returned_at < $3)),
             (true, s.carried_out, 0::numeric, s.carried_out > 0 AND s.carried_out_into IS NULL))
           AS part(remainder, net, fee_base, open)
         WHERE s.payee_id = $1 AND s.currency = $2 AND ((s.outcome <> 'payout' AND s.carried_into IS NULL)
              OR (s.carried_out > 0 AND s.carried_out_into IS NULL)) AND part.open
         ORDER BY s.period_end, s.id, part.remainder"#,
            payee_id,
            currency,
            before,
        )
        .fetch_all(conn)
        .await
    }
}

/// What [`insert`] writes besides the computed settlement.
#[derive(Debug, Clone)]
pub struct NewSettlement<'a> {
    /// The payee.
    pub payee_id: i64,
    /// The period.
    pub period: Period,
    /// The schedule that cut it.
    pub schedule: Schedule,
    /// The computation.
    pub settlement: &'a Settlement,
    /// Its payout, when it made one.
    pub payout_id: Option<i64>,
    /// Who runs it.
    pub actor: &'a str,
    /// Made by an early payout request, not the schedule ([`insert`] only):
    /// never counted as the end of a scheduled period ([`latest_end`]).
    pub requested: bool,
}

/// Inserts the settlement and its stored lines (not the earning lines: the
/// caller marks the earnings settled with their positions, see the module
/// doc); `None` (nothing written) when a period starting there is settled
/// already (by the schedule: a requested settlement never conflicts).
pub async fn insert(
    conn: &mut PgConnection,
    n: &NewSettlement<'_>,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<i64>> {
    let s = n.settlement;
    let id: Option<i64> = sqlx::query_scalar!(
        "INSERT INTO settlements (payee_id, currency, period_start, period_end, schedule, payout_method,
             services, gross, payee_percent, bonus_percent, payee_share, platform_commission, deductions,
             carried_in, carried_gross_in, fee, net, outcome, payout_id, actor, created_at, carried_out,
             requested)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
                 $23)
         ON CONFLICT (payee_id, currency, period_start) WHERE NOT requested DO NOTHING RETURNING id",
        n.payee_id,
        s.currency.code(),
        n.period.start,
        n.period.end,
        n.schedule.to_string(),
        s.method.as_str(),
        i32::try_from(s.services).unwrap_or(i32::MAX),
        s.gross,
        s.payee_percent,
        s.bonus_percent,
        s.payee_share,
        s.platform_commission,
        s.deductions,
        s.carried_in,
        s.carried_gross_in,
        s.fee,
        s.net,
        s.outcome.as_str(),
        n.payout_id,
        n.actor,
        now,
        s.carried_out,
        n.requested,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(id) = id else {
        return Ok(None);
    };
    insert_lines(conn, id, n.payout_id, &s.lines).await?;
    Ok(Some(id))
}

async fn insert_lines(
    conn: &mut PgConnection,
    settlement_id: i64,
    payout_id: Option<i64>,
    lines: &[Line],
) -> sqlx::Result<()> {
    let mut l = LinesColumns::default();
    l.push(settlement_id, payout_id, lines);
    l.insert(conn).await
}

/// Records that `into` took over the balances of `ids`.
pub async fn consume_carries(conn: &mut PgConnection, ids: &[i64], into: i64) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "UPDATE settlements SET carried_into = $2 WHERE id = ANY($1) AND carried_into IS NULL",
        ids,
        into,
    )
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// Records that `into` took over the remainders (`carried_out`) of `ids`.
pub async fn consume_remainders(
    conn: &mut PgConnection,
    ids: &[i64],
    into: i64,
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "UPDATE settlements SET carried_out_into = $2
         WHERE id = ANY($1) AND carried_out > 0 AND carried_out_into IS NULL",
        ids,
        into,
    )
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// Currencies in which the payee has a returned balance not yet carried on.
pub async fn returned_currencies(
    conn: &mut PgConnection,
    payee_id: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "SELECT DISTINCT currency FROM settlements
         WHERE payee_id = $1 AND outcome = 'returned' AND carried_into IS NULL ORDER BY currency",
        payee_id,
    )
    .fetch_all(conn)
    .await
}

/// The line items of a payout (of the settlement that made it), in order.
pub async fn lines_for_payout(pool: &PgPool, payout_id: i64) -> sqlx::Result<Vec<LineRow>> {
    // The settlement first: a join into the view could not use its indexes.
    sqlx::query_as!(
        LineRow,
        r#"SELECT id AS "id!", settlement_id AS "settlement_id!", payout_id, position AS "position!",
                kind AS "kind!", description AS "description!", amount AS "amount!", earning_id, carried_from
         FROM payout_lines
         WHERE settlement_id = (SELECT id FROM settlements WHERE payout_id = $1) ORDER BY position"#,
        payout_id,
    )
    .fetch_all(pool)
    .await
}

/// The status of `payout_id` when it is a settlement payout whose money was
/// returned to the payee's balance (it must never be retried); `None` otherwise.
pub async fn returned_status(
    pool: &PgPool,
    payout_id: i64,
) -> sqlx::Result<Option<crate::domain::PayoutStatus>> {
    let status: Option<String> = sqlx::query_scalar!(
        "SELECT p.status FROM payouts p JOIN settlements s ON s.payout_id = p.id
         WHERE p.id = $1 AND s.outcome = 'returned'",
        payout_id,
    )
    .fetch_optional(pool)
    .await?;
    status
        .map(|s| s.parse().map_err(|e: String| sqlx::Error::Decode(e.into())))
        .transpose()
}

/// Which of `payout_ids` are settlement payouts whose money was returned
/// to the payee's balance (reconciliation, a page of payouts at a time).
pub async fn returned_among(pool: &PgPool, payout_ids: &[i64]) -> sqlx::Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        "SELECT payout_id FROM settlements WHERE outcome = 'returned' AND payout_id = ANY($1)",
        payout_ids,
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().flatten().collect())
}

/// One settlement.
pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<SettlementRow>> {
    sqlx::query_as!(
        SettlementRow,
        "SELECT id, payee_id, currency, period_start, period_end, schedule, payout_method, services,
                gross, payee_percent, bonus_percent, payee_share, platform_commission, deductions,
                carried_in, carried_gross_in, fee, net, carried_out, outcome, payout_id, carried_into,
                carried_out_into, actor, created_at, returned_at, requested
         FROM settlements WHERE id = $1",
        id,
    )
    .fetch_optional(pool)
    .await
}

/// A settlement's line items, in order.
pub async fn lines(pool: &PgPool, settlement_id: i64) -> sqlx::Result<Vec<LineRow>> {
    sqlx::query_as!(
        LineRow,
        r#"SELECT id AS "id!", settlement_id AS "settlement_id!", payout_id, position AS "position!",
                kind AS "kind!", description AS "description!", amount AS "amount!", earning_id, carried_from
         FROM payout_lines WHERE settlement_id = $1 ORDER BY position"#,
        settlement_id,
    )
    .fetch_all(pool)
    .await
}

/// Claims the settlement interval: `true` (and records `now`) when no pass
/// ran in the last `every_secs` seconds (or the clock went back), `false`
/// otherwise. One conditional update, so two producers never both claim it.
pub async fn claim_interval(
    pool: &PgPool,
    now: DateTime<Utc>,
    every_secs: u64,
) -> sqlx::Result<bool> {
    let claimed = sqlx::query_scalar!(
        "UPDATE settlement_clock SET last_run_at = $1
         WHERE last_run_at IS NULL OR last_run_at <= $1::timestamptz - make_interval(secs => $2) OR last_run_at > $1
         RETURNING true",
        now,
        every_secs as f64,
    )
    .fetch_optional(pool)
    .await?;
    Ok(claimed.flatten().unwrap_or(false))
}

// ---------------------------------------------------------------- bulk ----
// The settlement run's chunked reads and writes: many (payee, currency)
// groups per statement, each group at most once per statement.

/// Where a (payee, currency) stands, read under its payee's lock: the end of
/// its latest settled period and when its payable things start.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GroupState {
    /// The payee.
    pub payee_id: i64,
    /// The currency.
    pub currency: String,
    /// See [`latest_end`].
    pub latest: Option<DateTime<Utc>>,
    /// See [`pending`].
    #[sqlx(flatten)]
    pub pending: Pending,
}

/// Plans the rest of the transaction's prepared statements generically:
/// the settlement run's chunk statements take arrays of keys (a thousand
/// payees, ten thousand earnings), and a custom plan, which sees how many,
/// hashes or sorts the whole table instead of looking each key up, badly so
/// on a freshly imported `earnings` that has no statistics yet (month-end:
/// import, then settle), where it thinks nearly no earning is unsettled.
/// The generic plan looks the keys up by index, whatever the statistics.
pub async fn plan_by_key(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query!("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(conn)
        .await?;
    Ok(())
}

/// [`latest_end`] and [`pending`] of many (payee, currency) at once.
pub async fn states(
    conn: &mut PgConnection,
    payee_ids: &[i64],
    currencies: &[&str],
) -> sqlx::Result<Vec<GroupState>> {
    let rows = sqlx::query!(
        r#"SELECT g.payee_id AS "payee_id!", g.currency AS "currency!",
                (SELECT max(period_end) FROM settlements s
                 WHERE s.payee_id = g.payee_id AND s.currency = g.currency AND NOT s.requested) AS latest,
                (SELECT min(release_at) FROM earnings e
                 WHERE e.payee_id = g.payee_id AND e.currency = g.currency AND e.settlement_id IS NULL AND e.voided_at IS NULL)
                    AS first_release,
                (SELECT min(completed_at) FROM earnings e
                 WHERE e.payee_id = g.payee_id AND e.currency = g.currency AND e.settlement_id IS NULL AND e.voided_at IS NULL)
                    AS first_completed,
                (SELECT min(returned_at) FROM settlements s
                 WHERE s.payee_id = g.payee_id AND s.currency = g.currency
                   AND s.outcome = 'returned' AND s.carried_into IS NULL) AS first_returned
         FROM unnest($1::bigint[], $2::text[]) AS g(payee_id, currency)"#,
        payee_ids,
        currencies as &[&str],
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| GroupState {
            payee_id: r.payee_id,
            currency: r.currency,
            latest: r.latest,
            pending: Pending {
                first_release: r.first_release,
                first_completed: r.first_completed,
                first_returned: r.first_returned,
            },
        })
        .collect())
}

/// An [`OpenCarry`] with the (payee, currency) it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GroupCarry {
    /// The payee.
    pub payee_id: i64,
    /// The currency.
    pub currency: String,
    /// The balance.
    #[sqlx(flatten)]
    pub carry: OpenCarry,
}

/// [`open_carries`] (locked) of many (payee, currency) at once, each for a
/// period ending at `before[i]`; by payee, currency, then oldest first.
pub async fn open_carries_many(
    conn: &mut PgConnection,
    payee_ids: &[i64],
    currencies: &[&str],
    before: &[DateTime<Utc>],
) -> sqlx::Result<Vec<GroupCarry>> {
    let rows = sqlx::query!(
        r#"SELECT s.payee_id, s.currency, s.id, s.outcome, s.payout_id, part.net AS "net!",
                part.fee_base AS "fee_base!", s.period_start, s.period_end, part.remainder AS "remainder!"
         FROM unnest($1::bigint[], $2::text[], $3::timestamptz[]) AS g(payee_id, currency, before)
         JOIN settlements s ON s.payee_id = g.payee_id AND s.currency = g.currency AND ((s.outcome <> 'payout' AND s.carried_into IS NULL)
              OR (s.carried_out > 0 AND s.carried_out_into IS NULL))
         CROSS JOIN LATERAL (VALUES
             (false, s.net, s.gross + s.carried_gross_in,
              s.outcome <> 'payout' AND s.carried_into IS NULL
                  AND (s.outcome <> 'returned' OR s.returned_at < g.before)),
             (true, s.carried_out, 0::numeric, s.carried_out > 0 AND s.carried_out_into IS NULL))
           AS part(remainder, net, fee_base, open)
         WHERE part.open
         ORDER BY s.payee_id, s.currency, s.period_end, s.id, part.remainder
         FOR UPDATE OF s"#,
        payee_ids,
        currencies as &[&str],
        before,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| GroupCarry {
            payee_id: r.payee_id,
            currency: r.currency,
            carry: OpenCarry {
                id: r.id,
                outcome: r.outcome,
                payout_id: r.payout_id,
                net: r.net,
                fee_base: r.fee_base,
                period_start: r.period_start,
                period_end: r.period_end,
                remainder: r.remainder,
            },
        })
        .collect())
}

/// [`insert`] for many settlements (at most one per payee and currency),
/// with their stored lines (not the earning lines: see the module doc), in
/// two statements. Unlike [`insert`], a period
/// already settled is an error (the caller holds the payees' locks, so it
/// cannot happen unless something else is wrong; the caller rolls back).
/// Returns the new ids in the order of `news`.
pub async fn insert_many(
    conn: &mut PgConnection,
    news: &[NewSettlement<'_>],
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    if news.is_empty() {
        return Ok(Vec::new());
    }
    debug_assert!(
        news.iter().all(|n| !n.requested),
        "the run settles by schedule"
    );
    let col = |f: &dyn Fn(&NewSettlement<'_>) -> Decimal| -> Vec<Decimal> {
        news.iter().map(f).collect()
    };
    let payee_ids: Vec<i64> = news.iter().map(|n| n.payee_id).collect();
    let currencies: Vec<&str> = news.iter().map(|n| n.settlement.currency.code()).collect();
    let starts: Vec<DateTime<Utc>> = news.iter().map(|n| n.period.start).collect();
    let ends: Vec<DateTime<Utc>> = news.iter().map(|n| n.period.end).collect();
    let schedules: Vec<String> = news.iter().map(|n| n.schedule.to_string()).collect();
    let methods: Vec<&str> = news.iter().map(|n| n.settlement.method.as_str()).collect();
    let services: Vec<i32> = news
        .iter()
        .map(|n| i32::try_from(n.settlement.services).unwrap_or(i32::MAX))
        .collect();
    let outcomes: Vec<&str> = news.iter().map(|n| n.settlement.outcome.as_str()).collect();
    let payout_ids: Vec<Option<i64>> = news.iter().map(|n| n.payout_id).collect();
    let actors: Vec<&str> = news.iter().map(|n| n.actor).collect();
    let rows = sqlx::query!(
        "INSERT INTO settlements (payee_id, currency, period_start, period_end, schedule, payout_method,
             services, gross, payee_percent, bonus_percent, payee_share, platform_commission, deductions,
             carried_in, carried_gross_in, fee, net, outcome, payout_id, actor, carried_out, created_at)
         SELECT *, $22::timestamptz FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[],
             $5::text[], $6::text[], $7::int[], $8::numeric[], $9::numeric[], $10::numeric[],
             $11::numeric[], $12::numeric[], $13::numeric[], $14::numeric[], $15::numeric[],
             $16::numeric[], $17::numeric[], $18::text[], $19::bigint[], $20::text[], $21::numeric[])
         RETURNING id, payee_id, currency",
        &payee_ids,
        &currencies as &[&str],
        &starts,
        &ends,
        &schedules,
        &methods as &[&str],
        &services,
        &col(&|n| n.settlement.gross),
        &col(&|n| n.settlement.payee_percent),
        &col(&|n| n.settlement.bonus_percent),
        &col(&|n| n.settlement.payee_share),
        &col(&|n| n.settlement.platform_commission),
        &col(&|n| n.settlement.deductions),
        &col(&|n| n.settlement.carried_in),
        &col(&|n| n.settlement.carried_gross_in),
        &col(&|n| n.settlement.fee),
        &col(&|n| n.settlement.net),
        &outcomes as &[&str],
        &payout_ids as &[Option<i64>],
        &actors as &[&str],
        &col(&|n| n.settlement.carried_out),
        now,
    )
    .fetch_all(&mut *conn)
    .await?;
    let by_group: std::collections::HashMap<(i64, String), i64> = rows
        .into_iter()
        .map(|r| ((r.payee_id, r.currency), r.id))
        .collect();
    let mut ids = Vec::with_capacity(news.len());
    for n in news {
        let key = (n.payee_id, n.settlement.currency.code().to_string());
        let id = by_group.get(&key).copied().ok_or_else(|| {
            sqlx::Error::Protocol(format!(
                "settlement of payee {} {} not returned by the insert",
                key.0, key.1
            ))
        })?;
        ids.push(id);
    }
    let mut l = LinesColumns::default();
    for (n, id) in news.iter().zip(&ids) {
        l.push(*id, n.payout_id, &n.settlement.lines);
    }
    l.insert(conn).await?;
    Ok(ids)
}

/// The stored lines of settlements, by column: every line but the earning
/// lines, which the settled earnings give (`earnings.line_position`).
#[derive(Default)]
struct LinesColumns<'a> {
    settlement_ids: Vec<i64>,
    payout_ids: Vec<Option<i64>>,
    positions: Vec<i32>,
    kinds: Vec<&'a str>,
    descriptions: Vec<&'a str>,
    amounts: Vec<Decimal>,
    carried: Vec<Option<i64>>,
}

impl<'a> LinesColumns<'a> {
    fn push(&mut self, settlement_id: i64, payout_id: Option<i64>, lines: &'a [Line]) {
        for (i, line) in lines.iter().enumerate() {
            if line.earning_id.is_some() {
                continue;
            }
            self.settlement_ids.push(settlement_id);
            self.payout_ids.push(payout_id);
            self.positions
                .push(i32::try_from(i + 1).unwrap_or(i32::MAX));
            self.kinds.push(line.kind.as_str());
            self.descriptions.push(line.description.as_str());
            self.amounts.push(line.amount);
            self.carried.push(line.carried_from);
        }
    }

    async fn insert(self, conn: &mut PgConnection) -> sqlx::Result<()> {
        if self.settlement_ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            "INSERT INTO settlement_lines (settlement_id, payout_id, position, kind, description, amount, carried_from)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::text[], $5::text[], $6::numeric[],
                                  $7::bigint[])",
            &self.settlement_ids,
            &self.payout_ids as &[Option<i64>],
            &self.positions,
            &self.kinds as &[&str],
            &self.descriptions as &[&str],
            &self.amounts,
            &self.carried as &[Option<i64>],
        )
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// [`consume_carries`] for many: settlement `into[i]` took over the balance
/// of `ids[i]`; returns how many were still open.
pub async fn consume_carries_many(
    conn: &mut PgConnection,
    ids: &[i64],
    into: &[i64],
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "UPDATE settlements s SET carried_into = u.tgt
         FROM unnest($1::bigint[], $2::bigint[]) AS u(id, tgt)
         WHERE s.id = u.id AND s.carried_into IS NULL",
        ids,
        into,
    )
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// [`consume_remainders`] for many: settlement `into[i]` took over the
/// remainder of `ids[i]`; returns how many were still open.
pub async fn consume_remainders_many(
    conn: &mut PgConnection,
    ids: &[i64],
    into: &[i64],
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "UPDATE settlements s SET carried_out_into = u.tgt
         FROM unnest($1::bigint[], $2::bigint[]) AS u(id, tgt)
         WHERE s.id = u.id AND s.carried_out > 0 AND s.carried_out_into IS NULL",
        ids,
        into,
    )
    .execute(conn)
    .await?;
    Ok(res.rows_affected())
}

/// A page of settlements, newest first, of one payee when given: at most
/// `limit`, below `before_id` when given.
pub async fn page(
    pool: &PgPool,
    payee_id: Option<i64>,
    before_id: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<SettlementRow>> {
    sqlx::query_as!(
        SettlementRow,
        "SELECT id, payee_id, currency, period_start, period_end, schedule, payout_method, services,
                gross, payee_percent, bonus_percent, payee_share, platform_commission, deductions,
                carried_in, carried_gross_in, fee, net, carried_out, outcome, payout_id, carried_into,
                carried_out_into, actor, created_at, returned_at, requested
         FROM settlements
         WHERE ($1::bigint IS NULL OR payee_id = $1) AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
        payee_id,
        before_id,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// Flags the `returned` settlement of payout `payout_id` as paid at the
/// gateway after all, and every settlement its balance was carried into
/// (migration 20261126000070); holds the payouts carrying it that were not
/// sent. Each carrying payout met: its id, its status, whether it was held
/// now.
pub async fn flag_paid_at_gateway(
    pool: &PgPool,
    payout_id: i64,
    now: DateTime<Utc>,
    actor: &str,
    why: &str,
) -> sqlx::Result<Vec<(i64, String, bool)>> {
    let rows = sqlx::query!(
        r#"SELECT f.carrier AS "carrier!", f.carrier_status AS "carrier_status!", f.was_held AS "was_held!"
           FROM settlements s,
                LATERAL settlements_flag_paid_at_gateway(s.id, $2, $3, $4) f
          WHERE s.payout_id = $1 AND s.outcome = 'returned'"#,
        payout_id,
        now,
        actor,
        why,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.carrier, r.carrier_status, r.was_held))
        .collect())
}

//! The platform's reads of one payee (#17 item 2): its balance per currency,
//! its earnings with their state, its payouts with their line items. Read
//! only; each statement is bounded by the payee (indexes `earnings_payee_idx`,
//! `earnings_unsettled_idx`, `payouts_payee_idx`) and, for pages, by the
//! limit, and the admin pool's statement timeout bounds them all.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

/// Unsettled earnings of a payee in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsettledSums {
    /// The currency.
    pub currency: String,
    /// Gross of the earnings still held (released after `now`).
    pub held: Decimal,
    /// How many are held.
    pub held_count: i64,
    /// The next release of a held earning.
    pub next_release_at: Option<DateTime<Utc>>,
    /// Gross of the earnings released and not settled yet.
    pub releasable: Decimal,
    /// How many are releasable.
    pub releasable_count: i64,
}

/// The unsettled earnings of `payee_id` by currency, split at `now`.
pub async fn unsettled_sums(
    pool: &PgPool,
    payee_id: i64,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<UnsettledSums>> {
    sqlx::query_as!(
        UnsettledSums,
        r#"SELECT currency AS "currency!",
                  coalesce(sum(gross) FILTER (WHERE release_at > $2), 0) AS "held!",
                  count(*) FILTER (WHERE release_at > $2) AS "held_count!",
                  min(release_at) FILTER (WHERE release_at > $2) AS next_release_at,
                  coalesce(sum(gross) FILTER (WHERE release_at <= $2), 0) AS "releasable!",
                  count(*) FILTER (WHERE release_at <= $2) AS "releasable_count!"
           FROM earnings WHERE payee_id = $1 AND settlement_id IS NULL AND voided_at IS NULL
           GROUP BY currency ORDER BY currency"#,
        payee_id,
        now,
    )
    .fetch_all(pool)
    .await
}

/// A payee's payouts in one currency: owed and on their way, and paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutSums {
    /// The currency.
    pub currency: String,
    /// Payouts made and not finished (pending, queued, processing,
    /// retrying, in transit, held): their sum.
    pub in_flight: Decimal,
    /// How many.
    pub in_flight_count: i64,
    /// Payouts paid at or after `since`: their sum.
    pub paid: Decimal,
    /// How many.
    pub paid_count: i64,
}

/// The payouts of `payee_id` by currency: in flight, and paid since `since`.
pub async fn payout_sums(
    pool: &PgPool,
    payee_id: i64,
    since: DateTime<Utc>,
) -> sqlx::Result<Vec<PayoutSums>> {
    sqlx::query_as!(
        PayoutSums,
        r#"SELECT currency AS "currency!",
                  coalesce(sum(amount) FILTER (WHERE status IN
                      ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'held')), 0) AS "in_flight!",
                  count(*) FILTER (WHERE status IN
                      ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'held')) AS "in_flight_count!",
                  coalesce(sum(amount) FILTER (WHERE status = 'paid' AND paid_at >= $2), 0) AS "paid!",
                  count(*) FILTER (WHERE status = 'paid' AND paid_at >= $2) AS "paid_count!"
           FROM payouts WHERE payee_id = $1
             AND (status IN ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'held')
                  OR (status = 'paid' AND paid_at >= $2))
           GROUP BY currency ORDER BY currency"#,
        payee_id,
        since,
    )
    .fetch_all(pool)
    .await
}

/// An earning as the platform reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EarningView {
    /// Id.
    pub id: i64,
    /// The payee.
    pub payee_id: i64,
    /// Where it comes from.
    pub source: String,
    /// The source's id for it (a booking, an order).
    pub external_ref: String,
    /// Gross amount.
    #[schema(value_type = crate::domain::DecimalString)]
    pub gross: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// When the work was completed.
    pub completed_at: DateTime<Utc>,
    /// Held until then; payable after.
    pub release_at: DateTime<Utc>,
    /// `held` (before `release_at`), `released` (payable, not settled),
    /// `carried` (settled into a balance carried over: below the minimum or
    /// a shortfall), `settled` (settled into `payout_id`) or `voided`
    /// (never to be paid: `void_reason`).
    pub state: String,
    /// The settlement that closed it.
    pub settlement_id: Option<i64>,
    /// The payout it was settled into.
    pub payout_id: Option<i64>,
    /// That payout's status.
    pub payout_status: Option<String>,
    /// Who posted it.
    pub posted_by: String,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When it was voided.
    pub voided_at: Option<DateTime<Utc>>,
    /// Who voided it.
    pub voided_by: Option<String>,
    /// Why.
    pub void_reason: Option<String>,
}

/// The filters of an earnings page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EarningFilter {
    /// One state ([`EarningView::state`]).
    pub state: Option<String>,
    /// One currency.
    pub currency: Option<String>,
    /// One source.
    pub source: Option<String>,
    /// Completed at or after.
    pub completed_from: Option<DateTime<Utc>>,
    /// Completed before.
    pub completed_to: Option<DateTime<Utc>>,
}

/// The earning states, in lifecycle order.
pub const EARNING_STATES: [&str; 5] = ["held", "released", "carried", "settled", "voided"];

/// A page of `payee_id`'s earnings, newest first: at most `limit`, below
/// `before_id` when given, the state read at `now`.
pub async fn earnings_page(
    pool: &PgPool,
    payee_id: i64,
    f: &EarningFilter,
    now: DateTime<Utc>,
    before_id: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<EarningView>> {
    sqlx::query_as!(
        EarningView,
        r#"SELECT e.id, e.payee_id, e.source, e.external_ref, e.gross, e.currency, e.completed_at,
                  e.release_at, st.state AS "state!", e.settlement_id, e.payout_id,
                  p.status AS "payout_status?", e.posted_by, e.created_at, e.voided_at,
                  e.voided_by, e.void_reason
           FROM earnings e
           CROSS JOIN LATERAL (SELECT CASE
                 WHEN e.voided_at IS NOT NULL THEN 'voided'
                 WHEN e.payout_id IS NOT NULL THEN 'settled'
                 WHEN e.settlement_id IS NOT NULL THEN 'carried'
                 WHEN e.release_at > $2 THEN 'held'
                 ELSE 'released' END AS state) st
           LEFT JOIN payouts p ON p.id = e.payout_id
           WHERE e.payee_id = $1
             AND ($3::bigint IS NULL OR e.id < $3)
             AND ($4::text IS NULL OR st.state = $4)
             AND ($5::text IS NULL OR e.currency = $5)
             AND ($6::text IS NULL OR e.source = $6)
             AND ($7::timestamptz IS NULL OR e.completed_at >= $7)
             AND ($8::timestamptz IS NULL OR e.completed_at < $8)
           ORDER BY e.id DESC LIMIT $9"#,
        payee_id,
        now,
        before_id,
        f.state,
        f.currency,
        f.source,
        f.completed_from,
        f.completed_to,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// A payout as the platform reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PayoutView {
    /// Id.
    pub id: i64,
    /// Amount.
    #[schema(value_type = crate::domain::DecimalString)]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// Lifecycle status.
    pub status: String,
    /// When it falls (fell) due.
    pub due_at: DateTime<Utc>,
    /// When it was paid.
    pub paid_at: Option<DateTime<Utc>>,
    /// Where it was sent (`None`: not sent yet).
    pub destination: Option<String>,
    /// The gateway's transfer id.
    pub gateway_transfer_id: Option<String>,
    /// Why it failed, when it did.
    pub failure_code: Option<String>,
    /// The settlement that made it (`None`: made by hand).
    pub settlement_id: Option<i64>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// A page of `payee_id`'s payouts, newest first (`status`, `currency`
/// filters): at most `limit`, below `before_id` when given.
pub async fn payouts_page(
    pool: &PgPool,
    payee_id: i64,
    status: Option<&str>,
    currency: Option<&str>,
    before_id: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<PayoutView>> {
    sqlx::query_as!(
        PayoutView,
        r#"SELECT p.id, p.amount, p.currency, p.status, p.due_at, p.paid_at, p.destination,
                  p.gateway_transfer_id, p.failure_code, s.id AS "settlement_id?", p.created_at
           FROM payouts p LEFT JOIN settlements s ON s.payout_id = p.id
           WHERE p.payee_id = $1
             AND ($2::bigint IS NULL OR p.id < $2)
             AND ($3::text IS NULL OR p.status = $3)
             AND ($4::text IS NULL OR p.currency = $4)
           ORDER BY p.id DESC LIMIT $5"#,
        payee_id,
        before_id,
        status,
        currency,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// A line item of a payout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LineView {
    /// The payout.
    pub payout_id: i64,
    /// Order within the payout.
    pub position: i32,
    /// `earning`, `commission`, `volume_bonus`, `deduction`, `carried_in`,
    /// `fee`, `carried_out`, `returned`.
    pub kind: String,
    /// Human text.
    pub description: String,
    /// Signed amount.
    #[schema(value_type = crate::domain::DecimalString)]
    pub amount: Decimal,
    /// The earning, for earning lines.
    pub earning_id: Option<i64>,
}

/// The line items of payouts `ids` (of the settlements that made them), by
/// payout and position.
pub async fn lines_of(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<LineView>> {
    // `payout_lines` is a view (migration 20261128000100): filtered on its
    // own `payout_id` (each line's is its settlement's payout), each of its
    // halves is read by index; joined to `settlements`, it could not be.
    sqlx::query_as!(
        LineView,
        r#"SELECT l.payout_id AS "payout_id!", l.position AS "position!", l.kind AS "kind!",
                  l.description AS "description!", l.amount AS "amount!", l.earning_id
           FROM payout_lines l
           WHERE l.payout_id = ANY($1)
           ORDER BY l.payout_id, l.position"#,
        ids,
    )
    .fetch_all(pool)
    .await
}

/// The currencies in which `payee_id` has a balance carried over and not
/// yet taken into a later settlement (a settlement's balance, or a
/// payout's remainder).
pub async fn carried_currencies(pool: &PgPool, payee_id: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "SELECT DISTINCT currency FROM settlements
         WHERE payee_id = $1
           AND ((outcome <> 'payout' AND carried_into IS NULL)
                OR (carried_out > 0 AND carried_out_into IS NULL))
         ORDER BY currency",
        payee_id,
    )
    .fetch_all(pool)
    .await
}

//! The `payouts` table, and the only module that writes it. Every statement
//! that changes a payout's status writes its `payout_events` row in the same
//! statement, and every worker write is fenced by the attempt number its
//! claim returned. The worker's claim and final write are the batched
//! statements [`claim_many`] and [`finish_many`] (`db::batch` groups
//! concurrent jobs into them); [`claim`] and [`finish`] are a batch of one.
//!
//! Statements are checked at compile time (`sqlx::query!` and friends,
//! offline data in `.sqlx/`); the one dynamic statement, the filtered bulk
//! retry, is built by `QueryBuilder` from `db::filter`.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};

use super::filter::PayoutFilter;
use crate::domain::{Money, MoneyError, PayeeId, PayoutId, PayoutStatus, TransitionError};

/// A payout row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Payout {
    /// Id; the gateway idempotency key and reference derive from it.
    #[schema(value_type = i64)]
    pub id: PayoutId,
    /// Who is paid.
    #[schema(value_type = i64)]
    pub payee_id: PayeeId,
    /// Exact amount.
    #[schema(value_type = crate::domain::DecimalString)]
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: String,
    /// Where it is in its life.
    #[sqlx(try_from = "String")]
    pub status: PayoutStatus,
    /// When it may be paid.
    pub due_at: DateTime<Utc>,
    /// Claims so far; the fencing token of the latest claim.
    pub attempt: i32,
    /// Attempts before this count do not count against the budget (operator retry).
    pub retry_base: i32,
    /// When a `retrying` payout is due again.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The worker holding the lease.
    pub lease_owner: Option<String>,
    /// Until when the lease (queued or processing) holds.
    pub lease_until: Option<DateTime<Utc>>,
    /// The gateway's transfer id, once accepted.
    pub gateway_transfer_id: Option<String>,
    /// Last failure code (gateway code, `attempts_exhausted`, ...).
    pub failure_code: Option<String>,
    /// Last failure message.
    pub failure_message: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// When it was recorded paid.
    pub paid_at: Option<DateTime<Utc>>,
}

/// Statuses are stored as their names (`payouts.status`, checked by the table).
impl sqlx::Type<Postgres> for PayoutStatus {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for PayoutStatus {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let s = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(s.parse::<PayoutStatus>()?)
    }
}

impl TryFrom<String> for PayoutStatus {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl Payout {
    /// Shows the amount at its currency's precision (`10.00`, not the
    /// column's `10.00000000`); the value is unchanged.
    pub fn with_currency_scale(mut self) -> Self {
        if let Ok(c) = self.currency.parse::<crate::domain::Currency>()
            && self.amount.scale() > c.exponent()
        {
            self.amount.rescale(c.exponent());
        }
        self
    }

    /// The idempotency key sent to the gateway on every attempt; never changes.
    pub fn idempotency_key(&self) -> String {
        crate::domain::transfer::idempotency_key(self.id)
    }
}

/// A payout a worker has claimed, with what it needs to call the gateway.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The payout as it is after the claim.
    pub payout: Payout,
    /// Its amount, decoded once here from the row's `amount` and `currency`;
    /// an error when the row holds no payable amount (an unknown currency,
    /// zero, more decimals than the currency has): the worker fails such a
    /// payout as `invalid_amount` without calling the gateway.
    pub money: Result<Money, MoneyError>,
    /// The payee's gateway account.
    pub gateway_account: String,
    /// The payout's position in its idempotency-key chain (`payouts.key_index`).
    pub key_index: i32,
    /// How many times it was held before (`payouts.holds`).
    pub holds: i32,
    /// The external reference of the one earning it pays (`per_earning`).
    pub external_ref: Option<String>,
}

impl Claimed {
    /// The fencing token: the attempt number this claim got.
    pub fn token(&self) -> i32 {
        self.payout.attempt
    }
}

/// How a worker's attempt ended, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Money moved.
    Paid {
        /// Gateway transfer id.
        transfer_id: String,
    },
    /// Accepted; final word later.
    InTransit {
        /// Gateway transfer id.
        transfer_id: String,
    },
    /// Transient failure; try again at `next_attempt_at`.
    Retrying {
        /// When.
        next_attempt_at: DateTime<Utc>,
        /// Failure code (for operators).
        code: String,
        /// Failure message.
        message: String,
    },
    /// Permanent failure or attempts exhausted.
    Failed {
        /// Failure code.
        code: String,
        /// Failure message.
        message: String,
    },
    /// The payee cannot receive money yet; wait until the account is ready.
    Held {
        /// Why (`account_not_onboarded`).
        code: String,
        /// The gateway's message.
        message: String,
    },
}

impl Finish {
    /// The status this outcome records.
    pub fn status(&self) -> PayoutStatus {
        match self {
            Finish::Paid { .. } => PayoutStatus::Paid,
            Finish::InTransit { .. } => PayoutStatus::InTransit,
            Finish::Retrying { .. } => PayoutStatus::Retrying,
            Finish::Failed { .. } => PayoutStatus::Failed,
            Finish::Held { .. } => PayoutStatus::Held,
        }
    }
}

/// Why an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No such payout.
    #[error("payout {0} not found")]
    NotFound(i64),
    /// Not legal from the payout's status.
    #[error(transparent)]
    Illegal(#[from] TransitionError),
    /// Would queue a payout of a suspended payee (resume the payee first).
    #[error("payout {id} belongs to payee {payee}, which is suspended: resume the payee first")]
    PayeeSuspended {
        /// The payout.
        id: i64,
        /// Its payee.
        payee: i64,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Creates a pending payout (and its `created` event).
pub async fn create(
    pool: &PgPool,
    payee_id: PayeeId,
    money: Money,
    due_at: DateTime<Utc>,
    actor: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Payout> {
    create_in(pool, payee_id, money, due_at, actor, "created", now).await
}

/// [`create`] on any executor (a settlement's transaction), with `reason` in
/// the `created` event.
pub async fn create_in<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    payee_id: PayeeId,
    money: Money,
    due_at: DateTime<Utc>,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Payout> {
    let currency = money.currency();
    sqlx::query_as!(
        Payout,
        r#"WITH ins AS (
             INSERT INTO payouts (payee_id, amount, currency, due_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $6, $6) RETURNING *),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, NULL, 'pending', $5, $7, 0, $6 FROM ins)
         SELECT id AS "id: PayoutId", payee_id AS "payee_id: PayeeId", amount, currency,
                  status AS "status: PayoutStatus", due_at, attempt,
                retry_base, next_attempt_at, lease_owner, lease_until, gateway_transfer_id,
                failure_code, failure_message, created_at, updated_at, paid_at
         FROM ins"#,
        payee_id.get(),
        money.amount(),
        currency.code(),
        due_at,
        actor,
        now,
        reason,
    )
    .fetch_one(exec)
    .await
}

/// A payout for [`create_many`].
#[derive(Debug, Clone)]
pub struct NewPayout {
    /// Who is paid.
    pub payee_id: i64,
    /// How much.
    pub money: Money,
    /// The reason in its `created` event.
    pub reason: String,
    /// The external reference of the one earning it pays, on a
    /// `per_earning` schedule (sent to the gateway: the release-funds
    /// API's `bookingId`).
    pub external_ref: Option<String>,
}

/// [`create_in`] for many payouts (at most one per payee and currency) in
/// one statement, with their `created` events; returns their ids in the
/// order of `news`.
pub async fn create_many(
    conn: &mut PgConnection,
    news: &[NewPayout],
    due_at: DateTime<Utc>,
    actor: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    if news.is_empty() {
        return Ok(Vec::new());
    }
    let payee_ids: Vec<i64> = news.iter().map(|n| n.payee_id).collect();
    let amounts: Vec<Decimal> = news.iter().map(|n| n.money.amount()).collect();
    let currencies: Vec<String> = news
        .iter()
        .map(|n| n.money.currency().code().to_string())
        .collect();
    let reasons: Vec<String> = news.iter().map(|n| n.reason.clone()).collect();
    let refs: Vec<Option<String>> = news.iter().map(|n| n.external_ref.clone()).collect();
    let rows = sqlx::query!(
        r#"WITH ins AS (
             INSERT INTO payouts (payee_id, amount, currency, due_at, created_at, updated_at, external_ref)
             SELECT p, a, c, $4, $6, $6, x
             FROM unnest($1::bigint[], $2::numeric[], $3::text[], $8::text[]) AS u(p, a, c, x)
             RETURNING id, payee_id, currency),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT ins.id, NULL, 'pending', $5, u.r, 0, $6
             FROM ins JOIN unnest($1::bigint[], $3::text[], $7::text[]) AS u(p, c, r)
                  ON u.p = ins.payee_id AND u.c = ins.currency)
         SELECT id, payee_id, currency FROM ins"#,
        &payee_ids,
        &amounts,
        &currencies,
        due_at,
        actor,
        now,
        &reasons,
        &refs as &[Option<String>],
    )
    .fetch_all(conn)
    .await?;
    let by_group: std::collections::HashMap<(i64, String), i64> = rows
        .into_iter()
        .map(|r| ((r.payee_id, r.currency), r.id))
        .collect();
    news.iter()
        .map(|n| {
            by_group
                .get(&(n.payee_id, n.money.currency().code().to_string()))
                .copied()
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("payout of payee {} not returned", n.payee_id))
                })
        })
        .collect()
}

/// Creates `count` pending payouts spread over `payee_ids`, due at `due_at`
/// (demo and benchmark data), with their events; returns how many.
pub async fn seed(
    pool: &PgPool,
    payee_ids: &[i64],
    count: i64,
    currency: &str,
    due_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "WITH ins AS (
             INSERT INTO payouts (payee_id, amount, currency, due_at, created_at, updated_at)
             SELECT ($1::bigint[])[1 + (g % cardinality($1::bigint[]))],
                    (5 + (g * 7919) % 995)::numeric + ((g * 31) % 100)::numeric / 100,
                    $3, $4, $5, $5
             FROM generate_series(1, $2::bigint) g RETURNING id)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, NULL, 'pending', 'operator:seed', 'created', 0, $5 FROM ins",
        payee_ids,
        count,
        currency,
        due_at,
        now,
    )
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

/// Fills in `count` paid payouts of `payee_ids` as history (a benchmark's
/// large table: paid a day before `now`, no events), in one statement.
#[cfg(feature = "testkit")]
pub async fn seed_paid_history(
    pool: &PgPool,
    payee_ids: &[i64],
    count: i64,
    currency: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "INSERT INTO payouts (payee_id, amount, currency, status, due_at, attempt,
                              gateway_transfer_id, paid_at, created_at, updated_at)
         SELECT ($1::bigint[])[1 + (g % cardinality($1::bigint[]))],
                (5 + (g * 7919) % 995)::numeric + ((g * 31) % 100)::numeric / 100,
                $3, 'paid', $4, 1, 'tr_hist_' || g, $4, $4, $4
         FROM generate_series(1, $2::bigint) g",
        payee_ids,
        count,
        currency,
        now - chrono::Duration::days(1),
    )
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

/// Paid payouts with an id above `after` (a benchmark's burst, counted
/// through the `(status, id)` index without reading its history).
#[cfg(feature = "testkit")]
pub async fn count_paid_after(pool: &PgPool, after: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM payouts WHERE status = 'paid' AND id > $1"#,
        after,
    )
    .fetch_one(pool)
    .await
}

/// One payout.
pub async fn get(pool: &PgPool, id: PayoutId) -> sqlx::Result<Option<Payout>> {
    sqlx::query_as!(
        Payout,
        r#"SELECT id AS "id: PayoutId", payee_id AS "payee_id: PayeeId", amount, currency,
                  status AS "status: PayoutStatus", due_at, attempt,
                  retry_base, next_attempt_at, lease_owner, lease_until, gateway_transfer_id,
                  failure_code, failure_message, created_at, updated_at, paid_at
           FROM payouts WHERE id = $1"#,
        id.get(),
    )
    .fetch_optional(pool)
    .await
}

/// Counts by status (exact; for the CLI, demo and tests).
pub async fn count_by_status(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT status, count(*) AS "count!" FROM payouts GROUP BY status ORDER BY status"#
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.status, r.count)).collect())
}

/// Payouts by status for the gauges and the overview: exact for every
/// status but `paid`, read through the `(status, id)` index; `paid` is exact
/// below a million rows and past that the table's row estimate less the
/// others, so no statement scans a large table.
pub async fn status_counts(pool: &PgPool) -> sqlx::Result<Vec<(PayoutStatus, i64)>> {
    Ok(status_counts_marked(pool).await?.0)
}

/// Counts of every status but `paid`: read through the `(status, id)` index
/// (the statement [`status_counts_marked`] runs; a test reads its plan).
pub const UNPAID_COUNTS: &str = include_str!("sql/payouts_unpaid_counts.sql");

/// Tables below this many rows (by the planner's estimate) get an exact
/// `paid` count too: cheap there, and the estimate of a young table is poor.
const EXACT_PAID_BELOW: i64 = 1_000_000;

/// [`status_counts`], and whether `paid` is an estimate.
pub async fn status_counts_marked(pool: &PgPool) -> sqlx::Result<(Vec<(PayoutStatus, i64)>, bool)> {
    let rows = sqlx::query_file!("src/db/sql/payouts_unpaid_counts.sql")
        .fetch_all(pool)
        .await?;
    let estimate = sqlx::query_scalar!(
        r#"SELECT greatest(reltuples, 0)::bigint AS "estimate!" FROM pg_class
           WHERE oid = 'payouts'::regclass"#
    )
    .fetch_one(pool)
    .await?;
    let mut out: Vec<(PayoutStatus, i64)> = rows
        .into_iter()
        .filter_map(|r| r.status.parse().ok().map(|s| (s, r.count)))
        .collect();
    let others: i64 = out.iter().map(|(_, n)| n).sum();
    if estimate < EXACT_PAID_BELOW {
        let paid = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM payouts WHERE status = 'paid'"#
        )
        .fetch_one(pool)
        .await?;
        out.push((PayoutStatus::Paid, paid));
        return Ok((out, false));
    }
    out.push((PayoutStatus::Paid, (estimate - others).max(0)));
    Ok((out, true))
}

/// The due time of the oldest payout that is due and not yet worked off
/// (pending, queued or processing): the backlog's age. `retrying` payouts are
/// left out: they wait on their schedule by design, not on the fleet; so do
/// the pending payouts of a suspended payee.
pub async fn oldest_due_unfinished(
    pool: &PgPool,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        "SELECT least(
             (SELECT min(due_at) FROM payouts WHERE status = 'pending' AND due_at <= $1
                AND NOT EXISTS (SELECT 1 FROM payees y WHERE y.id = payouts.payee_id AND y.status = 'suspended')),
             (SELECT min(due_at) FROM payouts WHERE status IN ('queued', 'processing')))",
        now,
    )
    .fetch_one(pool)
    .await
}

/// When the oldest payout `in_transit` was last changed: how long the
/// gateway has left it unconfirmed (the stuck-in-transit gauge).
pub async fn oldest_in_transit(pool: &PgPool) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!("SELECT min(updated_at) FROM payouts WHERE status = 'in_transit'")
        .fetch_one(pool)
        .await
}

/// How many payouts are `queued`: the jobs the window holds.
pub async fn count_queued(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM payouts WHERE status = 'queued'"#)
        .fetch_one(pool)
        .await
}

/// Moves up to `limit` due payouts to `queued` (with a queue lease and a
/// `queued` event each) and returns their ids, ranked by the default
/// `[producer.priority]`: [`queue_due_ranked`].
pub async fn queue_due(
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
    lease_until: DateTime<Utc>,
    actor: &str,
) -> sqlx::Result<Vec<PayoutId>> {
    let ranking = crate::config::PrioritySettings::default();
    Ok(
        queue_due_ranked(pool, &ranking, now, limit, lease_until, actor)
            .await?
            .into_iter()
            .map(|d| d.id)
            .collect(),
    )
}

/// A payout [`queue_due_ranked`] queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The payout.
    pub id: PayoutId,
    /// Its `payouts.priority` ([`crate::domain::Priority`]): above 0, the
    /// producer pushes its job at the front of the queue.
    pub priority: i16,
}

/// Most pending payouts one [`rank_pending`] ranks.
pub const RANK_BATCH: i64 = 10_000;

/// Ranks pending payouts not ranked yet (new ones, and those whose due time,
/// priority, amount, status or payee tier changed): `rank_at = due_at -
/// boost` by `ranking` (see [`crate::config::priority`]), at most `limit`,
/// early requests and "process now" first (index `payouts_unranked_idx`).
/// Returns how many.
pub async fn rank_pending(
    pool: &PgPool,
    ranking: &crate::config::PrioritySettings,
    limit: i64,
) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        r#"WITH todo AS (
             SELECT id FROM payouts WHERE status = 'pending' AND rank_at IS NULL
             ORDER BY priority DESC, id LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE payouts p SET rank_at = p.due_at - make_interval(secs => (
             CASE p.priority
               WHEN 2 THEN $2::int::numeric
               WHEN 1 THEN $3::int::numeric
               ELSE CASE $4::text
                 WHEN 'larger_first' THEN $5::int * LEAST(p.amount / $6::numeric, 1)
                 WHEN 'smaller_first' THEN $5::int * (1 - LEAST(p.amount / $6::numeric, 1))
                 WHEN 'tier' THEN COALESCE(($7::int[])[y.tier + 1], 0)::numeric
                 ELSE 0 END
             END)::float8)
         FROM todo, payees y WHERE p.id = todo.id AND y.id = p.payee_id"#,
        limit,
        ranking.process_now_boost_secs as i32,
        ranking.requested_boost_secs as i32,
        ranking.scheduled.as_str(),
        ranking.amount_boost_secs as i32,
        ranking.amount_full,
        &ranking.tier_boosts(),
    )
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

/// Moves up to `limit` due payouts to `queued` (with a queue lease and a
/// `queued` event each) and returns them, in this order:
///
/// 1. retrying payouts whose next attempt is due, earliest first (index
///    `payouts_retrying_next_idx`): they were due before and are few (the
///    retry budget, the backoff), so they are not ranked behind new
///    requests; a requested payout that is retrying keeps its place among them;
/// 2. pending payouts that are due, by rank time `rank_at` = `due_at` minus
///    the boost of `ranking` (index `payouts_pending_rank_idx`), after
///    [`rank_pending`] has ranked up to [`RANK_BATCH`] new ones. A pending
///    payout not ranked yet waits for a later pass.
///
/// Replicas never take the same rows (`FOR UPDATE SKIP LOCKED`). Payouts of
/// a suspended payee wait (their claim would put them back, see [`claim_many`]).
pub async fn queue_due_ranked(
    pool: &PgPool,
    ranking: &crate::config::PrioritySettings,
    now: DateTime<Utc>,
    limit: i64,
    lease_until: DateTime<Utc>,
    actor: &str,
) -> sqlx::Result<Vec<Due>> {
    rank_pending(pool, ranking, RANK_BATCH).await?;
    let mut tx = pool.begin().await?;
    // Retrying payouts whose next attempt is due (index `payouts_retrying_next_idx`).
    let mut due: Vec<Due> = sqlx::query_as!(
        Due,
        r#"WITH due AS (
             SELECT id, status FROM payouts WHERE status = 'retrying' AND next_attempt_at <= $1
               AND NOT EXISTS (SELECT 1 FROM payees y WHERE y.id = payouts.payee_id AND y.status = 'suspended')
             ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED),
         upd AS (
             UPDATE payouts p SET status = 'queued', lease_until = $3, lease_owner = NULL, updated_at = $1
             FROM due WHERE p.id = due.id
             RETURNING p.id, due.status AS from_status, p.attempt, p.priority),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, from_status, 'queued', $4, 'retry due', attempt, $1 FROM upd)
         SELECT id AS "id!: PayoutId", priority AS "priority!" FROM upd"#,
        now,
        limit,
        lease_until,
        actor,
    )
    .fetch_all(&mut *tx)
    .await?;
    let rest = limit - due.len() as i64;
    if rest > 0 {
        // Pending payouts that are due, by rank (index `payouts_pending_rank_idx`;
        // `rank_at <= due_at`, so `rank_at <= now` bounds the index range).
        // Only pending payouts have a rank (migration 20261130000200): no
        // status clause, which would make the planner expect a few rows and
        // sort them all instead of reading the index in order.
        let more: Vec<Due> = sqlx::query_as!(
            Due,
            r#"WITH due AS (
                 SELECT id, status FROM payouts
                 WHERE rank_at <= $1 AND due_at <= $1
                   AND NOT EXISTS (SELECT 1 FROM payees y WHERE y.id = payouts.payee_id AND y.status = 'suspended')
                 ORDER BY rank_at LIMIT $2 FOR UPDATE SKIP LOCKED),
             upd AS (
                 UPDATE payouts p SET status = 'queued', lease_until = $3, lease_owner = NULL, updated_at = $1,
                     rank_at = NULL
                 FROM due WHERE p.id = due.id AND due.status = 'pending'
                 RETURNING p.id, due.status AS from_status, p.attempt, p.priority),
             ev AS (
                 INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
                 SELECT id, from_status, 'queued', $4, 'due', attempt, $1 FROM upd)
             SELECT id AS "id!: PayoutId", priority AS "priority!" FROM upd"#,
            now,
            rest,
            lease_until,
            actor,
        )
        .fetch_all(&mut *tx)
        .await?;
        due.extend(more);
    }
    tx.commit().await?;
    Ok(due)
}

/// Makes payee `payee_id`'s pending payouts unranked (its tier changed): the
/// producer's next pass ranks them again. Returns how many.
pub async fn unrank_pending_of_payee(conn: &mut PgConnection, payee_id: i64) -> sqlx::Result<u64> {
    let res = sqlx::query!(
        "UPDATE payouts SET rank_at = NULL WHERE payee_id = $1 AND status = 'pending' AND rank_at IS NOT NULL",
        payee_id,
    )
    .execute(&mut *conn)
    .await?;
    Ok(res.rows_affected())
}

/// A payout's rank time (`rank_at`): `None` when not ranked (or no such payout).
pub async fn rank_at(pool: &PgPool, id: i64) -> sqlx::Result<Option<DateTime<Utc>>> {
    let r = sqlx::query_scalar!("SELECT rank_at FROM payouts WHERE id = $1", id)
        .fetch_optional(pool)
        .await?;
    Ok(r.flatten())
}

/// Finds `queued` and `processing` payouts whose lease ran out (a lost job, a
/// crashed worker), puts them back to `queued` with a fresh lease and returns
/// their ids for re-enqueueing. A crashed worker's claim is recorded as an event.
pub async fn sweep_expired(
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
    lease_until: DateTime<Utc>,
    actor: &str,
) -> sqlx::Result<Vec<PayoutId>> {
    let ids = sqlx::query_scalar!(
        r#"WITH exp AS (
             SELECT id, status FROM payouts
             WHERE status IN ('queued', 'processing') AND lease_until < $1
             ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED),
         upd AS (
             UPDATE payouts p SET status = 'queued', lease_until = $3, lease_owner = NULL, updated_at = $1
             FROM exp WHERE p.id = exp.id
             RETURNING p.id, exp.status AS from_status, p.attempt),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, from_status, 'queued', $4, 'lease expired', attempt, $1
             FROM upd WHERE from_status = 'processing')
         SELECT id AS "id!" FROM upd"#,
        now,
        limit,
        lease_until,
        actor,
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(PayoutId::new).collect())
}

/// Renews, in one statement, the leases of the payouts `owner` holds: each
/// `(ids[i], tokens[i])` still `processing` under that attempt and owner gets
/// `lease_until` (never earlier than it had). Rows are locked in id order, as
/// the batched claims lock them. Returns, for each pair, whether it was
/// renewed and, if not, whether it was taken from the owner (claimed again,
/// or put back to `queued` by the rescue or the sweep) rather than finished
/// by the owner itself.
pub async fn renew_leases<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    owner: &str,
    ids: &[PayoutId],
    tokens: &[i32],
    lease_until: DateTime<Utc>,
) -> sqlx::Result<Vec<Renewed>> {
    let ids: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    sqlx::query_as!(
        Renewed,
        r#"WITH input AS (SELECT * FROM unnest($1::bigint[], $2::int[]) AS t(id, token)),
         mine AS (
             SELECT p.id FROM payouts p JOIN input i ON i.id = p.id AND i.token = p.attempt
             WHERE p.status = 'processing' AND p.lease_owner = $3
             ORDER BY p.id FOR UPDATE OF p),
         upd AS (
             UPDATE payouts p SET lease_until = GREATEST(p.lease_until, $4)
             FROM mine WHERE p.id = mine.id
             RETURNING p.id)
         SELECT i.id AS "id!: PayoutId", i.token AS "token!", upd.id IS NOT NULL AS "renewed!",
                upd.id IS NULL AND (p.id IS NULL OR p.attempt <> i.token
                                    OR p.status IN ('queued', 'processing')) AS "taken!"
         FROM input i LEFT JOIN upd ON upd.id = i.id LEFT JOIN payouts p ON p.id = i.id"#,
        &ids,
        tokens,
        owner,
        lease_until,
    )
    .fetch_all(exec)
    .await
}

/// One lease of a [`renew_leases`] statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    /// The payout.
    pub id: PayoutId,
    /// The attempt the lease was held under.
    pub token: i32,
    /// Extended.
    pub renewed: bool,
    /// Not extended because it is no longer the owner's (claimed again,
    /// rescued, swept); `false` for a payout the owner itself finished.
    pub taken: bool,
}

/// A worker gives a payout back without recording an outcome (its lease
/// could not be vouched for long enough to call the gateway, or it is
/// shutting down): `processing` under `token` becomes `queued` with its lease
/// ending `now`, so the producer's next sweep enqueues it again. Stores the
/// key index reached (only ever raised); `refund` (no request was sent in
/// this attempt) keeps the attempt off the payout's budget. `false` when the
/// payout was no longer the worker's.
#[allow(clippy::too_many_arguments)]
pub async fn release<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    id: PayoutId,
    token: i32,
    key_index: i32,
    refund: bool,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let row = sqlx::query_scalar!(
        "WITH upd AS (
             UPDATE payouts SET status = 'queued', lease_owner = NULL, lease_until = $5,
                 key_index = GREATEST(key_index, $3),
                 retry_base = retry_base + CASE WHEN $4 THEN 1 ELSE 0 END,
                 updated_at = $5
             WHERE id = $1 AND attempt = $2 AND status = 'processing'
             RETURNING id, attempt)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, 'processing', 'queued', $6, $7, attempt, $5 FROM upd
         RETURNING payout_id",
        id.get(),
        token,
        key_index,
        refund,
        now,
        actor,
        reason,
    )
    .fetch_optional(exec)
    .await?;
    Ok(row.is_some())
}

/// The producer's rescue: every payout `processing` under a lease of one of
/// `owners` (workers whose liveness beat stopped) goes back to `queued`
/// with a fresh queue lease, with an event; returns their ids for
/// re-enqueueing. Their owners' late writes are refused by the fence.
pub async fn release_owned_by(
    pool: &PgPool,
    owners: &[String],
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    actor: &str,
) -> sqlx::Result<Vec<PayoutId>> {
    let ids = sqlx::query_scalar!(
        r#"WITH gone AS (
             SELECT id FROM payouts WHERE status = 'processing' AND lease_owner = ANY($2)
             ORDER BY id FOR UPDATE),
         upd AS (
             UPDATE payouts p SET status = 'queued', lease_until = $3, lease_owner = NULL, updated_at = $1
             FROM gone WHERE p.id = gone.id
             RETURNING p.id, p.attempt),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, 'processing', 'queued', $4, 'worker gone (liveness beat stopped)', attempt, $1
             FROM upd)
         SELECT id AS "id!" FROM upd ORDER BY id"#,
        now,
        owners,
        lease_until,
        actor,
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(PayoutId::new).collect())
}

/// Ids of all `queued` payouts, their leases refreshed (after Redis lost its data).
pub async fn requeue_all_queued(
    pool: &PgPool,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<PayoutId>> {
    let ids = sqlx::query_scalar!(
        "UPDATE payouts SET lease_until = $1, updated_at = $2 WHERE status = 'queued' RETURNING id",
        lease_until,
        now,
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(PayoutId::new).collect())
}

// ------------------------------------------------------------- worker ----
// The worker's claim and final write. Production runs them batched
// (`db::batch::Batcher` groups concurrent jobs of one process into one
// statement); the single-row forms are the same statements with one row.

/// One claim of a [`claim_many`] statement.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The payout.
    pub id: PayoutId,
    /// The worker claiming it (`worker:<id>`): its lease owner and event actor.
    pub owner: String,
    /// When.
    pub now: DateTime<Utc>,
    /// Until when the claim's lease holds.
    pub lease_until: DateTime<Utc>,
}

/// A claimed row as the statement returns it (flat; [`Claimed`] nests it).
struct ClaimedRow {
    id: i64,
    payee_id: i64,
    amount: Decimal,
    currency: String,
    status: PayoutStatus,
    due_at: DateTime<Utc>,
    attempt: i32,
    retry_base: i32,
    next_attempt_at: Option<DateTime<Utc>>,
    lease_owner: Option<String>,
    lease_until: Option<DateTime<Utc>>,
    gateway_transfer_id: Option<String>,
    failure_code: Option<String>,
    failure_message: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
    key_index: i32,
    holds: i32,
    gateway_account: String,
    external_ref: Option<String>,
}

impl From<ClaimedRow> for Claimed {
    fn from(r: ClaimedRow) -> Self {
        let money = r
            .currency
            .parse::<crate::domain::Currency>()
            .and_then(|c| Money::new(r.amount, c));
        Claimed {
            money,
            payout: Payout {
                id: PayoutId::new(r.id),
                payee_id: PayeeId::new(r.payee_id),
                amount: r.amount,
                currency: r.currency,
                status: r.status,
                due_at: r.due_at,
                attempt: r.attempt,
                retry_base: r.retry_base,
                next_attempt_at: r.next_attempt_at,
                lease_owner: r.lease_owner,
                lease_until: r.lease_until,
                gateway_transfer_id: r.gateway_transfer_id,
                failure_code: r.failure_code,
                failure_message: r.failure_message,
                created_at: r.created_at,
                updated_at: r.updated_at,
                paid_at: r.paid_at,
            },
            gateway_account: r.gateway_account,
            key_index: r.key_index,
            holds: r.holds,
            external_ref: r.external_ref,
        }
    }
}

/// Claims payouts for one attempt each, in one statement: `queued` (or
/// `processing` with an expired lease) becomes `processing`, `attempt` goes
/// up by one and is returned as the fencing token, with a `claimed` event.
/// Returns the payouts claimed (in no order); one that is not claimable
/// (final, held, unknown, leased to a live claim) is left out. A `queued`
/// payout of a suspended payee is not claimed either: it goes back to
/// `pending` (with its event) and waits for the payee's resume. The
/// destination is the payee's account at the first claim, kept for every
/// later one (`payouts.destination`): a changed account applies to payouts
/// not yet sent. Rows are locked
/// in id order, so batches of different workers cannot deadlock. The ids
/// must be distinct (the batcher sends one claim per payout).
pub async fn claim_many(pool: &PgPool, claims: &[ClaimRequest]) -> sqlx::Result<Vec<Claimed>> {
    let ids: Vec<i64> = claims.iter().map(|c| c.id.get()).collect();
    let owners: Vec<String> = claims.iter().map(|c| c.owner.clone()).collect();
    let nows: Vec<DateTime<Utc>> = claims.iter().map(|c| c.now).collect();
    let leases: Vec<DateTime<Utc>> = claims.iter().map(|c| c.lease_until).collect();
    let rows = sqlx::query_as!(
        ClaimedRow,
        r#"WITH input AS (
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                 AS t(id, owner, now, lease_until)),
         prev AS (
             SELECT p.id, p.status, y.status AS payee_status, y.gateway_account
             FROM payouts p JOIN input i ON i.id = p.id JOIN payees y ON y.id = p.payee_id
             ORDER BY p.id FOR UPDATE OF p),
         upd AS (
             UPDATE payouts p SET status = 'processing', attempt = p.attempt + 1,
                 lease_owner = i.owner, lease_until = i.lease_until, updated_at = i.now,
                 destination = coalesce(p.destination, prev.gateway_account)
             FROM prev, input i
             WHERE p.id = prev.id AND i.id = p.id
               AND ((prev.status = 'queued' AND prev.payee_status <> 'suspended')
                    OR (prev.status = 'processing' AND p.lease_until < i.now))
             RETURNING p.*, prev.status AS from_status, i.owner AS claim_owner, i.now AS claim_now),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, from_status, 'processing', claim_owner, 'claimed', attempt, claim_now FROM upd),
         park AS (
             UPDATE payouts p SET status = 'pending', lease_owner = NULL, lease_until = NULL,
                 updated_at = i.now
             FROM prev, input i
             WHERE p.id = prev.id AND i.id = p.id
               AND prev.status = 'queued' AND prev.payee_status = 'suspended'
             RETURNING p.id, p.attempt, i.owner AS claim_owner, i.now AS claim_now),
         park_ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, 'queued', 'pending', claim_owner, 'payee suspended: waits for the resume',
                    attempt, claim_now FROM park)
         SELECT upd.id, upd.payee_id, upd.amount, upd.currency, upd.status AS "status: PayoutStatus",
                upd.due_at, upd.attempt, upd.retry_base, upd.next_attempt_at, upd.lease_owner,
                upd.lease_until, upd.gateway_transfer_id, upd.failure_code, upd.failure_message,
                upd.created_at, upd.updated_at, upd.paid_at, upd.key_index, upd.holds,
                upd.destination AS "gateway_account!", upd.external_ref
         FROM upd"#,
        &ids,
        &owners,
        &nows,
        &leases,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Claimed::from).collect())
}

/// Claims one payout for one attempt: [`claim_many`] with one row. `None`
/// when the payout is not claimable (final, held, unknown, leased).
pub async fn claim(
    pool: &PgPool,
    id: PayoutId,
    owner: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> sqlx::Result<Option<Claimed>> {
    let claim = ClaimRequest {
        id,
        owner: owner.to_string(),
        now,
        lease_until,
    };
    Ok(claim_many(pool, &[claim]).await?.into_iter().next())
}

/// What a final write stores besides the [`Finish`] columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FinishExtras {
    /// The key index to store (only ever raised: `GREATEST` with the stored one).
    pub key_index: i32,
    /// The attempt was not the payee's (a platform problem): it does not
    /// count against the budget (`retry_base` goes up with it).
    pub refund_attempt: bool,
}

/// One final write of a [`finish_many`] statement.
#[derive(Debug, Clone)]
pub struct FinishRequest {
    /// The payout.
    pub id: PayoutId,
    /// The fencing token its claim returned.
    pub token: i32,
    /// How the attempt ended.
    pub outcome: Finish,
    /// Key index and budget refund.
    pub extras: FinishExtras,
    /// Who (`worker:<id>`).
    pub actor: String,
    /// Why (the event's reason).
    pub reason: String,
    /// When.
    pub now: DateTime<Utc>,
}

/// The columns a [`Finish`] writes besides its status.
#[derive(Debug, Clone, Default)]
struct FinishColumns {
    transfer_id: Option<String>,
    next_attempt_at: Option<DateTime<Utc>>,
    code: Option<String>,
    message: Option<String>,
}

/// The columns `outcome` writes.
fn finish_columns(outcome: &Finish) -> FinishColumns {
    match outcome {
        Finish::Paid { transfer_id } | Finish::InTransit { transfer_id } => FinishColumns {
            transfer_id: Some(transfer_id.clone()),
            ..Default::default()
        },
        Finish::Retrying {
            next_attempt_at,
            code,
            message,
        } => FinishColumns {
            next_attempt_at: Some(*next_attempt_at),
            code: Some(code.clone()),
            message: Some(message.clone()),
            ..Default::default()
        },
        Finish::Failed { code, message } | Finish::Held { code, message } => FinishColumns {
            code: Some(code.clone()),
            message: Some(message.clone()),
            ..Default::default()
        },
    }
}

/// Records attempts' outcomes in one statement, each fenced: a write changes
/// nothing unless its payout is still `processing` under its token. Returns
/// the `(id, token)` pairs that applied, with their events. Rows are written
/// in id order. At most one write per `(id, token)` (the batcher's rule).
pub async fn finish_many(
    pool: &PgPool,
    writes: &[FinishRequest],
) -> sqlx::Result<Vec<(PayoutId, i32)>> {
    let n = writes.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut statuses: Vec<String> = Vec::with_capacity(n);
    let mut transfers: Vec<Option<String>> = Vec::with_capacity(n);
    let mut next_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut codes: Vec<Option<String>> = Vec::with_capacity(n);
    let mut messages: Vec<Option<String>> = Vec::with_capacity(n);
    let mut actors: Vec<String> = Vec::with_capacity(n);
    let mut reasons: Vec<String> = Vec::with_capacity(n);
    let mut nows = Vec::with_capacity(n);
    let mut key_indexes = Vec::with_capacity(n);
    let mut refunds = Vec::with_capacity(n);
    for w in writes {
        let cols = finish_columns(&w.outcome);
        ids.push(w.id.get());
        tokens.push(w.token);
        statuses.push(w.outcome.status().as_str().to_string());
        transfers.push(cols.transfer_id);
        next_ats.push(cols.next_attempt_at);
        codes.push(cols.code);
        messages.push(cols.message);
        actors.push(w.actor.clone());
        reasons.push(w.reason.clone());
        nows.push(w.now);
        key_indexes.push(w.extras.key_index);
        refunds.push(w.extras.refund_attempt);
    }
    let rows = sqlx::query!(
        r#"WITH input AS (
             SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[],
                                  $6::text[], $7::text[], $8::text[], $9::text[], $10::timestamptz[],
                                  $11::int[], $12::bool[])
                 AS t(id, token, status, transfer_id, next_at, code, message, actor, reason, now,
                      key_index, refund)
             ORDER BY id),
         upd AS (
             UPDATE payouts p SET status = i.status,
                 key_index = GREATEST(p.key_index, i.key_index),
                 holds = p.holds + CASE WHEN i.status = 'held' THEN 1 ELSE 0 END,
                 retry_base = p.retry_base + CASE WHEN i.refund THEN 1 ELSE 0 END,
                 gateway_transfer_id = COALESCE(i.transfer_id, p.gateway_transfer_id),
                 next_attempt_at = i.next_at, failure_code = i.code, failure_message = i.message,
                 paid_at = CASE WHEN i.status = 'paid' THEN i.now ELSE p.paid_at END,
                 lease_owner = NULL, lease_until = NULL, updated_at = i.now
             FROM input i
             WHERE p.id = i.id AND p.attempt = i.token AND p.status = 'processing'
             RETURNING p.id, p.attempt, i.status, i.actor, i.reason, i.now)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, 'processing', status, actor, reason, attempt, now FROM upd
         RETURNING payout_id, attempt AS "attempt!""#,
        &ids,
        &tokens,
        &statuses,
        &transfers[..] as &[Option<String>],
        &next_ats[..] as &[Option<DateTime<Utc>>],
        &codes[..] as &[Option<String>],
        &messages[..] as &[Option<String>],
        &actors,
        &reasons,
        &nows,
        &key_indexes,
        &refunds,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (PayoutId::new(r.payout_id), r.attempt))
        .collect())
}

/// Records one attempt's outcome, fenced: [`finish_many`] with one write
/// (no key index, no refund). It changes nothing (and returns `false`)
/// unless the payout is still `processing` under `token`.
pub async fn finish(
    pool: &PgPool,
    id: PayoutId,
    token: i32,
    outcome: &Finish,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let write = FinishRequest {
        id,
        token,
        outcome: outcome.clone(),
        extras: FinishExtras::default(),
        actor: actor.to_string(),
        reason: reason.to_string(),
        now,
    };
    Ok(!finish_many(pool, &[write]).await?.is_empty())
}

// ----------------------------------------------------------- operator ----

/// An operator (or system) action: move payout `id` from one of `from` to `to`.
struct Action<'a> {
    from: &'a [PayoutStatus],
    to: PayoutStatus,
    lease_until: Option<DateTime<Utc>>,
    reset_budget: bool,
    actor: &'a str,
    reason: &'a str,
}

async fn act(
    pool: impl sqlx::PgExecutor<'_>,
    id: PayoutId,
    a: Action<'_>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    let from: Vec<String> = a.from.iter().map(|s| s.as_str().to_string()).collect();
    let row = sqlx::query!(
        r#"WITH prev AS (
             SELECT p.id, p.status, p.payee_id, y.status = 'suspended' AS suspended
             FROM payouts p JOIN payees y ON y.id = p.payee_id WHERE p.id = $1 FOR UPDATE OF p),
         upd AS (
             UPDATE payouts p SET status = $2, lease_until = $5, lease_owner = NULL, updated_at = $6,
                 retry_base = CASE WHEN $7 THEN p.attempt ELSE p.retry_base END,
                 next_attempt_at = CASE WHEN $7 THEN NULL ELSE p.next_attempt_at END
             FROM prev WHERE p.id = prev.id AND prev.status = ANY($3)
                 AND NOT ($9 AND prev.suspended)
             RETURNING p.id, prev.status AS from_status, p.attempt),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, from_status, $2, $4, $8, attempt, $6 FROM upd)
         SELECT prev.status AS "current!: PayoutStatus", (SELECT from_status FROM upd) AS moved,
                prev.payee_id AS "payee_id!", prev.suspended AS "suspended!"
         FROM prev"#,
        id.get(),
        a.to.as_str(),
        &from,
        a.actor,
        a.lease_until,
        now,
        a.reset_budget,
        a.reason,
        // A suspended payee's payouts wait: nothing queues them.
        a.to == PayoutStatus::Queued,
    )
    .fetch_optional(pool)
    .await?;
    let row = row.ok_or(ActionError::NotFound(id.get()))?;
    match row.moved {
        Some(_) => Ok(row.current),
        None if row.suspended && a.to == PayoutStatus::Queued && a.from.contains(&row.current) => {
            Err(ActionError::PayeeSuspended {
                id: id.get(),
                payee: row.payee_id,
            })
        }
        None => Err(TransitionError {
            id: id.get(),
            from: row.current,
            to: a.to,
        }
        .into()),
    }
}

/// Operator: enqueue now, whatever the due time (`pending`, `retrying` or
/// `held` -> `queued`): "process now", which also sets its priority to
/// [`crate::domain::Priority::ProcessNow`]. Returns the status it moved
/// from; `queued` when it already was.
pub async fn enqueue_now(
    pool: &PgPool,
    id: PayoutId,
    actor: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    enqueue_now_because(pool, id, actor, "manual enqueue", lease_until, now).await
}

/// [`enqueue_now`] with the operator's reason in the event.
pub async fn enqueue_now_because(
    pool: &PgPool,
    id: PayoutId,
    actor: &str,
    reason: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    let action = Action {
        from: &[
            PayoutStatus::Pending,
            PayoutStatus::Retrying,
            PayoutStatus::Held,
        ],
        to: PayoutStatus::Queued,
        lease_until: Some(lease_until),
        reset_budget: false,
        actor,
        reason,
    };
    let from = match act(pool, id, action, now).await {
        Err(ActionError::Illegal(e)) if e.from == PayoutStatus::Queued => PayoutStatus::Queued,
        other => other?,
    };
    // "Process now": ranked first should it be pending again (a retry, a
    // suspension), and its job goes to the front of the queue.
    set_priority(
        &mut *pool.acquire().await?,
        id.get(),
        crate::domain::Priority::ProcessNow,
    )
    .await?;
    Ok(from)
}

/// Operator: retry a failed payout (`failed` -> `queued`) with a fresh attempt budget.
pub async fn retry(
    pool: &PgPool,
    id: PayoutId,
    actor: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    retry_because(pool, id, actor, "operator retry", lease_until, now).await
}

/// [`retry`] with the operator's reason in the event.
pub async fn retry_because(
    pool: &PgPool,
    id: PayoutId,
    actor: &str,
    reason: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    // A settlement payout whose money went back to the payee's balance
    // (cancelled, or reversed after it was paid) is paid by the payee's next
    // period; retrying it would pay twice (a trigger refuses it too).
    if let Some(from) = crate::db::settlements::returned_status(pool, id.get()).await? {
        return Err(TransitionError {
            id: id.get(),
            from,
            to: PayoutStatus::Queued,
        }
        .into());
    }
    let action = Action {
        from: &[PayoutStatus::Failed],
        to: PayoutStatus::Queued,
        lease_until: Some(lease_until),
        reset_budget: true,
        actor,
        reason,
    };
    act(pool, id, action, now).await
}

/// Operator: cancel (`pending`, `queued`, `retrying`, `failed` or `held` -> `cancelled`).
pub async fn cancel(
    pool: &PgPool,
    id: PayoutId,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    act(pool, id, cancel_action(actor, reason), now).await
}

/// The operator's cancel: from every state no worker is calling the gateway in.
fn cancel_action<'a>(actor: &'a str, reason: &'a str) -> Action<'a> {
    Action {
        from: &[
            PayoutStatus::Pending,
            PayoutStatus::Queued,
            PayoutStatus::Retrying,
            PayoutStatus::Failed,
            PayoutStatus::Held,
        ],
        to: PayoutStatus::Cancelled,
        lease_until: None,
        reset_budget: false,
        actor,
        reason,
    }
}

/// [`cancel`], only while the payout is still at attempt `seen_attempt` (no
/// worker sent it again since the gateway was asked): `Ok(None)` when it was.
pub async fn cancel_at_attempt(
    pool: &PgPool,
    id: PayoutId,
    seen_attempt: i32,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Option<PayoutStatus>, ActionError> {
    let mut tx = pool.begin().await?;
    let attempt = sqlx::query_scalar!(
        "SELECT attempt FROM payouts WHERE id = $1 FOR UPDATE",
        id.get()
    )
    .fetch_optional(&mut *tx)
    .await?;
    match attempt {
        None => return Err(ActionError::NotFound(id.get())),
        Some(a) if a != seen_attempt => return Ok(None),
        Some(_) => {}
    }
    let from = act(&mut *tx, id, cancel_action(actor, reason), now).await?;
    tx.commit().await?;
    Ok(Some(from))
}

/// Operator: retries every failed payout matching `filter` (`failed` ->
/// `queued`, with a fresh attempt budget and an event by `actor`), at most
/// `cap` of them, in one statement. Returns the ids moved; rows that changed
/// status meanwhile are left alone, and so are payouts paid before they
/// failed (`paid_at` kept) and settlement payouts whose money went back to
/// the payee's balance: retrying those pays twice. The statement is built
/// from the filter (`QueryBuilder`, every value bound).
pub async fn bulk_retry(
    pool: &PgPool,
    filter: &PayoutFilter,
    cap: i64,
    actor: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<PayoutId>> {
    let mut f = filter.clone();
    f.status = Some(PayoutStatus::Failed);
    let mut q = QueryBuilder::new("WITH pick AS (SELECT id FROM payouts");
    f.push_where(&mut q);
    q.push(" AND paid_at IS NULL ORDER BY id LIMIT ")
        .push_bind(cap)
        .push(" FOR UPDATE SKIP LOCKED), upd AS (UPDATE payouts p SET status = 'queued', lease_until = ")
        .push_bind(lease_until)
        .push(", lease_owner = NULL, updated_at = ")
        .push_bind(now)
        .push(
            ", retry_base = p.attempt, next_attempt_at = NULL
             FROM pick WHERE p.id = pick.id AND p.status = 'failed' AND p.paid_at IS NULL
               -- money returned to the payee's balance is paid by its next period, never by a retry
               AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.payout_id = p.id AND s.outcome = 'returned')
             RETURNING p.id, p.attempt),
             ev AS (INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
                    SELECT id, 'failed', 'queued', ",
        )
        .push_bind(actor)
        .push(", 'operator bulk retry', attempt, ")
        .push_bind(now)
        .push(" FROM upd) SELECT id FROM upd ORDER BY id");
    q.build_query_scalar().fetch_all(pool).await
}

// ------------------------------------------------ gateway's final word ----

/// Reconciliation: records what the gateway says (`paid` or `in_transit` with
/// its transfer id), only if the payout is still as it was read (`status` and
/// `attempt` unchanged, so a worker that claimed it since wins). `true` when written.
#[allow(clippy::too_many_arguments)]
pub async fn reconcile_to(
    pool: &PgPool,
    id: i64,
    seen_status: PayoutStatus,
    seen_attempt: i32,
    to: PayoutStatus,
    transfer_id: &str,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query!("SET LOCAL payouts.reconcile = 'on'")
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query_scalar!(
        "WITH upd AS (
             UPDATE payouts SET status = $4, gateway_transfer_id = $5,
                 paid_at = CASE WHEN $4 = 'paid' THEN $7 ELSE paid_at END,
                 lease_owner = NULL, lease_until = NULL, failure_code = NULL, failure_message = NULL,
                 updated_at = $7
             WHERE id = $1 AND status = $2 AND attempt = $3
             RETURNING id, attempt)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, $2, $4, $6, $8, attempt, $7 FROM upd
         RETURNING payout_id",
        id,
        seen_status.as_str(),
        seen_attempt,
        to.as_str(),
        transfer_id,
        actor,
        now,
        reason,
    )
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row.is_some())
}

/// Payouts reconciliation looks at: everything sent or possibly sent
/// (not `pending`) changed since `since`, oldest first, after `after_id`.
pub async fn for_reconciliation(
    pool: &PgPool,
    since: DateTime<Utc>,
    after_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<Payout>> {
    sqlx::query_as!(
        Payout,
        r#"SELECT id AS "id: PayoutId", payee_id AS "payee_id: PayeeId", amount, currency,
                  status AS "status: PayoutStatus", due_at, attempt,
                  retry_base, next_attempt_at, lease_owner, lease_until, gateway_transfer_id,
                  failure_code, failure_message, created_at, updated_at, paid_at
           FROM payouts
           WHERE updated_at >= $1 AND id > $2 AND status <> 'pending'
           ORDER BY id LIMIT $3"#,
        since,
        after_id,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// How many payouts [`for_reconciliation`] pages through from the start
/// (the progress bar's length; rows that change meanwhile may make it off by a few).
pub async fn count_for_reconciliation(pool: &PgPool, since: DateTime<Utc>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM payouts WHERE updated_at >= $1 AND status <> 'pending'"#,
        since,
    )
    .fetch_one(pool)
    .await
}

/// One state change the gateway reported (by webhook or the in-transit poll).
#[derive(Debug, Clone)]
pub struct Resolution<'a> {
    /// The payout.
    pub payout_id: i64,
    /// The status it must still be in.
    pub from: PayoutStatus,
    /// The attempt it must still be under (`None`: any).
    pub attempt: Option<i32>,
    /// `Paid` or `Failed`.
    pub to: PayoutStatus,
    /// The gateway's id for it, kept if the payout has none yet.
    pub transfer_id: Option<&'a str>,
    /// Failure code (to `failed`).
    pub code: Option<&'a str>,
    /// Failure message (to `failed`).
    pub message: Option<&'a str>,
    /// `webhook:stripe`, `sync:<host>`, ...
    pub actor: &'a str,
    /// The event's reason.
    pub reason: &'a str,
    /// When.
    pub now: DateTime<Utc>,
}

/// Records `r` with its event in one statement, fenced on its status (and
/// attempt); `true` when written. (`services::sync::resolve` adds the
/// alert of a payout failed after it was paid.)
pub async fn resolve(conn: &mut PgConnection, r: &Resolution<'_>) -> sqlx::Result<bool> {
    let row = sqlx::query_scalar!(
        "WITH upd AS (
             UPDATE payouts SET status = $3,
                 gateway_transfer_id = COALESCE(gateway_transfer_id, $4),
                 failure_code = $5, failure_message = $6,
                 paid_at = CASE WHEN $3 = 'paid' THEN $7 ELSE paid_at END,
                 lease_owner = NULL, lease_until = NULL, updated_at = $7
             WHERE id = $1 AND status = $2 AND ($8::int IS NULL OR attempt = $8)
             RETURNING id, attempt)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, $2, $3, $9, $10, attempt, $7 FROM upd
         RETURNING payout_id",
        r.payout_id,
        r.from.as_str(),
        r.to.as_str(),
        r.transfer_id,
        r.code,
        r.message,
        r.now,
        r.attempt,
        r.actor,
        r.reason,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.is_some())
}

/// A payout `in_transit` the poll asks the gateway about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InTransit {
    /// The payout.
    pub id: i64,
    /// Its attempt (the poll's write is fenced on it).
    pub attempt: i32,
    /// The gateway's transfer id, when it gave one.
    pub gateway_transfer_id: Option<String>,
}

/// Up to `limit` payouts `in_transit` unchanged since `cutoff`, by id after `after_id`.
pub async fn in_transit_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    after_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<InTransit>> {
    sqlx::query_as!(
        InTransit,
        "SELECT id, attempt, gateway_transfer_id FROM payouts
         WHERE status = 'in_transit' AND updated_at <= $1 AND id > $2
         ORDER BY id LIMIT $3",
        cutoff,
        after_id,
        limit,
    )
    .fetch_all(pool)
    .await
}

/// The gateway accounts (after `after`, in order, at most `limit`) of payees
/// with payouts `held` for `code`.
pub async fn held_accounts(
    pool: &PgPool,
    code: &str,
    after: &str,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "SELECT DISTINCT payees.gateway_account FROM payouts
         JOIN payees ON payees.id = payouts.payee_id
         WHERE payouts.status = 'held' AND payouts.failure_code = $3
           AND payees.gateway_account > $2
         ORDER BY 1 LIMIT $1",
        limit,
        after,
        code,
    )
    .fetch_all(pool)
    .await
}

/// Puts every payout of `account` held for `code` back to `queued` (fresh
/// attempt budget, lease already expired at `now` so the producer's sweep
/// enqueues it), with an event by `actor`; their ids.
pub async fn release_held(
    conn: &mut PgConnection,
    account: &str,
    code: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar!(
        "WITH upd AS (
             UPDATE payouts p SET status = 'queued', retry_base = p.attempt,
                 next_attempt_at = NULL, lease_owner = NULL, lease_until = $3,
                 updated_at = $3
             FROM payees
             WHERE payees.id = p.payee_id AND payees.gateway_account = $1
               AND p.status = 'held' AND p.failure_code = $2
             RETURNING p.id, p.attempt)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, 'held', 'queued', $4, 'payee onboarded: released from ' || $2, attempt, $3 FROM upd
         RETURNING payout_id",
        account,
        code,
        now,
        actor,
    )
    .fetch_all(&mut *conn)
    .await
}

/// The payout whose gateway transfer is `transfer_id`, if any.
pub async fn id_by_transfer(
    conn: &mut PgConnection,
    transfer_id: &str,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!(
        "SELECT id FROM payouts WHERE gateway_transfer_id = $1 LIMIT 1",
        transfer_id,
    )
    .fetch_optional(&mut *conn)
    .await
}

/// A payout locked for a webhook's change, with its payee's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    /// The payout.
    pub id: i64,
    /// Its status.
    pub status: PayoutStatus,
    /// Its gateway transfer, once accepted.
    pub gateway_transfer_id: Option<String>,
    /// The account it was sent to (else its payee's gateway account).
    pub gateway_account: String,
}

/// Payout `id` and the account it was sent to (its payee's account when it
/// was never sent), the payout row locked until the transaction ends.
pub async fn lock_with_account(conn: &mut PgConnection, id: i64) -> sqlx::Result<Option<Locked>> {
    sqlx::query_as!(
        Locked,
        r#"SELECT p.id, p.status AS "status: PayoutStatus", p.gateway_transfer_id,
                  coalesce(p.destination, payees.gateway_account) AS "gateway_account!"
           FROM payouts p JOIN payees ON payees.id = p.payee_id
           WHERE p.id = $1 FOR UPDATE OF p"#,
        id,
    )
    .fetch_optional(&mut *conn)
    .await
}

/// Puts payee `payee_id`'s `queued` payouts (a job in Redis, no worker's
/// claim yet) back to `pending`, each with its event: the payee was
/// suspended and they wait for the resume. Their jobs, when delivered, find
/// nothing to claim. Returns their ids.
pub async fn park_queued_of_payee(
    conn: &mut PgConnection,
    payee_id: i64,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar!(
        r#"WITH q AS (
             SELECT id FROM payouts WHERE payee_id = $1 AND status = 'queued'
             ORDER BY id FOR UPDATE),
         upd AS (
             UPDATE payouts p SET status = 'pending', lease_owner = NULL, lease_until = NULL, updated_at = $4
             FROM q WHERE p.id = q.id AND p.status = 'queued'
             RETURNING p.id, p.attempt),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, 'queued', 'pending', $2, $3, attempt, $4 FROM upd)
         SELECT id AS "id!" FROM upd ORDER BY id"#,
        payee_id,
        actor,
        reason,
        now,
    )
    .fetch_all(&mut *conn)
    .await
}

/// Fixes the destination of payee `payee_id`'s payouts that were sent
/// (claimed at least once) before destinations were recorded at the claim:
/// they keep `account`, the account they went to. Returns how many.
pub async fn pin_destinations(
    conn: &mut PgConnection,
    payee_id: i64,
    account: &str,
) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "UPDATE payouts SET destination = $2
         WHERE payee_id = $1 AND destination IS NULL AND attempt > 0",
        payee_id,
        account,
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// How many of payee `payee_id`'s payouts are not finished (pending,
/// queued, processing, retrying, in transit, held), and how many of those
/// were sent (their destination is fixed).
pub async fn open_of_payee(
    conn: impl sqlx::PgExecutor<'_>,
    payee_id: i64,
) -> sqlx::Result<(i64, i64)> {
    let r = sqlx::query!(
        r#"SELECT count(*) AS "open!", count(*) FILTER (WHERE attempt > 0) AS "sent!" FROM payouts
           WHERE payee_id = $1
             AND status IN ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'held')"#,
        payee_id,
    )
    .fetch_one(conn)
    .await?;
    Ok((r.open, r.sent))
}

// ----------------------------------------------------------- overview ----

/// Payouts paid since `since`, and payouts failed (last changed) since then.
pub async fn done_since(pool: &PgPool, since: DateTime<Utc>) -> sqlx::Result<(i64, i64)> {
    let r = sqlx::query!(
        r#"SELECT (SELECT count(*) FROM payouts WHERE paid_at >= $1) AS "paid!",
                  (SELECT count(*) FROM payouts WHERE status = 'failed' AND updated_at >= $1) AS "failed!""#,
        since,
    )
    .fetch_one(pool)
    .await?;
    Ok((r.paid, r.failed))
}

/// How late payouts were paid (seconds from due to paid): the 50th, 95th
/// and 99th percentiles over the last 10,000 paid since `since`, and how
/// many that was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lateness {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Payouts measured.
    pub sample: i64,
}

/// [`Lateness`] of the payouts paid since `since`.
pub async fn lateness_since(pool: &PgPool, since: DateTime<Utc>) -> sqlx::Result<Lateness> {
    sqlx::query_as!(
        Lateness,
        r#"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY s) AS p95,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99,
                  count(*) AS "sample!"
           FROM (SELECT greatest(extract(epoch FROM paid_at - due_at), 0)::float8 AS s
                 FROM payouts WHERE paid_at >= $1 ORDER BY paid_at DESC LIMIT 10000) last"#,
        since,
    )
    .fetch_one(pool)
    .await
}

/// Paid and failed per minute since `start` (minutes with neither left
/// out): `(minute, paid, failed)`.
pub async fn done_per_minute(
    pool: &PgPool,
    start: DateTime<Utc>,
) -> sqlx::Result<Vec<(DateTime<Utc>, i64, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT m AS "m!", sum(p)::bigint AS "paid!", sum(f)::bigint AS "failed!" FROM (
             SELECT date_trunc('minute', paid_at) AS m, 1 AS p, 0 AS f FROM payouts WHERE paid_at >= $1
             UNION ALL
             SELECT date_trunc('minute', updated_at), 0, 1 FROM payouts
              WHERE status = 'failed' AND updated_at >= $1) x
           GROUP BY m"#,
        start,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.m, r.paid, r.failed)).collect())
}

// ------------------------------------------------------------ tooling ----
// What the test tooling (`testkit`: demo, chaos harness, bench) reads and
// writes, and nothing in the product calls.

/// Payouts with `status` (exact count).
#[cfg(feature = "testkit")]
pub async fn count_with_status(pool: &PgPool, status: PayoutStatus) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM payouts WHERE status = $1"#,
        status.as_str(),
    )
    .fetch_one(pool)
    .await
}

/// Payouts not final yet (neither paid, failed nor cancelled).
#[cfg(feature = "testkit")]
pub async fn count_open(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM payouts
           WHERE status NOT IN ('paid', 'failed', 'cancelled')"#
    )
    .fetch_one(pool)
    .await
}

/// Every payout.
#[cfg(feature = "testkit")]
pub async fn count_all(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM payouts"#)
        .fetch_one(pool)
        .await
}

/// The highest payout id (0 when there is none).
#[cfg(feature = "testkit")]
pub async fn max_id(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT coalesce(max(id), 0) AS "max!" FROM payouts"#)
        .fetch_one(pool)
        .await
}

/// Of the payouts above `after_id`: how many are paid, failed, and not final.
#[cfg(feature = "testkit")]
pub async fn outcomes_after(pool: &PgPool, after_id: i64) -> sqlx::Result<(i64, i64, i64)> {
    let r = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE status = 'paid') AS "paid!",
                  count(*) FILTER (WHERE status = 'failed') AS "failed!",
                  count(*) FILTER (WHERE status NOT IN ('paid', 'failed', 'cancelled')) AS "open!"
           FROM payouts WHERE id > $1"#,
        after_id,
    )
    .fetch_one(pool)
    .await?;
    Ok((r.paid, r.failed, r.open))
}

/// Every payout, by id.
#[cfg(feature = "testkit")]
pub async fn all(pool: &PgPool) -> sqlx::Result<Vec<Payout>> {
    sqlx::query_as!(
        Payout,
        r#"SELECT id AS "id: PayoutId", payee_id AS "payee_id: PayeeId", amount, currency,
                  status AS "status: PayoutStatus", due_at, attempt,
                  retry_base, next_attempt_at, lease_owner, lease_until, gateway_transfer_id,
                  failure_code, failure_message, created_at, updated_at, paid_at
           FROM payouts ORDER BY id"#
    )
    .fetch_all(pool)
    .await
}

/// Ids of up to `limit` payouts with `status`, by id.
#[cfg(feature = "testkit")]
pub async fn ids_with_status(
    pool: &PgPool,
    status: PayoutStatus,
    limit: i64,
) -> sqlx::Result<Vec<PayoutId>> {
    let ids = sqlx::query_scalar!(
        "SELECT id FROM payouts WHERE status = $1 ORDER BY id LIMIT $2",
        status.as_str(),
        limit,
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(PayoutId::new).collect())
}

/// Ids of up to `limit` paid payouts, picked at random.
#[cfg(feature = "testkit")]
pub async fn random_paid(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<PayoutId>> {
    let ids = sqlx::query_scalar!(
        "SELECT id FROM payouts WHERE status = 'paid' ORDER BY random() LIMIT $1",
        limit,
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(PayoutId::new).collect())
}

/// The payouts `processing` under a lease whose owner is LIKE `owner_like`
/// (a worker process: `worker:%-<pid>-%`), with their attempts.
#[cfg(feature = "testkit")]
pub async fn processing_owned_like(
    pool: &PgPool,
    owner_like: &str,
) -> sqlx::Result<Vec<(i64, i32)>> {
    let rows = sqlx::query!(
        "SELECT id, attempt FROM payouts WHERE status = 'processing' AND lease_owner LIKE $1",
        owner_like,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.attempt)).collect())
}

/// The lease owner holding the most payouts `processing`, if any.
#[cfg(feature = "testkit")]
pub async fn busiest_owner(pool: &PgPool) -> sqlx::Result<Option<String>> {
    let owner = sqlx::query_scalar!(
        "SELECT lease_owner FROM payouts WHERE status = 'processing' AND lease_owner IS NOT NULL
         GROUP BY lease_owner ORDER BY count(*) DESC LIMIT 1"
    )
    .fetch_optional(pool)
    .await?;
    Ok(owner.flatten())
}

/// Creates `count` pending payouts of `amount` (unchecked: any scale the
/// column takes, which no `Money` allows) for `payee_id`, with their events:
/// poison for the chaos harness. Their ids.
#[cfg(feature = "testkit")]
pub async fn create_unchecked(
    pool: &PgPool,
    payee_id: i64,
    amount: Decimal,
    currency: &str,
    count: i64,
    actor: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar!(
        r#"WITH ins AS (
             INSERT INTO payouts (payee_id, amount, currency, due_at, created_at, updated_at)
             SELECT $1, $2, $3, $6, $6, $6 FROM generate_series(1, $4::bigint) RETURNING id),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, NULL, 'pending', $5, 'created', 0, $6 FROM ins)
         SELECT id AS "id!" FROM ins"#,
        payee_id,
        amount,
        currency,
        count,
        actor,
        now,
    )
    .fetch_all(pool)
    .await
}

/// The first paid payout, if any.
#[cfg(feature = "testkit")]
pub async fn first_paid(pool: &PgPool) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!("SELECT id FROM payouts WHERE status = 'paid' ORDER BY id LIMIT 1")
        .fetch_optional(pool)
        .await
}

/// Whether the database refuses an illegal transition (paid payout `id`
/// back to `pending`): tried in a transaction that is rolled back.
#[cfg(feature = "testkit")]
pub async fn refuses_illegal_transition(pool: &PgPool, id: i64) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let tried = sqlx::query!("UPDATE payouts SET status = 'pending' WHERE id = $1", id)
        .execute(&mut *tx)
        .await;
    tx.rollback().await?;
    Ok(tried.is_err())
}

/// For the benchmark: when the first payout created since `since` was
/// queued, and when the last of them was paid.
#[cfg(feature = "testkit")]
pub async fn run_span(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> sqlx::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let r = sqlx::query!(
        r#"SELECT (SELECT min(at) FROM payout_events e JOIN payouts p ON p.id = e.payout_id
                   WHERE e.to_status = 'queued' AND p.created_at >= $1) AS "start!",
                  (SELECT max(paid_at) FROM payouts WHERE created_at >= $1) AS "end!""#,
        since,
    )
    .fetch_one(pool)
    .await?;
    Ok((r.start, r.end))
}

/// For the benchmark: the 50th, 95th and 99th percentiles of seconds from
/// `start` to paid, over the payouts created since `since`.
#[cfg(feature = "testkit")]
pub async fn paid_after_percentiles(
    pool: &PgPool,
    since: DateTime<Utc>,
    start: DateTime<Utc>,
) -> sqlx::Result<(f64, f64, f64)> {
    let r = sqlx::query!(
        r#"SELECT q[1] AS "p50!", q[2] AS "p95!", q[3] AS "p99!" FROM (
             SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                 (ORDER BY extract(epoch FROM paid_at - $2)::float8) AS q
             FROM payouts WHERE created_at >= $1) s"#,
        since,
        start,
    )
    .fetch_one(pool)
    .await?;
    Ok((r.p50, r.p95, r.p99))
}

/// The first and the last time a payout was paid after `after` (the chaos
/// harness's failover scenario).
#[cfg(feature = "testkit")]
pub async fn paid_span_after(
    pool: &PgPool,
    after: DateTime<Utc>,
) -> sqlx::Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    let r = sqlx::query!(
        "SELECT min(paid_at) AS first, max(paid_at) AS last FROM payouts WHERE paid_at > $1",
        after,
    )
    .fetch_one(pool)
    .await?;
    Ok((r.first, r.last))
}

/// Payout `id`'s attempt now, and the time of its latest event.
#[cfg(feature = "testkit")]
pub async fn attempt_and_last_event(
    pool: &PgPool,
    id: i64,
) -> sqlx::Result<(i32, Option<DateTime<Utc>>)> {
    let r = sqlx::query!(
        "SELECT attempt, (SELECT max(at) FROM payout_events WHERE payout_id = $1) AS last_event
         FROM payouts WHERE id = $1",
        id,
    )
    .fetch_one(pool)
    .await?;
    Ok((r.attempt, r.last_event))
}

/// Fresh planner statistics for `payouts` (the benchmark, after seeding).
#[cfg(feature = "testkit")]
pub async fn vacuum_analyze(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query!("VACUUM ANALYZE payouts").execute(pool).await?;
    Ok(())
}

/// Sets why payout `id` is due (`payouts.priority`, which the due scan
/// ranks by); in the caller's transaction, e.g. right after [`create_many`]
/// for an early payout request ([`crate::domain::Priority::Requested`]).
pub async fn set_priority(
    conn: &mut PgConnection,
    id: i64,
    priority: crate::domain::Priority,
) -> sqlx::Result<u64> {
    let r = sqlx::query!(
        "UPDATE payouts SET priority = $2 WHERE id = $1",
        id,
        priority.as_i16(),
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

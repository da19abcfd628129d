//! The `payouts` table. Every statement that changes a payout's status writes
//! its `payout_events` row in the same statement, and every worker write is
//! fenced by the attempt number its claim returned.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use crate::domain::{Money, PayoutStatus, TransitionError};

/// A payout row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Payout {
    /// Id; the gateway idempotency key and reference derive from it.
    pub id: i64,
    /// Who is paid.
    pub payee_id: i64,
    /// Exact amount.
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
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    /// The payout as it is after the claim.
    #[sqlx(flatten)]
    pub payout: Payout,
    /// The payee's gateway account.
    pub gateway_account: String,
    /// The payout's position in its idempotency-key chain (`payouts.key_index`).
    pub key_index: i32,
    /// How many times it was held before (`payouts.holds`).
    pub holds: i32,
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
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Creates a pending payout (and its `created` event).
pub async fn create(
    pool: &PgPool,
    payee_id: i64,
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
    payee_id: i64,
    money: Money,
    due_at: DateTime<Utc>,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Payout> {
    sqlx::query_as::<_, Payout>(
        "WITH ins AS (
             INSERT INTO payouts (payee_id, amount, currency, due_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $6, $6) RETURNING *),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, NULL, 'pending', $5, $7, 0, $6 FROM ins)
         SELECT * FROM ins",
    )
    .bind(payee_id)
    .bind(money.amount())
    .bind(money.currency().code())
    .bind(due_at)
    .bind(actor)
    .bind(now)
    .bind(reason)
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
}

/// [`create_in`] for many payouts (at most one per payee and currency) in
/// one statement, with their `created` events; returns their ids in the
/// order of `news`.
pub async fn create_many(
    conn: &mut sqlx::PgConnection,
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
    let reasons: Vec<&str> = news.iter().map(|n| n.reason.as_str()).collect();
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "WITH ins AS (
             INSERT INTO payouts (payee_id, amount, currency, due_at, created_at, updated_at)
             SELECT p, a, c, $4, $6, $6 FROM unnest($1::bigint[], $2::numeric[], $3::text[]) AS u(p, a, c)
             RETURNING id, payee_id, currency),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT ins.id, NULL, 'pending', $5, u.r, 0, $6
             FROM ins JOIN unnest($1::bigint[], $3::text[], $7::text[]) AS u(p, c, r)
                  ON u.p = ins.payee_id AND u.c = ins.currency)
         SELECT id, payee_id, currency FROM ins",
    )
    .bind(&payee_ids)
    .bind(&amounts)
    .bind(&currencies)
    .bind(due_at)
    .bind(actor)
    .bind(now)
    .bind(&reasons)
    .fetch_all(conn)
    .await?;
    let by_group: std::collections::HashMap<(i64, String), i64> = rows
        .into_iter()
        .map(|(id, payee, currency)| ((payee, currency), id))
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
    let res = sqlx::query(
        "WITH ins AS (
             INSERT INTO payouts (payee_id, amount, currency, due_at, created_at, updated_at)
             SELECT ($1::bigint[])[1 + (g % cardinality($1::bigint[]))],
                    (5 + (g * 7919) % 995)::numeric + ((g * 31) % 100)::numeric / 100,
                    $3, $4, $5, $5
             FROM generate_series(1, $2) g RETURNING id)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, NULL, 'pending', 'operator:seed', 'created', 0, $5 FROM ins",
    )
    .bind(payee_ids)
    .bind(count)
    .bind(currency)
    .bind(due_at)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

/// One payout.
pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<Payout>> {
    sqlx::query_as::<_, Payout>("SELECT * FROM payouts WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Counts by status (exact; for the CLI, demo and tests).
pub async fn count_by_status(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT status, count(*) FROM payouts GROUP BY status ORDER BY status")
        .fetch_all(pool)
        .await
}

/// Payouts by status for the gauges and the overview: exact for every
/// status but `paid`, read through the `(status, id)` index; `paid` is exact
/// below a million rows and past that the table's row estimate less the
/// others, so no statement scans a large table.
pub async fn status_counts(pool: &PgPool) -> sqlx::Result<Vec<(PayoutStatus, i64)>> {
    Ok(status_counts_marked(pool).await?.0)
}

/// Counts of every status but `paid`: read through the `(status, id)` index.
pub const UNPAID_COUNTS: &str = "SELECT status, count(*) FROM payouts
     WHERE status IN ('pending', 'queued', 'processing', 'retrying', 'in_transit', 'failed', 'cancelled', 'held')
     GROUP BY status";

/// Tables below this many rows (by the planner's estimate) get an exact
/// `paid` count too: cheap there, and the estimate of a young table is poor.
const EXACT_PAID_BELOW: i64 = 1_000_000;

/// [`status_counts`], and whether `paid` is an estimate.
pub async fn status_counts_marked(pool: &PgPool) -> sqlx::Result<(Vec<(PayoutStatus, i64)>, bool)> {
    let rows: Vec<(String, i64)> = sqlx::query_as(UNPAID_COUNTS).fetch_all(pool).await?;
    let estimate: i64 = sqlx::query_scalar(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'payouts'::regclass",
    )
    .fetch_one(pool)
    .await?;
    let mut out: Vec<(PayoutStatus, i64)> = rows
        .into_iter()
        .filter_map(|(s, n)| s.parse().ok().map(|s| (s, n)))
        .collect();
    let others: i64 = out.iter().map(|(_, n)| n).sum();
    if estimate < EXACT_PAID_BELOW {
        let paid: i64 = sqlx::query_scalar("SELECT count(*) FROM payouts WHERE status = 'paid'")
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
/// left out: they wait on their schedule by design, not on the fleet.
pub async fn oldest_due_unfinished(
    pool: &PgPool,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT least(
             (SELECT min(due_at) FROM payouts WHERE status = 'pending' AND due_at <= $1),
             (SELECT min(due_at) FROM payouts WHERE status IN ('queued', 'processing')))",
    )
    .bind(now)
    .fetch_one(pool)
    .await
}

/// How many payouts are `queued`: the jobs the window holds.
pub async fn count_queued(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM payouts WHERE status = 'queued'")
        .fetch_one(pool)
        .await
}

/// Moves rows matching `filter` (at most $2, oldest `order` first, skipping
/// rows another replica holds) to `queued`, leased until $3, with their events.
fn queue_statement(filter: &str, order: &str, reason: &str) -> String {
    format!(
        "WITH due AS (
             SELECT id, status FROM payouts WHERE {filter}
             ORDER BY {order} LIMIT $2 FOR UPDATE SKIP LOCKED),
         upd AS (
             UPDATE payouts p SET status = 'queued', lease_until = $3, lease_owner = NULL, updated_at = $1
             FROM due WHERE p.id = due.id
             RETURNING p.id, due.status AS from_status, p.attempt),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, from_status, 'queued', $4, '{reason}', attempt, $1 FROM upd)
         SELECT id FROM upd"
    )
}

/// Retrying payouts whose next attempt is due (index `payouts_retrying_next_idx`).
static QUEUE_RETRYING: LazyLock<String> = LazyLock::new(|| {
    queue_statement(
        "status = 'retrying' AND next_attempt_at <= $1",
        "next_attempt_at",
        "retry due",
    )
});
/// Pending payouts that are due (index `payouts_pending_due_idx`).
static QUEUE_PENDING: LazyLock<String> =
    LazyLock::new(|| queue_statement("status = 'pending' AND due_at <= $1", "due_at", "due"));

/// Moves up to `limit` due payouts (retrying whose time has come first, then
/// pending by due time) to `queued`, leased until `lease_until`; returns their ids.
/// Replicas never take the same rows (`FOR UPDATE SKIP LOCKED`).
pub async fn queue_due(
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
    lease_until: DateTime<Utc>,
    actor: &str,
) -> sqlx::Result<Vec<i64>> {
    let mut tx: Transaction<'_, Postgres> = pool.begin().await?;
    let mut ids: Vec<i64> = sqlx::query_scalar(QUEUE_RETRYING.as_str())
        .bind(now)
        .bind(limit)
        .bind(lease_until)
        .bind(actor)
        .fetch_all(&mut *tx)
        .await?;
    let rest = limit - ids.len() as i64;
    if rest > 0 {
        let more: Vec<i64> = sqlx::query_scalar(QUEUE_PENDING.as_str())
            .bind(now)
            .bind(rest)
            .bind(lease_until)
            .bind(actor)
            .fetch_all(&mut *tx)
            .await?;
        ids.extend(more);
    }
    tx.commit().await?;
    Ok(ids)
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
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "WITH exp AS (
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
         SELECT id FROM upd",
    )
    .bind(now)
    .bind(limit)
    .bind(lease_until)
    .bind(actor)
    .fetch_all(pool)
    .await
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
    ids: &[i64],
    tokens: &[i32],
    lease_until: DateTime<Utc>,
) -> sqlx::Result<Vec<Renewed>> {
    sqlx::query_as(
        "WITH input AS (SELECT * FROM unnest($1::bigint[], $2::int[]) AS t(id, token)),
         mine AS (
             SELECT p.id FROM payouts p JOIN input i ON i.id = p.id AND i.token = p.attempt
             WHERE p.status = 'processing' AND p.lease_owner = $3
             ORDER BY p.id FOR UPDATE OF p),
         upd AS (
             UPDATE payouts p SET lease_until = GREATEST(p.lease_until, $4)
             FROM mine WHERE p.id = mine.id
             RETURNING p.id)
         SELECT i.id, i.token, upd.id IS NOT NULL AS renewed,
                upd.id IS NULL AND (p.id IS NULL OR p.attempt <> i.token
                                    OR p.status IN ('queued', 'processing')) AS taken
         FROM input i LEFT JOIN upd ON upd.id = i.id LEFT JOIN payouts p ON p.id = i.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(owner)
    .bind(lease_until)
    .fetch_all(exec)
    .await
}

/// One lease of a [`renew_leases`] statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Renewed {
    /// The payout.
    pub id: i64,
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
    id: i64,
    token: i32,
    key_index: i32,
    refund: bool,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let row: Option<i64> = sqlx::query_scalar(
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
    )
    .bind(id)
    .bind(token)
    .bind(key_index)
    .bind(refund)
    .bind(now)
    .bind(actor)
    .bind(reason)
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
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "WITH gone AS (
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
         SELECT id FROM upd ORDER BY id",
    )
    .bind(now)
    .bind(owners)
    .bind(lease_until)
    .bind(actor)
    .fetch_all(pool)
    .await
}

/// Ids of all `queued` payouts, their leases refreshed (after Redis lost its data).
pub async fn requeue_all_queued(
    pool: &PgPool,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "UPDATE payouts SET lease_until = $1, updated_at = $2 WHERE status = 'queued' RETURNING id",
    )
    .bind(lease_until)
    .bind(now)
    .fetch_all(pool)
    .await
}

/// Claims a payout for one attempt: `queued` (or `processing` with an expired
/// lease) becomes `processing`, `attempt` goes up by one and is returned as the
/// fencing token. `None` when the payout is not claimable (final, held, unknown).
pub async fn claim(
    pool: &PgPool,
    id: i64,
    owner: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> sqlx::Result<Option<Claimed>> {
    sqlx::query_as::<_, Claimed>(
        "WITH prev AS (SELECT id, status FROM payouts WHERE id = $1 FOR UPDATE),
         upd AS (
             UPDATE payouts p SET status = 'processing', attempt = p.attempt + 1,
                 lease_owner = $2, lease_until = $4, updated_at = $3
             FROM prev
             WHERE p.id = prev.id
               AND (prev.status = 'queued' OR (prev.status = 'processing' AND p.lease_until < $3))
             RETURNING p.*, prev.status AS from_status),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, from_status, 'processing', $2, 'claimed', attempt, $3 FROM upd)
         SELECT upd.*, payees.gateway_account FROM upd JOIN payees ON payees.id = upd.payee_id",
    )
    .bind(id)
    .bind(owner)
    .bind(now)
    .bind(lease_until)
    .fetch_optional(pool)
    .await
}

/// The columns a [`Finish`] writes besides its status.
#[derive(Debug, Clone, Default)]
pub struct FinishColumns {
    /// Gateway transfer id (paid, in transit).
    pub transfer_id: Option<String>,
    /// Next attempt (retrying).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Failure code (retrying, failed).
    pub code: Option<String>,
    /// Failure message (retrying, failed).
    pub message: Option<String>,
}

/// The columns `outcome` writes.
pub fn finish_columns(outcome: &Finish) -> FinishColumns {
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

/// Records an attempt's outcome, fenced: it changes nothing (and returns
/// `false`) unless the payout is still `processing` under `token`.
pub async fn finish(
    pool: &PgPool,
    id: i64,
    token: i32,
    outcome: &Finish,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let cols = finish_columns(outcome);
    let row: Option<i64> = sqlx::query_scalar(
        "WITH upd AS (
             UPDATE payouts SET status = $3,
                 gateway_transfer_id = COALESCE($4, gateway_transfer_id),
                 next_attempt_at = $5, failure_code = $6, failure_message = $7,
                 paid_at = CASE WHEN $3 = 'paid' THEN $8 ELSE paid_at END,
                 lease_owner = NULL, lease_until = NULL, updated_at = $8
             WHERE id = $1 AND attempt = $2 AND status = 'processing'
             RETURNING id, attempt)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, 'processing', $3, $9, $10, attempt, $8 FROM upd
         RETURNING payout_id",
    )
    .bind(id)
    .bind(token)
    .bind(outcome.status().as_str())
    .bind(cols.transfer_id)
    .bind(cols.next_attempt_at)
    .bind(cols.code)
    .bind(cols.message)
    .bind(now)
    .bind(actor)
    .bind(reason)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

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
    id: i64,
    a: Action<'_>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    let from: Vec<&str> = a.from.iter().map(|s| s.as_str()).collect();
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "WITH prev AS (SELECT id, status FROM payouts WHERE id = $1 FOR UPDATE),
         upd AS (
             UPDATE payouts p SET status = $2, lease_until = $5, lease_owner = NULL, updated_at = $6,
                 retry_base = CASE WHEN $7 THEN p.attempt ELSE p.retry_base END,
                 next_attempt_at = CASE WHEN $7 THEN NULL ELSE p.next_attempt_at END
             FROM prev WHERE p.id = prev.id AND prev.status = ANY($3)
             RETURNING p.id, prev.status AS from_status, p.attempt),
         ev AS (
             INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
             SELECT id, from_status, $2, $4, $8, attempt, $6 FROM upd)
         SELECT prev.status, (SELECT from_status FROM upd) FROM prev",
    )
    .bind(id)
    .bind(a.to.as_str())
    .bind(&from)
    .bind(a.actor)
    .bind(a.lease_until)
    .bind(now)
    .bind(a.reset_budget)
    .bind(a.reason)
    .fetch_optional(pool)
    .await?;
    let (current, moved) = row.ok_or(ActionError::NotFound(id))?;
    let current: PayoutStatus = current
        .parse()
        .map_err(|e: String| ActionError::Db(sqlx::Error::Decode(e.into())))?;
    match moved {
        Some(_) => Ok(current),
        None => Err(TransitionError {
            id,
            from: current,
            to: a.to,
        }
        .into()),
    }
}

/// Operator: enqueue now, whatever the due time (`pending`, `retrying` or
/// `held` -> `queued`). Returns the status it moved from; `queued` when it already was.
pub async fn enqueue_now(
    pool: &PgPool,
    id: i64,
    actor: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    enqueue_now_because(pool, id, actor, "manual enqueue", lease_until, now).await
}

/// [`enqueue_now`] with the operator's reason in the event.
pub async fn enqueue_now_because(
    pool: &PgPool,
    id: i64,
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
    match act(pool, id, action, now).await {
        Err(ActionError::Illegal(e)) if e.from == PayoutStatus::Queued => Ok(PayoutStatus::Queued),
        other => other,
    }
}

/// Operator: retry a failed payout (`failed` -> `queued`) with a fresh attempt budget.
pub async fn retry(
    pool: &PgPool,
    id: i64,
    actor: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    retry_because(pool, id, actor, "operator retry", lease_until, now).await
}

/// [`retry`] with the operator's reason in the event.
pub async fn retry_because(
    pool: &PgPool,
    id: i64,
    actor: &str,
    reason: &str,
    lease_until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, ActionError> {
    // A settlement payout whose money went back to the payee's balance
    // (cancelled, or reversed after it was paid) is paid by the payee's next
    // period; retrying it would pay twice (a trigger refuses it too).
    if let Some(from) = crate::db::settlements::returned_status(pool, id).await? {
        return Err(TransitionError {
            id,
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
    id: i64,
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
    id: i64,
    seen_attempt: i32,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Option<PayoutStatus>, ActionError> {
    let mut tx = pool.begin().await?;
    let attempt: Option<i32> =
        sqlx::query_scalar("SELECT attempt FROM payouts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match attempt {
        None => return Err(ActionError::NotFound(id)),
        Some(a) if a != seen_attempt => return Ok(None),
        Some(_) => {}
    }
    let from = act(&mut *tx, id, cancel_action(actor, reason), now).await?;
    tx.commit().await?;
    Ok(Some(from))
}

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
    sqlx::query("SET LOCAL payouts.reconcile = 'on'")
        .execute(&mut *tx)
        .await?;
    let row: Option<i64> = sqlx::query_scalar(
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
    )
    .bind(id)
    .bind(seen_status.as_str())
    .bind(seen_attempt)
    .bind(to.as_str())
    .bind(transfer_id)
    .bind(actor)
    .bind(now)
    .bind(reason)
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
    sqlx::query_as(
        "SELECT * FROM payouts
         WHERE updated_at >= $1 AND id > $2 AND status <> 'pending'
         ORDER BY id LIMIT $3",
    )
    .bind(since)
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

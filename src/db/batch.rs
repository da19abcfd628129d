//! Group commit for the worker's hot path. Concurrent jobs' claims go to
//! Postgres as one statement, and so do their final writes: whatever has
//! queued up while the previous statement ran forms the next batch, so a busy
//! worker makes a few commits per batch instead of two per payout, and an idle
//! one adds no delay. Rows are locked in id order, so batches from different
//! workers cannot deadlock one another.
//!
//! The statements are the batched forms of [`payouts::claim`] and
//! [`payouts::finish`], with the same conditions: the claim's returned
//! attempt is the fencing token, and a final write applies only to a payout
//! still `processing` under that token.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::payouts::{self, Claimed, Finish};

struct ClaimReq {
    id: i64,
    owner: String,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    reply: oneshot::Sender<Result<Option<Claimed>, String>>,
}

struct FinishReq {
    id: i64,
    token: i32,
    outcome: Finish,
    extras: FinishExtras,
    actor: String,
    reason: String,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<bool, String>>,
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

/// Batches claims and final writes of one worker process.
#[derive(Debug, Clone)]
pub struct Batcher {
    claims: mpsc::Sender<ClaimReq>,
    finishes: mpsc::Sender<FinishReq>,
}

/// A batched statement failed (the whole batch shares the error).
#[derive(Debug, Clone, thiserror::Error)]
#[error("batched write failed: {0}")]
pub struct BatchError(pub String);

const CLAIM_BATCH: &str = "
    WITH input AS (
        SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[])
            AS t(id, owner, now, lease_until)),
    prev AS (
        SELECT p.id, p.status FROM payouts p JOIN input i ON i.id = p.id
        ORDER BY p.id FOR UPDATE OF p),
    upd AS (
        UPDATE payouts p SET status = 'processing', attempt = p.attempt + 1,
            lease_owner = i.owner, lease_until = i.lease_until, updated_at = i.now
        FROM prev, input i
        WHERE p.id = prev.id AND i.id = p.id
          AND (prev.status = 'queued' OR (prev.status = 'processing' AND p.lease_until < i.now))
        RETURNING p.*, prev.status AS from_status, i.owner AS claim_owner, i.now AS claim_now),
    ev AS (
        INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
        SELECT id, from_status, 'processing', claim_owner, 'claimed', attempt, claim_now FROM upd)
    SELECT upd.*, payees.gateway_account FROM upd JOIN payees ON payees.id = upd.payee_id";

const FINISH_BATCH: &str = "
    WITH input AS (
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
    RETURNING payout_id, attempt";

impl Batcher {
    /// Starts the two batching loops on `pool`; at most `max_batch` rows per statement.
    pub fn spawn(pool: PgPool, max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        let (claims, mut claim_rx) = mpsc::channel::<ClaimReq>(4096);
        let (finishes, mut finish_rx) = mpsc::channel::<FinishReq>(4096);
        let p = pool.clone();
        tokio::spawn(async move {
            while let Some(batch) = next_batch(&mut claim_rx, max_batch).await {
                run_claims(&p, batch).await;
            }
        });
        tokio::spawn(async move {
            while let Some(batch) = next_batch(&mut finish_rx, max_batch).await {
                run_finishes(&pool, batch).await;
            }
        });
        Batcher { claims, finishes }
    }

    /// [`payouts::claim`], batched with whatever else is claiming.
    pub async fn claim(
        &self,
        id: i64,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Claimed>, BatchError> {
        let (reply, rx) = oneshot::channel();
        let req = ClaimReq {
            id,
            owner: owner.to_string(),
            now,
            lease_until,
            reply,
        };
        self.claims
            .send(req)
            .await
            .map_err(|_| BatchError("batcher stopped".into()))?;
        rx.await
            .map_err(|_| BatchError("batcher stopped".into()))?
            .map_err(BatchError)
    }

    /// [`payouts::finish`], batched with whatever else is finishing.
    pub async fn finish(
        &self,
        id: i64,
        token: i32,
        outcome: &Finish,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, BatchError> {
        self.finish_with(
            id,
            token,
            outcome,
            FinishExtras::default(),
            actor,
            reason,
            now,
        )
        .await
    }

    /// [`Batcher::finish`] that also stores `extras` (the worker's).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_with(
        &self,
        id: i64,
        token: i32,
        outcome: &Finish,
        extras: FinishExtras,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, BatchError> {
        let (reply, rx) = oneshot::channel();
        let req = FinishReq {
            id,
            token,
            outcome: outcome.clone(),
            extras,
            actor: actor.to_string(),
            reason: reason.to_string(),
            now,
            reply,
        };
        self.finishes
            .send(req)
            .await
            .map_err(|_| BatchError("batcher stopped".into()))?;
        rx.await
            .map_err(|_| BatchError("batcher stopped".into()))?
            .map_err(BatchError)
    }
}

/// Waits for one request, then takes whatever else is already waiting, up to
/// `max`: no added delay when idle, large batches when busy. `None` once closed.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().await?];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn run_claims(pool: &PgPool, mut batch: Vec<ClaimReq>) {
    // One claim per payout per batch: a duplicate delivery in the same batch is not claimable.
    batch.sort_by_key(|r| r.id);
    let mut unique: Vec<ClaimReq> = Vec::with_capacity(batch.len());
    for r in batch {
        if unique.last().is_some_and(|u| u.id == r.id) {
            let _ = r.reply.send(Ok(None));
        } else {
            unique.push(r);
        }
    }
    let ids: Vec<i64> = unique.iter().map(|r| r.id).collect();
    let owners: Vec<&str> = unique.iter().map(|r| r.owner.as_str()).collect();
    // A claim that fails because the connection broke (Postgres restarted,
    // a failover to a standby) is tried again on a fresh connection for up
    // to about ten seconds, its times moved on by the wait: given up at
    // once, the payout would sit `queued` until the sweep takes it back
    // (`producer.queue_lease_secs`, a minute by default). Retrying is safe:
    // if the lost try did commit, the payout is no longer claimable and the
    // retry claims nothing (the job is skipped; the lease runs out).
    let asked = tokio::time::Instant::now();
    let result = (|| async {
        let waited = chrono::Duration::from_std(asked.elapsed()).unwrap_or_default();
        let nows: Vec<DateTime<Utc>> = unique.iter().map(|r| r.now + waited).collect();
        let leases: Vec<DateTime<Utc>> = unique.iter().map(|r| r.lease_until + waited).collect();
        sqlx::query_as::<_, Claimed>(CLAIM_BATCH)
            .bind(&ids)
            .bind(&owners)
            .bind(&nows)
            .bind(&leases)
            .fetch_all(pool)
            .await
    })
    .retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(8),
    )
    .when(connection_lost)
    .notify(|e, after| {
        tracing::warn!(error = %e, ?after, "claim failed: connection lost; trying again");
    })
    .await;
    match result {
        Ok(rows) => {
            for r in unique {
                let claimed = rows.iter().find(|c| c.payout.id == r.id).cloned();
                let _ = r.reply.send(Ok(claimed));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for r in unique {
                let _ = r.reply.send(Err(msg.clone()));
            }
        }
    }
}

/// The statement failed because the connection did (reset, closed, EOF):
/// worth one more try on another connection.
fn connection_lost(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_))
}

async fn run_finishes(pool: &PgPool, mut batch: Vec<FinishReq>) {
    // One write per (payout, token) per batch: a repeat under the same token
    // is refused, as a second single statement would be.
    batch.sort_by_key(|r| (r.id, r.token));
    let mut unique: Vec<FinishReq> = Vec::with_capacity(batch.len());
    for r in batch {
        if unique
            .last()
            .is_some_and(|u| (u.id, u.token) == (r.id, r.token))
        {
            let _ = r.reply.send(Ok(false));
        } else {
            unique.push(r);
        }
    }
    let batch = unique;
    let mut ids = Vec::with_capacity(batch.len());
    let mut tokens = Vec::with_capacity(batch.len());
    let mut statuses = Vec::with_capacity(batch.len());
    let mut transfers: Vec<Option<String>> = Vec::with_capacity(batch.len());
    let mut next_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(batch.len());
    let mut codes: Vec<Option<String>> = Vec::with_capacity(batch.len());
    let mut messages: Vec<Option<String>> = Vec::with_capacity(batch.len());
    let mut actors = Vec::with_capacity(batch.len());
    let mut reasons = Vec::with_capacity(batch.len());
    let mut nows = Vec::with_capacity(batch.len());
    let mut key_indexes = Vec::with_capacity(batch.len());
    let mut refunds = Vec::with_capacity(batch.len());
    for r in &batch {
        key_indexes.push(r.extras.key_index);
        refunds.push(r.extras.refund_attempt);
        let cols = payouts::finish_columns(&r.outcome);
        ids.push(r.id);
        tokens.push(r.token);
        statuses.push(r.outcome.status().as_str());
        transfers.push(cols.transfer_id);
        next_ats.push(cols.next_attempt_at);
        codes.push(cols.code);
        messages.push(cols.message);
        actors.push(r.actor.as_str());
        reasons.push(r.reason.as_str());
        nows.push(r.now);
    }
    let result: sqlx::Result<Vec<(i64, i32)>> = sqlx::query_as(FINISH_BATCH)
        .bind(&ids)
        .bind(&tokens)
        .bind(&statuses)
        .bind(&transfers)
        .bind(&next_ats)
        .bind(&codes)
        .bind(&messages)
        .bind(&actors)
        .bind(&reasons)
        .bind(&nows)
        .bind(&key_indexes)
        .bind(&refunds)
        .fetch_all(pool)
        .await;
    match result {
        Ok(applied) => {
            for r in batch {
                // Matched by payout *and* token: of two writes for one payout in a
                // batch, only the one under the current token applied.
                let _ = r.reply.send(Ok(applied.contains(&(r.id, r.token))));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for r in batch {
                let _ = r.reply.send(Err(msg.clone()));
            }
        }
    }
}

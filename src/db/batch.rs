//! Group commit for the worker's hot path. Concurrent jobs' claims go to
//! Postgres as one statement, and so do their final writes: whatever has
//! queued up while the previous statement ran forms the next batch, so a busy
//! worker makes a few commits per batch instead of two per payout, and an idle
//! one adds no delay. Rows are locked in id order, so batches from different
//! workers cannot deadlock one another.
//!
//! The statements are the payouts repository's [`payouts::claim_many`] and
//! [`payouts::finish_many`] ([`payouts::claim`] and [`payouts::finish`] are
//! the same statements with one row): the claim's returned attempt is the
//! fencing token, and a final write applies only to a payout still
//! `processing` under that token. This module only groups requests.

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

pub use super::payouts::FinishExtras;
use super::payouts::{self, ClaimRequest, Claimed, Finish, FinishRequest};
use crate::domain::PayoutId;

struct ClaimReq {
    claim: ClaimRequest,
    reply: oneshot::Sender<Result<Option<Claimed>, BatchError>>,
}

struct FinishReq {
    write: FinishRequest,
    reply: oneshot::Sender<Result<bool, BatchError>>,
}

/// Batches claims and final writes of one worker process.
#[derive(Debug, Clone)]
pub struct Batcher {
    claims: mpsc::Sender<ClaimReq>,
    finishes: mpsc::Sender<FinishReq>,
}

/// Why a batched claim or final write gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The batching loop is gone (the process is stopping).
    #[error("batched write failed: batcher stopped")]
    Stopped,
    /// The shared statement failed: every request of the batch gets its error.
    #[error("batched write failed: {0}")]
    Statement(Arc<sqlx::Error>),
}

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
        id: PayoutId,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Claimed>, BatchError> {
        let (reply, rx) = oneshot::channel();
        let req = ClaimReq {
            claim: ClaimRequest {
                id,
                owner: owner.to_string(),
                now,
                lease_until,
            },
            reply,
        };
        self.claims
            .send(req)
            .await
            .map_err(|_| BatchError::Stopped)?;
        rx.await.map_err(|_| BatchError::Stopped)?
    }

    /// [`payouts::finish`], batched with whatever else is finishing.
    pub async fn finish(
        &self,
        id: PayoutId,
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
        id: PayoutId,
        token: i32,
        outcome: &Finish,
        extras: FinishExtras,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, BatchError> {
        let (reply, rx) = oneshot::channel();
        let req = FinishReq {
            write: FinishRequest {
                id,
                token,
                outcome: outcome.clone(),
                extras,
                actor: actor.to_string(),
                reason: reason.to_string(),
                now,
            },
            reply,
        };
        self.finishes
            .send(req)
            .await
            .map_err(|_| BatchError::Stopped)?;
        rx.await.map_err(|_| BatchError::Stopped)?
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
    batch.sort_by_key(|r| r.claim.id);
    let mut unique: Vec<ClaimReq> = Vec::with_capacity(batch.len());
    for r in batch {
        if unique.last().is_some_and(|u| u.claim.id == r.claim.id) {
            let _ = r.reply.send(Ok(None));
        } else {
            unique.push(r);
        }
    }
    let (claims, replies): (Vec<ClaimRequest>, Vec<_>) =
        unique.into_iter().map(|r| (r.claim, r.reply)).unzip();
    // A claim that fails because the connection broke (Postgres restarted,
    // a failover to a standby) is tried again on a fresh connection for up
    // to about ten seconds, its times moved on by the wait: given up at
    // once, the payout would sit `queued` until the sweep takes it back
    // (`producer.queue_lease_secs`, a minute by default). Retrying is safe:
    // if the lost try did commit, the payout is no longer claimable and the
    // retry claims nothing (the job is skipped; the lease runs out).
    // The first try claims at the requested times exactly.
    let asked = tokio::time::Instant::now();
    let tries = std::sync::atomic::AtomicU32::new(0);
    let result = (|| async {
        let waited = if tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
            chrono::Duration::zero()
        } else {
            chrono::Duration::from_std(asked.elapsed()).unwrap_or_default()
        };
        let moved: Vec<ClaimRequest> = claims
            .iter()
            .map(|c| ClaimRequest {
                now: c.now + waited,
                lease_until: c.lease_until + waited,
                ..c.clone()
            })
            .collect();
        payouts::claim_many(pool, &moved).await
    })
    .retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(8),
    )
    .when(connection_lost)
    .notify(|e, after| {
        tracing::warn!(error = %format_args!("{e:#}"), ?after, "claim failed: connection lost; trying again");
    })
    .await;
    match result {
        Ok(rows) => {
            for (c, reply) in claims.iter().zip(replies) {
                let claimed = rows.iter().find(|r| r.payout.id == c.id).cloned();
                let _ = reply.send(Ok(claimed));
            }
        }
        Err(e) => {
            let e = BatchError::Statement(Arc::new(e));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
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
    batch.sort_by_key(|r| (r.write.id, r.write.token));
    let mut unique: Vec<FinishReq> = Vec::with_capacity(batch.len());
    for r in batch {
        if unique
            .last()
            .is_some_and(|u| (u.write.id, u.write.token) == (r.write.id, r.write.token))
        {
            let _ = r.reply.send(Ok(false));
        } else {
            unique.push(r);
        }
    }
    let (writes, replies): (Vec<FinishRequest>, Vec<_>) =
        unique.into_iter().map(|r| (r.write, r.reply)).unzip();
    match payouts::finish_many(pool, &writes).await {
        Ok(applied) => {
            for (w, reply) in writes.iter().zip(replies) {
                // Matched by payout *and* token: of two writes for one payout in a
                // batch, only the one under the current token applied.
                let _ = reply.send(Ok(applied.contains(&(w.id, w.token))));
            }
        }
        Err(e) => {
            let e = BatchError::Statement(Arc::new(e));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

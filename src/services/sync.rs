//! Resolving payouts the gateway accepted but has not finished: `in_transit`
//! becomes `paid` or `failed` when the gateway says so, by webhook
//! (`crate::admin::webhooks`) or, where no webhook comes, by the poll here, which
//! looks every payout `in_transit` for longer than
//! `gateway.sync.min_age_secs` up at the gateway (`Lookup::lookup`) on a
//! schedule (`gateway.sync.interval_secs`).
//!
//! Every change is one fenced statement with its `payout_events` row
//! ([`resolve`]): it changes nothing unless the payout is still in the status
//! (and, for the poll, under the attempt) it was read in. A failure reported
//! after a payout was recorded `paid` (a reversed transfer, a bank payout that
//! failed days later) moves it `paid -> failed` with an event, an error log
//! and the `payout_failed_after_paid_total` counter: never silently.
//!
//! The same poll releases payouts `held` because the payee could not receive
//! money yet (`account_not_onboarded`: Stripe onboarding not finished): once
//! the gateway reports the account ready ([`AccountCheck`]), they go back to
//! `queued` with a fresh attempt budget and an expired lease,
//! so the producer's sweep enqueues them ([`InTransitSync::release_onboarded`]).
//! Stripe's `account.updated` webhook does the same at once
//! ([`release_account`], from `crate::admin::webhooks`); the poll is the fallback.

use std::sync::{
    Arc, LazyLock,
    atomic::{AtomicI64, Ordering},
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::{
    clock::SharedClock,
    config::SyncSettings,
    db::payouts::{self, InTransit},
    domain::{
        PayoutId, PayoutStatus,
        transfer::{idempotency_key, verdict},
    },
    gateway::{AccountCheck, Lookup, NOT_ONBOARDED},
    metrics::{FAILED_AFTER_PAID, RESOLVED},
};

pub use crate::db::payouts::Resolution;

/// Records `r` with its event, fenced on its status (and attempt)
/// ([`crate::db::payouts::resolve`]); `true` when written. `paid -> failed`
/// also logs an alert and counts `payout_failed_after_paid_total`.
pub async fn resolve(conn: &mut PgConnection, r: &Resolution<'_>) -> sqlx::Result<bool> {
    let written = payouts::resolve(conn, r).await?;
    if written && r.from == PayoutStatus::Paid && r.to == PayoutStatus::Failed {
        FAILED_AFTER_PAID.inc();
        tracing::error!(
            payout_id = r.payout_id,
            code = r.code.unwrap_or_default(),
            reason = r.reason,
            alert = true,
            "payout recorded paid was failed by the gateway afterwards: money came back or never arrived"
        );
    }
    Ok(written)
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// Payouts looked up.
    pub looked_up: usize,
    /// Recorded paid.
    pub paid: usize,
    /// Recorded failed.
    pub failed: usize,
    /// The gateway still has them in flight (or does not know them yet).
    pub still_in_transit: usize,
    /// The gateway could not be asked.
    pub lookup_failed: usize,
    /// Changed by someone else (a webhook, an operator) between read and write.
    pub fenced_out: usize,
}

/// Puts every payout of `account` held for onboarding ([`NOT_ONBOARDED`];
/// not one reconciliation held, `returned_paid_at_gateway`) back to `queued` (fresh attempt
/// budget, lease already expired so the producer's sweep enqueues it), with
/// an event by `actor`; their ids. The poll calls it once the gateway reports
/// the account ready, the webhook on Stripe's `account.updated` at once.
pub async fn release_account(
    conn: &mut PgConnection,
    account: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<i64>> {
    let ids = payouts::release_held(conn, account, NOT_ONBOARDED, actor, now).await?;
    if !ids.is_empty() {
        tracing::info!(payouts = ids.len(), "payee onboarded: payouts released");
    }
    Ok(ids)
}

/// The in-transit poll.
#[derive(Debug)]
pub struct InTransitSync {
    /// The source of truth.
    pub pool: PgPool,
    /// The gateway to ask.
    pub gateway: Arc<dyn Lookup>,
    /// Time.
    pub clock: SharedClock,
    /// Interval, minimum age, batch.
    pub settings: SyncSettings,
    /// Written as the events' actor (`sync:<host>`).
    pub actor: String,
    /// Releases `account_not_onboarded` payouts once their account is ready (Stripe).
    pub accounts: Option<Arc<dyn AccountCheck>>,
    /// Where the last poll stopped (payout id), so a long backlog is walked in turn.
    cursor: AtomicI64,
    /// Where the last onboarding check stopped (gateway account), likewise:
    /// accounts still onboarding never starve the ones after them.
    account_cursor: std::sync::Mutex<String>,
}

impl InTransitSync {
    /// A poll over `pool` asking `gateway`.
    pub fn new(
        pool: PgPool,
        gateway: Arc<dyn Lookup>,
        clock: SharedClock,
        settings: SyncSettings,
        actor: impl Into<String>,
    ) -> Self {
        LazyLock::force(&FAILED_AFTER_PAID);
        LazyLock::force(&RESOLVED);
        InTransitSync {
            pool,
            gateway,
            clock,
            settings,
            actor: actor.into(),
            accounts: None,
            cursor: AtomicI64::new(0),
            account_cursor: std::sync::Mutex::new(String::new()),
        }
    }

    /// With an onboarding check (see [`crate::gateway::select::account_check`]).
    pub fn with_accounts(mut self, accounts: Option<Arc<dyn AccountCheck>>) -> Self {
        self.accounts = accounts;
        self
    }

    /// Puts `held` payouts (`account_not_onboarded`) whose account is now ready back
    /// to `queued` (fresh attempt budget, lease already expired so the sweep
    /// enqueues them), with an event; returns how many. Up to `batch` accounts.
    pub async fn release_onboarded(&self) -> sqlx::Result<usize> {
        let Some(check) = &self.accounts else {
            return Ok(0);
        };
        let after = self.account_cursor.lock().expect("not poisoned").clone();
        let accounts =
            payouts::held_accounts(&self.pool, NOT_ONBOARDED, &after, self.settings.batch).await?;
        // A short page means the end: start from the first account next time.
        *self.account_cursor.lock().expect("not poisoned") =
            if (accounts.len() as i64) < self.settings.batch {
                String::new()
            } else {
                accounts.last().cloned().unwrap_or_default()
            };
        let mut released = 0;
        for account in accounts {
            match check.account_ready(&account).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %format_args!("{e:#}"), "onboarding check failed; next time");
                    continue;
                }
            }
            let mut conn = self.pool.acquire().await?;
            let ids = release_account(&mut conn, &account, &self.actor, self.clock.now()).await?;
            released += ids.len();
        }
        Ok(released)
    }

    /// One poll: up to `batch` payouts `in_transit` for at least `min_age_secs`.
    pub async fn run_once(&self) -> sqlx::Result<SyncReport> {
        let now = self.clock.now();
        let cutoff = now - chrono::Duration::seconds(self.settings.min_age_secs as i64);
        let after = self.cursor.load(Ordering::Relaxed);
        let rows =
            payouts::in_transit_before(&self.pool, cutoff, after, self.settings.batch).await?;
        let next = if (rows.len() as i64) < self.settings.batch {
            0
        } else {
            rows.last().map_or(0, |r| r.id)
        };
        self.cursor.store(next, Ordering::Relaxed);

        let mut report = SyncReport::default();
        for InTransit {
            id,
            attempt,
            gateway_transfer_id: transfer_id,
        } in rows
        {
            report.looked_up += 1;
            let records = match self
                .gateway
                .lookup(&idempotency_key(PayoutId::new(id)))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    report.lookup_failed += 1;
                    tracing::warn!(payout_id = id, error = %format_args!("{e:#}"), "in-transit look-up failed");
                    continue;
                }
            };
            let record = records
                .iter()
                .find(|r| Some(&r.id) == transfer_id.as_ref())
                .or_else(|| records.first());
            let Some((record, to)) = record.and_then(|r| verdict(&r.status).map(|to| (r, to)))
            else {
                report.still_in_transit += 1;
                continue;
            };
            let reason = format!("poll: gateway reports {} {}", record.id, record.status);
            let code = format!("gateway_{}", record.status);
            let res = Resolution {
                payout_id: id,
                from: PayoutStatus::InTransit,
                attempt: Some(attempt),
                to,
                transfer_id: Some(&record.id),
                code: (to == PayoutStatus::Failed).then_some(code.as_str()),
                message: (to == PayoutStatus::Failed).then_some(reason.as_str()),
                actor: &self.actor,
                reason: &reason,
                now: self.clock.now(),
            };
            let mut conn = self.pool.acquire().await?;
            if resolve(&mut conn, &res).await? {
                RESOLVED.with_label_values(&["poll", to.as_str()]).inc();
                if to == PayoutStatus::Paid {
                    count_paid_payout(&self.pool, id).await;
                    report.paid += 1;
                } else {
                    report.failed += 1;
                }
            } else {
                report.fenced_out += 1;
            }
        }
        Ok(report)
    }
}

/// `payout_paid_minor_units_total` for payout `id`, read back through its
/// repository after the write that recorded it `paid` committed (the
/// in-transit poll and the webhooks, whose statements do not return the
/// amount). A failed read is logged, not counted.
pub(crate) async fn count_paid_payout(pool: &PgPool, id: i64) {
    match payouts::get(pool, PayoutId::new(id)).await {
        Ok(Some(p)) => crate::metrics::count_paid(p.amount, &p.currency),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(payout_id = id, error = %format!("{e:#}"), "paid amount not counted in payout_paid_minor_units_total")
        }
    }
}

//! Reconciliation: compares what Postgres says with what the gateway says,
//! payout by payout (look-up by reference, per the contract), and reports
//! every disagreement. With `fix`, it records what the gateway says happened
//! when the gateway moved money the database does not know about; it never
//! "fixes" anything by paying again.
//!
//! The gateway asked is the configured one (`gateway.kind`, through
//! [`crate::gateway::select`]). A run in which every look-up failed, or that
//! could not look anything up at all, compared nothing: it is recorded as
//! failed ([`Report::failed`]) and does not count as a reconciliation, so the
//! last-run timestamp (and `PayoutReconcileStale`) keeps the last run that did.
//!
//! A settlement payout that is cancelled (or reversed) returns its money to
//! the payee's balance, which the next period pays. Two things keep that
//! money from being paid twice when the gateway did move it after all (an
//! attempt whose answer was lost, a timeout, a 5xx):
//! - [`cancel`], the one operator cancel (admin API, dashboard, `payoutctl`),
//!   asks the gateway first when the payout was sent and no answer proved
//!   that nothing moved; it refuses (and records the transfer) when the
//!   gateway holds one, and refuses when the gateway cannot be asked;
//! - reconciliation reports a returned payout the gateway paid as
//!   [`MismatchKind::ReturnedPaidAtGateway`] (alert
//!   `PayoutReturnedBalancePaidAtGateway`), never records it paid, and holds
//!   the payout that carries (or will carry) the returned balance, if it has
//!   not been sent (`failure_code = returned_paid_at_gateway`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::{StreamExt, stream};
use serde::Serialize;
use sqlx::PgPool;

use crate::{
    db::{
        payouts::{self, Payout},
        reconcile_runs::{self, NewRun},
        settlements,
    },
    domain::{
        Currency, Money, PayoutId, PayoutStatus,
        transfer::{idempotency_key, verdict},
    },
    gateway::{Lookup, TransferRecord},
    metrics,
};

pub use crate::domain::mismatch::MismatchKind;
pub use crate::services::settlement::Progress;

/// One disagreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The payout.
    pub payout_id: i64,
    /// What disagrees.
    pub kind: MismatchKind,
    /// In words.
    pub detail: String,
    /// Whether `--fix` recorded the gateway's word.
    pub fixed: bool,
}

/// What a run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Payouts compared.
    pub checked: usize,
    /// Skipped because a worker holds them right now.
    pub in_flight: usize,
    /// Every disagreement.
    pub mismatches: Vec<Mismatch>,
    /// Look-ups that got no answer.
    pub lookup_failed: usize,
    /// Why the run compared nothing (every look-up failed, or the gateway
    /// cannot look up at all); `None` for a run that counts.
    pub failed: Option<String>,
}

impl Report {
    /// Disagreements by kind.
    pub fn counts(&self) -> BTreeMap<MismatchKind, usize> {
        let mut m = BTreeMap::new();
        for x in &self.mismatches {
            *m.entry(x.kind).or_insert(0) += 1;
        }
        m
    }

    /// Disagreements about money (every kind but a failed look-up) that
    /// `--fix` did not settle.
    pub fn open_money_mismatches(&self) -> usize {
        self.mismatches
            .iter()
            .filter(|m| !m.fixed && m.kind != MismatchKind::LookupFailed)
            .count()
    }
}

/// What to compare and whether to fix.
#[derive(Debug, Clone)]
pub struct Options {
    /// Payouts changed since then.
    pub since: DateTime<Utc>,
    /// Record the gateway's word where it moved money the database does not know of.
    pub fix: bool,
    /// Look-ups in flight at once.
    pub concurrency: usize,
    /// Event actor for fixes.
    pub actor: String,
}

fn minor_units(p: &Payout) -> Option<i64> {
    let currency: Currency = p.currency.parse().ok()?;
    Money::new(p.amount, currency).ok()?.to_minor_units().ok()
}

/// Whether a transfer record means money moved or is moving: anything the
/// gateway does not call failed (or reversed, canceled, returned; read the
/// same way as the in-transit poll, [`crate::services::sync::verdict`]).
fn money_moved(t: &TransferRecord) -> bool {
    verdict(&t.status) != Some(PayoutStatus::Failed)
}

/// Compares one payout with the gateway's transfers for it; `returned`: its
/// money went back to the payee's balance (its settlement is `returned`).
pub fn compare(
    p: &Payout,
    transfers: &[TransferRecord],
    returned: bool,
    now: DateTime<Utc>,
) -> Vec<(MismatchKind, String)> {
    let mut out = Vec::new();
    let moved: Vec<&TransferRecord> = transfers.iter().filter(|t| money_moved(t)).collect();
    if moved.len() > 1 {
        let ids: Vec<&str> = moved.iter().map(|t| t.id.as_str()).collect();
        out.push((
            MismatchKind::DuplicateAtGateway,
            format!(
                "{} transfers for one payout: {}",
                moved.len(),
                ids.join(", ")
            ),
        ));
    }
    let in_flight = p.status == PayoutStatus::Processing && p.lease_until.is_some_and(|l| l > now);
    match moved.first() {
        Some(t) => {
            if minor_units(p) != Some(t.amount_minor) || p.currency != t.currency {
                out.push((
                    MismatchKind::AmountMismatch,
                    format!(
                        "database {} {}, gateway {} minor {}",
                        p.amount.normalize(),
                        p.currency,
                        t.amount_minor,
                        t.currency
                    ),
                ));
            }
            let db_moved = matches!(p.status, PayoutStatus::Paid | PayoutStatus::InTransit);
            if !db_moved && !in_flight && returned {
                out.push((
                    MismatchKind::ReturnedPaidAtGateway,
                    format!(
                        "gateway {} {} ({}), database {} and its money returned to the balance",
                        t.status, t.id, t.destination, p.status
                    ),
                ));
            } else if !db_moved && !in_flight {
                out.push((
                    MismatchKind::PaidAtGatewayNotInDb,
                    format!(
                        "gateway {} {} ({}), database {}",
                        t.status, t.id, t.destination, p.status
                    ),
                ));
            } else if db_moved && p.gateway_transfer_id.as_deref() != Some(t.id.as_str()) {
                out.push((
                    MismatchKind::TransferIdMismatch,
                    format!(
                        "database {}, gateway {}",
                        p.gateway_transfer_id.as_deref().unwrap_or("-"),
                        t.id
                    ),
                ));
            }
        }
        None if p.status == PayoutStatus::Paid => {
            if transfers.iter().any(|t| !money_moved(t)) {
                out.push((
                    MismatchKind::FailedAtGatewayPaidInDb,
                    "the gateway says the transfer failed".into(),
                ));
            } else {
                out.push((
                    MismatchKind::PaidInDbUnknownToGateway,
                    "no transfer at the gateway for this payout".into(),
                ));
            }
        }
        None => {}
    }
    out
}

/// Runs one reconciliation.
pub async fn run(
    pool: &PgPool,
    gateway: &dyn Lookup,
    opts: &Options,
    now: DateTime<Utc>,
) -> anyhow::Result<Report> {
    run_with_progress(pool, gateway, opts, now, None).await
}

/// [`run`], telling `progress` after each page of look-ups: (payouts
/// compared, payouts to compare as counted at the start).
pub async fn run_with_progress(
    pool: &PgPool,
    gateway: &dyn Lookup,
    opts: &Options,
    now: DateTime<Utc>,
    progress: Option<Progress<'_>>,
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut after = 0i64;
    let total = match progress {
        Some(_) => payouts::count_for_reconciliation(pool, opts.since).await? as usize,
        None => 0,
    };
    loop {
        let page = payouts::for_reconciliation(pool, opts.since, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.id.get();
        let ids: Vec<i64> = page.iter().map(|p| p.id.get()).collect();
        let returned: std::collections::HashSet<i64> = settlements::returned_among(pool, &ids)
            .await?
            .into_iter()
            .collect();
        let looked: Vec<_> = stream::iter(page)
            .map(|p| async move {
                let found = gateway.lookup(&idempotency_key(p.id)).await;
                (p, found)
            })
            .buffer_unordered(opts.concurrency.max(1))
            .collect()
            .await;
        for (p, found) in looked {
            report.checked += 1;
            let transfers = match found {
                Ok(t) => t,
                Err(e) => {
                    report.lookup_failed += 1;
                    report.mismatches.push(Mismatch {
                        payout_id: p.id.get(),
                        kind: MismatchKind::LookupFailed,
                        detail: e.to_string(),
                        fixed: false,
                    });
                    continue;
                }
            };
            if p.status == PayoutStatus::Processing && p.lease_until.is_some_and(|l| l > now) {
                report.in_flight += 1;
            }
            for (kind, mut detail) in compare(&p, &transfers, returned.contains(&p.id.get()), now) {
                let fixed = if opts.fix && kind == MismatchKind::PaidAtGatewayNotInDb {
                    fix(pool, &p, &transfers, &opts.actor, now).await?
                } else {
                    false
                };
                if kind == MismatchKind::ReturnedPaidAtGateway {
                    // Protective, with or without `fix`: it moves no money.
                    detail.push_str("; ");
                    detail.push_str(&hold_returned(pool, p.id.get(), &opts.actor, now).await?);
                }
                if kind == MismatchKind::DuplicateAtGateway
                    || kind == MismatchKind::PaidInDbUnknownToGateway
                    || kind == MismatchKind::ReturnedPaidAtGateway
                {
                    tracing::error!(payout_id = p.id.get(), kind = kind.label(), %detail, "reconciliation found money out of step");
                }
                report.mismatches.push(Mismatch {
                    payout_id: p.id.get(),
                    kind,
                    detail,
                    fixed,
                });
            }
        }
        if let Some(tell) = progress {
            tell(report.checked, total.max(report.checked));
        }
    }
    if report.checked > 0 && report.lookup_failed == report.checked {
        let first = report
            .mismatches
            .iter()
            .find(|m| m.kind == MismatchKind::LookupFailed)
            .map(|m| m.detail.clone())
            .unwrap_or_default();
        report.failed = Some(format!(
            "every look-up failed ({} of {}): {first}",
            report.lookup_failed, report.checked
        ));
    }
    record(pool, &report, opts, now).await?;
    Ok(report)
}

/// Records a run that could not look anything up (`reason`, e.g. a
/// release-funds API with no look-up endpoint) as failed; it does not count
/// as a reconciliation.
pub async fn record_unavailable(
    pool: &PgPool,
    opts: &Options,
    reason: String,
    now: DateTime<Utc>,
) -> anyhow::Result<Report> {
    let report = Report {
        failed: Some(reason),
        ..Report::default()
    };
    record(pool, &report, opts, now).await?;
    Ok(report)
}

/// Stores the run; the run outlives this process: the leading producer
/// publishes the latest one that counts as gauges (see [`publish_last_run`]).
async fn record(
    pool: &PgPool,
    report: &Report,
    opts: &Options,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let counts = report.counts();
    let mut by_kind = BTreeMap::new();
    for kind in MismatchKind::ALL {
        let n = counts.get(&kind).copied().unwrap_or(0) as i64;
        if report.failed.is_none() {
            metrics::RECONCILE_MISMATCHES
                .with_label_values(&[kind.label()])
                .set(n);
        }
        by_kind.insert(kind.label().to_string(), n);
    }
    if let Some(reason) = &report.failed {
        tracing::error!(%reason, "reconciliation failed: nothing was compared");
    }
    let run = NewRun {
        started_at: now,
        since: opts.since,
        checked: report.checked as i64,
        fixed: report.mismatches.iter().filter(|m| m.fixed).count() as i64,
        mismatches: &by_kind,
        actor: &opts.actor,
        failed: report.failed.as_deref(),
    };
    reconcile_runs::insert(pool, &run).await?;
    Ok(())
}

/// Sets `payout_reconcile_mismatches{kind}` and
/// `payout_reconcile_last_run_timestamp_seconds` from the latest recorded run
/// that compared something (failed runs are skipped; the leading producer
/// calls it with its other gauges). No such run yet: the timestamp stays 0,
/// which the staleness alert reads as "never ran".
pub async fn publish_last_run(pool: &PgPool) -> sqlx::Result<()> {
    let Some((at, counts)) = reconcile_runs::last_counted(pool).await? else {
        return Ok(());
    };
    for kind in MismatchKind::ALL {
        let n = counts.get(kind.label()).copied().unwrap_or(0);
        metrics::RECONCILE_MISMATCHES
            .with_label_values(&[kind.label()])
            .set(n);
    }
    metrics::RECONCILE_LAST_RUN.set(at.timestamp());
    Ok(())
}

/// Failure codes that say an answer was not a refusal: the money may have
/// moved under the payout's key (a lost or 5xx answer on the last attempt).
const UNPROVEN: [&str; 2] = ["attempts_exhausted", "unknown"];

/// Whether a cancel of `p` must ask the gateway first: it was sent (its
/// attempt is above 0) and no answer proved that nothing moved. A `failed` or `held` payout
/// whose code is the gateway's refusal (`account_closed`,
/// `account_not_onboarded`, ...) was refused under its current key, and an
/// earlier key advanced only on proof (DESIGN.md); anything else that was
/// sent (`queued` again, `retrying`, `failed attempts_exhausted`) may have
/// been paid.
pub fn could_have_moved_money(p: &Payout) -> bool {
    p.attempt > 0
        && match p.status {
            PayoutStatus::Failed | PayoutStatus::Held => p
                .failure_code
                .as_deref()
                .is_none_or(|c| UNPROVEN.contains(&c)),
            _ => true,
        }
}

/// Why [`cancel`] refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// Not found, not legal from its status, or the database failed.
    #[error(transparent)]
    Action(#[from] payouts::ActionError),
    /// The gateway holds a transfer for it: the money moved (or is moving).
    #[error(
        "payout {id} was not cancelled: the gateway holds transfer {transfer_id} ({gateway_status}) for it{}",
        .recorded.map(|s| format!("; recorded {s}")).unwrap_or_default()
    )]
    MoneyMoved {
        /// The payout.
        id: i64,
        /// The gateway's transfer.
        transfer_id: String,
        /// Its status at the gateway.
        gateway_status: String,
        /// What was recorded for the payout (`paid`, `in_transit`), if anything.
        recorded: Option<PayoutStatus>,
    },
    /// It was sent, and the gateway could not say whether money moved.
    #[error(
        "payout {id} was not cancelled: it was sent and its answers do not prove that no money moved, \
         and the gateway could not be asked ({reason}); try again when the gateway answers look-ups"
    )]
    Unverified {
        /// The payout.
        id: i64,
        /// Why the look-up gave no answer.
        reason: String,
    },
    /// A worker sent it again while the gateway was being asked.
    #[error("payout {id} was not cancelled: a worker sent it again meanwhile; look again")]
    SentMeanwhile {
        /// The payout.
        id: i64,
    },
}

impl CancelError {
    /// The payout's status now, when the refusal knows it.
    pub fn status(&self) -> Option<PayoutStatus> {
        match self {
            CancelError::Action(payouts::ActionError::Illegal(t)) => Some(t.from),
            CancelError::MoneyMoved { recorded, .. } => *recorded,
            _ => None,
        }
    }
}

/// The operator's cancel, for every path (admin API, dashboard, `payoutctl`):
/// `pending`, `queued`, `retrying`, `failed` or `held` -> `cancelled`, which
/// returns a settlement payout's money to the payee's balance. When the
/// payout was sent and its answers could have moved money
/// ([`could_have_moved_money`]), the gateway (built by `gateway` only then)
/// is asked first by the payout's reference, as reconciliation does: a
/// transfer it holds refuses the cancel and is recorded (`paid`, `in_transit`);
/// a failed look-up refuses it; only "no transfer" cancels. The cancel is
/// fenced on the attempt seen, so a worker that sends it again in between
/// wins. Returns the status it moved from.
pub async fn cancel(
    pool: &PgPool,
    gateway: impl AsyncFnOnce() -> anyhow::Result<std::sync::Arc<dyn Lookup>>,
    payout: PayoutId,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<PayoutStatus, CancelError> {
    let id = payout.get();
    let p = payouts::get(pool, payout)
        .await
        .map_err(payouts::ActionError::Db)?
        .ok_or(payouts::ActionError::NotFound(id))?;
    let mut said = reason.to_string();
    if p.status.can_move_to(PayoutStatus::Cancelled) && could_have_moved_money(&p) {
        let gw = gateway().await.map_err(|e| CancelError::Unverified {
            id,
            reason: format!("{e:#}"),
        })?;
        let transfers =
            gw.lookup(&idempotency_key(payout))
                .await
                .map_err(|e| CancelError::Unverified {
                    id,
                    reason: e.to_string(),
                })?;
        let moved = transfers
            .iter()
            .find(|t| verdict(&t.status) == Some(PayoutStatus::Paid))
            .or_else(|| transfers.iter().find(|t| money_moved(t)));
        if let Some(t) = moved {
            let to = match verdict(&t.status) {
                Some(PayoutStatus::Paid) => PayoutStatus::Paid,
                _ => PayoutStatus::InTransit,
            };
            let why = format!(
                "cancel refused: the gateway holds {} {} for it",
                t.status, t.id
            );
            let recorded = p.status.can_reconcile_to(to)
                && record_gateway_word(pool, &p, to, &t.id, actor, &why, now)
                    .await
                    .map_err(payouts::ActionError::Db)?;
            tracing::warn!(payout_id = id, transfer = %t.id, gateway_status = %t.status, recorded, "cancel refused: the gateway holds a transfer");
            return Err(CancelError::MoneyMoved {
                id,
                transfer_id: t.id.clone(),
                gateway_status: t.status.clone(),
                recorded: recorded.then_some(to),
            });
        }
        said = format!("{reason} (the gateway holds no transfer for it)");
    }
    payouts::cancel_at_attempt(pool, payout, p.attempt, actor, &said, now)
        .await?
        .ok_or(CancelError::SentMeanwhile { id })
}

/// For a returned payout the gateway paid after all: flags its settlement
/// and holds the payout that carries its balance if it has not been sent
/// (pending, queued, retrying); a later carry is held by the database
/// (migration 20261126000070). Says, for the report, what it found.
async fn hold_returned(
    pool: &PgPool,
    payout_id: i64,
    actor: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<String> {
    let why = format!(
        "held: carries the balance returned from payout {payout_id}, which the gateway paid \
         after all (returned_paid_at_gateway); enqueue it only once that money is accounted for"
    );
    let met =
        crate::db::settlements::flag_paid_at_gateway(pool, payout_id, now, actor, &why).await?;
    let carriers: Vec<&(i64, String, bool)> = met.iter().filter(|m| m.0 != payout_id).collect();
    if carriers.is_empty() {
        return Ok("not carried into a payout yet: the payout that carries it will be held".into());
    }
    let said: Vec<String> = carriers
        .iter()
        .map(|(id, status, held)| match (held, status.as_str()) {
            (true, _) => format!("payout {id} carrying it held"),
            (false, "held" | "cancelled") => format!("payout {id} carrying it is {status}"),
            (false, _) => format!("payout {id} carrying it is {status}: PAID TWICE"),
        })
        .collect();
    Ok(said.join("; "))
}

async fn fix(
    pool: &PgPool,
    p: &Payout,
    transfers: &[TransferRecord],
    actor: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let Some(t) = transfers.iter().find(|t| money_moved(t)) else {
        return Ok(false);
    };
    let to = match verdict(&t.status) {
        Some(PayoutStatus::Paid) => PayoutStatus::Paid,
        _ => PayoutStatus::InTransit,
    };
    if !p.status.can_reconcile_to(to) {
        return Ok(false);
    }
    let reason = format!("reconciliation: gateway {} {}", t.status, t.id);
    Ok(record_gateway_word(pool, p, to, &t.id, actor, &reason, now).await?)
}

/// Records `p` as the gateway says (`paid` or `in_transit`, transfer
/// `transfer_id`), fenced on the status and attempt seen; a `paid` that
/// changed the row counts its amount in `payout_paid_minor_units_total`, as
/// the worker's, the poll's and the webhooks' writes do (an `in_transit` is
/// counted when it resolves). Whether the row changed.
#[allow(clippy::too_many_arguments)]
async fn record_gateway_word(
    pool: &PgPool,
    p: &Payout,
    to: PayoutStatus,
    transfer_id: &str,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let changed = payouts::reconcile_to(
        pool,
        p.id.get(),
        p.status,
        p.attempt,
        to,
        transfer_id,
        actor,
        reason,
        now,
    )
    .await?;
    if changed && to == PayoutStatus::Paid {
        metrics::count_paid(p.amount, &p.currency);
    }
    Ok(changed)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use chrono::Utc;
    use rust_decimal::Decimal;

    use super::*;

    fn payout(status: PayoutStatus) -> Payout {
        let now = Utc::now();
        Payout {
            id: PayoutId::new(7),
            payee_id: crate::domain::PayeeId::new(1),
            amount: Decimal::new(1000, 2),
            currency: "USD".into(),
            status,
            due_at: now,
            attempt: 1,
            retry_base: 0,
            next_attempt_at: None,
            lease_owner: None,
            lease_until: None,
            gateway_transfer_id: None,
            failure_code: Some("account_closed".into()),
            failure_message: None,
            created_at: now,
            updated_at: now,
            paid_at: None,
        }
    }

    fn record(status: &str) -> TransferRecord {
        TransferRecord {
            id: "tr_1".into(),
            status: status.into(),
            amount_minor: 1000,
            currency: "USD".into(),
            destination: "acct_1".into(),
            reference: "payout_7".into(),
        }
    }

    #[test]
    fn reversed_canceled_or_returned_transfers_are_not_money_moved() {
        let failed = payout(PayoutStatus::Failed);
        for status in ["failed", "reversed", "canceled", "cancelled", "returned"] {
            assert_eq!(
                compare(&failed, &[record(status)], false, Utc::now()),
                [],
                "{status}"
            );
        }
        let kinds: Vec<_> = compare(&failed, &[record("pending")], false, Utc::now())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, [MismatchKind::PaidAtGatewayNotInDb]);
    }

    #[test]
    fn a_returned_payout_paid_at_the_gateway_is_its_own_kind() {
        let cancelled = payout(PayoutStatus::Cancelled);
        let kinds: Vec<_> = compare(&cancelled, &[record("paid")], true, Utc::now())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, [MismatchKind::ReturnedPaidAtGateway]);
        assert_eq!(
            compare(&cancelled, &[record("reversed")], true, Utc::now()),
            []
        );
    }

    #[test]
    fn only_a_payout_sent_without_a_refusal_needs_the_gateway_before_a_cancel() {
        let mut p = payout(PayoutStatus::Retrying);
        p.failure_code = Some("http_503".into());
        assert!(could_have_moved_money(&p));
        p.attempt = 0;
        assert!(!could_have_moved_money(&p), "never sent");
        let mut p = payout(PayoutStatus::Failed);
        assert!(!could_have_moved_money(&p), "account_closed is a refusal");
        p.failure_code = Some("attempts_exhausted".into());
        assert!(could_have_moved_money(&p));
        p.status = PayoutStatus::Queued;
        p.failure_code = None;
        assert!(could_have_moved_money(&p), "sent before, answer unknown");
    }
}

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

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::{StreamExt, stream};
use serde::Serialize;
use sqlx::PgPool;

use crate::{
    db::payouts::{self, Payout},
    domain::{Currency, Money, PayoutStatus},
    gateway::{Gateway, TransferRecord},
    metrics,
};

/// A kind of disagreement (also the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// The gateway paid (or accepted) it; the database does not say so. Fixable.
    PaidAtGatewayNotInDb,
    /// The database says paid; the gateway has no transfer. Alert; never fixed by paying.
    PaidInDbUnknownToGateway,
    /// The database says paid; the gateway says the transfer failed.
    FailedAtGatewayPaidInDb,
    /// Amount or currency differ.
    AmountMismatch,
    /// The transfer ids differ.
    TransferIdMismatch,
    /// The gateway holds more than one transfer for one payout: paid twice.
    DuplicateAtGateway,
    /// The gateway could not be asked.
    LookupFailed,
}

impl MismatchKind {
    /// Every kind.
    pub const ALL: [MismatchKind; 7] = [
        MismatchKind::PaidAtGatewayNotInDb,
        MismatchKind::PaidInDbUnknownToGateway,
        MismatchKind::FailedAtGatewayPaidInDb,
        MismatchKind::AmountMismatch,
        MismatchKind::TransferIdMismatch,
        MismatchKind::DuplicateAtGateway,
        MismatchKind::LookupFailed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MismatchKind::PaidAtGatewayNotInDb => "paid_at_gateway_not_in_db",
            MismatchKind::PaidInDbUnknownToGateway => "paid_in_db_unknown_to_gateway",
            MismatchKind::FailedAtGatewayPaidInDb => "failed_at_gateway_paid_in_db",
            MismatchKind::AmountMismatch => "amount_mismatch",
            MismatchKind::TransferIdMismatch => "transfer_id_mismatch",
            MismatchKind::DuplicateAtGateway => "duplicate_at_gateway",
            MismatchKind::LookupFailed => "lookup_failed",
        }
    }
}

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
/// same way as the in-transit poll, [`crate::sync::verdict`]).
fn money_moved(t: &TransferRecord) -> bool {
    crate::sync::verdict(t) != Some(PayoutStatus::Failed)
}

/// Compares one payout with the gateway's transfers for it.
pub fn compare(
    p: &Payout,
    transfers: &[TransferRecord],
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
            if !db_moved && !in_flight {
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
    gateway: &dyn Gateway,
    opts: &Options,
    now: DateTime<Utc>,
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut after = 0i64;
    loop {
        let page = payouts::for_reconciliation(pool, opts.since, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let looked: Vec<_> = stream::iter(page)
            .map(|p| async move {
                let found = gateway.lookup(&payouts::idempotency_key(p.id)).await;
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
                        payout_id: p.id,
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
            for (kind, detail) in compare(&p, &transfers, now) {
                let fixed = if opts.fix && kind == MismatchKind::PaidAtGatewayNotInDb {
                    fix(pool, &p, &transfers, &opts.actor, now).await?
                } else {
                    false
                };
                if kind == MismatchKind::DuplicateAtGateway
                    || kind == MismatchKind::PaidInDbUnknownToGateway
                {
                    tracing::error!(payout_id = p.id, kind = kind.label(), %detail, "reconciliation found money out of step");
                }
                report.mismatches.push(Mismatch {
                    payout_id: p.id,
                    kind,
                    detail,
                    fixed,
                });
            }
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
    let mut by_kind = serde_json::Map::new();
    for kind in MismatchKind::ALL {
        let n = counts.get(&kind).copied().unwrap_or(0) as i64;
        if report.failed.is_none() {
            metrics::RECONCILE_MISMATCHES
                .with_label_values(&[kind.label()])
                .set(n);
        }
        by_kind.insert(kind.label().to_string(), n.into());
    }
    if let Some(reason) = &report.failed {
        tracing::error!(%reason, "reconciliation failed: nothing was compared");
    }
    sqlx::query(
        "INSERT INTO reconcile_runs (started_at, finished_at, since, checked, fixed, mismatches, actor, failed, error)
         VALUES ($1, now(), $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(now)
    .bind(opts.since)
    .bind(report.checked as i64)
    .bind(report.mismatches.iter().filter(|m| m.fixed).count() as i64)
    .bind(serde_json::Value::Object(by_kind))
    .bind(&opts.actor)
    .bind(report.failed.is_some())
    .bind(report.failed.as_deref())
    .execute(pool)
    .await?;
    Ok(())
}

/// Sets `payout_reconcile_mismatches{kind}` and
/// `payout_reconcile_last_run_timestamp_seconds` from the latest recorded run
/// that compared something (failed runs are skipped; the leading producer
/// calls it with its other gauges). No such run yet: the timestamp stays 0,
/// which the staleness alert reads as "never ran".
pub async fn publish_last_run(pool: &PgPool) -> sqlx::Result<()> {
    let last: Option<(DateTime<Utc>, serde_json::Value)> = sqlx::query_as(
        "SELECT finished_at, mismatches FROM reconcile_runs WHERE NOT failed ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let Some((at, counts)) = last else {
        return Ok(());
    };
    for kind in MismatchKind::ALL {
        let n = counts[kind.label()].as_i64().unwrap_or(0);
        metrics::RECONCILE_MISMATCHES
            .with_label_values(&[kind.label()])
            .set(n);
    }
    metrics::RECONCILE_LAST_RUN.set(at.timestamp());
    Ok(())
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
    let to = match crate::sync::verdict(t) {
        Some(PayoutStatus::Paid) => PayoutStatus::Paid,
        _ => PayoutStatus::InTransit,
    };
    if !p.status.can_reconcile_to(to) {
        return Ok(false);
    }
    let reason = format!("reconciliation: gateway {} {}", t.status, t.id);
    Ok(payouts::reconcile_to(
        pool, p.id, p.status, p.attempt, to, &t.id, actor, &reason, now,
    )
    .await?)
}

/// A recorded reconciliation run (the dashboard's reconcile view).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct RunRow {
    /// Its id.
    pub id: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
    /// The payouts it compared were changed since then.
    pub since: DateTime<Utc>,
    /// How many payouts it compared.
    pub checked: i64,
    /// How many mismatches it fixed.
    pub fixed: i64,
    /// Mismatches by kind, zeros included.
    pub mismatches: serde_json::Value,
    /// Who ran it.
    pub actor: String,
    /// Nothing could be looked up: not a reconciliation.
    pub failed: bool,
    /// Why it failed.
    pub error: Option<String>,
}

/// A page of runs, newest first: at most `limit`, below `before_id` when given.
pub async fn runs(pool: &PgPool, before_id: Option<i64>, limit: i64) -> sqlx::Result<Vec<RunRow>> {
    sqlx::query_as(
        "SELECT id, started_at, finished_at, since, checked, fixed, mismatches, actor, failed, error
         FROM reconcile_runs WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
    )
    .bind(before_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use rust_decimal::Decimal;

    use super::*;

    fn payout(status: PayoutStatus) -> Payout {
        let now = Utc::now();
        Payout {
            id: 7,
            payee_id: 1,
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
                compare(&failed, &[record(status)], Utc::now()),
                [],
                "{status}"
            );
        }
        let kinds: Vec<_> = compare(&failed, &[record("pending")], Utc::now())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kinds, [MismatchKind::PaidAtGatewayNotInDb]);
    }
}

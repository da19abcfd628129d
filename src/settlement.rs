//! The settlement run: finds payees whose period has closed, sums their
//! released, unsettled earnings, applies the policy and creates one payout
//! per payee, currency and period, with its line items (`payoutctl settle`,
//! and the producer on its tick when `producer.settle_on_tick` is on).
//!
//! Each (payee, currency) is settled in ONE transaction: lock the payee row,
//! re-check that the period is not settled yet, lock its unsettled earnings
//! and open carried balances, compute, write the payout (with its event), the
//! settlement (unique per payee, currency and period start), the lines, and
//! mark the earnings settled. Two runs at once serialize on the payee lock,
//! and the second finds the period settled; the unique key is the backstop.
//! So settlement is idempotent, and no earning is settled twice (a trigger
//! refuses to change a settled earning's settlement).
//!
//! [`preview`] computes the same for the open period and writes nothing.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::{
    config::ProducerSettings,
    db::{earnings, payee_terms, payouts, settlements},
    domain::{
        Currency, Money, PayoutMethod, Period, Policy, Schedule,
        policy::{CarriedLine, DeductionLine, EarningLine, Settlement, SettlementInput},
    },
};

/// What to settle.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only this payee; a payee on a manual schedule is settled only when named here.
    pub payee: Option<i64>,
    /// Who runs it (recorded on settlements and payout events).
    pub actor: String,
}

/// One settled period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settled {
    /// The settlement row.
    pub settlement_id: i64,
    /// The payee.
    pub payee_id: i64,
    /// The currency.
    pub currency: String,
    /// The period.
    pub period: Period,
    /// `payout`, `below_minimum` or `shortfall`.
    pub outcome: String,
    /// The payout's amount, or the balance carried over.
    pub net: Decimal,
    /// The payout made, if any.
    pub payout_id: Option<i64>,
    /// Earnings settled.
    pub earnings: usize,
}

/// A (payee, currency) the run could not settle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The payee.
    pub payee_id: i64,
    /// The currency.
    pub currency: String,
    /// Why.
    pub reason: String,
    /// Whether an operator must act (a policy that does not cover it), as
    /// opposed to an expected wait (a suspended payee).
    pub error: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    /// Periods settled now.
    pub settled: Vec<Settled>,
    /// (payee, currency) whose last closed period was settled before.
    pub already_settled: usize,
    /// (payee, currency) left alone, with why.
    pub skipped: Vec<Skipped>,
}

impl RunReport {
    /// Payouts created.
    pub fn payouts(&self) -> usize {
        self.settled
            .iter()
            .filter(|s| s.payout_id.is_some())
            .count()
    }
}

enum Group {
    Settled(Settled),
    AlreadySettled,
    Nothing,
    Skipped(String, bool),
}

/// Settles every closed period with released, unsettled earnings (see the module doc).
pub async fn run(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    opts: &Options,
) -> anyhow::Result<RunReport> {
    let mut report = RunReport::default();
    for c in settlements::candidates(pool, now, opts.payee).await? {
        let skip = |reason: String, error: bool| Skipped {
            payee_id: c.payee_id,
            currency: c.currency.clone(),
            reason,
            error,
        };
        if c.status != "active" {
            report
                .skipped
                .push(skip(format!("payee is {}", c.status), false));
            continue;
        }
        let schedule = match c.schedule.as_deref().map(str::parse::<Schedule>) {
            None => policy.default_schedule,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                report.skipped.push(skip(e.to_string(), true));
                continue;
            }
        };
        let period = match schedule.last_closed(now) {
            Some(p) => p,
            // A manual period closes now, when the operator names the payee.
            None if opts.payee == Some(c.payee_id) => Period {
                start: c.latest_end.unwrap_or(c.first_completed),
                end: now,
            },
            None => continue,
        };
        if c.latest_end.is_some_and(|end| end >= period.end) {
            report.already_settled += 1;
            continue;
        }
        if c.first_release >= period.end {
            continue; // released after the period closed: the next period's
        }
        let currency: Currency = match c.currency.parse() {
            Ok(cur) => cur,
            Err(e) => {
                report.skipped.push(skip(format!("{e}"), true));
                continue;
            }
        };
        match settle_one(
            pool,
            policy,
            c.payee_id,
            currency,
            schedule,
            period,
            now,
            &opts.actor,
        )
        .await?
        {
            Group::Settled(s) => {
                tracing::info!(
                    settlement = s.settlement_id,
                    payee = s.payee_id,
                    currency = %s.currency,
                    outcome = %s.outcome,
                    net = %s.net,
                    payout = ?s.payout_id,
                    "period settled"
                );
                report.settled.push(s);
            }
            Group::AlreadySettled => report.already_settled += 1,
            Group::Nothing => {}
            Group::Skipped(reason, error) => report.skipped.push(skip(reason, error)),
        }
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn settle_one(
    pool: &PgPool,
    policy: &Policy,
    payee_id: i64,
    currency: Currency,
    schedule: Schedule,
    mut period: Period,
    now: DateTime<Utc>,
    actor: &str,
) -> anyhow::Result<Group> {
    let manual = !schedule.is_automatic();
    let code = currency.code();
    let mut tx = pool.begin().await?;
    let Some(terms) = payee_terms::lock(&mut tx, payee_id).await? else {
        return Ok(Group::Skipped("payee not found".into(), true));
    };
    if terms.status != "active" {
        return Ok(Group::Skipped(format!("payee is {}", terms.status), false));
    }
    // Under the lock: what another run may have settled meanwhile.
    let latest = settlements::latest_end(&mut tx, payee_id, code).await?;
    if manual {
        if let Some(end) = latest {
            period.start = end;
        }
    }
    if latest.is_some_and(|end| end >= period.end) {
        return Ok(Group::AlreadySettled);
    }
    let rows = earnings::unsettled(&mut tx, payee_id, code, period.end, true).await?;
    if rows.is_empty() {
        return Ok(Group::Nothing);
    }
    if manual && latest.is_none() {
        period.start = rows
            .iter()
            .map(|e| e.completed_at)
            .min()
            .unwrap_or(period.start);
    }
    let carries = settlements::open_carries(&mut tx, payee_id, code, true).await?;
    let deductions = payee_terms::deductions(&mut tx, payee_id, code).await?;
    let input = input(currency, &rows, &deductions, &carries, terms.method);
    let s = match policy.compute(&input) {
        Ok(s) => s,
        Err(e) => return Ok(Group::Skipped(format!("policy: {e}"), true)),
    };
    let payout_id = if s.pays_out() {
        let reason = format!("created by settlement of {period}");
        let money = Money::new(s.net, currency)?;
        let p = payouts::create_in(&mut *tx, payee_id, money, now, actor, &reason, now).await?;
        Some(p.id)
    } else {
        None
    };
    let new = settlements::NewSettlement {
        payee_id,
        period,
        schedule,
        settlement: &s,
        payout_id,
        actor,
    };
    let Some(id) = settlements::insert(&mut tx, &new, now).await? else {
        return Ok(Group::AlreadySettled); // dropped: rolled back, payout included
    };
    let ids: Vec<i64> = rows.iter().map(|e| e.id).collect();
    let marked = earnings::mark_settled(&mut tx, &ids, id, payout_id).await?;
    anyhow::ensure!(
        marked == ids.len() as u64,
        "payee {payee_id}: {} of {} locked earnings were settled meanwhile; nothing written",
        ids.len() as u64 - marked,
        ids.len()
    );
    if !carries.is_empty() {
        let carry_ids: Vec<i64> = carries.iter().map(|c| c.id).collect();
        settlements::consume_carries(&mut tx, &carry_ids, id).await?;
        if let Some(p) = payout_id {
            earnings::mark_paid_through_carry(&mut tx, &carry_ids, p).await?;
        }
    }
    tx.commit().await?;
    Ok(Group::Settled(Settled {
        settlement_id: id,
        payee_id,
        currency: code.to_string(),
        period,
        outcome: s.outcome.as_str().into(),
        net: s.net,
        payout_id,
        earnings: rows.len(),
    }))
}

fn input(
    currency: Currency,
    rows: &[earnings::Earning],
    deductions: &[payee_terms::Deduction],
    carries: &[settlements::OpenCarry],
    method: PayoutMethod,
) -> SettlementInput {
    SettlementInput {
        currency,
        earnings: rows
            .iter()
            .map(|e| EarningLine {
                id: e.id,
                gross: e.gross,
                label: e.label(),
            })
            .collect(),
        deductions: deductions
            .iter()
            .map(|d| DeductionLine {
                label: d.label.clone(),
                amount: d.amount,
            })
            .collect(),
        carried: carries
            .iter()
            .map(|c| CarriedLine {
                settlement_id: c.id,
                amount: c.net,
                gross: c.fee_base,
                label: format!(
                    "balance carried over from {} (settlement {})",
                    Period {
                        start: c.period_start,
                        end: c.period_end
                    },
                    c.id
                ),
            })
            .collect(),
        method,
    }
}

/// The producer's hook: a settlement pass on every tick when
/// `producer.settle_on_tick` is on. Never fails the tick: a failure is logged
/// and the due scan goes on (the next tick tries again).
pub async fn on_producer_tick(
    pool: &PgPool,
    settings: &ProducerSettings,
    now: DateTime<Utc>,
    actor: &str,
) {
    if !settings.settle_on_tick {
        return;
    }
    let Some(policy) = settings.policy.as_deref() else {
        tracing::error!("producer.settle_on_tick is on but no policy is loaded; not settling");
        return;
    };
    let opts = Options {
        payee: None,
        actor: actor.to_string(),
    };
    match run(pool, policy, now, &opts).await {
        Ok(r) => {
            for s in r.skipped.iter().filter(|s| s.error) {
                tracing::warn!(payee = s.payee_id, currency = %s.currency, reason = %s.reason, "not settled");
            }
        }
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "settlement pass failed; retrying next tick"
        ),
    }
}

/// Unsettled earnings of a currency that release after the previewed period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    /// The currency.
    pub currency: String,
    /// How many.
    pub earnings: i64,
    /// Their gross.
    pub gross: Decimal,
    /// The first release.
    pub first_release: DateTime<Utc>,
}

/// What the open period would pay, computed and not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// The payee.
    pub payee_id: i64,
    /// Its schedule.
    pub schedule: Schedule,
    /// Its payout method.
    pub method: PayoutMethod,
    /// The open period; for a manual schedule it ends now.
    pub period: Period,
    /// One computation per currency with earnings released by the period's end.
    pub settlements: Vec<Settlement>,
    /// Earnings released only after the period's end.
    pub held: Vec<Held>,
}

/// Computes, line by line, what settling the payee's open period would do if
/// it closed with what is known now (earnings released by its end, carried
/// balances, deductions). Writes nothing.
pub async fn preview(
    pool: &PgPool,
    policy: &Policy,
    payee_id: i64,
    now: DateTime<Utc>,
) -> anyhow::Result<Preview> {
    let mut conn = pool.acquire().await?;
    let terms = payee_terms::get(&mut conn, payee_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("payee {payee_id} not found"))?;
    let schedule = terms.schedule.unwrap_or(policy.default_schedule);
    let period = schedule.period_containing(now).unwrap_or(Period {
        start: now,
        end: now,
    });
    let mut out = Vec::new();
    let mut earliest = period.start;
    for code in earnings::unsettled_currencies(&mut conn, payee_id).await? {
        let currency: Currency = code.parse()?;
        let rows = earnings::unsettled(&mut conn, payee_id, &code, period.end, false).await?;
        if rows.is_empty() {
            continue;
        }
        earliest = earliest.min(
            rows.iter()
                .map(|e| e.completed_at)
                .min()
                .unwrap_or(earliest),
        );
        let carries = settlements::open_carries(&mut conn, payee_id, &code, false).await?;
        let deductions = payee_terms::deductions(&mut conn, payee_id, &code).await?;
        let s = policy
            .compute(&input(currency, &rows, &deductions, &carries, terms.method))
            .map_err(|e| anyhow::anyhow!("policy: {e}"))?;
        out.push(s);
    }
    let held = earnings::held(&mut conn, payee_id, period.end)
        .await?
        .into_iter()
        .map(|(currency, n, gross, first)| Held {
            currency,
            earnings: n,
            gross,
            first_release: first,
        })
        .collect();
    let period = if schedule.is_automatic() {
        period
    } else {
        Period {
            start: earliest,
            end: now,
        }
    };
    Ok(Preview {
        payee_id,
        schedule,
        method: terms.method,
        period,
        settlements: out,
        held,
    })
}

//! The settlement run: turns released, unsettled earnings (and balances
//! returned from cancelled or reversed payouts) into payouts, one per payee,
//! currency and period, with line items (`payoutctl settle`, and the
//! leading producer on its settlement interval).
//!
//! **A function, not an event.** What a run writes depends only on the
//! earnings, the policy and each payee's schedule, never on when it runs:
//! each (payee, currency) is settled period by period, in order, from the end
//! of its last settled period ([`Schedule::next_period`]); every closed period
//! with work in it is its own settlement, and each earning lands in the
//! period its release time falls in (one released before an already settled
//! period's end, e.g. a late import, lands in the next open one). A run that
//! was missed for weeks catches up week by week; a manual settlement closes
//! `[last end, now)` and the schedule resumes from there, so no period is
//! shadowed or skipped. Empty periods are skipped.
//!
//! Each period is settled in ONE transaction: lock the payee row, re-read
//! where its last period ended, lock its earnings and open balances,
//! compute, write the payout (with its event), the settlement, the lines,
//! and mark the earnings settled. Two runs at once serialize on the payee
//! lock; the second continues from where the first ended. A trigger refuses
//! to settle an earning twice.
//!
//! **Reversible.** A database trigger (migration 20261126000010) returns a
//! cancelled or reversed settlement payout's money to the payee's balance;
//! [`run`] pays it in the payee's next period.
//!
//! [`preview`] computes the next period the run would settle and writes nothing.

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
    metrics,
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
    /// Whether an operator must act (a policy that does not cover it, a
    /// database error), as opposed to an expected wait (a suspended payee).
    pub error: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    /// Periods settled now.
    pub settled: Vec<Settled>,
    /// Periods found settled by another run at the same time (under the
    /// payee lock): said only when true.
    pub already_settled: usize,
    /// (payee, currency) with payable work whose next period is still open.
    pub not_due: usize,
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

    /// (payee, currency) not settled because of an error.
    pub fn errors(&self) -> usize {
        self.skipped.iter().filter(|s| s.error).count()
    }
}

enum Group {
    Settled(Settled),
    AlreadySettled,
    NotDue,
    Nothing,
    Skipped(String, bool),
}

/// Settles every closed period of every (payee, currency) with something
/// payable, in order (see the module doc). One payee's error is reported in
/// [`RunReport::skipped`] (and counted in `payout_settlement_errors_total`)
/// and never stops the others.
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
        let named = opts.payee == Some(c.payee_id);
        if !schedule.is_automatic() && !named {
            continue;
        }
        let currency: Currency = match c.currency.parse() {
            Ok(cur) => cur,
            Err(e) => {
                report.skipped.push(skip(format!("{e}"), true));
                continue;
            }
        };
        // Every closed period, oldest first, each in its own transaction.
        loop {
            let step =
                settle_next(pool, policy, c.payee_id, currency, now, named, &opts.actor).await;
            match step {
                Ok(Group::Settled(s)) => {
                    metrics::SETTLEMENTS
                        .with_label_values(&[s.outcome.as_str()])
                        .inc();
                    tracing::debug!(
                        settlement = s.settlement_id,
                        payee = s.payee_id,
                        currency = %s.currency,
                        period = %s.period,
                        outcome = %s.outcome,
                        net = %s.net,
                        payout = ?s.payout_id,
                        "period settled"
                    );
                    report.settled.push(s);
                    if !schedule.is_automatic() {
                        break; // a manual period closes once per run
                    }
                }
                Ok(Group::AlreadySettled) => {
                    report.already_settled += 1;
                    break;
                }
                Ok(Group::NotDue) => {
                    report.not_due += 1;
                    break;
                }
                Ok(Group::Nothing) => break,
                Ok(Group::Skipped(reason, error)) => {
                    report.skipped.push(skip(reason, error));
                    break;
                }
                Err(e) => {
                    report.skipped.push(skip(format!("{e:#}"), true));
                    break;
                }
            }
        }
    }
    for s in report.skipped.iter().filter(|s| s.error) {
        metrics::SETTLEMENT_ERRORS.inc();
        tracing::warn!(payee = s.payee_id, currency = %s.currency, reason = %s.reason, "not settled");
    }
    Ok(report)
}

/// Settles the next closed period of (payee, currency), if there is one.
async fn settle_next(
    pool: &PgPool,
    policy: &Policy,
    payee_id: i64,
    currency: Currency,
    now: DateTime<Utc>,
    named: bool,
    actor: &str,
) -> anyhow::Result<Group> {
    let code = currency.code();
    let mut tx = pool.begin().await?;
    let Some(terms) = payee_terms::lock(&mut tx, payee_id).await? else {
        return Ok(Group::Skipped("payee not found".into(), true));
    };
    if terms.status != "active" {
        return Ok(Group::Skipped(format!("payee is {}", terms.status), false));
    }
    let schedule = terms.schedule.unwrap_or(policy.default_schedule);
    // Under the lock: where the last period ended, whoever settled it.
    let latest = settlements::latest_end(&mut tx, payee_id, code).await?;
    let pending = settlements::pending(&mut tx, payee_id, code).await?;
    let Some(period) = period_to_settle(schedule, latest, &pending, now, named) else {
        return Ok(Group::Nothing);
    };
    if period.end > now {
        return Ok(Group::NotDue);
    }
    let rows = earnings::unsettled(&mut tx, payee_id, code, period.end, true).await?;
    let carries = settlements::open_carries(&mut tx, payee_id, code, period.end, true).await?;
    if rows.is_empty() && !carries.iter().any(|c| c.outcome == "returned") {
        // Only balances below the minimum: they wait for new work.
        return Ok(Group::Nothing);
    }
    // Agreed deductions are charged per period with work in it.
    let deductions = if rows.is_empty() {
        Vec::new()
    } else {
        payee_terms::deductions(&mut tx, payee_id, code).await?
    };
    let input = input(currency, &rows, &deductions, &carries, terms.method);
    let own_minimum = payee_terms::minimum(&mut tx, payee_id, code).await?;
    let s = match policy.compute_with_minimum(&input, own_minimum) {
        Ok(s) => s,
        Err(e) => return Ok(Group::Skipped(format!("policy: {e}"), true)),
    };
    if let Some(max) = policy.maximum_payout(currency) {
        if s.pays_out() && s.net > max {
            return Ok(Group::Skipped(
                format!(
                    "policy: maximum_payout.{code}: the period {period} would pay {} {code}, over the maximum {max} {code}; nothing written",
                    s.net
                ),
                true,
            ));
        }
    }
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

/// The next period of (payee, currency) to settle: the scheduled period
/// after the last settled one that holds the first payable thing; for a
/// manual schedule, when the operator names the payee, `[last end, now)`.
/// `None` when nothing is payable (or a manual payee was not named).
fn period_to_settle(
    schedule: Schedule,
    latest: Option<DateTime<Utc>>,
    pending: &settlements::Pending,
    now: DateTime<Utc>,
    named: bool,
) -> Option<Period> {
    let first = pending.first()?;
    if schedule.is_automatic() {
        return schedule.next_period(latest, first);
    }
    if !named {
        return None;
    }
    let start = match latest {
        Some(end) => end,
        None => pending.first_completed.unwrap_or(first).min(first),
    };
    (start < now && first < now).then_some(Period { start, end: now })
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
                label: match (c.outcome.as_str(), c.payout_id) {
                    ("returned", Some(p)) => format!(
                        "balance returned from payout {p} (cancelled or reversed; settlement {} of {})",
                        c.id,
                        Period {
                            start: c.period_start,
                            end: c.period_end
                        }
                    ),
                    _ => format!(
                        "balance carried over from {} (settlement {})",
                        Period {
                            start: c.period_start,
                            end: c.period_end
                        },
                        c.id
                    ),
                },
            })
            .collect(),
        method,
    }
}

/// The leading producer's hook: a settlement pass at most every
/// `producer.settle_every_secs` (when `producer.settle_on_tick` is on, the
/// default). Never fails the tick: a failure is counted and logged and the
/// due scan goes on.
pub async fn on_producer_tick(
    pool: &PgPool,
    settings: &ProducerSettings,
    now: DateTime<Utc>,
    actor: &str,
) {
    if !settings.settle_on_tick {
        return;
    }
    match settlements::claim_interval(pool, now, settings.settle_every_secs).await {
        Ok(true) => {}
        Ok(false) => return, // ran less than settle_every_secs ago
        Err(e) => {
            metrics::SETTLEMENT_ERRORS.inc();
            tracing::warn!(error = %e, "settlement interval not readable; retrying next tick");
            return;
        }
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
            if !r.settled.is_empty() || r.errors() > 0 {
                tracing::info!(
                    periods = r.settled.len(),
                    payouts = r.payouts(),
                    errors = r.errors(),
                    "settlement pass"
                );
            }
        }
        Err(e) => {
            metrics::SETTLEMENT_ERRORS.inc();
            tracing::warn!(
                error = format!("{e:#}"),
                "settlement pass failed; retrying at the next interval"
            )
        }
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

/// What the next period would pay, computed and not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// The payee.
    pub payee_id: i64,
    /// Its schedule.
    pub schedule: Schedule,
    /// Its payout method.
    pub method: PayoutMethod,
    /// The period the next run will really settle: the one after the last
    /// settled period that holds the first payable earning (already closed
    /// when a run is overdue); the open period when nothing is payable; for
    /// a manual schedule it ends now.
    pub period: Period,
    /// Whether that period has closed (the next run settles it).
    pub closed: bool,
    /// One computation per currency with earnings released by the period's end.
    pub settlements: Vec<Settlement>,
    /// Earnings released only after the period's end.
    pub held: Vec<Held>,
}

/// Computes, line by line, what settling the payee's next period would do
/// if it closed with what is known now (earnings released by its end,
/// carried and returned balances, deductions). Writes nothing. With several
/// currencies the period is the earliest of theirs.
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
    let open = schedule.period_containing(now).unwrap_or(Period {
        start: now,
        end: now,
    });
    let mut period: Option<Period> = None;
    let mut codes = earnings::unsettled_currencies(&mut conn, payee_id).await?;
    for code in settlements::returned_currencies(&mut conn, payee_id).await? {
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    for code in &codes {
        let latest = settlements::latest_end(&mut conn, payee_id, code).await?;
        let pending = settlements::pending(&mut conn, payee_id, code).await?;
        if let Some(p) = period_to_settle(schedule, latest, &pending, now, true) {
            period = Some(match period {
                Some(q) if q.end <= p.end => q,
                _ => p,
            });
        }
    }
    let period = period.unwrap_or(open);
    let mut out = Vec::new();
    for code in &codes {
        let currency: Currency = code.parse()?;
        let rows = earnings::unsettled(&mut conn, payee_id, code, period.end, false).await?;
        let carries =
            settlements::open_carries(&mut conn, payee_id, code, period.end, false).await?;
        if rows.is_empty() && !carries.iter().any(|c| c.outcome == "returned") {
            continue;
        }
        let deductions = if rows.is_empty() {
            Vec::new()
        } else {
            payee_terms::deductions(&mut conn, payee_id, code).await?
        };
        let own_minimum = payee_terms::minimum(&mut conn, payee_id, code).await?;
        let s = policy
            .compute_with_minimum(
                &input(currency, &rows, &deductions, &carries, terms.method),
                own_minimum,
            )
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
    Ok(Preview {
        payee_id,
        schedule,
        method: terms.method,
        period,
        closed: period.end <= now,
        settlements: out,
        held,
    })
}

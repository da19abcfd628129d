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
//! Payees are settled in chunks ([`CHUNK_PAYEES`] per transaction, see
//! [`run_chunked`]): lock the chunk's payee rows, then, one period per
//! (payee, currency) per round, re-read where each last period ended, read
//! its earnings (unlocked: only a settlement, under the payee lock, changes
//! an unsettled earning) and lock its open balances, compute, and write the
//! payouts (with their events), the settlements, their stored lines, and
//! mark the earnings settled (each with its line's position: an earning's
//! line in `payout_lines` is the earning itself), all set-based. Two runs at
//! once serialize on the payee locks (taken in id order); the second
//! continues from where the first ended. The mark re-checks that each
//! earning is unsettled, and a trigger refuses to settle an earning twice. A chunk whose writes fail is
//! rolled back and settled payee by payee, one transaction per period.
//!
//! **Reversible.** A database trigger (migration 20261126000010) returns a
//! cancelled or reversed settlement payout's money to the payee's balance;
//! [`run`] pays it in the payee's next period.
//!
//! **Payout steps.** A gateway that pays a currency only in coarser steps
//! than its minor unit (Stripe: HUF in whole forints, BHD in hundredths)
//! gets a policy that rounds each payout down to the step
//! ([`policy_for`]); the rest is the
//! settlement's `carried_out` (a `carried_out` line), an open balance that
//! the payee's next period with work takes in, like a balance below the
//! minimum, and pays once it adds up to a step.
//!
//! **Told.** Each settlement written writes, in its transaction, a
//! `settlement.created` event and an `earning.released` event for each
//! earning it takes in (`settlement_events`, the outbox of outbound
//! webhooks). Release is a time predicate (`release_at` before the period's
//! end), not a write: `earning.released` is emitted when the run observes it,
//! i.e. when the earning is settled, not at `release_at` itself.
//!
//! **Agreed deductions once per period.** A period with work in it charges
//! the payee's agreed deductions (`payee_deductions`), unless an early payout
//! request made in the period charged them already (a request charges those
//! of the period it is made in: see `services::payout_requests`).
//!
//! [`preview`] computes the next period the run would settle and writes nothing.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::{
    config::ProducerSettings,
    db::{earnings, payee_terms, payouts, settlement_events, settlements},
    domain::{
        Currency, Money, PayeeId, PayoutId, PayoutMethod, Period, Policy, Schedule,
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

/// Payees settled per transaction by [`run`].
pub const CHUNK_PAYEES: usize = 1_000;

/// Chunks settled at once by [`run`], each on its own connection: one per
/// core of a small database machine, where a chunk's time is the database's.
pub const CHUNKS_AT_ONCE: usize = 2;

/// Told after each chunk: (payees done, payees in the run).
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Send + Sync);

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
    run_chunked(pool, policy, now, opts, CHUNK_PAYEES, None).await
}

/// [`run`], `chunk_payees` payees per transaction ([`CHUNKS_AT_ONCE`] at
/// once), telling `progress` after each chunk.
///
/// A chunk is settled set-based: its payees locked in one statement (in id
/// order, so runs at once never deadlock), then in rounds, one period per
/// (payee, currency) per round, oldest first, until none has another closed
/// period: where each stands, its earnings and balances for that period are
/// read for the whole chunk in a few statements, each period is computed in
/// memory ([`Policy::compute_with_minimum`], as for one payee), and the
/// payouts (with their events), settlements, lines, earnings and balances of
/// the round are written in a few multi-row statements. A payee whose
/// computation fails is reported and left out of the writes. Should a
/// chunk's writes fail at the database, the chunk is rolled back and its
/// payees are settled one by one, each period in its own transaction, so one
/// payee never blocks the others and the report is the same.
pub async fn run_chunked(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    opts: &Options,
    chunk_payees: usize,
    progress: Option<Progress<'_>>,
) -> anyhow::Result<RunReport> {
    let candidates = settlements::candidates(pool, now, opts.payee).await?;
    let total = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| *i == 0 || candidates[i - 1].payee_id != c.payee_id)
        .count();
    // The chunks: `chunk_payees` payees each (candidates come by payee).
    let mut chunks: Vec<(usize, usize, usize)> = Vec::new();
    let mut start = 0;
    while start < candidates.len() {
        let (mut end, mut payees) = (start, 0);
        while end < candidates.len() {
            if end == start || candidates[end].payee_id != candidates[end - 1].payee_id {
                if payees == chunk_payees.max(1) {
                    break;
                }
                payees += 1;
            }
            end += 1;
        }
        chunks.push((start, end, payees));
        start = end;
    }
    // CHUNKS_AT_ONCE chunks at once (disjoint payees, so they never wait
    // for each other), their results taken in order.
    let candidates = &candidates;
    let mut settled =
        futures::stream::iter(chunks.into_iter().map(|(start, end, payees)| async move {
            let works: Vec<Work> = candidates[start..end]
                .iter()
                .map(|c| Work::plan(c, policy, opts))
                .collect();
            let slots = match settle_chunk(pool, policy, now, &opts.actor, &works).await {
                Ok(slots) => slots,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        payees,
                        "chunk not settled in bulk (rolled back); settling its payees one by one"
                    );
                    settle_one_by_one(pool, policy, now, &opts.actor, &works).await
                }
            };
            (slots, payees)
        }))
        .buffered(CHUNKS_AT_ONCE);
    let mut report = RunReport::default();
    let mut done = 0;
    while let Some((slots, payees)) = settled.next().await {
        for slot in slots {
            report.absorb(slot);
        }
        done += payees;
        if let Some(p) = progress {
            p(done, total);
        }
    }
    report.count_errors();
    Ok(report)
}

/// [`run`] as it ran before chunks: each period of each (payee, currency)
/// in its own transaction (the path a chunk falls back to). Slower; the
/// reference the chunked run is tested against.
pub async fn run_one_by_one(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    opts: &Options,
) -> anyhow::Result<RunReport> {
    let works: Vec<Work> = settlements::candidates(pool, now, opts.payee)
        .await?
        .iter()
        .map(|c| Work::plan(c, policy, opts))
        .collect();
    let mut report = RunReport::default();
    for slot in settle_one_by_one(pool, policy, now, &opts.actor, &works).await {
        report.absorb(slot);
    }
    report.count_errors();
    Ok(report)
}

/// How a (payee, currency) of a run ended, besides the periods it settled.
#[derive(Debug, Clone)]
enum End {
    AlreadySettled,
    NotDue,
    Skipped(String, bool),
}

/// What a run did for one (payee, currency).
#[derive(Debug, Clone)]
struct Slot {
    payee_id: i64,
    currency: String,
    settled: Vec<Settled>,
    end: Option<End>,
}

impl RunReport {
    fn count_errors(&self) {
        for s in self.skipped.iter().filter(|s| s.error) {
            metrics::SETTLEMENT_ERRORS.inc();
            tracing::warn!(payee = s.payee_id, currency = %s.currency, reason = %s.reason, "not settled");
        }
    }

    fn absorb(&mut self, slot: Slot) {
        for s in slot.settled {
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
            self.settled.push(s);
        }
        match slot.end {
            None => {}
            Some(End::AlreadySettled) => self.already_settled += 1,
            Some(End::NotDue) => self.not_due += 1,
            Some(End::Skipped(reason, error)) => self.skipped.push(Skipped {
                payee_id: slot.payee_id,
                currency: slot.currency,
                reason,
                error,
            }),
        }
    }
}

/// A candidate (payee, currency) of a run, checked before any lock.
#[derive(Debug, Clone)]
struct Work {
    payee_id: i64,
    code: String,
    /// `None`: not settled (a suspended payee, a bad schedule or currency, a
    /// manual payee not named); the slot says why.
    plan: Option<Plan>,
    /// Why it is not settled, when it is not.
    end: Option<End>,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    currency: Currency,
    /// Whether its (candidate) schedule closes periods by itself; a manual
    /// period closes once per run.
    automatic: bool,
    /// Named by the operator (`--payee`).
    named: bool,
}

impl Work {
    fn plan(c: &settlements::Candidate, policy: &Policy, opts: &Options) -> Work {
        let not = |end: Option<End>| Work {
            payee_id: c.payee_id,
            code: c.currency.clone(),
            plan: None,
            end,
        };
        if c.status != "active" {
            return not(Some(End::Skipped(format!("payee is {}", c.status), false)));
        }
        let schedule = match c.schedule.as_deref().map(str::parse::<Schedule>) {
            None => policy.default_schedule,
            Some(Ok(s)) => s,
            Some(Err(e)) => return not(Some(End::Skipped(e.to_string(), true))),
        };
        let named = opts.payee == Some(c.payee_id);
        if !schedule.is_automatic() && !named {
            return not(None);
        }
        let currency: Currency = match c.currency.parse() {
            Ok(cur) => cur,
            Err(e) => return not(Some(End::Skipped(format!("{e}"), true))),
        };
        Work {
            payee_id: c.payee_id,
            code: c.currency.clone(),
            plan: Some(Plan {
                currency,
                automatic: schedule.is_automatic(),
                named,
            }),
            end: None,
        }
    }

    fn slot(&self) -> Slot {
        Slot {
            payee_id: self.payee_id,
            currency: self.code.clone(),
            settled: Vec::new(),
            end: self.end.clone(),
        }
    }
}

/// The per-payee path: each (payee, currency) of `works` period by period,
/// each period in its own transaction (the fallback of a chunk whose bulk
/// writes failed).
async fn settle_one_by_one(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    actor: &str,
    works: &[Work],
) -> Vec<Slot> {
    let mut slots = Vec::with_capacity(works.len());
    for w in works {
        let mut slot = w.slot();
        if let Some(plan) = w.plan {
            // Every closed period, oldest first, each in its own transaction.
            loop {
                let step = settle_next(
                    pool,
                    policy,
                    w.payee_id,
                    plan.currency,
                    now,
                    plan.named,
                    actor,
                )
                .await;
                match step {
                    Ok(Group::Settled(s)) => {
                        slot.settled.push(s);
                        if !plan.automatic {
                            break; // a manual period closes once per run
                        }
                    }
                    Ok(Group::AlreadySettled) => {
                        slot.end = Some(End::AlreadySettled);
                        break;
                    }
                    Ok(Group::NotDue) => {
                        slot.end = Some(End::NotDue);
                        break;
                    }
                    Ok(Group::Nothing) => break,
                    Ok(Group::Skipped(reason, error)) => {
                        slot.end = Some(End::Skipped(reason, error));
                        break;
                    }
                    Err(e) => {
                        slot.end = Some(End::Skipped(format!("{e:#}"), true));
                        break;
                    }
                }
            }
        }
        slots.push(slot);
    }
    slots
}

/// A (payee, currency) still being settled in a chunk.
#[derive(Debug, Clone, Copy)]
struct Live {
    /// Its index in the chunk.
    i: usize,
    plan: Plan,
    /// Its schedule and method, read under the payee lock.
    schedule: Schedule,
    method: PayoutMethod,
}

/// A period computed in a round, to be written.
struct Computed {
    live: Live,
    period: Period,
    settlement: Settlement,
    earnings: Vec<i64>,
    /// The balances it takes over: (settlement, whether it is its remainder).
    carries: Vec<(i64, bool)>,
    money: Option<Money>,
    /// The external reference of its one earning (`per_earning`).
    external_ref: Option<String>,
    payout_id: Option<i64>,
    settlement_id: i64,
}

type Key = (i64, String);

/// An error and its causes on one line, as anyhow's `{:#}` writes them
/// (`outer: inner`): a payee's unreadable terms, in its skip reason.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Settles a chunk in one transaction (see [`run_chunked`]). `Err` (a
/// database error): nothing written; the caller settles it one by one.
async fn settle_chunk(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    actor: &str,
    works: &[Work],
) -> anyhow::Result<Vec<Slot>> {
    let mut slots: Vec<Slot> = works.iter().map(Work::slot).collect();
    let mut payee_ids: Vec<i64> = works
        .iter()
        .filter(|w| w.plan.is_some())
        .map(|w| w.payee_id)
        .collect();
    payee_ids.dedup(); // candidates come by payee
    if payee_ids.is_empty() {
        return Ok(slots);
    }
    let key = |i: usize| -> Key { (works[i].payee_id, works[i].code.clone()) };
    let mut tx = pool.begin().await?;
    settlements::plan_by_key(&mut tx).await?;
    let terms: HashMap<i64, sqlx::Result<payee_terms::Terms>> =
        payee_terms::lock_many(&mut tx, &payee_ids)
            .await?
            .into_iter()
            .collect();
    let mut live: Vec<Live> = Vec::new();
    for (i, w) in works.iter().enumerate() {
        let Some(plan) = w.plan else { continue };
        match terms.get(&w.payee_id) {
            None => slots[i].end = Some(End::Skipped("payee not found".into(), true)),
            Some(Err(e)) => slots[i].end = Some(End::Skipped(error_chain(e), true)),
            Some(Ok(t)) if t.status != "active" => {
                slots[i].end = Some(End::Skipped(format!("payee is {}", t.status), false))
            }
            Some(Ok(t)) => live.push(Live {
                i,
                plan,
                schedule: t.schedule.unwrap_or(policy.default_schedule),
                method: t.method,
            }),
        }
    }
    let mut deductions: HashMap<Key, Vec<payee_terms::Deduction>> = HashMap::new();
    for d in payee_terms::deductions_many(&mut tx, &payee_ids).await? {
        deductions
            .entry((d.payee_id, d.currency.clone()))
            .or_default()
            .push(d);
    }
    let minimums: HashMap<Key, Decimal> = payee_terms::minimums_many(&mut tx, &payee_ids)
        .await?
        .into_iter()
        .map(|(p, c, m)| ((p, c), m))
        .collect();

    // Rounds: one period per (payee, currency), until none has another.
    while !live.is_empty() {
        let ids: Vec<i64> = live.iter().map(|l| works[l.i].payee_id).collect();
        let codes: Vec<&str> = live.iter().map(|l| works[l.i].code.as_str()).collect();
        let mut states: HashMap<Key, settlements::GroupState> =
            settlements::states(&mut tx, &ids, &codes)
                .await?
                .into_iter()
                .map(|s| ((s.payee_id, s.currency.clone()), s))
                .collect();
        let mut due: Vec<(Live, Period, Option<DateTime<Utc>>)> = Vec::new();
        for l in live.drain(..) {
            let st = states
                .remove(&key(l.i))
                .ok_or_else(|| anyhow::anyhow!("payee {}: no state read", works[l.i].payee_id))?;
            match period_to_settle(l.schedule, st.latest, &st.pending, now, l.plan.named) {
                None => {}
                Some(p) if p.end > now => slots[l.i].end = Some(End::NotDue),
                Some(p) => due.push((l, p, st.latest)),
            }
        }
        if due.is_empty() {
            break;
        }
        let ids: Vec<i64> = due.iter().map(|(l, ..)| works[l.i].payee_id).collect();
        let codes: Vec<&str> = due.iter().map(|(l, ..)| works[l.i].code.as_str()).collect();
        let ends: Vec<DateTime<Utc>> = due.iter().map(|(_, p, _)| p.end).collect();
        let mut rows: HashMap<Key, Vec<earnings::Earning>> = HashMap::new();
        for e in earnings::unsettled_many(&mut tx, &ids, &codes, &ends).await? {
            rows.entry((e.payee_id.get(), e.currency.clone()))
                .or_default()
                .push(e);
        }
        let mut carries: HashMap<Key, Vec<settlements::OpenCarry>> = HashMap::new();
        for c in settlements::open_carries_many(&mut tx, &ids, &codes, &ends).await? {
            carries
                .entry((c.payee_id, c.currency))
                .or_default()
                .push(c.carry);
        }

        // Deductions a request in the period charged already (only asked
        // for those with deductions).
        let (mut d_ids, mut d_codes, mut d_since, mut d_until) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (l, period, latest) in &due {
            let k = key(l.i);
            if deductions.contains_key(&k) {
                let (since, until) = requests_window(l.schedule, *latest, *period);
                d_ids.push(k.0);
                d_codes.push(works[l.i].code.as_str());
                d_since.push(since);
                d_until.push(until);
            }
        }
        let charged: std::collections::HashSet<Key> =
            settlements::deductions_requested_many(&mut tx, &d_ids, &d_codes, &d_since, &d_until)
                .await?
                .into_iter()
                .collect();

        let mut computed: Vec<Computed> = Vec::with_capacity(due.len());
        for (l, period, _) in due {
            let k = key(l.i);
            let rows = rows.remove(&k).unwrap_or_default();
            let carries = carries.remove(&k).unwrap_or_default();
            let deductions = if charged.contains(&k) {
                &[][..]
            } else {
                deductions.get(&k).map_or(&[][..], Vec::as_slice)
            };
            match compute(
                policy,
                l,
                period,
                &rows,
                &carries,
                deductions,
                minimums.get(&k).copied(),
            ) {
                Ok(Some(c)) => computed.push(c),
                Ok(None) => {} // only balances below the minimum: they wait for new work
                Err((reason, error)) => slots[l.i].end = Some(End::Skipped(reason, error)),
            }
        }
        if computed.is_empty() {
            break;
        }
        write_round(&mut tx, &mut computed, works, actor, now).await?;
        for c in computed {
            let w = &works[c.live.i];
            slots[c.live.i].settled.push(Settled {
                settlement_id: c.settlement_id,
                payee_id: w.payee_id,
                currency: w.code.clone(),
                period: c.period,
                outcome: c.settlement.outcome.as_str().into(),
                net: c.settlement.net,
                payout_id: c.payout_id,
                earnings: c.earnings.len(),
            });
            if c.live.plan.automatic {
                live.push(c.live);
            }
        }
    }
    tx.commit().await?;
    Ok(slots)
}
/// A period that settles: the settlement, and its payout's amount when it pays out.
pub(crate) type Decided = (Settlement, Option<Money>);

/// The decision for one period, the same in both paths (a chunk's round and
/// [`settle_next`]): `Ok(None)` when there is nothing to pay (only balances
/// below the minimum: they wait for new work), `Err((reason, error))` when
/// the period is not settled, else the settlement and its payout's amount.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide(
    policy: &Policy,
    currency: Currency,
    method: PayoutMethod,
    period: Period,
    rows: &[earnings::Earning],
    carries: &[settlements::OpenCarry],
    deductions: &[payee_terms::Deduction],
    own_minimum: Option<Decimal>,
) -> Result<Option<Decided>, (String, bool)> {
    if rows.is_empty() && !carries.iter().any(|c| c.is_returned()) {
        return Ok(None);
    }
    // Agreed deductions are charged per period with work in it.
    let deductions = if rows.is_empty() { &[][..] } else { deductions };
    let code = currency.code();
    let input = input(currency, rows, deductions, carries, method);
    let s = policy
        .compute_with_minimum(&input, own_minimum)
        .map_err(|e| (format!("policy: {e}"), true))?;
    if let Some(max) = policy.maximum_payout(currency) {
        if s.pays_out() && s.net > max {
            return Err((
                format!(
                    "policy: maximum_payout.{code}: the period {period} would pay {} {code}, over the maximum {max} {code}; nothing written",
                    s.net
                ),
                true,
            ));
        }
    }
    let money = if s.pays_out() {
        let m = Money::new(s.net, currency)
            .map_err(|e| (format!("{:#}", anyhow::Error::from(e)), true))?;
        Some(m)
    } else {
        None
    };
    Ok(Some((s, money)))
}

/// One period of a chunk's round ([`decide`]), with what its writes need.
fn compute(
    policy: &Policy,
    l: Live,
    period: Period,
    rows: &[earnings::Earning],
    carries: &[settlements::OpenCarry],
    deductions: &[payee_terms::Deduction],
    own_minimum: Option<Decimal>,
) -> Result<Option<Computed>, (String, bool)> {
    let rows = payable(l.schedule, rows);
    let decided = decide(
        policy,
        l.plan.currency,
        l.method,
        period,
        rows,
        carries,
        deductions,
        own_minimum,
    )?;
    Ok(decided.map(|(settlement, money)| Computed {
        live: l,
        period,
        settlement,
        earnings: rows.iter().map(|e| e.id).collect(),
        carries: carries.iter().map(|c| (c.id, c.remainder)).collect(),
        money,
        external_ref: external_ref(l.schedule, rows),
        payout_id: None,
        settlement_id: 0,
    }))
}

/// Writes a round of a chunk: its payouts (with their events), settlements
/// and lines, the earnings they settled and the balances they took over, in
/// a few multi-row statements; fills in the payout and settlement ids.
async fn write_round(
    conn: &mut PgConnection,
    computed: &mut [Computed],
    works: &[Work],
    actor: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let new_payouts: Vec<payouts::NewPayout> = computed
        .iter()
        .filter_map(|c| {
            c.money.map(|money| payouts::NewPayout {
                payee_id: works[c.live.i].payee_id,
                money,
                reason: format!("created by settlement of {}", c.period),
                external_ref: c.external_ref.clone(),
            })
        })
        .collect();
    let mut payout_ids = payouts::create_many(conn, &new_payouts, now, actor, now)
        .await?
        .into_iter();
    for c in computed.iter_mut().filter(|c| c.money.is_some()) {
        c.payout_id = payout_ids.next();
    }
    let news: Vec<settlements::NewSettlement<'_>> = computed
        .iter()
        .map(|c| settlements::NewSettlement {
            payee_id: works[c.live.i].payee_id,
            period: c.period,
            schedule: c.live.schedule,
            settlement: &c.settlement,
            payout_id: c.payout_id,
            actor,
            requested: false,
        })
        .collect();
    let ids = settlements::insert_many(conn, &news, now).await?;
    drop(news);
    for (c, id) in computed.iter_mut().zip(ids) {
        c.settlement_id = id;
    }
    let (mut earning_ids, mut positions) = (Vec::new(), Vec::new());
    let (mut settlement_ids, mut paid_by) = (Vec::new(), Vec::new());
    let (mut carry_ids, mut carried_into) = (Vec::new(), Vec::new());
    let (mut remainder_ids, mut remainders_into) = (Vec::new(), Vec::new());
    let (mut paid_carries, mut carry_payouts) = (Vec::new(), Vec::new());
    for c in computed.iter() {
        let (ids, at) = earning_lines(&c.settlement);
        anyhow::ensure!(
            ids == c.earnings,
            "settlement of payee {}: its earning lines are not its earnings",
            works[c.live.i].payee_id
        );
        for (e, p) in ids.into_iter().zip(at) {
            earning_ids.push(e);
            positions.push(p);
            settlement_ids.push(c.settlement_id);
            paid_by.push(c.payout_id);
        }
        for &(carry, remainder) in &c.carries {
            if remainder {
                // Its earnings were paid by the payout that kept it.
                remainder_ids.push(carry);
                remainders_into.push(c.settlement_id);
                continue;
            }
            carry_ids.push(carry);
            carried_into.push(c.settlement_id);
            if let Some(p) = c.payout_id {
                paid_carries.push(carry);
                carry_payouts.push(p);
            }
        }
    }
    let marked =
        earnings::mark_settled_many(conn, &earning_ids, &positions, &settlement_ids, &paid_by)
            .await?;
    anyhow::ensure!(
        marked == earning_ids.len() as u64,
        "{} of {} locked earnings were settled meanwhile; nothing written",
        earning_ids.len() as u64 - marked,
        earning_ids.len()
    );
    if !carry_ids.is_empty() {
        settlements::consume_carries_many(conn, &carry_ids, &carried_into).await?;
    }
    if !remainder_ids.is_empty() {
        settlements::consume_remainders_many(conn, &remainder_ids, &remainders_into).await?;
    }
    if !paid_carries.is_empty() {
        earnings::mark_paid_through_carry_many(conn, &paid_carries, &carry_payouts).await?;
    }
    // What changed is told, in this transaction: settlement.created and
    // earning.released (the run has just observed the release).
    let written: Vec<i64> = computed.iter().map(|c| c.settlement_id).collect();
    settlement_events::record(conn, &written, now).await?;
    Ok(())
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
    let mut rows =
        earnings::unsettled(&mut tx, PayeeId::new(payee_id), code, period.end, true).await?;
    rows.truncate(payable(schedule, &rows).len());
    let carries = settlements::open_carries(&mut tx, payee_id, code, period.end, true).await?;
    let deductions = if rows.is_empty() {
        Vec::new()
    } else {
        let agreed = payee_terms::deductions(&mut tx, payee_id, code).await?;
        let (since, until) = requests_window(schedule, latest, period);
        if agreed.is_empty()
            || settlements::deductions_requested(&mut tx, payee_id, code, since, Some(until))
                .await?
        {
            Vec::new() // charged by an early payout request in the period
        } else {
            agreed
        }
    };
    let own_minimum = payee_terms::minimum(&mut tx, payee_id, code).await?;
    let decided = decide(
        policy,
        currency,
        terms.method,
        period,
        &rows,
        &carries,
        &deductions,
        own_minimum,
    );
    let (s, money) = match decided {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(Group::Nothing),
        Err((reason, error)) => return Ok(Group::Skipped(reason, error)),
    };
    let payout_id = match money {
        Some(money) => {
            let new = payouts::NewPayout {
                payee_id,
                money,
                reason: format!("created by settlement of {period}"),
                external_ref: external_ref(schedule, &rows),
            };
            let ids = payouts::create_many(&mut tx, &[new], now, actor, now).await?;
            ids.first().copied()
        }
        None => None,
    };
    let new = settlements::NewSettlement {
        payee_id,
        period,
        schedule,
        settlement: &s,
        payout_id,
        actor,
        requested: false,
    };
    let Some(id) = settlements::insert(&mut tx, &new, now).await? else {
        return Ok(Group::AlreadySettled); // dropped: rolled back, payout included
    };
    let ids: Vec<i64> = rows.iter().map(|e| e.id).collect();
    let (lined, positions) = earning_lines(&s);
    anyhow::ensure!(
        lined == ids,
        "payee {payee_id}: the settlement's earning lines are not its earnings; nothing written"
    );
    let marked =
        earnings::mark_settled(&mut tx, &ids, &positions, id, payout_id.map(PayoutId::new)).await?;
    anyhow::ensure!(
        marked == ids.len() as u64,
        "payee {payee_id}: {} of {} locked earnings were settled meanwhile; nothing written",
        ids.len() as u64 - marked,
        ids.len()
    );
    // Balances, and remainders (whose earnings the payout that kept them paid).
    let (remainders, balances): (Vec<_>, Vec<_>) = carries.iter().partition(|c| c.remainder);
    if !balances.is_empty() {
        let carry_ids: Vec<i64> = balances.iter().map(|c| c.id).collect();
        settlements::consume_carries(&mut tx, &carry_ids, id).await?;
        if let Some(p) = payout_id {
            earnings::mark_paid_through_carry(&mut tx, &carry_ids, PayoutId::new(p)).await?;
        }
    }
    if !remainders.is_empty() {
        let ids: Vec<i64> = remainders.iter().map(|c| c.id).collect();
        settlements::consume_remainders(&mut tx, &ids, id).await?;
    }
    settlement_events::record(&mut tx, &[id], now).await?;
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

/// The early payout requests whose charge of the agreed deductions counts
/// for a scheduled `period`: those made in it (on a manual schedule, since
/// the last settled period ended). A request charges the deductions of the
/// period it is made in ([`request_deductions_window`]), so the period's
/// settlement does not charge them again.
fn requests_window(
    schedule: Schedule,
    latest: Option<DateTime<Utc>>,
    period: Period,
) -> (Option<DateTime<Utc>>, DateTime<Utc>) {
    if schedule.is_automatic() {
        (Some(period.start), period.end)
    } else {
        (latest, period.end)
    }
}

/// The window of the period whose agreed deductions an early payout
/// request made at `now` charges: the scheduled period containing `now`
/// (from the end of the last settled period, as the run cuts it); on a
/// manual schedule, everything since the last settled period ended. The
/// request charges them unless a request made in that window did already
/// (the scheduled settlement of the period comes only after it closes).
pub(crate) fn request_deductions_window(
    schedule: Schedule,
    latest: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    match schedule.next_period(latest, now) {
        Some(p) => (Some(p.start), Some(p.end)),
        None => (latest, None),
    }
}

/// The earnings one payout takes from those released by its period's end
/// (oldest release first, then by id): all of them, or on a `per_earning`
/// schedule only the first, so that every earning is its own payout even
/// when several were released at one instant or one was imported after a
/// later one was settled (the rest go, one by one, into the next instants).
fn payable(schedule: Schedule, rows: &[earnings::Earning]) -> &[earnings::Earning] {
    match schedule {
        Schedule::PerEarning => &rows[..rows.len().min(1)],
        _ => rows,
    }
}

/// The external reference a payout carries to the gateway: its one
/// earning's, on a `per_earning` schedule (the booking it releases).
pub(crate) fn external_ref(schedule: Schedule, rows: &[earnings::Earning]) -> Option<String> {
    match (schedule, rows) {
        (Schedule::PerEarning, [one]) => Some(one.external_ref.clone()),
        _ => None,
    }
}

/// The earnings of a settlement's earning lines, in line order, with each
/// line's position (from 1, among all its lines): what the earnings keep so
/// that `payout_lines` shows their lines without storing them twice.
pub(crate) fn earning_lines(s: &Settlement) -> (Vec<i64>, Vec<i32>) {
    s.lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| Some((l.earning_id?, i32::try_from(i + 1).unwrap_or(i32::MAX))))
        .unzip()
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

pub(crate) fn input(
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
                    (_, Some(p)) if c.remainder => format!(
                        "kept from payout {p} (below the gateway's payout step; settlement {} of {})",
                        c.id,
                        Period {
                            start: c.period_start,
                            end: c.period_end
                        }
                    ),
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

/// The policy settlement applies with this fleet's gateway: `[policy]`,
/// with each payout rounded down to what `gateway.kind` can send (the rest
/// kept in the payee's balance, see
/// [`crate::gateway::stripe_currency::policy_for_kind`]). For `settle`, the
/// producer's settlement pass and `preview` alike.
pub fn policy_for(settings: &crate::config::Settings) -> anyhow::Result<crate::domain::Policy> {
    Ok(crate::gateway::stripe_currency::policy_for_kind(
        settings.gateway.kind,
        settings.policy.load()?,
    ))
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
            tracing::warn!(error = %format_args!("{e:#}"), "settlement interval not readable; retrying next tick");
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Held {
    /// The currency.
    pub currency: String,
    /// How many.
    pub earnings: i64,
    /// Their gross.
    #[schema(value_type = crate::domain::DecimalString)]
    pub gross: Decimal,
    /// The first release.
    pub first_release: DateTime<Utc>,
}

/// What the next period would pay, computed and not written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Preview {
    /// The payee.
    pub payee_id: i64,
    /// Its schedule (`daily`, `weekly:mon`, `monthly:1`, `every:14:2026-01-05`, `manual`, ...).
    #[schema(value_type = String)]
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
    /// One computation per currency with earnings released by the period's end:
    /// `currency`, `services`, the amounts (`gross`, `payee_share`,
    /// `platform_commission`, `deductions`, `carried_in`, `fee`, `net`,
    /// `carried_out`, ... as decimal strings), `outcome` (`payout`,
    /// `below_minimum` with its `minimum`, `shortfall`), `method` and
    /// `lines` (`kind`, `description`, `amount`, `earning_id`, `carried_from`).
    #[schema(value_type = Vec<Object>)]
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
    let mut codes = earnings::unsettled_currencies(&mut conn, PayeeId::new(payee_id)).await?;
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
        let mut rows =
            earnings::unsettled(&mut conn, PayeeId::new(payee_id), code, period.end, false).await?;
        rows.truncate(payable(schedule, &rows).len());
        let carries =
            settlements::open_carries(&mut conn, payee_id, code, period.end, false).await?;
        if rows.is_empty() && !carries.iter().any(|c| c.is_returned()) {
            continue;
        }
        let deductions = if rows.is_empty() {
            Vec::new()
        } else {
            let agreed = payee_terms::deductions(&mut conn, payee_id, code).await?;
            let latest = settlements::latest_end(&mut conn, payee_id, code).await?;
            let (since, until) = requests_window(schedule, latest, period);
            if agreed.is_empty()
                || settlements::deductions_requested(&mut conn, payee_id, code, since, Some(until))
                    .await?
            {
                Vec::new() // charged by an early payout request in the period
            } else {
                agreed
            }
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
    let held = earnings::held(&mut conn, PayeeId::new(payee_id), period.end)
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

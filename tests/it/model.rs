//! A model-based test of the payout lifecycle (reliability issue, item 2).
//!
//! Random sequences of producer passes (`queue_due`, `sweep_expired`), worker
//! claims and outcomes (with fresh and stale fencing tokens, through
//! `db::payouts` directly or through the worker's group-commit `db::batch`),
//! operator actions (`enqueue_now`, `retry`, `cancel`) and clock jumps run
//! against the real repository on a real Postgres and, side by side, against
//! a small in-memory model of the rules in DESIGN.md. After every step:
//!
//! - each function's return value is the model's (where SQL may pick either of
//!   two rows tied on `ORDER BY … LIMIT`, any choice the rules allow is taken
//!   and the model follows it);
//! - every payout row (status, attempt, retry base, lease, next attempt, due
//!   time, transfer id, failure code, paid time, updated time) is the model's;
//! - the event log is the model's, one row per transition, nothing else;
//! - and, independently of the model: `attempt` never decreases, a paid payout
//!   never changes again, a finish with a stale token changes nothing, every
//!   status change has exactly one event with matching from/to, and the event
//!   log of every payout is a legal chain per [`PayoutStatus::can_move_to`].
//!
//! One database per test function; each proptest case truncates it and
//! creates its payouts afresh. Time is a [`FakeClock`]; nothing sleeps. A
//! failure prints the shrunk sequence of steps.
//! `PROPTEST_CASES=1000 cargo test --test it model::` runs a deeper search;
//! `-- --ignored` runs the tests that show the bugs this one found.

use crate::common;

use std::{collections::BTreeMap, fmt, ops::RangeInclusive};

use chrono::{DateTime, Duration, TimeZone, Utc};
use payouts::{
    clock::{Clock, FakeClock},
    db::{batch::Batcher, payees, payouts as repo},
    domain::{Currency, Money, PayoutStatus},
};
use proptest::{
    prelude::*,
    strategy::Union,
    test_runner::{Config, TestCaseError, TestError, TestRunner},
};
use repo::{ActionError, Claimed, Finish, Payout};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use PayoutStatus::*;

const WORKERS: [&str; 3] = ["worker:w0", "worker:w1", "worker:w2"];
const PRODUCER: &str = "producer:model";
const OPERATOR: &str = "operator:model";
const ACCOUNT: &str = "acct_model";
/// An id no payout has.
const UNKNOWN_ID: i64 = 1_000_000;

/// Where every case's clock starts (whole seconds: Postgres keeps microseconds).
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// Which payout an operation aims at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The i-th payout of the case (modulo how many there are).
    Payout(usize),
    /// An id that does not exist.
    Unknown,
}

/// Which successful claim an outcome is reported for: the worker that made
/// it finishes that payout with the token it got (stale if the payout has
/// moved on since: a takeover, a sweep, an operator, an earlier finish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The latest claim of the case (`w0` on payout 1 with token 0 if none yet).
    Newest,
    /// That many claims before the latest (saturating at the first).
    Older(u8),
}

/// How a claim or final write reaches Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `db::payouts::claim` / `db::payouts::finish`: the worker's batched
    /// statements with one row, run at once.
    Direct,
    /// `db::batch::Batcher` (the worker's path): the same statements, rows
    /// of concurrent calls grouped.
    Batched,
}

/// What the gateway said, as the worker records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Paid,
    InTransit,
    /// Try again `after_secs` from now (may be in the past).
    Retrying {
        after_secs: i64,
    },
    Failed,
}

/// One step of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// Producer: `queue_due(now, limit, now + lease_secs)`.
    QueueDue { limit: i64, lease_secs: i64 },
    /// Producer: `sweep_expired(now, limit, now + lease_secs)`.
    Sweep { limit: i64, lease_secs: i64 },
    /// Worker `WORKERS[worker]`: `claim(id, owner, now, now + lease_secs)`.
    Claim {
        worker: usize,
        target: Target,
        lease_secs: i64,
        via: Via,
    },
    /// The worker that made claim `claim`: `finish(id, token, outcome)`.
    Finish {
        claim: Held,
        outcome: Outcome,
        via: Via,
    },
    /// Two claims at once through one worker process's batcher (one statement).
    ClaimTogether {
        workers: [usize; 2],
        targets: [Target; 2],
        lease_secs: i64,
    },
    /// Two final writes at once through one worker process's batcher (one statement).
    FinishTogether {
        claims: [Held; 2],
        outcomes: [Outcome; 2],
    },
    /// Operator: `enqueue_now(id, lease)`.
    EnqueueNow { target: Target, lease_secs: i64 },
    /// Operator: `retry(id, lease)`.
    Retry { target: Target, lease_secs: i64 },
    /// Operator: `cancel(id)`.
    Cancel { target: Target },
    /// The clock moves forward.
    Advance { secs: i64 },
}

/// One generated case: the payouts (due `due_in_secs` after t0) and the steps.
#[derive(Clone)]
struct Case {
    due_in_secs: Vec<i64>,
    ops: Vec<Op>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "payouts due at t0 + {:?} s (ids 1..)", self.due_in_secs)?;
        for (i, op) in self.ops.iter().enumerate() {
            writeln!(f, "  {i:>2}: {op:?}")?;
        }
        Ok(())
    }
}

/// How often each kind of step is drawn, and its parameters.
#[derive(Clone)]
struct Mix {
    payouts: RangeInclusive<usize>,
    max_ops: usize,
    /// Time values are drawn from small sets, so that a lease ends exactly
    /// when a claim or sweep looks, a payout falls due exactly at a producer
    /// pass, and every `<` / `<=` boundary in the SQL gets hit.
    due_in_secs: &'static [i64],
    lease_secs: &'static [i64],
    advance_secs: &'static [i64],
    retry_after_secs: &'static [i64],
    /// How often each kind of step is drawn.
    w: Weights,
    /// Weights of Paid, InTransit, Retrying, Failed.
    w_outcomes: [u32; 4],
}

/// Relative frequencies of the kinds of step (0: never).
#[derive(Clone, Copy)]
struct Weights {
    queue_due: u32,
    sweep: u32,
    claim: u32,
    finish: u32,
    claim_together: u32,
    finish_together: u32,
    enqueue: u32,
    retry: u32,
    cancel: u32,
    advance: u32,
}

/// Everything, evenly: every transition gets exercised.
fn lifecycle_mix() -> Mix {
    Mix {
        payouts: 1..=3,
        max_ops: 40,
        due_in_secs: &[0, -10, 5, 30, 60, 120],
        lease_secs: &[5, 10, 30, 60, 120],
        advance_secs: &[1, 5, 10, 30, 60, 120],
        retry_after_secs: &[0, -5, 5, 30, 60, 300],
        w: Weights {
            queue_due: 4,
            sweep: 2,
            claim: 8,
            finish: 7,
            claim_together: 1,
            finish_together: 0,
            enqueue: 1,
            retry: 2,
            cancel: 1,
            advance: 4,
        },
        w_outcomes: [3, 1, 3, 2],
    }
}

/// Workers racing over one or two payouts with short leases: takeovers,
/// stale tokens and payments, with fewer operator interruptions.
fn contention_mix() -> Mix {
    Mix {
        payouts: 1..=2,
        max_ops: 40,
        due_in_secs: &[0, -1, 1, 5],
        lease_secs: &[1, 2, 5],
        advance_secs: &[1, 2, 5, 10],
        retry_after_secs: &[0, -1, 1, 5, 10],
        w: Weights {
            queue_due: 2,
            sweep: 3,
            claim: 8,
            finish: 5,
            claim_together: 2,
            finish_together: 0,
            enqueue: 1,
            retry: 1,
            cancel: 1,
            advance: 6,
        },
        w_outcomes: [4, 1, 3, 1],
    }
}

fn target() -> impl Strategy<Value = Target> + Clone {
    prop_oneof![12 => (0..3usize).prop_map(Target::Payout), 1 => Just(Target::Unknown)]
}

fn via() -> impl Strategy<Value = Via> {
    prop_oneof![Just(Via::Direct), Just(Via::Batched)]
}

fn held() -> impl Strategy<Value = Held> + Clone {
    prop_oneof![3 => Just(Held::Newest), 1 => (1u8..=3).prop_map(Held::Older)]
}

fn outcome(m: &Mix) -> impl Strategy<Value = Outcome> + use<> {
    let [paid, in_transit, retrying, failed] = m.w_outcomes;
    let retry_after = prop::sample::select(m.retry_after_secs);
    let arms: Vec<(u32, BoxedStrategy<Outcome>)> = vec![
        (paid, Just(Outcome::Paid).boxed()),
        (in_transit, Just(Outcome::InTransit).boxed()),
        (
            retrying,
            retry_after
                .prop_map(|after_secs| Outcome::Retrying { after_secs })
                .boxed(),
        ),
        (failed, Just(Outcome::Failed).boxed()),
    ];
    Union::new_weighted(arms.into_iter().filter(|(w, _)| *w > 0).collect())
}

fn op(m: &Mix) -> impl Strategy<Value = Op> + use<> {
    let lease = prop::sample::select(m.lease_secs);
    let worker = 0..WORKERS.len();
    let arms: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            m.w.queue_due,
            (1i64..=3, lease.clone())
                .prop_map(|(limit, lease_secs)| Op::QueueDue { limit, lease_secs })
                .boxed(),
        ),
        (
            m.w.sweep,
            (1i64..=3, lease.clone())
                .prop_map(|(limit, lease_secs)| Op::Sweep { limit, lease_secs })
                .boxed(),
        ),
        (
            m.w.claim,
            (worker.clone(), target(), lease.clone(), via())
                .prop_map(|(worker, target, lease_secs, via)| Op::Claim {
                    worker,
                    target,
                    lease_secs,
                    via,
                })
                .boxed(),
        ),
        (
            m.w.finish,
            (held(), outcome(m), via())
                .prop_map(|(claim, outcome, via)| Op::Finish {
                    claim,
                    outcome,
                    via,
                })
                .boxed(),
        ),
        (
            m.w.claim_together,
            (
                [worker.clone(), worker],
                [target(), target()],
                lease.clone(),
            )
                .prop_map(|(workers, targets, lease_secs)| Op::ClaimTogether {
                    workers,
                    targets,
                    lease_secs,
                })
                .boxed(),
        ),
        (
            m.w.finish_together,
            ([held(), held()], [outcome(m), outcome(m)])
                .prop_map(|(claims, outcomes)| Op::FinishTogether { claims, outcomes })
                .boxed(),
        ),
        (
            m.w.enqueue,
            (target(), lease.clone())
                .prop_map(|(target, lease_secs)| Op::EnqueueNow { target, lease_secs })
                .boxed(),
        ),
        (
            m.w.retry,
            (target(), lease)
                .prop_map(|(target, lease_secs)| Op::Retry { target, lease_secs })
                .boxed(),
        ),
        (
            m.w.cancel,
            target().prop_map(|target| Op::Cancel { target }).boxed(),
        ),
        (
            m.w.advance,
            prop::sample::select(m.advance_secs)
                .prop_map(|secs| Op::Advance { secs })
                .boxed(),
        ),
    ];
    Union::new_weighted(arms.into_iter().filter(|(w, _)| *w > 0).collect())
}

fn case(m: Mix) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(prop::sample::select(m.due_in_secs), m.payouts.clone()),
        prop::collection::vec(op(&m), 1..=m.max_ops),
    )
        .prop_map(|(due_in_secs, ops)| Case { due_in_secs, ops })
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// One event row: a transition and the attempt it happened under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ev {
    from: Option<PayoutStatus>,
    to: PayoutStatus,
    attempt: i32,
}

/// The observable columns of a payout row (model and database alike).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    status: PayoutStatus,
    attempt: i32,
    retry_base: i32,
    due_at: DateTime<Utc>,
    next_attempt_at: Option<DateTime<Utc>>,
    lease_owner: Option<String>,
    lease_until: Option<DateTime<Utc>>,
    transfer_id: Option<String>,
    failure_code: Option<String>,
    paid_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

impl From<&Payout> for Row {
    fn from(p: &Payout) -> Row {
        Row {
            status: p.status,
            attempt: p.attempt,
            retry_base: p.retry_base,
            due_at: p.due_at,
            next_attempt_at: p.next_attempt_at,
            lease_owner: p.lease_owner.clone(),
            lease_until: p.lease_until,
            transfer_id: p.gateway_transfer_id.clone(),
            failure_code: p.failure_code.clone(),
            paid_at: p.paid_at,
            updated_at: p.updated_at,
        }
    }
}

/// A payout in the model: its row and the events it should have.
#[derive(Debug, Clone)]
struct MPayout {
    id: i64,
    row: Row,
    events: Vec<Ev>,
}

impl MPayout {
    /// Moves to `to`, recording the event the statement writes.
    fn moved(&mut self, to: PayoutStatus) {
        self.events.push(Ev {
            from: Some(self.row.status),
            to,
            attempt: self.row.attempt,
        });
        self.row.status = to;
    }
}

/// What an operator action answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActResult {
    /// `Ok(from)`.
    Moved(PayoutStatus),
    /// `Err(Illegal { from, to })`.
    Illegal {
        from: PayoutStatus,
        to: PayoutStatus,
    },
    /// `Err(NotFound)`.
    NotFound,
}

/// The lifecycle rules of DESIGN.md, in memory.
#[derive(Debug, Default)]
struct Model {
    payouts: Vec<MPayout>,
}

/// Statuses an operator enqueue moves from (`queued` answers Ok without change).
const ENQUEUE_FROM: [PayoutStatus; 3] = [Pending, Retrying, Held];
/// Statuses an operator retry moves from.
const RETRY_FROM: [PayoutStatus; 1] = [Failed];
/// Statuses an operator cancel moves from.
const CANCEL_FROM: [PayoutStatus; 5] = [Pending, Queued, Retrying, Failed, Held];

impl Model {
    fn create(&mut self, id: i64, due_at: DateTime<Utc>, now: DateTime<Utc>) {
        self.payouts.push(MPayout {
            id,
            row: Row {
                status: Pending,
                attempt: 0,
                retry_base: 0,
                due_at,
                next_attempt_at: None,
                lease_owner: None,
                lease_until: None,
                transfer_id: None,
                failure_code: None,
                paid_at: None,
                updated_at: now,
            },
            events: vec![Ev {
                from: None,
                to: Pending,
                attempt: 0,
            }],
        });
    }

    fn get_mut(&mut self, id: i64) -> Option<&mut MPayout> {
        self.payouts.iter_mut().find(|p| p.id == id)
    }

    fn status(&self, id: i64) -> Option<PayoutStatus> {
        self.payouts
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.row.status)
    }

    /// Moves `id` to `queued` under a fresh producer lease.
    fn queue(&mut self, id: i64, now: DateTime<Utc>, lease_until: DateTime<Utc>) {
        let p = self.get_mut(id).expect("known payout");
        if p.row.status != Queued {
            p.moved(Queued);
        }
        p.row.lease_until = Some(lease_until);
        p.row.lease_owner = None;
        p.row.updated_at = now;
    }

    /// `queue_due`: retrying payouts whose next attempt is due (earliest
    /// first), then pending payouts that are due (earliest first), `limit` in
    /// all. Validates the database's choice and follows it.
    fn queue_due(
        &mut self,
        now: DateTime<Utc>,
        limit: i64,
        lease_until: DateTime<Utc>,
        chosen: &[i64],
    ) -> Result<(), String> {
        let retrying: Vec<_> = self
            .payouts
            .iter()
            .filter(|p| p.row.status == Retrying && p.row.next_attempt_at.is_some_and(|t| t <= now))
            .map(|p| (p.row.next_attempt_at.unwrap(), p.id))
            .collect();
        let pending: Vec<_> = self
            .payouts
            .iter()
            .filter(|p| p.row.status == Pending && p.row.due_at <= now)
            .map(|p| (p.row.due_at, p.id))
            .collect();
        let (mut from_retrying, mut from_pending) = (vec![], vec![]);
        for &id in chosen {
            match self.status(id) {
                Some(Retrying) => from_retrying.push(id),
                Some(Pending) => from_pending.push(id),
                other => {
                    return Err(format!(
                        "queue_due returned payout {id}, which is {other:?}"
                    ));
                }
            }
        }
        check_choice("queue_due (retrying)", retrying, limit, &from_retrying)?;
        let rest = limit - from_retrying.len() as i64;
        check_choice("queue_due (pending)", pending, rest.max(0), &from_pending)?;
        for &id in chosen {
            self.queue(id, now, lease_until);
        }
        Ok(())
    }

    /// `sweep_expired`: queued or processing payouts whose lease ran out
    /// (earliest first, `limit`) go back to queued under a fresh lease; only a
    /// processing one changes status (and gets an event).
    fn sweep(
        &mut self,
        now: DateTime<Utc>,
        limit: i64,
        lease_until: DateTime<Utc>,
        chosen: &[i64],
    ) -> Result<(), String> {
        let expired: Vec<_> = self
            .payouts
            .iter()
            .filter(|p| matches!(p.row.status, Queued | Processing))
            .filter_map(|p| p.row.lease_until.filter(|&t| t < now).map(|t| (t, p.id)))
            .collect();
        check_choice("sweep_expired", expired, limit, chosen)?;
        for &id in chosen {
            self.queue(id, now, lease_until);
        }
        Ok(())
    }

    /// `claim`: from queued, or processing with a lease that ran out; the
    /// attempt goes up by one and is the new fencing token.
    fn claim(
        &mut self,
        id: i64,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Option<i32> {
        let p = self.get_mut(id)?;
        let claimable = match p.row.status {
            Queued => true,
            Processing => p.row.lease_until.is_some_and(|t| t < now),
            _ => false,
        };
        if !claimable {
            return None;
        }
        p.row.attempt += 1;
        p.moved(Processing);
        p.row.lease_owner = Some(owner.to_string());
        p.row.lease_until = Some(lease_until);
        p.row.updated_at = now;
        Some(p.row.attempt)
    }

    /// `finish`: only while processing under exactly this token.
    fn finish(&mut self, id: i64, token: i32, outcome: &Finish, now: DateTime<Utc>) -> bool {
        let Some(p) = self.get_mut(id) else {
            return false;
        };
        if p.row.status != Processing || p.row.attempt != token {
            return false;
        }
        match outcome {
            Finish::Paid { transfer_id } | Finish::InTransit { transfer_id } => {
                p.row.transfer_id = Some(transfer_id.clone());
                p.row.next_attempt_at = None;
                p.row.failure_code = None;
            }
            Finish::Retrying {
                next_attempt_at,
                code,
                ..
            } => {
                p.row.next_attempt_at = Some(*next_attempt_at);
                p.row.failure_code = Some(code.clone());
            }
            Finish::Failed { code, .. } | Finish::Held { code, .. } => {
                p.row.next_attempt_at = None;
                p.row.failure_code = Some(code.clone());
            }
        }
        if outcome.status() == Paid {
            p.row.paid_at = Some(now);
        }
        p.row.lease_owner = None;
        p.row.lease_until = None;
        p.row.updated_at = now;
        p.moved(outcome.status());
        true
    }

    /// An operator action: `from` one of `from` to `to`, answering the status it left.
    fn act(
        &mut self,
        id: i64,
        from: &[PayoutStatus],
        to: PayoutStatus,
        lease_until: Option<DateTime<Utc>>,
        reset_budget: bool,
        now: DateTime<Utc>,
    ) -> ActResult {
        let Some(p) = self.get_mut(id) else {
            return ActResult::NotFound;
        };
        let was = p.row.status;
        if !from.contains(&was) {
            return ActResult::Illegal { from: was, to };
        }
        p.moved(to);
        p.row.lease_until = lease_until;
        p.row.lease_owner = None;
        p.row.updated_at = now;
        if reset_budget {
            p.row.retry_base = p.row.attempt;
            p.row.next_attempt_at = None;
        }
        ActResult::Moved(was)
    }

    fn enqueue_now(
        &mut self,
        id: i64,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> ActResult {
        match self.act(id, &ENQUEUE_FROM, Queued, Some(lease_until), false, now) {
            ActResult::Illegal { from: Queued, .. } => ActResult::Moved(Queued),
            other => other,
        }
    }

    fn retry(&mut self, id: i64, lease_until: DateTime<Utc>, now: DateTime<Utc>) -> ActResult {
        self.act(id, &RETRY_FROM, Queued, Some(lease_until), true, now)
    }

    fn cancel(&mut self, id: i64, now: DateTime<Utc>) -> ActResult {
        self.act(id, &CANCEL_FROM, Cancelled, None, false, now)
    }
}

/// Whether `chosen` is a choice `ORDER BY key LIMIT limit` may make from
/// `candidates` (any of the rows tied at the boundary will do).
fn check_choice(
    what: &str,
    mut candidates: Vec<(DateTime<Utc>, i64)>,
    limit: i64,
    chosen: &[i64],
) -> Result<(), String> {
    candidates.sort();
    let take = (limit.max(0) as usize).min(candidates.len());
    let mut sorted = chosen.to_vec();
    sorted.sort();
    sorted.dedup();
    let bad = || {
        format!("{what} with limit {limit} chose {chosen:?}; candidates (key, id): {candidates:?}")
    };
    if sorted.len() != chosen.len() || chosen.len() != take {
        return Err(bad());
    }
    let Some(&(boundary, _)) = take.checked_sub(1).map(|i| &candidates[i]) else {
        return Ok(());
    };
    let earlier_all_taken = candidates
        .iter()
        .all(|(k, id)| *k >= boundary || chosen.contains(id));
    let all_allowed = chosen
        .iter()
        .all(|id| candidates.iter().any(|(k, c)| c == id && *k <= boundary));
    if earlier_all_taken && all_allowed {
        Ok(())
    } else {
        Err(bad())
    }
}

// ---------------------------------------------------------------------------
// The database side
// ---------------------------------------------------------------------------

/// Every payout row and every payout's event log.
#[derive(Debug, Clone)]
struct Snapshot {
    rows: BTreeMap<i64, Payout>,
    events: BTreeMap<i64, Vec<Ev>>,
}

async fn snapshot(pool: &PgPool) -> Result<Snapshot, String> {
    let rows: Vec<Payout> = sqlx::query_as("SELECT * FROM payouts ORDER BY id")
        .fetch_all(pool)
        .await
        .map_err(db)?;
    let raw: Vec<(i64, Option<String>, String, Option<i32>)> = sqlx::query_as(
        "SELECT payout_id, from_status, to_status, attempt FROM payout_events ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    let mut events: BTreeMap<i64, Vec<Ev>> = rows.iter().map(|p| (p.id.get(), vec![])).collect();
    for (id, from, to, attempt) in raw {
        let ev = Ev {
            from: from.map(|s| s.parse()).transpose()?,
            to: to.parse()?,
            attempt: attempt.ok_or_else(|| format!("event of payout {id} without attempt"))?,
        };
        events
            .get_mut(&id)
            .ok_or_else(|| format!("event for payout {id}, which has no row"))?
            .push(ev);
    }
    Ok(Snapshot {
        rows: rows.into_iter().map(|p| (p.id.get(), p)).collect(),
        events,
    })
}

fn raw_ids(ids: &[payouts::domain::PayoutId]) -> Vec<i64> {
    ids.iter().map(|id| id.get()).collect()
}

fn db(e: sqlx::Error) -> String {
    format!("database error: {e}")
}

fn act_result(r: Result<PayoutStatus, ActionError>) -> Result<ActResult, String> {
    match r {
        Ok(from) => Ok(ActResult::Moved(from)),
        Err(ActionError::Illegal(e)) => Ok(ActResult::Illegal {
            from: e.from,
            to: e.to,
        }),
        Err(ActionError::NotFound(_)) => Ok(ActResult::NotFound),
        // The model never suspends a payee.
        Err(e @ ActionError::PayeeSuspended { .. }) => Err(e.to_string()),
        Err(ActionError::Db(e)) => Err(db(e)),
    }
}

/// What a step's claims and final writes answered, for the
/// model-independent invariants.
#[derive(Debug)]
struct Effect {
    now: DateTime<Utc>,
    /// (payout, token returned).
    claims: Vec<(i64, Option<i32>)>,
    /// (payout, token, reported written).
    finishes: Vec<(i64, i32, bool)>,
}

/// One case in progress: the database, the model, the clock and what each
/// worker holds.
struct Run<'a> {
    pool: &'a PgPool,
    model: Model,
    clock: std::sync::Arc<FakeClock>,
    ids: Vec<i64>,
    /// Every successful claim so far: (worker, payout, token), oldest first.
    claims: Vec<(usize, i64, i32)>,
    /// Successful `finish(Paid)` writes per payout.
    paid_writes: BTreeMap<i64, u32>,
    /// The worker processes' batcher (one is enough: every op is its own batch
    /// except the `*Together` ones).
    batcher: Batcher,
}

macro_rules! agree {
    ($what:expr, $db:expr, $model:expr) => {{
        let (d, m) = (&$db, &$model);
        if d != m {
            return Err(format!(
                "{} disagrees: repository {:?}, model {:?}",
                $what, d, m
            ));
        }
    }};
}

impl Run<'_> {
    fn id(&self, t: Target) -> i64 {
        match t {
            Target::Payout(i) => self.ids[i % self.ids.len()],
            Target::Unknown => UNKNOWN_ID,
        }
    }

    /// The worker, payout and token of one of the claims so far.
    fn held(&self, which: Held) -> (usize, i64, i32) {
        let back = match which {
            Held::Newest => 0,
            Held::Older(k) => usize::from(k),
        };
        match self.claims.len() {
            0 => (0, self.ids[0], 0),
            n => self.claims[n - 1 - back.min(n - 1)],
        }
    }

    /// Runs one step on both sides and compares the answers. `effect`
    /// collects what claims and final writes answered, even on an error.
    async fn step(&mut self, op: &Op, effect: &mut Effect) -> Result<(), String> {
        let now = self.clock.now();
        let secs = |s: i64| now + Duration::seconds(s);
        match *op {
            Op::Advance { secs } => {
                self.clock.advance(Duration::seconds(secs));
            }
            Op::QueueDue { limit, lease_secs } => {
                let ids = repo::queue_due(self.pool, now, limit, secs(lease_secs), PRODUCER)
                    .await
                    .map_err(db)?;
                self.model
                    .queue_due(now, limit, secs(lease_secs), &raw_ids(&ids))?;
            }
            Op::Sweep { limit, lease_secs } => {
                let ids = repo::sweep_expired(self.pool, now, limit, secs(lease_secs), PRODUCER)
                    .await
                    .map_err(db)?;
                self.model
                    .sweep(now, limit, secs(lease_secs), &raw_ids(&ids))?;
            }
            Op::Claim {
                worker,
                target,
                lease_secs,
                via,
            } => {
                let id = self.id(target);
                let lease_until = secs(lease_secs);
                let owner = WORKERS[worker];
                let claimed = match via {
                    Via::Direct => repo::claim(
                        self.pool,
                        payouts::domain::PayoutId::new(id),
                        owner,
                        now,
                        lease_until,
                    )
                    .await
                    .map_err(db)?,
                    Via::Batched => self
                        .batcher
                        .claim(payouts::domain::PayoutId::new(id), owner, now, lease_until)
                        .await
                        .map_err(|e| e.to_string())?,
                };
                let got = self.claimed(worker, id, now, lease_until, claimed)?;
                effect.claims.push((id, got));
            }
            Op::ClaimTogether {
                workers,
                targets,
                lease_secs,
            } => {
                let ids = targets.map(|t| self.id(t));
                let lease_until = secs(lease_secs);
                let (a, b) = tokio::join!(
                    self.batcher.claim(
                        payouts::domain::PayoutId::new(ids[0]),
                        WORKERS[workers[0]],
                        now,
                        lease_until
                    ),
                    self.batcher.claim(
                        payouts::domain::PayoutId::new(ids[1]),
                        WORKERS[workers[1]],
                        now,
                        lease_until
                    ),
                );
                // Batched in id order, ties in arrival order: the model claims in that order.
                for (i, claimed) in [a, b].into_iter().enumerate() {
                    let claimed = claimed.map_err(|e| e.to_string())?;
                    let got = self.claimed(workers[i], ids[i], now, lease_until, claimed)?;
                    effect.claims.push((ids[i], got));
                }
            }
            Op::Finish {
                claim,
                outcome,
                via,
            } => {
                let (worker, id, token) = self.held(claim);
                let finish = finish_of(outcome, id, token, now);
                let (actor, reason) = (WORKERS[worker], finish_reason(&finish));
                let wrote = match via {
                    Via::Direct => repo::finish(
                        self.pool,
                        payouts::domain::PayoutId::new(id),
                        token,
                        &finish,
                        actor,
                        &reason,
                        now,
                    )
                    .await
                    .map_err(db)?,
                    Via::Batched => self
                        .batcher
                        .finish(
                            payouts::domain::PayoutId::new(id),
                            token,
                            &finish,
                            actor,
                            &reason,
                            now,
                        )
                        .await
                        .map_err(|e| e.to_string())?,
                };
                effect.finishes.push((id, token, wrote));
                self.finished(worker, id, token, &finish, now, wrote)?;
            }
            Op::FinishTogether { claims, outcomes } => {
                let held = claims.map(|c| self.held(c));
                let finishes = [0, 1].map(|i| finish_of(outcomes[i], held[i].1, held[i].2, now));
                let reasons = [0, 1].map(|i| finish_reason(&finishes[i]));
                let (a, b) = tokio::join!(
                    self.batcher.finish(
                        payouts::domain::PayoutId::new(held[0].1),
                        held[0].2,
                        &finishes[0],
                        WORKERS[held[0].0],
                        &reasons[0],
                        now
                    ),
                    self.batcher.finish(
                        payouts::domain::PayoutId::new(held[1].1),
                        held[1].2,
                        &finishes[1],
                        WORKERS[held[1].0],
                        &reasons[1],
                        now
                    ),
                );
                let answers = [a, b].map(|r| r.map_err(|e| e.to_string()));
                for (i, wrote) in answers.into_iter().enumerate() {
                    let (_, id, token) = held[i];
                    effect.finishes.push((id, token, wrote?));
                }
                // Batched in id order, ties in arrival order: the model writes in that order.
                for (i, &(worker, id, token)) in held.iter().enumerate() {
                    let wrote = effect.finishes[i].2;
                    self.finished(worker, id, token, &finishes[i], now, wrote)?;
                }
            }
            Op::EnqueueNow { target, lease_secs } => {
                let id = self.id(target);
                let got = act_result(
                    repo::enqueue_now(
                        self.pool,
                        payouts::domain::PayoutId::new(id),
                        OPERATOR,
                        secs(lease_secs),
                        now,
                    )
                    .await,
                )?;
                agree!(
                    "enqueue_now",
                    got,
                    self.model.enqueue_now(id, secs(lease_secs), now)
                );
            }
            Op::Retry { target, lease_secs } => {
                let id = self.id(target);
                let got = act_result(
                    repo::retry(
                        self.pool,
                        payouts::domain::PayoutId::new(id),
                        OPERATOR,
                        secs(lease_secs),
                        now,
                    )
                    .await,
                )?;
                agree!("retry", got, self.model.retry(id, secs(lease_secs), now));
            }
            Op::Cancel { target } => {
                let id = self.id(target);
                let got = act_result(
                    repo::cancel(
                        self.pool,
                        payouts::domain::PayoutId::new(id),
                        OPERATOR,
                        "model test",
                        now,
                    )
                    .await,
                )?;
                agree!("cancel", got, self.model.cancel(id, now));
            }
        }
        Ok(())
    }

    /// Compares a claim's answer with the model's; remembers the token.
    fn claimed(
        &mut self,
        worker: usize,
        id: i64,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        claimed: Option<Claimed>,
    ) -> Result<Option<i32>, String> {
        let owner = WORKERS[worker];
        let expected = self.model.claim(id, owner, now, lease_until);
        agree!(
            format!("{owner}'s claim of payout {id}: the token"),
            claimed.as_ref().map(|c| c.token()),
            expected
        );
        if let Some(c) = &claimed {
            agree!(
                "the claim's gateway account",
                c.gateway_account.as_str(),
                ACCOUNT
            );
            let m = self.model.payouts.iter().find(|p| p.id == id).unwrap();
            agree!("the claimed payout", Row::from(&c.payout), m.row);
            self.claims.push((worker, id, c.token()));
        }
        Ok(expected)
    }

    /// Compares a final write's answer with the model's.
    fn finished(
        &mut self,
        worker: usize,
        id: i64,
        token: i32,
        finish: &Finish,
        now: DateTime<Utc>,
        wrote: bool,
    ) -> Result<(), String> {
        let expected = self.model.finish(id, token, finish, now);
        agree!(
            format!(
                "{}'s finish ({}) of payout {id} with token {token}: written",
                WORKERS[worker],
                finish.status()
            ),
            wrote,
            expected
        );
        if wrote && finish.status() == Paid {
            *self.paid_writes.entry(id).or_default() += 1;
        }
        Ok(())
    }

    /// The rows and event logs are exactly the model's.
    fn check_model(&self, snap: &Snapshot) -> Result<(), String> {
        agree!(
            "the set of payouts",
            snap.rows.keys().copied().collect::<Vec<_>>(),
            self.model.payouts.iter().map(|p| p.id).collect::<Vec<_>>()
        );
        for m in &self.model.payouts {
            agree!(
                format!("payout {}", m.id),
                Row::from(&snap.rows[&m.id]),
                m.row
            );
            agree!(
                format!("the event log of payout {}", m.id),
                snap.events[&m.id],
                m.events
            );
        }
        Ok(())
    }

    /// The repository's own promises, whatever the model says.
    fn check_invariants(
        &self,
        prev: &Snapshot,
        cur: &Snapshot,
        effect: &Effect,
    ) -> Result<(), String> {
        for (&id, c) in &cur.rows {
            let p = prev
                .rows
                .get(&id)
                .ok_or_else(|| format!("payout {id} appeared"))?;
            let (pe, ce) = (&prev.events[&id], &cur.events[&id]);
            if ce.len() < pe.len() || ce[..pe.len()] != pe[..] {
                return Err(format!(
                    "payout {id}: the event log was rewritten: {pe:?} -> {ce:?}"
                ));
            }
            let new = &ce[pe.len()..];
            if c.attempt < p.attempt {
                return Err(format!(
                    "payout {id}: attempt went down {} -> {}",
                    p.attempt, c.attempt
                ));
            }
            if p.status == Paid && (Row::from(c) != Row::from(p) || !new.is_empty()) {
                return Err(format!(
                    "payout {id} was paid and changed again: {:?} -> {:?}, new events {new:?}",
                    Row::from(p),
                    Row::from(c)
                ));
            }
            // Every status change has exactly one matching event; a
            // re-claim (processing -> processing) has one too; nothing else does.
            let pair: Vec<_> = new.iter().map(|e| (e.from, e.to)).collect();
            let ok = if p.status != c.status {
                pair == [(Some(p.status), c.status)]
            } else {
                new.is_empty()
                    || (pair == [(Some(Processing), Processing)] && c.attempt == p.attempt + 1)
            };
            if !ok {
                return Err(format!(
                    "payout {id}: {} -> {} (attempt {} -> {}) wrote events {pair:?}",
                    p.status, c.status, p.attempt, c.attempt
                ));
            }
            check_event_log(id, ce, c)?;
        }
        let live = |id: i64, token: i32| {
            prev.rows
                .get(&id)
                .is_some_and(|p| p.status == Processing && p.attempt == token)
        };
        let claimable = |id: i64| {
            prev.rows.get(&id).is_some_and(|p| {
                p.status == Queued
                    || (p.status == Processing && p.lease_until.is_some_and(|t| t < effect.now))
            })
        };
        for &(id, token, wrote) in &effect.finishes {
            if wrote && !live(id, token) {
                return Err(format!(
                    "a finish of payout {id} with stale token {token} was reported written; \
                     the row was {:?}",
                    prev.rows.get(&id).map(Row::from)
                ));
            }
            // A live token writes exactly once, however many finishes race.
            let writes = effect.finishes.iter().filter(|f| f.0 == id && f.2).count();
            if live(id, token) && writes != 1 {
                return Err(format!(
                    "payout {id} (token {token} live: {}): {writes} final writes reported",
                    live(id, token)
                ));
            }
        }
        for &(id, got) in &effect.claims {
            let before = prev.rows.get(&id);
            if got.is_some_and(|t| !claimable(id) || Some(t) != before.map(|p| p.attempt + 1)) {
                return Err(format!(
                    "claim of payout {id} returned token {got:?} from {:?}",
                    before.map(Row::from)
                ));
            }
            let granted = effect.claims.iter().filter(|c| c.0 == id && c.1.is_some());
            if granted.count() != usize::from(claimable(id)) {
                return Err(format!(
                    "payout {id} (claimable: {}): claims {:?}",
                    claimable(id),
                    effect.claims
                ));
            }
        }
        let all_refused = effect.claims.iter().all(|c| c.1.is_none())
            && effect.finishes.iter().all(|f| !f.2)
            && !(effect.claims.is_empty() && effect.finishes.is_empty());
        let unchanged = cur.rows.keys().all(|id| {
            Row::from(&cur.rows[id]) == Row::from(&prev.rows[id])
                && cur.events[id].len() == prev.events[id].len()
        });
        if all_refused && !unchanged {
            return Err(format!(
                "refused claims or stale finishes changed something: {effect:?}"
            ));
        }
        for (&id, &n) in &self.paid_writes {
            if n > 1 {
                return Err(format!("payout {id} was recorded paid {n} times"));
            }
        }
        Ok(())
    }
}

/// A payout's event log: created pending, then a chain of legal moves ending
/// where the row is; paid at most once; a paid row has its transfer id.
fn check_event_log(id: i64, events: &[Ev], row: &Payout) -> Result<(), String> {
    let bad = |why: &str| Err(format!("payout {id}: {why}; events {events:?}"));
    match events.first() {
        Some(Ev {
            from: None,
            to: Pending,
            ..
        }) => {}
        _ => return bad("the log does not start with its creation"),
    }
    for w in events.windows(2) {
        let (a, b) = (w[0], w[1]);
        let Some(from) = b.from else {
            return bad("a second creation event");
        };
        if from != a.to {
            return bad("the log is not a chain");
        }
        if !from.can_move_to(b.to) {
            return bad(&format!("illegal move {from} -> {}", b.to));
        }
        if b.attempt < a.attempt {
            return bad("an event's attempt went down");
        }
    }
    if events.last().map(|e| e.to) != Some(row.status) {
        return bad(&format!(
            "the row is {} but the log ends elsewhere",
            row.status
        ));
    }
    if events.iter().filter(|e| e.to == Paid).count() > 1 {
        return bad("paid twice");
    }
    if row.status == Paid && (row.gateway_transfer_id.is_none() || row.paid_at.is_none()) {
        return bad("paid without a transfer id or paid_at");
    }
    Ok(())
}

/// What a worker records for `outcome` on payout `id` under `token`.
fn finish_of(outcome: Outcome, id: i64, token: i32, now: DateTime<Utc>) -> Finish {
    match outcome {
        Outcome::Paid => Finish::Paid {
            transfer_id: format!("tr_{id}_{token}"),
        },
        Outcome::InTransit => Finish::InTransit {
            transfer_id: format!("tr_{id}_{token}"),
        },
        Outcome::Retrying { after_secs } => Finish::Retrying {
            next_attempt_at: now + Duration::seconds(after_secs),
            code: "timeout".into(),
            message: "gateway timed out".into(),
        },
        Outcome::Failed => Finish::Failed {
            code: "account_closed".into(),
            message: "destination account closed".into(),
        },
    }
}

fn finish_reason(finish: &Finish) -> String {
    format!("outcome: {}", finish.status())
}

/// Whether to end every case with the fleet catching up (see
/// [`once_the_fleet_catches_up_no_payout_is_left_unfinished`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    No,
    Yes,
}

/// A day later, the producer sweeps and queues everything due and a worker
/// claims and pays every payout it can.
fn drain_ops(n: usize) -> Vec<Op> {
    let mut ops = vec![
        Op::Advance { secs: 86_400 },
        Op::Sweep {
            limit: 3,
            lease_secs: 60,
        },
        Op::QueueDue {
            limit: 3,
            lease_secs: 60,
        },
    ];
    for i in 0..n {
        ops.push(Op::Claim {
            worker: 0,
            target: Target::Payout(i),
            lease_secs: 60,
            via: Via::Batched,
        });
        ops.push(Op::Finish {
            claim: Held::Newest,
            outcome: Outcome::Paid,
            via: Via::Batched,
        });
    }
    ops
}

async fn run_case(pool: &PgPool, payee: i64, case: &Case, drain: Drain) -> Result<(), String> {
    sqlx::query("TRUNCATE payouts, payout_events RESTART IDENTITY CASCADE")
        .execute(pool)
        .await
        .map_err(db)?;
    let clock = FakeClock::new(t0());
    let mut run = Run {
        pool,
        model: Model::default(),
        clock: clock.clone(),
        ids: vec![],
        claims: vec![],
        paid_writes: BTreeMap::new(),
        batcher: Batcher::spawn(pool.clone(), 64),
    };
    for due in &case.due_in_secs {
        let due_at = t0() + Duration::seconds(*due);
        let money = Money::parse("10.00", "USD").map_err(|e| e.to_string())?;
        let p = repo::create(
            pool,
            payouts::domain::PayeeId::new(payee),
            money,
            due_at,
            OPERATOR,
            clock.now(),
        )
        .await
        .map_err(db)?;
        run.model.create(p.id.get(), due_at, clock.now());
        run.ids.push(p.id.get());
    }
    let mut prev = snapshot(pool).await?;
    run.check_model(&prev)
        .map_err(|e| format!("after creation: {e}"))?;

    let drained = match drain {
        Drain::No => vec![],
        Drain::Yes => drain_ops(run.ids.len()),
    };
    let steps = case
        .ops
        .iter()
        .map(|op| (op, ""))
        .chain(drained.iter().map(|op| (op, " (the fleet catching up)")));
    for (i, (op, note)) in steps.enumerate() {
        let at = (run.clock.now() - t0()).num_seconds();
        let ctx = |e: String| format!("step {i}{note} at t0+{at}s, {op:?}:\n  {e}");
        let mut effect = Effect {
            now: run.clock.now(),
            claims: vec![],
            finishes: vec![],
        };
        let stepped = run.step(op, &mut effect).await;
        let cur = snapshot(pool).await.map_err(ctx)?;
        // The model-independent invariants first: they say more about a bug.
        run.check_invariants(&prev, &cur, &effect).map_err(ctx)?;
        stepped.map_err(ctx)?;
        run.check_model(&cur).map_err(ctx)?;
        prev = cur;
    }

    if drain == Drain::Yes {
        for p in prev.rows.values() {
            if !matches!(p.status, Paid | Cancelled | Failed) {
                return Err(format!(
                    "payout {} is still {} a day later, after the producer swept and queued \
                     everything due and a worker claimed and paid everything it could \
                     (event log {:?})",
                    p.id,
                    p.status,
                    prev.events[&p.id.get()]
                ));
            }
        }
    }
    Ok(())
}

/// One test's database (fresh, migrated, with one payee) and the runtime it lives on.
struct Harness {
    /// Its own pool whose commits do not wait for the WAL flush
    /// (`synchronous_commit = off`: durability only, what every statement
    /// does is unchanged); a case commits a few dozen times.
    pool: PgPool,
    payee: i64,
    _db: common::TestDb,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let db = rt.block_on(common::TestDb::new());
        let options = db
            .url
            .parse::<PgConnectOptions>()
            .expect("test database url")
            .options([("synchronous_commit", "off")]);
        let pool = rt
            .block_on(
                PgPoolOptions::new()
                    .max_connections(4)
                    .connect_with(options),
            )
            .expect("connect to the test database");
        let currency: Currency = "USD".parse().expect("USD");
        let payee = rt
            .block_on(payees::create(&pool, "Model payee", ACCOUNT, currency))
            .expect("payee")
            .id;
        Harness {
            pool,
            payee: payee.get(),
            _db: db,
            rt,
        }
    }

    fn run(&self, case: &Case, drain: Drain) -> Result<(), String> {
        self.rt
            .block_on(run_case(&self.pool, self.payee, case, drain))
    }
}

/// Runs `PROPTEST_CASES` (default 64) cases of `mix` against one fresh
/// database; a failure panics with the shrunk sequence.
fn check_sequences(mix: Mix, drain: Drain) {
    let h = Harness::new();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    });
    let result = runner.run(&case(mix), |case| {
        h.run(&case, drain).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => {
            panic!("{reason}\n\nminimal failing sequence:\n{case:?}")
        }
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
    }
}

/// Runs one fixed sequence (a regression).
fn check_case(case: Case) {
    if let Err(reason) = Harness::new().run(&case, Drain::No) {
        panic!("{reason}\n\nsequence:\n{case:?}");
    }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// Random producer passes, claims, outcomes, lease expiries, operator
/// retries and cancels: the repository does exactly what the model does.
#[test]
fn the_repository_agrees_with_the_lifecycle_model() {
    check_sequences(lifecycle_mix(), Drain::No);
}

/// Workers racing over one or two payouts with short leases, finishing
/// with fresh and stale tokens: no payout is recorded paid twice, a paid
/// payout never changes, and a stale token writes nothing.
#[test]
fn no_sequence_pays_twice_or_lets_a_stale_token_write() {
    check_sequences(contention_mix(), Drain::No);
}

/// "Nobody is forgotten": after any sequence, a day later one producer pass
/// and one worker pass leave every payout paid, cancelled or failed (the
/// dead letter an operator sees). Gateway answers here are paid, retrying or
/// failed; `in_transit` has its own test below.
#[test]
fn once_the_fleet_catches_up_no_payout_is_left_unfinished() {
    let mix = Mix {
        w_outcomes: [3, 0, 3, 2],
        ..lifecycle_mix()
    };
    check_sequences(mix, Drain::Yes);
}

/// The same, with `in_transit` answers: an accepted-but-pending transfer
/// must eventually be settled (DESIGN.md: in_transit --webhook/poll--> paid
/// | failed) or at least be something an operator can act on.
///
/// Found by this test, since fixed: nothing moved a payout out of
/// `in_transit` (shrunk: `QueueDue`, `Claim`, `Finish { outcome: InTransit }`,
/// then the fleet catching up). Webhooks and the producer's in-transit poll
/// (`services::sync::resolve`) now resolve it; `tests/it/gateways.rs` and
/// `tests/it/stripe.rs` prove that. This model does not drive them, so the case
/// stays ignored here.
#[test]
#[ignore = "in_transit is resolved by the gateway (webhooks, and the producer's in-transit poll in src/services/sync.rs, tested in tests/it/gateways.rs), which this model does not drive yet"]
fn an_in_transit_payout_is_not_left_unfinished_either() {
    check_sequences(lifecycle_mix(), Drain::Yes);
}

/// Final writes racing in one worker process go to Postgres as one batched
/// statement (`db::batch`), and each must be told whether *it* was written.
///
/// Found by this test, since fixed, in `db::batch::run_finishes`: it answered each
/// request with `applied.contains(&r.id)`, by payout id only. When two final
/// writes for one payout share a batch, the fenced UPDATE applies at most
/// one, yet both are told `true`. Shrunk sequence (one payout, due at t0):
/// `QueueDue`, `Claim { worker: 0 }`, `FinishTogether { claims: [Newest,
/// Newest], outcomes: [Paid, Paid] }` — "2 final writes reported" for one
/// UPDATE. The case that happens in production (a job redelivered to the
/// same process after its lease ran out) is
/// [`a_stale_final_write_batched_with_the_live_one_is_refused`]. Fix: return
/// `(payout_id, attempt)` and match on id *and* token.
#[test]
fn final_writes_batched_together_agree_with_the_lifecycle_model() {
    let mix = contention_mix();
    let mix = Mix {
        w: Weights {
            finish_together: 3,
            ..mix.w
        },
        ..mix
    };
    check_sequences(mix, Drain::No);
}

/// A worker whose lease ran out reports late, in the same batch as the
/// worker that took the payout over: the takeover's write lands and the late
/// one must be told it was refused (`false`), not that it was recorded.
///
/// Found by this test, since fixed: `db::batch` answered `true` to both (see
/// above), so the late worker counted the outcome as recorded and the
/// stale-fence metric never saw it.
#[test]
fn a_stale_final_write_batched_with_the_live_one_is_refused() {
    check_case(Case {
        due_in_secs: vec![0],
        ops: vec![
            Op::QueueDue {
                limit: 1,
                lease_secs: 60,
            },
            Op::Claim {
                worker: 0,
                target: Target::Payout(0),
                lease_secs: 10,
                via: Via::Batched,
            },
            Op::Advance { secs: 11 },
            Op::Claim {
                worker: 1,
                target: Target::Payout(0),
                lease_secs: 60,
                via: Via::Batched,
            },
            Op::FinishTogether {
                claims: [Held::Older(1), Held::Newest],
                outcomes: [Outcome::Failed, Outcome::Paid],
            },
        ],
    });
}

/// The model's operator rules are the lifecycle's: every move they make is legal.
#[test]
fn the_models_operator_rules_are_legal_transitions() {
    for (from, to) in ENQUEUE_FROM
        .iter()
        .chain(&RETRY_FROM)
        .map(|&f| (f, Queued))
        .chain(CANCEL_FROM.iter().map(|&f| (f, Cancelled)))
    {
        assert!(from.can_move_to(to), "{from} -> {to}");
    }
}

//! The verdict: the invariants checked after each scenario, against the
//! database and the gateway's durable ledger, and the table they print.
//!
//! Invariants (the list):
//! 1. every payout that should be paid has exactly one ledger entry at the
//!    gateway, keyed by its payout, of its amount;
//! 2. the database says `paid` exactly for those, with that transfer id;
//! 3. `failed` only with a permanent reason or exhausted attempts, and no
//!    ledger entry (in these scenarios only the poison payouts of S12 may
//!    fail: every fault is shorter than the retry budget);
//! 4. nothing left `pending`, `queued`, `processing`, `retrying` or
//!    `in_transit` past the drain deadline;
//! 5. only legal transitions in `payout_events`, each event continuing the
//!    previous one, the last one matching the row; and the database's own
//!    triggers still refuse an illegal transition and an event rewrite.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

use crate::{
    db::{
        events::{self, Transition},
        payouts,
    },
    domain::transfer::idempotency_key,
    domain::{Currency, Money, PayoutId, PayoutStatus},
    testkit::mock_gateway::LedgerEntry,
};

/// What a payout should end as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Paid, once.
    Paid,
    /// Failed with this code, no money moved (a poison payout).
    Failed(String),
}

/// One scenario's row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioReport {
    /// `S1` ... `S13`.
    pub id: String,
    /// What was injected, in a few words.
    pub title: String,
    /// Payouts created.
    pub payouts: usize,
    /// Of which poison (expected to fail).
    pub poison: usize,
    /// Paid in the database.
    pub paid: usize,
    /// Failed in the database.
    pub failed: usize,
    /// Should be paid, and final, but not paid with a matching ledger entry
    /// (or paid in the database with no money moved).
    pub lost: usize,
    /// Ledger entries beyond the first per payout, or for no payout.
    pub duplicated: usize,
    /// Not final at the drain deadline.
    pub stuck: usize,
    /// Failed although it should be paid, or failed with money moved or
    /// for the wrong reason.
    pub wrongly_failed: usize,
    /// Payouts whose event history breaks the state machine.
    pub illegal_transitions: usize,
    /// Due-to-paid median, seconds.
    pub p50_secs: Option<f64>,
    /// Due-to-paid 99th percentile, seconds.
    pub p99_secs: Option<f64>,
    /// From the end of the fault until every payout due before it was final,
    /// seconds (`None` without a fault, or when some never became final).
    pub recovery_secs: Option<f64>,
    /// From seeding until every payout was final, seconds (`None`: it never was).
    pub drain_secs: Option<f64>,
    /// S13: from a worker's SIGKILL to the next claim of each payout it held,
    /// seconds: median, 99th percentile, largest (nearest rank).
    pub reclaim_secs: Option<[f64; 3]>,
    /// When the fault began and when it healed.
    pub fault_window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Wall time of the whole scenario, seconds.
    pub duration_secs: f64,
    /// What happened (faults injected, fence refusals, ...).
    pub notes: Vec<String>,
    /// Every broken invariant, spelled out (first few per kind).
    pub violations: Vec<String>,
    /// Broken promises outside the money invariants (a bad job not counted,
    /// a process crash-looping): reported, not failing the scenario.
    pub findings: Vec<String>,
    /// The scenario could not run (setup failed, no drain, ...).
    pub error: Option<String>,
}

impl ScenarioReport {
    /// No invariant broken and no error.
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self.violations.is_empty()
            && self.lost == 0
            && self.duplicated == 0
            && self.stuck == 0
            && self.wrongly_failed == 0
            && self.illegal_transitions == 0
    }

    /// Records a broken invariant (the first few of them are kept).
    pub fn violation(&mut self, msg: String) {
        const MAX: usize = 25;
        if self.violations.len() < MAX {
            self.violations.push(msg);
        } else if self.violations.len() == MAX {
            self.violations
                .push("... (more violations not listed)".into());
        }
    }
}

struct Row {
    id: i64,
    status: String,
    amount: Decimal,
    currency: String,
    gateway_transfer_id: Option<String>,
    failure_code: Option<String>,
    due_at: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

/// The gateway's ledger as the invariants see it.
#[derive(Debug)]
pub struct Ledgers {
    /// Read back from the ledger file: what survives a gateway crash.
    pub file: Vec<LedgerEntry>,
    /// As the running gateway answers `GET /_mock/ledger`.
    pub memory: Vec<LedgerEntry>,
}

/// Checks every invariant and fills the counters of `report`.
pub async fn check(
    pool: &PgPool,
    ledgers: &Ledgers,
    expect: &HashMap<i64, Expect>,
    heal: Option<DateTime<Utc>>,
    report: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let rows: Vec<Row> = payouts::all(pool)
        .await?
        .into_iter()
        .map(|p| Row {
            id: p.id.get(),
            status: p.status.as_str().to_string(),
            amount: p.amount,
            currency: p.currency,
            gateway_transfer_id: p.gateway_transfer_id,
            failure_code: p.failure_code,
            due_at: p.due_at,
            paid_at: p.paid_at,
            updated_at: p.updated_at,
        })
        .collect();

    // The durable ledger must hold everything the gateway answered for.
    let file_ids: HashSet<&str> = ledgers.file.iter().map(|e| e.id.as_str()).collect();
    let mem_ids: HashSet<&str> = ledgers.memory.iter().map(|e| e.id.as_str()).collect();
    if file_ids != mem_ids {
        report.violation(format!(
            "the ledger file ({} entries) differs from the gateway's memory ({} entries)",
            file_ids.len(),
            mem_ids.len()
        ));
    }
    let mut by_ref: HashMap<&str, Vec<&LedgerEntry>> = HashMap::new();
    for e in &ledgers.file {
        if e.idempotency_key != e.reference {
            report.violation(format!(
                "ledger entry {} has key {} but reference {}",
                e.id, e.idempotency_key, e.reference
            ));
        }
        by_ref.entry(e.reference.as_str()).or_default().push(e);
    }
    let known: HashSet<String> = rows
        .iter()
        .map(|r| idempotency_key(PayoutId::new(r.id)))
        .collect();
    for (reference, entries) in &by_ref {
        if !known.contains(*reference) {
            report.duplicated += entries.len();
            report.violation(format!(
                "money moved for {reference}, which is no payout ({} entries)",
                entries.len()
            ));
        }
    }

    report.payouts = rows.len();
    report.poison = expect
        .values()
        .filter(|e| matches!(e, Expect::Failed(_)))
        .count();
    let mut due_to_paid: Vec<f64> = Vec::new();
    for r in &rows {
        let reference = idempotency_key(PayoutId::new(r.id));
        let entries: &[&LedgerEntry] = by_ref.get(reference.as_str()).map_or(&[], |v| v);
        if entries.len() > 1 {
            report.duplicated += entries.len() - 1;
            report.violation(format!(
                "payout {} was paid {} times at the gateway",
                r.id,
                entries.len()
            ));
        }
        let final_status = matches!(r.status.as_str(), "paid" | "failed" | "cancelled");
        if !final_status {
            report.stuck += 1;
            report.violation(format!(
                "payout {} is still {} at the drain deadline",
                r.id, r.status
            ));
            continue;
        }
        let expected = expect.get(&r.id).cloned().unwrap_or(Expect::Paid);
        match (r.status.as_str(), &expected) {
            ("paid", Expect::Paid) => {
                report.paid += 1;
                if let Some(p) = r.paid_at {
                    due_to_paid.push((p - r.due_at).num_milliseconds().max(0) as f64 / 1000.0);
                }
                let Some(first) = entries.first() else {
                    report.lost += 1;
                    report.violation(format!(
                        "payout {} is paid in the database but no money moved",
                        r.id
                    ));
                    continue;
                };
                if !entries
                    .iter()
                    .any(|e| Some(&e.id) == r.gateway_transfer_id.as_ref())
                {
                    report.lost += 1;
                    report.violation(format!(
                        "payout {} records transfer {:?}, the gateway has {}",
                        r.id, r.gateway_transfer_id, first.id
                    ));
                }
                let minor = r
                    .currency
                    .parse::<Currency>()
                    .ok()
                    .and_then(|c| Money::new(r.amount, c).ok())
                    .and_then(|m| m.to_minor_units().ok());
                if entries.iter().any(|e| Some(e.amount_minor) != minor) {
                    report.lost += 1;
                    report.violation(format!(
                        "payout {} of {} {} moved another amount",
                        r.id, r.amount, r.currency
                    ));
                }
            }
            ("failed", Expect::Failed(code)) => {
                report.failed += 1;
                if r.failure_code.as_deref() != Some(code.as_str()) {
                    report.wrongly_failed += 1;
                    report.violation(format!(
                        "poison payout {} failed with {:?}, expected {code}",
                        r.id, r.failure_code
                    ));
                }
                if !entries.is_empty() {
                    report.wrongly_failed += 1;
                    report.violation(format!("payout {} is failed but money moved", r.id));
                }
            }
            ("failed", Expect::Paid) => {
                report.failed += 1;
                report.wrongly_failed += 1;
                let moved = if entries.is_empty() {
                    ""
                } else {
                    " (and money moved)"
                };
                report.violation(format!(
                    "payout {} failed ({:?}) but should be paid{moved}",
                    r.id, r.failure_code
                ));
            }
            ("paid", Expect::Failed(code)) => {
                report.paid += 1;
                report.duplicated += entries.len();
                report.violation(format!(
                    "poison payout {} (expected to fail with {code}) is paid",
                    r.id
                ));
            }
            (other, _) => {
                report.lost += 1;
                report.violation(format!("payout {} ended {other}", r.id));
            }
        }
    }
    due_to_paid.sort_by(f64::total_cmp);
    report.p50_secs = percentile(&due_to_paid, 0.50);
    report.p99_secs = percentile(&due_to_paid, 0.99);

    // Recovery: the last payout due before the heal that became final.
    if let Some(heal) = heal {
        let mut last: Option<DateTime<Utc>> = None;
        let mut complete = true;
        for r in rows.iter().filter(|r| r.due_at <= heal) {
            match r.status.as_str() {
                "paid" => last = last.max(r.paid_at.or(Some(r.updated_at))),
                "failed" | "cancelled" => last = last.max(Some(r.updated_at)),
                _ => complete = false,
            }
        }
        report.recovery_secs = match (complete, last) {
            (true, Some(t)) => Some((t - heal).num_milliseconds().max(0) as f64 / 1000.0),
            (true, None) => Some(0.0),
            (false, _) => None,
        };
    }

    check_events(pool, &rows, report).await?;
    check_triggers(pool, report).await?;
    Ok(())
}

/// Nearest-rank percentile of sorted values.
/// The nearest-rank `q` quantile of `sorted` (ascending).
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Every event is a legal move continuing the previous one; the history
/// ends where the row is; nobody was recorded paid twice.
async fn check_events(
    pool: &PgPool,
    rows: &[Row],
    report: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let events = events::all_transitions(pool).await?;
    let mut by_payout: HashMap<i64, Vec<&Transition>> = HashMap::new();
    for e in &events {
        by_payout.entry(e.payout_id).or_default().push(e);
    }
    for r in rows {
        let history = by_payout.get(&r.id).map_or(&[][..], |v| v);
        if let Some(problem) = history_problem(history, &r.status) {
            report.illegal_transitions += 1;
            report.violation(format!("payout {}: {problem}", r.id));
        }
    }
    Ok(())
}

fn history_problem(history: &[&Transition], current: &str) -> Option<String> {
    let mut prev: Option<PayoutStatus> = None;
    let mut paid_events = 0;
    for (i, e) in history.iter().enumerate() {
        let to: PayoutStatus = match e.to_status.parse() {
            Ok(s) => s,
            Err(err) => return Some(format!("event {i}: {err}")),
        };
        match (prev, e.from_status.as_deref()) {
            (None, None) if to == PayoutStatus::Pending => {}
            (None, _) => {
                return Some(format!(
                    "first event is {:?} -> {to}, not creation",
                    e.from_status
                ));
            }
            (Some(p), Some(from)) => {
                if from != p.as_str() {
                    return Some(format!(
                        "event {i} moves from {from} but the payout was {p}"
                    ));
                }
                if !p.can_move_to(to) {
                    return Some(format!("illegal transition {p} -> {to} (event {i})"));
                }
            }
            (Some(p), None) => return Some(format!("event {i} has no from-status after {p}")),
        }
        if to == PayoutStatus::Paid {
            paid_events += 1;
        }
        prev = Some(to);
    }
    if paid_events > 1 {
        return Some(format!("recorded paid {paid_events} times"));
    }
    match prev {
        None => Some("no events at all".into()),
        Some(p) if p.as_str() != current => {
            Some(format!("history ends at {p} but the payout is {current}"))
        }
        Some(_) => None,
    }
}

/// The database's own guards are armed: an illegal transition and a rewrite
/// of history are refused (tried in a transaction that is rolled back).
async fn check_triggers(pool: &PgPool, report: &mut ScenarioReport) -> anyhow::Result<()> {
    let Some(paid) = payouts::first_paid(pool).await? else {
        return Ok(());
    };
    if !payouts::refuses_illegal_transition(pool, paid).await? {
        report.violation(format!(
            "the database accepted paid -> pending for payout {paid}: transition trigger missing"
        ));
    }
    if !events::refuses_rewrite(pool, paid).await? {
        report.violation(
            "the database let payout_events be rewritten: append-only trigger missing".into(),
        );
    }
    Ok(())
}

fn secs(v: Option<f64>) -> String {
    v.map_or("—".into(), |s| format!("{s:.2} s"))
}

/// The table: one row per scenario (Markdown, so it pastes into the README).
pub fn table(rows: &[ScenarioReport]) -> String {
    let mut out = String::from(
        "| scenario | payouts | paid | failed (poison) | lost | duplicated | stuck | wrongly failed | illegal transitions | due→paid p50 | p99 | recovery | drain | result |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let result = if r.ok() { "ok" } else { "**FAIL**" };
        out.push_str(&format!(
            "| {} {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.id,
            r.title,
            r.payouts,
            r.paid,
            r.failed,
            r.poison,
            r.lost,
            r.duplicated,
            r.stuck,
            r.wrongly_failed,
            r.illegal_transitions,
            secs(r.p50_secs),
            secs(r.p99_secs),
            secs(r.recovery_secs),
            secs(r.drain_secs),
            result
        ));
    }
    out
}

/// Notes, violations and errors under the table, scenario by scenario.
pub fn details(rows: &[ScenarioReport]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!("{} ({:.1} s):", r.id, r.duration_secs));
        if r.notes.is_empty() {
            out.push_str(" no fault");
        }
        out.push('\n');
        for n in &r.notes {
            out.push_str(&format!("  - {n}\n"));
        }
        if let Some(e) = &r.error {
            out.push_str(&format!("  ERROR: {e}\n"));
        }
        for v in &r.violations {
            out.push_str(&format!("  VIOLATION: {v}\n"));
        }
        for f in &r.findings {
            out.push_str(&format!("  FINDING: {f}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(from: Option<&str>, to: &str) -> Transition {
        Transition {
            payout_id: 1,
            from_status: from.map(str::to_string),
            to_status: to.into(),
        }
    }

    #[test]
    fn histories_are_judged_by_the_state_machine() {
        let good = [
            ev(None, "pending"),
            ev(Some("pending"), "queued"),
            ev(Some("queued"), "processing"),
            ev(Some("processing"), "processing"),
            ev(Some("processing"), "queued"),
            ev(Some("queued"), "processing"),
            ev(Some("processing"), "paid"),
        ];
        let refs: Vec<&Transition> = good.iter().collect();
        assert_eq!(history_problem(&refs, "paid"), None);
        assert!(
            history_problem(&refs, "failed").is_some(),
            "must end at the row"
        );

        let illegal = [ev(None, "pending"), ev(Some("pending"), "paid")];
        let refs: Vec<&Transition> = illegal.iter().collect();
        assert!(history_problem(&refs, "paid").unwrap().contains("illegal"));

        let gap = [
            ev(None, "pending"),
            ev(Some("pending"), "queued"),
            ev(Some("processing"), "paid"),
        ];
        let refs: Vec<&Transition> = gap.iter().collect();
        assert!(history_problem(&refs, "paid").is_some());
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}

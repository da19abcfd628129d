//! Reliability pieces against real Redis, Postgres and the mock gateway:
//! reconciliation finds (and only safely fixes) drift, the fleet-wide rate
//! limit holds every worker together under the rate, one 429 pauses the
//! whole fleet, and the circuit breaker stops sending without burning attempts.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use serde_json::Value;
use std::{sync::Arc, time::Duration};

use chrono::Utc;
use common::{Fleet, eventually};
use payouts::{
    db::{events, payouts as repo},
    domain::PayoutStatus,
    gateway::{
        Gateway, Lookup, TransferRequest,
        guard::{Circuit, GatewayGuard, GuardSettings},
        http::HttpGateway,
    },
    services::reconcile::{self, MismatchKind},
    testkit::mock_gateway::Faults,
    worker::Step,
};

fn request(id: i64, key: &str, amount_minor: i64, account: &str) -> TransferRequest {
    TransferRequest {
        amount_minor,
        currency: "USD".into(),
        destination: account.into(),
        reference: format!("payout_{id}"),
        metadata: Default::default(),
        idempotency_key: key.into(),
        key_index: 0,
        first_attempt: false,
    }
}

#[tokio::test]
async fn reconciliation_finds_deliberate_drift_and_fixes_only_what_the_gateway_proves() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_1").await;
    let now = Utc::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(f.payout(payee, &format!("{}.00", 10 + i), now).await);
    }
    f.producer().tick().await.unwrap();
    let w = f.worker("w");
    for id in &ids[..3] {
        assert_eq!(w.process(*id).await, Step::Recorded(PayoutStatus::Paid));
    }
    let gw = HttpGateway::new(&f.settings.gateway).unwrap();
    // Drift 1: the gateway paid ids[3], but its answer never reached the database (still queued).
    let lost = ids[3];
    gw.transfer(&request(
        lost.get(),
        &format!("payout_{lost}"),
        1300,
        "acct_1",
    ))
    .await;
    // Drift 2: the database says ids[4] is paid, the gateway never heard of it.
    let phantom = ids[4];
    let claim = repo::claim(
        f.pool(),
        phantom,
        "worker:x",
        now,
        now + chrono::Duration::seconds(1),
    )
    .await
    .unwrap()
    .unwrap();
    let fake = repo::Finish::Paid {
        transfer_id: "tr_phantom".into(),
    };
    assert!(
        repo::finish(
            f.pool(),
            phantom,
            claim.token(),
            &fake,
            "worker:x",
            "test",
            now
        )
        .await
        .unwrap()
    );
    // Drift 3: an amount changed under a paid payout.
    sqlx::query("UPDATE payouts SET amount = 999 WHERE id = $1")
        .bind(ids[0])
        .execute(f.pool())
        .await
        .unwrap();
    // Drift 4: a second transfer for ids[1] under another key: paid twice.
    gw.transfer(&request(ids[1].get(), "another-key", 1100, "acct_1"))
        .await;

    let opts = |fix| reconcile::Options {
        since: now - chrono::Duration::hours(1),
        fix,
        concurrency: 4,
        actor: "operator:reconcile".into(),
    };
    let report = reconcile::run(f.pool(), &gw, &opts(false), Utc::now())
        .await
        .unwrap();
    let found: Vec<(i64, MismatchKind)> = report
        .mismatches
        .iter()
        .map(|m| (m.payout_id, m.kind))
        .collect();
    assert_eq!(report.checked, 5);
    assert!(
        found.contains(&(lost.get(), MismatchKind::PaidAtGatewayNotInDb)),
        "{found:?}"
    );
    assert!(
        found.contains(&(phantom.get(), MismatchKind::PaidInDbUnknownToGateway)),
        "{found:?}"
    );
    assert!(
        found.contains(&(ids[0].get(), MismatchKind::AmountMismatch)),
        "{found:?}"
    );
    assert!(
        found.contains(&(ids[1].get(), MismatchKind::DuplicateAtGateway)),
        "{found:?}"
    );
    assert_eq!(found.len(), 4, "{found:?}");
    assert_eq!(
        f.status(lost.get()).await,
        "queued",
        "without --fix nothing changes"
    );

    let fixed = reconcile::run(f.pool(), &gw, &opts(true), Utc::now())
        .await
        .unwrap();
    let fixed_ids: Vec<i64> = fixed
        .mismatches
        .iter()
        .filter(|m| m.fixed)
        .map(|m| m.payout_id)
        .collect();
    assert_eq!(
        fixed_ids,
        vec![lost],
        "only the payout the gateway proves paid is fixed"
    );
    let p = repo::get(f.pool(), lost).await.unwrap().unwrap();
    let ledger_id = f
        .gateway
        .gateway
        .ledger()
        .into_iter()
        .find(|e| e.reference == format!("payout_{lost}"))
        .unwrap()
        .id;
    assert_eq!(
        (p.status, p.gateway_transfer_id),
        (PayoutStatus::Paid, Some(ledger_id))
    );
    let last = events::for_payout(f.pool(), lost.get())
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (
            last.from_status.as_deref(),
            last.to_status.as_str(),
            last.actor.as_str()
        ),
        (Some("queued"), "paid", "operator:reconcile")
    );
    assert_eq!(
        f.status(phantom.get()).await,
        "paid",
        "a payout unknown to the gateway is never 'fixed' by paying again"
    );
    assert_eq!(
        f.gateway.gateway.stats().requests,
        5,
        "reconciliation moved no money"
    );

    let after = reconcile::run(f.pool(), &gw, &opts(false), Utc::now())
        .await
        .unwrap();
    assert!(
        !after.mismatches.iter().any(|m| m.payout_id == lost),
        "the fixed payout now agrees"
    );

    // Every run is recorded, and the latest one becomes the alert's gauges
    // (the leading producer publishes it with its other gauges).
    let runs: Vec<(i64, Value)> =
        sqlx::query_as("SELECT fixed, mismatches FROM reconcile_runs ORDER BY id")
            .fetch_all(f.pool())
            .await
            .unwrap();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[1].0, 1, "the --fix run recorded its fix");
    assert_eq!(runs[0].1["paid_at_gateway_not_in_db"], 1);
    assert_eq!(runs[2].1["paid_at_gateway_not_in_db"], 0);
    assert_eq!(runs[2].1["paid_in_db_unknown_to_gateway"], 1);
    payouts::metrics::RECONCILE_MISMATCHES
        .with_label_values(&["paid_in_db_unknown_to_gateway"])
        .set(0);
    f.producer().refresh_gauges().await.unwrap();
    assert_eq!(
        payouts::metrics::RECONCILE_MISMATCHES
            .with_label_values(&["paid_in_db_unknown_to_gateway"])
            .get(),
        1
    );
    assert!(payouts::metrics::RECONCILE_LAST_RUN.get() >= Utc::now().timestamp() - 60);
}

/// Most transfers the ledger shows applied inside any window of `window`.
fn busiest(times: &[chrono::DateTime<Utc>], window: chrono::Duration) -> usize {
    let mut t = times.to_vec();
    t.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..t.len() {
        while t[end] - t[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test]
async fn the_rate_limit_holds_all_workers_together_under_the_configured_rate() {
    let f = Fleet::start_with(
        Faults::default(),
        &[
            ("PAYOUTS_GATEWAY__RATE_LIMIT_PER_SEC", "40"),
            ("PAYOUTS_GATEWAY__RATE_LIMIT_BURST", "1"),
        ],
        payouts::clock::system(),
    )
    .await;
    let payee = f.payee("acct_1").await;
    let ids: Vec<_> =
        futures::future::join_all((0..80).map(|_| f.payout(payee, "1.00", Utc::now()))).await;
    f.producer().tick().await.unwrap();
    // Three "processes" (separate guards, one Redis key), 80 jobs at once.
    let workers: Vec<_> = (0..3).map(|i| f.worker(&format!("w{i}"))).collect();
    let jobs = ids.iter().enumerate().map(|(i, id)| {
        let w = Arc::clone(&workers[i % 3]);
        let id = *id;
        tokio::spawn(async move { w.process(id).await })
    });
    for j in futures::future::join_all(jobs).await {
        assert_eq!(j.unwrap(), Step::Recorded(PayoutStatus::Paid));
    }

    let times: Vec<_> = f
        .gateway
        .gateway
        .ledger()
        .iter()
        .map(|e| e.applied_at)
        .collect();
    assert_eq!(times.len(), 80);
    // Over the whole drain the fleet kept to 40/s: 80 transfers take at
    // least 79 intervals of 25 ms (a stall only makes it longer).
    let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    let span = (*last - *first).num_milliseconds();
    assert!(
        span >= 79 * 25 * 98 / 100,
        "80 transfers in {span} ms; the fleet-wide limit is 40/s"
    );
    // And no second saw a bunch: requests paced to their slots can still
    // arrive together after a process stalls on a shared machine (the test
    // runs beside three others), hence the 20 % on top.
    let peak = busiest(&times, chrono::Duration::seconds(1));
    assert!(
        peak <= 48,
        "{peak} transfers in one second; the fleet-wide limit is 40/s"
    );
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn one_429_pauses_the_whole_fleet_for_its_retry_after() {
    let f = Fleet::start(Faults {
        script: vec![429],
        retry_after_secs: 2,
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    let (a, b) = (
        f.payout(payee, "1.00", Utc::now()).await,
        f.payout(payee, "2.00", Utc::now()).await,
    );
    f.producer().tick().await.unwrap();
    let (wa, wb) = (f.worker("a"), f.worker("b"));

    // Worker a meets the 429 and writes the pause for everyone.
    let job_a = tokio::spawn(async move { wa.process(a).await });
    let pause_key = format!("{{{}}}:gateway:pause", f.prefix);
    let conn = f.queue.conn();
    let (seen_at, pttl) = eventually(Duration::from_secs(10), "the fleet pause is set", || {
        let (key, mut conn) = (pause_key.clone(), conn.clone());
        async move {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            (pttl > 500).then(|| (Utc::now(), pttl))
        }
    })
    .await;
    // Worker b, another process, has seen no 429 itself, yet waits it out.
    assert_eq!(wb.process(b).await, Step::Recorded(PayoutStatus::Paid));
    assert_eq!(job_a.await.unwrap(), Step::Recorded(PayoutStatus::Paid));

    let ledger = f.gateway.gateway.ledger();
    let applied = |id: i64| {
        ledger
            .iter()
            .find(|e| e.reference == format!("payout_{id}"))
            .unwrap()
            .applied_at
    };
    assert!(
        applied(b.get()) - seen_at >= chrono::Duration::milliseconds(pttl - 100),
        "b went {} ms after the pause was seen with {pttl} ms left",
        (applied(b.get()) - seen_at).num_milliseconds()
    );
    assert_eq!(
        f.gateway.gateway.stats().by_status.get(&429),
        Some(&1),
        "one 429, not one per worker"
    );
}

#[tokio::test]
async fn an_open_circuit_stops_sending_without_burning_attempts_then_a_probe_closes_it() {
    let f = Fleet::start_with(
        Faults {
            rate_5xx: 1.0,
            ..Default::default()
        },
        &[
            ("PAYOUTS_GATEWAY__BREAKER_MIN_CALLS", "3"),
            ("PAYOUTS_GATEWAY__BREAKER_ERROR_RATIO_PCT", "50"),
            ("PAYOUTS_GATEWAY__BREAKER_COOLDOWN_MS", "1500"),
        ],
        payouts::clock::system(),
    )
    .await;
    let payee = f.payee("acct_1").await;
    let (first, second) = (
        f.payout(payee, "1.00", Utc::now()).await,
        f.payout(payee, "2.00", Utc::now()).await,
    );
    f.producer().tick().await.unwrap();
    let w = f.worker("w");

    // Three failed calls (one attempt) open the circuit.
    assert_eq!(
        w.process(first).await,
        Step::Recorded(PayoutStatus::Retrying)
    );
    assert!(
        matches!(w.guard.circuit(), Circuit::Open { .. }),
        "{:?}",
        w.guard.circuit()
    );
    let calls_when_opened = f.gateway.gateway.stats().requests;

    // While open, the next job waits before its claim: no attempt, no call.
    f.gateway.gateway.set_faults(Faults::default());
    let w2 = Arc::clone(&w);
    let job = tokio::spawn(async move { w2.process(second).await });
    eventually(
        Duration::from_secs(5),
        "the job holds before its claim",
        || async { (w.guard.waiting_claims() == 1).then_some(()) },
    )
    .await;
    let p = repo::get(f.pool(), second).await.unwrap().unwrap();
    assert_eq!(
        (p.status, p.attempt),
        (PayoutStatus::Queued, 0),
        "no attempt burned while the circuit is open"
    );
    assert_eq!(f.gateway.gateway.stats().requests, calls_when_opened);

    // After the cool-down one probe goes through, succeeds, and closes the circuit.
    assert_eq!(job.await.unwrap(), Step::Recorded(PayoutStatus::Paid));
    assert_eq!(w.guard.circuit(), Circuit::Closed);
    assert_eq!(
        repo::get(f.pool(), second).await.unwrap().unwrap().attempt,
        1
    );
    eventually(Duration::from_secs(5), "ledger has the probe", || async {
        (f.gateway.gateway.ledger().len() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_breaker_half_opens_and_reopens_when_the_probe_fails() {
    let f = Fleet::start(Faults {
        rate_5xx: 1.0,
        ..Default::default()
    })
    .await;
    let settings = GuardSettings {
        rate_per_sec: 0,
        burst: 1,
        min_calls: 2,
        error_ratio_pct: 50,
        window: Duration::from_secs(10),
        cooldown: Duration::from_millis(200),
        ..GuardSettings::from_settings(&f.settings.gateway)
    };
    let guard = GatewayGuard::new(f.queue.conn(), &f.prefix, settings);
    let gw = HttpGateway::new(&f.settings.gateway).unwrap();
    let guarded = guard.wrap(&gw);
    let req = request(1, "k1", 100, "acct_1");

    guarded.transfer(&req).await;
    guarded.transfer(&req).await;
    assert!(matches!(guard.circuit(), Circuit::Open { .. }));
    let refused = guarded.transfer(&req).await;
    assert!(
        matches!(&refused, payouts::gateway::Outcome::Transient { kind, .. } if kind.code() == "circuit_open"),
        "{refused:?}"
    );
    assert_eq!(
        f.gateway.gateway.stats().requests,
        2,
        "an open circuit sends nothing"
    );

    guard.wait_closed().await;
    guarded.transfer(&req).await; // the probe fails
    assert!(
        matches!(guard.circuit(), Circuit::Open { .. }),
        "a failed probe reopens"
    );
    assert_eq!(f.gateway.gateway.stats().requests, 3);
}

#[tokio::test]
async fn a_row_changed_under_the_worker_to_bad_money_fails_clearly_and_moves_nothing() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_1").await;
    let (odd_currency, odd_precision) = (
        f.payout(payee, "5.00", Utc::now()).await,
        f.payout(payee, "6.00", Utc::now()).await,
    );
    f.producer().tick().await.unwrap();
    // Someone edits the rows behind the fleet's back (the CHECKs allow these shapes).
    sqlx::query("UPDATE payouts SET currency = 'XXX' WHERE id = $1")
        .bind(odd_currency)
        .execute(f.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE payouts SET amount = 6.005 WHERE id = $1")
        .bind(odd_precision)
        .execute(f.pool())
        .await
        .unwrap();
    let w = f.worker("w");

    for id in [odd_currency, odd_precision] {
        assert_eq!(w.process(id).await, Step::Recorded(PayoutStatus::Failed));
        let p = repo::get(f.pool(), id).await.unwrap().unwrap();
        assert_eq!(
            p.failure_code.as_deref(),
            Some("invalid_amount"),
            "payout {id}"
        );
    }
    let msg = repo::get(f.pool(), odd_currency)
        .await
        .unwrap()
        .unwrap()
        .failure_message
        .unwrap();
    assert!(msg.contains("unknown currency \"XXX\""), "{msg}");
    assert_eq!(f.gateway.gateway.stats().requests, 0, "no money moved");
}

#[tokio::test]
async fn an_unanswered_last_attempt_is_looked_up_before_it_is_failed() {
    // Every call applies the transfer and then resets the connection: the
    // worker never hears an answer. With one attempt allowed, the payout would
    // be failed while the money moved; the look-up records it paid instead.
    let f = Fleet::start_with(
        Faults {
            rate_apply_then_reset: 1.0,
            ..Default::default()
        },
        &[
            ("PAYOUTS_WORKER__MAX_ATTEMPTS", "1"),
            // One call per attempt: no in-attempt retry replays the stored answer.
            ("PAYOUTS_GATEWAY__BACKOFF_TRIES", "1"),
            ("PAYOUTS_GATEWAY__BREAKER_MIN_CALLS", "1000"),
        ],
        payouts::clock::system(),
    )
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "9.00", Utc::now()).await;
    f.producer().tick().await.unwrap();
    let w = f.worker("w");
    assert_eq!(w.process(id).await, Step::Recorded(PayoutStatus::Paid));
    let p = repo::get(f.pool(), id).await.unwrap().unwrap();
    let ledger: Vec<_> = f
        .gateway
        .gateway
        .ledger()
        .into_iter()
        .filter(|e| e.reference == format!("payout_{id}"))
        .collect();
    assert_eq!(ledger.len(), 1, "one transfer, whatever the resets");
    assert_eq!(p.gateway_transfer_id, Some(ledger[0].id.clone()));
    f.assert_paid_exactly_once().await;
}

// --- Returned settlement payouts are never paid twice (issue 13, "Reversible") ---

mod returned {
    use super::*;
    use chrono::DateTime;
    use payouts::{
        db::earnings,
        domain::{Money, Policy, earning::NewEarning},
        services::settlement,
    };

    fn policy() -> Policy {
        include_str!("../../config/policy.toml").parse().unwrap()
    }

    pub fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Three services of 40.00 released in the week 11-06 .. 11-13 (83.45 paid on 11-13).
    pub async fn one_week(f: &Fleet, account: &str) -> i64 {
        let payee = f.payee(account).await;
        for i in 0..3 {
            let done = at("2026-10-31T08:00:00Z") + chrono::Duration::hours(i);
            let e = NewEarning {
                payee_id: payee.get(),
                source: "booking".into(),
                external_ref: format!("R-{payee}-{i}"),
                gross: Money::parse("40.00", "USD").unwrap(),
                completed_at: done,
                release_at: policy().release_at(done),
            };
            let mut conn = f.pool().acquire().await.unwrap();
            earnings::record(&mut conn, &e, "operator:test", done)
                .await
                .unwrap();
        }
        payee.get()
    }

    pub async fn settle(f: &Fleet, now: DateTime<Utc>, payee: Option<i64>) {
        let opts = settlement::Options {
            payee,
            actor: "settlement:test".into(),
        };
        settlement::run(f.pool(), &policy(), now, &opts)
            .await
            .unwrap();
    }

    /// The payee's payouts, oldest first: (id, status, failure code).
    pub async fn payouts_of(f: &Fleet, payee: i64) -> Vec<(i64, String, Option<String>)> {
        sqlx::query_as(
            "SELECT id, status, failure_code FROM payouts WHERE payee_id = $1 ORDER BY id",
        )
        .bind(payee)
        .fetch_all(f.pool())
        .await
        .unwrap()
    }

    /// Transfers the gateway made to `account`.
    pub fn transfers_to(f: &Fleet, account: &str) -> usize {
        f.gateway
            .gateway
            .ledger()
            .iter()
            .filter(|e| e.destination == account)
            .count()
    }

    /// Everything due is sent: a producer tick, then every queued payout processed.
    pub async fn pay_what_is_due(f: &Fleet) {
        f.producer().tick().await.unwrap();
        let queued: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM payouts WHERE status = 'queued' ORDER BY id")
                .fetch_all(f.pool())
                .await
                .unwrap();
        let w = f.worker("w");
        for id in queued {
            w.process(payouts::domain::PayoutId::new(id)).await;
        }
    }

    /// A fleet whose gateway applies the first `n` transfers and then cuts
    /// the connection: the worker hears nothing and retries later.
    pub async fn lossy_fleet(n: usize) -> Fleet {
        Fleet::start_with(
            Faults {
                script: vec![602; n],
                ..Default::default()
            },
            &[
                ("PAYOUTS_GATEWAY__BACKOFF_TRIES", "1"),
                ("PAYOUTS_GATEWAY__BREAKER_MIN_CALLS", "1000"),
            ],
            payouts::clock::system(),
        )
        .await
    }
}

#[tokio::test]
async fn a_cancel_after_an_unanswered_attempt_the_gateway_paid_is_refused_and_records_paid() {
    let f = returned::lossy_fleet(1).await;
    let payee = returned::one_week(&f, "acct_lost").await;
    returned::settle(&f, returned::at("2026-11-13T10:00:00Z"), None).await;
    let p1 = returned::payouts_of(&f, payee).await[0].0;
    f.producer().tick().await.unwrap();
    // The gateway moved the money; the answer was lost: retrying.
    assert_eq!(
        f.worker("w")
            .process(payouts::domain::PayoutId::new(p1))
            .await,
        Step::Recorded(PayoutStatus::Retrying)
    );
    assert_eq!(returned::transfers_to(&f, "acct_lost"), 1);

    // The operator gives up on it: the one cancel asks the gateway first.
    let settings = f.settings.gateway.clone();
    let refused = reconcile::cancel(
        f.pool(),
        async move || Ok(Arc::new(HttpGateway::new(&settings)?) as Arc<dyn Lookup>),
        payouts::domain::PayoutId::new(p1),
        "operator:ana",
        "gave up",
        returned::at("2026-11-14T09:00:00Z"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            refused,
            reconcile::CancelError::MoneyMoved {
                recorded: Some(PayoutStatus::Paid),
                ..
            }
        ),
        "{refused}"
    );
    assert_eq!(f.status(p1).await, "paid");
    let outcome: String =
        sqlx::query_scalar("SELECT outcome FROM settlements WHERE payout_id = $1")
            .bind(p1)
            .fetch_one(f.pool())
            .await
            .unwrap();
    assert_eq!(outcome, "payout", "nothing went back to the balance");

    // The next period pays nothing again; the books agree with the gateway.
    returned::settle(&f, returned::at("2026-11-20T10:00:00Z"), None).await;
    returned::pay_what_is_due(&f).await;
    assert_eq!(returned::payouts_of(&f, payee).await.len(), 1);
    assert_eq!(returned::transfers_to(&f, "acct_lost"), 1, "paid once");
    let gw = HttpGateway::new(&f.settings.gateway).unwrap();
    let opts = reconcile::Options {
        since: returned::at("2026-11-01T00:00:00Z"),
        fix: false,
        concurrency: 4,
        actor: "operator:reconcile".into(),
    };
    let report = reconcile::run(f.pool(), &gw, &opts, Utc::now())
        .await
        .unwrap();
    assert_eq!(report.open_money_mismatches(), 0, "{report:?}");
}

#[tokio::test]
async fn a_cancel_of_a_sent_payout_is_refused_while_the_gateway_cannot_be_asked_and_goes_through_once_it_says_none()
 {
    // The first call fails with a 503 before applying: nothing moved, but the
    // fleet cannot know that without asking.
    let f = Fleet::start_with(
        Faults {
            script: vec![503],
            ..Default::default()
        },
        &[
            ("PAYOUTS_GATEWAY__BACKOFF_TRIES", "1"),
            ("PAYOUTS_GATEWAY__BREAKER_MIN_CALLS", "1000"),
        ],
        payouts::clock::system(),
    )
    .await;
    let payee = f.payee("acct_503").await;
    let id = f.payout(payee, "12.00", Utc::now()).await;
    f.producer().tick().await.unwrap();
    assert_eq!(
        f.worker("w").process(id).await,
        Step::Recorded(PayoutStatus::Retrying)
    );
    let mut down = f.settings.gateway.clone();
    down.base_url = "http://127.0.0.1:9".into();
    let err = reconcile::cancel(
        f.pool(),
        async move || Ok(Arc::new(HttpGateway::new(&down)?) as Arc<dyn Lookup>),
        id,
        "operator:ana",
        "gave up",
        returned::at("2026-11-14T09:00:00Z"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, reconcile::CancelError::Unverified { .. }),
        "{err}"
    );
    assert_eq!(f.status(id.get()).await, "retrying");

    let settings = f.settings.gateway.clone();
    let from = reconcile::cancel(
        f.pool(),
        async move || Ok(Arc::new(HttpGateway::new(&settings)?) as Arc<dyn Lookup>),
        id,
        "operator:ana",
        "gave up",
        returned::at("2026-11-14T09:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(from, PayoutStatus::Retrying);
    assert_eq!(f.status(id.get()).await, "cancelled");
    let evs = events::for_payout(f.pool(), id.get()).await.unwrap();
    let last = evs.last().unwrap();
    assert!(
        last.reason
            .as_deref()
            .unwrap_or("")
            .contains("the gateway holds no transfer"),
        "{last:?}"
    );
}

#[tokio::test]
async fn reconciliation_holds_the_payout_that_carries_a_returned_balance_the_gateway_paid() {
    // Two payees whose first payout the gateway paid behind a lost answer,
    // then cancelled without asking the gateway (as every cancel did before).
    let f = returned::lossy_fleet(2).await;
    let early = returned::one_week(&f, "acct_early").await;
    let late = returned::one_week(&f, "acct_late").await;
    returned::settle(&f, returned::at("2026-11-13T10:00:00Z"), None).await;
    let firsts = [
        returned::payouts_of(&f, early).await[0].0,
        returned::payouts_of(&f, late).await[0].0,
    ];
    f.producer().tick().await.unwrap();
    for id in firsts {
        assert_eq!(
            f.worker("w")
                .process(payouts::domain::PayoutId::new(id))
                .await,
            Step::Recorded(PayoutStatus::Retrying)
        );
        repo::cancel(
            f.pool(),
            payouts::domain::PayoutId::new(id),
            "operator:ana",
            "gave up",
            returned::at("2026-11-14T09:00:00Z"),
        )
        .await
        .unwrap();
    }
    // `late` is settled again before reconciliation runs: its returned
    // balance is in a payout not sent yet.
    returned::settle(&f, returned::at("2026-11-20T10:00:00Z"), Some(late)).await;
    assert_eq!(returned::payouts_of(&f, late).await[1].1, "pending");

    let gw = HttpGateway::new(&f.settings.gateway).unwrap();
    let opts = reconcile::Options {
        since: returned::at("2026-11-01T00:00:00Z"),
        fix: true,
        concurrency: 4,
        actor: "operator:reconcile".into(),
    };
    let report = reconcile::run(f.pool(), &gw, &opts, Utc::now())
        .await
        .unwrap();
    let found: Vec<(i64, MismatchKind, bool)> = report
        .mismatches
        .iter()
        .map(|m| (m.payout_id, m.kind, m.fixed))
        .collect();
    assert_eq!(
        found,
        [
            (firsts[0], MismatchKind::ReturnedPaidAtGateway, false),
            (firsts[1], MismatchKind::ReturnedPaidAtGateway, false),
        ],
        "{report:?}"
    );
    for id in firsts {
        assert_eq!(f.status(id).await, "cancelled", "never recorded paid");
    }
    let counted: i64 = sqlx::query_scalar(
        "SELECT (mismatches->>'returned_paid_at_gateway')::bigint FROM reconcile_runs ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(f.pool())
    .await
    .unwrap();
    assert_eq!(counted, 2);

    // `early` is settled after reconciliation: its new payout is held at once.
    returned::settle(&f, returned::at("2026-11-20T10:00:00Z"), None).await;
    returned::pay_what_is_due(&f).await;
    for (payee, account) in [(early, "acct_early"), (late, "acct_late")] {
        let ps = returned::payouts_of(&f, payee).await;
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert_eq!(
            (ps[1].1.as_str(), ps[1].2.as_deref()),
            ("held", Some("returned_paid_at_gateway")),
            "{account}"
        );
        assert_eq!(
            returned::transfers_to(&f, account),
            1,
            "{account} paid once"
        );
        // An onboarding release (webhook or poll) does not let it go.
        let mut conn = f.pool().acquire().await.unwrap();
        let released =
            payouts::services::sync::release_account(&mut conn, account, "sync:t", Utc::now())
                .await
                .unwrap();
        assert!(released.is_empty(), "{account}: {released:?}");
    }
}

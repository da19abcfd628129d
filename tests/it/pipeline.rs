//! The pipeline, step by step, against real Postgres, real Redis and the mock
//! gateway over HTTP. Producer passes and worker steps are driven directly
//! (the steppable units), with a fake clock where time matters.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use common::{Fleet, eventually};
use payouts::{
    clock::{Clock, FakeClock},
    db::{events, payouts as repo},
    domain::PayoutStatus,
    producer::{Leadership, run_loop},
    testkit::mock_gateway::Faults,
    worker::{SkipReason, Step, run_consumer},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn only_due_pending_payouts_are_enqueued_never_future_or_cancelled() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_1").await;
    let now = Utc::now();
    let due = f
        .payout(payee, "10.00", now - chrono::Duration::minutes(1))
        .await;
    let future = f
        .payout(payee, "11.00", now + chrono::Duration::hours(1))
        .await;
    let cancelled = f
        .payout(payee, "12.00", now - chrono::Duration::minutes(1))
        .await;
    repo::cancel(f.pool(), cancelled, "operator:test", "test", now)
        .await
        .unwrap();

    let report = f.producer().tick().await.unwrap();

    assert_eq!(report.enqueued, 1);
    assert_eq!(f.status(due.get()).await, "queued");
    assert_eq!(f.status(future.get()).await, "pending");
    assert_eq!(f.status(cancelled.get()).await, "cancelled");
    assert_eq!(f.queue.waiting().await.unwrap(), 1);
    let again = f.producer().tick().await.unwrap();
    assert_eq!(again.enqueued, 0, "a queued payout is not enqueued twice");
}

#[tokio::test]
async fn a_payout_is_paid_with_the_transfer_id_and_a_full_history() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_42").await;
    let id = f.payout(payee, "123.45", Utc::now()).await;
    f.producer().tick().await.unwrap();

    let step = f.worker("w1").process(id).await;

    assert_eq!(step, Step::Recorded(PayoutStatus::Paid));
    let p = repo::get(f.pool(), id).await.unwrap().unwrap();
    let ledger = f.gateway.gateway.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].amount_minor, 12345);
    assert_eq!(ledger[0].destination, "acct_42");
    assert_eq!(ledger[0].idempotency_key, format!("payout_{id}"));
    assert_eq!(
        p.gateway_transfer_id.as_deref(),
        Some(ledger[0].id.as_str())
    );
    assert!(p.paid_at.is_some() && p.lease_owner.is_none());
    let history: Vec<(Option<String>, String, String)> = events::for_payout(f.pool(), id.get())
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.from_status, e.to_status, e.actor))
        .collect();
    assert_eq!(
        history,
        vec![
            (None, "pending".into(), "operator:test".into()),
            (
                Some("pending".into()),
                "queued".into(),
                "producer:test".into()
            ),
            (
                Some("queued".into()),
                "processing".into(),
                "worker:w1".into()
            ),
            (Some("processing".into()), "paid".into(), "worker:w1".into()),
        ]
    );
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn two_503s_then_success_is_paid_with_exactly_one_transfer() {
    let f = Fleet::start(Faults {
        script: vec![503, 503],
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "5.00", Utc::now()).await;
    f.producer().tick().await.unwrap();

    assert_eq!(
        f.worker("w").process(id).await,
        Step::Recorded(PayoutStatus::Paid)
    );

    assert_eq!(f.gateway.gateway.ledger().len(), 1);
    assert_eq!(f.gateway.gateway.stats().requests, 3);
    assert_eq!(
        repo::get(f.pool(), id).await.unwrap().unwrap().attempt,
        1,
        "in-attempt retries are one attempt"
    );
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn a_permanent_error_fails_with_its_code_and_is_never_called_again() {
    let f = Fleet::start(Faults {
        closed_destinations: vec!["acct_closed".into()],
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_closed").await;
    let id = f.payout(payee, "5.00", Utc::now()).await;
    f.producer().tick().await.unwrap();
    let w = f.worker("w");

    assert_eq!(w.process(id).await, Step::Recorded(PayoutStatus::Failed));
    let p = repo::get(f.pool(), id).await.unwrap().unwrap();
    assert_eq!(p.failure_code.as_deref(), Some("account_closed"));

    // A late second delivery and further producer passes call nothing.
    assert_eq!(w.process(id).await, Step::Skipped(SkipReason::NotClaimable));
    assert_eq!(f.producer().tick().await.unwrap().enqueued, 0);
    assert_eq!(f.gateway.gateway.stats().requests, 1);
    assert!(f.gateway.gateway.ledger().is_empty());
}

#[tokio::test]
async fn exhausted_retries_follow_the_schedule_then_fail() {
    // Whole milliseconds: Postgres keeps microseconds, chrono nanoseconds.
    let start = Utc::now().trunc_subsecs(3);
    let clock = FakeClock::new(start);
    let f = Fleet::start_with(
        Faults {
            rate_5xx: 1.0,
            ..Default::default()
        },
        &[("PAYOUTS_GATEWAY__BACKOFF_TRIES", "2")],
        clock.clone(),
    )
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "5.00", start).await;
    let w = f.worker("w");
    let schedule = [300i64, 900, 3600, 21600];

    for (i, delay) in schedule.iter().enumerate() {
        assert_eq!(
            f.producer().tick().await.unwrap().enqueued,
            1,
            "attempt {} enqueued",
            i + 1
        );
        assert_eq!(w.process(id).await, Step::Recorded(PayoutStatus::Retrying));
        let p = repo::get(f.pool(), id).await.unwrap().unwrap();
        assert_eq!(p.attempt, i as i32 + 1);
        assert_eq!(
            (p.next_attempt_at.unwrap() - clock.now()).num_seconds(),
            *delay,
            "delay after attempt {}",
            i + 1
        );
        // One second early: not yet due.
        clock.advance(chrono::Duration::seconds(delay - 1));
        assert_eq!(
            f.producer().tick().await.unwrap().enqueued,
            0,
            "not due before its time"
        );
        clock.advance(chrono::Duration::seconds(1));
    }
    assert_eq!(f.producer().tick().await.unwrap().enqueued, 1);
    assert_eq!(w.process(id).await, Step::Recorded(PayoutStatus::Failed));
    let p = repo::get(f.pool(), id).await.unwrap().unwrap();
    assert_eq!(
        (p.attempt, p.failure_code.as_deref()),
        (5, Some("attempts_exhausted"))
    );
    assert_eq!(
        f.gateway.gateway.stats().requests,
        10,
        "2 calls per attempt, 5 attempts"
    );
    assert!(f.gateway.gateway.ledger().is_empty());
}

#[tokio::test]
async fn the_same_job_delivered_twice_pays_once() {
    let f = Fleet::start(Faults {
        latency_ms: 50,
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "5.00", Utc::now()).await;
    f.producer().tick().await.unwrap();
    let (a, b) = (f.worker("a"), f.worker("b"));

    let (ra, rb) = tokio::join!(a.process(id), b.process(id));
    let rc = a.process(id).await;

    let paid = [&ra, &rb, &rc]
        .iter()
        .filter(|s| ***s == Step::Recorded(PayoutStatus::Paid))
        .count();
    assert_eq!(paid, 1, "{ra:?} {rb:?} {rc:?}");
    assert_eq!(rc, Step::Skipped(SkipReason::NotClaimable));
    assert_eq!(f.gateway.gateway.ledger().len(), 1);
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn apply_then_timeout_is_retried_with_the_same_key_and_recorded_paid_once() {
    let f = Fleet::start(Faults {
        script: vec![601],
        hang_ms: 3000,
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "5.00", Utc::now()).await;
    f.producer().tick().await.unwrap();

    assert_eq!(
        f.worker("w").process(id).await,
        Step::Recorded(PayoutStatus::Paid)
    );

    let stats = f.gateway.gateway.stats();
    assert!(stats.requests >= 2, "the timed-out call was retried");
    assert!(stats.replays >= 1, "the retry was answered from the ledger");
    assert_eq!(f.gateway.gateway.ledger().len(), 1);
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn apply_then_500_is_retried_with_the_same_key_and_recorded_paid_once() {
    let f = Fleet::start(Faults {
        script: vec![600],
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "5.00", Utc::now()).await;
    f.producer().tick().await.unwrap();

    assert_eq!(
        f.worker("w").process(id).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    assert_eq!(f.gateway.gateway.ledger().len(), 1);
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn a_stale_worker_cannot_overwrite_a_takeover() {
    let start = Utc::now();
    let clock = FakeClock::new(start);
    let f = Fleet::start_with(Faults::default(), &[], clock.clone()).await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "5.00", start).await;
    f.producer().tick().await.unwrap();
    let lease = |c: &FakeClock| c.now() + chrono::Duration::seconds(5);

    let first = repo::claim(f.pool(), id, "worker:slow", clock.now(), lease(&clock))
        .await
        .unwrap()
        .unwrap();
    assert!(
        repo::claim(f.pool(), id, "worker:eager", clock.now(), lease(&clock))
            .await
            .unwrap()
            .is_none(),
        "a live lease is not taken over"
    );
    clock.advance(chrono::Duration::seconds(6));
    let second = repo::claim(f.pool(), id, "worker:new", clock.now(), lease(&clock))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.token(), second.token()), (1, 2));

    let paid = repo::Finish::Paid {
        transfer_id: "tr_stale".into(),
    };
    assert!(
        !repo::finish(
            f.pool(),
            id,
            first.token(),
            &paid,
            "worker:slow",
            "late",
            clock.now()
        )
        .await
        .unwrap()
    );
    assert_eq!(
        f.status(id.get()).await,
        "processing",
        "the stale write changed nothing"
    );
    let paid = repo::Finish::Paid {
        transfer_id: "tr_new".into(),
    };
    assert!(
        repo::finish(
            f.pool(),
            id,
            second.token(),
            &paid,
            "worker:new",
            "ok",
            clock.now()
        )
        .await
        .unwrap()
    );
    assert_eq!(
        repo::get(f.pool(), id)
            .await
            .unwrap()
            .unwrap()
            .gateway_transfer_id
            .as_deref(),
        Some("tr_new")
    );
}

#[tokio::test]
async fn malformed_and_unknown_jobs_are_counted_and_change_nothing() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "5.00", Utc::now()).await;
    let w = f.worker("w");

    assert_eq!(
        w.handle(&json!({"hello": "world"})).await,
        Step::Skipped(SkipReason::Malformed)
    );
    assert_eq!(
        w.handle(&json!({"payout_id": "42"})).await,
        Step::Skipped(SkipReason::Malformed)
    );
    assert_eq!(
        w.handle(&json!({"payout_id": 999_999_999})).await,
        Step::Skipped(SkipReason::NotFound)
    );
    assert_eq!(
        w.handle(&json!({"payout_id": id})).await,
        Step::Skipped(SkipReason::NotClaimable),
        "pending, not due: not claimable"
    );
    assert_eq!(f.status(id.get()).await, "pending");
    assert_eq!(f.gateway.gateway.stats().requests, 0);
}

#[tokio::test]
async fn the_database_refuses_bad_rows_and_illegal_transitions() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_1").await;
    let neg = sqlx::query(
        "INSERT INTO payouts (payee_id, amount, currency, due_at) VALUES ($1, -1, 'USD', now())",
    )
    .bind(payee)
    .execute(f.pool())
    .await;
    assert!(neg.is_err(), "negative amount refused");
    let cur = sqlx::query(
        "INSERT INTO payouts (payee_id, amount, currency, due_at) VALUES ($1, 1, 'usd', now())",
    )
    .bind(payee)
    .execute(f.pool())
    .await;
    assert!(cur.is_err(), "bad currency refused");
    let id = f.payout(payee, "5.00", Utc::now()).await;
    let jump =
        sqlx::query("UPDATE payouts SET status = 'paid', gateway_transfer_id = 'x' WHERE id = $1")
            .bind(id)
            .execute(f.pool())
            .await;
    assert!(jump.is_err(), "pending -> paid refused by the trigger");
    let rewrite = sqlx::query("UPDATE payout_events SET actor = 'someone' WHERE payout_id = $1")
        .bind(id)
        .execute(f.pool())
        .await;
    assert!(rewrite.is_err(), "events are append-only");
    assert_eq!(f.status(id.get()).await, "pending");
}

#[tokio::test]
async fn operator_actions_are_legal_transitions_or_clear_errors() {
    let f = Fleet::start(Faults {
        closed_destinations: vec!["acct_closed".into()],
        ..Default::default()
    })
    .await;
    let now = Utc::now();
    let lease = now + chrono::Duration::seconds(60);
    let ok_payee = f.payee("acct_ok").await;
    let bad_payee = f.payee("acct_closed").await;
    let paid = f.payout(ok_payee, "5.00", now).await;
    let failed = f.payout(bad_payee, "6.00", now).await;
    f.producer().tick().await.unwrap();
    let w = f.worker("w");
    w.process(paid).await;
    w.process(failed).await;

    let err = repo::cancel(f.pool(), paid, "operator:test", "x", now)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot move payout {paid} from paid to cancelled")
    );
    let err = repo::retry(f.pool(), paid, "operator:test", lease, now)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("from paid to queued"), "{err}");
    assert!(matches!(
        repo::cancel(
            f.pool(),
            payouts::domain::PayoutId::new(987_654),
            "operator:test",
            "x",
            now
        )
        .await,
        Err(repo::ActionError::NotFound(987_654))
    ));

    assert_eq!(
        repo::retry(f.pool(), failed, "operator:alice", lease, now)
            .await
            .unwrap(),
        PayoutStatus::Failed
    );
    let p = repo::get(f.pool(), failed).await.unwrap().unwrap();
    assert_eq!((p.status, p.retry_base), (PayoutStatus::Queued, 1));
    let last = events::for_payout(f.pool(), failed.get())
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (last.actor.as_str(), last.to_status.as_str()),
        ("operator:alice", "queued")
    );
    assert_eq!(
        repo::cancel(f.pool(), failed, "operator:alice", "gave up", now)
            .await
            .unwrap(),
        PayoutStatus::Queued
    );
    assert_eq!(f.status(failed.get()).await, "cancelled");
}

/// A producer loop and `workers` apalis consumers, in-process, until the token is cancelled.
fn run_fleet(f: &Fleet, workers: usize) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
    let stop = CancellationToken::new();
    let producer = f.producer();
    let leadership = Leadership::new(f.queue.conn(), &f.prefix, "p1", Duration::from_millis(1500));
    let p_stop = stop.clone();
    let mut handles = vec![tokio::spawn(async move {
        run_loop(&producer, &leadership, &p_stop).await
    })];
    for i in 0..workers {
        handles.push(tokio::spawn(run_consumer(
            f.worker(&format!("w{i}")),
            f.queue.clone(),
            f.settings.worker.clone(),
            stop.clone(),
        )));
    }
    (stop, handles)
}

async fn stop_fleet(stop: CancellationToken, handles: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test]
async fn the_apalis_fleet_drains_due_payouts_through_redis_and_cleans_up_after() {
    let f = Fleet::start(Faults::default()).await;
    f.seed(300, 30).await;
    let (stop, handles) = run_fleet(&f, 2);

    eventually(Duration::from_secs(60), "all 300 payouts paid", || async {
        (f.count("paid").await == 300).then_some(())
    })
    .await;
    stop_fleet(stop, handles).await;
    f.assert_paid_exactly_once().await;

    // Finished jobs do not pile up in Redis: the janitor removes their data.
    f.queue.janitor(10_000).await.unwrap();
    let mut conn = f.queue.conn();
    let left: u64 = redis::cmd("HLEN")
        .arg(f.queue.config().job_data_hash())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "job data left in Redis after the janitor");
}

#[tokio::test]
async fn garbage_payloads_in_redis_do_not_stop_the_fleet() {
    let malformed = || {
        payouts::metrics::JOBS_SKIPPED
            .with_label_values(&["malformed"])
            .get()
    };
    let before = malformed();
    let f = Fleet::start(Faults::default()).await;
    f.queue
        .push_raw(b"\xff\xfe not json at all".to_vec())
        .await
        .unwrap();
    f.queue
        .push_raw(br#"{"payout_id": "forty-two"}"#.to_vec())
        .await
        .unwrap();
    f.queue
        .push_raw(br#"{"payout_id": 123456789}"#.to_vec())
        .await
        .unwrap();
    f.seed(50, 5).await;
    let (stop, handles) = run_fleet(&f, 1);

    eventually(
        Duration::from_secs(60),
        "all 50 payouts paid past the garbage",
        || async { (f.count("paid").await == 50).then_some(()) },
    )
    .await;
    // Both bad payloads reach the handler and are counted there: the one that
    // is not JSON too (apalis' own JSON codec would end the consumer on it).
    eventually(
        Duration::from_secs(30),
        "both malformed payloads counted",
        || async { (malformed() >= before + 2).then_some(()) },
    )
    .await;
    stop_fleet(stop, handles).await;
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn apalis_refuses_a_worker_name_that_is_still_registered_so_every_start_gets_a_fresh_one() {
    use apalis::prelude::{BoxDynError, WorkerBuilder};
    async fn noop(_job: serde_json::Value) -> Result<(), BoxDynError> {
        Ok(())
    }
    let f = Fleet::start(Faults::default()).await;
    let stop_first = CancellationToken::new();
    // A long heartbeat (orphaned after 90 s): the first registration stays
    // alive however slow the machine is.
    let storage = || {
        apalis_redis::RedisStorage::<serde_json::Value>::new(f.queue.conn()).with_config(
            payouts::queue::apalis_config(&f.prefix, 10, Duration::from_secs(30)),
        )
    };
    let first = WorkerBuilder::new("same-name")
        .backend(storage())
        .build(noop);
    let s = stop_first.clone();
    let first = tokio::spawn(first.run_until(async move {
        s.cancelled().await;
        Ok::<(), std::io::Error>(())
    }));
    let (workers_set, conn) = (f.queue.config().workers_set(), f.queue.conn());
    eventually(
        Duration::from_secs(30),
        "the first worker registers",
        || {
            let (set, mut conn) = (workers_set.clone(), conn.clone());
            async move {
                let seen: Option<f64> = redis::cmd("ZSCORE")
                    .arg(&set)
                    .arg("same-name")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                seen.map(|_| ())
            }
        },
    )
    .await;

    // A second worker under the same name (a restart that reuses its name,
    // or two workers in one process) does not get to run.
    let second = WorkerBuilder::new("same-name")
        .backend(storage())
        .build(noop);
    let started = std::time::Instant::now();
    let refused = second
        .run_until(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<(), std::io::Error>(())
        })
        .await;
    assert!(
        refused.is_err() || started.elapsed() < Duration::from_secs(4),
        "apalis-redis 1.0 let a second worker run under a registered name"
    );
    stop_first.cancel();
    first.await.unwrap().unwrap();

    let (a, b) = (
        payouts::worker::worker_name(),
        payouts::worker::worker_name(),
    );
    assert_ne!(a, b, "each start registers under a new name");
}

#[tokio::test]
async fn health_ready_and_metrics_answer_and_ready_checks_both_stores() {
    let f = Fleet::start(Faults::default()).await;
    payouts::metrics::init();
    let stop = CancellationToken::new();
    let addr = payouts::server::spawn(
        "127.0.0.1:0".parse().unwrap(),
        f.pool().clone(),
        f.queue.conn(),
        stop.clone(),
    )
    .await
    .unwrap();
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };

    assert_eq!(get("/health").await.0, 200);
    let (code, body) = get("/health/ready").await;
    assert_eq!((code, body.as_str()), (200, "postgres: ok\nredis: ok\n"));
    let (code, body) = get("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "payout_jobs_in_flight",
        "payout_queue_window_depth",
        "payout_producer_leader",
        "payout_worker_up",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }

    f.pool().close().await;
    let (code, body) = get("/health/ready").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "postgres: unavailable\nredis: ok\n")
    );
    stop.cancel();
}

#[tokio::test]
async fn status_gauges_count_through_indexes_and_the_backlog_age_is_the_oldest_due() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_1").await;
    let now = Utc::now();
    let old = f
        .payout(payee, "1.00", now - chrono::Duration::minutes(30))
        .await;
    f.payout(payee, "1.00", now - chrono::Duration::minutes(5))
        .await;
    f.payout(payee, "1.00", now + chrono::Duration::hours(1))
        .await;
    let paid = f
        .payout(payee, "1.00", now - chrono::Duration::hours(2))
        .await;
    repo::enqueue_now(
        f.pool(),
        paid,
        "operator:test",
        now + chrono::Duration::seconds(60),
        now,
    )
    .await
    .unwrap();
    f.worker("w").process(paid).await;
    sqlx::query("ANALYZE payouts")
        .execute(f.pool())
        .await
        .unwrap();

    let counts = repo::status_counts(f.pool()).await.unwrap();
    let get = |s: PayoutStatus| {
        counts
            .iter()
            .find(|(k, _)| *k == s)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    assert_eq!(
        (get(PayoutStatus::Pending), get(PayoutStatus::Paid)),
        (3, 1)
    );
    // The counts can be read from the (status, id) index alone (seq scans
    // priced out, as they are on a large table).
    let mut conn = f.pool().acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", repo::UNPAID_COUNTS))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("payouts_status_id_idx") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    sqlx::query("RESET enable_seqscan")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let oldest = repo::oldest_due_unfinished(f.pool(), now)
        .await
        .unwrap()
        .unwrap();
    let created = repo::get(f.pool(), old).await.unwrap().unwrap().due_at;
    assert_eq!(
        oldest, created,
        "the paid payout, older still, does not count"
    );
}

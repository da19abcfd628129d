//! Leases that live with the worker, and the rescue of a dead worker's
//! payouts (issue #20): renewal in one statement per process, a worker that
//! cannot renew stops calling the gateway, a payout whose attempt outlasts
//! its lease stays with its live worker, and a SIGKILLed worker's payouts
//! are claimed again within one default lease (by the lease alone) and
//! sooner when its liveness beat stops (the producer's rescue).
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::{Fleet, Proc, TestDb, eventually};
use payouts::{
    clock::SystemClock,
    db::{self, batch::Batcher, payouts as repo},
    gateway::{
        Gateway, Lookup, LookupError, Outcome, TransferRecord, TransferRequest,
        backoff::BackoffPolicy,
        guard::{GatewayGuard, GuardSettings},
    },
    lease::Leases,
    queue::lock::Locks,
    testkit::{
        chaos::proxy::{Mode, Proxy},
        mock_gateway::Faults,
    },
    worker::{Step, Worker},
};

/// A gateway that answers `Transient` to its first `transient` calls (each
/// taking `delay`), then `Paid`, and notes when each call started.
#[derive(Debug)]
struct Scripted {
    delay: Duration,
    transient: usize,
    calls: Mutex<Vec<Instant>>,
}

impl Scripted {
    fn new(delay: Duration, transient: usize) -> Arc<Scripted> {
        Arc::new(Scripted {
            delay,
            transient,
            calls: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Lookup for Scripted {
    async fn lookup(&self, _reference: &str) -> Result<Vec<TransferRecord>, LookupError> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl Gateway for Scripted {
    async fn transfer(&self, req: &TransferRequest) -> Outcome {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len()
        };
        tokio::time::sleep(self.delay).await;
        if n <= self.transient {
            Outcome::Transient {
                kind: payouts::gateway::TransientKind::Http(503),
                message: "scripted".into(),
                retry_after: None,
            }
        } else {
            Outcome::Paid {
                transfer_id: format!("tr_{}", req.reference),
            }
        }
    }
}

/// A worker of `f` on `pool` (perhaps through a proxy) and `gateway`.
fn worker_on(
    f: &Fleet,
    pool: &sqlx::PgPool,
    gateway: Arc<dyn Gateway>,
    actor: &str,
) -> Arc<Worker> {
    let s = &f.settings;
    Arc::new(Worker {
        pool: pool.clone(),
        batcher: Batcher::spawn(pool.clone(), 64),
        gateway,
        guard: Arc::new(GatewayGuard::new(
            f.queue.conn(),
            &f.prefix,
            GuardSettings::from_settings(&s.gateway),
        )),
        locks: Locks::new(
            f.queue.conn(),
            &f.prefix,
            Duration::from_millis(s.worker.lock_ttl_ms),
        ),
        leases: Leases::from_settings(pool.clone(), actor, Arc::new(SystemClock), s),
        clock: Arc::new(SystemClock),
        settings: s.worker.clone(),
        backoff: BackoffPolicy::from_settings(&s.gateway),
        actor: actor.into(),
    })
}

/// Short leases for the in-process tests: lease 3 s renewed every 500 ms,
/// a call needs 1 s + 500 ms left; the breaker never opens (it would stop
/// calls by itself).
const SHORT: &[(&str, &str)] = &[
    ("PAYOUTS_WORKER__LEASE_SECS", "3"),
    ("PAYOUTS_WORKER__RENEW_EVERY_MS", "500"),
    ("PAYOUTS_GATEWAY__TIMEOUT_MS", "1000"),
    ("PAYOUTS_WORKER__CALL_MARGIN_MS", "500"),
    ("PAYOUTS_GATEWAY__BACKOFF_BASE_MS", "100"),
    ("PAYOUTS_GATEWAY__BACKOFF_CAP_MS", "200"),
    ("PAYOUTS_GATEWAY__BACKOFF_TRIES", "1000"),
    ("PAYOUTS_GATEWAY__BREAKER_MIN_CALLS", "1000000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_is_one_statement_per_worker_process_per_interval_whatever_it_holds() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    // Every UPDATE statement on payouts logs how many rows it changed.
    sqlx::raw_sql(
        "CREATE TABLE update_log (rows bigint, at timestamptz DEFAULT clock_timestamp());
         CREATE FUNCTION log_update() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO update_log (rows) SELECT count(*) FROM changed; RETURN NULL; END $$;
         CREATE TRIGGER log_update AFTER UPDATE ON payouts REFERENCING NEW TABLE AS changed
             FOR EACH STATEMENT EXECUTE FUNCTION log_update();",
    )
    .execute(pool)
    .await
    .unwrap();
    let payee = db::payees::create(pool, "P", "acct_1", "USD".parse().unwrap())
        .await
        .unwrap()
        .id;
    let now = Utc::now();
    repo::seed(pool, &[payee.get()], 40, "USD", now, now)
        .await
        .unwrap();
    let lease = now + chrono::Duration::seconds(60);
    repo::queue_due(pool, now, 40, lease, "producer:test")
        .await
        .unwrap();
    // Two worker processes, twenty payouts each, claimed first.
    let owners = ["worker:a", "worker:b"];
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM payouts ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    let claimed_until = Utc::now() + chrono::Duration::seconds(3);
    let mut tokens = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let c = repo::claim(
            pool,
            payouts::domain::PayoutId::new(*id),
            owners[i % 2],
            Utc::now(),
            claimed_until,
        )
        .await
        .unwrap()
        .expect("claimable");
        tokens.push(c.token());
    }
    sqlx::query("DELETE FROM update_log")
        .execute(pool)
        .await
        .unwrap();
    let keepers: Vec<Leases> = owners
        .iter()
        .map(|o| {
            Leases::spawn(
                pool.clone(),
                o,
                Arc::new(SystemClock),
                Duration::from_secs(3),
                Duration::from_millis(300),
                Duration::from_millis(500),
            )
        })
        .collect();
    let held: Vec<_> = ids
        .iter()
        .zip(&tokens)
        .enumerate()
        .map(|(i, (id, token))| {
            keepers[i % 2].hold(payouts::domain::PayoutId::new(*id), *token, claimed_until)
        })
        .collect();

    // Three intervals or more for each process.
    let logged: Vec<i64> = eventually(Duration::from_secs(15), "six renewals", || async {
        let rows: Vec<i64> = sqlx::query_scalar("SELECT rows FROM update_log ORDER BY at")
            .fetch_all(pool)
            .await
            .unwrap();
        (rows.len() >= 6).then_some(rows)
    })
    .await;
    let sent: u64 = keepers.iter().map(Leases::statements).sum();
    assert!(
        logged.iter().all(|n| *n == 20),
        "every statement renewed one process's 20 leases, not one lease each: {logged:?}"
    );
    assert!(
        sent as usize >= logged.len() && sent as usize <= logged.len() + 2,
        "statements sent {sent}, seen by Postgres {}",
        logged.len()
    );
    // One statement per process per interval: about 2 per 300 ms.
    let (first, last): (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("SELECT min(at), max(at) FROM update_log")
            .fetch_one(pool)
            .await
            .unwrap();
    let intervals = ((last - first).num_milliseconds() as f64 / 300.0).ceil() as usize + 1;
    assert!(
        logged.len() <= 2 * intervals + 2,
        "{} statements over {intervals} intervals",
        logged.len()
    );
    let oldest: DateTime<Utc> =
        sqlx::query_scalar("SELECT min(lease_until) FROM payouts WHERE status = 'processing'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(
        oldest > claimed_until,
        "every lease was pushed past the claim's"
    );

    // A payout taken over is lost to its former holder: no call for it.
    let taken = ids[0];
    assert!(held[0].left(Utc::now()).is_some());
    sqlx::query(
        "UPDATE payouts SET lease_owner = 'worker:other', attempt = attempt + 1 WHERE id = $1",
    )
    .bind(taken)
    .execute(pool)
    .await
    .unwrap();
    let r = keepers[0].renew_once().await.unwrap();
    assert_eq!((r.renewed, r.lost), (19, 1));
    assert!(held[0].left(Utc::now()).is_none());
    assert!(!held[0].vouches());
    assert!(held[2].vouches());
    drop(held);
    assert_eq!(keepers[0].held_count() + keepers[1].held_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payout_whose_attempt_outlasts_its_lease_stays_with_its_live_worker() {
    let f = Fleet::start_with(Faults::default(), SHORT, Arc::new(SystemClock)).await;
    let id = f.due_payout("acct_slow").await;
    // Six calls of 700 ms and their backoff: over 4 s, past the 3 s lease.
    let gw = Scripted::new(Duration::from_millis(700), 5);
    let w = worker_on(&f, f.pool(), gw.clone(), "worker:slow");
    let started = Instant::now();
    let run = tokio::spawn({
        let w = w.clone();
        async move { w.process(id).await }
    });
    eventually(Duration::from_secs(10), "the claim", || async {
        (f.status(id.get()).await == "processing").then_some(())
    })
    .await;
    // Past the claim's lease (and its sweep), another worker may not take it.
    eventually(
        Duration::from_secs(10),
        "the first lease to pass",
        || async { (started.elapsed() > Duration::from_millis(3500)).then_some(()) },
    )
    .await;
    f.producer().tick().await.unwrap();
    let other = repo::claim(
        f.pool(),
        id,
        "worker:eager",
        Utc::now(),
        Utc::now() + chrono::Duration::seconds(3),
    )
    .await
    .unwrap();
    assert!(
        other.is_none(),
        "the live worker's renewed lease was taken over"
    );
    let step = run.await.unwrap();
    assert_eq!(
        step,
        Step::Recorded(payouts::domain::PayoutStatus::Paid),
        "{:?}",
        gw.calls().len()
    );
    assert!(started.elapsed() > Duration::from_secs(4));
    let p = repo::get(f.pool(), id).await.unwrap().unwrap();
    assert_eq!(p.attempt, 1, "one attempt, never taken over");
    assert!(w.leases.statements() >= 4, "renewed while calling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_postgres_is_unreachable_stops_starting_gateway_calls() {
    let f = Fleet::start_with(Faults::default(), SHORT, Arc::new(SystemClock)).await;
    let id = f.due_payout("acct_cut").await;
    // The worker reaches Postgres through a proxy the test cuts.
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start("worker->postgres", pg).await.unwrap();
    let url =
        f.db.url
            .replace("127.0.0.1:5432", &proxy.addr().to_string());
    assert_ne!(url, f.db.url, "the test database is on 127.0.0.1:5432");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .unwrap();
    // Always transient: without the lease check the worker would go on
    // calling for its 1,000 tries (minutes).
    let gw = Scripted::new(Duration::from_millis(20), usize::MAX);
    let w = worker_on(&f, &pool, gw.clone(), "worker:cut-off");
    let run = tokio::spawn({
        let w = w.clone();
        async move { w.process(id).await }
    });
    eventually(Duration::from_secs(10), "calls under way", || async {
        (gw.calls().len() >= 3 && w.leases.statements() >= 1).then_some(())
    })
    .await;
    proxy.set(Mode::Blackhole);
    let cut = Instant::now();

    // The last renewal was at most now: the lease it vouches for ends within
    // 3 s, and no call may start with less than 1.5 s of it left.
    eventually(Duration::from_secs(10), "the worker to stop", || {
        let run = &run;
        async move { run.is_finished().then_some(()) }
    })
    .await;
    let step = run.await.unwrap();
    assert_eq!(step, Step::LeaseRefused);
    let calls = gw.calls();
    let last = *calls.last().unwrap();
    assert!(
        last < cut + Duration::from_millis(1500) + Duration::from_millis(200),
        "a call started {:?} after Postgres became unreachable (lease 3 s, margin 1.5 s)",
        last - cut
    );
    assert!(cut.elapsed() < Duration::from_secs(6));
    // No call starts any more; Postgres back, the payout is not lost: its
    // lease ran out (or it was given back), so it is claimable.
    proxy.set(Mode::Pass);
    let n = calls.len();
    eventually(
        Duration::from_secs(10),
        "the payout to be claimable",
        || async {
            let p = repo::get(f.pool(), id).await.unwrap().unwrap();
            let claimable = p.status == payouts::domain::PayoutStatus::Queued
                || p.lease_until.is_some_and(|u| u < Utc::now());
            claimable.then_some(())
        },
    )
    .await;
    assert_eq!(gw.calls().len(), n, "no call after the worker stopped");
}

/// The fleet's settings as a child process gets them, with the worker's
/// lease, lock, renewal, beat, call margin and gateway timeout and the
/// producer's rescue at their defaults, plus `extra`.
fn default_lease_env(f: &Fleet, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = common::child_env(
        &f.db.url,
        &common::redis_url(),
        &f.prefix,
        &f.gateway.base_url,
    );
    env.retain(|(k, _)| {
        ![
            "PAYOUTS_WORKER__LEASE_SECS",
            "PAYOUTS_WORKER__LOCK_TTL_MS",
            "PAYOUTS_WORKER__RENEW_EVERY_MS",
            "PAYOUTS_WORKER__CALL_MARGIN_MS",
            "PAYOUTS_WORKER__BEAT_MS",
            "PAYOUTS_PRODUCER__RESCUE_AFTER_MS",
            "PAYOUTS_GATEWAY__TIMEOUT_MS",
        ]
        .contains(&k.as_str())
    });
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Starts a worker process, lets it claim the payout (its gateway call of
/// 2 s in flight), SIGKILLs it and starts another; returns how long after
/// the kill the other claimed it again.
async fn kill_mid_call_and_time_the_reclaim(f: &Fleet, env: &[(String, String)]) -> Duration {
    let payee = f.payee("acct_kill").await;
    let id = f.payout(payee, "42.00", Utc::now()).await;
    let _producer = Proc::producer(env, "producer");
    let victim = Proc::worker(env, "victim");
    eventually(Duration::from_secs(30), "the victim's claim", || async {
        (f.status(id.get()).await == "processing").then_some(())
    })
    .await;
    victim.signal("KILL");
    let killed = Utc::now();
    drop(victim);
    f.gateway.gateway.set_faults(Faults::default());
    let _rescuer = Proc::worker(env, "rescuer");
    let reclaimed: DateTime<Utc> = eventually(
        Duration::from_secs(40),
        "another worker's claim",
        || async {
            sqlx::query_scalar(
                "SELECT at FROM payout_events WHERE payout_id = $1 AND to_status = 'processing'
                 AND attempt = 2",
            )
            .bind(id)
            .fetch_optional(f.pool())
            .await
            .unwrap()
        },
    )
    .await;
    eventually(Duration::from_secs(20), "paid", || async {
        (f.status(id.get()).await == "paid").then_some(())
    })
    .await;
    f.assert_paid_exactly_once().await;
    (reclaimed - killed).to_std().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_workers_payout_is_claimed_again_within_one_default_lease() {
    // Slow enough to kill mid-call; the rescue off: the lease alone.
    let f = Fleet::start(Faults {
        latency_ms: 2000,
        ..Default::default()
    })
    .await;
    let env = default_lease_env(&f, &[("PAYOUTS_PRODUCER__RESCUE_AFTER_MS", "0")]);
    let defaults = payouts::config::Settings::load_from(None, &[]).unwrap();
    let lease = Duration::from_secs(defaults.worker.lease_secs);
    let took = kill_mid_call_and_time_the_reclaim(&f, &env).await;
    assert!(
        took <= lease + Duration::from_secs(2),
        "claimed again {took:?} after the kill; the default lease is 15 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_workers_payout_is_rescued_when_its_beat_stops_before_its_lease_runs_out() {
    let f = Fleet::start(Faults {
        latency_ms: 2000,
        ..Default::default()
    })
    .await;
    let env = default_lease_env(&f, &[]);
    let took = kill_mid_call_and_time_the_reclaim(&f, &env).await;
    // Default rescue after 5 s of silence, beats every 1 s, producer ticks
    // every 100 ms here; the lease alone would take up to 15 s.
    assert!(
        took <= Duration::from_secs(8),
        "claimed again {took:?} after the kill; the rescue comes 5 s after the last beat"
    );
    let rescued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payout_events WHERE reason = 'worker gone (liveness beat stopped)'",
    )
    .fetch_one(f.pool())
    .await
    .unwrap();
    assert_eq!(rescued, 1);
}

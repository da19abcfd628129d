//! The fleet as separate processes: producer and worker binaries against real
//! Postgres and Redis, the mock gateway in-process (so its ledger can be read).
//! Processes are killed, Redis is restarted empty, a producer replica dies.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{Fleet, Proc, child_env, eventually};
use payouts::testkit::mock_gateway::Faults;

/// A private redis-server on a free port (tests that kill Redis never touch the shared one).
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = PrivateRedis { port, child: None };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (again) on the same port, empty.
    fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "private redis did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn env_for(f: &Fleet, redis_url: &str) -> Vec<(String, String)> {
    child_env(&f.db.url, redis_url, &f.prefix, &f.gateway.base_url)
}

async fn wait_all_paid(f: &Fleet, n: i64, secs: u64) {
    eventually(
        Duration::from_secs(secs),
        &format!("{n} payouts paid"),
        || async {
            let paid = f.count("paid").await;
            (paid == n).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_payouts_three_racing_worker_processes_pay_each_exactly_once() {
    let f = Fleet::start(Faults {
        latency_ms: 2,
        latency_jitter_ms: 5,
        ..Default::default()
    })
    .await;
    f.seed(500, 50).await;
    let env = env_for(&f, &common::redis_url());
    // Every job is delivered twice: the producer pushes each once, and so do we.
    f.producer().tick().await.unwrap();
    let ids: Vec<payouts::domain::PayoutId> =
        sqlx::query_scalar("SELECT id FROM payouts WHERE status = 'queued'")
            .fetch_all(f.pool())
            .await
            .unwrap();
    f.queue.push(&ids).await.unwrap();
    let _producer = Proc::producer(&env, "producer");
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| Proc::worker(&env, &format!("race-w{i}")))
        .collect();

    wait_all_paid(&f, 500, 120).await;

    for w in &mut workers {
        w.assert_alive();
    }
    f.assert_paid_exactly_once().await;
    assert_eq!(f.gateway.gateway.ledger().len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_call_is_finished_by_another_and_paid_once() {
    // Slow enough to kill mid-call, faster than the 1 s client timeout.
    let f = Fleet::start(Faults {
        latency_ms: 800,
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "42.00", chrono::Utc::now()).await;
    let env = env_for(&f, &common::redis_url());
    let _producer = Proc::producer(&env, "producer");
    let victim = Proc::worker(&env, "victim");

    // The victim has claimed the payout; its gateway call (800 ms) is in flight.
    eventually(Duration::from_secs(30), "the payout is claimed", || async {
        (f.status(id.get()).await == "processing").then_some(())
    })
    .await;
    victim.signal("KILL");
    drop(victim);
    f.gateway.gateway.set_faults(Faults::default());
    let mut rescuer = Proc::worker(&env, "rescuer");

    wait_all_paid(&f, 1, 60).await;
    rescuer.assert_alive();
    f.assert_paid_exactly_once().await;
    let p = payouts::db::payouts::get(f.pool(), id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        p.attempt >= 2,
        "the rescuer took over with a new attempt (got {})",
        p.attempt
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_run_still_pays_everyone_once() {
    let mut redis = PrivateRedis::start();
    let f = Fleet::start(Faults {
        latency_ms: 3,
        ..Default::default()
    })
    .await;
    f.seed(1500, 100).await;
    let env = env_for(&f, &redis.url());
    let _producer = Proc::producer(&env, "producer");
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| Proc::worker(&env, &format!("redis-w{i}")))
        .collect();

    eventually(Duration::from_secs(60), "some payouts paid", || async {
        (f.count("paid").await >= 200).then_some(())
    })
    .await;
    redis.restart();
    let paid_at_restart = f.count("paid").await;
    assert!(
        paid_at_restart < 1500,
        "the restart happened with work in flight"
    );

    wait_all_paid(&f, 1500, 180).await;
    for w in &mut workers {
        w.assert_alive();
    }
    f.assert_paid_exactly_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_due_at_once_are_all_paid_and_no_worker_dies() {
    let f = Fleet::start(Faults::default()).await;
    f.seed(20_000, 1000).await;
    let mut env = env_for(&f, &common::redis_url());
    env.push(("PAYOUTS_WORKER__CONCURRENCY".into(), "128".into()));
    // The window is what is measured, not the sweep: with the tests' 3 s queue
    // lease, a machine busy enough to leave jobs waiting 3 s gets them swept
    // and pushed again (a second copy in Redis, the claim's fence drops it),
    // which is the sweep working, not the window overflowing.
    env.push(("PAYOUTS_PRODUCER__QUEUE_LEASE_SECS".into(), "60".into()));
    let _producer = Proc::producer(&env, "producer");
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| Proc::worker(&env, &format!("big-w{i}")))
        .collect();

    let most_waiting = std::sync::atomic::AtomicU64::new(0);
    eventually(Duration::from_secs(300), "20,000 payouts paid", || async {
        most_waiting.fetch_max(
            f.queue.waiting().await.unwrap(),
            std::sync::atomic::Ordering::Relaxed,
        );
        (f.count("paid").await == 20_000).then_some(())
    })
    .await;
    let most_waiting = most_waiting.into_inner();

    for w in &mut workers {
        w.assert_alive();
    }
    assert!(
        most_waiting <= 1000,
        "Redis held {most_waiting} waiting jobs; the window is 1,000"
    );
    f.assert_paid_exactly_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_producer_leader_is_replaced_by_the_standby() {
    let f = Fleet::start(Faults::default()).await;
    let env = env_for(&f, &common::redis_url());
    let leader_key = format!("{{{}}}:producer:leader", f.prefix);
    let leader = || async {
        let mut conn = f.queue.conn();
        redis::cmd("GET")
            .arg(&leader_key)
            .query_async::<Option<String>>(&mut conn)
            .await
            .unwrap()
    };
    let first = Proc::producer(&env, "producer-a");
    let first_pid = format!("-{}-", first.pid());
    eventually(
        Duration::from_secs(30),
        "the first producer leads",
        || async {
            leader()
                .await
                .filter(|l| l.contains(&first_pid))
                .map(|_| ())
        },
    )
    .await;
    let second = Proc::producer(&env, "producer-b");
    let second_pid = format!("-{}-", second.pid());
    let _worker = Proc::worker(&env, "failover-w");

    first.signal("KILL");
    drop(first);
    let killed_at = std::time::Instant::now();
    eventually(Duration::from_secs(30), "the standby leads", || async {
        leader()
            .await
            .filter(|l| l.contains(&second_pid))
            .map(|_| ())
    })
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_millis(1500 + 1500),
        "takeover took {takeover:?}, leader TTL is 1.5 s"
    );

    // The new leader does the producer's job.
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "9.99", chrono::Utc::now()).await;
    wait_all_paid(&f, 1, 60).await;
    assert_eq!(f.status(id.get()).await, "paid");
    f.assert_paid_exactly_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_payouts_finish_before_the_worker_exits() {
    let f = Fleet::start(Faults {
        latency_ms: 800,
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    let id = f.payout(payee, "1.00", chrono::Utc::now()).await;
    let env = env_for(&f, &common::redis_url());
    let _producer = Proc::producer(&env, "producer");
    let mut worker = Proc::worker(&env, "graceful");
    eventually(Duration::from_secs(30), "the payout is claimed", || async {
        (f.status(id.get()).await == "processing").then_some(())
    })
    .await;

    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(10)).await;

    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        f.status(id.get()).await,
        "paid",
        "the in-flight payout was finished before exit"
    );
    f.assert_paid_exactly_once().await;
}

/// A worker fetches jobs ahead of running them (`worker.fetch_batch`), into
/// its apalis-redis in-flight set. A rolling restart (chaos S16) relies on a
/// gracefully stopped worker giving those back to the queue at once: left in
/// the set of a worker that is gone, their payouts would wait for the lease
/// sweep (`producer.queue_lease_secs`, a minute by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_by_sigterm_leaves_no_fetched_job_stranded() {
    let f = Fleet::start(Faults {
        latency_ms: 1500,
        ..Default::default()
    })
    .await;
    let payee = f.payee("acct_1").await;
    for _ in 0..10 {
        f.payout(payee, "1.00", chrono::Utc::now()).await;
    }
    let mut env = env_for(&f, &common::redis_url());
    env.push(("PAYOUTS_WORKER__CONCURRENCY".into(), "1".into()));
    f.producer().tick().await.unwrap();
    let mut worker = Proc::worker(&env, "fetches-ahead");
    let redis = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let inflight_pattern = format!("{}:*", f.queue.config().inflight_jobs_set());
    let inflight = |mut conn: redis::aio::MultiplexedConnection, pattern: String| async move {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut n = 0usize;
        for k in keys {
            let c: usize = redis::cmd("SCARD")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            n += c;
        }
        n
    };
    eventually(
        Duration::from_secs(30),
        "one payout in flight and more jobs fetched ahead",
        || {
            let (conn, pattern, f) = (conn.clone(), inflight_pattern.clone(), &f);
            async move {
                let fetched = inflight(conn, pattern).await;
                (fetched > 1 && f.count("processing").await == 1).then_some(())
            }
        },
    )
    .await;

    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        inflight(conn.clone(), inflight_pattern.clone()).await,
        0,
        "the jobs fetched and not run went back to the queue, not left in the stopped worker's in-flight set"
    );
    let waiting: usize = redis::cmd("LLEN")
        .arg(f.queue.config().active_jobs_list())
        .query_async(&mut conn)
        .await
        .unwrap();
    let queued = f.count("queued").await as usize;
    assert!(
        queued >= 8 && waiting >= queued,
        "every payout still queued has its job back in the queue: {queued} queued, {waiting} jobs waiting"
    );
}

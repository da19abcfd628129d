//! Redis Sentinel (issue #20, item 3), against real redis-servers the test
//! starts on free ports: a master, a replica of it and a sentinel (Debian's
//! redis-server in sentinel mode). A fleet configured with
//! `redis.sentinels` pays through the master the sentinel names; after a
//! failover (`SENTINEL FAILOVER`: the replica promoted) every process stops
//! gracefully and exits non-zero saying why, and, restarted as a supervisor
//! would, pays through the new master. Nobody is paid twice.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{path::PathBuf, time::Duration};

use common::{Fleet, Proc, child_env, eventually, free_port};
use payouts::testkit::{
    chaos::redis::{PrivateRedis, PrivateSentinel, query, role},
    mock_gateway::Faults,
};

/// A master, its replica and one sentinel watching them (quorum 1, the
/// chaos harness's S14 set-up); the servers stop and their directory goes
/// when dropped.
struct Sentinel {
    sentinel: PrivateSentinel,
    redis: PrivateRedis,
    master: u16,
    replica: u16,
    dir: PathBuf,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.sentinel.replica.kill();
        self.redis.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sentinel {
    async fn start() -> Sentinel {
        let dir = std::env::temp_dir().join(format!(
            "payouts-sentinel-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let redis = PrivateRedis::start(&dir.join("redis"), &dir.join("redis.log"), false)
            .await
            .expect("redis-server");
        // The replica in sync, and the sentinel knowing both.
        let sentinel = PrivateSentinel::start(&dir, &dir, &redis)
            .await
            .expect("replica and sentinel");
        Sentinel {
            master: redis.port(),
            replica: sentinel.replica.port(),
            sentinel,
            redis,
            dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_sentinel_pays_through_the_master_and_follows_a_failover() {
    let s = Sentinel::start().await;
    let f = Fleet::start(Faults::default()).await;
    // REDIS_URL names no reachable Redis: the sentinels say where it is.
    let mut env = child_env(
        &f.db.url,
        "redis://127.0.0.1:1",
        &f.prefix,
        &f.gateway.base_url,
    );
    env.push((
        "PAYOUTS_REDIS__SENTINELS".into(),
        format!("[\"{}\"]", s.sentinel.addr()),
    ));
    env.push(("PAYOUTS_REDIS__SENTINEL_CHECK_MS".into(), "200".into()));
    let payee = f.payee("acct_1").await;
    for _ in 0..20 {
        f.payout(payee, "1.00", chrono::Utc::now()).await;
    }
    let mut producer = Proc::producer(&env, "sentinel-producer");
    let mut worker = Proc::worker(&env, "sentinel-worker");
    eventually(
        Duration::from_secs(30),
        "20 paid through the master",
        || async { (f.count("paid").await == 20).then_some(()) },
    )
    .await;
    let on_master: Option<String> =
        query(s.master, redis::cmd("KEYS").arg(format!("*{}*", f.prefix)))
            .await
            .and_then(|keys: Vec<String>| keys.into_iter().next());
    assert!(
        on_master.is_some(),
        "the fleet's keys are on the master the sentinel named"
    );

    // Failover: the replica becomes the master.
    let _: String = query(
        s.sentinel.port(),
        redis::cmd("SENTINEL").arg("failover").arg("mymaster"),
    )
    .await
    .expect("SENTINEL FAILOVER accepted");
    eventually(Duration::from_secs(30), "the replica promoted", || async {
        (role(s.replica).await.as_deref() == Some("master")).then_some(())
    })
    .await;

    // Each process notices, stops gracefully and exits non-zero, saying why.
    for p in [&mut producer, &mut worker] {
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert!(
            !status.success(),
            "{} must exit non-zero so its supervisor restarts it ({status:?})",
            p.name
        );
        let log =
            std::fs::read_to_string(std::env::temp_dir().join("payouts-test-logs").join(format!(
                "{}-{}.log",
                p.name,
                std::process::id()
            )))
            .unwrap();
        assert!(
            log.contains("the Redis master moved"),
            "{} says why it stopped:\n{log}",
            p.name
        );
    }

    // Restarted (what Kubernetes or compose do), they pay through the new master.
    for _ in 0..20 {
        f.payout(payee, "1.00", chrono::Utc::now()).await;
    }
    let _producer = Proc::producer(&env, "sentinel-producer-2");
    let _worker = Proc::worker(&env, "sentinel-worker-2");
    eventually(
        Duration::from_secs(30),
        "40 paid, the last 20 through the new master",
        || async { (f.count("paid").await == 40).then_some(()) },
    )
    .await;
    let on_new: Vec<String> = query(s.replica, redis::cmd("KEYS").arg(format!("*{}*", f.prefix)))
        .await
        .unwrap();
    assert!(!on_new.is_empty(), "the fleet writes to the new master");
    f.assert_paid_exactly_once().await;
}

async fn queue_on(port: u16, prefix: &str) -> payouts::queue::Queue {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let conn = client.get_connection_manager().await.unwrap();
    payouts::queue::Queue::new(conn, prefix, 10, Duration::from_secs(5))
}

/// A promoted replica holds the master's epoch key (replicated) but may lack
/// its last jobs: the producer must see the queue changed servers and push
/// every queued payout again, not wait a queue lease (S14 with the defaults:
/// the last payout was paid 62 s after the master died before this check,
/// 17 s after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_check_sees_a_promoted_replica_as_another_server() {
    use payouts::queue::Epoch;
    let s = Sentinel::start().await;
    let prefix = format!("epoch-{}", free_port());
    let on_master = queue_on(s.master, &prefix).await;
    assert_eq!(on_master.check_epoch().await.unwrap(), Epoch::Missing);
    assert_eq!(on_master.check_epoch().await.unwrap(), Epoch::Same);
    let key = format!("{{{prefix}}}:epoch");
    eventually(
        Duration::from_secs(30),
        "the epoch key on the replica",
        || {
            let key = key.clone();
            async move {
                let v: Option<String> = query(s.replica, redis::cmd("GET").arg(&key)).await?;
                v
            }
        },
    )
    .await;
    // The replica promoted (what the sentinel does in a failover).
    let _: String = query(s.replica, redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
        .await
        .expect("REPLICAOF NO ONE");
    let on_new = queue_on(s.replica, &prefix).await;
    assert_eq!(
        on_new.check_epoch().await.unwrap(),
        Epoch::OtherServer,
        "the key was set on the old master: jobs may be missing here"
    );
    assert_eq!(on_new.check_epoch().await.unwrap(), Epoch::Same);
}

#[test]
fn sentinels_that_are_not_host_and_port_are_refused() {
    let err = payouts::config::Settings::load_from(
        None,
        &[(
            "PAYOUTS_REDIS__SENTINELS".into(),
            "[\"sentinel-without-port\"]".into(),
        )],
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("redis.sentinels must each be host:port"),
        "{err:#}"
    );
}

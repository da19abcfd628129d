//! Group commit keeps the rules of single statements: one claim per payout,
//! tokens fence the final writes, and concurrent batches from several
//! "processes" neither deadlock nor double-claim.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use chrono::Utc;
use common::Fleet;
use payouts::{
    db::{
        batch::Batcher,
        events,
        payouts::{self as repo, Finish},
    },
    domain::PayoutStatus,
    testkit::mock_gateway::Faults,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batched_claims_from_three_processes_claim_each_payout_once() {
    let f = Fleet::start(Faults::default()).await;
    f.seed(300, 10).await;
    f.producer().tick().await.unwrap();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM payouts ORDER BY id")
        .fetch_all(f.pool())
        .await
        .unwrap();
    let batchers: Vec<Batcher> = (0..3)
        .map(|_| Batcher::spawn(f.pool().clone(), 64))
        .collect();
    let now = Utc::now();
    let lease = now + chrono::Duration::seconds(30);

    // Every payout is claimed by all three, concurrently, in shuffled orders.
    let mut jobs = Vec::new();
    for (b, batcher) in batchers.iter().enumerate() {
        let mut order = ids.clone();
        order.rotate_left(b * 97);
        if b == 1 {
            order.reverse();
        }
        for id in order {
            let batcher = batcher.clone();
            jobs.push(tokio::spawn(async move {
                (
                    id,
                    batcher
                        .claim(
                            payouts::domain::PayoutId::new(id),
                            &format!("worker:{b}"),
                            now,
                            lease,
                        )
                        .await,
                )
            }));
        }
    }
    let mut winners = std::collections::HashMap::new();
    for j in jobs {
        let (id, res) = j.await.unwrap();
        if let Some(c) = res.expect("no batch failed (no deadlock)") {
            assert_eq!(c.token(), 1);
            assert!(
                winners.insert(id, c.payout.lease_owner.clone()).is_none(),
                "payout {id} claimed twice"
            );
        }
    }
    assert_eq!(winners.len(), 300, "every payout claimed exactly once");
    let claimed_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payout_events WHERE to_status = 'processing'")
            .fetch_one(f.pool())
            .await
            .unwrap();
    assert_eq!(claimed_events, 300);
}

#[tokio::test]
async fn batched_final_writes_apply_only_under_the_current_token() {
    let f = Fleet::start(Faults::default()).await;
    let payee = f.payee("acct_1").await;
    let now = Utc::now();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(f.payout(payee, "3.00", now).await);
    }
    f.producer().tick().await.unwrap();
    let batcher = Batcher::spawn(f.pool().clone(), 64);
    let lease = now + chrono::Duration::seconds(30);
    for id in &ids {
        batcher
            .claim(*id, "worker:a", now, lease)
            .await
            .unwrap()
            .unwrap();
    }
    let paid = |t: &str| Finish::Paid {
        transfer_id: t.into(),
    };
    let retry = Finish::Retrying {
        next_attempt_at: now + chrono::Duration::minutes(5),
        code: "http_503".into(),
        message: "x".into(),
    };
    let failed = Finish::Failed {
        code: "account_closed".into(),
        message: "closed".into(),
    };

    let (paid_a, paid_stale) = (paid("tr_a"), paid("tr_stale"));
    let (a, b, c, d) = tokio::join!(
        batcher.finish(ids[0], 1, &paid_a, "worker:a", "ok", now),
        batcher.finish(ids[1], 1, &retry, "worker:a", "503", now),
        batcher.finish(ids[2], 1, &failed, "worker:a", "closed", now),
        batcher.finish(ids[3], 7, &paid_stale, "worker:a", "stale", now),
    );
    assert_eq!(
        (a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()),
        (true, true, true, false)
    );
    let status = |p: repo::Payout| (p.status, p.gateway_transfer_id, p.failure_code);
    assert_eq!(
        status(repo::get(f.pool(), ids[0]).await.unwrap().unwrap()),
        (PayoutStatus::Paid, Some("tr_a".into()), None)
    );
    assert_eq!(
        status(repo::get(f.pool(), ids[1]).await.unwrap().unwrap()),
        (PayoutStatus::Retrying, None, Some("http_503".into()))
    );
    assert_eq!(
        status(repo::get(f.pool(), ids[2]).await.unwrap().unwrap()),
        (PayoutStatus::Failed, None, Some("account_closed".into()))
    );
    assert_eq!(
        status(repo::get(f.pool(), ids[3]).await.unwrap().unwrap()),
        (PayoutStatus::Processing, None, None)
    );
    let last = events::for_payout(f.pool(), ids[0].get())
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        (
            last.to_status.as_str(),
            last.reason.as_deref(),
            last.attempt
        ),
        ("paid", Some("ok"), Some(1))
    );
    assert_eq!(
        events::for_payout(f.pool(), ids[3].get())
            .await
            .unwrap()
            .len(),
        3,
        "the stale write added no event"
    );
}

/// A Postgres restart or a failover to a standby breaks the connections
/// under the statements in flight. A batched claim that fails that way is
/// tried again on a fresh connection: given up at once (as it was), the
/// payout sat `queued` until the sweep took it back, a minute by default
/// (chaos S15 with the default settings: last payout paid 68 s after the
/// primary died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_connection_broke_is_tried_again_on_a_fresh_one() {
    use payouts::testkit::chaos::proxy::{Mode, Proxy};

    let f = Fleet::start(Faults::default()).await;
    f.seed(1, 1).await;
    f.producer().tick().await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT id FROM payouts")
        .fetch_one(f.pool())
        .await
        .unwrap();
    let admin = url::Url::parse(&common::admin_url()).unwrap();
    let upstream = format!(
        "{}:{}",
        admin.host_str().unwrap(),
        admin.port().unwrap_or(5432)
    );
    let upstream = tokio::net::lookup_host(upstream)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start("test->postgres", upstream).await.unwrap();
    let mut url = url::Url::parse(&f.db.url).unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr().port())).unwrap();
    // One connection, handed out as it is (no ping first), as a statement
    // already on its way is.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect(url.as_str())
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&pool).await.unwrap();

    // The claim's statement goes out and no answer comes (the primary died
    // under it: the proxy swallows it); then the connection is reset and the
    // address answers again at once (the standby, promoted).
    proxy.set(Mode::DropContaining("lease_until"));
    let now = Utc::now();
    let batcher = Batcher::spawn(pool, 8);
    let claim = tokio::spawn(async move {
        batcher
            .claim(
                payouts::domain::PayoutId::new(id),
                "worker:test",
                now,
                now + chrono::Duration::seconds(15),
            )
            .await
    });
    common::eventually(
        std::time::Duration::from_secs(5),
        "the claim's statement to be on its way",
        || async {
            (proxy
                .stats()
                .swallowed_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0)
            .then_some(())
        },
    )
    .await;
    proxy.set(Mode::Pass);

    let claimed = claim
        .await
        .unwrap()
        .expect("the claim is tried again on a fresh connection, not given up");
    assert_eq!(claimed.map(|c| c.token()), Some(1));
    assert_eq!(f.status(id).await, "processing");
}

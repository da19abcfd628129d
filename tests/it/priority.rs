//! The due scan's ranking (#17 item 4): early requests and "process now" go
//! ahead of the scheduled backlog, the policy ranks scheduled payouts by
//! amount or payee tier, and every boost is bounded (aging: a payout that
//! has waited longer than the boost goes first).
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use common::TestDb;
use payouts::{
    config::{PrioritySettings, Settings, priority::ScheduledRank},
    db::{payees, payouts as repo},
    domain::{Currency, Money, Priority},
    services::payees::{self as payee_service, By},
};
use sqlx::PgPool;

async fn payee(pool: &PgPool, account: &str) -> i64 {
    (payees::create(pool, "Payee", account, "USD".parse::<Currency>().unwrap())
        .await
        .unwrap()
        .id)
        .get()
}

async fn payout(pool: &PgPool, payee: i64, amount: &str, due: DateTime<Utc>) -> i64 {
    (repo::create(
        pool,
        payouts::domain::PayeeId::new(payee),
        Money::parse(amount, "USD").unwrap(),
        due,
        "operator:test",
        Utc::now(),
    )
    .await
    .unwrap()
    .id)
        .get()
}

/// An early request: priority 1, due now (as `req`'s requests insert them).
async fn requested(pool: &PgPool, payee: i64, now: DateTime<Utc>) -> i64 {
    let id = payout(pool, payee, "25.00", now).await;
    assert_eq!(
        repo::set_priority(&mut pool.acquire().await.unwrap(), id, Priority::Requested)
            .await
            .unwrap(),
        1
    );
    id
}

async fn queue(pool: &PgPool, ranking: &PrioritySettings, limit: i64) -> Vec<i64> {
    let now = Utc::now();
    repo::queue_due_ranked(
        pool,
        ranking,
        now,
        limit,
        now + Duration::seconds(60),
        "producer:test",
    )
    .await
    .unwrap()
    .into_iter()
    .map(|d| d.id.get())
    .collect()
}

#[tokio::test]
async fn a_request_goes_ahead_of_the_scheduled_backlog_in_the_first_batch() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let ids = payees::create_demo(&db.pool, 100, "USD".parse().unwrap())
        .await
        .unwrap();
    // 3,000 scheduled payouts, all due (a minute ago: well within the boost).
    repo::seed(&db.pool, &ids, 3000, "USD", now - Duration::minutes(1), now)
        .await
        .unwrap();
    let who = payee(&db.pool, "acct_req").await;
    let req = requested(&db.pool, who, now).await;
    let ranking = PrioritySettings::default();
    let first = queue(&db.pool, &ranking, 500).await;
    assert_eq!(first.len(), 500);
    assert_eq!(
        first[0], req,
        "the requested payout leads the first batch of 500"
    );
    // Without the ranking it would wait behind all 3,000 (due earlier).
    let p = repo::get(&db.pool, payouts::domain::PayoutId::new(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.status.as_str(), "queued");
    // Only pending payouts keep a rank (the due scan reads the index without
    // a status clause): queued ones lost it, as does a cancelled one.
    assert_eq!(repo::rank_at(&db.pool, req).await.unwrap(), None);
    let ranked: i64 = sqlx::query_scalar("SELECT count(*) FROM payouts WHERE rank_at IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(ranked, 2501);
    let pending: i64 = sqlx::query_scalar(
        "SELECT id FROM payouts WHERE status = 'pending' AND rank_at IS NOT NULL LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    repo::cancel(
        &db.pool,
        payouts::domain::PayoutId::new(pending),
        "operator:test",
        "test",
        Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(repo::rank_at(&db.pool, pending).await.unwrap(), None);
}

#[tokio::test]
async fn aging_a_scheduled_payout_older_than_the_boost_goes_before_a_fresh_request() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let ranking = PrioritySettings::default(); // requested: 3,600 s
    let y = payee(&db.pool, "acct_aging").await;
    let old = payout(&db.pool, y, "10.00", now - Duration::seconds(3700)).await;
    let recent = payout(&db.pool, y, "10.00", now - Duration::seconds(3500)).await;
    let req = requested(&db.pool, y, now).await;
    // Waited longer than the boost: first. Waited less: behind the request.
    assert_eq!(queue(&db.pool, &ranking, 3).await, vec![old, req, recent]);
}

#[tokio::test]
async fn process_now_ranks_ahead_of_a_request_and_is_audited() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let y = payee(&db.pool, "acct_now").await;
    let req = requested(&db.pool, y, now - Duration::seconds(10)).await;
    let later = payout(&db.pool, y, "10.00", now + Duration::days(3)).await;
    // An operator's process now queues it at once, with priority 2.
    let from = repo::enqueue_now(
        &db.pool,
        payouts::domain::PayoutId::new(later),
        "operator:alice",
        now + Duration::seconds(60),
        now,
    )
    .await
    .unwrap();
    assert_eq!(from.as_str(), "pending");
    let p: (String, i16) = sqlx::query_as("SELECT status, priority FROM payouts WHERE id = $1")
        .bind(later)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(p, ("queued".to_string(), Priority::ProcessNow.as_i16()));
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM payout_events WHERE payout_id = $1 AND to_status = 'queued'",
    )
    .bind(later)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(actor, "operator:alice");
    // Ranked: a pending process-now payout (due now) beats a request due before it.
    let pn = payout(&db.pool, y, "10.00", now).await;
    repo::set_priority(
        &mut db.pool.acquire().await.unwrap(),
        pn,
        Priority::ProcessNow,
    )
    .await
    .unwrap();
    assert_eq!(
        queue(&db.pool, &PrioritySettings::default(), 2).await,
        vec![pn, req]
    );
}

#[tokio::test]
async fn amount_policy_ranks_larger_or_smaller_first_within_its_boost() {
    let db = TestDb::new().await;
    // Postgres keeps microseconds.
    let now = Utc::now().trunc_subsecs(6);
    let y = payee(&db.pool, "acct_amount").await;
    let due = now - Duration::seconds(60);
    let small = payout(&db.pool, y, "10.00", due).await;
    let large = payout(&db.pool, y, "900.00", due).await;
    // Due 700 s before the others: more than the 600 s amount boost.
    let small_old = payout(&db.pool, y, "5.00", due - Duration::seconds(700)).await;
    let larger = PrioritySettings {
        scheduled: ScheduledRank::LargerFirst,
        ..PrioritySettings::default()
    };
    larger.validate().unwrap();
    // Read the order without queuing: rank, then compare rank times.
    repo::rank_pending(&db.pool, &larger, 100).await.unwrap();
    let rank = |id| {
        let pool = db.pool.clone();
        async move { repo::rank_at(&pool, id).await.unwrap().unwrap() }
    };
    let (rs, rl, ro) = (rank(small).await, rank(large).await, rank(small_old).await);
    assert!(ro < rl && rl < rs, "larger first, the old one first of all");
    // 900 of a full 1,000.00: 540 s earlier.
    assert_eq!(due - rl, Duration::seconds(540));
    assert_eq!(
        queue(&db.pool, &larger, 3).await,
        vec![small_old, large, small]
    );

    let db = TestDb::new().await;
    let y = payee(&db.pool, "acct_amount2").await;
    let small = payout(&db.pool, y, "10.00", due).await;
    let large = payout(&db.pool, y, "900.00", due).await;
    let smaller = PrioritySettings {
        scheduled: ScheduledRank::SmallerFirst,
        ..PrioritySettings::default()
    };
    assert_eq!(queue(&db.pool, &smaller, 2).await, vec![small, large]);
}

#[tokio::test]
async fn tier_policy_ranks_higher_tiers_first_and_a_new_tier_reranks() {
    let db = TestDb::new().await;
    let now = Utc::now().trunc_subsecs(6);
    let due = now - Duration::seconds(60);
    let standard = payee(&db.pool, "acct_std").await;
    let gold = payee(&db.pool, "acct_gold").await;
    let by = By {
        actor: "operator:alice",
        source: None,
        now,
    };
    let changed = payee_service::set_tier(&db.pool, gold, 2, by)
        .await
        .unwrap();
    assert_eq!((changed.previous, changed.tier), (0, 2));
    assert_eq!(
        payees::tier(&db.pool, payouts::domain::PayeeId::new(gold))
            .await
            .unwrap(),
        Some(2)
    );
    let a = payout(&db.pool, standard, "10.00", due).await;
    let b = payout(&db.pool, gold, "10.00", due).await;
    // Standard but due 1,000 s earlier: longer than tier 2's 900 s boost.
    let c = payout(&db.pool, standard, "10.00", due - Duration::seconds(1000)).await;
    let tier = PrioritySettings {
        scheduled: ScheduledRank::Tier,
        ..PrioritySettings::default()
    };
    repo::rank_pending(&db.pool, &tier, 100).await.unwrap();
    assert_eq!(
        due - repo::rank_at(&db.pool, b).await.unwrap().unwrap(),
        Duration::seconds(900)
    );
    // Back to tier 0: its pending payouts are ranked again.
    let back = payee_service::set_tier(&db.pool, gold, 0, by)
        .await
        .unwrap();
    assert_eq!(back.reranked, 1);
    assert_eq!(repo::rank_at(&db.pool, b).await.unwrap(), None);
    payee_service::set_tier(&db.pool, gold, 2, by)
        .await
        .unwrap();
    assert_eq!(queue(&db.pool, &tier, 3).await, vec![c, b, a]);
    // Audited, with the actor.
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'payee.tier' AND actor = 'operator:alice'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(n, 3);
    // Out of range: refused, nothing changed.
    let e = payee_service::set_tier(&db.pool, gold, 10, by)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tier must be 0-9"), "{e}");
    assert_eq!(
        payees::tier(&db.pool, payouts::domain::PayeeId::new(gold))
            .await
            .unwrap(),
        Some(2)
    );
    assert!(matches!(
        payee_service::set_tier(&db.pool, 999_999, 1, by).await,
        Err(payee_service::PayeeError::NotFound(..))
    ));
}

#[tokio::test]
async fn a_changed_priority_or_due_time_is_ranked_again() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let y = payee(&db.pool, "acct_rerank").await;
    let id = payout(&db.pool, y, "10.00", now + Duration::hours(2)).await;
    let ranking = PrioritySettings::default();
    repo::rank_pending(&db.pool, &ranking, 100).await.unwrap();
    assert_eq!(
        repo::rank_at(&db.pool, id).await.unwrap(),
        Some(
            repo::get(&db.pool, payouts::domain::PayoutId::new(id))
                .await
                .unwrap()
                .unwrap()
                .due_at
        )
    );
    // Not due yet: not queued, even ranked.
    assert!(queue(&db.pool, &ranking, 10).await.is_empty());
    repo::set_priority(
        &mut db.pool.acquire().await.unwrap(),
        id,
        Priority::Requested,
    )
    .await
    .unwrap();
    assert_eq!(repo::rank_at(&db.pool, id).await.unwrap(), None);
    // Ranked 1 h earlier, still not due (due in 2 h): the boost ranks, it
    // does not make a payout due.
    assert!(queue(&db.pool, &ranking, 10).await.is_empty());
    let due = repo::get(&db.pool, payouts::domain::PayoutId::new(id))
        .await
        .unwrap()
        .unwrap()
        .due_at;
    assert_eq!(
        due - repo::rank_at(&db.pool, id).await.unwrap().unwrap(),
        Duration::seconds(3600)
    );
}

fn load(env: &[(&str, &str)]) -> anyhow::Result<Settings> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_from(None, &env)
}

#[test]
fn configuration_is_validated_with_the_bad_key_named() {
    let s = load(&[]).unwrap();
    let p = &s.producer.priority;
    let d = PrioritySettings::default();
    // The shipped defaults are the ones `db::payouts::queue_due` ranks by.
    assert_eq!(
        (
            p.process_now_boost_secs,
            p.requested_boost_secs,
            p.scheduled,
            p.amount_boost_secs,
            p.amount_full,
            &p.tier_boost_secs
        ),
        (
            d.process_now_boost_secs,
            d.requested_boost_secs,
            d.scheduled,
            d.amount_boost_secs,
            d.amount_full,
            &d.tier_boost_secs
        )
    );
    // A request waits at most a second for the idle producer's next scan.
    assert!(s.producer.tick_ms <= 1000);
    let s = load(&[
        ("PAYOUTS_PRODUCER__PRIORITY__SCHEDULED", "tier"),
        (
            "PAYOUTS_PRODUCER__PRIORITY__TIER_BOOST_SECS",
            "[0, 60, 120]",
        ),
    ])
    .unwrap();
    assert_eq!(s.producer.priority.scheduled, ScheduledRank::Tier);
    assert_eq!(s.producer.priority.tier_boost_secs, vec![0, 60, 120]);
    for (env, named) in [
        (
            ("PAYOUTS_PRODUCER__PRIORITY__SCHEDULED", "loudest_first"),
            "scheduled",
        ),
        (
            ("PAYOUTS_PRODUCER__PRIORITY__REQUESTED_BOOST_SECS", "100000"),
            "producer.priority.requested_boost_secs",
        ),
        (
            (
                "PAYOUTS_PRODUCER__PRIORITY__PROCESS_NOW_BOOST_SECS",
                "700000",
            ),
            "producer.priority.process_now_boost_secs",
        ),
        (
            ("PAYOUTS_PRODUCER__PRIORITY__AMOUNT_FULL", "0.00"),
            "producer.priority.amount_full",
        ),
        (("PAYOUTS_PRODUCER__PRIORITY__BOOST", "1"), "boost"),
    ] {
        let e = format!("{:#}", load(&[env]).unwrap_err());
        assert!(e.contains(named), "{env:?}: {e}");
    }
    let e = format!(
        "{:#}",
        load(&[
            ("PAYOUTS_PRODUCER__PRIORITY__SCHEDULED", "larger_first"),
            ("PAYOUTS_PRODUCER__PRIORITY__AMOUNT_BOOST_SECS", "3600"),
        ])
        .unwrap_err()
    );
    assert!(e.contains("producer.priority.amount_boost_secs"), "{e}");
    let e = format!(
        "{:#}",
        load(&[
            ("PAYOUTS_PRODUCER__PRIORITY__SCHEDULED", "tier"),
            ("PAYOUTS_PRODUCER__PRIORITY__TIER_BOOST_SECS", "[0, 4000]"),
        ])
        .unwrap_err()
    );
    assert!(e.contains("producer.priority.tier_boost_secs"), "{e}");
}

/// The payout whose job is at position `i` of the Redis queue (0: fetched next).
async fn job_at(f: &common::Fleet, i: isize) -> i64 {
    let mut conn = f.queue.conn();
    let task: String = redis::cmd("LINDEX")
        .arg(f.queue.config().active_jobs_list())
        .arg(i)
        .query_async(&mut conn)
        .await
        .unwrap();
    let data: String = redis::cmd("HGET")
        .arg(f.queue.config().job_data_hash())
        .arg(&task)
        .query_async(&mut conn)
        .await
        .unwrap();
    serde_json::from_str::<serde_json::Value>(&data).unwrap()["payout_id"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn the_producer_pushes_a_request_ahead_of_the_window_already_waiting() {
    let f = common::Fleet::start(payouts::testkit::mock_gateway::Faults::default()).await;
    f.seed(300, 10).await;
    let producer = f.producer();
    let first = producer.tick().await.unwrap();
    assert_eq!(first.enqueued, 300);
    let y = f.payee("acct_early").await;
    let req = requested(f.pool(), y.get(), Utc::now()).await;
    let second = producer.tick().await.unwrap();
    assert_eq!(second.enqueued, 1);
    // No worker runs: 301 jobs wait, the request's first, not behind the
    // 300. apalis-redis pushes every job into its scheduled set, whose due
    // jobs a fetch appends to the active list; the request's job is at the
    // head of the active list, so it is fetched before them.
    assert_eq!(f.queue.waiting().await.unwrap(), 301);
    assert_eq!(job_at(&f, 0).await, req);
    let mut conn = f.queue.conn();
    let scheduled: u64 = redis::cmd("ZCARD")
        .arg(f.queue.config().scheduled_jobs_set())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(scheduled, 300);
}

//! Drain at the gateway's rate limit (issue #21 item 4): a fleet of worker
//! processes with `gateway.rate_limit_per_sec = R` against the mock gateway
//! enforcing the same R with its token bucket (15 tokens at 50/s) meets
//! no 429, and a 429 that does come (its fleet pause) is not followed by a
//! bunch the bucket refuses. Speed is measured in BENCHMARKS.md
//! (`scripts/rate-limit-drain.sh`), not asserted here.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::time::Duration;

use common::{Fleet, Proc, child_env, eventually};
use payouts::testkit::mock_gateway::{Faults, Stats};

const RATE: u32 = 50;

/// The bucket the tests' gateway holds: 15 tokens, 300 ms of [`RATE`]. The
/// mock's default (a tenth of a second) is what the benchmark measures
/// against; a test shares two cores with three others, and a process
/// stalled for more than the bucket's 100 ms sends its paced requests
/// together. 15 still refuses the old limiter's first bunch (its burst of
/// 20 let 21 requests through at once).
const BURST: u32 = 15;

/// Seeds `n` due payouts, runs a producer and two workers limited to
/// [`RATE`] until all are paid, checks each was paid once, and returns the
/// gateway's counters.
async fn drain(faults: Faults, n: i64) -> Stats {
    let f = Fleet::start(faults).await;
    f.seed(n, 30).await;
    let mut env = child_env(
        &f.db.url,
        &common::redis_url(),
        &f.prefix,
        &f.gateway.base_url,
    );
    env.push((
        "PAYOUTS_GATEWAY__RATE_LIMIT_PER_SEC".into(),
        RATE.to_string(),
    ));
    let _producer = Proc::producer(&env, "producer");
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| Proc::worker(&env, &format!("rate-w{i}")))
        .collect();
    eventually(
        Duration::from_secs(120),
        &format!("{n} payouts paid"),
        || async {
            // Fails as soon as the bucket refuses one (a 429 sends its
            // payout to the retry schedule, minutes away).
            let stats = f.gateway.gateway.stats();
            assert_eq!(
                stats.rate_limited,
                0,
                "the gateway's token bucket ({RATE}/s, {} tokens) refused requests \
                 with {} of {n} paid: {stats:?}",
                BURST,
                f.count("paid").await,
            );
            (f.count("paid").await == n).then_some(())
        },
    )
    .await;
    for w in &mut workers {
        w.assert_alive();
    }
    f.assert_paid_exactly_once().await;
    assert_eq!(f.gateway.gateway.ledger().len() as i64, n);
    f.gateway.gateway.stats()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_at_the_gateways_own_rate_meets_no_429_and_pays_each_payout_once() {
    let stats = drain(
        Faults {
            rate_limit_per_sec: RATE,
            rate_limit_burst: BURST,
            latency_ms: 2,
            latency_jitter_ms: 5,
            ..Default::default()
        },
        300,
    )
    .await;
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(stats.by_status.get(&429), None, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_429s_fleet_pause_the_fleet_resumes_at_the_rate_not_in_a_bunch() {
    // The first transfer is answered 429 (Retry-After 1 s): the whole fleet
    // pauses, and its waiting requests must not then go all at once.
    let stats = drain(
        Faults {
            rate_limit_per_sec: RATE,
            rate_limit_burst: BURST,
            script: vec![429],
            ..Default::default()
        },
        150,
    )
    .await;
    assert_eq!(
        stats.rate_limited, 0,
        "after the pause the token bucket refused requests: {stats:?}"
    );
    assert_eq!(
        stats.by_status.get(&429),
        Some(&1),
        "only the scripted 429: {stats:?}"
    );
}

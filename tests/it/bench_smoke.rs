//! The benchmark, small, so it cannot rot: one worker process, 300 payouts,
//! every figure present and the exactly-once ledger check passing, on a
//! table that already holds paid history (`--history`), which must not be
//! counted as the run's.

use crate::common;

use std::time::Duration;

use sqlx::PgPool;

use payouts::testkit::bench::{BenchOptions, Case, run_case, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_end_to_end_and_checks_exactly_once() {
    let db_name = common::unique("bench_smoke");
    let settings = common::settings(
        &format!(
            "{}/{db_name}",
            common::admin_url().rsplit_once('/').unwrap().0
        ),
        &common::redis_url(),
        "unused",
        "http://127.0.0.1:1",
        &[],
    );
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_payout-worker"))
        .parent()
        .unwrap()
        .to_path_buf();
    let opts = BenchOptions {
        payouts: 300,
        warmup: 50,
        runs: 1,
        concurrency: 32,
        window: 200,
        seed: 7,
        log_dir: std::env::temp_dir().join(common::unique("bench-logs")),
        timeout: Duration::from_secs(120),
        bin_dir: Some(bin_dir),
        db_name: db_name.clone(),
        webhook: false,
        webhook_events: vec!["payout.paid".into()],
        history: 2_000,
    };

    let result = run_case(
        &settings,
        Case {
            workers: 1,
            latency_ms: 0,
        },
        &opts,
    )
    .await
    .unwrap();

    let run = &result.runs[0];
    assert!(result.exactly_once, "{run:?}");
    assert!(run.payouts_per_sec > 0.0 && run.seconds > 0.0);
    assert!(run.p50 <= run.p95 && run.p95 <= run.p99, "{run:?}");
    assert!(
        run.worker_peak_rss_mib[0] > 1.0 && run.worker_cpu_secs[0] > 0.0,
        "{run:?}"
    );
    assert!(
        run.pg_commits_per_payout > 0.0 && run.redis_cmds_per_payout > 0.0,
        "{run:?}"
    );
    assert!(table(&[result]).contains("| 1 | 0 ms |"));
    // The history is in the copy, and none of it counted as the run's.
    let copy = PgPool::connect(&format!(
        "{}/{db_name}",
        common::admin_url().rsplit_once('/').unwrap().0
    ))
    .await
    .unwrap();
    let hist: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payouts WHERE gateway_transfer_id LIKE 'tr_hist_%'",
    )
    .fetch_one(&copy)
    .await
    .unwrap();
    assert_eq!(hist, 2_000);
    copy.close().await;
    for db in [db_name.clone(), format!("{db_name}_hist_2000")] {
        let drop = format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)");
        let _ = std::process::Command::new("psql")
            .arg(common::admin_url())
            .arg("-qc")
            .arg(drop)
            .status();
    }
}

//! `payout-bench`: the fleet benchmark. See `payouts::testkit::bench` and BENCHMARKS.md.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use payouts::testkit::bench::{BenchOptions, Case};

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark the whole fleet: K worker processes x gateway latency"
)]
struct Args {
    /// Payouts in each measured burst.
    #[arg(long, default_value_t = 100_000)]
    payouts: i64,
    /// Payouts paid before measuring.
    #[arg(long, default_value_t = 2_000)]
    warmup: i64,
    /// Worker process counts to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Gateway latencies to try, ms.
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    latency_ms: Vec<u64>,
    /// Runs per case (median, min and max are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Jobs in flight per worker process.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Producer window.
    #[arg(long, default_value_t = 1000)]
    window: i64,
    /// Mock gateway seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the results here as JSON.
    #[arg(long, default_value = "bench.json")]
    json: PathBuf,
    /// Measure only the producer's enqueue path (this many payouts) and exit.
    #[arg(long)]
    producer_only: Option<i64>,
    /// Register one local receiving webhook endpoint (subscribed to
    /// `--webhook-events`) and wait for every `payout.paid` to arrive.
    #[arg(long)]
    webhook: bool,
    /// The event types the bench endpoint subscribes to (`*`: all of them,
    /// three messages per payout).
    #[arg(long, value_delimiter = ',', default_value = "payout.paid")]
    webhook_events: Vec<String>,
    /// Paid payouts in the table before each run (a long-lived table's
    /// history, e.g. 10000000); built once into a template database.
    #[arg(long, default_value_t = 0)]
    history: i64,
    /// Where the processes log.
    #[arg(long, default_value = ".bench")]
    log_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let settings = payouts::config::Settings::load(None)?;
    let opts = BenchOptions {
        payouts: a.payouts,
        warmup: a.warmup,
        runs: a.runs,
        concurrency: a.concurrency,
        window: a.window,
        seed: a.seed,
        log_dir: a.log_dir,
        timeout: Duration::from_secs(1800),
        bin_dir: None,
        db_name: "payouts_bench".into(),
        webhook: a.webhook,
        webhook_events: a.webhook_events,
        history: a.history,
    };
    if let Some(n) = a.producer_only {
        let (rate, scan_ms) =
            payouts::testkit::bench::producer_rate(&settings, "payouts_bench", n, 1000).await?;
        println!(
            "producer: {n} payouts enqueued at {rate:.0}/s; median {scan_ms:.1} ms per batch of 1000 (due scan, mark queued, push; pipelined)"
        );
        return Ok(());
    }
    let mut results = Vec::new();
    for latency_ms in &a.latency_ms {
        for workers in &a.workers {
            let case = Case {
                workers: *workers,
                latency_ms: *latency_ms,
            };
            results.push(payouts::testkit::bench::run_case(&settings, case, &opts).await?);
        }
    }
    println!("{}", payouts::testkit::bench::table(&results));
    println!(
        "CPU during the measured burst:\n\n{}",
        payouts::testkit::bench::cpu_table(&results)
    );
    payouts::testkit::bench::write_json(&a.json, &results)?;
    if results.iter().any(|r| !r.exactly_once) {
        anyhow::bail!("exactly-once check failed");
    }
    Ok(())
}

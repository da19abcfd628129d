//! `payout-chaos`: the chaos harness (see `payouts::testkit::chaos`). Runs the fault
//! scenarios against a private Redis and Postgres and the fleet binaries
//! next to it, prints one table row per scenario, writes the whole report as
//! JSON, and exits 1 if any invariant was broken.

use std::path::PathBuf;

use clap::Parser;
use payouts::testkit::chaos::{self, Bins, ChaosOptions, Profile, Scenario};

#[derive(Parser)]
#[command(
    version,
    about = "Chaos harness: fault scenarios against a private fleet, invariants checked"
)]
struct Args {
    /// Scenarios to run (S1 ... S16), comma-separated; all by default.
    #[arg(long, value_delimiter = ',', value_parser = parse_scenario)]
    scenarios: Vec<Scenario>,
    /// Payouts per scenario (default: 3000, or 200 with --short).
    #[arg(long)]
    payouts: Option<i64>,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// The short form (few payouts, short faults), as the test command runs it.
    #[arg(long)]
    short: bool,
    /// The children run with the default settings (lease, renewal, rescue,
    /// timeouts, retries) instead of the fast ones; payouts due within 2 s.
    /// E.g. `--scenarios S13 --defaults --payouts 5000`.
    #[arg(long, conflicts_with = "short")]
    defaults: bool,
    /// S13 without its kills: the baseline of the kill storm (same faults).
    #[arg(long)]
    no_kills: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/chaos/last-run.json")]
    json: PathBuf,
    /// Where the child processes' logs go (one directory per scenario).
    #[arg(long, default_value = "target/chaos/logs")]
    log_dir: PathBuf,
}

fn parse_scenario(s: &str) -> Result<Scenario, chaos::UnknownScenario> {
    s.parse()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    payouts::telemetry::init("pretty");
    let args = Args::parse();
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios
    };
    let mut profile = if args.short {
        Profile::short(args.payouts.unwrap_or(200), args.workers)
    } else if args.defaults {
        Profile::defaults(args.payouts.unwrap_or(5000), args.workers)
    } else {
        Profile::full(args.payouts.unwrap_or(3000), args.workers)
    };
    profile.kills = !args.no_kills;
    let opts = ChaosOptions {
        scenarios,
        profile,
        bins: Bins::next_to_current_exe()?,
        log_dir: Some(args.log_dir.clone()),
    };
    // On Ctrl-C or SIGTERM the run is dropped, and with it every child
    // process, the private Postgres and the temp dirs (their Drop guards).
    let mut run = Box::pin(chaos::run(opts));
    let report = tokio::select! {
        r = &mut run => r?,
        _ = interrupted() => {
            drop(run);
            eprintln!("chaos: interrupted; every process stopped, temp dirs removed");
            std::process::exit(130);
        }
    };
    println!("{}", report.table());
    println!("{}", report.details());
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!(
        "{} scenarios in {:.0} s; report {}, logs {}",
        report.scenarios.len(),
        report.duration_secs,
        args.json.display(),
        args.log_dir.display()
    );
    if !report.ok() {
        eprintln!("chaos: invariants broken (see the table above)");
        std::process::exit(1);
    }
    Ok(())
}

async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

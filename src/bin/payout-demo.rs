//! `payout-demo`: the README's main job. See `payouts::testkit::demo`.

use std::{path::PathBuf, time::Duration};

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Run the whole fleet locally on 1,000 due payouts and print a summary"
)]
struct Args {
    /// Payouts to seed.
    #[arg(long, default_value_t = 1000)]
    count: i64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Where the child processes log.
    #[arg(long, default_value = ".demo")]
    log_dir: PathBuf,
    /// Start from earnings: one payee per payout, 3 released earnings each,
    /// settled by the policy into the payouts the fleet then pays.
    #[arg(long)]
    from_earnings: bool,
    /// Keep the fleet and the dashboard up after the summary, until Ctrl-C
    /// (two payees' accounts closed at the mock gateway, so some payouts fail).
    #[arg(long)]
    serve: bool,
    /// The gateway the fleet speaks: the generic contract or the booking
    /// worker's release-funds API (both served by the mock gateway), or Stripe
    /// Connect (served by the local Stripe stand-in, `stripe-standin`).
    #[arg(long, default_value = "contract", value_parser = ["contract", "release_funds", "stripe"])]
    gateway_kind: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = payouts::config::Settings::load(None)?;
    let opts = payouts::testkit::demo::DemoOptions {
        count: args.count,
        workers: args.workers,
        timeout: Duration::from_secs(args.timeout_secs),
        log_dir: args.log_dir,
        from_earnings: args.from_earnings,
        serve: args.serve,
        gateway_kind: args.gateway_kind,
    };
    let s = payouts::testkit::demo::run(settings, opts).await?;
    if !args.serve {
        println!("\n{}", payouts::testkit::demo::summary_line(&s));
    }
    if s.duplicates > 0 || s.paid + s.failed != s.seeded || s.disagreements > 0 {
        anyhow::bail!("exactly-once check failed");
    }
    Ok(())
}

//! `payout-worker`: the process that scales out. Takes payout jobs from Redis,
//! pays them through the gateway, records the outcome in Postgres.

// No unwrap in the product: `expect` with the reason it cannot fail, or a
// proper error. Unit tests may unwrap (clippy.toml `allow-unwrap-in-tests`).
#![warn(clippy::unwrap_used)]

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Payout worker: Redis jobs -> gateway -> Postgres")]
struct Args {
    /// A TOML file over the defaults (PAYOUTS_* variables still win).
    #[arg(long, env = "PAYOUTS_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = payouts::config::Settings::load(args.config.as_deref())?;
    payouts::telemetry::init(&settings.log.format);
    let shutdown = payouts::telemetry::shutdown_on_signals();
    payouts::worker::run(settings, shutdown).await
}

//! `payout-producer`: enqueues due payouts into Redis, one job each, within a
//! bounded window; sweeps expired leases. Run two: one leads, one stands by.

// No unwrap in the product: `expect` with the reason it cannot fail, or a
// proper error. Unit tests may unwrap (clippy.toml `allow-unwrap-in-tests`).
#![warn(clippy::unwrap_used)]

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Payout producer: due payouts -> Redis jobs")]
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
    payouts::producer::run(settings, shutdown).await
}

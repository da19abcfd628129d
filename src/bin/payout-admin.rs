//! `payout-admin`: the operators' server: the JSON API, the dashboard, the
//! gateway webhooks and the earnings intake, behind API tokens and roles.

// No unwrap in the product: `expect` with the reason it cannot fail, or a
// proper error. Unit tests may unwrap (clippy.toml `allow-unwrap-in-tests`).
#![warn(clippy::unwrap_used)]

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Payout admin: API, dashboard, webhooks")]
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
    payouts::admin::run(settings, shutdown).await
}

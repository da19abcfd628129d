//! The Stripe stand-in as a standalone server (see
//! `payouts::testkit::stripe_standin`), so the demo and a local fleet can run
//! with `gateway.kind = "stripe"` against it.

use std::collections::BTreeMap;

use clap::Parser;
use payouts::testkit::stripe_standin::{Endpoint, StandIn, StandInConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(about = "A local Stripe stand-in (transfers, reversals, accounts, webhooks)", long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "STRIPE_STANDIN_LISTEN", default_value = "127.0.0.1:12111")]
    listen: String,
    /// Secret key clients must send (`sk_test_…` or `sk_live_…`).
    #[arg(
        long,
        env = "STRIPE_STANDIN_KEY",
        default_value = "sk_test_standin",
        hide_env_values = true
    )]
    key: String,
    /// The platform's available USD balance, in cents.
    #[arg(long, default_value_t = 1_000_000_000)]
    usd_balance: i64,
    /// Connected accounts to create with an active `transfers` capability.
    #[arg(long, value_delimiter = ',')]
    accounts: Vec<String>,
    /// The platform webhook endpoint (`transfer.*`), e.g. http://127.0.0.1:8080/webhooks/stripe.
    #[arg(long)]
    platform_webhook: Option<String>,
    /// The Connect webhook endpoint (`account.updated`, `payout.*`).
    #[arg(long)]
    connect_webhook: Option<String>,
    /// Signing secret of the platform endpoint.
    #[arg(
        long,
        env = "STRIPE_STANDIN_PLATFORM_SECRET",
        default_value = "whsec_standin_platform",
        hide_env_values = true
    )]
    platform_secret: String,
    /// Signing secret of the Connect endpoint.
    #[arg(
        long,
        env = "STRIPE_STANDIN_CONNECT_SECRET",
        default_value = "whsec_standin_connect",
        hide_env_values = true
    )]
    connect_secret: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let a = Args::parse();
    let cfg = StandInConfig {
        secret_keys: vec![a.key],
        balance: BTreeMap::from([("usd".to_string(), a.usd_balance)]),
        platform_endpoint: a.platform_webhook.map(|url| Endpoint {
            url,
            secret: a.platform_secret,
        }),
        connect_endpoint: a.connect_webhook.map(|url| Endpoint {
            url,
            secret: a.connect_secret,
        }),
        ..StandInConfig::default()
    };
    let standin = StandIn::new(cfg);
    for id in &a.accounts {
        standin.add_account(id).await;
    }
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    let base = standin.spawn(listener).await?;
    println!("stripe stand-in listening on {base}");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

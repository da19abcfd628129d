//! The mock payment gateway as a standalone server (see `payouts::testkit::mock_gateway`).

use clap::Parser;
use payouts::testkit::mock_gateway::{Faults, MockGateway, MockGatewayConfig};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(about = "Mock payment gateway speaking the gateway HTTP contract", long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "MOCK_GATEWAY_LISTEN", default_value = "127.0.0.1:8085")]
    listen: String,
    /// Bearer secret clients must send.
    #[arg(
        long,
        env = "MOCK_GATEWAY_SECRET",
        default_value = "sk_test_mock",
        hide_env_values = true
    )]
    secret: String,
    /// Seed for latency jitter and random faults.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the ledger in this file (JSON lines, fsynced before each answer,
    /// loaded at start) so a restarted mock keeps its idempotency ledger.
    #[arg(long, env = "MOCK_GATEWAY_LEDGER_FILE", value_name = "PATH")]
    ledger_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    faults: Faults,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let args = Args::parse();
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let (secret, faults, seed) = (args.secret, args.faults, args.seed);
    let ledger_file = args.ledger_file;
    let gateway = MockGateway::try_new(MockGatewayConfig {
        secret,
        faults,
        seed,
        ledger_file: ledger_file.clone(),
    })?;
    if let Some(path) = &ledger_file {
        tracing::info!(path = %path.display(), entries = gateway.ledger().len(), "durable ledger loaded");
    }
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    println!("mock gateway listening on http://{addr}");
    tracing::info!(%addr, faults = ?gateway.faults(), "mock gateway started");
    gateway.serve(listener, shutdown).await?;
    tracing::info!("mock gateway stopped");
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => drop(s.recv().await),
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
    shutdown.cancel();
}

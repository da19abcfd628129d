//! `payoutctl`: the operator CLI. See `payouts::cli`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = payouts::cli::Cli::parse();
    let result = async {
        let settings = payouts::config::Settings::load(cli.config.as_deref())?;
        let mut out = std::io::stdout();
        payouts::cli::run(cli, settings, &mut out).await
    }
    .await;
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(payouts::cli::Exit::code_of(&e));
    }
}

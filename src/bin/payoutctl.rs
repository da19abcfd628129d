//! `payoutctl`: the operator CLI. See `payouts::cli`.

// No unwrap in the product: `expect` with the reason it cannot fail, or a
// proper error. Unit tests may unwrap (clippy.toml `allow-unwrap-in-tests`).
#![warn(clippy::unwrap_used)]

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = payouts::cli::Cli::parse();
    // Completions and man pages need no configuration or database.
    if let Some(r) = payouts::cli::run_offline(&cli, &mut std::io::stdout()) {
        if let Err(e) = r {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let result = async {
        let settings = payouts::config::Settings::load(cli.config.as_deref())?;
        // Terminal escapes in stored text are shown, never obeyed.
        let mut out = payouts::cli::Printable(std::io::stdout());
        payouts::cli::run(cli, settings, &mut out).await
    }
    .await;
    if let Err(e) = result {
        let msg = format!("error: {e:#}\n");
        let _ = std::io::Write::write_all(
            &mut payouts::cli::Printable(std::io::stderr()),
            msg.as_bytes(),
        );
        std::process::exit(payouts::cli::Exit::code_of(&e));
    }
}

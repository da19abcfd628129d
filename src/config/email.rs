//! `[email]`: mail to payees about their payouts (README "Email to
//! payees"), over SMTP, sent from the outbox by the worker that holds the
//! delivery lease of outbound webhooks.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The event types a mail can be about (each has a template).
pub const MAILABLE: [&str; 4] = [
    "payout.paid",
    "payout.failed",
    "payout.in_transit",
    "payout.reversed",
];

/// Email to payees.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    /// Send mail to payees that have an address (needs
    /// `webhooks_out.enabled`: the same worker sends it).
    pub enabled: bool,
    /// The SMTP server, credentials included: `smtps://user:pass@host:465`
    /// (TLS), `smtp://user:pass@host:587?tls=required` (STARTTLS) or
    /// `smtp://host:25` (plain, for a relay on the same host). A secret:
    /// never logged.
    pub smtp_url: SecretString,
    /// The sender, `Name <address>` or an address.
    pub from: String,
    /// The event types mailed (some of [`MAILABLE`]).
    pub event_types: Vec<String>,
    /// Most time one mail may take (connect, TLS, dialogue), in ms; with the
    /// immediate retries it must fit in `webhooks_out.lease_secs`.
    pub timeout_ms: u64,
}

impl EmailSettings {
    /// Checks the section; the error names the bad key (never the URL's
    /// credentials).
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(bad) = self
            .event_types
            .iter()
            .find(|t| !MAILABLE.contains(&t.as_str()))
        {
            anyhow::bail!(
                "email.event_types: {bad:?} has no template; use some of {}",
                MAILABLE.join(", ")
            );
        }
        if self.timeout_ms < 1 {
            anyhow::bail!("email.timeout_ms must be >= 1");
        }
        if !self.enabled {
            return Ok(());
        }
        let url = self.smtp_url.expose_secret();
        let scheme_ok = url::Url::parse(url)
            .ok()
            .is_some_and(|u| matches!(u.scheme(), "smtp" | "smtps") && u.host_str().is_some());
        if !scheme_ok {
            anyhow::bail!("email.smtp_url must be smtp://… or smtps://… with a host");
        }
        if self.from.parse::<lettre::message::Mailbox>().is_err() {
            anyhow::bail!("email.from is not an email address (\"Name <address>\" or an address)");
        }
        if self.event_types.is_empty() {
            anyhow::bail!("email.event_types must name at least one event type");
        }
        Ok(())
    }
}

//! Email to payees: the SMTP channel of the deliverer. The fan-out writes a
//! mail message for each payout event of a mailed type whose payee has an
//! address (with the cursor's move, like webhook messages); the deliverer
//! claims, sends, retries and logs it exactly as a webhook message (same
//! lease, schedule, log and replay), only the transport differs. Templates
//! are plain text, one per event type; amounts are shown exactly, at the
//! currency's minor unit, with its code.

use std::time::Duration;

use anyhow::Context;
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, header::ContentType},
};
use secrecy::ExposeSecret;

use super::{SendFailed, Sent, shown_amount};
use crate::{config::EmailSettings, db::events::OutboxEvent, db::webhook_deliveries::Claimed};

/// The SMTP sender of one process.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    kinds: Vec<String>,
}

impl std::fmt::Debug for Mailer {
    // The transport holds the credentials: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// A sender for `settings` (validated at load).
    pub fn new(settings: &EmailSettings) -> anyhow::Result<Mailer> {
        // The error of a bad URL is not shown: it could quote the password.
        let transport =
            AsyncSmtpTransport::<Tokio1Executor>::from_url(settings.smtp_url.expose_secret())
                .map_err(|_| anyhow::anyhow!("email.smtp_url could not be used"))?
                .timeout(Some(Duration::from_millis(settings.timeout_ms)))
                .build();
        let from = settings
            .from
            .parse::<Mailbox>()
            .context("email.from is not an email address")?;
        Ok(Mailer {
            transport,
            from,
            kinds: settings.event_types.clone(),
        })
    }

    /// Whether events of type `kind` are mailed.
    pub fn wants(&self, kind: &str) -> bool {
        self.kinds.iter().any(|k| k == kind)
    }

    /// One mail; an error when it should be tried again at once.
    pub(super) async fn send(&self, c: &Claimed) -> Result<Sent, SendFailed> {
        let refused = |message: String| {
            Ok(Sent::Error {
                kind: "refused",
                message,
            })
        };
        let (Some(to), Some(subject)) = (&c.recipient, &c.subject) else {
            return refused("a mail without recipient or subject".into());
        };
        let Ok(to) = to.parse::<Mailbox>() else {
            return refused("the recipient is not an email address".into());
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject.as_str())
            .message_id(Some(format!("<{}@payouts.invalid>", c.event_id)))
            .header(ContentType::TEXT_PLAIN)
            .body(c.body.clone());
        let message = match message {
            Ok(m) => m,
            Err(e) => return refused(format!("the mail could not be built: {e}")),
        };
        match self.transport.send(message).await {
            Ok(r) => Ok(Sent::Accepted {
                code: u16::from(r.code()),
                excerpt: r
                    .message()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(512)
                    .collect(),
            }),
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_permanent() {
                    "smtp_rejected"
                } else if e.is_transient() {
                    "smtp_deferred"
                } else {
                    "smtp_error"
                };
                let sent = Sent::Error {
                    kind,
                    message: super::error_chain(&e),
                };
                // A refusal (5xx) will not change on a resend, and after a
                // timeout the server may have taken the mail: neither is
                // retried at once (no second copy in the payee's inbox).
                if e.is_permanent() || e.is_timeout() {
                    Ok(sent)
                } else {
                    Err(SendFailed { sent })
                }
            }
        }
    }
}

/// The subject and plain text of the mail about payout event `e` of type
/// `kind` to `name`; `None` for a type without a template.
pub fn render(kind: &str, e: &OutboxEvent, name: &str) -> Option<(String, String)> {
    let amount = format!("{} {}", shown_amount(e.amount, &e.currency), e.currency);
    let (subject, lead, after) = match kind {
        "payout.paid" => (
            format!("Your payout of {amount} has been sent"),
            format!("Your payout of {amount} has been sent to your account."),
            "Depending on your bank it can take a few business days to arrive.",
        ),
        "payout.failed" => (
            format!("Your payout of {amount} could not be completed"),
            format!("We could not complete your payout of {amount}."),
            "Please check your payout details; we will try again once they are \
             fixed, or contact support. The money stays owed to you.",
        ),
        "payout.in_transit" => (
            format!("Your payout of {amount} is on its way"),
            format!("Your payout of {amount} has been accepted by the bank and is on its way."),
            "We will tell you when it has arrived.",
        ),
        "payout.reversed" => (
            format!("Your payout of {amount} was returned"),
            format!("Your payout of {amount} was returned by the bank after it was sent."),
            "The money stays owed to you; please check your payout details or contact support.",
        ),
        _ => return None,
    };
    let mut text = format!("Hello {name},\n\n{lead}\n\n");
    text.push_str(&format!("Payout:    {}\n", e.payout_id));
    text.push_str(&format!("Amount:    {amount}\n"));
    text.push_str(&format!("Status:    {}\n", e.to_status));
    if let Some(t) = &e.gateway_transfer_id {
        text.push_str(&format!("Reference: {t}\n"));
    }
    if kind != "payout.paid"
        && let Some(code) = &e.failure_code
    {
        text.push_str(&format!("Reason:    {code}\n"));
    }
    text.push_str(&format!("\n{after}\n\n-- \nPayouts\n"));
    Some((subject, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(amount: &str, currency: &str) -> OutboxEvent {
        OutboxEvent {
            tx_id: 1,
            id: 7,
            payout_id: 42,
            from_status: Some("processing".into()),
            to_status: "paid".into(),
            reason: None,
            attempt: Some(1),
            at: chrono::DateTime::UNIX_EPOCH,
            payee_id: 3,
            amount: amount.parse().unwrap(),
            currency: currency.into(),
            due_at: chrono::DateTime::UNIX_EPOCH,
            gateway_transfer_id: Some("tr_1".into()),
            failure_code: None,
        }
    }

    #[test]
    fn amounts_are_shown_exactly_at_the_currency_minor_unit() {
        let (subject, text) = render("payout.paid", &event("120.50000000", "USD"), "Ada").unwrap();
        assert_eq!(subject, "Your payout of 120.50 USD has been sent");
        assert!(text.starts_with("Hello Ada,\n"), "{text}");
        assert!(text.contains("Amount:    120.50 USD\n"), "{text}");
        assert!(text.contains("Reference: tr_1\n"), "{text}");
        let (subject, _) = render("payout.paid", &event("1500", "JPY"), "Ada").unwrap();
        assert_eq!(subject, "Your payout of 1500 JPY has been sent");
        let (subject, _) = render("payout.failed", &event("0.125", "BHD"), "Ada").unwrap();
        assert_eq!(subject, "Your payout of 0.125 BHD could not be completed");
        assert!(render("payout.created", &event("1", "USD"), "Ada").is_none());
    }
}

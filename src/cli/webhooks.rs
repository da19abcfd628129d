//! `payoutctl webhooks …`: the platform's outbound webhook endpoints (the
//! same rules as `/api/v1/webhook-endpoints`): register, list, change,
//! rotate the secret, delete, the delivery log and replays.

use std::io::Write;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use secrecy::ExposeSecret;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    cli::{EXIT_USAGE, Exit},
    config::Settings,
    db::{webhook_deliveries, webhook_endpoints},
    services::webhooks_out::{
        endpoints::{self, EndpointChange, EndpointError, NewEndpoint},
        safety::Policy,
    },
};

/// Webhook endpoint commands.
#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Register an endpoint; its signing secret (whsec_…) is printed once.
    Create {
        /// Where to POST: https://…, or http:// to a loopback address.
        #[arg(long)]
        url: String,
        /// Event types wanted, comma-separated (e.g. payout.paid,payout.failed), or * for all.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        events: Vec<String>,
        /// A note for people.
        #[arg(long)]
        description: Option<String>,
        /// Register it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List endpoints (never their secrets).
    List,
    /// Change an endpoint: URL, event types, description, enabled.
    Update {
        /// Endpoint id.
        id: i64,
        /// New URL.
        #[arg(long)]
        url: Option<String>,
        /// New event types, comma-separated.
        #[arg(long, value_delimiter = ',')]
        events: Option<Vec<String>>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Enable it (also after the fleet disabled it).
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Disable it.
        #[arg(long)]
        disable: bool,
    },
    /// A new signing secret (printed once); the old one signs too during the overlap.
    RotateSecret {
        /// Endpoint id.
        id: i64,
        /// Seconds the previous secret keeps signing (default webhooks_out.rotation_overlap_secs).
        #[arg(long)]
        overlap_secs: Option<u64>,
    },
    /// Delete an endpoint and its messages.
    Delete {
        /// Endpoint id.
        id: i64,
    },
    /// The newest messages to an endpoint.
    Deliveries {
        /// Endpoint id.
        id: i64,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// The delivery log (every attempt) of one message.
    Attempts {
        /// Delivery id.
        id: i64,
    },
    /// Send one message again, or every message to an endpoint since a time.
    Replay {
        /// Delivery id.
        #[arg(required_unless_present = "endpoint", conflicts_with = "endpoint")]
        id: Option<i64>,
        /// Endpoint id (with --since).
        #[arg(long, requires = "since")]
        endpoint: Option<i64>,
        /// RFC 3339, or an age such as 30m, 24h, 7d.
        #[arg(long)]
        since: Option<String>,
    },
}

/// The error with its exit code: not found 3, bad input 2 (README: exit codes).
fn plain(e: EndpointError) -> anyhow::Error {
    match e {
        EndpointError::Db(e) => anyhow::Error::new(e).context("failed to write the endpoint"),
        e @ (EndpointError::NotFound(_) | EndpointError::MessageNotFound(_)) => {
            Exit::not_found(e.to_string())
        }
        EndpointError::BadInput(m) => Exit::new(EXIT_USAGE, m).into(),
    }
}

/// Runs one webhooks command.
pub async fn run(
    pool: &PgPool,
    settings: &Settings,
    cmd: WebhooksCommand,
    actor: &str,
    json_out: bool,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let policy = Policy::new(&settings.webhooks_out.allow_private);
    match cmd {
        WebhooksCommand::Create {
            url,
            events,
            description,
            disabled,
        } => {
            let new = NewEndpoint {
                url,
                event_types: events,
                description,
                enabled: Some(!disabled),
            };
            let (id, secret) = endpoints::register(pool, &policy, &new, actor, None, now)
                .await
                .map_err(plain)?;
            if json_out {
                writeln!(
                    out,
                    "{}",
                    json!({"id": id, "secret": secret.expose_secret()})
                )?;
            } else {
                writeln!(
                    out,
                    "endpoint {id} registered; its signing secret, shown once (keep it secret):"
                )?;
                writeln!(out, "{}", secret.expose_secret())?;
            }
        }
        WebhooksCommand::List => {
            let list = webhook_endpoints::list(pool).await?;
            if json_out {
                writeln!(out, "{}", serde_json::to_string(&list)?)?;
            } else {
                let mut t =
                    crate::cli::table(&["ID", "URL", "EVENTS", "ENABLED", "FAILING SINCE"], &[0]);
                for e in &list {
                    t.add_row(vec![
                        e.id.to_string(),
                        e.url.clone(),
                        e.event_types.join(","),
                        if e.enabled {
                            "yes".into()
                        } else {
                            format!("no {}", e.disabled_reason.clone().unwrap_or_default())
                        },
                        e.failing_since.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    ]);
                }
                writeln!(out, "{t}")?;
            }
        }
        WebhooksCommand::Update {
            id,
            url,
            events,
            description,
            enable,
            disable,
        } => {
            let change = EndpointChange {
                url,
                event_types: events,
                description,
                enabled: (enable || disable).then_some(enable),
            };
            endpoints::change(pool, &policy, id, &change, actor, None, now)
                .await
                .map_err(plain)?;
            let e = webhook_endpoints::get(pool, id).await?;
            writeln!(out, "{}", serde_json::to_string(&e)?)?;
        }
        WebhooksCommand::RotateSecret { id, overlap_secs } => {
            let overlap = overlap_secs.unwrap_or(settings.webhooks_out.rotation_overlap_secs);
            let (secret, until) = endpoints::rotate(pool, id, overlap, actor, None, now)
                .await
                .map_err(plain)?;
            if json_out {
                writeln!(
                    out,
                    "{}",
                    json!({"id": id, "secret": secret.expose_secret(), "previous_until": until})
                )?;
            } else {
                writeln!(
                    out,
                    "endpoint {id}: new secret, shown once; the previous one also signs until {}:",
                    until.to_rfc3339()
                )?;
                writeln!(out, "{}", secret.expose_secret())?;
            }
        }
        WebhooksCommand::Delete { id } => {
            endpoints::remove(pool, id, actor, None, now)
                .await
                .map_err(plain)?;
            writeln!(out, "endpoint {id} deleted")?;
        }
        WebhooksCommand::Deliveries { id, limit } => {
            let list = webhook_deliveries::for_endpoint(pool, id, limit.clamp(1, 1000)).await?;
            if json_out {
                writeln!(out, "{}", serde_json::to_string(&list)?)?;
            } else {
                let mut t = crate::cli::table(
                    &[
                        "ID", "EVENT", "TYPE", "STATUS", "ATTEMPTS", "LAST", "CREATED",
                    ],
                    &[0, 4],
                );
                for d in &list {
                    t.add_row(vec![
                        d.id.to_string(),
                        d.event_id.clone(),
                        d.event_type.clone(),
                        d.status.clone(),
                        d.attempts.to_string(),
                        d.last_status
                            .map(|c| c.to_string())
                            .or(d.last_error.clone())
                            .unwrap_or_default(),
                        d.created_at.to_rfc3339(),
                    ]);
                }
                writeln!(out, "{t}")?;
            }
        }
        WebhooksCommand::Attempts { id } => {
            let list = webhook_deliveries::attempts(pool, id).await?;
            writeln!(out, "{}", serde_json::to_string(&list)?)?;
        }
        WebhooksCommand::Replay {
            id,
            endpoint,
            since,
        } => match (id, endpoint, since) {
            (Some(id), _, _) => {
                endpoints::replay(pool, id, actor, None, now)
                    .await
                    .map_err(plain)?;
                writeln!(out, "delivery {id} will be sent again")?;
            }
            (None, Some(endpoint), Some(since)) => {
                let since = crate::cli::parse_since(&since, now).context("--since")?;
                let n = endpoints::replay_since(pool, endpoint, since, actor, None, now)
                    .await
                    .map_err(plain)?;
                writeln!(
                    out,
                    "{n} messages to endpoint {endpoint} will be sent again"
                )?;
            }
            _ => anyhow::bail!("give a delivery id, or --endpoint with --since"),
        },
    }
    Ok(())
}

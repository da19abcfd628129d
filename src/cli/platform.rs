//! `payoutctl payee list|show|suspend|resume|set-account` (#17 item 7): the
//! same changes as the admin API's (`src/services/payees.rs`), audited with
//! the operator as actor.

use std::io::Write;

use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde_json::json;
use sqlx::PgPool;

use super::{EXIT_CONFLICT, EXIT_USAGE, Exit, print_table, table};
use crate::{
    config::Settings,
    db::payees,
    services::payees::{self as payee_service, By, PayeeError},
};

/// Payee management commands (flattened into `payoutctl payee`).
#[derive(Debug, Subcommand)]
pub enum PayeeOps {
    /// List payees, newest first.
    List {
        /// Only `active` or `suspended` payees.
        #[arg(long)]
        status: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only ids below this (paging: the last id of the previous page).
        #[arg(long)]
        before: Option<i64>,
    },
    /// A payee: name, account, status, and its open payouts.
    Show {
        /// Payee id.
        id: i64,
    },
    /// Suspend a payee: not settled, its payouts wait (queued ones go back to pending).
    Suspend {
        /// Payee id.
        id: i64,
        /// Why (recorded in the audit log and the payouts' histories).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a suspended payee: settled again, its due payouts go out.
    Resume {
        /// Payee id.
        id: i64,
    },
    /// Change a payee's gateway account; payouts already sent keep theirs.
    SetAccount {
        /// Payee id.
        id: i64,
        /// The new account (for Stripe and release_funds: acct_…).
        #[arg(long)]
        account: String,
    },
}

fn exit_of(e: PayeeError) -> anyhow::Error {
    match e {
        PayeeError::NotFound(id) => Exit::not_found(format!("payee {id} not found")),
        PayeeError::Conflict(m) => Exit::new(EXIT_CONFLICT, m).into(),
        PayeeError::Invalid(m) => Exit::new(EXIT_USAGE, m).into(),
        PayeeError::Db(e) => e.into(),
    }
}

fn payees_table(rows: &[payees::Payee]) -> comfy_table::Table {
    let mut t = table(&["ID", "NAME", "ACCOUNT", "CUR", "STATUS", "CREATED"], &[]);
    for p in rows {
        t.add_row(vec![
            p.id.to_string(),
            p.name.clone(),
            p.gateway_account.clone(),
            p.currency.clone(),
            p.status.clone(),
            p.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        ]);
    }
    t
}

/// Runs one payee management command.
pub async fn run(
    pool: &PgPool,
    settings: &Settings,
    cmd: PayeeOps,
    as_json: bool,
    actor: &str,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let by = By {
        actor,
        source: None,
        now,
    };
    match cmd {
        PayeeOps::List {
            status,
            limit,
            before,
        } => {
            let status = match status.as_deref() {
                None => None,
                Some(s @ ("active" | "suspended")) => Some(s),
                Some(other) => bail!("status: expected active or suspended, got {other:?}"),
            };
            if !(1..=1000).contains(&limit) {
                bail!("limit: expected 1 to 1000");
            }
            let rows = payees::page_with_status(pool, status, before, limit).await?;
            if as_json {
                let next = (rows.len() as i64 == limit)
                    .then(|| rows.last().map(|p| p.id))
                    .flatten();
                writeln!(out, "{}", json!({"items": rows, "next_before": next}))?;
            } else {
                print_table(out, &payees_table(&rows))?;
            }
        }
        PayeeOps::Show { id } => {
            let p = payees::get(pool, id)
                .await?
                .ok_or_else(|| Exit::not_found(format!("payee {id} not found")))?;
            let (open, sent) = crate::db::payouts::open_of_payee(pool, id).await?;
            if as_json {
                writeln!(
                    out,
                    "{}",
                    json!({"payee": p, "open_payouts": open, "sent_open_payouts": sent})
                )?;
            } else {
                writeln!(out, "payee {}  {}", p.id, p.name)?;
                writeln!(out, "  account   {}", p.gateway_account)?;
                writeln!(out, "  currency  {}", p.currency)?;
                writeln!(out, "  status    {}", p.status)?;
                writeln!(
                    out,
                    "  created   {}",
                    p.created_at.format("%Y-%m-%dT%H:%M:%SZ")
                )?;
                writeln!(out, "  open payouts {open} ({sent} sent)")?;
            }
        }
        PayeeOps::Suspend { id, reason } => {
            let r = payee_service::suspend(pool, id, reason.as_deref(), by)
                .await
                .map_err(exit_of)?;
            if as_json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(
                    out,
                    "payee {id} suspended; {} queued payouts wait as pending",
                    r.parked.len()
                )?;
            }
        }
        PayeeOps::Resume { id } => {
            let p = payee_service::resume(pool, id, by).await.map_err(exit_of)?;
            if as_json {
                writeln!(out, "{}", json!({"payee": p}))?;
            } else {
                writeln!(out, "payee {id} resumed")?;
            }
        }
        PayeeOps::SetAccount { id, account } => {
            let r = payee_service::set_account(pool, settings.gateway.kind, id, &account, by)
                .await
                .map_err(exit_of)?;
            if as_json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(
                    out,
                    "payee {id} account {} -> {}; {} payouts sent keep {}, {} not yet sent go to the new account",
                    r.previous,
                    r.payee.gateway_account,
                    r.kept_destination,
                    r.previous,
                    r.to_new_account
                )?;
            }
        }
    }
    Ok(())
}

//! `payoutctl payee list|show|suspend|resume|set-account|set-email|set-tier` (#17 items 7, 4): the
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
    domain::PayeeId,
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
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// A payee's balance per currency: held, releasable, carried over, in flight, paid this period.
    Balance {
        /// Payee id.
        id: i64,
    },
    /// A payee's earnings, newest first, with their state (held, released, carried, settled).
    Earnings {
        /// Payee id.
        id: i64,
        /// Only held, released, carried or settled earnings.
        #[arg(long)]
        state: Option<String>,
        /// Only this currency.
        #[arg(long)]
        currency: Option<String>,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only ids below this (paging).
        #[arg(long)]
        before: Option<i64>,
    },
    /// A payee's payouts, newest first, with their line items.
    Payouts {
        /// Payee id.
        id: i64,
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        /// Only this currency.
        #[arg(long)]
        currency: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only ids below this (paging).
        #[arg(long)]
        before: Option<i64>,
    },
    /// The payee's upcoming payout, line by line (the same as `payoutctl preview --payee`).
    Upcoming {
        /// Payee id.
        id: i64,
    },
    /// Set (or clear) the address a payee's payout notices are mailed to.
    SetEmail {
        /// Payee id.
        id: i64,
        /// The address (name@domain).
        #[arg(long, conflicts_with = "clear", required_unless_present = "clear")]
        email: Option<String>,
        /// Remove the address: no more mail to this payee.
        #[arg(long)]
        clear: bool,
    },
    /// Set a payee's tier (0-9): with `producer.priority.scheduled = "tier"`
    /// its scheduled payouts rank ahead by `tier_boost_secs[tier]`.
    SetTier {
        /// Payee id.
        id: i64,
        /// The tier, 0 (standard) to 9.
        #[arg(long)]
        tier: i64,
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

/// The exit of a refused payee change or escrow action.
pub(crate) fn exit_of(e: PayeeError) -> anyhow::Error {
    match e {
        e @ PayeeError::NotFound(..) => Exit::not_found(e.to_string()),
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

fn check_limit(limit: i64) -> anyhow::Result<()> {
    if !(1..=1000).contains(&limit) {
        bail!("limit: expected 1 to 1000");
    }
    Ok(())
}

/// The `--before` of the next page: the last id, when the page was full.
fn next_before(ids: impl Iterator<Item = i64>, limit: i64) -> Option<i64> {
    let ids: Vec<i64> = ids.collect();
    (ids.len() as i64 == limit)
        .then(|| ids.last().copied())
        .flatten()
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
            check_limit(limit)?;
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
            let p = payees::get(pool, PayeeId::new(id))
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
                writeln!(out, "  email     {}", p.email.as_deref().unwrap_or("-"))?;
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
        PayeeOps::Resume { id, reason } => {
            let p = payee_service::resume(pool, id, reason.as_deref(), by)
                .await
                .map_err(exit_of)?;
            if as_json {
                writeln!(out, "{}", json!({"payee": p}))?;
            } else {
                writeln!(out, "payee {id} resumed")?;
            }
        }
        PayeeOps::Balance { id } => {
            let policy = crate::services::settlement::policy_for(settings)?;
            let b = payee_service::balance(pool, &policy, id, now)
                .await
                .map_err(exit_of)?
                .ok_or_else(|| Exit::not_found(format!("payee {id} not found")))?;
            if as_json {
                writeln!(out, "{}", serde_json::to_string(&b)?)?;
            } else {
                writeln!(
                    out,
                    "payee {id} ({})  schedule {}  period {} to {}",
                    b.status,
                    b.schedule,
                    b.period.start.format("%Y-%m-%dT%H:%M:%SZ"),
                    b.period.end.format("%Y-%m-%dT%H:%M:%SZ")
                )?;
                let mut t = table(
                    &[
                        "CUR",
                        "HELD",
                        "RELEASABLE",
                        "CARRIED",
                        "IN FLIGHT",
                        "PAID THIS PERIOD",
                        "NEXT RELEASE",
                    ],
                    &[1, 2, 3, 4, 5],
                );
                for c in &b.currencies {
                    t.add_row(vec![
                        c.currency.clone(),
                        format!("{} ({})", c.held, c.held_count),
                        format!("{} ({})", c.releasable, c.releasable_count),
                        c.carried_over.to_string(),
                        format!("{} ({})", c.in_flight, c.in_flight_count),
                        format!("{} ({})", c.paid_this_period, c.paid_count),
                        c.next_release_at
                            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                            .unwrap_or_default(),
                    ]);
                }
                print_table(out, &t)?;
            }
        }
        PayeeOps::Earnings {
            id,
            state,
            currency,
            source,
            limit,
            before,
        } => {
            use crate::db::platform as reads;
            if let Some(st) = state
                .as_deref()
                .filter(|s| !reads::EARNING_STATES.contains(s))
            {
                bail!(
                    "state: expected one of {}, got {st:?}",
                    reads::EARNING_STATES.join(", ")
                );
            }
            let currency = currency
                .map(|c| c.to_ascii_uppercase().parse::<crate::domain::Currency>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("currency: {e}"))?
                .map(|c| c.code().to_string());
            check_limit(limit)?;
            payees::get(pool, PayeeId::new(id))
                .await?
                .ok_or_else(|| Exit::not_found(format!("payee {id} not found")))?;
            let f = reads::EarningFilter {
                state,
                currency,
                source,
                ..Default::default()
            };
            let rows = reads::earnings_page(pool, id, &f, now, before, limit).await?;
            if as_json {
                writeln!(
                    out,
                    "{}",
                    json!({"items": rows, "next_before": next_before(rows.iter().map(|e| e.id), limit)})
                )?;
            } else {
                let mut t = table(
                    &[
                        "ID",
                        "SOURCE/REF",
                        "GROSS",
                        "CUR",
                        "STATE",
                        "RELEASE",
                        "PAYOUT",
                    ],
                    &[2],
                );
                for e in &rows {
                    t.add_row(vec![
                        e.id.to_string(),
                        format!("{}/{}", e.source, e.external_ref),
                        e.gross.to_string(),
                        e.currency.clone(),
                        e.state.clone(),
                        e.release_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                        e.payout_id
                            .map(|p| format!("{p} ({})", e.payout_status.as_deref().unwrap_or("")))
                            .unwrap_or_default(),
                    ]);
                }
                print_table(out, &t)?;
            }
        }
        PayeeOps::Payouts {
            id,
            status,
            currency,
            limit,
            before,
        } => {
            let status = status
                .map(|s| s.parse::<crate::domain::PayoutStatus>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("status: {e}"))?;
            let currency = currency
                .map(|c| c.to_ascii_uppercase().parse::<crate::domain::Currency>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("currency: {e}"))?
                .map(|c| c.code().to_string());
            check_limit(limit)?;
            payees::get(pool, PayeeId::new(id))
                .await?
                .ok_or_else(|| Exit::not_found(format!("payee {id} not found")))?;
            let rows = crate::db::platform::payouts_page(
                pool,
                id,
                status.map(|s| s.as_str()),
                currency.as_deref(),
                before,
                limit,
            )
            .await?;
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let lines = crate::db::platform::lines_of(pool, &ids).await?;
            if as_json {
                let items: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).unwrap_or_default();
                        v["lines"] = json!(
                            lines
                                .iter()
                                .filter(|l| l.payout_id == r.id)
                                .collect::<Vec<_>>()
                        );
                        v
                    })
                    .collect();
                writeln!(
                    out,
                    "{}",
                    json!({"items": items, "next_before": next_before(ids.iter().copied(), limit)})
                )?;
            } else {
                for r in &rows {
                    writeln!(
                        out,
                        "payout {}  {} {}  {}  due {}",
                        r.id,
                        r.amount,
                        r.currency,
                        r.status,
                        r.due_at.format("%Y-%m-%dT%H:%M:%SZ")
                    )?;
                    for l in lines.iter().filter(|l| l.payout_id == r.id) {
                        writeln!(out, "  {:<12} {:>14}  {}", l.kind, l.amount, l.description)?;
                    }
                }
            }
        }
        PayeeOps::Upcoming { id } => {
            payees::get(pool, PayeeId::new(id))
                .await?
                .ok_or_else(|| Exit::not_found(format!("payee {id} not found")))?;
            crate::cli::money::preview(
                pool,
                settings,
                crate::cli::money::PreviewArgs { payee: id },
                as_json,
                now,
                out,
            )
            .await?
        }
        PayeeOps::SetEmail { id, email, clear } => {
            let email = if clear { None } else { email };
            let p = payee_service::set_email(pool, id, email.as_deref(), by)
                .await
                .map_err(exit_of)?;
            if as_json {
                writeln!(out, "{}", json!({"payee": p}))?;
            } else {
                match &p.email {
                    Some(e) => writeln!(out, "payee {id} email set to {e}")?,
                    None => writeln!(out, "payee {id} email cleared: no more mail")?,
                }
            }
        }
        PayeeOps::SetTier { id, tier } => {
            let r = payee_service::set_tier(pool, id, tier, by)
                .await
                .map_err(exit_of)?;
            if as_json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(
                    out,
                    "payee {id} tier {} -> {}; {} pending payouts ranked again",
                    r.previous, r.tier, r.reranked
                )?;
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

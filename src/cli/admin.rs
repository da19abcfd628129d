//! `payoutctl` commands that mirror the admin server, so whatever the
//! dashboard does an operator can script: API tokens, the overview, the
//! failures view, and bulk retry with a dry run. Filters are the API's, with
//! the same validation and messages.

use std::io::Write;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;
use sqlx::PgPool;

use crate::{
    admin::{AdminState, overview},
    clock::Clock,
    config::Settings,
    db::{
        filter::{self, PayoutFilter},
        payouts,
        tokens::{self, Role},
    },
    queue::Queue,
};

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once and stored only as a hash.
    Create {
        /// Who holds it (the actor in payout histories): 1-64 of A-Z a-z 0-9 _ . @ -.
        #[arg(long)]
        name: String,
        /// viewer (read), operator (retry, cancel, enqueue, post earnings), admin (also bulk
        /// actions, tokens, payee accounts) or integration (the platform's backend: post
        /// earnings, read payees and payouts, request payouts; nothing else).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["viewer", "operator", "admin", "integration"]))]
        role: String,
        /// Let it stop working after this many days (default: until revoked).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        expires_in_days: Option<u32>,
    },
    /// List tokens (never the tokens themselves).
    List,
    /// Revoke the live token with this name and end its dashboard sessions.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// The list filters of the admin API.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Only this status.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
        crate::domain::status::ALL_STATUSES.map(|s| s.as_str())
    ))]
    pub status: Option<String>,
    /// Only this payee id.
    #[arg(long)]
    pub payee: Option<String>,
    /// Only this currency.
    #[arg(long)]
    pub currency: Option<String>,
    /// Only this failure code.
    #[arg(long)]
    pub failure_code: Option<String>,
    /// Created at or after (RFC 3339).
    #[arg(long)]
    pub created_from: Option<String>,
    /// Created before (RFC 3339).
    #[arg(long)]
    pub created_to: Option<String>,
    /// Due at or after (RFC 3339).
    #[arg(long)]
    pub due_from: Option<String>,
    /// Due before (RFC 3339).
    #[arg(long)]
    pub due_to: Option<String>,
    /// Paid at or after (RFC 3339).
    #[arg(long)]
    pub paid_from: Option<String>,
    /// Paid before (RFC 3339).
    #[arg(long)]
    pub paid_to: Option<String>,
}

impl FilterArgs {
    /// The filter, validated like the API's query string.
    pub fn filter(&self) -> anyhow::Result<PayoutFilter> {
        let mut f = PayoutFilter::default();
        let pairs = [
            ("status", &self.status),
            ("payee_id", &self.payee),
            ("currency", &self.currency),
            ("failure_code", &self.failure_code),
            ("created_from", &self.created_from),
            ("created_to", &self.created_to),
            ("due_from", &self.due_from),
            ("due_to", &self.due_to),
            ("paid_from", &self.paid_from),
            ("paid_to", &self.paid_to),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                f.set(k, v).map_err(anyhow::Error::msg)?;
            }
        }
        Ok(f)
    }
}

/// `payoutctl bulk-retry`.
#[derive(Debug, Args)]
pub struct BulkRetryArgs {
    /// Which failed payouts (`--status` may only be `failed`).
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only count what would be retried (the default; kept so scripts that
    /// say it keep working).
    #[arg(long, conflicts_with = "execute")]
    pub dry_run: bool,
    /// Retry them. Without it the command only counts, as the API's bulk
    /// retry does; it needs a filter that narrows the failed payouts.
    #[arg(long)]
    pub execute: bool,
}

/// `payoutctl token …`.
pub async fn token(
    pool: &PgPool,
    cmd: TokenCommand,
    actor: &str,
    json_out: bool,
    now: chrono::DateTime<chrono::Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            name,
            role,
            expires_in_days,
        } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let expires_at = expires_in_days.map(|d| now + chrono::Duration::days(i64::from(d)));
            let (id, token) =
                tokens::issue(pool, &name, role, expires_at, actor, None, now).await?;
            if json_out {
                writeln!(
                    out,
                    "{}",
                    json!({"id": id, "name": name, "role": role, "token": token})
                )?;
            } else {
                writeln!(
                    out,
                    "token for {name} ({role}), shown once; keep it secret:"
                )?;
                writeln!(out, "{token}")?;
            }
        }
        TokenCommand::List => {
            let all = tokens::list(pool).await?;
            if json_out {
                writeln!(out, "{}", serde_json::to_string(&all)?)?;
            } else {
                let t = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "-".into())
                };
                let mut table = crate::cli::table(
                    &[
                        "ID",
                        "NAME",
                        "ROLE",
                        "CREATED",
                        "LAST USED",
                        "EXPIRES",
                        "REVOKED",
                    ],
                    &[0],
                );
                for k in all {
                    table.add_row(vec![
                        k.id.to_string(),
                        k.name,
                        k.role.to_string(),
                        t(Some(k.created_at)),
                        t(k.last_used_at),
                        t(k.expires_at),
                        t(k.revoked_at),
                    ]);
                }
                crate::cli::print_table(out, &table)?;
            }
        }
        TokenCommand::Revoke { name } => {
            if !tokens::revoke_by(pool, &name, now, actor, None).await? {
                bail!("no live token named {name:?}");
            }
            if json_out {
                writeln!(out, "{}", json!({"revoked": name}))?;
            } else {
                writeln!(out, "token {name} revoked; its sessions are ended")?;
            }
        }
    }
    Ok(())
}

/// `payoutctl failures`.
pub async fn failures(
    pool: &PgPool,
    json_out: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let groups = filter::failure_groups(pool).await?;
    if json_out {
        writeln!(out, "{}", json!({"groups": groups}))?;
        return Ok(());
    }
    let mut table = crate::cli::table(
        &["FAILURE CODE", "COUNT", "OLDEST", "NEWEST", "EXAMPLE"],
        &[1],
    );
    for g in groups {
        table.add_row(vec![
            g.failure_code,
            g.count.to_string(),
            g.oldest.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            g.newest.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            g.example_message.unwrap_or_default(),
        ]);
    }
    crate::cli::print_table(out, &table)?;
    Ok(())
}

/// `payoutctl bulk-retry`: the API's bulk retry (same cap, same events).
pub async fn bulk_retry(
    pool: &PgPool,
    settings: &Settings,
    args: BulkRetryArgs,
    actor: &str,
    clock: &dyn Clock,
    json_out: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    if args
        .filter
        .status
        .as_deref()
        .is_some_and(|s| !s.is_empty() && s != "failed")
    {
        bail!("bulk retry acts on failed payouts only: --status must be failed or absent");
    }
    let f = args.filter.filter()?;
    let cap = settings.admin.bulk_max;
    if args.execute && !f.narrows_failed() {
        bail!(
            "bulk-retry --execute needs a filter that narrows the failed payouts \
             (--payee-id, --currency, --failure-code or a time range)"
        );
    }
    // One statement each (the count, the retry): a spinner, not a bar.
    let bar = crate::cli::money::progress_bar(json_out, "{spinner} {msg}  {elapsed}");
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    if !args.execute {
        bar.set_message("counting the failed payouts the filter matches");
        let counted = async {
            let n = filter::count_failed(pool, &f, cap).await?;
            let excluded = filter::count_failed_after_paid(pool, &f, cap).await?;
            Ok::<_, sqlx::Error>((n, excluded))
        }
        .await;
        bar.finish_and_clear();
        let (n, excluded) = counted?;
        if json_out {
            writeln!(
                out,
                "{}",
                json!({"dry_run": true, "matched": n.min(cap), "more_than_cap": n > cap,
                       "excluded_paid_before": excluded})
            )?;
        } else if n > cap {
            writeln!(
                out,
                "would retry {cap} failed payouts (more match; admin.bulk_max is {cap}); run with --execute"
            )?;
        } else {
            writeln!(out, "would retry {n} failed payouts; run with --execute")?;
        }
        if excluded > 0 && !json_out {
            writeln!(
                out,
                "{excluded} failed payouts that were paid before (reversed) are left out: retry those by id"
            )?;
        }
        return Ok(());
    }
    let now = clock.now();
    let lease = now + chrono::Duration::seconds(settings.producer.queue_lease_secs as i64);
    bar.set_message(format!("retrying failed payouts (at most {cap})"));
    let retried = async {
        let ids = payouts::bulk_retry(pool, &f, cap, actor, lease, now).await?;
        if !ids.is_empty() {
            bar.set_message(format!("pushing {} jobs", ids.len()));
            let conn = crate::queue::connect(&settings.redis).await?;
            Queue::from_settings(conn, settings)
                .push_manual(&ids)
                .await?;
        }
        anyhow::Ok(ids)
    }
    .await;
    bar.finish_and_clear();
    let ids = retried?;
    if json_out {
        writeln!(
            out,
            "{}",
            json!({"dry_run": false, "retried": ids.len(), "ids": ids})
        )?;
    } else {
        writeln!(out, "retried {} failed payouts", ids.len())?;
    }
    Ok(())
}

/// `payoutctl overview`: the dashboard's overview.
pub async fn overview(
    pool: &PgPool,
    settings: &Settings,
    json_out: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let conn = crate::queue::connect(&settings.redis).await?;
    let state = AdminState::new(
        pool.clone(),
        Queue::from_settings(conn, settings),
        std::sync::Arc::new(settings.clone()),
        crate::clock::system(),
    );
    let o = overview::compute(&state).await?;
    if json_out {
        writeln!(out, "{}", serde_json::to_string(&o)?)?;
        return Ok(());
    }
    let pct = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.2}%", r * 100.0));
    let secs = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.1}s"));
    writeln!(out, "payouts by status (paid is an estimate):")?;
    for (s, n) in &o.counts {
        writeln!(out, "  {s:<11} {n}")?;
    }
    for (name, w) in [("last hour", &o.last_hour), ("last day", &o.last_day)] {
        writeln!(
            out,
            "{name}: {} paid, {} failed, success {}, {:.1} paid/min",
            w.paid,
            w.failed,
            pct(w.success_rate),
            w.throughput_per_min
        )?;
    }
    let d = &o.due_to_paid_seconds;
    writeln!(
        out,
        "due to paid (last hour, {} payouts): p50 {}  p95 {}  p99 {}",
        d.sample,
        secs(d.p50),
        secs(d.p95),
        secs(d.p99)
    )?;
    writeln!(out, "backlog age: {}", secs(o.backlog_age_seconds))?;
    writeln!(
        out,
        "window: {} queued, {} waiting in Redis",
        o.window.queued,
        o.window.redis_waiting.map_or("?".into(), |n| n.to_string())
    )?;
    writeln!(
        out,
        "producer leader: {}",
        o.producer_leader.as_deref().unwrap_or("none")
    )?;
    writeln!(out, "workers: {}", o.workers.len())?;
    for w in &o.workers {
        writeln!(
            out,
            "  {:<32} {:>4} in flight  heartbeat {}  {}",
            w.name,
            w.in_flight,
            w.last_heartbeat.format("%H:%M:%S"),
            if w.alive { "alive" } else { "STALE" }
        )?;
    }
    Ok(())
}

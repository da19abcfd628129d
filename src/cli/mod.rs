//! `payoutctl`, the operator CLI: migrate, payees, create, enqueue, status,
//! list, retry, cancel, seed. Human tables by default, `--json` for scripts.
//! Bad input gets one line naming what was wrong, a non-zero exit, and
//! changes nothing.

pub mod admin;
pub mod money;
pub mod platform;
pub mod request;
pub mod webhooks;

use std::{io::Write, path::PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde_json::json;

use crate::{
    clock::{Clock, SystemClock},
    config::Settings,
    db::{self, events, payees, payouts},
    domain::{Currency, Money, PayeeId, PayoutId, PayoutStatus},
    producer::Producer,
    queue::Queue,
};

/// The operator CLI of the payout fleet.
#[derive(Debug, Parser)]
#[command(name = "payoutctl", version, about = "Operate the payout fleet")]
pub struct Cli {
    /// A TOML file over the defaults (PAYOUTS_* variables still win).
    #[arg(long, global = true, env = "PAYOUTS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Who is acting (recorded in the payout's history).
    #[arg(long, global = true, env = "PAYOUTS_OPERATOR", default_value = "cli")]
    pub operator: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations (or, with --check, only say whether they are applied).
    Migrate {
        /// Apply nothing: exit 0 when the database has every migration this
        /// binary knows, 75 when some are pending (an init container's check
        /// that the migration Job ran before this version starts).
        #[arg(long)]
        check: bool,
        /// With --check: wait up to this many seconds for the migrations to
        /// be applied (by the Job or one-shot) before giving up.
        #[arg(long, requires = "check", default_value_t = 0)]
        wait_secs: u64,
    },
    /// Payees.
    #[command(subcommand)]
    Payee(PayeeCommand),
    /// Create a pending payout.
    Create {
        /// Payee id.
        #[arg(long)]
        payee: i64,
        /// Exact decimal amount, e.g. 12.50.
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        /// ISO 4217 code, e.g. USD.
        #[arg(long)]
        currency: String,
        /// When it falls due: RFC 3339, `now`, or `+30s` / `+15m` / `+2h` / `+7d`.
        #[arg(long, default_value = "now")]
        due: String,
    },
    /// Enqueue one payout now ("process now": whatever its due time, ahead of
    /// the queue, priority 2), or run one producer pass with --due.
    Enqueue {
        /// Payout id.
        #[arg(required_unless_present = "due", conflicts_with = "due")]
        id: Option<i64>,
        /// One producer pass: sweep and enqueue what is due, within the window.
        #[arg(long)]
        due: bool,
    },
    /// A payout's state and event history.
    Status {
        /// Payout id.
        id: i64,
    },
    /// List payouts, newest first, with the admin API's filters.
    List {
        /// Which payouts.
        #[command(flatten)]
        filter: crate::cli::admin::FilterArgs,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Only ids below this (paging).
        #[arg(long)]
        before: Option<i64>,
    },
    /// Counts by status.
    Summary,
    /// The fleet overview of the dashboard: counts, success rate, throughput,
    /// due-to-paid percentiles, backlog, window, workers, producer leader.
    Overview,
    /// Failed payouts grouped by failure code.
    Failures,
    /// Retry every failed payout a filter matches (count first with --dry-run).
    BulkRetry(crate::cli::admin::BulkRetryArgs),
    /// API tokens of the admin server.
    #[command(subcommand)]
    Token(crate::cli::admin::TokenCommand),
    /// Outbound webhook endpoints, their delivery log and replays.
    #[command(subcommand)]
    Webhooks(crate::cli::webhooks::WebhooksCommand),
    /// Retry a failed payout (failed -> queued) with a fresh attempt budget.
    Retry {
        /// Payout id.
        id: i64,
    },
    /// Cancel a payout (pending, queued, retrying or failed).
    Cancel {
        /// Payout id.
        id: i64,
        /// Why (recorded).
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Compare the database with the configured gateway and report every disagreement.
    ///
    /// Exit status: 0 in step (or fixed); 65 disagreements about money not
    /// fixed; 69 the gateway could not be asked (every look-up failed: the run
    /// does not count as a reconciliation; or some failed).
    Reconcile {
        /// Payouts changed since: RFC 3339, or an age such as 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Record payouts the gateway paid but the database does not know of (never pays again).
        #[arg(long)]
        fix: bool,
        /// Run again every this long (e.g. 24h) until SIGTERM: a scheduler for
        /// hosts without cron (the compose service). Each run is recorded.
        #[arg(long)]
        every: Option<String>,
    },
    /// Demo data: payees and due payouts.
    Seed {
        /// Payouts to create.
        #[arg(long, default_value_t = 1000)]
        count: i64,
        /// Payees to spread them over.
        #[arg(long, default_value_t = 100)]
        payees: i64,
        /// Currency.
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    /// Earnings: completed work that settlement turns into payouts.
    #[command(subcommand)]
    Earnings(crate::cli::money::EarningsCommand),
    /// Settle closed periods: one payout per payee, currency and period, with its line items.
    Settle(crate::cli::money::SettleArgs),
    /// Show the open period's payout computation line by line; writes nothing.
    Preview(crate::cli::money::PreviewArgs),
    /// An early payout request: settle the payee's released earnings now
    /// (up to --amount) into one payout, due ahead of the schedule, which it
    /// does not move.
    Request(crate::cli::request::RequestArgs),
    /// Print a shell completion script: `payoutctl completions bash > /etc/bash_completion.d/payoutctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (payoutctl.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them (e.g. /usr/local/share/man/man1).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Print the admin server's OpenAPI 3.1 document, generated from its
    /// handlers (what `/api/openapi.json` serves): `payoutctl openapi > docs/openapi.json`.
    Openapi,
}

/// The commands that need no configuration, database or Redis
/// (completions, man pages, the OpenAPI document): run them, or `None` for
/// every other command.
pub fn run_offline(cli: &Cli, out: &mut (dyn Write + Send)) -> Option<anyhow::Result<()>> {
    use clap::CommandFactory;
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "payoutctl", &mut buf);
            Some(out.write_all(&buf).map_err(Into::into))
        }
        Command::Man { dir } => Some(write_man_pages(dir, out)),
        Command::Openapi => Some(
            out.write_all(crate::admin::openapi::pretty().as_bytes())
                .map_err(Into::into),
        ),
        _ => None,
    }
}

/// payoutctl.1, payoutctl-<command>.1, payoutctl-<command>-<sub>.1, ...
fn write_man_pages(dir: &std::path::Path, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    use clap::CommandFactory;
    fn walk(
        cmd: clap::Command,
        name: String,
        dir: &std::path::Path,
        written: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let cmd = cmd.name(name.clone()).bin_name(name.replace('-', " "));
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
        std::fs::write(&path, buf)
            .with_context(|| format!("failed to write {}", path.display()))?;
        written.push(path);
        for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
            let sub_name = format!("{name}-{}", sub.get_name());
            walk(sub.clone(), sub_name, dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut written = Vec::new();
    walk(Cli::command(), "payoutctl".into(), dir, &mut written)?;
    writeln!(
        out,
        "{} man pages written to {}",
        written.len(),
        dir.display()
    )?;
    Ok(())
}

/// Payee commands.
#[derive(Debug, Subcommand)]
pub enum PayeeCommand {
    /// Add a payee.
    Add {
        /// Display name.
        #[arg(long)]
        name: String,
        /// The payee's gateway account (e.g. acct_123).
        #[arg(long)]
        account: String,
        /// Default currency.
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    /// Set a payee's payout schedule and/or payout method.
    Set(crate::cli::money::PayeeSet),
    /// Add, change or remove an agreed deduction per period (booth rent, supply fee, ...).
    Deduction(crate::cli::money::PayeeDeduction),
    /// list, show, suspend, resume, set-account, set-email, balance, earnings, payouts, upcoming.
    #[command(flatten)]
    Manage(crate::cli::platform::PayeeOps),
}

/// Bad usage: an unknown flag, a missing or malformed argument (clap's own
/// code, kept for the errors `payoutctl` finds in argument values too).
pub const EXIT_USAGE: i32 = 2;
/// What the command names does not exist: a payout, a payee, a file.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Refused by the payout's state: an illegal transition (retry of a paid
/// payout, cancel of a paid one), or a change a database rule forbids.
pub const EXIT_CONFLICT: i32 = 4;
/// `payoutctl reconcile` found money out of step that `--fix` did not settle
/// (`EX_DATAERR` of sysexits.h).
pub const EXIT_MISMATCHES: i32 = 65;
/// A dependency is unavailable: Postgres or Redis cannot be reached (or
/// timed out), or `payoutctl reconcile` could not ask the gateway (every
/// look-up failed: the run does not count as a reconciliation; or some
/// did) (`EX_UNAVAILABLE`). Try again later: nothing was changed by the
/// failing step.
pub const EXIT_UNAVAILABLE: i32 = 69;
/// `payoutctl migrate --check`: migrations this binary knows are not applied
/// yet (`EX_TEMPFAIL`: the migration Job has not run; try again later).
pub const EXIT_SCHEMA_BEHIND: i32 = 75;

/// An error with its own exit code; see [`Exit::code_of`] for the others.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The process exit code.
    pub code: i32,
    /// The one-line error.
    pub message: String,
}

impl Exit {
    /// An error that exits with `code`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Exit {
            code,
            message: message.into(),
        }
    }

    /// "Not found" ([`EXIT_NOT_FOUND`]).
    pub fn not_found(message: impl Into<String>) -> anyhow::Error {
        Exit::new(EXIT_NOT_FOUND, message).into()
    }

    /// The exit code for `e`, from the first error of its chain that has
    /// one: an [`Exit`]; a payout action's not found (3) or illegal
    /// transition (4); a database rule's refusal (4); Postgres or Redis out
    /// of reach (69); else 1.
    pub fn code_of(e: &anyhow::Error) -> i32 {
        use crate::db::payouts::ActionError;
        for cause in e.chain() {
            if let Some(x) = cause.downcast_ref::<Exit>() {
                return x.code;
            }
            if let Some(a) = cause.downcast_ref::<ActionError>() {
                match a {
                    ActionError::NotFound(_) => return EXIT_NOT_FOUND,
                    ActionError::Illegal(_) | ActionError::PayeeSuspended { .. } => {
                        return EXIT_CONFLICT;
                    }
                    ActionError::Db(_) => {}
                }
            }
            if cause
                .downcast_ref::<crate::domain::status::TransitionError>()
                .is_some()
            {
                return EXIT_CONFLICT;
            }
            if let Some(db) = cause.downcast_ref::<sqlx::Error>() {
                match db {
                    sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed => return EXIT_UNAVAILABLE,
                    // A rule of the schema (a trigger's check_violation):
                    // e.g. a returned payout cannot be retried.
                    sqlx::Error::Database(d) if d.code().as_deref() == Some("23514") => {
                        return EXIT_CONFLICT;
                    }
                    _ => {}
                }
            }
            if let Some(r) = cause.downcast_ref::<redis::RedisError>() {
                if r.is_io_error() || r.is_connection_refusal() || r.is_timeout() {
                    return EXIT_UNAVAILABLE;
                }
            }
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                if matches!(io.kind(), ConnectionRefused | ConnectionReset | TimedOut) {
                    return EXIT_UNAVAILABLE;
                }
            }
        }
        1
    }
}

/// Parses a due time: RFC 3339, `now`, or `+N{s,m,h,d}`.
pub fn parse_due(s: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    if s == "now" {
        return Ok(now);
    }
    if let Some(rel) = s.strip_prefix('+') {
        let (num, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: i64 = num
            .parse()
            .with_context(|| format!("due {s:?}: expected e.g. +30s, +15m, +2h, +7d"))?;
        let d = match unit {
            "s" => chrono::Duration::seconds(n),
            "m" => chrono::Duration::minutes(n),
            "h" => chrono::Duration::hours(n),
            "d" => chrono::Duration::days(n),
            _ => bail!("due {s:?}: unit must be s, m, h or d"),
        };
        return Ok(now + d);
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("due {s:?} is not RFC 3339, `now` or +N[smhd]"))
}

/// Parses a start time: RFC 3339, or an age (`30m`, `24h`, `7d`) before `now`.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    if s.starts_with(|c: char| c.is_ascii_digit()) && !s.contains('-') {
        let later = parse_due(&format!("+{s}"), now).with_context(|| {
            format!("since {s:?}: expected RFC 3339 or an age such as 30m, 24h, 7d")
        })?;
        return Ok(now - (later - now));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("since {s:?}: expected RFC 3339 or an age such as 30m, 24h, 7d"))
}

fn queue_for(settings: &Settings, conn: redis::aio::ConnectionManager) -> Queue {
    Queue::from_settings(conn, settings)
}

/// A plain aligned table (no borders, two spaces between columns, like
/// `kubectl get`); columns listed in `right` are right-aligned (amounts,
/// counts). Cells are escaped later by [`Printable`].
pub fn table(header: &[&str], right: &[usize]) -> comfy_table::Table {
    use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, presets::NOTHING};
    let mut t = comfy_table::Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, 2));
        col.set_constraint(ColumnConstraint::ContentWidth);
        if right.contains(&i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Prints `t`, each line without trailing blanks.
pub fn print_table(out: &mut (dyn Write + Send), t: &comfy_table::Table) -> std::io::Result<()> {
    for line in t.lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn payouts_table(rows: &[payouts::Payout]) -> comfy_table::Table {
    let mut t = table(
        &[
            "ID", "STATUS", "AMOUNT", "CUR", "PAYEE", "ATT", "DUE", "FAILURE",
        ],
        &[2, 5],
    );
    for p in rows {
        t.add_row(vec![
            p.id.to_string(),
            p.status.to_string(),
            p.amount.to_string(),
            p.currency.to_string(),
            p.payee_id.to_string(),
            p.attempt.to_string(),
            p.due_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            p.failure_code.clone().unwrap_or_default(),
        ]);
    }
    t
}

/// What one reconciliation needs from `run`.
struct Ctx<'a> {
    settings: &'a Settings,
    pool: &'a sqlx::PgPool,
    actor: &'a str,
    json: bool,
}

fn cli_ctx<'a>(
    settings: &'a Settings,
    pool: &'a sqlx::PgPool,
    actor: &'a str,
    json: bool,
) -> Ctx<'a> {
    Ctx {
        settings,
        pool,
        actor,
        json,
    }
}

/// SIGTERM or Ctrl-C (the end of `reconcile --every`).
fn stop_signal() -> impl std::future::Future<Output = ()> {
    // Registered now, when called, not when first polled.
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The configured gateway's client (`gateway.kind`) for look-ups outside a
/// worker (reconciliation, a cancel's look-up): every HTTP request waits for
/// the fleet-wide limiter the workers share on Redis. Without Redis it keeps
/// to the same limits in this process alone.
async fn fleet_gateway(
    settings: &Settings,
) -> anyhow::Result<std::sync::Arc<dyn crate::gateway::Lookup>> {
    match crate::queue::connect(&settings.redis).await {
        Ok(conn) => {
            crate::gateway::select::lookup_limited(&settings.gateway, conn, &settings.redis.prefix)
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no Redis: gateway requests are limited in this process only");
            crate::gateway::select::build_lookup(&settings.gateway)
        }
    }
}

/// One `payoutctl reconcile` against the configured gateway (`gateway.kind`);
/// the error carries the exit code ([`EXIT_MISMATCHES`], [`EXIT_UNAVAILABLE`]).
async fn reconcile(
    ctx: &Ctx<'_>,
    since: &str,
    fix: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let (settings, pool, json) = (ctx.settings, ctx.pool, ctx.json);
    let clock = SystemClock;
    let actor = ctx.actor.to_string();
    let opts = crate::services::reconcile::Options {
        since: parse_since(since, clock.now())?,
        fix,
        concurrency: 16,
        actor,
    };
    // The configured gateway (`gateway.kind`), never the contract client by default.
    let report = match crate::gateway::select::lookup_unavailable(&settings.gateway) {
        Some(reason) => {
            crate::services::reconcile::record_unavailable(pool, &opts, reason, clock.now()).await?
        }
        None => {
            let gateway = fleet_gateway(settings).await?;
            let bar = crate::cli::money::progress_bar(
                json,
                "reconciling {bar:40} {pos}/{len} payouts  {per_sec}  eta {eta}",
            );
            let progress = |done: usize, total: usize| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            };
            let report = crate::services::reconcile::run_with_progress(
                pool,
                gateway.as_ref(),
                &opts,
                clock.now(),
                Some(&progress),
            )
            .await;
            bar.finish_and_clear();
            report?
        }
    };
    if json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(
            out,
            "checked {} payouts ({} in flight): {} disagreements",
            report.checked,
            report.in_flight,
            report.mismatches.len()
        )?;
        for m in &report.mismatches {
            let fixed = if m.fixed { "  [fixed]" } else { "" };
            writeln!(
                out,
                "  payout {:<10} {:<30} {}{fixed}",
                m.payout_id,
                m.kind.label(),
                m.detail
            )?;
        }
    }
    if let Some(reason) = &report.failed {
        return Err(Exit::new(
            EXIT_UNAVAILABLE,
            format!("reconciliation failed, nothing was compared: {reason}"),
        )
        .into());
    }
    let open = report.open_money_mismatches();
    if open > 0 {
        return Err(Exit::new(
            EXIT_MISMATCHES,
            format!("{open} disagreements between the database and the gateway are not fixed"),
        )
        .into());
    }
    if report.lookup_failed > 0 {
        return Err(Exit::new(
            EXIT_UNAVAILABLE,
            format!(
                "{} of {} look-ups failed: those payouts were not compared",
                report.lookup_failed, report.checked
            ),
        )
        .into());
    }
    Ok(())
}

/// A writer that makes text safe for a terminal: control characters other
/// than newline and tab (ESC sequences, carriage returns, C1 controls) are
/// written as `\u{…}` escapes. Reasons, payee names and gateway messages
/// come from operators, platforms and gateways; printed raw, an escape
/// sequence in one could rewrite the operator's screen.
pub struct Printable<W: Write>(pub W);

impl<W: Write> Write for Printable<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut safe = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_control() && c != '\n' && c != '\t' {
                safe.push_str(&c.escape_unicode().to_string());
            } else {
                safe.push(c);
            }
        }
        self.0.write_all(safe.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Runs one command, writing its output to `out`.
pub async fn run(cli: Cli, settings: Settings, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    if let Some(r) = run_offline(&cli, out) {
        return r;
    }
    let clock = SystemClock;
    let actor = format!("operator:{}", cli.operator);
    let pool = db::connect(&settings.database).await?;
    let lease_until =
        || clock.now() + chrono::Duration::seconds(settings.producer.queue_lease_secs as i64);
    match cli.command {
        Command::Migrate {
            check: true,
            wait_secs,
        } => {
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
            let pending = loop {
                let pending = db::pending_migrations(&pool).await?;
                if pending.is_empty() || tokio::time::Instant::now() >= until {
                    break pending;
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            };
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({"current": pending.is_empty(), "pending": pending})
                )?;
            }
            if !pending.is_empty() {
                return Err(Exit::new(
                    EXIT_SCHEMA_BEHIND,
                    format!(
                        "the database schema is behind this binary: migrations {pending:?} are not applied (run `payoutctl migrate`, the migration Job)"
                    ),
                )
                .into());
            }
            if !cli.json {
                writeln!(out, "schema current")?;
            }
        }
        Command::Migrate { check: false, .. } => {
            db::migrate(&pool).await?;
            if cli.json {
                writeln!(out, "{}", json!({"migrated": true}))?;
            } else {
                writeln!(out, "migrations applied")?;
            }
        }
        Command::Payee(PayeeCommand::Add {
            name,
            account,
            currency,
        }) => {
            let currency: Currency = currency.parse()?;
            if account.trim().is_empty() {
                bail!("account must not be empty");
            }
            // The payee and its audit row commit together, or neither does.
            let mut tx = pool.begin().await?;
            let p = payees::create(&mut *tx, &name, &account, currency)
                .await
                .context("failed to add payee")?;
            db::audit::record(
                &mut *tx,
                clock.now(),
                &actor,
                "payee.create",
                &p.id.to_string(),
                json!({"name": p.name, "gateway_account": p.gateway_account, "currency": p.currency}),
                None,
            )
            .await?;
            tx.commit().await?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&p)?)?;
            } else {
                writeln!(
                    out,
                    "payee {} added ({}, {}, {})",
                    p.id, p.name, p.gateway_account, p.currency
                )?;
            }
        }
        Command::Create {
            payee,
            amount,
            currency,
            due,
        } => {
            let money = Money::parse(&amount, &currency)?;
            // Only currencies the policy pays, up to its maximum payout.
            let policy = settings.policy.load()?;
            let cur = money.currency();
            if policy.minimum(cur).is_none() {
                bail!("currency: {cur} is not paid out by the policy (no minimum_payout.{cur})");
            }
            if let Some(max) = policy.maximum_payout(cur).filter(|m| money.amount() > *m) {
                bail!("amount: {money} is over the policy's maximum payout of {max} {cur}");
            }
            // The configured gateway must be able to send it (Stripe counts
            // some currencies its own way): refused now, not failed later.
            crate::gateway::stripe_currency::check_for_kind(settings.gateway.kind, &money)?;
            let due_at = parse_due(&due, clock.now())?;
            let payee_row = payees::get(&pool, PayeeId::new(payee))
                .await?
                .ok_or_else(|| Exit::not_found(format!("payee {payee} not found")))?;
            if payee_row.status != "active" {
                bail!("payee {payee} is {}", payee_row.status);
            }
            let p = payouts::create(
                &pool,
                PayeeId::new(payee),
                money,
                due_at,
                &actor,
                clock.now(),
            )
            .await?
            .with_currency_scale();
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&p)?)?;
            } else {
                writeln!(
                    out,
                    "payout {} created: {} to payee {}, due {}",
                    p.id,
                    money,
                    payee,
                    p.due_at.to_rfc3339()
                )?;
            }
        }
        Command::Enqueue { id: Some(id), .. } => {
            let conn = crate::queue::connect(&settings.redis).await?;
            let from =
                payouts::enqueue_now(&pool, PayoutId::new(id), &actor, lease_until(), clock.now())
                    .await?;
            queue_for(&settings, conn)
                .push_manual_front(&[PayoutId::new(id)])
                .await?;
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({"id": id, "from": from, "status": "queued"})
                )?;
            } else {
                writeln!(out, "payout {id} enqueued (was {from})")?;
            }
        }
        Command::Enqueue { id: None, .. } => {
            let conn = crate::queue::connect(&settings.redis).await?;
            let producer = Producer {
                pool: pool.clone(),
                queue: queue_for(&settings, conn),
                clock: crate::clock::system(),
                settings: settings.producer.clone(),
                actor: actor.clone(),
            };
            let r = producer.tick().await?;
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(
                    out,
                    "enqueued {} due, {} of dead workers, {} with expired leases, {} after Redis loss; {} queued now",
                    r.enqueued, r.rescued, r.swept, r.recovered, r.window_depth
                )?;
            }
        }
        Command::Status { id } => {
            let p = payouts::get(&pool, PayoutId::new(id))
                .await?
                .ok_or_else(|| Exit::not_found(format!("payout {id} not found")))?;
            let p = p.with_currency_scale();
            let history = events::for_payout(&pool, id).await?;
            let lines = crate::db::settlements::lines_for_payout(&pool, id).await?;
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({"payout": p, "events": history, "lines": lines})
                )?;
            } else {
                writeln!(
                    out,
                    "payout {}  {}  {} {}  payee {}",
                    p.id, p.status, p.amount, p.currency, p.payee_id
                )?;
                writeln!(
                    out,
                    "  due {}  attempt {}  transfer {}",
                    p.due_at.to_rfc3339(),
                    p.attempt,
                    p.gateway_transfer_id.as_deref().unwrap_or("-")
                )?;
                if let Some(code) = &p.failure_code {
                    writeln!(
                        out,
                        "  failure {}: {}",
                        code,
                        p.failure_message.as_deref().unwrap_or("")
                    )?;
                }
                if let Some(next) = p
                    .next_attempt_at
                    .filter(|_| p.status == PayoutStatus::Retrying)
                {
                    writeln!(out, "  next attempt {}", next.to_rfc3339())?;
                }
                if !lines.is_empty() {
                    writeln!(out, "  lines:")?;
                    for l in &lines {
                        writeln!(
                            out,
                            "    {:>14}  {:<12} {}",
                            l.amount, l.kind, l.description
                        )?;
                    }
                }
                writeln!(out, "  history:")?;
                for e in history {
                    writeln!(
                        out,
                        "    {}  {:>10} -> {:<10}  #{:<2} {:<28} {}",
                        e.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                        e.from_status.as_deref().unwrap_or("-"),
                        e.to_status,
                        e.attempt.unwrap_or(0),
                        e.actor,
                        e.reason.as_deref().unwrap_or("")
                    )?;
                }
            }
        }
        Command::List {
            filter,
            limit,
            before,
        } => {
            if !(1..=10_000).contains(&limit) {
                bail!("limit must be between 1 and 10000");
            }
            let req = crate::db::filter::PageRequest {
                filter: filter.filter()?,
                limit,
                before_id: before,
            };
            let rows: Vec<_> = crate::db::filter::page(&pool, &req)
                .await?
                .items
                .into_iter()
                .map(|p| p.with_currency_scale())
                .collect();
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&rows)?)?;
            } else {
                print_table(out, &payouts_table(&rows))?;
            }
        }
        Command::Summary => {
            let counts = payouts::count_by_status(&pool).await?;
            if cli.json {
                let map: serde_json::Map<String, serde_json::Value> =
                    counts.into_iter().map(|(k, v)| (k, json!(v))).collect();
                writeln!(out, "{}", serde_json::Value::Object(map))?;
            } else {
                for (status, n) in counts {
                    writeln!(out, "{status:<11} {n}")?;
                }
            }
        }
        Command::Overview => crate::cli::admin::overview(&pool, &settings, cli.json, out).await?,
        Command::Failures => crate::cli::admin::failures(&pool, cli.json, out).await?,
        Command::BulkRetry(args) => {
            crate::cli::admin::bulk_retry(&pool, &settings, args, &actor, &clock, cli.json, out)
                .await?
        }
        Command::Token(cmd) => {
            crate::cli::admin::token(&pool, cmd, &actor, cli.json, clock.now(), out).await?
        }
        Command::Webhooks(cmd) => {
            crate::cli::webhooks::run(&pool, &settings, cmd, &actor, cli.json, clock.now(), out)
                .await?
        }
        Command::Retry { id } => {
            let conn = crate::queue::connect(&settings.redis).await?;
            payouts::retry(&pool, PayoutId::new(id), &actor, lease_until(), clock.now()).await?;
            queue_for(&settings, conn)
                .push_manual(&[PayoutId::new(id)])
                .await?;
            if cli.json {
                writeln!(out, "{}", json!({"id": id, "status": "queued"}))?;
            } else {
                writeln!(out, "payout {id} queued for retry")?;
            }
        }
        Command::Cancel { id, reason } => {
            // The one cancel: asks the gateway first when the payout was sent
            // and no answer proved that nothing moved.
            let from = crate::services::reconcile::cancel(
                &pool,
                async || fleet_gateway(&settings).await,
                PayoutId::new(id),
                &actor,
                &reason,
                clock.now(),
            )
            .await
            .map_err(|e| match e {
                // Kept as the lifecycle's error, so it exits like any refusal.
                crate::services::reconcile::CancelError::Action(a) => anyhow::Error::from(a),
                other => anyhow::Error::from(other),
            })?;
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({"id": id, "from": from, "status": "cancelled"})
                )?;
            } else {
                writeln!(out, "payout {id} cancelled (was {from})")?;
            }
        }
        Command::Reconcile { since, fix, every } => match every {
            None => {
                reconcile(
                    &cli_ctx(&settings, &pool, &actor, cli.json),
                    &since,
                    fix,
                    out,
                )
                .await?
            }
            Some(every) => {
                let every = parse_since(&every, clock.now())
                    .map(|t| (clock.now() - t).to_std().unwrap_or_default())
                    .context("--every: expected an age such as 6h or 24h")?;
                if every < std::time::Duration::from_secs(60) {
                    bail!("--every must be at least 1m");
                }
                let ctx = cli_ctx(&settings, &pool, &actor, cli.json);
                // The handler is in place before the first run: a SIGTERM that
                // arrives while a run is still going ends the loop after it,
                // instead of killing the process mid-run.
                let stop = stop_signal();
                tokio::pin!(stop);
                loop {
                    // A scheduler: a failed or disagreeing run is reported and recorded; the loop goes on.
                    if let Err(e) = reconcile(&ctx, &since, fix, out).await {
                        writeln!(out, "error: {e:#}")?;
                    }
                    out.flush()?;
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = &mut stop => break,
                    }
                }
            }
        },
        Command::Seed {
            count,
            payees: n_payees,
            currency,
        } => {
            let currency: Currency = currency.parse()?;
            if !(1..=10_000_000).contains(&count) || !(1..=1_000_000).contains(&n_payees) {
                bail!("count must be 1..=10000000 and payees 1..=1000000");
            }
            let ids = payees::create_demo(&pool, n_payees, currency).await?;
            let now = clock.now();
            let n = payouts::seed(&pool, &ids, count, currency.code(), now, now).await?;
            if cli.json {
                writeln!(out, "{}", json!({"payees": ids.len(), "payouts": n}))?;
            } else {
                writeln!(out, "seeded {} payees and {n} due payouts", ids.len())?;
            }
        }
        Command::Earnings(cmd) => {
            crate::cli::money::run_earnings(
                &pool,
                &settings,
                cmd,
                cli.json,
                &actor,
                clock.now(),
                out,
            )
            .await?
        }
        Command::Settle(args) => {
            crate::cli::money::settle(&pool, &settings, args, cli.json, &actor, clock.now(), out)
                .await?
        }
        Command::Preview(args) => {
            crate::cli::money::preview(&pool, &settings, args, cli.json, clock.now(), out).await?
        }
        Command::Request(args) => {
            crate::cli::request::run(&pool, &settings, args, cli.json, &actor, clock.now(), out)
                .await?
        }
        // Run by `run_offline` above, before any connection.
        Command::Completions { .. } | Command::Man { .. } | Command::Openapi => {}
        Command::Payee(PayeeCommand::Set(args)) => {
            crate::cli::money::payee_set(&pool, &settings, args, cli.json, &actor, clock.now(), out)
                .await?
        }
        Command::Payee(PayeeCommand::Deduction(args)) => {
            crate::cli::money::payee_deduction(&pool, args, cli.json, &actor, clock.now(), out)
                .await?
        }
        Command::Payee(PayeeCommand::Manage(cmd)) => {
            crate::cli::platform::run(&pool, &settings, cmd, cli.json, &actor, clock.now(), out)
                .await?
        }
    }
    Ok(())
}

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn columns_line_up_and_amounts_are_right_aligned() {
        let mut t = table(&["ID", "AMOUNT", "NAME"], &[1]);
        t.add_row(vec!["1", "5.00", "Ana"]);
        t.add_row(vec!["1234", "1200.50", "Bo"]);
        let mut out = Vec::new();
        print_table(&mut out, &t).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        // Every NAME starts at the same column; every AMOUNT ends at one.
        let name_at: Vec<usize> = lines.iter().map(|l| l.rfind(' ').unwrap() + 1).collect();
        assert!(name_at.windows(2).all(|w| w[0] == w[1]), "{text}");
        let amount_end: Vec<usize> = lines
            .iter()
            .zip(["AMOUNT", "5.00", "1200.50"])
            .map(|(l, a)| l.find(a).unwrap() + a.len())
            .collect();
        assert!(amount_end.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
    }
}

#[cfg(test)]
mod printable_tests {
    use std::io::Write;

    #[test]
    fn control_characters_are_escaped_and_text_is_kept() {
        let mut p = super::Printable(Vec::new());
        write!(p, "ok\tfine\né \x1b[31mred\x07\r\u{9b}").unwrap();
        assert_eq!(
            String::from_utf8(p.0).unwrap(),
            "ok\tfine\né \\u{1b}[31mred\\u{7}\\u{d}\\u{9b}"
        );
    }
}

//! `payoutctl` commands for money coming in: `earnings add|import`, payee
//! terms (`payee set`, `payee deduction`), `settle` and `preview`. The
//! subcommands are declared here and dispatched from `cli::run`; output
//! follows the CLI's rules (tables, or `--json`; bad input is one `error:`
//! line, exit 1, nothing written).

use std::{io::Write, path::PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    config::Settings,
    db::{earnings, payee_terms},
    domain::{
        Currency, Money, PayoutMethod, Schedule,
        earning::{FileFormat, RawEarning, RowReader},
        policy::{LineKind, Outcome, Settlement},
    },
    services::settlement,
};

/// Earnings commands.
#[derive(Debug, Subcommand)]
pub enum EarningsCommand {
    /// Record one completed piece of work (idempotent by --source and --ref).
    Add {
        /// Payee id.
        #[arg(long)]
        payee: i64,
        /// Where it comes from (booking, order, bounty, ...).
        #[arg(long)]
        source: String,
        /// The source's id for it.
        #[arg(long = "ref")]
        external_ref: String,
        /// Gross amount, exact decimal (e.g. 120.50).
        #[arg(long, allow_hyphen_values = true)]
        gross: String,
        /// ISO 4217 code.
        #[arg(long)]
        currency: String,
        /// When it was completed (RFC 3339); default now.
        #[arg(long)]
        completed_at: Option<String>,
    },
    /// Import a file of earnings: CSV with a header (payee_id,source,external_ref,gross,currency[,completed_at])
    /// or JSON lines. Bad rows are reported by line; the good ones are imported unless --atomic.
    ///
    /// The file is read as a stream and written 20,000 rows at a time (COPY). Without --atomic each
    /// batch commits on its own: an import stopped midway leaves its first batches recorded, and
    /// running it again finishes it (rows already recorded count as "already recorded").
    /// A progress bar shows on a terminal (not with --json). Rejected rows are listed one per line,
    /// the first 20 of them, then a count (--json lists them all).
    Import {
        /// The file; `-` reads standard input.
        file: PathBuf,
        /// All or nothing: one bad row and nothing is imported (one transaction for the whole file).
        #[arg(long)]
        atomic: bool,
        /// `csv` or `jsonl` (default: by extension, else by content).
        #[arg(long)]
        format: Option<String>,
    },
    /// Release a held earning now (payable in the payee's current period). Audited.
    Release {
        /// Earning id.
        id: i64,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Void an earning before it is settled: it is never paid; its reference stays taken. Audited.
    Void {
        /// Earning id.
        id: i64,
        /// Why (required; recorded with the earning and in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Held earnings: totals per payee and per source, each per currency, largest first.
    Holds {
        /// Only this payee.
        #[arg(long)]
        payee: Option<i64>,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Only this currency.
        #[arg(long)]
        currency: Option<String>,
        /// Groups of each listing.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

/// Rejected rows an import prints (and names in its error) before it says
/// how many more there are.
const REJECTED_SHOWN: usize = 20;

/// `payoutctl payee set`.
#[derive(Debug, Args)]
pub struct PayeeSet {
    /// Payee id.
    pub id: i64,
    /// daily | weekly:<mon..sun> | biweekly:<mon..sun> | monthly:<1..28> | manual | default (the policy's).
    #[arg(long)]
    pub schedule: Option<String>,
    /// standard | instant | bank_transfer.
    #[arg(long)]
    pub method: Option<String>,
    /// The payee's own minimum payout (e.g. 50.00), at or above the
    /// policy's minimum for the currency; `default` removes it.
    #[arg(long)]
    pub minimum: Option<String>,
    /// The currency of --minimum.
    #[arg(long, default_value = "USD")]
    pub currency: String,
}

/// `payoutctl payee deduction`.
#[derive(Debug, Args)]
pub struct PayeeDeduction {
    /// Payee id.
    pub id: i64,
    /// What it is (e.g. "booth rent"); one amount per label and currency.
    #[arg(long)]
    pub label: String,
    /// Amount per settled period (e.g. 50.00); not with --remove.
    #[arg(long, allow_hyphen_values = true, required_unless_present = "remove")]
    pub amount: Option<String>,
    /// ISO 4217 code.
    #[arg(long, default_value = "USD")]
    pub currency: String,
    /// Remove the deduction instead.
    #[arg(long, conflicts_with = "amount")]
    pub remove: bool,
}

/// `payoutctl settle`.
#[derive(Debug, Args)]
pub struct SettleArgs {
    /// Only this payee; a payee on a manual schedule is settled (its period closed now) only this way.
    #[arg(long)]
    pub payee: Option<i64>,
    /// A line per settled period (default: the summary only; --json for scripts).
    #[arg(long)]
    pub verbose: bool,
}

/// `payoutctl preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Payee id.
    #[arg(long)]
    pub payee: i64,
}

/// Runs an earnings command.
pub async fn run_earnings(
    pool: &PgPool,
    settings: &Settings,
    cmd: EarningsCommand,
    as_json: bool,
    actor: &str,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let policy = settings.policy.load()?;
    match cmd {
        EarningsCommand::Add {
            payee,
            source,
            external_ref,
            gross,
            currency,
            completed_at,
        } => {
            let raw = RawEarning {
                payee_id: payee.to_string(),
                source,
                external_ref,
                gross,
                currency,
                completed_at,
            };
            let e = raw.validate(&policy, now).inspect_err(|e| {
                crate::metrics::EARNINGS_REFUSED
                    .with_label_values(&[earnings::refused_label(&e.field)])
                    .inc();
            })?;
            let mut conn = pool.acquire().await?;
            if payee_terms::existing(&mut conn, &[payee]).await?.is_empty() {
                bail!("payee_id: payee {payee} not found");
            }
            let recorded = earnings::record(&mut conn, &e, actor, now)
                .await
                .context("failed to record the earning")?;
            if let Some(err) = recorded.conflict_error() {
                bail!("{err}");
            }
            let created = matches!(recorded, earnings::Recorded::Created(_));
            let row = recorded.earning();
            if as_json {
                writeln!(out, "{}", json!({"created": created, "earning": row}))?;
            } else if created {
                writeln!(
                    out,
                    "earning {} recorded: {} for payee {} ({}), payable from {}",
                    row.id,
                    e.gross,
                    row.payee_id,
                    row.label(),
                    row.release_at.to_rfc3339()
                )?;
            } else {
                writeln!(
                    out,
                    "earning {} ({}) was already recorded: nothing added",
                    row.id,
                    row.label()
                )?;
            }
        }
        EarningsCommand::Release { id, reason } => {
            escrow_cli(pool, id, reason.as_deref(), false, as_json, actor, now, out).await?
        }
        EarningsCommand::Void { id, reason } => {
            escrow_cli(pool, id, Some(&reason), true, as_json, actor, now, out).await?
        }
        EarningsCommand::Holds {
            payee,
            source,
            currency,
            limit,
        } => {
            let currency = currency
                .map(|c| c.to_ascii_uppercase().parse::<Currency>())
                .transpose()?
                .map(|c| c.code().to_string());
            let f = crate::db::earnings::HoldFilter {
                payee_id: payee.map(crate::domain::PayeeId::new),
                source,
                currency,
            };
            let h = crate::services::escrow::holds(pool, &f, now, limit.clamp(1, 10_000)).await?;
            if as_json {
                writeln!(out, "{}", serde_json::to_string(&h)?)?;
            } else {
                for (title, rows) in [("PAYEE", &h.by_payee), ("SOURCE", &h.by_source)] {
                    let mut t = crate::cli::table(
                        &[title, "CUR", "HELD", "GROSS", "NEXT RELEASE"],
                        &[2, 3],
                    );
                    for r in rows {
                        t.add_row(vec![
                            r.key.clone(),
                            r.currency.clone(),
                            r.earnings.to_string(),
                            r.gross.normalize().to_string(),
                            r.next_release_at.map_or(String::new(), |t| {
                                t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
                            }),
                        ]);
                    }
                    crate::cli::print_table(out, &t)?;
                }
            }
        }
        EarningsCommand::Import {
            file,
            atomic,
            format,
        } => {
            use std::io::{BufRead, IsTerminal};
            // `-` is standard input (its size unknown: a spinner, not a bar).
            let stdin = file.as_os_str() == "-";
            let (input, size): (Box<dyn std::io::Read + Send>, Option<u64>) = if stdin {
                (Box::new(std::io::stdin()), None)
            } else {
                let opened = std::fs::File::open(&file)
                    .with_context(|| format!("failed to read {}", file.display()))?;
                let size = opened.metadata().map(|m| m.len()).ok();
                (Box::new(opened), size)
            };
            // Progress by bytes read, on a terminal only (stderr; stdout keeps the summary).
            let bar = if !as_json && std::io::stdout().is_terminal() {
                match size {
                    Some(size) => indicatif::ProgressBar::new(size).with_style(
                        indicatif::ProgressStyle::with_template(
                            "importing {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .expect("a valid progress template"),
                    ),
                    None => indicatif::ProgressBar::new_spinner().with_style(
                        indicatif::ProgressStyle::with_template(
                            "importing {spinner} {bytes} {bytes_per_sec}",
                        )
                        .expect("a valid progress template"),
                    ),
                }
            } else {
                indicatif::ProgressBar::hidden()
            };
            let mut reader = std::io::BufReader::with_capacity(1 << 16, bar.wrap_read(input));
            let format = match format.as_deref() {
                None => {
                    let start = reader
                        .fill_buf()
                        .with_context(|| format!("failed to read {}", file.display()))?;
                    FileFormat::detect(&file.to_string_lossy(), &String::from_utf8_lossy(start))
                }
                Some("csv") => FileFormat::Csv,
                Some("jsonl") | Some("ndjson") => FileFormat::JsonLines,
                Some(other) => bail!("format {other:?} must be csv or jsonl"),
            };
            let rows = RowReader::new(reader, format)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let report = earnings::import_rows(
                pool,
                rows,
                &policy,
                actor,
                now,
                atomic,
                earnings::IMPORT_BATCH_ROWS,
            )
            .await
            .with_context(|| format!("failed to import {}", file.display()))?;
            bar.finish_and_clear();
            if as_json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                writeln!(
                    out,
                    "{} rows: {} earnings imported, {} already recorded, {} rejected{}",
                    report.rows,
                    report.created,
                    report.already_had,
                    report.rejected.len(),
                    if report.committed {
                        ""
                    } else {
                        " (nothing imported)"
                    }
                )?;
                // One line per rejected row, up to a cap: 10,000 bad rows are
                // a count and the first few, not a wall of text.
                for r in report.rejected.iter().take(REJECTED_SHOWN) {
                    writeln!(out, "  line {}: {}: {}", r.line, r.field, r.message)?;
                }
                if report.rejected.len() > REJECTED_SHOWN {
                    writeln!(
                        out,
                        "  ... and {} more rejected rows (--json lists them all)",
                        report.rejected.len() - REJECTED_SHOWN
                    )?;
                }
            }
            if let Some(first) = report.rejected.first() {
                let mut lines: Vec<String> = report
                    .rejected
                    .iter()
                    .take(REJECTED_SHOWN)
                    .map(|r| r.line.to_string())
                    .collect();
                if report.rejected.len() > REJECTED_SHOWN {
                    lines.push("...".into());
                }
                let what = if report.committed {
                    "the other rows were imported"
                } else {
                    "nothing was imported (--atomic)"
                };
                bail!(
                    "{} of {} rows rejected (lines {}; line {}: {}: {}); {what}",
                    report.rejected.len(),
                    report.rows,
                    lines.join(", "),
                    first.line,
                    first.field,
                    first.message
                );
            }
        }
    }
    Ok(())
}

/// `payoutctl payee set`.
pub async fn payee_set(
    pool: &PgPool,
    settings: &Settings,
    args: PayeeSet,
    as_json: bool,
    actor: &str,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    // Everything is checked before anything is written.
    let minimum = match args.minimum.as_deref() {
        None => None,
        Some(min) => {
            let code = args.currency.trim().to_ascii_uppercase();
            let currency: Currency = code.parse().map_err(|e| anyhow::anyhow!("currency: {e}"))?;
            let amount = if min == "default" {
                None
            } else {
                let policy = settings.policy.load()?;
                let m =
                    Money::parse(min, &code).map_err(|e| anyhow::anyhow!("minimum_payout: {e}"))?;
                policy.check_payee_minimum(m.amount(), currency)?;
                Some(m)
            };
            Some((currency, amount))
        }
    };
    let schedule = match args.schedule.as_deref() {
        None => None,
        Some("default") => Some(None),
        Some(s) => Some(Some(s.parse::<Schedule>()?)),
    };
    let method = args
        .method
        .as_deref()
        .map(str::parse::<PayoutMethod>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if schedule.is_none() && method.is_none() && minimum.is_none() {
        bail!("nothing to set: give --schedule, --method and/or --minimum");
    }
    // The change and its audit row commit together, or neither does.
    let mut tx = pool.begin().await?;
    let Some(mut terms) = payee_terms::get(&mut tx, args.id).await? else {
        return Err(crate::cli::Exit::not_found(format!(
            "payee {} not found",
            args.id
        )));
    };
    if let Some((currency, amount)) = minimum {
        payee_terms::set_minimum(&mut *tx, args.id, currency, amount, now).await?;
    }
    if schedule.is_some() || method.is_some() {
        terms = payee_terms::set(&mut *tx, args.id, schedule, method)
            .await?
            .with_context(|| format!("payee {} not found", args.id))?;
    }
    crate::db::audit::record(
        &mut *tx,
        now,
        actor,
        "payee.set",
        &args.id.to_string(),
        json!({"schedule": args.schedule, "method": args.method,
               "minimum_payout": args.minimum, "currency": args.currency}),
        None,
    )
    .await?;
    tx.commit().await?;
    if let (Some((currency, amount)), None, None) = (minimum, &schedule, &method) {
        let shown = amount.map_or_else(|| "the policy's".to_string(), |m| m.to_string());
        if as_json {
            writeln!(
                out,
                "{}",
                json!({"payee_id": args.id, "currency": currency.code(), "minimum_payout": amount.map(|m| earnings::at_minor_unit(&m).to_string())})
            )?;
        } else {
            writeln!(
                out,
                "payee {}: minimum payout {shown} in {currency}",
                args.id
            )?;
        }
        return Ok(());
    }
    if as_json {
        writeln!(out, "{}", serde_json::to_string(&terms)?)?;
    } else {
        writeln!(
            out,
            "payee {}: schedule {}, payout method {}",
            terms.payee_id,
            terms
                .schedule
                .map(|s| s.to_string())
                .unwrap_or_else(|| "default (the policy's)".into()),
            terms.method
        )?;
    }
    Ok(())
}

/// `payoutctl payee deduction`.
pub async fn payee_deduction(
    pool: &PgPool,
    args: PayeeDeduction,
    as_json: bool,
    actor: &str,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let label = crate::domain::earning::text_field("label", &args.label, 100)?;
    let label = label.as_str();
    let currency: crate::domain::Currency = args.currency.parse()?;
    let amount = if args.remove {
        None
    } else {
        Some(Money::parse(
            args.amount.as_deref().unwrap_or_default(),
            &args.currency,
        )?)
    };
    // The change and its audit row commit together, or neither does.
    let mut tx = pool.begin().await?;
    if payee_terms::existing(&mut tx, &[args.id]).await?.is_empty() {
        bail!("payee {} not found", args.id);
    }
    let set = match amount {
        None => {
            if !payee_terms::remove_deduction(&mut *tx, args.id, currency.code(), label).await? {
                bail!("payee {} has no {currency} deduction {label:?}", args.id);
            }
            None
        }
        Some(amount) => Some((
            payee_terms::set_deduction(&mut *tx, args.id, label, amount, now).await?,
            amount,
        )),
    };
    crate::db::audit::record(
        &mut *tx,
        now,
        actor,
        "payee.deduction",
        &args.id.to_string(),
        json!({"label": label, "amount": args.amount,
               "currency": args.currency, "remove": args.remove}),
        None,
    )
    .await?;
    tx.commit().await?;
    match set {
        Some((d, amount)) => {
            if as_json {
                writeln!(out, "{}", serde_json::to_string(&d)?)?;
            } else {
                writeln!(
                    out,
                    "payee {}: deduction {:?} of {amount} per settled period",
                    d.payee_id, d.label
                )?;
            }
        }
        None => {
            if as_json {
                writeln!(
                    out,
                    "{}",
                    json!({"payee_id": args.id, "label": label, "removed": true})
                )?;
            } else {
                writeln!(out, "payee {}: deduction {label:?} removed", args.id)?;
            }
        }
    }
    Ok(())
}

/// `payoutctl settle`.
pub async fn settle(
    pool: &PgPool,
    settings: &Settings,
    args: SettleArgs,
    as_json: bool,
    actor: &str,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    // Payouts as the configured gateway can send them (Stripe: whole forints).
    let policy = settlement::policy_for(settings)?;
    if let Some(id) = args.payee {
        let mut conn = pool.acquire().await?;
        if payee_terms::existing(&mut conn, &[id]).await?.is_empty() {
            bail!("payee {id} not found");
        }
    }
    let opts = settlement::Options {
        payee: args.payee,
        actor: actor.to_string(),
    };
    let started = tokio::time::Instant::now();
    let bar = progress_bar(
        as_json,
        "settling {bar:40} {pos}/{len} payees  {per_sec}  eta {eta}",
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let report = settlement::run_chunked(
        pool,
        &policy,
        now,
        &opts,
        settlement::CHUNK_PAYEES,
        Some(&progress),
    )
    .await;
    bar.finish_and_clear();
    let report = report?;
    let took = started.elapsed();
    if as_json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        for s in report.settled.iter().filter(|_| args.verbose) {
            let what = match s.payout_id {
                Some(p) => format!("payout {p} of {} {}", s.net, s.currency),
                None => format!(
                    "no payout ({}): {} {} carried over",
                    s.outcome.replace('_', " "),
                    s.net,
                    s.currency
                ),
            };
            writeln!(
                out,
                "payee {:<7} {} {}  {} earnings  {what}",
                s.payee_id, s.currency, s.period, s.earnings
            )?;
        }
        for s in &report.skipped {
            writeln!(
                out,
                "payee {:<7} {} not settled: {}",
                s.payee_id, s.currency, s.reason
            )?;
        }
        // The summary: per currency, what the payouts made add up to.
        let mut totals: std::collections::BTreeMap<&str, (usize, Decimal)> =
            std::collections::BTreeMap::new();
        for s in report.settled.iter().filter(|s| s.payout_id.is_some()) {
            let t = totals.entry(s.currency.as_str()).or_default();
            t.0 += 1;
            t.1 += s.net;
        }
        let payees: std::collections::BTreeSet<i64> =
            report.settled.iter().map(|s| s.payee_id).collect();
        writeln!(
            out,
            "settled {} periods: {} payouts, {} carried over; {} already settled; {} not yet due",
            report.settled.len(),
            report.payouts(),
            report.settled.len() - report.payouts(),
            report.already_settled,
            report.not_due
        )?;
        for (currency, (n, sum)) in &totals {
            writeln!(out, "  {currency}: {n} payouts, {sum} {currency}")?;
        }
        writeln!(
            out,
            "  {} payees in {:.1} s ({:.0} payees/s)",
            payees.len(),
            took.as_secs_f64(),
            payees.len() as f64 / took.as_secs_f64().max(1e-9)
        )?;
    }
    let errors: Vec<&settlement::Skipped> = report.skipped.iter().filter(|s| s.error).collect();
    if let Some(first) = errors.first() {
        bail!(
            "{} (payee, currency) not settled; payee {} {}: {}",
            errors.len(),
            first.payee_id,
            first.currency,
            first.reason
        );
    }
    Ok(())
}

/// A progress bar drawn with `template` (indicatif's), on stderr when
/// stdout is a terminal and the output is not JSON; hidden otherwise. Used
/// by `settle` (payees done of the run's), `reconcile` (payouts compared)
/// and `bulk-retry` (a spinner while its statement runs).
pub(crate) fn progress_bar(as_json: bool, template: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if as_json || !std::io::stdout().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

fn signed(d: Decimal) -> String {
    if d < Decimal::ZERO {
        format!("- {}", -d)
    } else {
        format!("+ {}", unsigned_zero(d))
    }
}

/// `0.00`, never `-0.00`.
fn unsigned_zero(mut d: Decimal) -> Decimal {
    if d.is_zero() {
        d.set_sign_positive(true);
    }
    d
}

fn print_settlement(out: &mut (dyn Write + Send), s: &Settlement) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} services, gross {} {}",
        s.currency, s.services, s.gross, s.currency
    )?;
    let earnings = s
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::Earning)
        .count();
    for (i, l) in s.lines.iter().enumerate() {
        // Long periods: the first and last few earnings, then a count.
        if l.kind == LineKind::Earning && earnings > 12 && (5..earnings - 3).contains(&i) {
            if i == 5 {
                writeln!(out, "  {:>16}  ... {} more earnings", "", earnings - 8)?;
            }
            continue;
        }
        writeln!(out, "  {:>16}  {}", signed(l.amount), l.description)?;
    }
    match s.outcome {
        Outcome::Payout => writeln!(
            out,
            "  {:>16}  payout ({})",
            format!("= {}", unsigned_zero(s.net)),
            s.method
        ),
        Outcome::BelowMinimum { minimum } => writeln!(
            out,
            "  {:>16}  below the minimum payout {minimum} {}: no payout, no fee; carried over",
            format!("= {}", unsigned_zero(s.net)),
            s.currency
        ),
        Outcome::Shortfall => writeln!(
            out,
            "  {:>16}  deductions exceed the share: no payout; the shortfall carries over",
            format!("= {}", unsigned_zero(s.net))
        ),
    }
}

/// `payoutctl preview`.
pub async fn preview(
    pool: &PgPool,
    settings: &Settings,
    args: PreviewArgs,
    as_json: bool,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    // Through Stripe, payouts are rounded down to what Stripe can send.
    let kind = settings.gateway.kind;
    let policy = settlement::policy_for(settings)?;
    let p = settlement::preview(pool, &policy, args.payee, now).await?;
    // The payout as Stripe's `amount` (its minor units: ISK in hundredths).
    let stripe_amounts: Vec<Option<i64>> = p
        .settlements
        .iter()
        .map(|s| {
            (kind == crate::config::GatewayKind::Stripe && s.pays_out())
                .then(|| crate::domain::Money::new(s.net, s.currency).ok())
                .flatten()
                .and_then(|m| crate::gateway::stripe_currency::stripe_minor_units(&m).ok())
        })
        .collect();
    if as_json {
        let mut v = serde_json::to_value(&p)?;
        if kind == crate::config::GatewayKind::Stripe {
            for (s, amount) in v["settlements"]
                .as_array_mut()
                .into_iter()
                .flatten()
                .zip(&stripe_amounts)
            {
                s["stripe_amount"] = serde_json::json!(amount);
            }
        }
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "payee {}  schedule {}  payout method {}",
        p.payee_id, p.schedule, p.method
    )?;
    // The period the next run will really settle (the first one not yet
    // settled that holds payable work), closed already when a run is overdue.
    writeln!(
        out,
        "{} period {} (preview: nothing is written)",
        if p.closed {
            "closed, not yet settled:"
        } else {
            "open"
        },
        p.period
    )?;
    if p.settlements.is_empty() {
        writeln!(out, "no earnings released by the end of this period")?;
    }
    for (s, stripe) in p.settlements.iter().zip(&stripe_amounts) {
        print_settlement(out, s)?;
        if let Some(amount) = stripe {
            writeln!(
                out,
                "  {:>16}  sent to Stripe as amount={amount} ({} minor units as Stripe counts them)",
                "", s.currency
            )?;
        }
    }
    for h in &p.held {
        writeln!(
            out,
            "held: {} earnings ({} {}) release after this period, the first at {}",
            h.earnings,
            h.gross.normalize(),
            h.currency,
            h.first_release.to_rfc3339()
        )?;
    }
    Ok(())
}

/// `payoutctl earnings release|void`.
#[allow(clippy::too_many_arguments)]
async fn escrow_cli(
    pool: &PgPool,
    id: i64,
    reason: Option<&str>,
    void: bool,
    as_json: bool,
    actor: &str,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    use crate::services::escrow::{self, By};
    let by = By {
        actor,
        source: None,
        now,
    };
    let done = if void {
        escrow::void(pool, id, reason, by).await
    } else {
        escrow::release(pool, id, reason, by).await
    }
    .map_err(crate::cli::platform::exit_of)?;
    if as_json {
        writeln!(out, "{}", serde_json::to_string(&done)?)?;
    } else {
        let e = &done.earning;
        writeln!(
            out,
            "earning {id} ({}/{}, payee {}, {} {}) {}; release at {}",
            e.source,
            e.external_ref,
            e.payee_id,
            e.gross.normalize(),
            e.currency,
            done.state,
            done.release_at.format("%Y-%m-%dT%H:%M:%SZ")
        )?;
    }
    Ok(())
}

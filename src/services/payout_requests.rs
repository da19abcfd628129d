//! Early payout requests (#17 item 3): a payee asks, through the platform's
//! backend (the `integration` role) or an operator, to be paid now what is
//! released, instead of at the end of its period.
//!
//! A request settles the payee's released, unsettled, not voided earnings
//! of one currency now into **one payout** with its lines, through the
//! settlement run's own pieces ([`settlement::decide`], the same
//! computation, `payouts::create_many`, `settlements::insert`,
//! `earnings::mark_settled`, the carried balances taken over, the
//! `settlement.created` / `earning.released` events), in one transaction
//! under the payee lock the run takes (`payee_terms::lock`): a request and
//! a scheduled run of the same payee serialize, and the second sees what
//! the first settled (the mark re-checks every earning is unsettled, and a
//! trigger refuses to settle one twice).
//!
//! - **Up to an amount.** `amount` is a gross of earnings, as the balance's
//!   `releasable` is: the request takes whole earnings in release order
//!   (`release_at`, then id) while their sum stays at or below it, and stops
//!   at the first that does not fit. An earning is never split: its line in
//!   `payout_lines` is the earning itself, so a part of one could not be a
//!   line of its own, and what is left stays whole for the next settlement.
//!   The payout is what the policy nets from them (the commission, the
//!   method's fee). Without an amount, every released earning.
//! - **Balances carried over** (below the minimum, a shortfall, a returned
//!   payout, a remainder below the gateway's step) are taken in, as the
//!   payee's next settlement would: a request never pays out money a
//!   shortfall owes.
//! - **The method** is the request's (`standard`, `instant`: the policy's fee
//!   for it), the payee's own when not given.
//! - **The schedule is not disturbed.** The settlement is marked
//!   `requested`: its period (`[first completion, now)`) is not one of the
//!   schedule's, so the scheduled run, looking for the end of the last
//!   settled period, passes it by; the next scheduled settlement happens at
//!   its normal time and takes only what is left.
//! - **Agreed deductions once per scheduled period.** A request charges the
//!   payee's agreed deductions (`payee_deductions`, e.g. a weekly booth
//!   rent) of the scheduled period containing `now` (as the run cuts it,
//!   from the end of the last settled period; on a manual schedule, since
//!   the last settled period), unless a request made earlier in that period
//!   charged them. The period's scheduled settlement, after it closes,
//!   charges them only if no request made in the period did (the charge is
//!   recognised by the requested settlement's `deductions` and its
//!   `created_at` within the period, under the payee lock both take). So a
//!   payee whose work is all taken by requests still pays each period's
//!   rent once, and a request whose released gross does not cover the
//!   deductions (or leaves less than the minimum) is refused, naming them
//!   and the releasable balance. A request takes earnings released before
//!   its period only when the run has not yet settled a closed period (it
//!   settles them on its interval). For a payee with agreed deductions that
//!   is refused (409, nothing written) until the run has settled the closed
//!   period: its deductions are that settlement's to charge, with the work
//!   released in it, and a request taking the work would leave them charged
//!   by nobody.
//! - **Priority.** The payout is due now with `priority = requested`
//!   ([`Priority::Requested`]), which the due scan ranks ahead of the
//!   scheduled backlog.
//! - **Idempotent.** The key is unique per payee: a replay with the same
//!   currency, amount and method answers the first request (nothing
//!   written); with others, a conflict naming them.
//! - **Recorded.** A `payout_requests` row with who asked, and an
//!   `audit_log` row (`payout.request`) with the actor, in the transaction.
//!
//! Refused, with nothing written: an unknown payee, a suspended one, an
//! unknown currency or method, an amount not positive or finer than the
//! currency, more than the releasable balance (the answer names it), nothing
//! released, or a payout the policy would not make (below the minimum, over
//! the maximum).

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

pub use crate::services::payees::By;
use crate::{
    db::{
        audit, earnings, payee_terms, payees,
        payout_requests::{self, NewRequest, PayoutRequest},
        payouts,
        platform::{self as reads, LineView, PayoutView},
        settlement_events,
        settlements::{self, SettlementRow},
    },
    domain::{
        Currency, Money, PayeeId, PayoutId, PayoutMethod, Period, Policy, Priority, policy::Outcome,
    },
    metrics,
    services::settlement,
};

/// The longest idempotency key.
pub const MAX_KEY: usize = 255;

/// What is asked.
#[derive(Debug, Clone, Default)]
pub struct Ask<'a> {
    /// The payee.
    pub payee_id: i64,
    /// ISO 4217 code; `None`: the payee's currency.
    pub currency: Option<&'a str>,
    /// The gross of earnings to settle at most, a decimal string; `None`: all released.
    pub amount: Option<&'a str>,
    /// `standard`, `instant`, ...; `None`: the payee's own method.
    pub method: Option<&'a str>,
    /// The caller's key (1 to 255 characters).
    pub idempotency_key: &'a str,
}

/// Why a request was refused (nothing written).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No such payee.
    #[error("payee {0} not found")]
    NotFound(i64),
    /// Not legal now: a suspended payee, an idempotency key used with
    /// other parameters.
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed (the idempotency key); the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The request cannot be met: an unknown currency or method, a bad
    /// amount, more than the releasable balance, nothing released, a payout
    /// the policy would not make. `available`: the releasable balance, when
    /// it is what the refusal is about.
    #[error("{message}")]
    Unprocessable {
        /// Why.
        message: String,
        /// The releasable balance (gross of released, unsettled earnings).
        available: Option<Decimal>,
        /// Its currency.
        currency: Option<String>,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

fn unprocessable(message: impl Into<String>) -> RequestError {
    RequestError::Unprocessable {
        message: message.into(),
        available: None,
        currency: None,
    }
}

fn short_balance(message: impl Into<String>, available: Decimal, c: Currency) -> RequestError {
    RequestError::Unprocessable {
        message: message.into(),
        available: Some(at_scale(available, c)),
        currency: Some(c.code().to_string()),
    }
}

fn at_scale(d: Decimal, c: Currency) -> Decimal {
    let mut d = d;
    d.rescale(c.exponent());
    d
}

/// A request answered: the request, the settlement and payout it made, the
/// payout's lines.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Requested {
    /// The request as recorded.
    pub request: PayoutRequest,
    /// Whether this answer is a replay of an earlier request with the same
    /// key (nothing was written now).
    pub replayed: bool,
    /// The payout made (due now, `priority` requested).
    pub payout: PayoutView,
    /// The settlement that made it (`requested`: not a period of the schedule).
    pub settlement: SettlementRow,
    /// The payout's line items, in order: one per earning, the commission,
    /// carried balances, the method's fee.
    pub lines: Vec<LineView>,
}

/// Validates the idempotency key.
pub fn check_key(key: &str) -> Result<&str, RequestError> {
    if key.is_empty() || key.chars().count() > MAX_KEY || key.chars().any(char::is_control) {
        return Err(RequestError::Invalid(format!(
            "idempotency_key: required, 1 to {MAX_KEY} characters without control characters"
        )));
    }
    Ok(key)
}

/// Settles `ask.payee_id`'s released earnings now into one payout (see the
/// module doc), or answers the earlier request with the same key.
pub async fn request(
    pool: &PgPool,
    policy: &Policy,
    ask: &Ask<'_>,
    by: By<'_>,
) -> Result<Requested, RequestError> {
    let key = check_key(ask.idempotency_key)?;
    let payee = payees::get(pool, PayeeId::new(ask.payee_id))
        .await?
        .ok_or(RequestError::NotFound(ask.payee_id))?;
    let code = ask
        .currency
        .map(|c| c.trim().to_ascii_uppercase())
        .unwrap_or_else(|| payee.currency.clone());
    let currency: Currency = code.parse().map_err(|_| {
        unprocessable(format!(
            "currency: {:?} is not a known ISO 4217 currency",
            code.chars().take(12).collect::<String>()
        ))
    })?;
    if policy.minimum(currency).is_none() {
        return Err(unprocessable(format!(
            "currency: {code} is not paid out by the policy (minimum_payout has no {code})"
        )));
    }
    let amount = match ask.amount {
        None => None,
        Some(a) => Some(at_scale(
            Money::parse(a.trim(), currency.code())
                .map_err(|e| unprocessable(format!("amount: {e}")))?
                .amount(),
            currency,
        )),
    };

    let mut tx = pool.begin().await?;
    let terms = payee_terms::lock(&mut tx, payee.id.get())
        .await?
        .ok_or(RequestError::NotFound(payee.id.get()))?;
    let method: PayoutMethod = match ask.method {
        None => terms.method,
        Some(m) => m
            .trim()
            .parse()
            .map_err(|e: String| unprocessable(format!("method: {e}")))?,
    };
    if !policy.fees.contains_key(&method) {
        return Err(unprocessable(format!(
            "method: the policy has no fee for {method} payouts (fees.{method})"
        )));
    }
    // A replay answers the first request, whatever happened since.
    if let Some(first) = payout_requests::find(&mut tx, payee.id.get(), key).await? {
        let mut differs = Vec::new();
        if first.currency != currency.code() {
            differs.push(format!(
                "currency {} (was {})",
                currency.code(),
                first.currency
            ));
        }
        if first.amount != amount {
            let show = |a: Option<Decimal>| a.map_or("none (everything)".into(), |a| a.to_string());
            differs.push(format!(
                "amount {} (was {})",
                show(amount),
                show(first.amount)
            ));
        }
        if first.method != method.as_str() {
            differs.push(format!("method {method} (was {})", first.method));
        }
        if !differs.is_empty() {
            return Err(RequestError::Conflict(format!(
                "idempotency_key {key:?} was used by request {} of payee {} with other parameters: {}; nothing done",
                first.id,
                payee.id,
                differs.join(", ")
            )));
        }
        drop(tx);
        return answer(pool, first, true).await;
    }
    if terms.status != "active" {
        return Err(RequestError::Conflict(format!(
            "payee {} is {}: it is not paid until it is resumed; nothing done",
            payee.id, terms.status
        )));
    }
    let now = by.now;
    let rows = earnings::unsettled(&mut tx, payee.id, currency.code(), now, true).await?;
    let available: Decimal = rows.iter().map(|e| e.gross).sum();
    let first_release = rows.iter().map(|e| e.release_at).min();
    if rows.is_empty() {
        return Err(short_balance(
            format!(
                "payee {} has nothing releasable in {}: no released, unsettled earning",
                payee.id,
                currency.code()
            ),
            available,
            currency,
        ));
    }
    let taken = match amount {
        None => rows.len(),
        Some(a) if a > available => {
            return Err(short_balance(
                format!(
                    "amount {a} {code} is above the releasable balance of payee {}: {} {code} available",
                    payee.id,
                    at_scale(available, currency),
                    code = currency.code()
                ),
                available,
                currency,
            ));
        }
        Some(a) => {
            let mut sum = Decimal::ZERO;
            rows.iter()
                .take_while(|e| {
                    sum += e.gross;
                    sum <= a
                })
                .count()
        }
    };
    if taken == 0 {
        return Err(short_balance(
            format!(
                "amount {} {code} settles no whole earning: the first released one (earning {}) is {} {code}; ask for at least that, or for everything",
                amount.unwrap_or_default(),
                rows[0].id,
                rows[0].gross,
                code = currency.code()
            ),
            available,
            currency,
        ));
    }
    let rows = &rows[..taken];
    let carries =
        settlements::open_carries(&mut tx, payee.id.get(), currency.code(), now, true).await?;
    let own_minimum = payee_terms::minimum(&mut tx, payee.id.get(), currency.code()).await?;
    let schedule = terms.schedule.unwrap_or(policy.default_schedule);
    let first = rows
        .iter()
        .map(|e| e.completed_at)
        .min()
        .unwrap_or(now)
        .min(now - chrono::Duration::microseconds(1));
    let period = Period {
        start: first,
        end: now,
    };
    // The agreed deductions of the scheduled period containing `now`,
    // unless a request earlier in it charged them (the period's scheduled
    // settlement, after it closes, then charges none).
    let latest = settlements::latest_end(&mut tx, payee.id.get(), currency.code()).await?;
    let (since, until) = settlement::request_deductions_window(schedule, latest, now);
    let agreed = payee_terms::deductions(&mut tx, payee.id.get(), currency.code()).await?;
    // A closed period the run has not settled yet (it settles on its
    // interval): its agreed deductions are its own settlement's to charge,
    // and that settlement charges them only with work in it. A request
    // taking that work now would leave the period's rent charged by nobody,
    // so it waits for the run.
    if !agreed.is_empty()
        && let Some(current) = schedule.period_containing(now)
        && first_release.is_some_and(|r| r < current.start)
        && latest.is_none_or(|l| l < current.start)
    {
        let each: Vec<String> = agreed
            .iter()
            .map(|d| {
                format!(
                    "{} {} {}",
                    d.label,
                    at_scale(d.amount, currency),
                    currency.code()
                )
            })
            .collect();
        return Err(RequestError::Conflict(format!(
            "payee {}: the period that ended {} is not settled yet and its agreed deductions ({}) \
             are its settlement's to charge; the settlement run settles it within \
             producer.settle_every_secs (or an operator runs `payoutctl settle`): ask again after it; nothing done",
            payee.id,
            current.start.format("%Y-%m-%d %H:%M UTC"),
            each.join(", ")
        )));
    }
    let deductions = if agreed.is_empty()
        || settlements::deductions_requested(&mut tx, payee.id.get(), currency.code(), since, until)
            .await?
    {
        Vec::new()
    } else {
        agreed
    };
    let decided = settlement::decide(
        policy,
        currency,
        method,
        period,
        rows,
        &carries,
        &deductions,
        own_minimum,
    )
    .map_err(|(reason, _)| short_balance(reason, available, currency))?;
    let Some((s, money)) = decided else {
        return Err(short_balance("nothing to pay", available, currency));
    };
    let Some(money) = money else {
        let code = currency.code();
        let owed = if deductions.is_empty() {
            String::new()
        } else {
            let each: Vec<String> = deductions
                .iter()
                .map(|d| format!("{} {} {code}", d.label, at_scale(d.amount, currency)))
                .collect();
            format!(
                " after this period's agreed deductions ({})",
                each.join(", ")
            )
        };
        let releasable = at_scale(available, currency);
        let why = match s.outcome {
            Outcome::BelowMinimum { minimum } => format!(
                "would pay {} {code}{owed}, below the minimum payout of {minimum} {code} ({releasable} {code} releasable); ask for more, or wait for the schedule",
                s.net,
            ),
            _ => format!(
                "would pay nothing{owed}: the balance after what is owed (deductions or a shortfall carried over) is {} {code} ({releasable} {code} releasable)",
                s.net,
            ),
        };
        return Err(short_balance(
            format!("payee {}: the request {why}", payee.id),
            available,
            currency,
        ));
    };

    // Written as the settlement run writes a period (settle_next).
    let new = payouts::NewPayout {
        payee_id: payee.id.get(),
        money,
        reason: format!("early payout request {key:?} ({method})"),
        external_ref: settlement::external_ref(schedule, rows),
    };
    let payout_id = payouts::create_many(&mut tx, &[new], now, by.actor, now)
        .await?
        .first()
        .copied()
        .ok_or_else(|| sqlx::Error::Protocol("the request's payout was not created".into()))?;
    payouts::set_priority(&mut tx, payout_id, Priority::Requested).await?;
    let new = settlements::NewSettlement {
        payee_id: payee.id.get(),
        period,
        schedule,
        settlement: &s,
        payout_id: Some(payout_id),
        actor: by.actor,
        requested: true,
    };
    let settlement_id = settlements::insert(&mut tx, &new, now)
        .await?
        .ok_or_else(|| sqlx::Error::Protocol("the request's settlement was not written".into()))?;
    let ids: Vec<i64> = rows.iter().map(|e| e.id).collect();
    let (lined, positions) = settlement::earning_lines(&s);
    if lined != ids {
        return Err(sqlx::Error::Protocol(format!(
            "payee {}: the settlement's earning lines are not its earnings; nothing written",
            payee.id
        ))
        .into());
    }
    let marked = earnings::mark_settled(
        &mut tx,
        &ids,
        &positions,
        settlement_id,
        Some(PayoutId::new(payout_id)),
    )
    .await?;
    if marked != ids.len() as u64 {
        return Err(sqlx::Error::Protocol(format!(
            "payee {}: {} of {} locked earnings were settled meanwhile; nothing written",
            payee.id,
            ids.len() as u64 - marked,
            ids.len()
        ))
        .into());
    }
    let (remainders, balances): (Vec<_>, Vec<_>) = carries.iter().partition(|c| c.remainder);
    if !balances.is_empty() {
        let carry_ids: Vec<i64> = balances.iter().map(|c| c.id).collect();
        settlements::consume_carries(&mut tx, &carry_ids, settlement_id).await?;
        earnings::mark_paid_through_carry(&mut tx, &carry_ids, PayoutId::new(payout_id)).await?;
    }
    if !remainders.is_empty() {
        let carry_ids: Vec<i64> = remainders.iter().map(|c| c.id).collect();
        settlements::consume_remainders(&mut tx, &carry_ids, settlement_id).await?;
    }
    settlement_events::record(&mut tx, &[settlement_id], now).await?;
    let recorded = payout_requests::insert(
        &mut tx,
        &NewRequest {
            payee_id: payee.id.get(),
            idempotency_key: key,
            currency: currency.code(),
            amount,
            method: method.as_str(),
            settlement_id,
            payout_id,
            requested_by: by.actor,
            source: by.source,
        },
        now,
    )
    .await?;
    audit::record(
        &mut *tx,
        now,
        by.actor,
        "payout.request",
        &payee.id.to_string(),
        json!({"request_id": recorded.id, "idempotency_key": key, "currency": currency.code(),
               "amount": amount.map(|a| a.to_string()), "method": method.as_str(),
               "available": at_scale(available, currency).to_string(),
               "earnings": ids.len(), "gross": s.gross.to_string(), "fee": s.fee.to_string(),
               "deductions": s.deductions.to_string(),
               "net": s.net.to_string(), "settlement_id": settlement_id, "payout_id": payout_id}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    metrics::SETTLEMENTS.with_label_values(&["payout"]).inc();
    tracing::info!(
        payee = payee.id.get(),
        payout = payout_id,
        settlement = settlement_id,
        net = %s.net,
        currency = currency.code(),
        actor = %by.actor,
        "early payout requested"
    );
    answer(pool, recorded, false).await
}

/// The answer to a request: what it made, read back.
async fn answer(
    pool: &PgPool,
    request: PayoutRequest,
    replayed: bool,
) -> Result<Requested, RequestError> {
    let settlement = settlements::get(pool, request.settlement_id)
        .await?
        .ok_or_else(|| sqlx::Error::RowNotFound)?;
    let payout = reads::payouts_page(
        pool,
        request.payee_id,
        None,
        None,
        Some(request.payout_id + 1),
        1,
    )
    .await?
    .into_iter()
    .find(|p| p.id == request.payout_id)
    .ok_or_else(|| sqlx::Error::RowNotFound)?;
    let mut lines = reads::lines_of(pool, &[request.payout_id]).await?;
    // Amounts at the currency's exponent (numeric columns keep the scale
    // of the arithmetic that wrote them), as the reads answer them.
    let (mut settlement, mut payout, mut request) = (settlement, payout, request);
    if let Ok(c) = request.currency.parse::<Currency>() {
        let fit = |d: &mut Decimal| {
            if d.scale() != c.exponent() && d.round_dp(c.exponent()) == *d {
                d.rescale(c.exponent());
            }
        };
        fit(&mut payout.amount);
        for l in &mut lines {
            fit(&mut l.amount);
        }
        if let Some(a) = request.amount.as_mut() {
            fit(a);
        }
        let x = &mut settlement;
        for d in [
            &mut x.gross,
            &mut x.payee_share,
            &mut x.platform_commission,
            &mut x.deductions,
            &mut x.carried_in,
            &mut x.carried_gross_in,
            &mut x.fee,
            &mut x.net,
            &mut x.carried_out,
        ] {
            fit(d);
        }
    }
    Ok(Requested {
        request,
        replayed,
        payout,
        settlement,
        lines,
    })
}

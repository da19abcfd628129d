//! Payee management (#17 item 7): suspend, resume, change of gateway
//! account, email address (mail about payouts, #18). Each change is one transaction with its audit row (actor, what
//! changed, the request's source), shared by the admin API and `payoutctl`.
//!
//! A suspended payee is not settled (settlement skips it) and its payouts
//! wait: the due scan skips them, the ones already `queued` go back to
//! `pending` (here, and at the claim for a job already in flight). A payout
//! a worker has claimed goes on: it was sent. A new gateway account applies
//! to payouts not yet sent; a payout sent keeps its destination
//! (`payouts.destination`, fixed at its first claim), so a retry under the
//! same idempotency key goes where the first attempt went.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    config::GatewayKind,
    db::{audit, payees, payees::Payee, payouts},
    domain::PayeeId,
};

/// Why a payee change (or an escrow action on a payee's earning,
/// [`crate::services::escrow`]) was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum PayeeError {
    /// No such thing (`payee`, `earning`) with this id.
    #[error("{0} {1} not found")]
    NotFound(&'static str, i64),
    /// The change is not legal from the payee's state (suspend of a
    /// suspended payee, resume of an active one, the same account again).
    #[error("{0}")]
    Conflict(String),
    /// The input is wrong (an account the gateway cannot use); the message
    /// names the field.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Who changes, from where, when.
#[derive(Debug, Clone, Copy)]
pub struct By<'a> {
    /// The actor (`operator:NAME`, `integration:NAME`).
    pub actor: &'a str,
    /// The request's source address, when it came over HTTP.
    pub source: Option<&'a str>,
    /// When.
    pub now: DateTime<Utc>,
}

/// A suspension done.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Suspended {
    /// The payee after.
    pub payee: Payee,
    /// The payouts that were `queued` and now wait as `pending`.
    pub parked: Vec<i64>,
}

/// A change of account done.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AccountChanged {
    /// The payee after.
    pub payee: Payee,
    /// The account before.
    pub previous: String,
    /// Payouts not finished that were sent already: they keep `previous`.
    pub kept_destination: i64,
    /// Payouts not finished and not sent yet: they go to the new account.
    pub to_new_account: i64,
}

/// The longest reason kept.
const MAX_REASON: usize = 500;

fn reason_of(reason: Option<&str>) -> Option<String> {
    reason
        .map(|r| r.trim().chars().take(MAX_REASON).collect::<String>())
        .filter(|r| !r.is_empty())
}

/// Suspends payee `id`: not settled, its payouts wait. Refused when it is
/// suspended already.
pub async fn suspend(
    pool: &PgPool,
    id: i64,
    reason: Option<&str>,
    by: By<'_>,
) -> Result<Suspended, PayeeError> {
    let reason = reason_of(reason);
    let mut tx = pool.begin().await?;
    let p = payees::lock(&mut tx, PayeeId::new(id))
        .await?
        .ok_or(PayeeError::NotFound("payee", id))?;
    if p.status == "suspended" {
        return Err(PayeeError::Conflict(format!(
            "payee {id} is suspended already (resume it first to suspend it again)"
        )));
    }
    let payee = payees::set_status(&mut tx, PayeeId::new(id), "suspended").await?;
    let why = match &reason {
        Some(r) => format!("payee suspended: {r}"),
        None => "payee suspended".to_string(),
    };
    let parked = payouts::park_queued_of_payee(&mut tx, id, by.actor, &why, by.now).await?;
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "payee.suspend",
        &id.to_string(),
        json!({"from": p.status, "reason": reason, "parked_payouts": parked}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(payee = id, actor = %by.actor, parked = parked.len(), "payee suspended");
    Ok(Suspended { payee, parked })
}

/// Resumes suspended payee `id`: settled again (missed periods catch up),
/// its due payouts go out at the next producer tick. Refused when it is not
/// suspended.
pub async fn resume(
    pool: &PgPool,
    id: i64,
    reason: Option<&str>,
    by: By<'_>,
) -> Result<Payee, PayeeError> {
    let reason = reason_of(reason);
    let mut tx = pool.begin().await?;
    let p = payees::lock(&mut tx, PayeeId::new(id))
        .await?
        .ok_or(PayeeError::NotFound("payee", id))?;
    if p.status != "suspended" {
        return Err(PayeeError::Conflict(format!(
            "payee {id} is {}, not suspended: nothing to resume",
            p.status
        )));
    }
    let payee = payees::set_status(&mut tx, PayeeId::new(id), "active").await?;
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "payee.resume",
        &id.to_string(),
        json!({"from": p.status, "reason": reason}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(payee = id, actor = %by.actor, "payee resumed");
    Ok(payee)
}

/// A change of tier done.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TierChanged {
    /// The payee.
    pub payee_id: i64,
    /// The tier before.
    pub previous: i16,
    /// The tier now.
    pub tier: i16,
    /// Its pending payouts, ranked again by the producer's next pass.
    pub reranked: u64,
}

/// Sets payee `id`'s tier (0-9; `producer.priority.scheduled = "tier"`
/// ranks its scheduled payouts by it), audited; its pending payouts are
/// ranked again. Refused for a tier out of range or an unknown payee.
pub async fn set_tier(
    pool: &PgPool,
    id: i64,
    tier: i64,
    by: By<'_>,
) -> Result<TierChanged, PayeeError> {
    let tier = i16::try_from(tier)
        .ok()
        .filter(|t| (0..=9).contains(t))
        .ok_or_else(|| PayeeError::Invalid(format!("tier must be 0-9, not {tier}")))?;
    let mut tx = pool.begin().await?;
    let previous = payees::set_tier(&mut tx, PayeeId::new(id), tier)
        .await?
        .ok_or(PayeeError::NotFound("payee", id))?;
    let reranked = payouts::unrank_pending_of_payee(&mut tx, id).await?;
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "payee.tier",
        &id.to_string(),
        json!({"from": previous, "to": tier, "reranked_payouts": reranked}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(payee = id, actor = %by.actor, previous, tier, "payee tier changed");
    Ok(TierChanged {
        payee_id: id,
        previous,
        tier,
        reranked,
    })
}

/// What is wrong with `account` as a destination of gateway `kind`, if
/// anything: Stripe and the release-funds API (`driverStripeAccountId`) take
/// a Stripe connected account (`acct_` and letters or digits); the HTTP
/// contract takes any 1 to 255 printable characters without spaces.
pub fn account_problem(kind: GatewayKind, account: &str) -> Option<String> {
    if account.is_empty() || account.len() > 255 {
        return Some(format!(
            "gateway_account: expected 1 to 255 characters, got {}",
            account.chars().count()
        ));
    }
    if account.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("gateway_account: must not contain spaces or control characters".into());
    }
    match kind {
        GatewayKind::Stripe | GatewayKind::ReleaseFunds => {
            let ok = account.strip_prefix("acct_").is_some_and(|rest| {
                !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric())
            });
            (!ok).then(|| {
                format!(
                    "gateway_account: gateway.kind = {} pays Stripe connected accounts: expected acct_ followed by letters or digits, got {:?}",
                    kind.as_str(),
                    account.chars().take(40).collect::<String>()
                )
            })
        }
        GatewayKind::Contract => None,
    }
}

/// Changes payee `id`'s gateway account to `account` (checked against the
/// fleet's gateway `kind`). Payouts already sent keep their destination.
pub async fn set_account(
    pool: &PgPool,
    kind: GatewayKind,
    id: i64,
    account: &str,
    by: By<'_>,
) -> Result<AccountChanged, PayeeError> {
    let account = account.trim();
    if let Some(problem) = account_problem(kind, account) {
        return Err(PayeeError::Invalid(problem));
    }
    let mut tx = pool.begin().await?;
    let p = payees::lock(&mut tx, PayeeId::new(id))
        .await?
        .ok_or(PayeeError::NotFound("payee", id))?;
    if p.gateway_account == account {
        return Err(PayeeError::Conflict(format!(
            "payee {id}'s gateway account is {account} already"
        )));
    }
    // Payouts sent before destinations were recorded at the claim keep the
    // account they went to.
    payouts::pin_destinations(&mut tx, id, &p.gateway_account).await?;
    let payee = payees::set_account(&mut tx, PayeeId::new(id), account).await?;
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "payee.account",
        &id.to_string(),
        json!({"from": p.gateway_account, "to": account}),
        by.source,
    )
    .await?;
    // Counted in the transaction: what the answer says is what committed.
    let (open, sent) = payouts::open_of_payee(&mut *tx, id).await?;
    tx.commit().await?;
    tracing::info!(payee = id, actor = %by.actor, "payee gateway account changed");
    Ok(AccountChanged {
        payee,
        previous: p.gateway_account,
        kept_destination: sent,
        to_new_account: open - sent,
    })
}

/// Checks an email address for a payee: trimmed, at most 254 characters,
/// one mailbox (`name@domain`, no display name); the error names the field.
pub fn email_problem(email: &str) -> Option<String> {
    if email.is_empty() || email.chars().count() > 254 {
        return Some("email: 1 to 254 characters".into());
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("email: no spaces or control characters".into());
    }
    match email.parse::<lettre::Address>() {
        Ok(_) => None,
        Err(_) => Some("email: not an email address (name@domain)".into()),
    }
}

/// Sets payee `id`'s email address (`None`: clears it, no more mail).
/// Refused when it is that already.
pub async fn set_email(
    pool: &PgPool,
    id: i64,
    email: Option<&str>,
    by: By<'_>,
) -> Result<Payee, PayeeError> {
    let email = email.map(str::trim);
    if let Some(problem) = email.and_then(email_problem) {
        return Err(PayeeError::Invalid(problem));
    }
    let mut tx = pool.begin().await?;
    let p = payees::lock(&mut tx, PayeeId::new(id))
        .await?
        .ok_or(PayeeError::NotFound("payee", id))?;
    if p.email.as_deref() == email {
        return Err(PayeeError::Conflict(match email {
            Some(_) => format!("payee {id}'s email is that already"),
            None => format!("payee {id} has no email already"),
        }));
    }
    let payee = payees::set_email(&mut tx, PayeeId::new(id), email).await?;
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "payee.email",
        &id.to_string(),
        json!({"from": p.email, "to": email}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    // The address itself is not logged.
    tracing::info!(payee = id, actor = %by.actor, set = email.is_some(), "payee email changed");
    Ok(payee)
}

/// A payee's balance in one currency (#17 item 2). Earnings amounts are
/// gross (before commission, deductions and the fee: `upcoming` computes
/// the net); the rest are amounts of money owed or paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CurrencyBalance {
    /// The currency.
    pub currency: String,
    /// Gross of the earnings still held (not yet released).
    #[schema(value_type = crate::domain::DecimalString)]
    pub held: rust_decimal::Decimal,
    /// How many earnings are held.
    pub held_count: i64,
    /// When the next held earning is released.
    pub next_release_at: Option<DateTime<Utc>>,
    /// Gross of the earnings released and not settled yet: what the next
    /// settlement (or an early payout request) takes.
    #[schema(value_type = crate::domain::DecimalString)]
    pub releasable: rust_decimal::Decimal,
    /// How many earnings are releasable.
    pub releasable_count: i64,
    /// Balances carried over from settled periods (below the minimum, a
    /// shortfall (negative), a returned payout, a remainder below the
    /// gateway's step): taken into the next settlement.
    #[schema(value_type = crate::domain::DecimalString)]
    pub carried_over: rust_decimal::Decimal,
    /// Payouts made and not finished (pending, queued, processing,
    /// retrying, in transit, held).
    #[schema(value_type = crate::domain::DecimalString)]
    pub in_flight: rust_decimal::Decimal,
    /// How many payouts are in flight.
    pub in_flight_count: i64,
    /// Paid since the current period started.
    #[schema(value_type = crate::domain::DecimalString)]
    pub paid_this_period: rust_decimal::Decimal,
    /// How many payouts were paid this period.
    pub paid_count: i64,
}

/// A payee's balances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Balance {
    /// The payee.
    pub payee_id: i64,
    /// `active` or `suspended`.
    pub status: String,
    /// The payee's schedule (its own, else the policy's default).
    pub schedule: String,
    /// The current period (`paid_this_period` counts from its start); for
    /// a manual schedule, the current calendar month.
    pub period: crate::domain::schedule::Period,
    /// One entry per currency with anything in it (the payee's own
    /// currency always).
    pub currencies: Vec<CurrencyBalance>,
}

/// The balances of payee `id` at `now`; `None` when there is no such payee.
pub async fn balance(
    pool: &PgPool,
    policy: &crate::domain::Policy,
    id: i64,
    now: DateTime<Utc>,
) -> Result<Option<Balance>, PayeeError> {
    use std::collections::BTreeMap;

    use chrono::Datelike;
    use rust_decimal::Decimal;

    let Some(payee) = payees::get(pool, PayeeId::new(id)).await? else {
        return Ok(None);
    };
    let mut conn = pool.acquire().await?;
    let terms = crate::db::payee_terms::get(&mut conn, id).await?;
    let schedule = terms
        .and_then(|t| t.schedule)
        .unwrap_or(policy.default_schedule);
    // "Paid in the current period": a manual schedule has none and a
    // per-earning one's are instants, so both count the calendar month.
    let own = match schedule {
        crate::domain::Schedule::PerEarning => None,
        s => s.period_containing(now),
    };
    let period = own.unwrap_or_else(|| {
        let start = now
            .date_naive()
            .with_day(1)
            .expect("day 1")
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc();
        let end = start
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(now);
        crate::domain::schedule::Period { start, end }
    });
    let empty = |currency: &str| CurrencyBalance {
        currency: currency.to_string(),
        held: Decimal::ZERO,
        held_count: 0,
        next_release_at: None,
        releasable: Decimal::ZERO,
        releasable_count: 0,
        carried_over: Decimal::ZERO,
        in_flight: Decimal::ZERO,
        in_flight_count: 0,
        paid_this_period: Decimal::ZERO,
        paid_count: 0,
    };
    let mut by: BTreeMap<String, CurrencyBalance> = BTreeMap::new();
    by.insert(payee.currency.clone(), empty(&payee.currency));
    for u in crate::db::platform::unsettled_sums(pool, id, now).await? {
        let b = by
            .entry(u.currency.clone())
            .or_insert_with(|| empty(&u.currency));
        b.held = u.held;
        b.held_count = u.held_count;
        b.next_release_at = u.next_release_at;
        b.releasable = u.releasable;
        b.releasable_count = u.releasable_count;
    }
    for p in crate::db::platform::payout_sums(pool, id, period.start).await? {
        let b = by
            .entry(p.currency.clone())
            .or_insert_with(|| empty(&p.currency));
        b.in_flight = p.in_flight;
        b.in_flight_count = p.in_flight_count;
        b.paid_this_period = p.paid;
        b.paid_count = p.paid_count;
    }
    let codes = crate::db::platform::carried_currencies(pool, id).await?;
    // Carried balances: every open one, whenever it was returned (a
    // settlement taking it in later takes it whole).
    let far = now + chrono::Duration::days(36_500);
    for code in codes {
        let carries =
            crate::db::settlements::open_carries(&mut conn, id, &code, far, false).await?;
        if carries.is_empty() {
            continue;
        }
        let b = by.entry(code.clone()).or_insert_with(|| empty(&code));
        b.carried_over = carries.iter().map(|c| c.net).sum();
    }
    // Amounts at the currency's exponent (`10.00`, not `10.00000000`).
    let currencies = by
        .into_values()
        .map(|mut b| {
            if let Ok(c) = b.currency.parse::<crate::domain::Currency>() {
                for d in [
                    &mut b.held,
                    &mut b.releasable,
                    &mut b.carried_over,
                    &mut b.in_flight,
                    &mut b.paid_this_period,
                ] {
                    d.rescale(c.exponent().max(d.normalize().scale()));
                }
            }
            b
        })
        .collect();
    Ok(Some(Balance {
        payee_id: id,
        status: payee.status,
        schedule: schedule.to_string(),
        period,
        currencies,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_checked_for_the_gateway_kind() {
        assert_eq!(account_problem(GatewayKind::Stripe, "acct_1Nv0FGQ9"), None);
        assert_eq!(
            account_problem(GatewayKind::ReleaseFunds, "acct_drv9"),
            None
        );
        assert_eq!(
            account_problem(GatewayKind::Contract, "bank:DE89-3704"),
            None
        );
        for bad in ["iban_DE89", "acct_", "acct_a-b", "ACCT_1"] {
            let why = account_problem(GatewayKind::Stripe, bad).expect(bad);
            assert!(why.contains("acct_"), "{why}");
        }
        assert!(account_problem(GatewayKind::Contract, "a b").is_some());
        assert!(account_problem(GatewayKind::Contract, "").is_some());
        assert!(account_problem(GatewayKind::Contract, &"x".repeat(256)).is_some());
    }
}

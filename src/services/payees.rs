//! Payee management (#17 item 7): suspend, resume, change of gateway
//! account. Each change is one transaction with its audit row (actor, what
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
};

/// Why a payee change was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum PayeeError {
    /// No such payee.
    #[error("payee {0} not found")]
    NotFound(i64),
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
#[derive(Debug, Clone, Serialize)]
pub struct Suspended {
    /// The payee after.
    pub payee: Payee,
    /// The payouts that were `queued` and now wait as `pending`.
    pub parked: Vec<i64>,
}

/// A change of account done.
#[derive(Debug, Clone, Serialize)]
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
    let p = payees::lock(&mut tx, id)
        .await?
        .ok_or(PayeeError::NotFound(id))?;
    if p.status == "suspended" {
        return Err(PayeeError::Conflict(format!(
            "payee {id} is suspended already (resume it first to suspend it again)"
        )));
    }
    let payee = payees::set_status(&mut tx, id, "suspended").await?;
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
pub async fn resume(pool: &PgPool, id: i64, by: By<'_>) -> Result<Payee, PayeeError> {
    let mut tx = pool.begin().await?;
    let p = payees::lock(&mut tx, id)
        .await?
        .ok_or(PayeeError::NotFound(id))?;
    if p.status != "suspended" {
        return Err(PayeeError::Conflict(format!(
            "payee {id} is {}, not suspended: nothing to resume",
            p.status
        )));
    }
    let payee = payees::set_status(&mut tx, id, "active").await?;
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "payee.resume",
        &id.to_string(),
        json!({"from": p.status}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(payee = id, actor = %by.actor, "payee resumed");
    Ok(payee)
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
    let p = payees::lock(&mut tx, id)
        .await?
        .ok_or(PayeeError::NotFound(id))?;
    if p.gateway_account == account {
        return Err(PayeeError::Conflict(format!(
            "payee {id}'s gateway account is {account} already"
        )));
    }
    // Payouts sent before destinations were recorded at the claim keep the
    // account they went to.
    payouts::pin_destinations(&mut tx, id, &p.gateway_account).await?;
    let payee = payees::set_account(&mut tx, id, account).await?;
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
    tx.commit().await?;
    let (open, sent) = payouts::open_of_payee(pool, id).await?;
    tracing::info!(payee = id, actor = %by.actor, "payee gateway account changed");
    Ok(AccountChanged {
        payee,
        previous: p.gateway_account,
        kept_destination: sent,
        to_new_account: open - sent,
    })
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

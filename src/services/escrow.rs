//! Escrow actions on held money (#17 item 5, the billing service's manual
//! release and cancel of holds): release a held earning early, void an
//! earning before it is settled, and list holds with their totals.
//!
//! Each action locks the earning's payee first, as settlement does, so it
//! never races a settlement of the same payee: an earning is either settled
//! with what it was, or changed before the settlement reads it. Each is a
//! row in `audit_log` (`earning.release`, `earning.void`) with its actor, in
//! the same transaction as the change.
//!
//! - **Release early**: a held earning's `release_at` becomes now (its
//!   completion, if later): it is payable in the payee's current period.
//!   Refused (conflict) once released, settled or voided.
//! - **Void**: the earning is never settled, paid, nor counted in a
//!   balance; its reference stays taken, so the same work posted again is
//!   answered "already recorded" and not recorded anew. A reason is
//!   required. Refused once settled (the payout has it: cancel or reverse
//!   that instead) or voided.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::db::{
    audit,
    earnings::{self, EscrowRow},
    payees,
};
pub use crate::services::payees::By;

/// The longest void reason.
pub const MAX_REASON: usize = 500;

/// Why an escrow action was refused: payee management's refusals (not
/// found, conflict with the earning's state, bad input, database).
pub use crate::services::payees::PayeeError as EscrowError;

/// An escrow action done.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Done {
    /// The earning as it was before.
    pub earning: EscrowRow,
    /// Its release time after (a release), or as it was (a void).
    pub release_at: DateTime<Utc>,
    /// `released` or `voided`.
    #[schema(value_type = String, pattern = "^(released|voided)$")]
    pub state: &'static str,
}

/// Locks `id`'s payee, then `id`; refuses a settled or voided earning.
async fn lock_open(
    tx: &mut sqlx::PgConnection,
    id: i64,
    what: &str,
) -> Result<EscrowRow, EscrowError> {
    let payee = earnings::payee_of(tx, id)
        .await?
        .ok_or(EscrowError::NotFound("earning", id))?;
    payees::lock(tx, payee).await?;
    let e = earnings::lock_for_escrow(tx, id)
        .await?
        .ok_or(EscrowError::NotFound("earning", id))?;
    if let Some(at) = e.voided_at {
        return Err(EscrowError::Conflict(format!(
            "earning {id} was voided at {}: nothing to {what}",
            at.format("%Y-%m-%dT%H:%M:%SZ")
        )));
    }
    if let Some(s) = e.settlement_id {
        let paid_by = e
            .payout_id
            .map_or(String::new(), |p| format!(" (payout {p})"));
        return Err(EscrowError::Conflict(format!(
            "earning {id} is settled (settlement {s}{paid_by}): too late to {what}; \
             cancel or reverse its payout instead"
        )));
    }
    Ok(e)
}

/// Releases held earning `id` now.
pub async fn release(
    pool: &PgPool,
    id: i64,
    reason: Option<&str>,
    by: By<'_>,
) -> Result<Done, EscrowError> {
    let reason = check_reason(reason, false)?;
    let mut tx = pool.begin().await?;
    let e = lock_open(&mut tx, id, "release").await?;
    if e.release_at <= by.now {
        return Err(EscrowError::Conflict(format!(
            "earning {id} is released already (at {}): nothing to release",
            e.release_at.format("%Y-%m-%dT%H:%M:%SZ")
        )));
    }
    let at = earnings::release_now(&mut tx, id, by.now)
        .await?
        .ok_or_else(|| EscrowError::Conflict(format!("earning {id} changed meanwhile")))?;
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "earning.release",
        &id.to_string(),
        json!({"payee_id": e.payee_id, "gross": e.gross.normalize().to_string(),
               "currency": e.currency, "release_at_was": e.release_at, "release_at": at,
               "reason": reason}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(earning = id, payee = e.payee_id.get(), actor = %by.actor, "earning released early");
    Ok(Done {
        earning: e,
        release_at: at,
        state: "released",
    })
}

/// Voids unsettled earning `id`, with a reason.
pub async fn void(
    pool: &PgPool,
    id: i64,
    reason: Option<&str>,
    by: By<'_>,
) -> Result<Done, EscrowError> {
    let reason = check_reason(reason, true)?.unwrap_or_default();
    let mut tx = pool.begin().await?;
    let e = lock_open(&mut tx, id, "void").await?;
    if !earnings::void(&mut tx, id, by.actor, &reason, by.now).await? {
        return Err(EscrowError::Conflict(format!(
            "earning {id} changed meanwhile"
        )));
    }
    audit::record(
        &mut *tx,
        by.now,
        by.actor,
        "earning.void",
        &id.to_string(),
        json!({"payee_id": e.payee_id, "gross": e.gross.normalize().to_string(),
               "currency": e.currency, "source": e.source, "external_ref": e.external_ref,
               "was_held": e.release_at > by.now, "reason": reason}),
        by.source,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(earning = id, payee = e.payee_id.get(), actor = %by.actor, "earning voided");
    let release_at = e.release_at;
    Ok(Done {
        earning: e,
        release_at,
        state: "voided",
    })
}

/// A reason, trimmed: required for a void, at most [`MAX_REASON`] characters.
fn check_reason(reason: Option<&str>, required: bool) -> Result<Option<String>, EscrowError> {
    let r = reason.map(str::trim).filter(|r| !r.is_empty());
    match r {
        None if required => Err(EscrowError::Invalid(
            "reason: required (why the earning is never to be paid)".into(),
        )),
        Some(r) if r.chars().count() > MAX_REASON => Err(EscrowError::Invalid(format!(
            "reason: at most {MAX_REASON} characters"
        ))),
        r => Ok(r.map(str::to_string)),
    }
}

/// Held earnings (open, released after `now`): totals per payee and per
/// source, each per currency, largest first (at most `limit` of each).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Holds {
    /// Per payee (`key` is the payee id).
    pub by_payee: Vec<earnings::HoldTotal>,
    /// Per source.
    pub by_source: Vec<earnings::HoldTotal>,
}

/// See [`Holds`].
pub async fn holds(
    pool: &PgPool,
    f: &earnings::HoldFilter,
    now: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Holds> {
    Ok(Holds {
        by_payee: earnings::hold_totals(pool, f, false, now, limit).await?,
        by_source: earnings::hold_totals(pool, f, true, now, limit).await?,
    })
}

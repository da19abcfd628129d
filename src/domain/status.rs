//! The payout lifecycle and its legal transitions (DESIGN.md):
//!
//! ```text
//! pending --due--> queued --claim--> processing --ok--> paid
//!                    ^                    |  \--accepted, async--> in_transit --> paid | failed
//!                    |                    |--transient--> retrying --next_attempt_at--> queued
//!                    |                    '--permanent / attempts exhausted--> failed
//!   processing --payee cannot receive money yet (onboarding)--> held --account ready--> queued
//!   operator: retry (failed -> queued), enqueue (pending|retrying|held -> queued),
//!             cancel (pending|queued|retrying|failed|held -> cancelled)
//!   reconciliation: pending|queued|retrying -> held when the payout carries a
//!             returned balance the gateway paid after all
//!   payee suspended: queued -> pending (not yet claimed; waits for the resume)
//! ```
//!
//! A cancel of a payout that was sent and whose answers could have moved
//! money asks the gateway first ([`crate::services::reconcile::cancel`]).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Where a payout is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PayoutStatus {
    /// Created, waiting for its due time.
    Pending,
    /// Due; a job is (or should be) in Redis.
    Queued,
    /// Claimed by a worker (holds the lease).
    Processing,
    /// A transient failure; waits for `next_attempt_at`.
    Retrying,
    /// Accepted by the gateway; the final word comes later.
    InTransit,
    /// Money moved. Final.
    Paid,
    /// Permanent error or attempts exhausted (the dead letter). An operator may retry.
    Failed,
    /// Cancelled by an operator. Final.
    Cancelled,
    /// The payee cannot receive money yet (e.g. Stripe onboarding not
    /// finished): waits, with its reason, until the account is ready. Not a
    /// failure; no attempt budget is spent.
    Held,
}

/// All statuses, in lifecycle order.
pub const ALL_STATUSES: [PayoutStatus; 9] = [
    PayoutStatus::Pending,
    PayoutStatus::Queued,
    PayoutStatus::Processing,
    PayoutStatus::Retrying,
    PayoutStatus::InTransit,
    PayoutStatus::Paid,
    PayoutStatus::Failed,
    PayoutStatus::Cancelled,
    PayoutStatus::Held,
];

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot move payout {id} from {from} to {to}")]
pub struct TransitionError {
    /// The payout.
    pub id: i64,
    /// Its status now.
    pub from: PayoutStatus,
    /// The status asked for.
    pub to: PayoutStatus,
}

impl PayoutStatus {
    /// The name stored in Postgres.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Processing => "processing",
            Self::Retrying => "retrying",
            Self::InTransit => "in_transit",
            Self::Paid => "paid",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Held => "held",
        }
    }

    /// No worker will ever touch it again on its own.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Paid | Self::Cancelled | Self::Failed)
    }

    /// Whether reconciliation may record `self -> to` because the gateway
    /// says the money moved (or is moving): to `paid` or `in_transit` from any
    /// other status. The database allows these only inside a reconciling transaction.
    pub fn can_reconcile_to(self, to: Self) -> bool {
        matches!(to, Self::Paid | Self::InTransit) && self != Self::Paid && self != to
    }

    /// Whether `self -> to` is a legal move (the database enforces the same table).
    pub fn can_move_to(self, to: Self) -> bool {
        use PayoutStatus::*;
        matches!(
            (self, to),
            (Pending, Queued)
                | (Pending, Cancelled)
                | (Queued, Processing)
                | (Queued, Cancelled)
                | (Queued, Pending)
                | (Processing, Paid)
                | (Processing, InTransit)
                | (Processing, Retrying)
                | (Processing, Failed)
                | (Processing, Queued)
                | (Processing, Processing)
                | (Processing, Held)
                | (Retrying, Queued)
                | (Retrying, Cancelled)
                | (InTransit, Paid)
                | (InTransit, Failed)
                | (Paid, Failed)
                | (Failed, Queued)
                | (Failed, Cancelled)
                | (Held, Queued)
                | (Held, Cancelled)
        )
    }
}

impl fmt::Display for PayoutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PayoutStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL_STATUSES
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status {s:?} (one of: {})",
                    ALL_STATUSES.map(|s| s.as_str()).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_cannot_be_cancelled_or_requeued_except_failed() {
        assert!(!PayoutStatus::Paid.can_move_to(PayoutStatus::Cancelled));
        assert!(!PayoutStatus::Paid.can_move_to(PayoutStatus::Queued));
        assert!(!PayoutStatus::Cancelled.can_move_to(PayoutStatus::Queued));
        assert!(PayoutStatus::Failed.can_move_to(PayoutStatus::Queued));
    }

    #[test]
    fn names_round_trip() {
        for s in ALL_STATUSES {
            assert_eq!(s.as_str().parse::<PayoutStatus>(), Ok(s));
        }
        assert!("done".parse::<PayoutStatus>().is_err());
    }
}

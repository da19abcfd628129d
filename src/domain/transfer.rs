//! The fleet's side of a transfer, as pure functions: the idempotency key
//! (and reference) a payout is sent under, and what a gateway's status for a
//! transfer means for the payout.

use super::{PayoutId, PayoutStatus};

/// The idempotency key (and gateway reference) of payout `id`: the same for
/// every attempt (see DESIGN.md).
pub fn idempotency_key(id: PayoutId) -> String {
    format!("payout_{id}")
}

/// What a gateway's status for a transfer (`paid`, `pending`, `reversed`, ...)
/// means for an in-transit payout: paid, failed, or still open (`None`).
pub fn verdict(gateway_status: &str) -> Option<PayoutStatus> {
    match gateway_status {
        "paid" | "succeeded" => Some(PayoutStatus::Paid),
        "failed" | "reversed" | "canceled" | "cancelled" | "returned" => Some(PayoutStatus::Failed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_payout_id_and_open_statuses_have_no_verdict() {
        assert_eq!(idempotency_key(PayoutId::new(42)), "payout_42");
        assert_eq!(verdict("succeeded"), Some(PayoutStatus::Paid));
        assert_eq!(verdict("reversed"), Some(PayoutStatus::Failed));
        assert_eq!(verdict("pending"), None);
    }
}

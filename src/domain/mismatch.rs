//! The kinds of disagreement between the fleet's record of a payout and the
//! gateway's (reconciliation's findings, and the label of
//! `payout_reconcile_mismatches_total`).

use serde::Serialize;

/// A kind of disagreement (also the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// The gateway paid (or accepted) it; the database does not say so. Fixable.
    PaidAtGatewayNotInDb,
    /// The database says paid; the gateway has no transfer. Alert; never fixed by paying.
    PaidInDbUnknownToGateway,
    /// The database says paid; the gateway says the transfer failed.
    FailedAtGatewayPaidInDb,
    /// Amount or currency differ.
    AmountMismatch,
    /// The transfer ids differ.
    TransferIdMismatch,
    /// The gateway holds more than one transfer for one payout: paid twice.
    DuplicateAtGateway,
    /// The gateway could not be asked.
    LookupFailed,
    /// The payout's money went back to the payee's balance (it was cancelled
    /// or reversed), yet the gateway paid it: that balance is paid twice
    /// unless stopped. Pages; never "fixed" by recording paid; the payout
    /// carrying the balance is held when it has not been sent.
    ReturnedPaidAtGateway,
}

impl MismatchKind {
    /// Every kind.
    pub const ALL: [MismatchKind; 8] = [
        MismatchKind::PaidAtGatewayNotInDb,
        MismatchKind::PaidInDbUnknownToGateway,
        MismatchKind::FailedAtGatewayPaidInDb,
        MismatchKind::AmountMismatch,
        MismatchKind::TransferIdMismatch,
        MismatchKind::DuplicateAtGateway,
        MismatchKind::LookupFailed,
        MismatchKind::ReturnedPaidAtGateway,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MismatchKind::PaidAtGatewayNotInDb => "paid_at_gateway_not_in_db",
            MismatchKind::PaidInDbUnknownToGateway => "paid_in_db_unknown_to_gateway",
            MismatchKind::FailedAtGatewayPaidInDb => "failed_at_gateway_paid_in_db",
            MismatchKind::AmountMismatch => "amount_mismatch",
            MismatchKind::TransferIdMismatch => "transfer_id_mismatch",
            MismatchKind::DuplicateAtGateway => "duplicate_at_gateway",
            MismatchKind::LookupFailed => "lookup_failed",
            MismatchKind::ReturnedPaidAtGateway => "returned_paid_at_gateway",
        }
    }
}

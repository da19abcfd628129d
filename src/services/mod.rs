//! The fleet's services over its stores and the gateway: settlement (earnings
//! to payouts), sync (the in-transit poll and account checks) and
//! reconciliation (the fleet's record against the gateway's).

pub mod reconcile;
pub mod settlement;
pub mod sync;

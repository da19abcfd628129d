//! The fleet's services over its stores and the gateway: settlement (earnings
//! to payouts), sync (the in-transit poll and account checks) and
//! reconciliation (the fleet's record against the gateway's), and payee
//! management (suspend, resume, a change of gateway account).

pub mod payees;
pub mod reconcile;
pub mod settlement;
pub mod sync;

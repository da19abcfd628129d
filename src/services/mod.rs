//! The fleet's services over its stores and the gateway: settlement (earnings
//! to payouts), sync (the in-transit poll and account checks),
//! reconciliation (the fleet's record against the gateway's), payee
//! management (suspend, resume, a change of gateway account), escrow actions
//! (release early, void, holds) and outbound webhooks (events to the platform).

pub mod escrow;
pub mod payees;
pub mod payout_requests;
pub mod reconcile;
pub mod settlement;
pub mod sync;
pub mod webhooks_out;

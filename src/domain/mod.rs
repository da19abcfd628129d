//! The domain: money, typed ids, payout states and their legal transitions. Pure: no I/O,
//! no clock (time is passed in).

pub mod earning;
pub mod ids;
pub mod mismatch;
pub mod money;
pub mod policy;
pub mod priority;
pub mod schedule;
pub mod status;
pub mod transfer;

pub use ids::{PayeeId, PayoutId};
pub use money::{Currency, DecimalString, Money, MoneyError};
pub use policy::{PayoutMethod, Policy, PolicyError};
pub use priority::Priority;
pub use schedule::{Period, Schedule};
pub use status::{PayoutStatus, TransitionError};

//! The domain: money, payout states and their legal transitions. Pure: no I/O,
//! no clock (time is passed in).

pub mod money;
pub mod status;

pub use money::{Currency, Money, MoneyError};
pub use status::{PayoutStatus, TransitionError};

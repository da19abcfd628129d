//! Why a payout is due, which the due scan ranks by (`payouts.priority`).

/// Why a payout is due. Stored as `payouts.priority` (a `smallint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Due by the payee's schedule (settlement).
    Scheduled = 0,
    /// A payee asked to be paid early (a payout request).
    Requested = 1,
    /// An operator asked for it now ("process now", retry).
    ProcessNow = 2,
}

impl Priority {
    /// The stored value.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// The value read back; `None` for a value no migration allows.
    pub fn from_i16(v: i16) -> Option<Self> {
        match v {
            0 => Some(Self::Scheduled),
            1 => Some(Self::Requested),
            2 => Some(Self::ProcessNow),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_round_trip() {
        for p in [
            Priority::Scheduled,
            Priority::Requested,
            Priority::ProcessNow,
        ] {
            assert_eq!(Priority::from_i16(p.as_i16()), Some(p));
        }
        assert_eq!(Priority::from_i16(3), None);
    }
}

//! Typed ids. A payout id and a payee id are both `bigint` in Postgres and
//! a number in JSON, but never each other: the newtypes keep a payee id out
//! of a payout's place. Both are transparent on every wire (JSON, Postgres,
//! the queue's job payload, and the OpenAPI document, where a field
//! names it `#[schema(value_type = i64)]`), so nothing outside the process
//! sees them.

use std::{fmt, num::ParseIntError, str::FromStr};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone,
            Copy,
            Debug,
            PartialEq,
            Eq,
            Hash,
            PartialOrd,
            Ord,
            serde::Serialize,
            serde::Deserialize,
            sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(i64);

        impl $name {
            /// The id with this number.
            pub const fn new(id: i64) -> Self {
                $name(id)
            }

            /// The number (the `bigint` in Postgres, what a statement binds).
            pub const fn get(self) -> i64 {
                self.0
            }
        }

        impl From<i64> for $name {
            fn from(id: i64) -> Self {
                $name(id)
            }
        }

        impl From<$name> for i64 {
            fn from(id: $name) -> i64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }

        impl PartialEq<i64> for $name {
            fn eq(&self, other: &i64) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for i64 {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

id_type!(
    /// A payout's id (`payouts.id`).
    PayoutId
);

id_type!(
    /// A payee's id (`payees.id`).
    PayeeId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_numbers_on_the_wire() {
        let id = PayoutId::new(42);
        assert_eq!(serde_json::to_string(&id).unwrap(), "42");
        assert_eq!(serde_json::from_str::<PayoutId>("42").unwrap(), id);
        assert_eq!(id.to_string(), "42");
        assert_eq!("42".parse::<PayoutId>().unwrap(), id);
        assert!("x".parse::<PayeeId>().is_err());
        assert_eq!(i64::from(PayeeId::from(7)), 7);
    }
}

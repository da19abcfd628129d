//! `[producer.priority]`: the due scan's ranking (#17 item 4).
//!
//! The producer queues due payouts in the order of their *rank time*:
//!
//! ```text
//! rank_at = due_at - boost
//! boost   = process_now_boost_secs            priority 2 (an operator's "process now")
//!         | requested_boost_secs              priority 1 (a payee's early request)
//!         | the policy's boost (`scheduled`)  priority 0 (the schedule)
//! ```
//!
//! Every boost is bounded, which is the aging rule: a payout counts as if due
//! at most its boost earlier, so a scheduled payout that has waited longer
//! than a requested payout's boost goes before a requested payout created
//! now, and nothing waits forever behind a stream of boosted ones. The
//! policy for scheduled payouts:
//!
//! - `due`: by due time only (boost 0; the default);
//! - `larger_first`: `amount_boost_secs x min(amount / amount_full, 1)`;
//! - `smaller_first`: `amount_boost_secs x (1 - min(amount / amount_full, 1))`;
//! - `tier`: `tier_boost_secs[payees.tier]` (0 past the list's end).
//!
//! Amounts are compared as numbers, whatever their currency. Every
//! scheduled boost must stay below `requested_boost_secs` (checked at load),
//! so a request due now always goes ahead of scheduled payouts due now.
//! The rank is stored (`payouts.rank_at`) when the producer first sees a
//! pending payout (`db::payouts::rank_pending`), so a changed policy ranks
//! the payouts that become pending after the change; a payee's new tier
//! ranks its pending payouts again.

use rust_decimal::Decimal;
use serde::Deserialize;

/// The longest boost: a week.
pub const MAX_BOOST_SECS: u32 = 7 * 24 * 3600;

/// How scheduled payouts rank among themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduledRank {
    /// By due time.
    Due,
    /// Larger amounts first, within `amount_boost_secs`.
    LargerFirst,
    /// Smaller amounts first, within `amount_boost_secs`.
    SmallerFirst,
    /// Higher payee tiers first (`tier_boost_secs`).
    Tier,
}

impl ScheduledRank {
    /// The name the SQL of `db::payouts::rank_pending` matches on.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Due => "due",
            Self::LargerFirst => "larger_first",
            Self::SmallerFirst => "smaller_first",
            Self::Tier => "tier",
        }
    }
}

/// The due scan's ranking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrioritySettings {
    /// An operator's "process now" ranks as if due this many seconds earlier.
    pub process_now_boost_secs: u32,
    /// A payee's early request ranks as if due this many seconds earlier.
    pub requested_boost_secs: u32,
    /// How scheduled payouts rank among themselves.
    pub scheduled: ScheduledRank,
    /// `larger_first` / `smaller_first`: the largest boost, in seconds.
    pub amount_boost_secs: u32,
    /// `larger_first` / `smaller_first`: the amount at which the boost is
    /// full (`larger_first`) or nothing (`smaller_first`).
    pub amount_full: Decimal,
    /// `tier`: the boost of each payee tier, in seconds, by tier (0 first).
    pub tier_boost_secs: Vec<u32>,
}

impl Default for PrioritySettings {
    fn default() -> Self {
        PrioritySettings {
            process_now_boost_secs: 86_400,
            requested_boost_secs: 3_600,
            scheduled: ScheduledRank::Due,
            amount_boost_secs: 600,
            amount_full: Decimal::new(100_000, 2),
            tier_boost_secs: vec![0, 300, 900],
        }
    }
}

impl PrioritySettings {
    /// Checks ranges; the error names the bad key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let tiers_ok = self.tier_boost_secs.len() <= 10;
        let highest_tier = self.tier_boost_secs.iter().copied().max().unwrap_or(0);
        let checks = [
            (
                self.process_now_boost_secs <= MAX_BOOST_SECS,
                "producer.priority.process_now_boost_secs must be <= 604800 (a week)",
            ),
            (
                self.requested_boost_secs <= self.process_now_boost_secs,
                "producer.priority.requested_boost_secs must be <= process_now_boost_secs",
            ),
            (
                self.amount_full > Decimal::ZERO,
                "producer.priority.amount_full must be > 0",
            ),
            (
                self.amount_boost_secs < self.requested_boost_secs
                    || !matches!(
                        self.scheduled,
                        ScheduledRank::LargerFirst | ScheduledRank::SmallerFirst
                    ),
                "producer.priority.amount_boost_secs must be < requested_boost_secs (a request due now goes ahead of scheduled payouts due now)",
            ),
            (
                tiers_ok,
                "producer.priority.tier_boost_secs must have at most 10 entries (tiers 0-9)",
            ),
            (
                highest_tier < self.requested_boost_secs || self.scheduled != ScheduledRank::Tier,
                "producer.priority.tier_boost_secs must each be < requested_boost_secs (a request due now goes ahead of scheduled payouts due now)",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                anyhow::bail!("invalid configuration: {msg}");
            }
        }
        Ok(())
    }

    /// `tier_boost_secs` as the SQL's `int[]`.
    pub fn tier_boosts(&self) -> Vec<i32> {
        self.tier_boost_secs.iter().map(|&s| s as i32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(f: impl FnOnce(&mut PrioritySettings)) -> String {
        let mut s = PrioritySettings::default();
        f(&mut s);
        s.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_validate() {
        PrioritySettings::default().validate().unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        assert!(
            bad(|s| s.process_now_boost_secs = MAX_BOOST_SECS + 1)
                .contains("producer.priority.process_now_boost_secs")
        );
        assert!(
            bad(|s| s.requested_boost_secs = s.process_now_boost_secs + 1)
                .contains("producer.priority.requested_boost_secs")
        );
        assert!(bad(|s| s.amount_full = Decimal::ZERO).contains("producer.priority.amount_full"));
        assert!(
            bad(|s| {
                s.scheduled = ScheduledRank::LargerFirst;
                s.amount_boost_secs = s.requested_boost_secs;
            })
            .contains("producer.priority.amount_boost_secs")
        );
        assert!(bad(|s| s.tier_boost_secs = vec![0; 11]).contains("tier_boost_secs"));
        assert!(
            bad(|s| {
                s.scheduled = ScheduledRank::Tier;
                s.tier_boost_secs = vec![0, s.requested_boost_secs];
            })
            .contains("producer.priority.tier_boost_secs")
        );
        // A boost the policy does not use is not checked against the request's.
        let mut s = PrioritySettings {
            amount_boost_secs: 7200,
            ..PrioritySettings::default()
        };
        s.validate().unwrap();
        s.scheduled = ScheduledRank::Tier;
        s.validate().unwrap();
    }
}

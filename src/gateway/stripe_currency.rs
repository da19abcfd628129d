//! Stripe's minor units, which are not always ISO 4217's
//! (<https://docs.stripe.com/currencies#zero-decimal>,
//! <https://docs.stripe.com/currencies#three-decimal>,
//! <https://docs.stripe.com/currencies#special-cases>):
//!
//! - **ISK** is zero-decimal in ISO but Stripe represents it as a
//!   two-decimal currency for backwards compatibility, and the amount must be
//!   divisible by 100: ISK 1,000 is `amount=100000`, and fractions of a króna
//!   cannot be sent. (UGX is treated the same way.)
//! - **HUF** and **TWD** are two-decimal in the API, but payouts to bank
//!   accounts must be whole units (amounts divisible by 100): a transfer of
//!   HUF 1000.50 would strand the 50 fillér in the connected account, so
//!   the fleet refuses fractions.
//! - **Three-decimal currencies** (BHD, JOD, KWD, OMR, TND): the last digit
//!   of the amount must be 0 in payment flows, so amounts may have at most
//!   two significant decimals; KWD 25.731 is refused with a clear error
//!   rather than sent as `25731`.
//!
//! Every other currency uses its ISO exponent. The fleet applies these rules
//! at the gateway edge ([`stripe_minor_units`], called by the Stripe
//! adapter) and when a payout is created for `gateway.kind = "stripe"`
//! ([`check_for_kind`]); the rest of the fleet keeps exact decimals.

use rust_decimal::{Decimal, prelude::ToPrimitive};

use crate::{config::GatewayKind, domain::Money};

/// Currencies Stripe counts in hundredths although ISO says 0 decimals,
/// whose amounts must be whole units (divisible by 100).
const TWO_DECIMAL_WHOLE_UNITS: &[&str] = &["ISK", "UGX"];
/// Currencies whose payouts must be whole units (amounts divisible by 100).
const WHOLE_UNIT_PAYOUTS: &[&str] = &["HUF", "TWD"];
/// Three-decimal currencies: the last digit must be 0.
const THREE_DECIMAL: &[&str] = &["BHD", "JOD", "KWD", "OMR", "TND"];

/// Why an amount cannot be sent through Stripe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("amount: {currency} {amount} cannot be paid through Stripe: {why}")]
pub struct StripeAmountError {
    /// ISO code.
    pub currency: String,
    /// The amount as given.
    pub amount: Decimal,
    /// The rule it breaks.
    pub why: String,
}

/// The exponent Stripe's API uses for `currency` (upper-case ISO code), given its ISO exponent.
pub fn stripe_exponent(currency: &str, iso_exponent: u32) -> u32 {
    if TWO_DECIMAL_WHOLE_UNITS.contains(&currency) {
        2
    } else {
        iso_exponent
    }
}

/// `money` as Stripe's `amount`, or why Stripe cannot take it.
pub fn stripe_minor_units(money: &Money) -> Result<i64, StripeAmountError> {
    let currency = money.currency();
    let code = currency.code().to_ascii_uppercase();
    let amount = money.amount();
    let err = |why: String| StripeAmountError {
        currency: code.clone(),
        amount,
        why,
    };
    let whole = amount.fract().is_zero();
    if (TWO_DECIMAL_WHOLE_UNITS.contains(&code.as_str())
        || WHOLE_UNIT_PAYOUTS.contains(&code.as_str()))
        && !whole
    {
        return Err(err(format!(
            "Stripe only pays whole units of {code} (its amounts must be divisible by 100)"
        )));
    }
    let exp = stripe_exponent(&code, currency.exponent());
    let scaled = amount * Decimal::from(10i64.pow(exp));
    if !scaled.fract().is_zero() {
        return Err(err(format!("more than {exp} decimals")));
    }
    let minor = scaled.to_i64().ok_or_else(|| err("too large".into()))?;
    if THREE_DECIMAL.contains(&code.as_str()) && minor % 10 != 0 {
        return Err(err(format!(
            "the last digit of a three-decimal currency amount must be 0 (e.g. {} or {})",
            (amount * Decimal::from(100)).floor() / Decimal::from(100),
            (amount * Decimal::from(100)).ceil() / Decimal::from(100),
        )));
    }
    if minor <= 0 {
        return Err(err("must be positive".into()));
    }
    Ok(minor)
}

/// Whether a payout of `money` can be paid by a fleet with `gateway.kind =
/// kind`: the Stripe rules above for `stripe`, nothing more for the others.
/// For the code that creates payouts (CLI, admin API, settlement).
pub fn check_for_kind(kind: GatewayKind, money: &Money) -> Result<(), StripeAmountError> {
    if kind == GatewayKind::Stripe {
        stripe_minor_units(money).map(|_| ())
    } else {
        Ok(())
    }
}

/// The step (in major units) every Stripe payout in `currency` must be a
/// multiple of, when it is coarser than the ISO minor unit: 1 for HUF, TWD,
/// ISK and UGX (whole units), 0.01 for three-decimal currencies (last digit 0).
pub fn payout_increment(currency: crate::domain::Currency) -> Option<Decimal> {
    let code = currency.code().to_ascii_uppercase();
    let code = code.as_str();
    if TWO_DECIMAL_WHOLE_UNITS.contains(&code) || WHOLE_UNIT_PAYOUTS.contains(&code) {
        (currency.exponent() > 0).then_some(Decimal::ONE)
    } else if THREE_DECIMAL.contains(&code) {
        Some(Decimal::new(1, 2))
    } else {
        None
    }
}

/// `policy` for a fleet with `gateway.kind = kind`: with Stripe, settlement
/// rounds each payout down to what Stripe can send ([`payout_increment`])
/// and keeps the rest in the payee's balance; other kinds pay to the minor unit.
pub fn policy_for_kind(kind: GatewayKind, policy: crate::domain::Policy) -> crate::domain::Policy {
    if kind != GatewayKind::Stripe {
        return policy;
    }
    let currencies: Vec<crate::domain::Currency> = policy
        .minimum_payout
        .keys()
        .filter_map(|c| c.parse().ok())
        .collect();
    currencies
        .into_iter()
        .fold(policy, |p, c| match payout_increment(c) {
            Some(step) => p.with_payout_increment(c, step),
            None => p,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(a: &str, c: &str) -> Money {
        Money::parse(a, c).unwrap()
    }

    #[test]
    fn a_stripe_policy_pays_three_decimal_currencies_in_hundredths_and_usd_to_the_cent() {
        let p = policy_for_kind(
            GatewayKind::Stripe,
            include_str!("../../config/policy.toml").parse().unwrap(),
        );
        assert_eq!(
            p.payout_increment("BHD".parse().unwrap()),
            Some(Decimal::new(1, 2))
        );
        assert_eq!(p.payout_increment("USD".parse().unwrap()), None);
        assert_eq!(payout_increment("HUF".parse().unwrap()), Some(Decimal::ONE));
        let contract = policy_for_kind(
            GatewayKind::Contract,
            include_str!("../../config/policy.toml").parse().unwrap(),
        );
        assert!(contract.payout_increment.is_empty());
    }

    #[test]
    fn isk_is_two_decimal_at_stripe_and_whole_kronur_only() {
        assert_eq!(stripe_minor_units(&m("1000", "ISK")), Ok(100_000));
        assert_eq!(stripe_minor_units(&m("12.50", "USD")), Ok(1_250));
        assert_eq!(stripe_minor_units(&m("500", "JPY")), Ok(500));
    }

    #[test]
    fn huf_and_twd_fractions_and_three_decimal_last_digits_are_refused_with_the_rule() {
        let e = stripe_minor_units(&m("1000.50", "HUF")).unwrap_err();
        assert!(e.to_string().contains("whole units of HUF"), "{e}");
        assert_eq!(stripe_minor_units(&m("1000", "HUF")), Ok(100_000));
        assert!(stripe_minor_units(&m("10.01", "TWD")).is_err());
        let e = stripe_minor_units(&m("25.731", "KWD")).unwrap_err();
        assert!(e.to_string().contains("last digit"), "{e}");
        assert!(e.to_string().starts_with("amount: KWD 25.731"), "{e}");
        assert_eq!(stripe_minor_units(&m("25.73", "KWD")), Ok(25_730));
        assert!(check_for_kind(GatewayKind::Contract, &m("25.731", "KWD")).is_ok());
        assert!(check_for_kind(GatewayKind::Stripe, &m("25.731", "KWD")).is_err());
    }
}

//! Exact money. An amount is a `rust_decimal::Decimal` with an ISO 4217
//! currency; it is built only through [`Money::parse`] / [`Money::new`], which
//! refuse non-positive amounts, more decimals than the currency has, and
//! unknown currencies. Integer minor units exist only at the gateway edge.

use std::{fmt, str::FromStr};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Why an amount or currency was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not a decimal number.
    #[error("amount {0:?} is not a decimal number")]
    NotANumber(String),
    /// Zero or negative.
    #[error("amount {0} must be greater than zero")]
    NotPositive(Decimal),
    /// More decimals than the currency's minor unit.
    #[error("amount {amount} has more decimals than {currency} allows ({exponent})")]
    ExcessPrecision {
        /// The amount given.
        amount: Decimal,
        /// Its currency.
        currency: Currency,
        /// The currency's minor-unit exponent.
        exponent: u32,
    },
    /// Not an ISO 4217 code this fleet knows.
    #[error("unknown currency {0:?} (expected an ISO 4217 code such as USD)")]
    UnknownCurrency(String),
    /// Too large to express in the gateway's integer minor units.
    #[error("amount {0} is too large")]
    TooLarge(Decimal),
}

/// ISO 4217 codes with their minor-unit exponents.
const CURRENCIES: &[(&str, u32)] = &[
    ("AED", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EGP", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("LYD", 3),
    ("MAD", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("NGN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PEN", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("QAR", 2),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("VND", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("ZAR", 2),
];

/// A known ISO 4217 currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency {
    code: [u8; 3],
    exponent: u32,
}

impl Currency {
    /// The three-letter code, upper case.
    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).expect("ASCII by construction")
    }

    /// Decimals of the minor unit (USD 2, JPY 0, BHD 3).
    pub fn exponent(&self) -> u32 {
        self.exponent
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CURRENCIES
            .iter()
            .find(|(code, _)| *code == s)
            .map(|(code, exponent)| Currency {
                code: code.as_bytes().try_into().expect("3 letters"),
                exponent: *exponent,
            })
            .ok_or_else(|| MoneyError::UnknownCurrency(s.to_string()))
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.code().to_string()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A positive, exact amount in a known currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Money {
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// Builds a payable amount: positive, within the currency's precision.
    pub fn new(amount: Decimal, currency: Currency) -> Result<Self, MoneyError> {
        if amount <= Decimal::ZERO {
            return Err(MoneyError::NotPositive(amount));
        }
        let normalized = amount.normalize();
        if normalized.scale() > currency.exponent() {
            return Err(MoneyError::ExcessPrecision {
                amount,
                currency,
                exponent: currency.exponent(),
            });
        }
        let money = Money {
            amount: normalized,
            currency,
        };
        money.to_minor_units()?;
        Ok(money)
    }

    /// Parses an amount such as `"12.50"` and a code such as `"USD"`.
    pub fn parse(amount: &str, currency: &str) -> Result<Self, MoneyError> {
        let currency: Currency = currency.trim().parse()?;
        // The grammar is strict: digits, at most one point with digits on
        // both sides, an optional leading minus (refused below with its own
        // message). `Decimal` alone also takes `1_000.00`, `+5` and
        // surrounding spaces, which no payout system writes on purpose.
        let digits = amount.strip_prefix('-').unwrap_or(amount);
        let well_formed = match digits.split_once('.') {
            Some((int, frac)) => {
                !int.is_empty()
                    && !frac.is_empty()
                    && int.bytes().all(|b| b.is_ascii_digit())
                    && frac.bytes().all(|b| b.is_ascii_digit())
            }
            None => !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        };
        if !well_formed {
            return Err(MoneyError::NotANumber(amount.chars().take(40).collect()));
        }
        let amount = Decimal::from_str_exact(amount)
            .map_err(|_| MoneyError::NotANumber(amount.chars().take(40).collect()))?;
        Money::new(amount, currency)
    }

    /// The exact decimal amount.
    pub fn amount(&self) -> Decimal {
        self.amount
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The amount in integer minor units (cents, yen, fils): exact, never rounded,
    /// because construction refused excess precision.
    pub fn to_minor_units(&self) -> Result<i64, MoneyError> {
        let factor = Decimal::from(10i64.pow(self.currency.exponent()));
        let minor = self
            .amount
            .checked_mul(factor)
            .ok_or(MoneyError::TooLarge(self.amount))?;
        debug_assert!(minor.fract().is_zero());
        i64::try_from(minor.trunc()).map_err(|_| MoneyError::TooLarge(self.amount))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut a = self.amount;
        a.rescale(self.currency.exponent());
        write!(f, "{} {}", a, self.currency)
    }
}

/// The amount at its currency's scale (`120.50`, `1500`, `12.345`): what is
/// stored and shown.
pub fn at_minor_unit(m: &Money) -> Decimal {
    let mut a = m.amount();
    a.rescale(m.currency().exponent());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_units_use_the_currency_exponent() {
        assert_eq!(
            Money::parse("123.45", "USD").unwrap().to_minor_units(),
            Ok(12345)
        );
        assert_eq!(
            Money::parse("1500", "JPY").unwrap().to_minor_units(),
            Ok(1500)
        );
        assert_eq!(
            Money::parse("1.234", "BHD").unwrap().to_minor_units(),
            Ok(1234)
        );
        assert_eq!(
            Money::parse("10.10", "USD").unwrap().to_minor_units(),
            Ok(1010)
        );
    }

    #[test]
    fn refuses_negative_zero_excess_precision_and_unknown_currency() {
        assert!(matches!(
            Money::parse("-1.00", "USD"),
            Err(MoneyError::NotPositive(_))
        ));
        assert!(matches!(
            Money::parse("0", "USD"),
            Err(MoneyError::NotPositive(_))
        ));
        assert!(matches!(
            Money::parse("1.001", "USD"),
            Err(MoneyError::ExcessPrecision { .. })
        ));
        assert!(matches!(
            Money::parse("1.5", "JPY"),
            Err(MoneyError::ExcessPrecision { .. })
        ));
        assert!(matches!(
            Money::parse("1", "XXX"),
            Err(MoneyError::UnknownCurrency(_))
        ));
        assert!(matches!(
            Money::parse("1", "usd"),
            Err(MoneyError::UnknownCurrency(_))
        ));
        assert!(matches!(
            Money::parse("abc", "USD"),
            Err(MoneyError::NotANumber(_))
        ));
        assert!(matches!(
            Money::parse("1e3", "USD"),
            Err(MoneyError::NotANumber(_))
        ));
    }

    #[test]
    fn trailing_zeros_are_not_excess_precision() {
        assert_eq!(
            Money::parse("5.000", "USD").unwrap().to_minor_units(),
            Ok(500)
        );
    }

    #[test]
    fn display_uses_the_currency_scale() {
        assert_eq!(Money::parse("5", "USD").unwrap().to_string(), "5.00 USD");
        assert_eq!(Money::parse("5", "BHD").unwrap().to_string(), "5.000 BHD");
    }

    /// Security finding 6: `1_000.00`, `+5` and surrounding spaces were amounts.
    #[test]
    fn only_plain_decimal_amounts_parse() {
        for bad in [
            "1_000.00", "+5", " 5", "5 ", "5.", ".5", "1.2.3", "", "-", "0x10", "5,00",
        ] {
            assert!(
                matches!(Money::parse(bad, "USD"), Err(MoneyError::NotANumber(_))),
                "{bad:?} parsed"
            );
        }
        assert_eq!(
            Money::parse("1000.00", "USD").unwrap().to_minor_units(),
            Ok(100_000)
        );
        assert!(matches!(
            Money::parse("-1.00", "USD"),
            Err(MoneyError::NotPositive(_))
        ));
    }
}

/// The OpenAPI schema of an amount in JSON: an exact decimal as a string,
/// never a JSON number (`"12.50"`, `"-3.125"`, `"1000"`). Fields holding a
/// [`Decimal`] name it with `#[schema(value_type = DecimalString)]`; the
/// document is generated by `payouts::admin::openapi`.
#[derive(Debug, Clone, Copy)]
pub struct DecimalString;

impl utoipa::PartialSchema for DecimalString {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::Custom("decimal".into())))
            .pattern(Some(r"^-?[0-9]+(\.[0-9]+)?$"))
            .description(Some(
                "An exact decimal amount as a string, never a JSON number (amounts are \
                 never floats); at most the currency's ISO 4217 exponent of decimals where \
                 the amount is money of that currency",
            ))
            .examples(["12.50"])
            .into()
    }
}

impl utoipa::ToSchema for DecimalString {
    fn name() -> std::borrow::Cow<'static, str> {
        "Decimal".into()
    }
}

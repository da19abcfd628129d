//! The payout policy: how a payee's earnings in a period become a payout.
//! Read from TOML (`config/policy.toml`), validated with the bad field named,
//! and applied by [`Policy::compute`]. Pure: no I/O, no clock.
//!
//! The computation, for one payee, one currency, one period:
//!
//! ```text
//! gross G        = sum of the period's earnings            (one line per earning)
//! payee share    = round(G x tier%)  + round(G x bonus%)    (tier by services in the period;
//!                                                            bonus when G > the threshold)
//! platform       = G - payee share                          (so rounding loses nothing)
//! before fee     = payee share - deductions + carried in
//! fee            = round((G + carried gross) x fee%) + fixed (only when a payout is made)
//! net            = before fee - fee      -> a payout, when net >= the currency's minimum
//!                  otherwise no payout, no fee: `before fee` carries over to the next period
//! ```
//!
//! Every line is rounded once, to the currency's minor unit, with the policy's
//! midpoint rule (banker's rounding by default). Money is conserved exactly:
//! `G + carried in = net + platform + fee + deductions`.

use std::{collections::BTreeMap, fmt, str::FromStr};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize};

use super::{Currency, Schedule};

/// A policy field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The field, as a TOML path (`fees.standard.percent`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

/// How the gateway pays the payee out; each has its own fee.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    Default,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PayoutMethod {
    /// Standard payout (e.g. Stripe Connect standard: 0.25% + 0.25).
    #[default]
    Standard,
    /// Instant payout (e.g. 1.25% + 0.25).
    Instant,
    /// Bank transfer (e.g. 0.50 flat).
    BankTransfer,
}

impl PayoutMethod {
    /// The name used in configuration, the database and the CLI.
    pub fn as_str(&self) -> &'static str {
        match self {
            PayoutMethod::Standard => "standard",
            PayoutMethod::Instant => "instant",
            PayoutMethod::BankTransfer => "bank_transfer",
        }
    }
}

impl fmt::Display for PayoutMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PayoutMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "standard" => Ok(PayoutMethod::Standard),
            "instant" => Ok(PayoutMethod::Instant),
            "bank_transfer" => Ok(PayoutMethod::BankTransfer),
            _ => Err(format!(
                "payout method {s:?} is not one of standard, instant, bank_transfer"
            )),
        }
    }
}

/// The midpoint rule used when a line is rounded to the minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Banker's rounding: a midpoint goes to the even neighbour (0.125 -> 0.12).
    #[default]
    HalfEven,
    /// A midpoint goes away from zero (0.125 -> 0.13).
    HalfUp,
}

impl Rounding {
    fn strategy(self) -> RoundingStrategy {
        match self {
            Rounding::HalfEven => RoundingStrategy::MidpointNearestEven,
            Rounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
        }
    }
}

/// One commission tier: the payee's percentage for a range of services.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Fewest completed services in the period for this tier.
    pub min_services: u32,
    /// Most services for this tier; absent on the last (open-ended) tier.
    #[serde(default)]
    pub max_services: Option<u32>,
    /// The payee's percentage of the gross (e.g. 72).
    #[serde(deserialize_with = "exact")]
    pub payee_percent: Decimal,
}

/// How the gross is split between payee and platform.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "basis", rename_all = "snake_case", deny_unknown_fields)]
pub enum Commission {
    /// The payee's percentage by services completed in the period.
    Tiered {
        /// Contiguous, non-overlapping tiers, in order, the last open-ended.
        tiers: Vec<Tier>,
    },
    /// A flat platform commission; the payee keeps the rest.
    Flat {
        /// The platform's percentage (e.g. 20).
        #[serde(deserialize_with = "exact")]
        platform_percent: Decimal,
    },
}

/// A bonus for volume: extra percentage points to the payee.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeBonus {
    /// Percentage points added to the payee's share (e.g. 2: 72% -> 74%).
    #[serde(deserialize_with = "exact")]
    pub payee_percent: Decimal,
    /// Per currency: the bonus applies when the period's gross exceeds this.
    /// A currency not listed gets no bonus.
    #[serde(deserialize_with = "exact_map")]
    pub gross_above: BTreeMap<String, Decimal>,
}

/// The gateway's fee for one payout method.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fee {
    /// Percentage of the gross being paid out (e.g. 0.25).
    #[serde(deserialize_with = "exact")]
    pub percent: Decimal,
    /// Fixed amount per payout, per currency (e.g. USD 0.25).
    #[serde(deserialize_with = "exact_map")]
    pub fixed: BTreeMap<String, Decimal>,
}

/// The whole policy.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Days after completion before an earning is payable.
    pub hold_days: u32,
    /// The schedule of payees without one of their own.
    pub default_schedule: Schedule,
    /// The midpoint rule for rounding each line to the minor unit.
    #[serde(default)]
    pub rounding: Rounding,
    /// The split between payee and platform.
    pub commission: Commission,
    /// Optional volume bonus.
    #[serde(default)]
    pub volume_bonus: Option<VolumeBonus>,
    /// The gateway's fee by payout method; `standard` is required.
    pub fees: BTreeMap<PayoutMethod, Fee>,
    /// The currencies that can be paid out, each with its smallest payout;
    /// below it the balance carries over to the next period.
    #[serde(deserialize_with = "exact_map")]
    pub minimum_payout: BTreeMap<String, Decimal>,
    /// Per currency: the largest single earning accepted at intake, so bad
    /// or malicious input cannot create an unpayable balance. A currency not
    /// listed has no maximum.
    #[serde(default, deserialize_with = "exact_map")]
    pub maximum_earning: BTreeMap<String, Decimal>,
    /// Per currency: the largest payout settlement makes; a period that
    /// would pay more is not settled (an error, counted) until an operator
    /// looks. A currency not listed has no maximum.
    #[serde(default, deserialize_with = "exact_map")]
    pub maximum_payout: BTreeMap<String, Decimal>,
    /// Earnings completed more than this many days before they are posted
    /// are refused (a mistyped year must not be payable at once).
    #[serde(default = "default_horizon")]
    pub earning_horizon_days: u32,
    /// Per currency: the step every payout amount is a multiple of, because
    /// the gateway cannot send less (Stripe: whole HUF and TWD, hundredths of
    /// a three-decimal currency). Not read from the file: set for the
    /// configured gateway with [`Policy::with_payout_increment`]. A currency
    /// not listed is paid to its minor unit.
    #[serde(skip)]
    pub payout_increment: BTreeMap<String, Decimal>,
}

fn default_horizon() -> u32 {
    90
}

/// Deserializes an exact decimal from a TOML string or integer; a float is
/// refused, because it has already lost exactness.
fn exact<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    Exact::deserialize(d).map(|e| e.0)
}

fn exact_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Decimal>, D::Error> {
    let m = BTreeMap::<String, Exact>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}

struct Exact(Decimal);

impl<'de> Deserialize<'de> for Exact {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Exact;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an exact decimal as a string, such as \"0.25\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Exact, E> {
                Decimal::from_str_exact(s.trim())
                    .map(Exact)
                    .map_err(|_| E::custom(format!("{s:?} is not a decimal number")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Exact, E> {
                Ok(Exact(Decimal::from(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Exact, E> {
                Ok(Exact(Decimal::from(v)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Exact, E> {
                Err(E::custom(format!(
                    "{v} is a float; write amounts and percentages as strings, such as \"{v}\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// One earning going into a settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarningLine {
    /// The earning's id.
    pub id: i64,
    /// Its gross amount, in the settlement's currency.
    pub gross: Decimal,
    /// What to show (e.g. `booking/B-1042`).
    pub label: String,
}

/// One agreed deduction (booth rent, supply fee, ...), per period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeductionLine {
    /// What it is (`booth rent`).
    pub label: String,
    /// How much, positive.
    pub amount: Decimal,
}

/// A balance carried over from an earlier period that paid nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedLine {
    /// The settlement it comes from.
    pub settlement_id: i64,
    /// The balance: positive (below the minimum) or negative or zero (shortfall).
    pub amount: Decimal,
    /// The gross of that settlement (and of what it carried), which has not borne a fee yet.
    pub gross: Decimal,
    /// What to show.
    pub label: String,
}

/// Everything one settlement is computed from.
#[derive(Debug, Clone)]
pub struct SettlementInput {
    /// The currency of every amount here.
    pub currency: Currency,
    /// The period's earnings (none only when a returned balance is carried in).
    pub earnings: Vec<EarningLine>,
    /// The payee's deductions in this currency.
    pub deductions: Vec<DeductionLine>,
    /// Balances carried over, not yet paid.
    pub carried: Vec<CarriedLine>,
    /// How the payee is paid.
    pub method: PayoutMethod,
}

/// What a line of a settlement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// One earning's gross (positive).
    Earning,
    /// The platform's commission (negative).
    Commission,
    /// The volume bonus (positive).
    VolumeBonus,
    /// An agreed deduction (negative).
    Deduction,
    /// A balance carried over from an earlier period (either sign).
    CarriedIn,
    /// The gateway's fee (negative).
    Fee,
    /// The part of the payable net the gateway cannot send (below its payout
    /// increment, [`Policy::payout_increment`]): kept in the balance (negative).
    CarriedOut,
}

impl LineKind {
    /// The name stored in `payout_lines.kind`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LineKind::Earning => "earning",
            LineKind::Commission => "commission",
            LineKind::VolumeBonus => "volume_bonus",
            LineKind::Deduction => "deduction",
            LineKind::CarriedIn => "carried_in",
            LineKind::Fee => "fee",
            LineKind::CarriedOut => "carried_out",
        }
    }
}

/// One line of a settlement: the amounts sum to its net.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    /// What it is.
    pub kind: LineKind,
    /// Human text.
    pub description: String,
    /// Signed amount, at the currency's minor unit.
    pub amount: Decimal,
    /// The earning, for earning lines.
    pub earning_id: Option<i64>,
    /// The earlier settlement, for carried-in lines.
    pub carried_from: Option<i64>,
}

/// Why a settlement paid nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// A payout of `net`.
    Payout,
    /// Positive but below the minimum (after the fee): carried over.
    BelowMinimum {
        /// The currency's minimum payout.
        minimum: Decimal,
    },
    /// Deductions exceed the share: the (non-positive) balance carries over.
    Shortfall,
}

impl Outcome {
    /// The name stored in `settlements.outcome` and shown.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Payout => "payout",
            Outcome::BelowMinimum { .. } => "below_minimum",
            Outcome::Shortfall => "shortfall",
        }
    }
}

/// The computed settlement of one payee, currency and period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settlement {
    /// The currency.
    pub currency: Currency,
    /// Earnings (services) in the period.
    pub services: usize,
    /// Their gross.
    pub gross: Decimal,
    /// The payee's tier percentage (before any bonus).
    pub payee_percent: Decimal,
    /// Bonus percentage points (0 when none).
    pub bonus_percent: Decimal,
    /// The payee's share: tier line plus bonus line.
    pub payee_share: Decimal,
    /// What the platform keeps: gross minus the payee's share.
    pub platform_commission: Decimal,
    /// Sum of the deductions.
    pub deductions: Decimal,
    /// Sum of the balances carried in.
    pub carried_in: Decimal,
    /// Gross carried in that has not borne a fee.
    pub carried_gross_in: Decimal,
    /// The gateway fee (0 when nothing is paid out).
    pub fee: Decimal,
    /// Sum of the lines: the payout's amount, or the balance carried over.
    pub net: Decimal,
    /// With a payout: the part of the payable net the gateway cannot send
    /// (below [`Policy::payout_increment`]), which stays in the payee's
    /// balance for the next period (0 otherwise). Money is conserved:
    /// `gross + carried_in = net + carried_out + platform + fee + deductions`.
    pub carried_out: Decimal,
    /// Payout or carry-over.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The payout method the fee was computed for.
    pub method: PayoutMethod,
    /// Line by line, in order.
    pub lines: Vec<Line>,
}

impl Settlement {
    /// Whether a payout is made.
    pub fn pays_out(&self) -> bool {
        self.outcome == Outcome::Payout
    }
}

fn pct(p: Decimal) -> String {
    format!("{}%", p.normalize())
}

fn at_scale(mut d: Decimal, exp: u32) -> Decimal {
    d.rescale(exp);
    if d.is_zero() {
        d.set_sign_positive(true); // never "-0.00"
    }
    d
}

fn check_amount(field: &str, amount: Decimal, currency: Currency) -> Result<(), PolicyError> {
    if amount.normalize().scale() > currency.exponent() {
        return Err(err(
            field,
            format!(
                "{amount} has more decimals than {currency} allows ({})",
                currency.exponent()
            ),
        ));
    }
    Ok(())
}

fn check_percent(field: &str, p: Decimal, max: Decimal) -> Result<(), PolicyError> {
    if p < Decimal::ZERO {
        return Err(err(field, format!("must not be negative (got {p})")));
    }
    if p > max {
        return Err(err(field, format!("must be at most {max} (got {p})")));
    }
    Ok(())
}

fn currency_of(field: &str, code: &str) -> Result<Currency, PolicyError> {
    code.parse::<Currency>()
        .map_err(|e| err(format!("{field}.{code}"), e.to_string()))
}

/// Reads a policy file's text: parse (with the line of a syntax or type
/// error), then [`Policy::validate`].
impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span() {
                // The line and its text, which names the key (toml does not say it).
                Some(s) => {
                    let n = text.get(..s.start).unwrap_or(text).matches('\n').count();
                    let line = text.lines().nth(n).unwrap_or("").trim();
                    err(format!("line {} ({line})", n + 1), message)
                }
                None => err("policy", message),
            }
        })?;
        policy.validate()?;
        Ok(policy)
    }
}

impl Policy {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let hundred = Decimal::ONE_HUNDRED;
        if self.hold_days > 365 {
            return Err(err("hold_days", "must be at most 365"));
        }
        if self.minimum_payout.is_empty() {
            return Err(err(
                "minimum_payout",
                "must list at least one currency (e.g. USD = \"25.00\")",
            ));
        }
        for (code, min) in &self.minimum_payout {
            let field = format!("minimum_payout.{code}");
            let c = currency_of("minimum_payout", code)?;
            if *min < Decimal::ZERO {
                return Err(err(field, format!("must not be negative (got {min})")));
            }
            check_amount(&field, *min, c)?;
        }
        if !(1..=3650).contains(&self.earning_horizon_days) {
            return Err(err("earning_horizon_days", "must be between 1 and 3650"));
        }
        for (name, map) in [
            ("maximum_earning", &self.maximum_earning),
            ("maximum_payout", &self.maximum_payout),
        ] {
            for (code, max) in map {
                let field = format!("{name}.{code}");
                let c = currency_of(name, code)?;
                if *max <= Decimal::ZERO {
                    return Err(err(field, format!("must be greater than 0 (got {max})")));
                }
                check_amount(&field, *max, c)?;
                if name == "maximum_payout" {
                    if let Some(min) = self.minimum_payout.get(code).filter(|m| *m > max) {
                        return Err(err(
                            field,
                            format!("{max} is below minimum_payout.{code} ({min})"),
                        ));
                    }
                }
            }
        }
        let top_payee_percent = match &self.commission {
            Commission::Flat { platform_percent } => {
                check_percent("commission.platform_percent", *platform_percent, hundred)?;
                hundred - platform_percent
            }
            Commission::Tiered { tiers } => {
                if tiers.is_empty() {
                    return Err(err("commission.tiers", "must have at least one tier"));
                }
                let mut top = Decimal::ZERO;
                for (i, t) in tiers.iter().enumerate() {
                    let f = |name: &str| format!("commission.tiers[{i}].{name}");
                    check_percent(&f("payee_percent"), t.payee_percent, hundred)?;
                    if t.payee_percent.is_zero() {
                        return Err(err(f("payee_percent"), "must be greater than 0"));
                    }
                    top = top.max(t.payee_percent);
                    if let Some(max) = t.max_services {
                        if max < t.min_services {
                            return Err(err(
                                f("max_services"),
                                format!("{max} is below min_services {}", t.min_services),
                            ));
                        }
                    }
                    if i == 0 {
                        if t.min_services > 1 {
                            return Err(err(
                                f("min_services"),
                                format!(
                                    "the first tier must start at 0 or 1 (got {}): fewer services would have no tier",
                                    t.min_services
                                ),
                            ));
                        }
                        continue;
                    }
                    let prev = &tiers[i - 1];
                    let Some(prev_max) = prev.max_services else {
                        return Err(err(
                            format!("commission.tiers[{}].max_services", i - 1),
                            "missing, but another tier follows (only the last tier is open-ended)",
                        ));
                    };
                    let range = |t: &Tier| match t.max_services {
                        Some(m) => format!("{}..={m}", t.min_services),
                        None => format!("{}..", t.min_services),
                    };
                    if t.min_services <= prev_max {
                        return Err(err(
                            f("min_services"),
                            format!(
                                "tier {} overlaps tiers[{}] ({}): tiers must be in order and not overlap",
                                range(t),
                                i - 1,
                                range(prev)
                            ),
                        ));
                    }
                    if t.min_services > prev_max + 1 {
                        return Err(err(
                            f("min_services"),
                            format!(
                                "gap: no tier covers {}..={}",
                                prev_max + 1,
                                t.min_services - 1
                            ),
                        ));
                    }
                }
                let last = tiers.len() - 1;
                if tiers[last].max_services.is_some() {
                    return Err(err(
                        format!("commission.tiers[{last}].max_services"),
                        "the last tier must be open-ended (no max_services), or more services would have no tier",
                    ));
                }
                top
            }
        };
        if let Some(b) = &self.volume_bonus {
            check_percent("volume_bonus.payee_percent", b.payee_percent, hundred)?;
            if top_payee_percent + b.payee_percent > hundred {
                return Err(err(
                    "volume_bonus.payee_percent",
                    format!(
                        "{} plus the highest payee percentage {} exceeds 100",
                        b.payee_percent, top_payee_percent
                    ),
                ));
            }
            for (code, above) in &b.gross_above {
                let field = format!("volume_bonus.gross_above.{code}");
                let c = currency_of("volume_bonus.gross_above", code)?;
                if *above <= Decimal::ZERO {
                    return Err(err(field, format!("must be greater than 0 (got {above})")));
                }
                check_amount(&field, *above, c)?;
            }
        }
        if !self.fees.contains_key(&PayoutMethod::Standard) {
            return Err(err(
                "fees.standard",
                "missing (standard is every payee's default payout method)",
            ));
        }
        for (method, fee) in &self.fees {
            let f = |name: &str| format!("fees.{method}.{name}");
            check_percent(&f("percent"), fee.percent, hundred)?;
            if fee.percent >= hundred {
                return Err(err(f("percent"), "must be below 100"));
            }
            for (code, fixed) in &fee.fixed {
                let field = format!("fees.{method}.fixed.{code}");
                let c = currency_of(&f("fixed"), code)?;
                if *fixed < Decimal::ZERO {
                    return Err(err(field, format!("must not be negative (got {fixed})")));
                }
                check_amount(&field, *fixed, c)?;
            }
            for code in self.minimum_payout.keys() {
                if !fee.fixed.contains_key(code) {
                    return Err(err(
                        format!("fees.{method}.fixed.{code}"),
                        "missing (every currency in minimum_payout needs a fixed fee, \"0\" for none)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// When an earning completed at `completed_at` becomes payable.
    pub fn release_at(
        &self,
        completed_at: chrono::DateTime<chrono::Utc>,
    ) -> chrono::DateTime<chrono::Utc> {
        completed_at + chrono::Duration::days(i64::from(self.hold_days))
    }

    /// The smallest payout in `currency`; `None` when the policy does not pay that currency.
    pub fn minimum(&self, currency: Currency) -> Option<Decimal> {
        self.minimum_payout.get(currency.code()).copied()
    }

    /// The largest single earning accepted in `currency`, if limited.
    pub fn maximum_earning(&self, currency: Currency) -> Option<Decimal> {
        self.maximum_earning.get(currency.code()).copied()
    }

    /// The largest payout in `currency`, if limited.
    pub fn maximum_payout(&self, currency: Currency) -> Option<Decimal> {
        self.maximum_payout.get(currency.code()).copied()
    }

    /// Checks a payee's own minimum payout: a payable currency, its scale,
    /// at or above the policy's minimum (and at most its maximum payout).
    pub fn check_payee_minimum(
        &self,
        amount: Decimal,
        currency: Currency,
    ) -> Result<(), PolicyError> {
        let code = currency.code();
        let field = "minimum_payout";
        let Some(floor) = self.minimum(currency) else {
            return Err(err(field, format!("the policy does not pay out {code}")));
        };
        check_amount(field, amount, currency)?;
        if amount < floor {
            return Err(err(
                field,
                format!("{amount} {code} is below the policy's minimum payout of {floor} {code}"),
            ));
        }
        if let Some(max) = self.maximum_payout(currency).filter(|m| amount > *m) {
            return Err(err(
                field,
                format!("{amount} {code} is above the policy's maximum payout of {max} {code}"),
            ));
        }
        Ok(())
    }

    /// Rounds `v` once to the minor unit of `currency`, with the policy's midpoint rule.
    pub fn round(&self, v: Decimal, currency: Currency) -> Decimal {
        at_scale(
            v.round_dp_with_strategy(currency.exponent(), self.rounding.strategy()),
            currency.exponent(),
        )
    }

    /// The payee's tier percentage for `services` services in a period.
    pub fn payee_percent(&self, services: usize) -> Decimal {
        match &self.commission {
            Commission::Flat { platform_percent } => Decimal::ONE_HUNDRED - platform_percent,
            Commission::Tiered { tiers } => {
                let n = u32::try_from(services).unwrap_or(u32::MAX);
                tiers
                    .iter()
                    .rev()
                    .find(|t| t.min_services <= n)
                    .unwrap_or(&tiers[0])
                    .payee_percent
            }
        }
    }

    /// Computes one settlement: every line, the net, payout or carry-over.
    /// Fails only when the policy does not cover the currency or method, or an
    /// input amount is not a valid amount of the currency.
    pub fn compute(&self, input: &SettlementInput) -> Result<Settlement, PolicyError> {
        self.compute_with_minimum(input, None)
    }

    /// This policy with payouts in `currency` rounded down to multiples of
    /// `step` (e.g. 1 for HUF through Stripe); the rest stays in the balance.
    pub fn with_payout_increment(mut self, currency: Currency, step: Decimal) -> Self {
        if step > Decimal::ZERO {
            self.payout_increment
                .insert(currency.code().to_string(), step.normalize());
        }
        self
    }

    /// The step payouts in `currency` are multiples of, when the gateway needs one.
    pub fn payout_increment(&self, currency: Currency) -> Option<Decimal> {
        self.payout_increment.get(currency.code()).copied()
    }

    /// [`Policy::compute`] with the payee's own minimum payout, when it has
    /// one above the currency's.
    pub fn compute_with_minimum(
        &self,
        input: &SettlementInput,
        payee_minimum: Option<Decimal>,
    ) -> Result<Settlement, PolicyError> {
        let cur = input.currency;
        let exp = cur.exponent();
        let code = cur.code();
        let minimum = self.minimum(cur).ok_or_else(|| {
            err(
                format!("minimum_payout.{code}"),
                format!("the policy does not pay out {code}"),
            )
        })?;
        let minimum = payee_minimum.map_or(minimum, |m| m.max(minimum));
        let fee_rule = self.fees.get(&input.method).ok_or_else(|| {
            err(
                format!("fees.{}", input.method),
                "missing: the policy has no fee for this payout method",
            )
        })?;
        if input.earnings.is_empty() && input.carried.is_empty() {
            return Err(err(
                "earnings",
                "a settlement needs at least one earning or carried balance",
            ));
        }
        let overflow = || err("earnings", "the total is too large");
        let mut lines = Vec::with_capacity(input.earnings.len() + input.deductions.len() + 5);
        let mut gross = Decimal::ZERO;
        for e in &input.earnings {
            if e.gross <= Decimal::ZERO {
                return Err(err(
                    format!("earning {}", e.id),
                    format!("gross {} must be greater than zero", e.gross),
                ));
            }
            check_amount(&format!("earning {}", e.id), e.gross, cur)?;
            gross = gross.checked_add(e.gross).ok_or_else(overflow)?;
            lines.push(Line {
                kind: LineKind::Earning,
                description: e.label.clone(),
                amount: at_scale(e.gross, exp),
                earning_id: Some(e.id),
                carried_from: None,
            });
        }
        let services = input.earnings.len();
        let payee_percent = self.payee_percent(services);
        let base_share = self.round(
            gross.checked_mul(payee_percent).ok_or_else(overflow)? / Decimal::ONE_HUNDRED,
            cur,
        );
        let commission = gross - base_share;
        // A period of returned balances only has no commission line.
        if services > 0 {
            lines.push(Line {
                kind: LineKind::Commission,
                description: format!(
                    "platform commission {} (payee keeps {}, {services} services)",
                    pct(Decimal::ONE_HUNDRED - payee_percent),
                    pct(payee_percent)
                ),
                amount: at_scale(-commission, exp),
                earning_id: None,
                carried_from: None,
            });
        }
        let mut bonus_percent = Decimal::ZERO;
        let mut bonus = Decimal::ZERO;
        if let Some(b) = &self.volume_bonus {
            if let Some(above) = b.gross_above.get(code) {
                if gross > *above && !b.payee_percent.is_zero() {
                    bonus_percent = b.payee_percent;
                    bonus = self.round(gross * bonus_percent / Decimal::ONE_HUNDRED, cur);
                    lines.push(Line {
                        kind: LineKind::VolumeBonus,
                        description: format!(
                            "volume bonus +{} (gross above {} {code})",
                            pct(bonus_percent),
                            at_scale(*above, exp)
                        ),
                        amount: bonus,
                        earning_id: None,
                        carried_from: None,
                    });
                }
            }
        }
        let payee_share = base_share + bonus;
        let mut deductions = Decimal::ZERO;
        for d in &input.deductions {
            if d.amount <= Decimal::ZERO {
                return Err(err(
                    format!("deduction {:?}", d.label),
                    format!("amount {} must be greater than zero", d.amount),
                ));
            }
            check_amount(&format!("deduction {:?}", d.label), d.amount, cur)?;
            deductions += d.amount;
            lines.push(Line {
                kind: LineKind::Deduction,
                description: d.label.clone(),
                amount: at_scale(-d.amount, exp),
                earning_id: None,
                carried_from: None,
            });
        }
        let mut carried_in = Decimal::ZERO;
        let mut carried_gross_in = Decimal::ZERO;
        for c in &input.carried {
            check_amount(
                &format!("carried from settlement {}", c.settlement_id),
                c.amount,
                cur,
            )?;
            carried_in += c.amount;
            carried_gross_in += c.gross;
            lines.push(Line {
                kind: LineKind::CarriedIn,
                description: c.label.clone(),
                amount: at_scale(c.amount, exp),
                earning_id: None,
                carried_from: Some(c.settlement_id),
            });
        }
        let before_fee = payee_share - deductions + carried_in;
        let fee_base = gross + carried_gross_in;
        let fixed = fee_rule.fixed.get(code).copied().ok_or_else(|| {
            err(
                format!("fees.{}.fixed.{code}", input.method),
                "missing: no fixed fee for this currency",
            )
        })?;
        let fee = self.round(fee_base * fee_rule.percent / Decimal::ONE_HUNDRED, cur) + fixed;
        let payable = before_fee - fee;
        // What the gateway can send: rounded down to its payout increment;
        // the rest stays in the balance.
        let paid_net = match self.payout_increment(cur) {
            Some(step) if payable > Decimal::ZERO => (payable / step).floor() * step,
            _ => payable,
        };
        let carried_out = payable - paid_net;
        let (outcome, fee, net) = if paid_net > Decimal::ZERO && paid_net >= minimum {
            lines.push(Line {
                kind: LineKind::Fee,
                description: format!(
                    "{} payout fee {} of {} + {}",
                    input.method,
                    pct(fee_rule.percent),
                    at_scale(fee_base, exp),
                    at_scale(fixed, exp)
                ),
                amount: at_scale(-fee, exp),
                earning_id: None,
                carried_from: None,
            });
            if !carried_out.is_zero() {
                lines.push(Line {
                    kind: LineKind::CarriedOut,
                    description: format!(
                        "kept in the balance: the gateway pays {code} out in steps of {}",
                        self.payout_increment(cur).unwrap_or_default()
                    ),
                    amount: at_scale(-carried_out, exp),
                    earning_id: None,
                    carried_from: None,
                });
            }
            (Outcome::Payout, fee, paid_net)
        } else if before_fee > Decimal::ZERO {
            (Outcome::BelowMinimum { minimum }, Decimal::ZERO, before_fee)
        } else {
            (Outcome::Shortfall, Decimal::ZERO, before_fee)
        };
        Ok(Settlement {
            currency: cur,
            services,
            gross: at_scale(gross, exp),
            payee_percent,
            bonus_percent,
            payee_share: at_scale(payee_share, exp),
            platform_commission: at_scale(gross - payee_share, exp),
            deductions: at_scale(deductions, exp),
            carried_in: at_scale(carried_in, exp),
            carried_gross_in: at_scale(carried_gross_in, exp),
            fee: at_scale(fee, exp),
            net: at_scale(net, exp),
            carried_out: at_scale(
                if outcome == Outcome::Payout {
                    carried_out
                } else {
                    Decimal::ZERO
                },
                exp,
            ),
            outcome,
            method: input.method,
            lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in `config/policy.toml` (and the README).
    fn example() -> Policy {
        include_str!("../../config/policy.toml").parse().unwrap()
    }

    fn usd() -> Currency {
        "USD".parse().unwrap()
    }

    fn earnings(amounts: &[&str]) -> Vec<EarningLine> {
        amounts
            .iter()
            .enumerate()
            .map(|(i, a)| EarningLine {
                id: i as i64 + 1,
                gross: a.parse().unwrap(),
                label: format!("booking/{}", i + 1),
            })
            .collect()
    }

    fn input(e: Vec<EarningLine>, deductions: &[(&str, &str)]) -> SettlementInput {
        SettlementInput {
            currency: usd(),
            earnings: e,
            deductions: deductions
                .iter()
                .map(|(l, a)| DeductionLine {
                    label: l.to_string(),
                    amount: a.parse().unwrap(),
                })
                .collect(),
            carried: vec![],
            method: PayoutMethod::Standard,
        }
    }

    /// The example with HUF paid out (minimum 1000, fixed fee 100).
    fn with_huf() -> Policy {
        let mut p = example();
        p.minimum_payout
            .insert("HUF".into(), "1000".parse().unwrap());
        for fee in p.fees.values_mut() {
            fee.fixed.insert("HUF".into(), "100".parse().unwrap());
        }
        p
    }

    fn in_currency(code: &str, amounts: &[&str]) -> SettlementInput {
        let mut i = input(earnings(amounts), &[]);
        i.currency = code.parse().unwrap();
        i
    }

    fn conserved(s: &Settlement) {
        assert_eq!(
            s.gross + s.carried_in,
            s.net + s.carried_out + s.platform_commission + s.fee + s.deductions,
            "{s:?}"
        );
        assert_eq!(s.lines.iter().map(|l| l.amount).sum::<Decimal>(), s.net);
    }

    #[test]
    fn a_huf_payout_through_stripe_is_whole_forints_and_the_rest_stays_in_the_balance() {
        let i = in_currency("HUF", &["1234.50", "2000.25"]);
        let iso = with_huf().compute(&i).unwrap();
        assert!(!iso.net.fract().is_zero(), "{}", iso.net);
        let stripe = with_huf()
            .with_payout_increment("HUF".parse().unwrap(), Decimal::ONE)
            .compute(&i)
            .unwrap();
        assert!(stripe.pays_out());
        assert_eq!(stripe.net, iso.net.floor());
        assert_eq!(stripe.carried_out, iso.net - iso.net.floor());
        assert_eq!(stripe.fee, iso.fee, "the fee does not change");
        assert_eq!(stripe.lines.last().unwrap().kind, LineKind::CarriedOut);
        conserved(&stripe);
        conserved(&iso);
        assert_eq!(iso.carried_out, Decimal::ZERO);
    }

    #[test]
    fn a_three_decimal_payout_through_stripe_ends_in_zero_and_usd_is_untouched() {
        let p = example().with_payout_increment("BHD".parse().unwrap(), Decimal::new(1, 2));
        let s = p
            .compute(&in_currency("BHD", &["40.001", "30.333"]))
            .unwrap();
        assert!(s.pays_out());
        assert!(
            (s.net * Decimal::ONE_HUNDRED).fract().is_zero(),
            "{}",
            s.net
        );
        assert!(s.carried_out < Decimal::new(1, 2) && s.carried_out >= Decimal::ZERO);
        conserved(&s);
        let usd = p
            .compute(&input(earnings(&["19.99", "33.33"]), &[]))
            .unwrap();
        assert_eq!(usd.carried_out, Decimal::ZERO);
        assert_eq!(
            usd,
            example()
                .compute(&input(earnings(&["19.99", "33.33"]), &[]))
                .unwrap()
        );
    }

    #[test]
    fn rounded_down_below_the_minimum_nothing_is_paid_and_everything_carries() {
        let p = with_huf().with_payout_increment("HUF".parse().unwrap(), Decimal::ONE);
        // The payable net is just above the 1000 minimum, but its whole part is not.
        let mut i = in_currency("HUF", &[]);
        i.carried = vec![CarriedLine {
            settlement_id: 9,
            amount: "1100.50".parse().unwrap(),
            gross: Decimal::ZERO,
            label: "carried".into(),
        }];
        let s = p.compute(&i).unwrap();
        assert_eq!(s.outcome, Outcome::Payout, "1000.50 payable, 1000 sent");
        assert_eq!(
            (s.net, s.carried_out),
            ("1000".parse().unwrap(), "0.50".parse().unwrap())
        );
        i.carried[0].amount = "1100.20".parse().unwrap();
        i.carried[0].amount -= Decimal::new(1, 0);
        let s = p.compute(&i).unwrap();
        assert_eq!(
            s.outcome,
            Outcome::BelowMinimum {
                minimum: "1000".parse().unwrap()
            }
        );
        assert_eq!(s.carried_out, Decimal::ZERO);
        conserved(&s);
    }

    #[test]
    fn the_product_documents_worked_example_nets_667_25() {
        // 51 services (the 72% tier) grossing 1,000.00, booth rent 50.00, standard fee.
        let mut amounts = vec!["19.60"; 50];
        amounts.push("20.00");
        let s = example()
            .compute(&input(earnings(&amounts), &[("booth rent", "50.00")]))
            .unwrap();
        assert_eq!(s.gross, Decimal::new(100000, 2));
        assert_eq!(s.payee_percent, Decimal::from(72));
        assert_eq!(s.payee_share, Decimal::new(72000, 2));
        assert_eq!(s.fee, Decimal::new(275, 2));
        assert_eq!(s.net, Decimal::new(66725, 2));
        assert!(s.pays_out());
        let sum: Decimal = s.lines.iter().map(|l| l.amount).sum();
        assert_eq!(sum, s.net);
        assert_eq!(
            s.gross,
            s.net + s.platform_commission + s.fee + s.deductions
        );
    }

    #[test]
    fn tiers_pick_the_payee_percentage_by_services() {
        let p = example();
        assert_eq!(p.payee_percent(1), Decimal::from(70));
        assert_eq!(p.payee_percent(50), Decimal::from(70));
        assert_eq!(p.payee_percent(51), Decimal::from(72));
        assert_eq!(p.payee_percent(100), Decimal::from(72));
        assert_eq!(p.payee_percent(101), Decimal::from(75));
    }

    #[test]
    fn the_volume_bonus_adds_points_to_the_payee_share_above_the_threshold() {
        let s = example()
            .compute(&input(earnings(&["10000.01"]), &[]))
            .unwrap();
        assert_eq!(s.bonus_percent, Decimal::from(2));
        // 70% of 10,000.01 = 7000.007 -> 7000.01; 2% = 200.0002 -> 200.00
        assert_eq!(s.payee_share, Decimal::new(720001, 2));
        let at = example()
            .compute(&input(earnings(&["10000.00"]), &[]))
            .unwrap();
        assert_eq!(at.bonus_percent, Decimal::ZERO, "exceeds, not equals");
    }

    #[test]
    fn midpoints_round_half_even_once_per_line() {
        // 70% of 0.25 = 0.175 -> 0.18 (even); 70% of 0.35 = 0.245 -> 0.24 (even)
        let p = example();
        assert_eq!(
            p.round("0.175".parse().unwrap(), usd()),
            Decimal::new(18, 2)
        );
        assert_eq!(
            p.round("0.245".parse().unwrap(), usd()),
            Decimal::new(24, 2)
        );
        let mut up = p.clone();
        up.rounding = Rounding::HalfUp;
        assert_eq!(
            up.round("0.245".parse().unwrap(), usd()),
            Decimal::new(25, 2)
        );
    }

    #[test]
    fn below_the_minimum_nothing_is_paid_and_no_fee_is_charged() {
        let s = example()
            .compute(&input(earnings(&["20.00"]), &[]))
            .unwrap();
        assert_eq!(
            s.outcome,
            Outcome::BelowMinimum {
                minimum: Decimal::new(2500, 2)
            }
        );
        assert_eq!(s.net, Decimal::new(1400, 2));
        assert_eq!(s.fee, Decimal::ZERO);
        assert!(s.lines.iter().all(|l| l.kind != LineKind::Fee));
    }

    #[test]
    fn deductions_above_the_share_carry_a_shortfall_never_a_negative_payout() {
        let s = example()
            .compute(&input(earnings(&["50.00"]), &[("booth rent", "50.00")]))
            .unwrap();
        assert_eq!(s.outcome, Outcome::Shortfall);
        assert_eq!(s.net, Decimal::new(-1500, 2));
        assert_eq!(
            s.gross,
            s.net + s.platform_commission + s.fee + s.deductions
        );
    }

    fn bad(text: &str) -> String {
        text.parse::<Policy>().unwrap_err().to_string()
    }

    fn example_with(from: &str, to: &str) -> String {
        let text = include_str!("../../config/policy.toml");
        assert!(text.contains(from), "{from}");
        text.replacen(from, to, 1)
    }

    #[test]
    fn a_bad_policy_is_refused_with_the_field_named() {
        let e = bad(&example_with("min_services = 51", "min_services = 40"));
        assert!(
            e.starts_with("commission.tiers[1].min_services: tier 40..=100 overlaps"),
            "{e}"
        );
        let e = bad(&example_with("min_services = 51", "min_services = 60"));
        assert!(e.contains("commission.tiers[1].min_services: gap"), "{e}");
        let e = bad(&example_with("percent = \"0.25\"", "percent = \"-0.25\""));
        assert!(
            e.starts_with("fees.standard.percent: must not be negative"),
            "{e}"
        );
        let e = bad(&example_with("percent = \"0.25\"", "percent = 0.25"));
        assert!(e.contains("float") && e.starts_with("line "), "{e}");
        let e = bad(&example_with("USD = \"25.00\"", "USD = \"25.001\""));
        assert!(
            e.starts_with("minimum_payout.USD: 25.001 has more decimals"),
            "{e}"
        );
        let e = bad(&example_with(
            "USD = \"25.00\"",
            "USD = \"25.00\"\nXXX = \"1\"",
        ));
        assert!(e.starts_with("minimum_payout.XXX: unknown currency"), "{e}");
        let e = bad(&example_with("hold_days = 7", "hold_days = 7\nholdays = 3"));
        assert!(e.contains("unknown field `holdays`"), "{e}");
        let e = bad(&example_with("hold_days = 7", "hold_days = -1"));
        assert!(e.starts_with("line "), "{e}");
    }

    #[test]
    fn a_flat_platform_commission_leaves_the_rest_to_the_payee() {
        let text = r#"
            hold_days = 0
            default_schedule = "monthly:1"
            [commission]
            basis = "flat"
            platform_percent = "20"
            [fees.standard]
            percent = "0"
            fixed = { USD = "0" }
            [minimum_payout]
            USD = "25.00"
        "#;
        let p: Policy = text.parse().unwrap();
        let s = p
            .compute(&input(earnings(&["100.00", "33.33"]), &[]))
            .unwrap();
        // 80% of 133.33 = 106.664 -> 106.66
        assert_eq!(s.net, Decimal::new(10666, 2));
        assert_eq!(s.platform_commission, Decimal::new(2667, 2));
    }
}

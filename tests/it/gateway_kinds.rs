//! Every gateway kind end to end against local stand-ins: the release-funds
//! contract as `mock-gateway` serves it (a driver not onboarded is held and
//! released, a platform balance short is retried, never failed), and
//! reconciliation and the in-transit poll through the configured kind
//! (`contract`, `release_funds`, `stripe`). A reconciliation in which every
//! look-up failed is a failed run: its own exit code, and no fresh timestamp
//! for `PayoutReconcileStale` to read. Real Postgres and Redis; every server
//! on 127.0.0.1:0.

use crate::common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::HeaderMap,
    response::IntoResponse,
    routing::get,
};
use chrono::Utc;
use common::{Ctl, Fleet};
use payouts::{
    clock::SystemClock,
    config::Settings,
    domain::PayoutStatus,
    gateway::{Outcome, TransferRequest, select},
    testkit::mock_gateway::{Faults, MockGateway, MockGatewayConfig},
    worker::{Step, Worker},
};
use serde_json::{Value, json};

/// A port nothing listens on: the contract address of a fleet configured for
/// another kind (it must never be asked).
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// The settings that point `kind = "release_funds"` at a mock gateway's
/// release-funds routes (and the contract address nowhere).
fn release_env(base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PAYOUTS_GATEWAY__KIND", "release_funds".into()),
        ("PAYOUTS_GATEWAY__BASE_URL", dead_url()),
        ("PAYOUTS_GATEWAY__RELEASE_FUNDS__BASE_URL", base.into()),
        (
            "PAYOUTS_GATEWAY__RELEASE_FUNDS__LOOKUP_ENDPOINT",
            "/api/Payment/transfers".into(),
        ),
        (
            "PAYOUTS_GATEWAY__RELEASE_FUNDS__ACCOUNT_ENDPOINT",
            "/api/Payment/accounts/{account}".into(),
        ),
        (
            "PAYOUTS_GATEWAY__RELEASE_FUNDS__SECRET",
            "sk_test_mock".into(),
        ),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A fleet whose gateway is `mock-gateway`'s release-funds API.
async fn release_fleet(faults: Faults) -> Fleet {
    let fleet = Fleet::start_with(faults, &[], Arc::new(SystemClock)).await;
    let env = release_env(&fleet.gateway.base_url);
    let settings = common::settings(
        &fleet.db.url,
        &common::redis_url(),
        &fleet.prefix,
        &fleet.gateway.base_url,
        &borrowed(&env),
    );
    Fleet { settings, ..fleet }
}

fn worker_on(fleet: &Fleet) -> Arc<Worker> {
    fleet.worker_on(&fleet.settings, "worker:kinds")
}

async fn due_payout(fleet: &Fleet, account: &str) -> i64 {
    (fleet.due_payout(account).await).get()
}

async fn failure(fleet: &Fleet, id: i64) -> (Option<String>, Option<String>) {
    sqlx::query_as("SELECT failure_code, failure_message FROM payouts WHERE id = $1")
        .bind(id)
        .fetch_one(fleet.pool())
        .await
        .unwrap()
}

fn request(id: i64, destination: &str) -> TransferRequest {
    TransferRequest {
        amount_minor: 12_050,
        currency: "USD".into(),
        destination: destination.into(),
        reference: format!("payout_{id}"),
        metadata: Default::default(),
        idempotency_key: format!("payout_{id}"),
        first_attempt: false,
        key_index: 0,
    }
}

// --- release-funds through mock-gateway ----------------------------------------------

#[tokio::test]
async fn release_funds_holds_a_driver_not_onboarded_and_releases_it_once_the_api_reports_the_account_ready()
 {
    let fleet = release_fleet(Faults {
        not_onboarded_destinations: vec!["acct_new_driver".into()],
        ..Default::default()
    })
    .await;
    let worker = worker_on(&fleet);
    let id = due_payout(&fleet, "acct_new_driver").await;
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Held)
    );
    let (code, message) = failure(&fleet, id).await;
    assert_eq!(code.as_deref(), Some(payouts::gateway::NOT_ONBOARDED));
    assert!(
        message
            .as_deref()
            .unwrap_or("")
            .contains("driver_not_onboarded"),
        "the API's own code is kept in the message: {message:?}"
    );
    assert!(fleet.gateway.ledger().is_empty(), "no money moved");

    let sync = payouts::producer::in_transit_sync(
        &fleet.settings,
        fleet.pool().clone(),
        fleet.queue.conn(),
        "t",
    )
    .expect("poll from configuration");
    assert_eq!(
        sync.release_onboarded().await.unwrap(),
        0,
        "still onboarding"
    );
    assert_eq!(fleet.status(id).await, "held");
    // The driver finishes onboarding: the API reports the account ready.
    fleet.gateway.set_faults(Faults::default());
    assert_eq!(sync.release_onboarded().await.unwrap(), 1);
    assert_eq!(fleet.status(id).await, "queued");
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    fleet.assert_paid_exactly_once().await;
}

/// The booking worker's release per booking (#17): a driver on the
/// `per_earning` schedule is paid one release per booking, as soon as its
/// hold ends, and the release-funds call names the booking (`bookingId` =
/// the earning's external reference), not the fleet's payout.
#[tokio::test]
async fn release_funds_sends_a_per_earning_payouts_booking_as_booking_id() {
    use payouts::{
        db::{earnings, payee_terms, payouts as payout_repo},
        domain::{Money, Policy, Schedule, earning::NewEarning},
        services::settlement,
    };
    let fleet = release_fleet(Faults::default()).await;
    let pool = fleet.pool();
    let driver = fleet.payee("acct_driver").await;
    payee_terms::set(pool, driver.get(), Some(Some(Schedule::PerEarning)), None)
        .await
        .unwrap();
    let policy: Policy = include_str!("../../config/policy.toml").parse().unwrap();
    #[allow(clippy::disallowed_methods)] // settled "now", as the producer would
    let now = Utc::now();
    let completed = now - chrono::Duration::days(8);
    let mut conn = pool.acquire().await.unwrap();
    for booking in ["booking-4711", "booking-4712"] {
        let e = NewEarning {
            payee_id: driver.get(),
            source: "booking".into(),
            external_ref: booking.into(),
            gross: Money::parse("100.00", "USD").unwrap(),
            completed_at: completed,
            release_at: policy.release_at(completed),
        };
        earnings::record(&mut conn, &e, "integration:test", now)
            .await
            .unwrap();
    }
    drop(conn);
    let opts = settlement::Options {
        payee: None,
        actor: "settlement:test".into(),
    };
    settlement::run(pool, &policy, now, &opts).await.unwrap();
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM payouts WHERE payee_id = $1 ORDER BY id")
            .bind(driver)
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        ids.len(),
        2,
        "one payout per booking, though released at one instant"
    );
    let worker = worker_on(&fleet);
    for &id in &ids {
        payout_repo::enqueue_now(
            pool,
            payouts::domain::PayoutId::new(id),
            "operator:test",
            now + chrono::Duration::seconds(60),
            now,
        )
        .await
        .unwrap();
        assert_eq!(
            worker.process(payouts::domain::PayoutId::new(id)).await,
            Step::Recorded(PayoutStatus::Paid)
        );
    }
    let mut bookings: Vec<Option<String>> = fleet
        .gateway
        .ledger()
        .into_iter()
        .map(|e| e.booking_id)
        .collect();
    bookings.sort();
    assert_eq!(
        bookings,
        vec![
            Some("booking-4711".to_string()),
            Some("booking-4712".to_string())
        ]
    );
    fleet.assert_paid_exactly_once().await;
}

#[tokio::test]
async fn release_funds_platform_balance_short_is_retried_later_never_a_payee_failure() {
    // 402 from the release-funds API: the platform's Stripe balance is short
    // (one direct call, then every call of the worker's attempt).
    let fleet = release_fleet(Faults {
        script: vec![402; 4],
        ..Default::default()
    })
    .await;
    let gw = select::build(&fleet.settings.gateway).unwrap();
    let out = gw.transfer(&request(77, "acct_driver")).await;
    assert!(
        matches!(&out, Outcome::Transient { kind, message, .. }
            if kind.code() == "platform_balance_insufficient" && message.contains("insufficient_funds")),
        "{out:?}"
    );
    let worker = worker_on(&fleet);
    let id = due_payout(&fleet, "acct_driver").await;
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Retrying),
        "never failed for the platform's balance"
    );
    assert_eq!(
        failure(&fleet, id).await.0.as_deref(),
        Some("platform_balance_insufficient")
    );
    // The first platform refusal pauses the fleet and ends the attempt (no
    // in-attempt retries against a platform problem), so scripted answers
    // may be left over. Topped up: the same key now pays (the refusal was
    // not kept for the key).
    fleet.gateway.set_faults(Faults::default());
    let out = gw.transfer(&request(77, "acct_driver")).await;
    assert!(matches!(out, Outcome::Paid { .. }), "{out:?}");
    assert_eq!(fleet.gateway.ledger().len(), 1);
}

#[tokio::test]
async fn release_funds_pending_releases_are_resolved_by_the_poll_through_the_configured_kind() {
    let fleet = release_fleet(Faults {
        rate_pending: 1.0,
        ..Default::default()
    })
    .await;
    let worker = worker_on(&fleet);
    let id = due_payout(&fleet, "acct_async").await;
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::InTransit)
    );
    let transfer = fleet.gateway.ledger()[0].id.clone();
    assert!(fleet.gateway.set_transfer_status(&transfer, "paid"));
    let mut settings = fleet.settings.clone();
    settings.gateway.sync.min_age_secs = 0;
    let sync = payouts::producer::in_transit_sync(
        &settings,
        fleet.pool().clone(),
        fleet.queue.conn(),
        "t",
    )
    .unwrap();
    let report = sync.run_once().await.unwrap();
    assert_eq!((report.looked_up, report.paid), (1, 1), "{report:?}");
    assert_eq!(fleet.status(id).await, "paid");
}

// --- reconciliation through the configured kind ----------------------------------------

/// A payout the database has `queued` whose money the gateway has moved:
/// reconciliation finds it only by asking the right gateway.
async fn queued_payout(ctl: &Ctl, account: &str) -> i64 {
    let payee = ctl.json(&["payee", "add", "--name", "Di", "--account", account])["id"]
        .as_i64()
        .unwrap();
    let id = ctl.json(&[
        "create",
        "--payee",
        &payee.to_string(),
        "--amount",
        "7.00",
        "--currency",
        "USD",
    ])["id"]
        .as_i64()
        .unwrap();
    ctl.ok(&["enqueue", &id.to_string()]);
    id
}

/// Runs `payoutctl reconcile` with `env`: (exit code, stdout, stderr).
fn reconcile(ctl: &Ctl, extra: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut args = vec!["reconcile", "--since", "1h"];
    args.extend_from_slice(extra);
    let out = ctl.command(&args, env).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// What `payoutctl reconcile` exits with when it found money out of step.
const EXIT_MISMATCHES: i32 = 65;
/// ... and when the gateway could not be asked at all.
const EXIT_FAILED: i32 = 69;

// Multi-threaded: the in-process servers must answer while the test blocks on payoutctl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_asks_the_release_funds_api_when_that_is_the_configured_kind() {
    let ctl = Ctl::new().await;
    let gw = MockGateway::start(MockGatewayConfig::default())
        .await
        .unwrap();
    let id = queued_payout(&ctl, "acct_rf").await;
    let resp = reqwest::Client::new()
        .post(format!("{}/api/Payment/release-funds", gw.base_url))
        .bearer_auth("sk_test_mock")
        .header("Idempotency-Key", format!("payout_{id}"))
        .json(
            &json!({"bookingId": format!("payout_{id}"), "driverStripeAccountId": "acct_rf",
            "amount": 700, "currency": "usd", "reference": format!("payout_{id}")}),
        )
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let env = release_env(&gw.base_url);
    let env = borrowed(&env);
    let (code, stdout, stderr) = reconcile(&ctl, &[], &env);
    assert!(
        stdout.contains("paid_at_gateway_not_in_db") && !stdout.contains("lookup_failed"),
        "{stdout} {stderr}"
    );
    assert_eq!(code, Some(EXIT_MISMATCHES), "{stderr}");
    let (code, stdout, _) = reconcile(&ctl, &["--fix"], &env);
    assert!(code == Some(0) && stdout.contains("[fixed]"), "{stdout}");
    assert!(ctl.ok(&["status", &id.to_string()]).contains("paid"));
    let stats = gw.stats();
    assert_eq!(stats.requests, 1, "look-ups are not transfers: {stats:?}");
}

// A minimal Stripe-shaped server: `GET /v1/transfers?transfer_group=` (a
// list object, https://docs.stripe.com/api/transfers/list) with the bearer
// key, counting what it was asked.
#[derive(Clone, Default)]
struct StripeLookups {
    transfers: Arc<Mutex<Vec<Value>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

async fn stripe_list(
    State(s): State<StripeLookups>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> axum::response::Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some("Bearer sk_test_kinds_51H")
    {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}})),
        )
            .into_response();
    }
    let group = q.get("transfer_group").cloned().unwrap_or_default();
    s.asked.lock().unwrap().push(group.clone());
    let data: Vec<Value> = s
        .transfers
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t["transfer_group"] == group.as_str())
        .cloned()
        .collect();
    Json(json!({"object": "list", "url": "/v1/transfers", "has_more": false, "data": data}))
        .into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_asks_stripe_when_that_is_the_configured_kind() {
    let ctl = Ctl::new().await;
    let stripe = StripeLookups::default();
    let app = Router::new()
        .route("/v1/transfers", get(stripe_list))
        .with_state(stripe.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let id = queued_payout(&ctl, "acct_1Stripe").await;
    stripe.transfers.lock().unwrap().push(json!({
        "id": "tr_1Kinds", "object": "transfer", "amount": 700, "amount_reversed": 0,
        "currency": "usd", "destination": "acct_1Stripe", "reversed": false,
        "transfer_group": format!("payout_{id}"), "metadata": {"payout_id": id.to_string()},
    }));
    let contract = dead_url();
    let env = [
        ("PAYOUTS_GATEWAY__KIND", "stripe"),
        ("PAYOUTS_GATEWAY__BASE_URL", contract.as_str()),
        ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base.as_str()),
        ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", "sk_test_kinds_51H"),
    ];
    let (code, stdout, stderr) = reconcile(&ctl, &[], &env);
    assert!(
        stdout.contains("paid_at_gateway_not_in_db") && stdout.contains("tr_1Kinds"),
        "{stdout} {stderr}"
    );
    assert_eq!(code, Some(EXIT_MISMATCHES), "{stderr}");
    assert_eq!(
        stripe.asked.lock().unwrap().clone(),
        vec![format!("payout_{id}")],
        "every look-up went to Stripe"
    );
    let (code, stdout, _) = reconcile(&ctl, &["--fix"], &env);
    assert!(code == Some(0) && stdout.contains("[fixed]"), "{stdout}");
    let status = ctl.json(&["status", &id.to_string()]);
    assert_eq!(status["payout"]["status"], "paid");
    assert_eq!(status["payout"]["gateway_transfer_id"], "tr_1Kinds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_asks_the_contract_gateway_when_that_is_the_configured_kind() {
    let ctl = Ctl::new().await;
    let gw = MockGateway::start(MockGatewayConfig::default())
        .await
        .unwrap();
    let id = queued_payout(&ctl, "acct_c").await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/transfers", gw.base_url))
        .bearer_auth("sk_test_mock")
        .header("Idempotency-Key", format!("payout_{id}"))
        .json(
            &json!({"amount_minor": 700, "currency": "USD", "destination": "acct_c",
            "reference": format!("payout_{id}")}),
        )
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let env = [
        ("PAYOUTS_GATEWAY__KIND", "contract"),
        ("PAYOUTS_GATEWAY__BASE_URL", gw.base_url.as_str()),
    ];
    let (code, stdout, stderr) = reconcile(&ctl, &[], &env);
    assert!(stdout.contains("paid_at_gateway_not_in_db"), "{stdout}");
    assert_eq!(code, Some(EXIT_MISMATCHES), "{stderr}");
    let (code, _, _) = reconcile(&ctl, &["--fix"], &env);
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_whose_every_look_up_failed_is_a_failed_run_that_does_not_count_as_fresh()
{
    let ctl = Ctl::new().await;
    let gw = MockGateway::start(MockGatewayConfig::default())
        .await
        .unwrap();
    let id = queued_payout(&ctl, "acct_f").await;
    let up = [("PAYOUTS_GATEWAY__BASE_URL", gw.base_url.as_str())];
    let (code, _, stderr) = reconcile(&ctl, &[], &up);
    assert_eq!(code, Some(0), "a clean run: {stderr}");
    let good: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT max(finished_at) FROM reconcile_runs")
            .fetch_one(&ctl.db.pool)
            .await
            .unwrap();

    // The gateway is down: no payout could be compared.
    let down = dead_url();
    let (code, stdout, stderr) = reconcile(&ctl, &[], &[("PAYOUTS_GATEWAY__BASE_URL", &down)]);
    assert_eq!(
        code,
        Some(EXIT_FAILED),
        "failed, not 'mismatches found': {stdout} {stderr}"
    );
    assert!(
        stderr.contains("every look-up failed"),
        "says why: {stderr}"
    );
    payouts::services::reconcile::publish_last_run(&ctl.db.pool)
        .await
        .unwrap();
    assert_eq!(
        payouts::metrics::RECONCILE_LAST_RUN.get(),
        good.timestamp(),
        "the failed run did not refresh the last-run timestamp"
    );
    let _ = id;
    // The runs table keeps the failed run, marked as such.
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM reconcile_runs WHERE failed")
        .fetch_one(&ctl.db.pool)
        .await
        .unwrap();
    assert_eq!(failed, 1);
    // Release-funds with no look-up endpoint cannot be asked either: failed, not fresh.
    let (code, _, stderr) = reconcile(
        &ctl,
        &[],
        &[
            ("PAYOUTS_GATEWAY__KIND", "release_funds"),
            (
                "PAYOUTS_GATEWAY__RELEASE_FUNDS__BASE_URL",
                gw.base_url.as_str(),
            ),
        ],
    );
    assert_eq!(code, Some(EXIT_FAILED), "{stderr}");
    assert!(stderr.contains("lookup_endpoint"), "{stderr}");
}

#[test]
fn release_funds_settings_name_the_bad_key() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let e = Settings::load_from(
        None,
        &env(&[
            ("PAYOUTS_GATEWAY__KIND", "release_funds"),
            (
                "PAYOUTS_GATEWAY__RELEASE_FUNDS__ACCOUNT_ENDPOINT",
                "accounts",
            ),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("gateway.release_funds.account_endpoint"), "{e}");
    let s = Settings::load_from(None, &env(&[("PAYOUTS_GATEWAY__KIND", "release_funds")])).unwrap();
    assert!(
        s.gateway
            .release_funds
            .not_onboarded_codes
            .iter()
            .any(|c| c == "driver_not_onboarded")
    );
}

/// Issue 14: the demo runs end to end with each gateway kind against its
/// local stand-in (the mock gateway for the contract and release-funds, the
/// Stripe stand-in, with a connected account seeded per payee, for Stripe):
/// every payout paid once, the ledger and reconciliation agree.
#[tokio::test]
async fn the_demo_pays_every_payout_once_with_each_gateway_kind() {
    for kind in ["contract", "release_funds", "stripe"] {
        let db = common::TestDb::new().await;
        let logs = std::env::temp_dir().join(common::unique("demo"));
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_payout-demo"))
            .args(["--gateway-kind", kind, "--count", "40", "--workers", "1"])
            .args(["--timeout-secs", "120", "--log-dir"])
            .arg(&logs)
            .env("DATABASE_URL", &db.url)
            .env("REDIS_URL", common::redis_url())
            .env("PAYOUTS_REDIS__PREFIX", common::unique("demo"))
            .env("PAYOUTS_ADMIN__LISTEN", "127.0.0.1:0")
            .output()
            .await
            .expect("run payout-demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{kind}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!(
                "summary ({kind}): 40 seeded, 40 paid, 0 failed in"
            )),
            "{kind}: {stdout}"
        );
        assert!(
            stdout.contains(
                "gateway ledger 40 entries, 0 duplicates; reconciliation 0 disagreements"
            ),
            "{kind}: {stdout}"
        );
        let _ = std::fs::remove_dir_all(&logs);
    }
}

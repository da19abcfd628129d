//! The real gateways against local servers that speak their wire formats:
//! the Stripe stand-in (`payouts::testkit::stripe_standin`, built from
//! Stripe's API definition and documentation: saved answers of any status,
//! replays, balance, capabilities, reversals), a fixture server that answers
//! each recorded Stripe error of `tests/fixtures/stripe/` (for the
//! classification table only), a fake release-funds API (the booking
//! worker's JSON), the webhook router with Stripe's signature scheme, and the
//! in-transit poll. Real Postgres and Redis; every server on 127.0.0.1:0.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use common::Fleet;
use payouts::{
    admin::webhooks::{self, WebhookState},
    clock::SystemClock,
    config::{GatewaySettings, Settings},
    db::payouts as db_payouts,
    domain::PayoutStatus,
    gateway::{Gateway, Lookup, Outcome, TransferRequest, select, stripe::StripeGateway},
    metrics::FAILED_AFTER_PAID,
    services::sync::InTransitSync,
    testkit::{
        mock_gateway::Faults,
        stripe_standin::{Fault, StandIn, StandInConfig},
    },
    worker::{Step, Worker},
};
use serde_json::{Value, json};

const KEY: &str = "sk_test_fake_51Hx";

// --- recorded Stripe errors, replayed (the classification table) ----------------------

/// The first answer to a key: status, body, and the form it was for.
type Stored = (u16, Value, Vec<(String, String)>);

#[derive(Default)]
struct StripeState {
    transfers: Vec<Value>,
    /// key -> (status, body, form) of the first answer.
    idem: HashMap<String, Stored>,
}

#[derive(Clone, Default)]
struct FakeStripe(Arc<Mutex<StripeState>>);

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/stripe/errors/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect("fixture JSON")
}

fn stripe_answer(status: u16, headers: &[(&str, &str)], body: &Value) -> Response {
    let mut resp = (StatusCode::from_u16(status).unwrap(), Json(body.clone())).into_response();
    for (k, v) in headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

fn fixture_answer(name: &str) -> (u16, Vec<(String, String)>, Value) {
    let f = fixture(name);
    let headers = f["headers"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "Content-Type")
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    (
        f["status"].as_u64().unwrap() as u16,
        headers,
        f["body"].clone(),
    )
}

fn header_map(h: &HeaderMap) -> HashMap<String, String> {
    h.iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect()
}

async fn stripe_create(
    State(fake): State<FakeStripe>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).expect("form body");
    let seen = header_map(&headers);
    let mut st = fake.0.lock().unwrap();
    if seen.get("authorization").map(String::as_str) != Some(&format!("Bearer {KEY}")) {
        let (s, h, b) = fixture_answer("authentication_error");
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        return stripe_answer(s, &h, &b);
    }
    let key = seen.get("idempotency-key").cloned().unwrap_or_default();
    if let Some((status, body, first_form)) = st.idem.get(&key).cloned() {
        if first_form != form {
            let (s, h, b) = fixture_answer("idempotency_error");
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            return stripe_answer(s, &h, &b);
        }
        let mut h = vec![("Idempotent-Replayed", "true")];
        if status >= 500 {
            h.push(("Stripe-Should-Retry", "false"));
        }
        return stripe_answer(status, &h, &body);
    }
    let field = |k: &str| {
        form.iter()
            .find(|(fk, _)| fk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let destination = field("destination");
    if let Some(name) = destination.strip_prefix("acct_fixture_") {
        let (s, h, b) = fixture_answer(name);
        if s >= 500 {
            st.idem.insert(key, (s, b.clone(), form));
        }
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        return stripe_answer(s, &h, &b);
    }
    let n = st.transfers.len() + 1;
    let metadata: BTreeMap<String, String> = form
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    let transfer = json!({
        "id": format!("tr_fake{n}"),
        "object": "transfer",
        "amount": field("amount").parse::<i64>().unwrap(),
        "amount_reversed": 0,
        "currency": field("currency"),
        "destination": destination,
        "transfer_group": field("transfer_group"),
        "metadata": metadata,
        "reversed": false,
        "livemode": false,
    });
    st.transfers.push(transfer.clone());
    st.idem.insert(key, (200, transfer.clone(), form));
    stripe_answer(200, &[("Request-Id", "req_ok")], &transfer)
}

impl FakeStripe {
    async fn start() -> (FakeStripe, String) {
        let fake = FakeStripe::default();
        let app = Router::new()
            .route("/v1/transfers", post(stripe_create))
            .with_state(fake.clone());
        (fake, serve(app).await)
    }
}

/// The Stripe stand-in with the test key, holding `accounts` ready for transfers.
async fn standin(accounts: &[&str]) -> (StandIn, String) {
    let (s, base) = StandIn::start(StandInConfig {
        secret_keys: vec![KEY.into()],
        ..StandInConfig::default()
    })
    .await
    .unwrap();
    for a in accounts {
        s.add_account(a).await;
    }
    (s, base)
}

fn keys_of(s: &StandIn) -> Vec<String> {
    s.transfer_posts()
        .into_iter()
        .map(|p| p.idempotency_key.unwrap_or_default())
        .collect()
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn stripe_settings(base: &str, lookup_first: bool) -> GatewaySettings {
    Settings::load_from(
        None,
        &env(&[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
            (
                "PAYOUTS_GATEWAY__STRIPE__LOOKUP_BEFORE_CREATE",
                if lookup_first { "true" } else { "false" },
            ),
            ("PAYOUTS_GATEWAY__TIMEOUT_MS", "2000"),
        ]),
    )
    .expect("stripe settings")
    .gateway
}

fn request(id: i64, destination: &str) -> TransferRequest {
    TransferRequest {
        amount_minor: 12_050,
        currency: "USD".into(),
        destination: destination.into(),
        reference: format!("payout_{id}"),
        metadata: [("payout_id".to_string(), id.to_string())].into(),
        idempotency_key: format!("payout_{id}"),
        key_index: 0,
        first_attempt: false,
    }
}

// --- Stripe: wire format and outcomes ---------------------------------------------

#[tokio::test]
async fn a_stripe_transfer_is_form_encoded_with_the_key_version_and_idempotency_key_and_pays() {
    let (stripe, base) = standin(&["acct_1Ana"]).await;
    let gw = StripeGateway::new(&stripe_settings(&base, true)).unwrap();
    let out = gw.transfer(&request(42, "acct_1Ana")).await;
    let made = stripe.transfers();
    assert_eq!(made.len(), 1);
    assert_eq!(
        out,
        Outcome::Paid {
            transfer_id: made[0]["id"].as_str().unwrap().into()
        }
    );
    let posts = stripe.transfer_posts();
    assert_eq!(posts.len(), 1);
    let p = &posts[0];
    assert_eq!(p.status, 200, "the stand-in took every parameter");
    assert_eq!(p.headers["authorization"], format!("Bearer {KEY}"));
    assert_eq!(p.headers["stripe-version"], "2025-04-30.basil");
    assert_eq!(p.headers["idempotency-key"], "payout_42");
    assert_eq!(
        p.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    let form: BTreeMap<_, _> = p.params.iter().cloned().collect();
    assert_eq!(form["amount"], "12050");
    assert_eq!(form["currency"], "usd");
    assert_eq!(form["destination"], "acct_1Ana");
    assert_eq!(form["transfer_group"], "payout_42");
    assert_eq!(form["metadata[payout_id]"], "42");
    // The look-up reads the same transfer back as the fleet's record.
    let records = gw.lookup("payout_42").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].status.as_str(),
            records[0].amount_minor,
            records[0].currency.as_str()
        ),
        ("paid", 12_050, "USD")
    );
}

#[tokio::test]
async fn every_recorded_stripe_error_maps_to_its_fleet_outcome() {
    let (_fake, base) = FakeStripe::start().await;
    let gw = StripeGateway::new(&stripe_settings(&base, false)).unwrap();
    // (fixture, "transient" | "permanent", the code the fleet records)
    let table = [
        ("rate_limit", "transient", "rate_limited"),
        ("lock_timeout", "transient", "lock_timeout"),
        ("api_error", "transient", "http_500"),
        (
            "idempotency_key_in_use",
            "transient",
            "idempotency_key_in_use",
        ),
        ("balance_insufficient", "transient", "balance_insufficient"),
        ("insufficient_funds", "transient", "insufficient_funds"),
        ("account_closed", "permanent", "account_closed"),
        ("account_frozen", "permanent", "account_frozen"),
        ("no_account", "permanent", "no_account"),
        (
            "invalid_account_number",
            "permanent",
            "invalid_account_number",
        ),
        (
            "bank_account_restricted",
            "permanent",
            "bank_account_restricted",
        ),
        ("debit_not_authorized", "permanent", "debit_not_authorized"),
        (
            "invalid_request_error",
            "permanent",
            "parameter_invalid_integer",
        ),
        ("resource_missing", "permanent", "resource_missing"),
        ("idempotency_error", "permanent", "idempotency_conflict"),
        (
            "insufficient_capabilities_for_transfer",
            "permanent",
            "account_not_onboarded",
        ),
    ];
    for (i, (name, class, code)) in table.into_iter().enumerate() {
        let out = gw
            .transfer(&request(1000 + i as i64, &format!("acct_fixture_{name}")))
            .await;
        let (got_class, got_code, retry_after) = match &out {
            Outcome::Transient {
                kind, retry_after, ..
            } => ("transient", kind.code().into_owned(), *retry_after),
            Outcome::Rejected { reason, .. } => ("permanent", reason.code().to_string(), None),
            other => panic!("{name}: unexpected {other:?}"),
        };
        assert_eq!(
            (got_class, got_code.as_str()),
            (class, code),
            "{name}: {out:?}"
        );
        if name == "rate_limit" {
            assert_eq!(
                retry_after,
                Some(Duration::from_secs(2)),
                "Retry-After kept"
            );
        }
    }
    // A wrong key is a 401: a platform problem that pauses the fleet, never
    // a payee's permanent failure.
    let mut wrong = stripe_settings(&base, false);
    wrong.stripe.secret_key = "sk_test_wrong".to_string().into();
    let out = StripeGateway::new(&wrong)
        .unwrap()
        .transfer(&request(2000, "acct_1"))
        .await;
    assert!(
        matches!(&out, Outcome::Transient { kind, .. } if kind.code() == "unauthorized"),
        "{out:?}"
    );
    assert!(out.pauses_fleet(), "{out:?}");
    // No server at all (api_connection_error): transient `connect`.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let out = StripeGateway::new(&stripe_settings(&closed, false))
        .unwrap()
        .transfer(&request(2001, "acct_1"))
        .await;
    assert!(
        matches!(&out, Outcome::Transient { kind, .. } if kind.code() == "connect"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_lost_answer_behind_a_stored_500_is_found_by_transfer_group_and_never_paid_twice() {
    let (stripe, base) = standin(&["acct_1"]).await;
    stripe.push_fault(Fault::ServerErrorAfterCreate);
    let gw = StripeGateway::new(&stripe_settings(&base, false)).unwrap();
    let req = request(7, "acct_1");
    // The first answer is a fresh 500 although the money moved: retry later, same key.
    let first = gw.transfer(&req).await;
    assert!(
        matches!(&first, Outcome::Transient { kind, .. } if kind.code() == "http_500"),
        "{first:?}"
    );
    // The retry gets the saved 500 replayed; the adapter looks before it takes a new key.
    let second = gw.transfer_keyed(&req).await;
    let made = stripe.transfers();
    assert_eq!(made.len(), 1, "paid twice");
    assert_eq!(
        second.outcome,
        Outcome::Paid {
            transfer_id: made[0]["id"].as_str().unwrap().into()
        }
    );
    assert_eq!(second.key_index, 0, "no new key was needed");
    assert_eq!(keys_of(&stripe), ["payout_7", "payout_7"]);
}

#[tokio::test]
async fn a_stored_500_with_no_transfer_behind_it_moves_to_the_next_key_and_pays_once() {
    let (stripe, base) = standin(&["acct_1"]).await;
    stripe.push_fault(Fault::ServerErrorBeforeCreate);
    let gw = StripeGateway::new(&stripe_settings(&base, false)).unwrap();
    let req = request(8, "acct_1");
    assert!(gw.transfer(&req).await.is_retryable());
    let out = gw.transfer_keyed(&req).await;
    assert!(matches!(out.outcome, Outcome::Paid { .. }), "{out:?}");
    assert_eq!(out.key_index, 1, "the payout stores its new position");
    assert_eq!(stripe.transfers().len(), 1);
    assert_eq!(keys_of(&stripe), ["payout_8", "payout_8", "payout_8-1"]);
}

#[tokio::test]
async fn with_lookup_first_a_key_stripe_has_forgotten_cannot_pay_twice_but_a_reversed_payout_is_paid_again()
 {
    let (stripe, base) = standin(&["acct_1"]).await;
    let gw = StripeGateway::new(&stripe_settings(&base, true)).unwrap();
    let mut req = request(9, "acct_1");
    let Outcome::Paid { transfer_id: first } = gw.transfer(&req).await else {
        panic!("not paid")
    };
    // The platform reversed the transfer in full; an operator retry pays
    // again, under the next key: the replayed 200 is checked, not believed.
    stripe.reverse(&first, None).await.unwrap();
    let again = gw.transfer_keyed(&req).await;
    let Outcome::Paid {
        transfer_id: second,
    } = again.outcome.clone()
    else {
        panic!("{again:?}")
    };
    assert_ne!(second, first);
    assert_eq!(again.key_index, 1);
    assert_eq!(keys_of(&stripe).last().unwrap(), "payout_9-1");
    // 24 hours later Stripe has pruned the keys; a late retry must not pay again.
    stripe.forget_keys();
    req.key_index = again.key_index;
    assert_eq!(
        gw.transfer(&req).await,
        Outcome::Paid {
            transfer_id: second.clone()
        }
    );
    assert_eq!(
        stripe.transfers().len(),
        2,
        "paid twice after the key expired"
    );
    let statuses: Vec<String> = gw
        .lookup("payout_9")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, ["paid", "failed"]);
}

// --- the fleet on Stripe, by configuration alone -------------------------------------

fn worker_on(fleet: &Fleet, settings: &Settings) -> Arc<Worker> {
    fleet.worker_on(settings, "worker:gateways")
}

async fn due_payout(fleet: &Fleet, account: &str) -> i64 {
    (fleet.due_payout(account).await).get()
}

#[tokio::test]
async fn the_fleet_pays_through_stripe_by_configuration_alone_and_holds_a_payee_not_onboarded_with_a_clear_reason()
 {
    let (stripe, base) = standin(&["acct_1Ana"]).await;
    let fleet = Fleet::start_with(
        Faults::default(),
        &[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base.as_str()),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
        ],
        Arc::new(SystemClock),
    )
    .await;
    let worker = worker_on(&fleet, &fleet.settings);
    let id = due_payout(&fleet, "acct_1Ana").await;
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    let p = db_payouts::get(fleet.pool(), payouts::domain::PayoutId::new(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        p.gateway_transfer_id.as_deref(),
        stripe.transfers()[0]["id"].as_str()
    );
    // A first claim has nothing earlier to find: one POST, no look-up.
    let methods: Vec<String> = stripe.seen().into_iter().map(|s| s.method).collect();
    assert_eq!(methods, ["POST"]);
    let form: BTreeMap<_, _> = stripe.transfer_posts()[0].params.iter().cloned().collect();
    assert_eq!(form["amount"], "12050");
    assert_eq!(form["metadata[payout_id]"], id.to_string());

    stripe
        .set_account("acct_onboarding", "inactive", false)
        .await;
    let held = due_payout(&fleet, "acct_onboarding").await;
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(held)).await,
        Step::Recorded(PayoutStatus::Held),
        "held, not failed: the payee is not at fault and no budget is spent"
    );
    let p = db_payouts::get(fleet.pool(), payouts::domain::PayoutId::new(held))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.failure_code.as_deref(), Some("account_not_onboarded"));
    assert!(
        p.failure_message
            .unwrap()
            .contains("onboarding not finished"),
        "the reason is clear"
    );
}

#[tokio::test]
async fn a_payee_not_onboarded_is_released_to_the_queue_once_stripe_reports_the_account_ready() {
    let (stripe, base) = standin(&[]).await;
    let fleet = Fleet::start_with(
        Faults::default(),
        &[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base.as_str()),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
        ],
        Arc::new(SystemClock),
    )
    .await;
    let account = "acct_onboarding";
    stripe.set_account(account, "inactive", false).await;
    let worker = worker_on(&fleet, &fleet.settings);
    let id = due_payout(&fleet, account).await;
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Held)
    );
    let sync = InTransitSync::new(
        fleet.pool().clone(),
        select::build(&fleet.settings.gateway).unwrap(),
        Arc::new(SystemClock),
        fleet.settings.gateway.sync.clone(),
        "sync:test",
    )
    .with_accounts(select::account_check(&fleet.settings.gateway).unwrap());
    assert_eq!(
        sync.release_onboarded().await.unwrap(),
        0,
        "still onboarding"
    );
    assert_eq!(fleet.status(id).await, "held");

    stripe.set_account(account, "active", false).await;
    assert_eq!(sync.release_onboarded().await.unwrap(), 1);
    assert_eq!(fleet.status(id).await, "queued");
    let last = events(&fleet, id).await.pop().unwrap();
    assert_eq!(
        last,
        (Some("held".into()), "queued".into(), "sync:test".into())
    );
    // Its lease has already run out: the producer's next sweep enqueues it.
    let now = Utc::now() + chrono::Duration::seconds(1);
    let swept = db_payouts::sweep_expired(fleet.pool(), now, 100, now, "producer:test")
        .await
        .unwrap();
    assert_eq!(swept, [id]);
}

#[tokio::test]
async fn accounts_still_onboarding_do_not_starve_the_ones_after_them() {
    let (stripe, base) = standin(&[]).await;
    let fleet = Fleet::start_with(
        Faults::default(),
        &[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base.as_str()),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
            // One account per check: without a cursor the first would be asked forever.
            ("PAYOUTS_GATEWAY__SYNC__BATCH", "1"),
        ],
        Arc::new(SystemClock),
    )
    .await;
    let worker = worker_on(&fleet, &fleet.settings);
    // Two payees the fake Stripe refuses as not onboarded, then given
    // accounts of their own: the first still onboarding, the second ready.
    let not_onboarded = "acct_onboarding";
    stripe.set_account(not_onboarded, "inactive", false).await;
    let mut held = Vec::new();
    for account in ["acct_a_slow", "acct_b_ready"] {
        let id = due_payout(&fleet, not_onboarded).await;
        assert_eq!(
            worker.process(payouts::domain::PayoutId::new(id)).await,
            Step::Recorded(PayoutStatus::Held)
        );
        sqlx::query(
            "UPDATE payees SET gateway_account = $2 WHERE id = (SELECT payee_id FROM payouts WHERE id = $1)",
        )
        .bind(id)
        .bind(account)
        .execute(fleet.pool())
        .await
        .unwrap();
        held.push(id);
    }
    stripe.set_account("acct_a_slow", "inactive", false).await;
    stripe.set_account("acct_b_ready", "active", false).await;
    let sync = InTransitSync::new(
        fleet.pool().clone(),
        select::build(&fleet.settings.gateway).unwrap(),
        Arc::new(SystemClock),
        fleet.settings.gateway.sync.clone(),
        "sync:test",
    )
    .with_accounts(select::account_check(&fleet.settings.gateway).unwrap());
    assert_eq!(
        sync.release_onboarded().await.unwrap(),
        0,
        "the first account is still onboarding"
    );
    assert_eq!(
        sync.release_onboarded().await.unwrap(),
        1,
        "the next check moves on to the second"
    );
    assert_eq!(fleet.status(held[0]).await, "held");
    assert_eq!(fleet.status(held[1]).await, "queued");
}

// --- webhooks ---------------------------------------------------------------------

async fn webhook_server(fleet: &Fleet, stripe: &[&str], gateway: &[&str]) -> String {
    let mut g = fleet.settings.gateway.clone();
    g.stripe.webhook_secrets = stripe.iter().map(|s| s.to_string().into()).collect();
    g.webhooks.secrets = gateway.iter().map(|s| s.to_string().into()).collect();
    let state = WebhookState::from_settings(fleet.pool().clone(), Arc::new(SystemClock), &g);
    serve(webhooks::router(state)).await
}

async fn send(url: &str, header: &str, signature: &str, body: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .header(header, signature)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["outcome"].as_str().unwrap_or_default().to_string(),
    )
}

fn signed(secrets: &[&str], body: &str) -> String {
    webhooks::signature_header(secrets, Utc::now().timestamp(), body.as_bytes())
}

async fn events(fleet: &Fleet, id: i64) -> Vec<(Option<String>, String, String)> {
    sqlx::query_as(
        "SELECT from_status, to_status, actor FROM payout_events WHERE payout_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(fleet.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_signed_transfer_reversed_fails_a_paid_payout_with_an_event_and_an_alert_once() {
    let (stripe, base) = standin(&["acct_1Ana"]).await;
    let fleet = Fleet::start_with(
        Faults::default(),
        &[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base.as_str()),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
        ],
        Arc::new(SystemClock),
    )
    .await;
    let worker = worker_on(&fleet, &fleet.settings);
    let id = due_payout(&fleet, "acct_1Ana").await;
    assert_eq!(
        worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    let url = format!(
        "{}/webhooks/stripe",
        webhook_server(&fleet, &["whsec_new", "whsec_old"], &[]).await
    );
    // The transfer as Stripe holds it after a full reversal, in the event Stripe sends.
    let tr = db_payouts::get(fleet.pool(), payouts::domain::PayoutId::new(id))
        .await
        .unwrap()
        .unwrap()
        .gateway_transfer_id
        .unwrap();
    let reversed = stripe.reverse(&tr, None).await.unwrap();
    let body = json!({
        "id": "evt_rev_1", "object": "event", "type": "transfer.reversed",
        "data": {"object": reversed}
    })
    .to_string();
    let alerts_before = FAILED_AFTER_PAID.get();
    // Stripe signs with both secrets while one is rolled; the old one alone still verifies.
    let (status, outcome) = send(
        &url,
        "Stripe-Signature",
        &signed(&["whsec_old"], &body),
        &body,
    )
    .await;
    assert_eq!((status, outcome.as_str()), (200, "failed_after_paid"));
    assert_eq!(fleet.status(id).await, "failed");
    let p = db_payouts::get(fleet.pool(), payouts::domain::PayoutId::new(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.failure_code.as_deref(), Some("transfer_reversed"));
    assert_eq!(
        FAILED_AFTER_PAID.get(),
        alerts_before + 1,
        "one alert counted"
    );
    let last = events(&fleet, id).await.pop().unwrap();
    assert_eq!(
        last,
        (
            Some("paid".into()),
            "failed".into(),
            "webhook:stripe".into()
        )
    );
    // The same event again (Stripe retries deliveries) changes nothing.
    let n = events(&fleet, id).await.len();
    let (status, outcome) = send(
        &url,
        "Stripe-Signature",
        &signed(&["whsec_new", "whsec_old"], &body),
        &body,
    )
    .await;
    assert_eq!((status, outcome.as_str()), (200, "duplicate"));
    assert_eq!(events(&fleet, id).await.len(), n);
    assert_eq!(
        FAILED_AFTER_PAID.get(),
        alerts_before + 1,
        "the replay counted no second alert"
    );
}

#[tokio::test]
async fn a_forged_stale_or_unsigned_webhook_is_refused_and_changes_nothing() {
    let fleet = Fleet::start(Faults::default()).await;
    let url = format!(
        "{}/webhooks/stripe",
        webhook_server(&fleet, &["whsec_real"], &[]).await
    );
    let body = json!({"id": "evt_x", "type": "payout.failed",
        "data": {"object": {"id": "po_1", "failure_code": "account_closed", "metadata": {"payout_id": "1"}}}})
    .to_string();
    let forged = signed(&["whsec_guess"], &body);
    let stale = webhooks::signature_header(
        &["whsec_real"],
        Utc::now().timestamp() - 301,
        body.as_bytes(),
    );
    for sig in [forged.as_str(), stale.as_str(), "t=1,v0=abc", ""] {
        let (status, outcome) = send(&url, "Stripe-Signature", sig, &body).await;
        assert_eq!((status, outcome.as_str()), (400, "bad_signature"), "{sig}");
    }
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events")
        .fetch_one(fleet.pool())
        .await
        .unwrap();
    assert_eq!(seen, 0);
}

/// Moves a due payout to `in_transit` the way a worker does (claim, then a fenced finish).
async fn in_transit(fleet: &Fleet, account: &str, transfer_id: &str) -> i64 {
    let id = due_payout(fleet, account).await;
    let now = Utc::now();
    let claimed = db_payouts::claim(
        fleet.pool(),
        payouts::domain::PayoutId::new(id),
        "worker:t",
        now,
        now + chrono::Duration::seconds(60),
    )
    .await
    .unwrap()
    .unwrap();
    let ok = db_payouts::finish(
        fleet.pool(),
        payouts::domain::PayoutId::new(id),
        claimed.token(),
        &db_payouts::Finish::InTransit {
            transfer_id: transfer_id.into(),
        },
        "worker:t",
        "accepted",
        now,
    )
    .await
    .unwrap();
    assert!(ok);
    id
}

#[tokio::test]
async fn contract_webhooks_resolve_in_transit_payouts_and_wait_for_a_worker_still_recording() {
    let fleet = Fleet::start(Faults::default()).await;
    let url = format!(
        "{}/webhooks/gateway",
        webhook_server(&fleet, &[], &["gw_secret"]).await
    );
    let paid = in_transit(&fleet, "acct_a", "tr_a").await;
    let failed = in_transit(&fleet, "acct_b", "tr_b").await;
    let ev = |id: &str, kind: &str, data: Value| {
        json!({"id": id, "type": kind, "data": data}).to_string()
    };
    let body = ev(
        "evt_1",
        "transfer.paid",
        json!({"id": "tr_a", "status": "paid", "reference": format!("payout_{paid}")}),
    );
    let (status, outcome) = send(
        &url,
        "Gateway-Signature",
        &signed(&["gw_secret"], &body),
        &body,
    )
    .await;
    assert_eq!((status, outcome.as_str()), (200, "paid"));
    // No reference: the payout is found by the gateway's transfer id.
    let body = ev(
        "evt_2",
        "transfer.failed",
        json!({"id": "tr_b", "status": "failed", "failure_code": "account_closed"}),
    );
    let (status, outcome) = send(
        &url,
        "Gateway-Signature",
        &signed(&["gw_secret"], &body),
        &body,
    )
    .await;
    assert_eq!((status, outcome.as_str()), (200, "failed"));
    assert_eq!(fleet.status(paid).await, "paid");
    assert_eq!(fleet.status(failed).await, "failed");
    let p = db_payouts::get(fleet.pool(), payouts::domain::PayoutId::new(failed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.failure_code.as_deref(), Some("account_closed"));
    assert!(
        db_payouts::get(fleet.pool(), payouts::domain::PayoutId::new(paid))
            .await
            .unwrap()
            .unwrap()
            .paid_at
            .is_some()
    );

    // A worker holds this one (processing): 503, nothing recorded, so the redelivery counts.
    let busy = due_payout(&fleet, "acct_c").await;
    let now = Utc::now();
    db_payouts::claim(
        fleet.pool(),
        payouts::domain::PayoutId::new(busy),
        "worker:t",
        now,
        now + chrono::Duration::seconds(60),
    )
    .await
    .unwrap()
    .unwrap();
    let body = ev(
        "evt_3",
        "transfer.paid",
        json!({"id": "tr_c", "reference": format!("payout_{busy}")}),
    );
    let (status, outcome) = send(
        &url,
        "Gateway-Signature",
        &signed(&["gw_secret"], &body),
        &body,
    )
    .await;
    assert_eq!((status, outcome.as_str()), (503, "retry_later"));
    assert_eq!(fleet.status(busy).await, "processing");
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE event_id = 'evt_3'")
            .fetch_one(fleet.pool())
            .await
            .unwrap();
    assert_eq!(recorded, 0);
}

// --- release funds ------------------------------------------------------------------

#[derive(Default)]
struct ReleaseState {
    seen: Vec<(HashMap<String, String>, Value)>,
    /// reference -> (id, status) of every release made.
    releases: BTreeMap<String, (String, String)>,
}

#[derive(Clone, Default)]
struct FakeRelease(Arc<Mutex<ReleaseState>>);

async fn release(
    State(fake): State<FakeRelease>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut st = fake.0.lock().unwrap();
    st.seen.push((header_map(&headers), body.clone()));
    let reference = body["reference"].as_str().unwrap_or_default().to_string();
    let n = st.seen.len();
    match body["driverStripeAccountId"].as_str().unwrap_or_default() {
        "acct_poor" => (
            StatusCode::PAYMENT_REQUIRED,
            Json(json!({"type": "insufficient_platform_balance", "title": "Payment Required",
                "status": 402, "detail": "Insufficient funds. Check platform Stripe account balance."})),
        )
            .into_response(),
        "acct_none" => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "invalid_driver_account", "message": "Driver has not completed Stripe onboarding"}})),
        )
            .into_response(),
        "acct_down" => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "acct_async" => {
            let id = format!("rf_{n}");
            st.releases.insert(reference, (id.clone(), "pending".into()));
            (StatusCode::ACCEPTED, Json(json!({"success": true, "transferId": id, "status": "Pending"})))
                .into_response()
        }
        _ => {
            let id = format!("rf_{n}");
            st.releases.insert(reference, (id.clone(), "paid".into()));
            Json(json!({"success": true, "transferId": id, "status": "Released"})).into_response()
        }
    }
}

async fn release_lookup(
    State(fake): State<FakeRelease>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let st = fake.0.lock().unwrap();
    let reference = q.get("reference").cloned().unwrap_or_default();
    let data: Vec<Value> = st
        .releases
        .get(&reference)
        .map(|(id, status)| json!({"transferId": id, "status": status, "reference": reference}))
        .into_iter()
        .collect();
    Json(json!({ "data": data })).into_response()
}

impl FakeRelease {
    async fn start() -> (FakeRelease, String) {
        let fake = FakeRelease::default();
        let app = Router::new()
            .route("/api/Payment/release-funds", post(release))
            .route("/api/Payment/transfers", get(release_lookup))
            .with_state(fake.clone());
        (fake, serve(app).await)
    }

    fn set_status(&self, reference: &str, status: &str) {
        self.0
            .lock()
            .unwrap()
            .releases
            .get_mut(reference)
            .unwrap()
            .1 = status.into();
    }
}

fn release_settings(base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PAYOUTS_GATEWAY__KIND", "release_funds".into()),
        ("PAYOUTS_GATEWAY__RELEASE_FUNDS__BASE_URL", base.into()),
        (
            "PAYOUTS_GATEWAY__RELEASE_FUNDS__LOOKUP_ENDPOINT",
            "/api/Payment/transfers".into(),
        ),
        ("PAYOUTS_GATEWAY__RELEASE_FUNDS__SECRET", "rf_token".into()),
    ]
}

#[tokio::test]
async fn release_funds_posts_the_booking_workers_json_and_maps_answers_by_the_configured_status_table()
 {
    let (fake, base) = FakeRelease::start().await;
    let mut pairs: Vec<(String, String)> = release_settings(&base)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // This platform's 402 means "platform balance short": retry later, not a payee failure.
    pairs.push((
        "PAYOUTS_GATEWAY__RELEASE_FUNDS__STATUS_MAP__402".into(),
        "transient".into(),
    ));
    let settings = Settings::load_from(None, &pairs).unwrap();
    let gw = select::build(&settings.gateway).unwrap();

    let out = gw.transfer(&request(5, "acct_driver_5")).await;
    assert_eq!(
        out,
        Outcome::Paid {
            transfer_id: "rf_1".into()
        }
    );
    let (headers, body) = fake.0.lock().unwrap().seen[0].clone();
    assert_eq!(headers["authorization"], "Bearer rf_token");
    assert_eq!(headers["idempotency-key"], "payout_5");
    assert_eq!(
        body,
        json!({"bookingId": "payout_5", "driverStripeAccountId": "acct_driver_5",
               "amount": 12050, "currency": "usd", "reference": "payout_5"})
    );
    let out = gw.transfer(&request(6, "acct_async")).await;
    assert_eq!(
        out,
        Outcome::InTransit {
            transfer_id: "rf_2".into()
        }
    );
    let out = gw.transfer(&request(7, "acct_poor")).await;
    assert!(
        matches!(&out, Outcome::Transient { message, .. } if message.contains("Insufficient funds")),
        "{out:?}"
    );
    let out = gw.transfer(&request(8, "acct_none")).await;
    assert_eq!(
        out,
        Outcome::Rejected {
            reason: payouts::gateway::RejectReason::Gateway("invalid_driver_account".into()),
            message: "Driver has not completed Stripe onboarding".into()
        }
    );
    let out = gw.transfer(&request(9, "acct_down")).await;
    assert!(
        matches!(&out, Outcome::Transient { kind, .. } if kind.code() == "http_503"),
        "{out:?}"
    );
    let records = gw.lookup("payout_6").await.unwrap();
    assert_eq!(
        (records[0].id.as_str(), records[0].status.as_str()),
        ("rf_2", "pending")
    );
}

// --- the in-transit poll --------------------------------------------------------------

#[tokio::test]
async fn the_poll_resolves_in_transit_payouts_the_gateway_finished_and_leaves_the_rest_in_flight() {
    let (fake, base) = FakeRelease::start().await;
    let extra = release_settings(&base);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let fleet = Fleet::start_with(Faults::default(), &extra, Arc::new(SystemClock)).await;
    let worker = worker_on(&fleet, &fleet.settings);
    // Three payouts the release-funds API accepts as pending: the worker records them in transit.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = due_payout(&fleet, "acct_async").await;
        assert_eq!(
            worker.process(payouts::domain::PayoutId::new(id)).await,
            Step::Recorded(PayoutStatus::InTransit)
        );
        ids.push(id);
    }
    fake.set_status(&format!("payout_{}", ids[0]), "paid");
    fake.set_status(&format!("payout_{}", ids[1]), "failed");
    let mut sync_settings = fleet.settings.gateway.sync.clone();
    sync_settings.min_age_secs = 0;
    let sync = InTransitSync::new(
        fleet.pool().clone(),
        select::build(&fleet.settings.gateway).unwrap(),
        Arc::new(SystemClock),
        sync_settings,
        "sync:test",
    );
    let report = sync.run_once().await.unwrap();
    assert_eq!(
        (
            report.looked_up,
            report.paid,
            report.failed,
            report.still_in_transit
        ),
        (3, 1, 1, 1),
        "{report:?}"
    );
    assert_eq!(fleet.status(ids[0]).await, "paid");
    assert_eq!(fleet.status(ids[1]).await, "failed");
    assert_eq!(fleet.status(ids[2]).await, "in_transit");
    let last = events(&fleet, ids[1]).await.pop().unwrap();
    assert_eq!(
        last,
        (
            Some("in_transit".into()),
            "failed".into(),
            "sync:test".into()
        )
    );
    // A second poll does not touch what it resolved; the last one resolves when the gateway does.
    fake.set_status(&format!("payout_{}", ids[2]), "paid");
    let report = sync.run_once().await.unwrap();
    assert_eq!((report.looked_up, report.paid), (1, 1), "{report:?}");
    assert_eq!(fleet.count("in_transit").await, 0);
}

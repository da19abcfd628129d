//! The mock gateway honours the gateway HTTP contract over real HTTP.

use std::time::Duration;

use payouts::testkit::mock_gateway::{Faults, MockGateway, MockGatewayConfig, RunningMockGateway};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

const SECRET: &str = "sk_test_mock";

async fn start(faults: Faults) -> RunningMockGateway {
    MockGateway::start(MockGatewayConfig {
        faults,
        ..MockGatewayConfig::default()
    })
    .await
    .expect("mock gateway starts")
}

fn body(amount: i64, destination: &str, reference: &str) -> Value {
    json!({
        "amount_minor": amount,
        "currency": "USD",
        "destination": destination,
        "reference": reference,
        "metadata": {"worker": "w1"},
    })
}

async fn post(gw: &RunningMockGateway, key: &str, body: &Value) -> (StatusCode, Value) {
    post_with(&Client::new(), gw, key, body).await
}

async fn post_with(
    client: &Client,
    gw: &RunningMockGateway,
    key: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let resp = client
        .post(format!("{}/v1/transfers", gw.base_url))
        .bearer_auth(SECRET)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("request is answered");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn same_key_twice_moves_money_once() {
    let gw = start(Faults::default()).await;
    let b = body(1234, "acct_1", "payout_1");

    let (s1, first) = post(&gw, "k1", &b).await;
    let (s2, second) = post(&gw, "k1", &b).await;

    assert_eq!(s1, StatusCode::OK);
    assert_eq!(s2, StatusCode::OK);
    assert!(first["id"].as_str().unwrap().starts_with("tr_"));
    assert_eq!(first["status"], "paid");
    assert_eq!(first["amount_minor"], 1234);
    assert_eq!(first, second);
    let ledger = gw.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].id, first["id"].as_str().unwrap());
    assert_eq!(ledger[0].idempotency_key, "k1");
    let stats = gw.stats();
    assert_eq!((stats.requests, stats.applied, stats.replays), (2, 1, 1));
    assert_eq!(stats.by_status.get(&200), Some(&2));
    gw.stop().await;
}

#[tokio::test]
async fn same_key_with_other_params_is_a_conflict_and_moves_nothing_more() {
    let gw = start(Faults::default()).await;
    let (s1, _) = post(&gw, "k1", &body(1000, "acct_1", "payout_1")).await;
    assert_eq!(s1, StatusCode::OK);

    for other in [
        body(1001, "acct_1", "payout_1"),
        body(1000, "acct_2", "payout_1"),
        body(1000, "acct_1", "payout_2"),
        json!({"amount_minor": 1000, "currency": "EUR", "destination": "acct_1", "reference": "payout_1"}),
    ] {
        let (s, v) = post(&gw, "k1", &other).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(error_code(&v), "idempotency_conflict");
    }
    assert_eq!(gw.ledger().len(), 1);
    assert_eq!(gw.ledger()[0].amount_minor, 1000);
    gw.stop().await;
}

#[tokio::test]
async fn wrong_or_missing_secret_is_unauthorized_everywhere() {
    let gw = start(Faults::default()).await;
    let client = Client::new();
    let url = format!("{}/v1/transfers", gw.base_url);
    let b = body(100, "acct_1", "payout_1");

    let wrong = client
        .post(&url)
        .bearer_auth("sk_wrong")
        .header("Idempotency-Key", "k1")
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&wrong.json().await.unwrap()), "unauthorized");

    let missing = client
        .post(&url)
        .header("Idempotency-Key", "k1")
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);

    let lookup = client
        .get(format!("{url}?reference=payout_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), StatusCode::UNAUTHORIZED);
    let by_id = client.get(format!("{url}/tr_x")).send().await.unwrap();
    assert_eq!(by_id.status(), StatusCode::UNAUTHORIZED);

    assert!(gw.ledger().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_rejected_with_contract_codes_and_store_nothing() {
    let gw = start(Faults::default()).await;
    let client = Client::new();
    let url = format!("{}/v1/transfers", gw.base_url);

    let no_key = client
        .post(&url)
        .bearer_auth(SECRET)
        .json(&body(100, "acct_1", "p"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        error_code(&no_key.json().await.unwrap()),
        "missing_idempotency_key"
    );

    let (s, v) = post(&gw, "k1", &body(0, "acct_1", "p")).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_amount")
    );
    let (s, v) = post(&gw, "k1", &body(-5, "acct_1", "p")).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_amount")
    );
    for currency in ["usd", "US", "USDT", "U1D"] {
        let b =
            json!({"amount_minor": 1, "currency": currency, "destination": "a", "reference": "p"});
        let (s, v) = post(&gw, "k1", &b).await;
        assert_eq!(
            (s, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_currency")
        );
    }
    let malformed = client
        .post(&url)
        .bearer_auth(SECRET)
        .header("Idempotency-Key", "k1")
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        error_code(&malformed.json().await.unwrap()),
        "invalid_request"
    );

    // None of that was stored for the key: a valid request with it is applied.
    let (s, _) = post(&gw, "k1", &body(100, "acct_1", "p")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(gw.ledger().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn scripted_transient_failures_store_nothing_and_the_retry_is_applied() {
    let gw = start(Faults {
        script: vec![503, 503],
        ..Faults::default()
    })
    .await;
    let b = body(500, "acct_1", "payout_1");

    let (s1, v1) = post(&gw, "k1", &b).await;
    let (s2, _) = post(&gw, "k1", &b).await;
    assert_eq!(s1, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s2, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v1["error"]["code"].is_string());
    assert!(gw.ledger().is_empty());

    let (s3, v3) = post(&gw, "k1", &b).await;
    assert_eq!(s3, StatusCode::OK);
    let ledger = gw.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].id, v3["id"].as_str().unwrap());
    assert!(gw.faults().script.is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn closed_destination_is_a_permanent_error_stored_for_the_key() {
    let gw = start(Faults {
        closed_destinations: vec!["acct_closed".into()],
        ..Faults::default()
    })
    .await;
    let b = body(700, "acct_closed", "payout_1");

    let (s1, v1) = post(&gw, "k1", &b).await;
    assert_eq!(s1, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(&v1), "account_closed");
    assert!(v1["error"]["message"].is_string());

    // Even once the account reopens, the key keeps its stored answer.
    gw.set_faults(Faults::default());
    let (s2, v2) = post(&gw, "k1", &b).await;
    assert_eq!(s2, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v1, v2);

    assert!(gw.ledger().is_empty());
    assert_eq!(gw.stats().replays, 1);
    gw.stop().await;
}

#[tokio::test]
async fn apply_then_500_moves_money_once_and_the_retry_learns_the_transfer() {
    let gw = start(Faults {
        script: vec![600],
        ..Faults::default()
    })
    .await;
    let b = body(900, "acct_1", "payout_1");

    let (s1, v1) = post(&gw, "k1", &b).await;
    assert_eq!(s1, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error_code(&v1), "internal_error");
    assert_eq!(gw.ledger().len(), 1);

    let (s2, v2) = post(&gw, "k1", &b).await;
    assert_eq!(s2, StatusCode::OK);
    let ledger = gw.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(v2["id"].as_str().unwrap(), ledger[0].id);
    gw.stop().await;
}

#[tokio::test]
async fn apply_then_hang_answers_a_concurrent_retry_from_the_ledger_and_stop_does_not_wait() {
    let gw = start(Faults {
        script: vec![601],
        hang_ms: 600_000,
        ..Faults::default()
    })
    .await;
    let b = body(900, "acct_1", "payout_1");
    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();

    let first = impatient
        .post(format!("{}/v1/transfers", gw.base_url))
        .bearer_auth(SECRET)
        .header("Idempotency-Key", "k1")
        .json(&b)
        .send()
        .await;
    assert!(first.expect_err("the first answer is held").is_timeout());

    // The first request is still in flight on the server; the retry gets the
    // stored transfer.
    let (s2, v2) = post(&gw, "k1", &b).await;
    assert_eq!(s2, StatusCode::OK);
    let ledger = gw.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(v2["id"].as_str().unwrap(), ledger[0].id);

    tokio::time::timeout(Duration::from_secs(10), gw.stop())
        .await
        .expect("stop releases held answers");
}

#[tokio::test]
async fn rate_limited_answer_carries_retry_after() {
    let gw = start(Faults {
        script: vec![429],
        retry_after_secs: 7,
        ..Faults::default()
    })
    .await;
    let resp = Client::new()
        .post(format!("{}/v1/transfers", gw.base_url))
        .bearer_auth(SECRET)
        .header("Idempotency-Key", "k1")
        .json(&body(100, "acct_1", "p"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert!(gw.ledger().is_empty());

    // Random 429s carry it too, with the default of 1 second.
    gw.set_faults(Faults {
        rate_429: 1.0,
        ..Faults::default()
    });
    let resp = Client::new()
        .post(format!("{}/v1/transfers", gw.base_url))
        .bearer_auth(SECRET)
        .header("Idempotency-Key", "k1")
        .json(&body(100, "acct_1", "p"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_posts_with_one_key_apply_once() {
    let gw = start(Faults {
        latency_jitter_ms: 5,
        ..Faults::default()
    })
    .await;
    let client = Client::new();
    let b = body(4200, "acct_1", "payout_1");

    let answers =
        futures::future::join_all((0..100).map(|_| post_with(&client, &gw, "k1", &b))).await;

    let ledger = gw.ledger();
    assert_eq!(ledger.len(), 1);
    for (s, v) in &answers {
        assert_eq!(*s, StatusCode::OK);
        assert_eq!(v["id"].as_str().unwrap(), ledger[0].id);
    }
    let stats = gw.stats();
    assert_eq!((stats.requests, stats.applied, stats.replays), (100, 1, 99));
    gw.stop().await;
}

#[tokio::test]
async fn lookup_by_reference_and_by_id_returns_applied_transfers() {
    let gw = start(Faults::default()).await;
    let client = Client::new();
    let (_, a) = post(&gw, "k1", &body(100, "acct_1", "payout_1")).await;
    let (_, _) = post(&gw, "k2", &body(200, "acct_2", "payout_2")).await;

    let list: Value = client
        .get(format!("{}/v1/transfers", gw.base_url))
        .query(&[("reference", "payout_1")])
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"], json!([a.clone()]));

    let none: Value = client
        .get(format!(
            "{}/v1/transfers?reference=payout_unknown",
            gw.base_url
        ))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none["data"], json!([]));

    let one = client
        .get(format!(
            "{}/v1/transfers/{}",
            gw.base_url,
            a["id"].as_str().unwrap()
        ))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), StatusCode::OK);
    assert_eq!(one.json::<Value>().await.unwrap(), a);

    let missing = client
        .get(format!("{}/v1/transfers/tr_nope", gw.base_url))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    gw.stop().await;
}

#[tokio::test]
async fn put_faults_over_http_changes_behaviour_and_reset_clears_state() {
    let gw = start(Faults::default()).await;
    let client = Client::new();
    let admin = |path: &str| format!("{}/_mock/{path}", gw.base_url);

    let (s, _) = post(&gw, "k1", &body(100, "acct_1", "p1")).await;
    assert_eq!(s, StatusCode::OK);

    // Partial JSON: everything else takes its default.
    let put = client
        .put(admin("faults"))
        .json(&json!({"rate_permanent": 1.0, "permanent_code": "insufficient_funds"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let faults: Faults = client
        .get(admin("faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults.rate_permanent, 1.0);
    assert_eq!(faults.rate_5xx, 0.0);

    let (s, v) = post(&gw, "k2", &body(100, "acct_1", "p2")).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::PAYMENT_REQUIRED, "insufficient_funds")
    );
    // Injected before applying, so not stored: clearing faults lets it through.
    client
        .put(admin("faults"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (s, _) = post(&gw, "k2", &body(100, "acct_1", "p2")).await;
    assert_eq!(s, StatusCode::OK);

    let ledger: Value = client
        .get(admin("ledger"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ledger.as_array().unwrap().len(), 2);
    let stats: Value = client
        .get(admin("stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["applied"], 2);
    assert_eq!(stats["by_status"]["402"], 1);

    let reset = client.post(admin("reset")).send().await.unwrap();
    assert!(reset.status().is_success());
    assert!(gw.ledger().is_empty());
    assert_eq!(gw.stats().requests, 0);

    let health = client
        .get(format!("{}/health", gw.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok");
    gw.stop().await;
}

#[tokio::test]
async fn same_seed_gives_the_same_fault_sequence() {
    let faults = Faults {
        rate_5xx: 0.3,
        rate_429: 0.2,
        rate_pending: 0.5,
        ..Faults::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let gw = start(faults.clone()).await;
        let mut seen = Vec::new();
        for i in 0..30 {
            let (s, v) = post(&gw, &format!("k{i}"), &body(100, "acct_1", "p")).await;
            seen.push((s.as_u16(), v["status"].as_str().map(str::to_owned)));
        }
        gw.stop().await;
        runs.push(seen);
    }
    assert_eq!(runs[0], runs[1]);
    let statuses: std::collections::BTreeSet<u16> = runs[0].iter().map(|(s, _)| *s).collect();
    assert!(statuses.contains(&200) && statuses.contains(&503) && statuses.contains(&429));
    assert!(
        runs[0]
            .iter()
            .any(|(_, st)| st.as_deref() == Some("pending"))
    );
}

async fn release(gw: &RunningMockGateway, key: &str, account: &str) -> (StatusCode, Value) {
    let resp = Client::new()
        .post(format!("{}/api/Payment/release-funds", gw.base_url))
        .bearer_auth(SECRET)
        .header("Idempotency-Key", key)
        .json(
            &json!({"bookingId": "booking_9", "driverStripeAccountId": account,
            "amount": 12050, "currency": "usd", "reference": key}),
        )
        .send()
        .await
        .expect("request is answered");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get_json(gw: &RunningMockGateway, path: &str) -> Value {
    Client::new()
        .get(format!("{}{path}", gw.base_url))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_release_funds_api_shares_the_ledger_replays_by_key_and_refuses_without_keeping_the_refusal()
 {
    let gw = start(Faults {
        not_onboarded_destinations: vec!["acct_new".into()],
        script: vec![402],
        ..Default::default()
    })
    .await;
    // A scripted 402: the platform's balance, not kept for the key.
    let (status, body) = release(&gw, "payout_1", "acct_1").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(body["success"], false);
    assert_eq!(error_code(&body), "insufficient_funds");
    // Topped up: the same key pays, once; the retry replays it.
    let (status, first) = release(&gw, "payout_1", "acct_1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["success"], true);
    assert_eq!(first["status"], "paid");
    assert_eq!(first["amount"], 12050);
    assert_eq!(first["currency"], "usd");
    let (_, again) = release(&gw, "payout_1", "acct_1").await;
    assert_eq!(first["transferId"], again["transferId"]);
    assert_eq!(gw.ledger().len(), 1, "money moved once");
    assert_eq!(gw.ledger()[0].currency, "USD");
    // The same key on the contract route sees the same transfer.
    let (status, contract) = post(&gw, "payout_1", &body_for_release()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(contract["id"], first["transferId"]);

    // Not onboarded: 403 driver_not_onboarded, not kept; the account check says so.
    let (status, body) = release(&gw, "payout_2", "acct_new").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body), "driver_not_onboarded");
    let acct = get_json(&gw, "/api/Payment/accounts/acct_new").await;
    assert_eq!(acct["onboarded"], false);
    gw.set_faults(Faults::default());
    assert_eq!(
        get_json(&gw, "/api/Payment/accounts/acct_new").await["onboarded"],
        true
    );
    let (status, _) = release(&gw, "payout_2", "acct_new").await;
    assert_eq!(status, StatusCode::OK, "onboarded: the same key pays");

    // The look-up by reference, in the release-funds shape.
    let found = get_json(&gw, "/api/Payment/transfers?reference=payout_1").await;
    assert_eq!(found["data"][0]["transferId"], first["transferId"]);
    assert_eq!(found["data"][0]["driverStripeAccountId"], "acct_1");
    let resp = Client::new()
        .get(format!(
            "{}/api/Payment/transfers?reference=payout_1",
            gw.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

fn body_for_release() -> Value {
    json!({"amount_minor": 12050, "currency": "USD", "destination": "acct_1", "reference": "payout_1"})
}

#[tokio::test]
async fn its_token_bucket_answers_429_with_retry_after_when_no_token_is_left() {
    // 10/s with room for 3 at once: the 4th and 5th request of a bunch find
    // no token.
    let gw = start(Faults {
        rate_limit_per_sec: 10,
        rate_limit_burst: 3,
        ..Faults::default()
    })
    .await;
    let client = Client::new();
    let mut statuses = Vec::new();
    for i in 0..5 {
        let resp = client
            .post(format!("{}/v1/transfers", gw.base_url))
            .bearer_auth(SECRET)
            .header("Idempotency-Key", format!("k{i}"))
            .json(&body(100, "acct_1", &format!("p{i}")))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(resp.headers()["retry-after"], "1");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "rate_limited", "{v}");
        }
        statuses.push(status.as_u16());
    }
    // Five requests within 0.1 s earn at most one more token.
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((3..=4).contains(&ok), "{statuses:?}");
    assert_eq!(statuses[..3], [200, 200, 200]);
    assert_eq!(gw.ledger().len(), ok, "a refused request applies nothing");
    let stats: Value = client
        .get(format!("{}/_mock/stats", gw.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["rate_limited"], 5 - ok as u64, "{stats}");
    assert_eq!(stats["by_status"]["429"], 5 - ok as u64, "{stats}");

    // The bucket refills at the rate: a retry is served once a token is back.
    crate::common::eventually(Duration::from_secs(5), "a token at 10/s", || async {
        let (status, _) = post(&gw, "k4", &body(100, "acct_1", "p4")).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    // Off again: no limit.
    gw.set_faults(Faults::default());
    for i in 10..20 {
        let (status, _) = post(
            &gw,
            &format!("k{i}"),
            &body(100, "acct_1", &format!("p{i}")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    gw.stop().await;
}

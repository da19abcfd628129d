//! Outbound webhooks against a real HTTP receiver that checks every
//! signature with its own implementation of the Standard Webhooks scheme
//! (HMAC-SHA256 of "id.timestamp.body" under the base64-decoded `whsec_`
//! key, computed here, not by the fleet's code): the payout lifecycle signed
//! and delivered, a receiver answering 500 retried until it takes it, no
//! message for a change that rolled back and none skipped for a transaction
//! that was open, both secrets signing during a rotation's overlap, http://
//! to a non-loopback host and redirects refused, and bad input to the
//! endpoint API refused with the field named and nothing written.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use common::{Fleet, Proc, child_env, eventually};
use hmac::{Hmac, Mac};
use payouts::{
    admin::{self, AdminState},
    clock::SystemClock,
    db::tokens::{self, Role},
    domain::Money,
    services::webhooks_out::Dispatcher,
    testkit::mock_gateway::Faults,
    worker::Step,
};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

#[derive(Clone, Default)]
struct ReceiverState {
    got: Arc<Mutex<Vec<Received>>>,
    /// Status codes to answer, in order; then 200.
    script: Arc<Mutex<VecDeque<u16>>>,
    /// Requests that reached the redirect's target.
    followed: Arc<Mutex<usize>>,
    /// How long each request is held open before it is answered.
    hold: Arc<Mutex<Duration>>,
}

async fn hook(State(s): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    s.got.lock().unwrap().push(Received {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
    });
    let hold = *s.hold.lock().unwrap();
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    let code = s.script.lock().unwrap().pop_front().unwrap_or(200);
    if (300..400).contains(&code) {
        return (
            StatusCode::from_u16(code).unwrap(),
            [("location", "/elsewhere")],
            "moved",
        )
            .into_response();
    }
    (StatusCode::from_u16(code).unwrap(), "ok").into_response()
}

async fn elsewhere(State(s): State<ReceiverState>) -> StatusCode {
    *s.followed.lock().unwrap() += 1;
    StatusCode::OK
}

/// A receiver on 127.0.0.1, port 0.
struct Receiver {
    url: String,
    state: ReceiverState,
}

impl Receiver {
    async fn start() -> Receiver {
        let state = ReceiverState::default();
        let app = Router::new()
            .route("/hook", post(hook))
            .route("/elsewhere", post(elsewhere).get(elsewhere))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    fn got(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    fn hold(&self, d: Duration) {
        *self.state.hold.lock().unwrap() = d;
    }

    fn script(&self, codes: &[u16]) {
        self.state.script.lock().unwrap().extend(codes);
    }

    /// The requests about payout `id`, with their type.
    fn for_payout(&self, id: i64) -> Vec<(String, Received)> {
        self.got()
            .into_iter()
            .filter(|r| r.json()["data"]["id"] == json!(id))
            .map(|r| (r.json()["type"].as_str().unwrap().to_string(), r))
            .collect()
    }
}

/// The Standard Webhooks check, written here: some `v1,` signature of the
/// header is base64(HMAC-SHA256(key, "id.timestamp.body")) under `secret`.
fn verifies(secret: &str, r: &Received) -> bool {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", r.id, r.timestamp, r.body).as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    r.signature.split(' ').any(|s| s == expected)
}

/// A fleet with its admin server, an admin token and a dispatcher that may
/// reach loopback, retrying after 1 s.
struct Hooks {
    fleet: Fleet,
    base: String,
    admin: String,
    viewer: String,
    http: reqwest::Client,
    dispatcher: Dispatcher,
    stop: CancellationToken,
}

impl Drop for Hooks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Hooks {
    async fn start() -> Hooks {
        let fleet = Fleet::start_with(
            Faults::default(),
            &[
                ("PAYOUTS_WEBHOOKS_OUT__ALLOW_PRIVATE", r#"["127.0.0.0/8"]"#),
                ("PAYOUTS_WEBHOOKS_OUT__RETRY_SCHEDULE_SECS", "[1, 1]"),
                ("PAYOUTS_WEBHOOKS_OUT__TIMEOUT_MS", "3000"),
            ],
            Arc::new(SystemClock),
        )
        .await;
        let state = AdminState::new(
            fleet.pool().clone(),
            fleet.queue.clone(),
            Arc::new(fleet.settings.clone()),
            Arc::new(SystemClock),
        );
        let stop = CancellationToken::new();
        let (addr, _) = admin::serve("127.0.0.1:0".parse().unwrap(), state, stop.clone())
            .await
            .unwrap();
        let admin = tokens::create(fleet.pool(), "ada", Role::Admin)
            .await
            .unwrap()
            .1;
        let viewer = tokens::create(fleet.pool(), "vera", Role::Viewer)
            .await
            .unwrap()
            .1;
        let dispatcher = Dispatcher::new(
            fleet.pool().clone(),
            fleet.settings.webhooks_out.clone(),
            Arc::new(SystemClock),
            "worker:hooks-test",
        )
        .unwrap();
        Hooks {
            fleet,
            base: format!("http://{addr}"),
            admin,
            viewer,
            http: reqwest::Client::new(),
            dispatcher,
            stop,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Registers `url` for `types` through the API; (id, secret).
    async fn register(&self, url: &str, types: &[&str]) -> (i64, String) {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/webhook-endpoints",
                &self.admin,
                Some(json!({"url": url, "event_types": types})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["endpoint"]["id"].as_i64().unwrap(),
            body["secret"].as_str().unwrap().to_string(),
        )
    }

    /// Passes of the dispatcher until `check` holds.
    async fn until<T>(&self, what: &str, check: impl Fn() -> Option<T>) -> T {
        eventually(Duration::from_secs(20), what, || async {
            self.dispatcher.tick().await.expect("webhook pass");
            check()
        })
        .await
    }

    async fn payee(&self) -> i64 {
        (self.fleet.payee(&common::unique("acct")).await).get()
    }
}

#[tokio::test]
async fn payout_lifecycle_events_are_delivered_signed() {
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    let (_, secret) = h.register(&rx.url, &["*"]).await;
    let id = h.fleet.due_payout("acct_lifecycle").await;
    assert_eq!(
        h.fleet.worker("w").process(id).await,
        Step::Recorded(payouts::domain::PayoutStatus::Paid)
    );
    let got = h
        .until("created, queued and paid delivered", || {
            let got = rx.for_payout(id.get());
            (got.len() >= 3).then_some(got)
        })
        .await;
    let types: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    for t in ["payout.created", "payout.queued", "payout.paid"] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    assert_eq!(got.len(), 3, "one message per event: {types:?}");
    let now = chrono::Utc::now().timestamp();
    let mut seq = Vec::new();
    for (t, r) in &got {
        assert!(verifies(&secret, r), "{t}: signature does not verify");
        assert!(!verifies(
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            r
        ));
        let ts: i64 = r.timestamp.parse().expect("unix seconds");
        assert!((now - ts).abs() < 60, "timestamp {ts} is not now");
        let b = r.json();
        assert_eq!(
            b["data"]["event_id"],
            json!(r.id),
            "webhook-id is the event id"
        );
        assert_eq!(b["data"]["amount"], json!("120.50"));
        seq.push((b["data"]["seq"].as_i64().unwrap(), t.clone()));
    }
    seq.sort();
    let order: Vec<&str> = seq.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        order,
        ["payout.created", "payout.queued", "payout.paid"],
        "per-payout sequence numbers follow the lifecycle"
    );
    // Delivered once: more passes send nothing again.
    for _ in 0..3 {
        h.dispatcher.tick().await.unwrap();
    }
    assert_eq!(rx.for_payout(id.get()).len(), 3);
}

#[tokio::test]
async fn a_receiver_answering_500_is_retried_until_it_takes_the_message() {
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    let (endpoint, secret) = h.register(&rx.url, &["payout.created"]).await;
    // Attempt 1: 500, and 500 again at once; attempt 2 (1 s later): 500, then 200 at once.
    rx.script(&[500, 500, 500]);
    let payee = h.payee().await;
    let id = h
        .fleet
        .payout(
            payouts::domain::PayeeId::new(payee),
            "10.00",
            chrono::Utc::now(),
        )
        .await;
    let got = h
        .until("the message taken after three 500s", || {
            let got = rx.for_payout(id.get());
            (got.len() >= 4).then_some(got)
        })
        .await;
    assert_eq!(got.len(), 4);
    assert!(
        got.iter().all(|(_, r)| r.id == got[0].1.id),
        "same webhook-id on every try"
    );
    assert!(got.iter().all(|(_, r)| verifies(&secret, r)));
    let (_, body) = h
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/webhook-endpoints/{endpoint}"),
            &h.viewer,
            None,
        )
        .await;
    let d = &body["deliveries"][0];
    assert_eq!(d["status"], json!("delivered"), "{body}");
    assert_eq!(d["attempts"], json!(2));
    let (_, log) = h
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/webhook-deliveries/{}", d["id"]),
            &h.viewer,
            None,
        )
        .await;
    let codes: Vec<i64> = log["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [500, 200], "the delivery log: {log}");
    assert!(
        body["endpoint"]["failing_since"].is_null(),
        "a success ends the run of failures"
    );
}

#[tokio::test]
async fn no_message_for_a_rolled_back_change_and_none_skipped_for_an_open_one() {
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    let (_, secret) = h.register(&rx.url, &["payout.created"]).await;
    let payee = h.payee().await;
    let usd = |a: &str| Money::parse(a, "USD").unwrap();
    let now = chrono::Utc::now();

    // A change that rolls back: its event was written in its transaction.
    let mut tx = h.fleet.pool().begin().await.unwrap();
    let gone = payouts::db::payouts::create_in(
        &mut *tx,
        payouts::domain::PayeeId::new(payee),
        usd("1.00"),
        now,
        "test",
        "created",
        now,
    )
    .await
    .unwrap()
    .id;
    tx.rollback().await.unwrap();

    // A transaction that stays open while a later one commits.
    let mut open = h.fleet.pool().begin().await.unwrap();
    let slow = payouts::db::payouts::create_in(
        &mut *open,
        payouts::domain::PayeeId::new(payee),
        usd("2.00"),
        now,
        "test",
        "created",
        now,
    )
    .await
    .unwrap()
    .id;
    let fast = h
        .fleet
        .payout(payouts::domain::PayeeId::new(payee), "3.00", now)
        .await;
    for _ in 0..5 {
        h.dispatcher.tick().await.unwrap();
    }
    assert!(
        rx.for_payout(fast.get()).is_empty(),
        "nothing past a transaction still open is fanned out (it could be skipped)"
    );
    open.commit().await.unwrap();
    h.until("both committed payouts told", || {
        (!rx.for_payout(slow.get()).is_empty() && !rx.for_payout(fast.get()).is_empty())
            .then_some(())
    })
    .await;
    let after = h
        .fleet
        .payout(
            payouts::domain::PayeeId::new(payee),
            "4.00",
            chrono::Utc::now(),
        )
        .await;
    h.until("a later payout told", || {
        (!rx.for_payout(after.get()).is_empty()).then_some(())
    })
    .await;
    assert!(
        rx.for_payout(gone.get()).is_empty(),
        "no message for the rolled-back change"
    );
    assert!(rx.got().iter().all(|r| verifies(&secret, r)));
    assert_eq!(rx.got().len(), 3);
}

#[tokio::test]
async fn both_secrets_sign_during_a_rotation_overlap() {
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    let (endpoint, old) = h.register(&rx.url, &["payout.created"]).await;
    let (status, body) = h
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/webhook-endpoints/{endpoint}/rotate-secret"),
            &h.admin,
            Some(json!({"overlap_secs": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let new = body["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    let payee = h.payee().await;
    let first = h
        .fleet
        .payout(
            payouts::domain::PayeeId::new(payee),
            "5.00",
            chrono::Utc::now(),
        )
        .await;
    let r = h
        .until("a message during the overlap", || {
            rx.for_payout(first.get()).pop()
        })
        .await
        .1;
    assert_eq!(r.signature.split(' ').count(), 2, "{}", r.signature);
    assert!(verifies(&old, &r), "the previous secret still verifies");
    assert!(verifies(&new, &r), "the new secret verifies");

    // No overlap: only the newest secret signs.
    let (_, body) = h
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/webhook-endpoints/{endpoint}/rotate-secret"),
            &h.admin,
            Some(json!({"overlap_secs": 0})),
        )
        .await;
    let newest = body["secret"].as_str().unwrap().to_string();
    let second = h
        .fleet
        .payout(
            payouts::domain::PayeeId::new(payee),
            "6.00",
            chrono::Utc::now(),
        )
        .await;
    let r = h
        .until("a message after the overlap", || {
            rx.for_payout(second.get()).pop()
        })
        .await
        .1;
    assert!(verifies(&newest, &r));
    assert!(!verifies(&new, &r) && !verifies(&old, &r));
    // The listing never shows a secret.
    let (_, list) = h
        .call(
            reqwest::Method::GET,
            "/api/v1/webhook-endpoints",
            &h.viewer,
            None,
        )
        .await;
    let text = list.to_string();
    assert!(
        !text.contains(&newest) && !text.contains("whsec_"),
        "{text}"
    );
}

#[tokio::test]
async fn plain_http_to_other_hosts_and_redirects_are_refused() {
    let h = Hooks::start().await;
    for url in [
        "http://example.com/hook",
        "http://10.0.0.5/hook",
        "https://169.254.169.254/latest",
    ] {
        let (status, body) = h
            .call(
                reqwest::Method::POST,
                "/api/v1/webhook-endpoints",
                &h.admin,
                Some(json!({"url": url, "event_types": ["*"]})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("url"),
            "{url}: {body}"
        );
    }

    let rx = Receiver::start().await;
    let (endpoint, _) = h.register(&rx.url, &["payout.created"]).await;
    rx.script(&[302, 302, 302, 302]);
    let payee = h.payee().await;
    let id = h
        .fleet
        .payout(
            payouts::domain::PayeeId::new(payee),
            "7.00",
            chrono::Utc::now(),
        )
        .await;
    h.until("the redirect answered", || {
        (!rx.for_payout(id.get()).is_empty()).then_some(())
    })
    .await;
    let (_, body) = h
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/webhook-endpoints/{endpoint}"),
            &h.viewer,
            None,
        )
        .await;
    let d = &body["deliveries"][0];
    assert_eq!(
        d["status"],
        json!("pending"),
        "a redirect is a failed attempt: {body}"
    );
    assert_eq!(d["last_status"], json!(302));
    assert_eq!(
        *rx.state.followed.lock().unwrap(),
        0,
        "the redirect was not followed"
    );
    assert!(!body["endpoint"]["failing_since"].is_null());
}

#[tokio::test]
async fn bad_endpoint_input_is_refused_naming_the_field_and_writes_nothing() {
    let h = Hooks::start().await;
    let cases = [
        (json!({"event_types": ["*"]}), "url"),
        (json!({"url": "not a url", "event_types": ["*"]}), "url"),
        (
            json!({"url": "https://example.com/h", "event_types": []}),
            "event_types",
        ),
        (
            json!({"url": "https://example.com/h", "event_types": ["payout.nope"]}),
            "event_types",
        ),
        // Not a type the fleet emits: refused rather than silently never delivered.
        (
            json!({"url": "https://example.com/h", "event_types": ["settlement.paid"]}),
            "event_types",
        ),
        (
            json!({"url": "https://example.com/h", "event_types": ["*"], "secret": "x"}),
            "secret",
        ),
        (
            json!({"url": "https://example.com/h", "event_types": "*"}),
            "event_types",
        ),
        (
            json!({"url": "https://example.com/h", "event_types": ["*"], "description": "a\u{7}b"}),
            "control",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = h
            .call(
                reqwest::Method::POST,
                "/api/v1/webhook-endpoints",
                &h.admin,
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let msg = answer["error"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: {msg:?} does not name {field}");
    }
    let (status, _) = h
        .call(
            reqwest::Method::POST,
            "/api/v1/webhook-endpoints",
            &h.viewer,
            Some(json!({"url": "https://example.com/h", "event_types": ["*"]})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a viewer cannot register");
    let (status, answer) = h
        .call(
            reqwest::Method::PATCH,
            "/api/v1/webhook-endpoints/999",
            &h.admin,
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (_, list) = h
        .call(
            reqwest::Method::GET,
            "/api/v1/webhook-endpoints",
            &h.viewer,
            None,
        )
        .await;
    assert_eq!(list["endpoints"], json!([]), "nothing was written");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action LIKE 'webhook_endpoint.%'")
            .fetch_one(h.fleet.pool())
            .await
            .unwrap();
    assert_eq!(audited, 0);
}

#[tokio::test]
async fn the_openapi_description_lists_the_webhook_endpoint_routes() {
    let h = Hooks::start().await;
    let (_, doc) = h
        .call(reqwest::Method::GET, "/api/openapi.json", &h.viewer, None)
        .await;
    for (path, method) in [
        ("/api/v1/webhook-endpoints", "get"),
        ("/api/v1/webhook-endpoints", "post"),
        ("/api/v1/webhook-endpoints/{id}", "get"),
        ("/api/v1/webhook-endpoints/{id}", "patch"),
        ("/api/v1/webhook-endpoints/{id}", "delete"),
        ("/api/v1/webhook-endpoints/{id}/rotate-secret", "post"),
        ("/api/v1/webhook-endpoints/{id}/replay", "post"),
        ("/api/v1/webhook-deliveries/{id}", "get"),
        ("/api/v1/webhook-deliveries/{id}/replay", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from openapi.json"
        );
    }
}

#[tokio::test]
async fn a_slow_endpoint_does_not_let_the_lease_run_out_mid_batch() {
    // A 1 s lease and an endpoint that takes 2.5 s to answer: without the
    // renewal, a second worker takes the lease mid-request and sends the
    // same message again.
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    h.register(&rx.url, &["payout.created"]).await;
    let mut settings = h.fleet.settings.webhooks_out.clone();
    settings.lease_secs = 1;
    settings.timeout_ms = 5000;
    settings.immediate_retries = 0;
    let dispatcher = |owner: &str| {
        Dispatcher::new(
            h.fleet.pool().clone(),
            settings.clone(),
            Arc::new(SystemClock),
            owner,
        )
        .unwrap()
    };
    let (a, b) = (dispatcher("worker:slow-a"), dispatcher("worker:slow-b"));
    rx.hold(Duration::from_millis(2500));
    let payee = h.payee().await;
    let id = h
        .fleet
        .payout(
            payouts::domain::PayeeId::new(payee),
            "10.00",
            chrono::Utc::now(),
        )
        .await;
    // Passes of the first worker until one reads the event (another test's
    // open transaction can hold it back a while), then that pass sends it.
    let first = tokio::spawn(async move {
        loop {
            let pass = a.tick().await.unwrap();
            if pass.events > 0 {
                return pass;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    eventually(
        Duration::from_secs(30),
        "the slow request started",
        || async { (!rx.for_payout(id.get()).is_empty()).then_some(()) },
    )
    .await;
    while !first.is_finished() {
        b.tick().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pass = first.await.unwrap();
    assert_eq!(pass.delivered + pass.messages as usize, 1, "{pass:?}");
    rx.hold(Duration::ZERO);
    // The standby takes over once the lease ends; it has nothing to send.
    eventually(Duration::from_secs(30), "the standby leads", || async {
        b.tick().await.unwrap().leading.then_some(())
    })
    .await;
    b.tick().await.unwrap();
    assert_eq!(
        rx.for_payout(id.get()).len(),
        1,
        "sent once, not again by the standby"
    );
}

#[tokio::test]
async fn an_outcome_for_an_attempt_taken_over_writes_no_log_line() {
    use payouts::db::webhook_deliveries::{self, Outcome, SentDelivery};
    let h = Hooks::start().await;
    let (endpoint, _) = h.register("http://127.0.0.1:9/hook", &["*"]).await;
    let pool = h.fleet.pool();
    let now = chrono::Utc::now();
    let mut conn = pool.acquire().await.unwrap();
    webhook_deliveries::insert_sent(
        &mut conn,
        &[SentDelivery {
            endpoint_id: endpoint,
            event_id: "evt_payout_taken_over".into(),
            event_type: "payout.created".into(),
            body: "{}".into(),
            status: "pending",
            attempts: 0,
            next_attempt_at: now,
            delivered_at: None,
            status_code: None,
            error: None,
            latency_ms: 0,
            response: None,
        }],
        now,
    )
    .await
    .unwrap();
    drop(conn);
    let lease = now + chrono::Duration::seconds(1);
    let first = webhook_deliveries::claim(pool, 10, lease, now)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    // The lease runs out; another deliverer claims attempt 2.
    let later = now + chrono::Duration::seconds(2);
    let second = webhook_deliveries::claim(pool, 10, later + chrono::Duration::seconds(30), later)
        .await
        .unwrap();
    assert_eq!(second[0].attempts, 2);
    // The first deliverer's late outcome changes nothing and logs nothing.
    let recorded = webhook_deliveries::finish(
        pool,
        &[Outcome {
            id: first[0].id,
            attempt: first[0].attempts,
            status: "delivered",
            next_attempt_at: later,
            status_code: Some(200),
            latency_ms: 5,
            error: None,
            response: Some("ok".into()),
        }],
        later,
    )
    .await
    .unwrap();
    assert_eq!(recorded, 0);
    assert!(
        webhook_deliveries::attempts(pool, first[0].id)
            .await
            .unwrap()
            .is_empty(),
        "no log line for an outcome that was not recorded"
    );
    let listed = webhook_deliveries::for_endpoint(pool, endpoint, 10)
        .await
        .unwrap();
    assert_eq!(listed[0].status, "pending");
}

#[tokio::test]
async fn a_deliverer_killed_mid_delivery_loses_no_event() {
    // The real worker binary delivers; the receiver holds its requests open
    // and the worker is SIGKILLed while they are in flight. A new worker
    // takes the lease over once it runs out and every event arrives.
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    h.register(&rx.url, &["payout.created"]).await;
    let payee = h.payee().await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            h.fleet
                .payout(
                    payouts::domain::PayeeId::new(payee),
                    "10.00",
                    chrono::Utc::now(),
                )
                .await,
        );
    }
    let mut env = child_env(
        &h.fleet.db.url,
        &common::redis_url(),
        &h.fleet.prefix,
        &h.fleet.gateway.base_url,
    );
    for (k, v) in [
        ("PAYOUTS_WEBHOOKS_OUT__ALLOW_PRIVATE", r#"["127.0.0.0/8"]"#),
        ("PAYOUTS_WEBHOOKS_OUT__RETRY_SCHEDULE_SECS", "[1, 1, 1]"),
        ("PAYOUTS_WEBHOOKS_OUT__CONNECT_TIMEOUT_MS", "500"),
        ("PAYOUTS_WEBHOOKS_OUT__TIMEOUT_MS", "1000"),
        ("PAYOUTS_WEBHOOKS_OUT__IMMEDIATE_RETRIES", "0"),
        ("PAYOUTS_WEBHOOKS_OUT__LEASE_SECS", "6"),
        ("PAYOUTS_WEBHOOKS_OUT__CONCURRENCY", "4"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    rx.hold(Duration::from_secs(600));
    let mut victim = Proc::worker(&env, "hooks-victim");
    eventually(Duration::from_secs(30), "requests in flight", || async {
        (!rx.got().is_empty()).then_some(())
    })
    .await;
    victim.signal("KILL");
    victim.wait_exit(Duration::from_secs(10)).await;
    let before = rx.got().len();
    assert!(before < ids.len(), "killed before it could send everything");
    rx.hold(Duration::ZERO);
    let _rescuer = Proc::worker(&env, "hooks-rescuer");
    eventually(Duration::from_secs(60), "every event delivered", || async {
        ids.iter()
            .all(|id| !rx.for_payout((*id).get()).is_empty())
            .then_some(())
    })
    .await;
    for id in &ids {
        let got = rx.for_payout((*id).get());
        assert!(
            got.iter().all(|(t, _)| t == "payout.created"),
            "payout {id}: {got:?}"
        );
    }
}

#[tokio::test]
async fn a_settlement_tells_settlement_created_and_each_earning_released() {
    use payouts::{
        db::earnings,
        domain::earning::NewEarning,
        services::settlement::{self, Options},
    };
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    // Both types are subscribable again: the fleet emits them.
    let (_, secret) = h
        .register(&rx.url, &["settlement.created", "earning.released"])
        .await;
    let policy = h.fleet.settings.policy.load().unwrap();
    let payee = h.payee().await;
    let now = chrono::Utc::now();
    let mut earned = Vec::new();
    for (i, gross) in ["40.10", "25.05"].into_iter().enumerate() {
        let done = now - chrono::Duration::days(20) + chrono::Duration::hours(i as i64);
        let e = NewEarning {
            payee_id: payee,
            source: "booking".into(),
            external_ref: format!("B-{payee}-{i}"),
            gross: Money::parse(gross, "USD").unwrap(),
            completed_at: done,
            release_at: policy.release_at(done),
        };
        let mut conn = h.fleet.pool().acquire().await.unwrap();
        match earnings::record(&mut conn, &e, "operator:test", done)
            .await
            .unwrap()
        {
            earnings::Recorded::Created(row) => earned.push(row.id),
            other => panic!("{other:?}"),
        }
    }
    let report = settlement::run(
        h.fleet.pool(),
        &policy,
        now,
        &Options {
            payee: Some(payee),
            actor: "settlement:test".into(),
        },
    )
    .await
    .unwrap();
    assert!(report.payouts() >= 1, "{report:?}");
    let got = h
        .until("the settlement and its two earnings told", || {
            let got = rx.got();
            (got.len() >= 3).then_some(got)
        })
        .await;
    // More passes send nothing again.
    for _ in 0..3 {
        h.dispatcher.tick().await.unwrap();
    }
    assert_eq!(rx.got().len(), 3);
    assert!(got.iter().all(|r| verifies(&secret, r)));
    let created: Vec<Value> = got
        .iter()
        .map(Received::json)
        .filter(|b| b["type"] == "settlement.created")
        .collect();
    assert_eq!(created.len(), 1);
    let s = &created[0]["data"];
    assert_eq!(s["object"], json!("settlement"));
    assert_eq!(s["payee_id"], json!(payee));
    assert_eq!(s["gross"], json!("65.15"), "{s}");
    assert_eq!(s["outcome"], json!("payout"));
    let payout = s["payout_id"].as_i64().expect("the settlement's payout");
    let net: rust_decimal::Decimal = s["net"].as_str().unwrap().parse().unwrap();
    let amount: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT amount FROM payouts WHERE id = $1")
            .bind(payout)
            .fetch_one(h.fleet.pool())
            .await
            .unwrap();
    assert_eq!(net, amount, "net is the payout's amount");
    let mut released: Vec<i64> = got
        .iter()
        .map(Received::json)
        .filter(|b| b["type"] == "earning.released")
        .map(|b| {
            assert_eq!(b["data"]["settlement"]["id"], s["id"]);
            assert_eq!(b["data"]["payout_id"], json!(payout));
            b["data"]["id"].as_i64().unwrap()
        })
        .collect();
    released.sort();
    assert_eq!(released, earned);
}

/// A real SMTP server (aiosmtpd, tests/fixtures/smtp_server.py) on a free
/// loopback port that wants AUTH, refuses the first `fail_first` messages
/// with 451 and keeps the others as files.
struct Smtp {
    port: u16,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Smtp {
    async fn start(fail_first: u32) -> Smtp {
        let port = common::free_port();
        let dir = std::env::temp_dir().join(common::unique("smtp"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/smtp_server.py"
            ))
            .arg(port.to_string())
            .arg(&dir)
            .arg(fail_first.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 with aiosmtpd (scripts/test.sh installs it)");
        eventually(
            Duration::from_secs(20),
            "the SMTP server listens",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        Smtp { port, dir, child }
    }

    /// The messages it kept, in order.
    fn mails(&self) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        files.sort_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u32>().ok())
        });
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap().replace("\r\n", "\n"))
            .collect()
    }
}

impl Hooks {
    /// A dispatcher that also mails payees through `smtp`.
    fn mailing(&self, smtp: &Smtp) -> Dispatcher {
        let email = payouts::config::EmailSettings {
            enabled: true,
            smtp_url: secrecy::SecretString::from(format!(
                "smtp://payouts:s3cret@127.0.0.1:{}",
                smtp.port
            )),
            from: "Payouts <payouts@example.com>".into(),
            event_types: vec!["payout.paid".into(), "payout.failed".into()],
            timeout_ms: 3000,
        };
        Dispatcher::new(
            self.fleet.pool().clone(),
            self.fleet.settings.webhooks_out.clone(),
            Arc::new(SystemClock),
            "worker:mail-test",
        )
        .unwrap()
        .with_email(&email)
        .unwrap()
    }

    /// A payee with `email` set through the API (none: no address).
    async fn payee_with(&self, email: Option<&str>) -> i64 {
        let payee = self.payee().await;
        if let Some(email) = email {
            let (status, body) = self
                .call(
                    reqwest::Method::PUT,
                    &format!("/api/v1/payees/{payee}/email"),
                    &self.admin,
                    Some(json!({ "email": email })),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["payee"]["email"], json!(email));
        }
        payee
    }

    /// A payout of `amount` to `payee`, paid by a worker.
    async fn paid(&self, payee: i64, amount: &str) -> i64 {
        let id = self
            .fleet
            .payout(
                payouts::domain::PayeeId::new(payee),
                amount,
                chrono::Utc::now(),
            )
            .await;
        payouts::db::payouts::enqueue_now(
            self.fleet.pool(),
            id,
            "operator:test",
            chrono::Utc::now() + chrono::Duration::seconds(60),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
        assert_eq!(
            self.fleet.worker("w").process(id).await,
            Step::Recorded(payouts::domain::PayoutStatus::Paid)
        );
        id.get()
    }
}

/// Passes of `d` until `check` holds.
async fn passes<T>(d: &Dispatcher, what: &str, check: impl Fn() -> Option<T>) -> T {
    eventually(Duration::from_secs(20), what, || async {
        d.tick().await.expect("delivery pass");
        check()
    })
    .await
}

#[tokio::test]
async fn a_paid_payout_mails_its_payee_once_with_the_exact_amount() {
    let h = Hooks::start().await;
    let smtp = Smtp::start(0).await;
    let d = h.mailing(&smtp);
    let payee = h.payee_with(Some("ada@example.com")).await;
    let id = h.paid(payee, "1234.5").await;
    let mails = passes(&d, "the paid notice", || {
        let m = smtp.mails();
        (!m.is_empty()).then_some(m)
    })
    .await;
    for _ in 0..3 {
        d.tick().await.unwrap();
    }
    let mails_now = smtp.mails();
    assert_eq!(
        mails_now.len(),
        1,
        "one mail: created and queued are not mailed, paid once: {mails_now:?}"
    );
    let m = &mails[0];
    assert!(m.starts_with("X-Envelope-To: ada@example.com\n"), "{m}");
    assert!(m.contains("To: ada@example.com\n"), "{m}");
    assert!(m.contains("From: Payouts <payouts@example.com>\n"), "{m}");
    assert!(
        m.contains("Subject: Your payout of 1234.50 USD has been sent\n"),
        "{m}"
    );
    assert!(m.contains("Amount:    1234.50 USD\n"), "{m}");
    assert!(m.contains(&format!("Payout:    {id}\n")), "{m}");
    let listed = payouts::db::webhook_deliveries::mails_for_payee(h.fleet.pool(), payee, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, "delivered");
    assert_eq!(listed[0].event_type, "payout.paid");
    // The payee read shows the address.
    let (_, body) = h
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/payees/{payee}"),
            &h.viewer,
            None,
        )
        .await;
    assert!(body.to_string().contains("ada@example.com"), "{body}");
}

#[tokio::test]
async fn a_failing_smtp_server_is_retried_and_the_mail_arrives_after_it_recovers() {
    let h = Hooks::start().await;
    // Attempt 1: 451, and 451 again at once; attempt 2 (1 s later): 451, then taken.
    let smtp = Smtp::start(3).await;
    let d = h.mailing(&smtp);
    let payee = h.payee_with(Some("bob@example.com")).await;
    h.paid(payee, "80").await;
    let mails = passes(&d, "the mail after the server recovers", || {
        let m = smtp.mails();
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(mails.len(), 1);
    assert!(mails[0].contains("Subject: Your payout of 80.00 USD has been sent\n"));
    let listed = payouts::db::webhook_deliveries::mails_for_payee(h.fleet.pool(), payee, 10)
        .await
        .unwrap();
    assert_eq!(listed[0].status, "delivered");
    assert_eq!(listed[0].attempts, 2);
    let log = payouts::db::webhook_deliveries::attempts(h.fleet.pool(), listed[0].id)
        .await
        .unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].error.as_deref().unwrap_or_default().contains("451"),
        "{log:?}"
    );
    assert!(log[1].error.is_none(), "{log:?}");
}

/// A mail the server refuses for good (550) is failed at its first
/// attempt: no resend at once, none on the schedule.
#[tokio::test]
async fn a_mail_refused_for_good_fails_at_once() {
    let h = Hooks::start().await;
    let smtp = Smtp::start(0).await;
    let d = h.mailing(&smtp);
    let payee = h.payee_with(Some("nobody@example.com")).await;
    h.paid(payee, "80").await;
    let listed = eventually(
        Duration::from_secs(20),
        "the refused mail failed",
        || async {
            d.tick().await.expect("delivery pass");
            let listed =
                payouts::db::webhook_deliveries::mails_for_payee(h.fleet.pool(), payee, 10)
                    .await
                    .unwrap();
            listed
                .first()
                .is_some_and(|m| m.status == "failed")
                .then_some(listed)
        },
    )
    .await;
    assert_eq!(listed[0].attempts, 1, "{listed:?}");
    let log = payouts::db::webhook_deliveries::attempts(h.fleet.pool(), listed[0].id)
        .await
        .unwrap();
    assert_eq!(log.len(), 1, "no immediate resend: {log:?}");
    assert!(
        log[0].error.as_deref().unwrap_or_default().contains("550"),
        "{log:?}"
    );
    assert!(smtp.mails().is_empty());
}

#[tokio::test]
async fn a_payee_without_email_gets_no_mail() {
    let h = Hooks::start().await;
    let smtp = Smtp::start(0).await;
    let d = h.mailing(&smtp);
    let silent = h.payee_with(None).await;
    let told = h.payee_with(Some("cy@example.com")).await;
    h.paid(silent, "10.00").await;
    h.paid(told, "20.00").await;
    passes(&d, "the mail to the payee with an address", || {
        (!smtp.mails().is_empty()).then_some(())
    })
    .await;
    for _ in 0..3 {
        d.tick().await.unwrap();
    }
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].contains("To: cy@example.com\n"));
    assert!(
        payouts::db::webhook_deliveries::mails_for_payee(h.fleet.pool(), silent, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A bad address is refused, naming the field.
    let (status, body) = h
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/payees/{silent}/email"),
            &h.admin,
            Some(json!({ "email": "not an address" })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("email"), "{body}");
}

/// The receiver the README shows ("A receiver in a few lines of Python"),
/// run as written (only its secret and port filled in): it answers 200 to
/// what the fleet signs with its secret and 401 to a message signed with
/// another endpoint's secret, and the delivery log (`log` of each message
/// in `GET /api/v1/webhook-endpoints/{id}`) records the refusal.
#[tokio::test]
async fn the_readme_python_receiver_verifies_what_the_fleet_signs() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let (_, after) = readme
        .split_once("A receiver in a few lines of Python:")
        .expect("README has the Python receiver");
    let code = after
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(code, _)| code)
        .expect("a ```python block");
    assert!(
        code.lines().count() <= 25,
        "a few lines: {}",
        code.lines().count()
    );
    let h = Hooks::start().await;
    let port = common::free_port();
    let (good, secret) = h
        .register(&format!("http://127.0.0.1:{port}/good"), &["payout.paid"])
        .await;
    let (bad, _) = h
        .register(&format!("http://127.0.0.1:{port}/bad"), &["payout.paid"])
        .await;
    assert!(code.contains("\"whsec_...\"") && code.contains("((\"\", 8000)"));
    let code = code
        .replace("\"whsec_...\"", &format!("{secret:?}"))
        .replace("((\"\", 8000)", &format!("((\"127.0.0.1\", {port})"));
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _py = Child(
        std::process::Command::new("python3")
            .args(["-c", &code])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3"),
    );
    eventually(
        Duration::from_secs(20),
        "the README receiver listens",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let id = h.fleet.due_payout("acct_readme").await;
    assert_eq!(
        h.fleet.worker("w").process(id).await,
        Step::Recorded(payouts::domain::PayoutStatus::Paid)
    );
    let show = |endpoint: i64| {
        let h = &h;
        async move {
            let (status, body) = h
                .call(
                    reqwest::Method::GET,
                    &format!("/api/v1/webhook-endpoints/{endpoint}"),
                    &h.viewer,
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["deliveries"][0].clone()
        }
    };
    let message = eventually(
        Duration::from_secs(20),
        "both messages attempted",
        || async {
            h.dispatcher.tick().await.expect("webhook pass");
            let (g, b) = (show(good).await, show(bad).await);
            (g["status"] == "delivered" && b["last_status"] == 401).then_some((g, b))
        },
    )
    .await;
    let (g, b) = message;
    assert_eq!(g["event_type"], "payout.paid");
    assert_eq!(g["last_status"], 200, "{g}");
    assert_eq!(g["log"], json!([]), "a first attempt that succeeded: {g}");
    assert_eq!(b["status"], "pending", "401 is retried: {b}");
    let log = b["log"].as_array().expect("a log array");
    assert_eq!(log.len(), 1, "{b}");
    assert_eq!(log[0]["attempt"], 1);
    assert_eq!(log[0]["status_code"], 401);
    assert!(log[0]["latency_ms"].as_i64().is_some(), "{b}");
}

/// `webhooks_out.yield_secs`: while the process pays payouts (its work
/// count moves from pass to pass) the fan-out waits, at most `yield_secs`
/// at a time, and then sends what waited; once the payouts stop, it sends at
/// the next pass.
#[tokio::test]
async fn delivery_yields_to_payouts_being_paid_for_at_most_yield_secs() {
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    h.register(&rx.url, &["payout.paid"]).await;
    let mut settings = h.fleet.settings.webhooks_out.clone();
    settings.yield_secs = 2;
    let work = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = work.clone();
    let d = Dispatcher::new(
        h.fleet.pool().clone(),
        settings,
        Arc::new(SystemClock),
        "worker:hooks-yield",
    )
    .unwrap()
    .yielding_to(Arc::new(move || {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }));
    let busy = || work.fetch_add(1, std::sync::atomic::Ordering::Relaxed);

    // Paying: the fan-out waits, then sends once the wait has run out.
    let id = h.fleet.due_payout("acct_yield").await;
    assert_eq!(
        h.fleet.worker("w").process(id).await,
        Step::Recorded(payouts::domain::PayoutStatus::Paid)
    );
    let started = std::time::Instant::now();
    let yielded = std::sync::atomic::AtomicUsize::new(0);
    let waited = eventually(
        Duration::from_secs(20),
        "paid sent after the wait",
        || async {
            busy();
            let pass = d.tick().await.expect("webhook pass");
            yielded.fetch_add(
                usize::from(pass.yielded),
                std::sync::atomic::Ordering::Relaxed,
            );
            if rx.for_payout(id.get()).is_empty() {
                assert!(
                    pass.yielded || pass.events > 0 || started.elapsed() < Duration::from_secs(3)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                None
            } else {
                Some(started.elapsed())
            }
        },
    )
    .await;
    assert!(
        yielded.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no pass yielded"
    );
    assert!(
        waited >= Duration::from_secs(2),
        "sent after {waited:?}, before yield_secs ran out"
    );
    assert!(
        waited < Duration::from_secs(10),
        "sent only after {waited:?}"
    );

    // Idle (the count stands still): sent at the next pass, no wait.
    let id = h.fleet.due_payout("acct_yield_idle").await;
    assert_eq!(
        h.fleet.worker("w").process(id).await,
        Step::Recorded(payouts::domain::PayoutStatus::Paid)
    );
    eventually(Duration::from_secs(5), "idle: sent at once", || async {
        let pass = d.tick().await.expect("webhook pass");
        assert!(!pass.yielded, "yielded while idle");
        (!rx.for_payout(id.get()).is_empty()).then_some(())
    })
    .await;
}

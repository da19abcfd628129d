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

mod common;

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
use common::{Fleet, eventually};
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
        self.fleet.payee(&common::unique("acct")).await
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
            let got = rx.for_payout(id);
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
    assert_eq!(rx.for_payout(id).len(), 3);
}

#[tokio::test]
async fn a_receiver_answering_500_is_retried_until_it_takes_the_message() {
    let h = Hooks::start().await;
    let rx = Receiver::start().await;
    let (endpoint, secret) = h.register(&rx.url, &["payout.created"]).await;
    // Attempt 1: 500, and 500 again at once; attempt 2 (1 s later): 500, then 200 at once.
    rx.script(&[500, 500, 500]);
    let payee = h.payee().await;
    let id = h.fleet.payout(payee, "10.00", chrono::Utc::now()).await;
    let got = h
        .until("the message taken after three 500s", || {
            let got = rx.for_payout(id);
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
    let gone =
        payouts::db::payouts::create_in(&mut *tx, payee, usd("1.00"), now, "test", "created", now)
            .await
            .unwrap()
            .id;
    tx.rollback().await.unwrap();

    // A transaction that stays open while a later one commits.
    let mut open = h.fleet.pool().begin().await.unwrap();
    let slow = payouts::db::payouts::create_in(
        &mut *open,
        payee,
        usd("2.00"),
        now,
        "test",
        "created",
        now,
    )
    .await
    .unwrap()
    .id;
    let fast = h.fleet.payout(payee, "3.00", now).await;
    for _ in 0..5 {
        h.dispatcher.tick().await.unwrap();
    }
    assert!(
        rx.for_payout(fast).is_empty(),
        "nothing past a transaction still open is fanned out (it could be skipped)"
    );
    open.commit().await.unwrap();
    h.until("both committed payouts told", || {
        (!rx.for_payout(slow).is_empty() && !rx.for_payout(fast).is_empty()).then_some(())
    })
    .await;
    let after = h.fleet.payout(payee, "4.00", chrono::Utc::now()).await;
    h.until("a later payout told", || {
        (!rx.for_payout(after).is_empty()).then_some(())
    })
    .await;
    assert!(
        rx.for_payout(gone).is_empty(),
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
    let first = h.fleet.payout(payee, "5.00", chrono::Utc::now()).await;
    let r = h
        .until("a message during the overlap", || {
            rx.for_payout(first).pop()
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
    let second = h.fleet.payout(payee, "6.00", chrono::Utc::now()).await;
    let r = h
        .until("a message after the overlap", || {
            rx.for_payout(second).pop()
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
    let id = h.fleet.payout(payee, "7.00", chrono::Utc::now()).await;
    h.until("the redirect answered", || {
        (!rx.for_payout(id).is_empty()).then_some(())
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
        // Not emitted yet: refused rather than silently never delivered.
        (
            json!({"url": "https://example.com/h", "event_types": ["settlement.created"]}),
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

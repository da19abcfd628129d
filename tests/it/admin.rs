//! `payout-admin` over real HTTP, real Postgres and real Redis: every endpoint
//! and filter, pagination while payouts change state, authentication, roles,
//! CSRF, actions recorded with their actor, the mounted webhooks and
//! earnings intake, and property tests that malformed queries and signature
//! headers never panic and never change state.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{collections::BTreeSet, sync::Arc};

use chrono::{Duration, Utc};
use common::{TestDb, eventually, redis_url, settings, unique};
use payouts::{
    admin::{self, AdminState, webhooks},
    clock::SystemClock,
    db::{
        filter, payees,
        payouts::{self as db_payouts, Finish},
        tokens::{self, Role},
    },
    domain::{Currency, Money, PayoutStatus},
    queue::Queue,
};
use proptest::prelude::*;
use reqwest::{StatusCode, redirect::Policy};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Admin {
    db: TestDb,
    base: String,
    queue: Queue,
    viewer: String,
    operator: String,
    admin: String,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const HOOK_SECRET: &str = "gw_admin_test_secret";

impl Admin {
    async fn start() -> Admin {
        Admin::start_with(&[]).await
    }

    async fn start_with(extra: &[(&str, &str)]) -> Admin {
        let db = TestDb::new().await;
        let prefix = unique("adm");
        let mut s = settings(&db.url, &redis_url(), &prefix, "http://127.0.0.1:9", extra);
        s.gateway.webhooks.secrets = vec![HOOK_SECRET.to_string().into()];
        s.admin.overview_cache_ms = 0;
        let conn = payouts::queue::connect(&s.redis).await.unwrap();
        let queue = Queue::from_settings(conn, &s);
        let state = AdminState::new(
            db.pool.clone(),
            queue.clone(),
            Arc::new(s),
            Arc::new(SystemClock),
        );
        let stop = CancellationToken::new();
        let (addr, _) = admin::serve("127.0.0.1:0".parse().unwrap(), state, stop.clone())
            .await
            .unwrap();
        let viewer = tokens::create(&db.pool, "vera", Role::Viewer)
            .await
            .unwrap()
            .1;
        let operator = tokens::create(&db.pool, "otto", Role::Operator)
            .await
            .unwrap()
            .1;
        let admin = tokens::create(&db.pool, "ada", Role::Admin)
            .await
            .unwrap()
            .1;
        Admin {
            db,
            base: format!("http://{addr}"),
            queue,
            viewer,
            operator,
            admin,
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .unwrap(),
            stop,
        }
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.db.pool
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn payee(&self, account: &str, currency: &str) -> i64 {
        (payees::create(self.pool(), account, account, currency.parse().unwrap())
            .await
            .unwrap()
            .id)
            .get()
    }

    async fn pending(&self, payee: i64, amount: &str, currency: &str, due_in: Duration) -> i64 {
        let c: Currency = currency.parse().unwrap();
        let money = Money::new(amount.parse().unwrap(), c).unwrap();
        let now = Utc::now();
        (db_payouts::create(
            self.pool(),
            payouts::domain::PayeeId::new(payee),
            money,
            now + due_in,
            "test",
            now,
        )
        .await
        .unwrap()
        .id)
            .get()
    }

    /// Drives a pending payout through a claim to `outcome`, as a worker would.
    async fn finish(&self, id: i64, outcome: Finish) {
        let now = Utc::now();
        let lease = now + Duration::seconds(60);
        sqlx::query(
            "UPDATE payouts SET status = 'queued', lease_until = $2 WHERE id = $1 AND status = 'pending'",
        )
        .bind(id)
        .bind(lease)
        .execute(self.pool())
        .await
        .unwrap();
        let claimed = db_payouts::claim(
            self.pool(),
            payouts::domain::PayoutId::new(id),
            "worker:t",
            now,
            lease,
        )
        .await
        .unwrap()
        .expect("claimable");
        assert!(
            db_payouts::finish(
                self.pool(),
                payouts::domain::PayoutId::new(id),
                claimed.token(),
                &outcome,
                "worker:t",
                "test",
                now
            )
            .await
            .unwrap()
        );
    }

    async fn failed(&self, payee: i64, code: &str) -> i64 {
        let id = self.pending(payee, "10.00", "USD", Duration::zero()).await;
        self.finish(
            id,
            Finish::Failed {
                code: code.into(),
                message: format!("gateway said {code}"),
            },
        )
        .await;
        id
    }

    async fn paid(&self, payee: i64) -> i64 {
        let id = self.pending(payee, "25.50", "USD", Duration::zero()).await;
        self.finish(
            id,
            Finish::Paid {
                transfer_id: format!("tr_{id}"),
            },
        )
        .await;
        id
    }

    async fn status(&self, id: i64) -> String {
        sqlx::query_scalar("SELECT status FROM payouts WHERE id = $1")
            .bind(id)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM payout_events")
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn last_event(&self, id: i64) -> (String, String, Option<String>) {
        sqlx::query_as(
            "SELECT to_status, actor, reason FROM payout_events WHERE payout_id = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(id)
        .fetch_one(self.pool())
        .await
        .unwrap()
    }

    /// A request with a session cookie (and, when given, its CSRF secret).
    async fn as_session(
        &self,
        method: reqwest::Method,
        path: &str,
        cookie: &str,
        csrf: Option<&str>,
    ) -> reqwest::Response {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("cookie", cookie);
        if let Some(c) = csrf {
            r = r.header("x-csrf-token", c);
        }
        r.send().await.unwrap()
    }

    /// Logs in through the form; returns the cookie header value and the CSRF secret.
    async fn login(&self, token: &str) -> (String, String) {
        let resp = self
            .http
            .post(format!("{}/login", self.base))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()["location"], "/ui/");
        let set = resp.headers()["set-cookie"].to_str().unwrap().to_string();
        for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(set.contains(flag), "cookie without {flag}: {set}");
        }
        assert!(set.starts_with("__Host-payouts_session="), "{set}");
        let cookie = set.split(';').next().unwrap().to_string();
        let r = self
            .http
            .get(format!("{}/api/v1/session", self.base))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let csrf = r.json::<Value>().await.unwrap()["csrf"]
            .as_str()
            .unwrap()
            .to_string();
        (cookie, csrf)
    }
}

type Row = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    chrono::DateTime<Utc>,
    Option<chrono::DateTime<Utc>>,
);
type Case = (String, Box<dyn Fn(&Row) -> bool>);

fn ids(page: &Value) -> Vec<i64> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn no_endpoint_but_health_and_metrics_answers_without_credentials() {
    // Fifteen bad credentials below: more than the default lockout budget.
    let a = Admin::start_with(&[("PAYOUTS_ADMIN__AUTH_FAILURES_PER_MINUTE", "100")]).await;
    let p = a.payee("acct_1", "USD").await;
    let id = a.failed(p, "account_closed").await;
    for path in ["/health", "/health/ready", "/metrics"] {
        assert_eq!(a.get(path, None).await.0, StatusCode::OK, "{path}");
    }
    // The login form is how credentials get in.
    assert_eq!(a.get("/login", None).await.0, StatusCode::OK);
    let gets = [
        "/api/v1/session".to_string(),
        "/api/v1/overview".into(),
        "/api/v1/payouts".into(),
        format!("/api/v1/payouts/{id}"),
        "/api/v1/failures".into(),
        "/api/v1/tokens".into(),
        "/api/openapi.json".into(),
    ];
    let revoked = tokens::create(a.pool(), "gone", Role::Admin)
        .await
        .unwrap()
        .1;
    assert!(tokens::revoke(a.pool(), "gone", Utc::now()).await.unwrap());
    for path in &gets {
        for token in [None, Some("pat_not_a_real_token"), Some(revoked.as_str())] {
            let (code, body) = a.get(path, token).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{path} with {token:?}");
            let msg = body["error"].as_str().unwrap();
            assert!(!msg.contains("pat_"), "a token echoed back: {msg}");
        }
        assert_eq!(
            a.get(path, Some(&a.admin)).await.0,
            StatusCode::OK,
            "{path}"
        );
    }
    let r = a
        .http
        .get(format!("{}/api/v1/session", a.base))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for path in [
        format!("/api/v1/payouts/{id}/retry"),
        "/api/v1/payouts/bulk-retry".into(),
        "/v1/earnings".into(),
        "/logout".into(),
    ] {
        assert_eq!(
            a.post(&path, None, json!({})).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    // Pages send the browser to the login form instead.
    for path in ["/ui/", "/ui/app.js", "/ui/app.css"] {
        let (code, _) = a.get(path, None).await;
        assert_eq!(code, StatusCode::SEE_OTHER, "{path}");
    }
    assert_eq!(a.status(id).await, "failed", "nothing changed");
}

#[tokio::test]
async fn roles_decide_who_may_act_and_refusals_change_nothing() {
    let a = Admin::start().await;
    let p = a.payee("acct_r", "USD").await;
    let id = a.failed(p, "account_closed").await;
    let before = a.events().await;
    let (code, body) = a
        .post(
            &format!("/api/v1/payouts/{id}/retry"),
            Some(&a.viewer),
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(
        body["error"].as_str().unwrap().contains("operator role"),
        "{body}"
    );
    for token in [&a.viewer, &a.operator] {
        let (code, _) = a
            .post(
                "/api/v1/payouts/bulk-retry",
                Some(token),
                json!({"dry_run": false}),
            )
            .await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert_eq!(
            a.get("/api/v1/tokens", Some(token)).await.0,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        a.post("/v1/earnings", Some(&a.viewer), json!({})).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        (a.status(id).await, a.events().await),
        ("failed".into(), before)
    );
    // The viewer sees the payout but is offered no actions.
    let (_, detail) = a
        .get(&format!("/api/v1/payouts/{id}"), Some(&a.viewer))
        .await;
    assert_eq!(detail["actions"], json!([]));
    let (_, detail) = a
        .get(&format!("/api/v1/payouts/{id}"), Some(&a.operator))
        .await;
    assert_eq!(detail["actions"], json!(["retry", "cancel"]));
    // Admin manages tokens; the secret is shown once and never listed.
    let (code, made) = a
        .post(
            "/api/v1/tokens",
            Some(&a.admin),
            json!({"name": "ci-bot", "role": "viewer"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let secret = made["token"].as_str().unwrap().to_string();
    assert_eq!(
        a.get("/api/v1/session", Some(&secret)).await.0,
        StatusCode::OK
    );
    let (_, list) = a.get("/api/v1/tokens", Some(&a.admin)).await;
    assert!(!list.to_string().contains(&secret));
    let (code, _) = a
        .post(
            "/api/v1/tokens",
            Some(&a.admin),
            json!({"name": "ci-bot", "role": "viewer"}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    let r = a
        .http
        .delete(format!("{}/api/v1/tokens/ci-bot", a.base))
        .bearer_auth(&a.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        a.get("/api/v1/session", Some(&secret)).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Tokens are stored hashed.
    let stored: Vec<String> = sqlx::query_scalar("SELECT token_hash FROM api_tokens")
        .fetch_all(a.pool())
        .await
        .unwrap();
    assert!(
        stored
            .iter()
            .all(|h| h.len() == 64 && !h.starts_with("pat_"))
    );
}

#[tokio::test]
async fn a_browser_session_needs_its_csrf_token_to_act_and_ends_with_logout_or_revocation() {
    let a = Admin::start().await;
    let p = a.payee("acct_s", "USD").await;
    let id = a.failed(p, "account_closed").await;
    let (cookie, csrf) = a.login(&a.operator).await;
    let url = format!("{}/api/v1/payouts/{id}/retry", a.base);
    // Reading needs no CSRF token; acting does.
    let r = a
        .as_session(
            reqwest::Method::GET,
            &format!("/api/v1/payouts/{id}"),
            &cookie,
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    for bad in [None, Some("0000"), Some("")] {
        let mut req = a.http.post(&url).header("cookie", &cookie).json(&json!({}));
        if let Some(b) = bad {
            req = req.header("x-csrf-token", b);
        }
        assert_eq!(
            req.send().await.unwrap().status(),
            StatusCode::FORBIDDEN,
            "{bad:?}"
        );
    }
    assert_eq!(a.status(id).await, "failed");
    let r = a
        .http
        .post(&url)
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .json(&json!({"reason": "bank account fixed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(a.status(id).await, "queued");
    assert_eq!(
        a.last_event(id).await,
        (
            "queued".into(),
            "operator:otto".into(),
            Some("operator retry: bank account fixed".into())
        )
    );
    // A wrong token at the form goes back to it, with no cookie.
    let r = a
        .http
        .post(format!("{}/login", a.base))
        .form(&[("token", "pat_wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/login?error=1");
    assert!(r.headers().get("set-cookie").is_none());
    // A cross-site login is refused.
    let r = a
        .http
        .post(format!("{}/login", a.base))
        .header("origin", "https://evil.example")
        .form(&[("token", a.operator.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // The dashboard is served to the session.
    let r = a
        .as_session(reqwest::Method::GET, "/ui/", &cookie, None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    // Logout needs the CSRF token too, then the session is dead.
    let r = a
        .as_session(reqwest::Method::POST, "/logout", &cookie, None)
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = a
        .as_session(reqwest::Method::POST, "/logout", &cookie, Some(&csrf))
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = a
        .as_session(reqwest::Method::GET, "/api/v1/session", &cookie, None)
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Revoking a token ends its other sessions.
    let (cookie2, _) = a.login(&a.operator).await;
    assert!(tokens::revoke(a.pool(), "otto", Utc::now()).await.unwrap());
    let r = a
        .as_session(reqwest::Method::GET, "/api/v1/session", &cookie2, None)
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn actions_are_legal_transitions_with_their_actor_or_a_409_that_says_why() {
    let a = Admin::start().await;
    let p = a.payee("acct_a", "USD").await;
    let failed = a.failed(p, "account_closed").await;
    let paid = a.paid(p).await;
    let pending = a.pending(p, "5.00", "USD", Duration::days(3)).await;
    let to_cancel = a.pending(p, "6.00", "USD", Duration::days(3)).await;
    let op = Some(a.operator.as_str());

    let (code, body) = a
        .post(&format!("/api/v1/payouts/{failed}/retry"), op, json!({}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        (body["from"].clone(), body["to"].clone()),
        (json!("failed"), json!("queued"))
    );
    assert_eq!(body["pushed"], json!(true));
    assert!(
        a.queue.waiting().await.unwrap() >= 1,
        "the retried job is in Redis"
    );
    assert_eq!(a.last_event(failed).await.1, "operator:otto");

    let (code, body) = a
        .post(
            &format!("/api/v1/payouts/{pending}/enqueue"),
            op,
            Value::Null,
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(a.status(pending).await, "queued");

    let (code, _) = a
        .post(
            &format!("/api/v1/payouts/{to_cancel}/cancel"),
            op,
            json!({"reason": "duplicate booking"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        a.last_event(to_cancel).await,
        (
            "cancelled".into(),
            "operator:otto".into(),
            Some("duplicate booking".into())
        )
    );

    let before = a.events().await;
    for (path, want) in [
        (
            format!("/api/v1/payouts/{paid}/retry"),
            StatusCode::CONFLICT,
        ),
        (
            format!("/api/v1/payouts/{paid}/cancel"),
            StatusCode::CONFLICT,
        ),
        (
            format!("/api/v1/payouts/{to_cancel}/enqueue"),
            StatusCode::CONFLICT,
        ),
        (
            format!("/api/v1/payouts/{paid}/refund"),
            StatusCode::NOT_FOUND,
        ),
        ("/api/v1/payouts/999999/retry".into(), StatusCode::NOT_FOUND),
        ("/api/v1/payouts/abc/retry".into(), StatusCode::BAD_REQUEST),
    ] {
        let (code, body) = a.post(&path, op, json!({})).await;
        assert_eq!(code, want, "{path}: {body}");
        if want == StatusCode::CONFLICT {
            assert!(
                body["error"].as_str().unwrap().starts_with("cannot "),
                "{body}"
            );
            assert!(body["status"].is_string());
        }
    }
    let r = a
        .http
        .post(format!("{}/api/v1/payouts/{failed}/cancel", a.base))
        .bearer_auth(&a.operator)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(a.events().await, before, "refused actions wrote nothing");
    assert_eq!(a.status(paid).await, "paid");
}

/// A payout as the filter oracle sees it.
#[derive(Debug, Clone)]
struct Seeded {
    id: i64,
    status: &'static str,
    payee: i64,
    currency: &'static str,
    code: Option<&'static str>,
    created: chrono::DateTime<Utc>,
    due: chrono::DateTime<Utc>,
    paid: Option<chrono::DateTime<Utc>>,
}

impl Seeded {
    /// What `f` selects, by the filter's documented meaning (every field
    /// optional, combined with AND; ranges from inclusive, to exclusive).
    fn matches(&self, f: &filter::PayoutFilter) -> bool {
        let range = |t: Option<chrono::DateTime<Utc>>,
                     from: Option<chrono::DateTime<Utc>>,
                     to: Option<chrono::DateTime<Utc>>| {
            (from.is_none() || t.is_some_and(|t| t >= from.unwrap()))
                && (to.is_none() || t.is_some_and(|t| t < to.unwrap()))
        };
        f.status.is_none_or(|s| s.as_str() == self.status)
            && f.payee_id.is_none_or(|p| p == self.payee)
            && f.currency.as_deref().is_none_or(|c| c == self.currency)
            && f.failure_code
                .as_deref()
                .is_none_or(|c| Some(c) == self.code)
            && range(Some(self.created), f.created_from, f.created_to)
            && range(Some(self.due), f.due_from, f.due_to)
            && range(self.paid, f.paid_from, f.paid_to)
    }
}

/// Fails payout `id` again (queued -> processing -> failed with `code`), as
/// it was before a bulk retry moved it.
async fn fail_again(pool: &sqlx::PgPool, id: i64, code: &str) {
    let now = Utc::now();
    let lease = now + Duration::seconds(60);
    let claimed = db_payouts::claim(
        pool,
        payouts::domain::PayoutId::new(id),
        "worker:t",
        now,
        lease,
    )
    .await
    .unwrap()
    .expect("queued by the bulk retry");
    let failed = Finish::Failed {
        code: code.into(),
        message: "again".into(),
    };
    assert!(
        db_payouts::finish(
            pool,
            payouts::domain::PayoutId::new(id),
            claimed.token(),
            &failed,
            "worker:t",
            "again",
            now
        )
        .await
        .unwrap()
    );
}

/// The dynamic statements (`QueryBuilder`): each filter, alone, narrows the
/// page, both failed counts and the bulk retry to exactly the payouts it
/// names, in the repository (every filter also goes through the API in
/// `every_filter_selects_exactly_its_payouts`).
#[tokio::test]
async fn each_filter_narrows_the_page_the_counts_and_the_bulk_retry() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let usd = payees::create(pool, "usd", "acct_usd", "USD".parse().unwrap())
        .await
        .unwrap()
        .id;
    let eur = payees::create(pool, "eur", "acct_eur", "EUR".parse().unwrap())
        .await
        .unwrap()
        .id;
    let t0: chrono::DateTime<Utc> = "2026-11-01T00:00:00Z".parse().unwrap();
    let h = Duration::hours;
    // Eight payouts: created an hour apart, due in the reverse order, two
    // pending, four failed (one of them paid before it failed), one paid,
    // one cancelled; even ones the USD payee's, odd ones the EUR payee's.
    let plan: [(&str, Option<&str>); 8] = [
        ("pending", None),
        ("pending", None),
        ("failed", Some("account_closed")),
        ("failed", Some("account_frozen")),
        ("failed", Some("account_closed")),
        ("failed", Some("account_closed")),
        ("paid", None),
        ("cancelled", None),
    ];
    let mut rows = Vec::new();
    for (i, (status, code)) in plan.into_iter().enumerate() {
        let (payee, currency) = if i % 2 == 0 {
            (usd, "USD")
        } else {
            (eur, "EUR")
        };
        let money = Money::new("10.00".parse().unwrap(), currency.parse().unwrap()).unwrap();
        let now = Utc::now();
        let id = db_payouts::create(pool, payee, money, now, "test", now)
            .await
            .unwrap()
            .id;
        let lease = now + h(1);
        match status {
            "failed" | "paid" => {
                db_payouts::enqueue_now(pool, id, "test", lease, now)
                    .await
                    .unwrap();
                let c = db_payouts::claim(pool, id, "worker:t", now, lease)
                    .await
                    .unwrap()
                    .unwrap();
                let outcome = match code {
                    Some(code) => Finish::Failed {
                        code: code.into(),
                        message: "no".into(),
                    },
                    None => Finish::Paid {
                        transfer_id: format!("tr_{id}"),
                    },
                };
                assert!(
                    db_payouts::finish(pool, id, c.token(), &outcome, "worker:t", "t", now)
                        .await
                        .unwrap()
                );
            }
            "cancelled" => {
                db_payouts::cancel(pool, id, "test", "t", now)
                    .await
                    .unwrap();
            }
            _ => {}
        }
        let created = t0 + h(i as i64);
        let due = t0 + h(7 - i as i64);
        let paid = match i {
            5 => Some(t0 + h(5) + Duration::minutes(30)),
            6 => Some(t0 + h(6) + Duration::minutes(30)),
            _ => None,
        };
        // Times the filters can cut between (columns no trigger guards).
        sqlx::query("UPDATE payouts SET created_at = $2, due_at = $3, paid_at = $4 WHERE id = $1")
            .bind(id)
            .bind(created)
            .bind(due)
            .bind(paid)
            .execute(pool)
            .await
            .unwrap();
        rows.push(Seeded {
            id: id.get(),
            status,
            payee: payee.get(),
            currency,
            code,
            created,
            due,
            paid,
        });
    }

    let f = filter::PayoutFilter::default;
    let cases: Vec<(&str, filter::PayoutFilter)> = vec![
        (
            "status",
            filter::PayoutFilter {
                status: Some(PayoutStatus::Failed),
                ..f()
            },
        ),
        (
            "payee_id",
            filter::PayoutFilter {
                payee_id: Some(eur.get()),
                ..f()
            },
        ),
        (
            "currency",
            filter::PayoutFilter {
                currency: Some("USD".into()),
                ..f()
            },
        ),
        (
            "failure_code",
            filter::PayoutFilter {
                failure_code: Some("account_closed".into()),
                ..f()
            },
        ),
        (
            "created_from",
            filter::PayoutFilter {
                created_from: Some(t0 + h(3)),
                ..f()
            },
        ),
        (
            "created_to",
            filter::PayoutFilter {
                created_to: Some(t0 + h(5)),
                ..f()
            },
        ),
        (
            "due_from",
            filter::PayoutFilter {
                due_from: Some(t0 + h(4)),
                ..f()
            },
        ),
        (
            "due_to",
            filter::PayoutFilter {
                due_to: Some(t0 + h(5)),
                ..f()
            },
        ),
        (
            "paid_from",
            filter::PayoutFilter {
                paid_from: Some(t0 + h(6)),
                ..f()
            },
        ),
        (
            "paid_to",
            filter::PayoutFilter {
                paid_to: Some(t0 + h(6)),
                ..f()
            },
        ),
    ];
    for (key, filter) in &cases {
        // The page: newest first, exactly the matches, and not trivially so.
        let want: Vec<i64> = rows
            .iter()
            .rev()
            .filter(|r| r.matches(filter))
            .map(|r| r.id)
            .collect();
        assert!(
            !want.is_empty() && want.len() < rows.len(),
            "{key}: the case must narrow"
        );
        let req = filter::PageRequest {
            filter: filter.clone(),
            limit: 100,
            before_id: None,
        };
        let page = filter::page(pool, &req).await.unwrap();
        let got: Vec<i64> = page.items.iter().map(|p| p.id.get()).collect();
        assert_eq!(got, want, "{key}: page");

        // The failed ones (the counts and the retry take status as failed),
        // apart from those paid before they failed.
        let failed = filter::PayoutFilter {
            status: Some(PayoutStatus::Failed),
            ..filter.clone()
        };
        let retryable: Vec<&Seeded> = rows
            .iter()
            .filter(|r| r.matches(&failed) && r.paid.is_none())
            .collect();
        let after_paid = rows
            .iter()
            .filter(|r| r.matches(&failed) && r.paid.is_some())
            .count() as i64;
        assert_eq!(
            filter::count_failed(pool, filter, 100).await.unwrap(),
            retryable.len() as i64,
            "{key}: count_failed"
        );
        assert_eq!(
            filter::count_failed_after_paid(pool, filter, 100)
                .await
                .unwrap(),
            after_paid,
            "{key}: count_failed_after_paid"
        );
        let now = Utc::now();
        let retried = db_payouts::bulk_retry(pool, filter, 100, "operator:t", now + h(1), now)
            .await
            .unwrap();
        let want: Vec<i64> = retryable.iter().map(|r| r.id).collect();
        assert_eq!(retried, want, "{key}: bulk_retry");
        for r in retryable {
            fail_again(pool, r.id, r.code.unwrap()).await;
        }
    }
    // Filters combine with AND.
    let both = filter::PayoutFilter {
        failure_code: Some("account_closed".into()),
        currency: Some("USD".into()),
        ..f()
    };
    let req = filter::PageRequest {
        filter: both.clone(),
        limit: 100,
        before_id: None,
    };
    let got: Vec<i64> = filter::page(pool, &req)
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.id.get())
        .collect();
    assert_eq!(got, [rows[4].id, rows[2].id]);
}

#[tokio::test]
async fn every_filter_selects_exactly_its_payouts() {
    let a = Admin::start().await;
    let usd = a.payee("acct_usd", "USD").await;
    let eur = a.payee("acct_eur", "EUR").await;
    let mut all = Vec::new();
    for i in 0..6 {
        all.push(a.pending(usd, "1.00", "USD", Duration::hours(i)).await);
        all.push(a.pending(eur, "2.00", "EUR", Duration::hours(48 + i)).await);
    }
    let closed = [
        a.failed(usd, "account_closed").await,
        a.failed(eur, "account_closed").await,
    ];
    let frozen = a.failed(usd, "account_frozen").await;
    let paid = a.paid(eur).await;
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, payee_id, currency, status, failure_code, due_at, paid_at FROM payouts ORDER BY id DESC")
            .fetch_all(a.pool())
            .await
            .unwrap();
    let t = |d: chrono::DateTime<Utc>| {
        d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .replace('+', "%2B")
    };
    let mid = Utc::now() + Duration::hours(24);
    let cases: Vec<Case> = vec![
        ("status=failed".into(), Box::new(|r: &Row| r.3 == "failed")),
        (
            "status=pending".into(),
            Box::new(|r: &Row| r.3 == "pending"),
        ),
        (
            format!("payee_id={eur}"),
            Box::new(move |r: &Row| r.1 == eur),
        ),
        ("currency=eur".into(), Box::new(|r: &Row| r.2 == "EUR")),
        (
            "failure_code=account_closed".into(),
            Box::new(|r: &Row| r.4.as_deref() == Some("account_closed")),
        ),
        (
            format!("due_from={}", t(mid)),
            Box::new(move |r: &Row| r.5 >= mid),
        ),
        (
            format!("due_to={}", t(mid)),
            Box::new(move |r: &Row| r.5 < mid),
        ),
        (
            format!("paid_from={}", t(Utc::now() - Duration::hours(1))),
            Box::new(|r: &Row| r.6.is_some()),
        ),
        (
            format!("status=failed&payee_id={usd}&currency=USD"),
            Box::new(move |r: &Row| r.3 == "failed" && r.1 == usd),
        ),
        (
            format!("created_to={}", t(Utc::now() - Duration::hours(1))),
            Box::new(|_: &Row| false),
        ),
        (
            format!("created_from={}", t(Utc::now() - Duration::hours(1))),
            Box::new(|_: &Row| true),
        ),
        ("status=&currency=".into(), Box::new(|_: &Row| true)),
    ];
    for (q, want) in cases {
        let (code, page) = a
            .get(&format!("/api/v1/payouts?{q}&limit=500"), Some(&a.viewer))
            .await;
        assert_eq!(code, StatusCode::OK, "{q}: {page}");
        let expect: Vec<i64> = rows.iter().filter(|r| want(r)).map(|r| r.0).collect();
        assert_eq!(ids(&page), expect, "{q}");
        assert_eq!(page["next_cursor"], Value::Null);
    }
    // The seeded payouts the cases were about, by id.
    let a = &a;
    let code = |c: &'static str| async move {
        ids(&a
            .get(
                &format!("/api/v1/payouts?failure_code={c}"),
                Some(&a.viewer),
            )
            .await
            .1)
    };
    assert_eq!(code("account_closed").await, [closed[1], closed[0]]);
    assert_eq!(code("account_frozen").await, [frozen]);
    let (_, page) = a.get("/api/v1/payouts?status=paid", Some(&a.viewer)).await;
    assert_eq!(ids(&page), [paid]);
    let (_, page) = a
        .get("/api/v1/payouts?status=pending&limit=500", Some(&a.viewer))
        .await;
    let mut pending = ids(&page);
    pending.sort();
    assert_eq!(pending, all);
    // Bad filters: 400 naming the key, nothing changed.
    let before = a.events().await;
    for q in [
        "status=lost",
        "payee_id=x",
        "currency=XXX",
        "due_from=tomorrow",
        "limit=0",
        "cursor=-3",
        "order=asc",
        "%ZZ",
    ] {
        let (code, body) = a
            .get(&format!("/api/v1/payouts?{q}"), Some(&a.viewer))
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{q}: {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(a.events().await, before);

    // Failures view.
    let (_, f) = a.get("/api/v1/failures", Some(&a.viewer)).await;
    let groups: Vec<(String, i64)> = f["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["failure_code"].as_str().unwrap().to_string(),
                g["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("account_closed".to_string(), 2),
            ("account_frozen".to_string(), 1)
        ]
    );
}

#[tokio::test]
async fn pages_neither_repeat_nor_skip_while_payouts_change_state() {
    let a = Admin::start().await;
    let p = a.payee("acct_pg", "USD").await;
    let mut made = Vec::new();
    for _ in 0..40 {
        made.push(a.pending(p, "3.00", "USD", Duration::hours(1)).await);
    }
    // Page through everything, 7 at a time, cancelling and adding payouts between pages.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut round = 0;
    let mut cancelled = BTreeSet::new();
    loop {
        let q = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("&cursor={c}"));
        let (code, page) = a
            .get(&format!("/api/v1/payouts?limit=7{q}"), Some(&a.viewer))
            .await;
        assert_eq!(code, StatusCode::OK);
        seen.extend(ids(&page));
        // Change state under the pager: cancel a payout not yet seen, add a new one.
        let victim = made[made.len() - 1 - (round * 5 + 10).min(made.len() - 1)];
        if db_payouts::cancel(
            a.pool(),
            payouts::domain::PayoutId::new(victim),
            "operator:t",
            "test",
            Utc::now(),
        )
        .await
        .is_ok()
        {
            cancelled.insert(victim);
        }
        a.pending(p, "4.00", "USD", Duration::hours(1)).await;
        round += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "a payout appeared twice");
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "not newest first");
    assert_eq!(
        unique,
        made.iter().copied().collect(),
        "every payout there at the start was seen once"
    );
    assert!(!cancelled.is_empty());

    // With a status filter, rows leaving it mid-way drop out; none repeat,
    // and every row that stayed pending throughout is seen.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut left = BTreeSet::new();
    loop {
        let q = cursor
            .as_ref()
            .map_or(String::new(), |c| format!("&cursor={c}"));
        let (_, page) = a
            .get(
                &format!("/api/v1/payouts?status=pending&limit=6{q}"),
                Some(&a.viewer),
            )
            .await;
        seen.extend(ids(&page));
        for id in made.iter().rev().skip(seen.len() + 3).take(1) {
            if db_payouts::cancel(
                a.pool(),
                payouts::domain::PayoutId::new(*id),
                "operator:t",
                "test",
                Utc::now(),
            )
            .await
            .is_ok()
            {
                left.insert(*id);
            }
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len());
    let stayed: BTreeSet<i64> = sqlx::query_scalar::<_, i64>(
        "SELECT id FROM payouts WHERE status = 'pending' AND id <= $1",
    )
    .bind(*made.last().unwrap())
    .fetch_all(a.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(
        stayed.is_subset(&unique),
        "a payout pending throughout was skipped"
    );
    assert!(!left.is_empty(), "the test changed nothing under the pager");
}

#[tokio::test]
async fn the_payout_page_has_its_history_attempts_and_actions() {
    let a = Admin::start().await;
    let p = a.payee("acct_d", "USD").await;
    let id = a.failed(p, "account_closed").await;
    let (code, d) = a
        .get(&format!("/api/v1/payouts/{id}"), Some(&a.operator))
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(d["payout"]["status"], "failed");
    assert_eq!(d["payout"]["amount"], "10.00");
    assert_eq!(d["idempotency_key"], format!("payout_{id}"));
    assert_eq!(d["payee"]["gateway_account"], "acct_d");
    let to: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to_status"].as_str().unwrap())
        .collect();
    assert_eq!(to, ["pending", "processing", "failed"]);
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(d["attempts"][0]["outcome"], "failed");
    assert_eq!(d["attempts"][0]["worker"], "worker:t");
    assert_eq!(
        a.get("/api/v1/payouts/424242", Some(&a.viewer)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.get("/api/v1/payouts/0", Some(&a.viewer)).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn the_overview_reports_counts_rates_latency_window_workers_and_leader() {
    let a = Admin::start().await;
    let p = a.payee("acct_o", "USD").await;
    for _ in 0..3 {
        a.paid(p).await;
    }
    a.failed(p, "account_closed").await;
    a.pending(p, "1.00", "USD", -Duration::minutes(5)).await;
    // A consumer registered in Redis the way apalis-redis does it, holding two jobs.
    let cfg = a.queue.config();
    let mut conn = a.queue.conn();
    let inflight = format!("{}:host-1-0", cfg.inflight_jobs_set());
    let _: () = redis::pipe()
        .zadd(cfg.workers_set(), &inflight, Utc::now().timestamp())
        .sadd(&inflight, "job-a")
        .sadd(&inflight, "job-b")
        .set(
            format!("{{{}}}:producer:leader", a.queue.prefix()),
            "producer:host-9",
        )
        .query_async(&mut conn)
        .await
        .unwrap();
    let (code, o) = a.get("/api/v1/overview", Some(&a.viewer)).await;
    assert_eq!(code, StatusCode::OK, "{o}");
    assert_eq!(o["counts"]["failed"], 1);
    assert_eq!(o["counts"]["paid"], 3);
    assert_eq!(o["paid_is_estimate"], false);
    assert_eq!(o["counts"]["pending"], 1);
    assert_eq!(o["counts"].as_object().unwrap().len(), 9);
    assert_eq!(o["last_hour"]["paid"], 3);
    assert_eq!(o["last_hour"]["failed"], 1);
    assert_eq!(o["last_hour"]["success_rate"], 0.75);
    assert_eq!(o["due_to_paid_seconds"]["sample"], 3);
    assert!(o["backlog_age_seconds"].as_f64().unwrap() >= 299.0, "{o}");
    assert_eq!(o["workers"][0]["name"], "host-1-0");
    assert_eq!(o["workers"][0]["in_flight"], 2);
    assert_eq!(o["workers"][0]["alive"], true);
    assert_eq!(o["producer_leader"], "producer:host-9");
    let series = o["series"].as_array().unwrap();
    assert_eq!(series.len(), 60);
    let paid: i64 = series.iter().map(|m| m["paid"].as_i64().unwrap()).sum();
    assert_eq!(paid, 3);
}

#[tokio::test]
async fn bulk_retry_counts_first_then_retries_only_the_matching_failures() {
    let a = Admin::start().await;
    let p = a.payee("acct_b", "USD").await;
    let closed: Vec<i64> = [
        a.failed(p, "account_closed").await,
        a.failed(p, "account_closed").await,
    ]
    .into();
    let other = a.failed(p, "account_frozen").await;
    let filter = json!({"failure_code": "account_closed", "status": "failed", "payee_id": p});
    let before = a.events().await;
    let (code, dry) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"filter": filter, "dry_run": true}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{dry}");
    assert_eq!(dry["matched"], 2);
    assert_eq!(a.events().await, before, "a dry run writes nothing");
    let (code, _) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"filter": {"status": "paid"}, "dry_run": true}),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"filter": {"colour": "red"}}),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, done) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"filter": filter, "dry_run": false}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{done}");
    assert_eq!(done["retried"], 2);
    for id in &closed {
        assert_eq!(a.status(*id).await, "queued");
        assert_eq!(
            a.last_event(*id).await,
            (
                "queued".into(),
                "operator:ada".into(),
                Some("operator bulk retry".into())
            )
        );
    }
    assert_eq!(a.status(other).await, "failed");
    assert!(a.queue.waiting().await.unwrap() >= 2);
}

/// Security finding 1: an empty or `null` body was a real retry of every
/// failed payout (`BulkBody::default()` had `dry_run = false`), payouts that
/// had been paid and then reversed included.
#[tokio::test]
async fn bulk_retry_is_a_dry_run_unless_asked_and_never_repays_a_reversed_payout() {
    let a = Admin::start().await;
    let p = a.payee("acct_bulk", "USD").await;
    let plain = a.failed(p, "account_closed").await;
    let reversed = a.failed(p, "account_closed").await;
    // Paid, then reversed by the gateway: failed with its paid_at kept.
    sqlx::query("UPDATE payouts SET paid_at = now(), gateway_transfer_id = 'tr_1' WHERE id = $1")
        .bind(reversed)
        .execute(a.pool())
        .await
        .unwrap();
    let before = a.events().await;
    for body in ["", "null", "{}", "{\"filter\": {}}"] {
        let resp = a
            .http
            .post(format!("{}/api/v1/payouts/bulk-retry", a.base))
            .bearer_auth(&a.admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "body {body:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["dry_run"], true, "body {body:?} must be a dry run: {v}");
        assert_eq!(v["matched"], 1, "the reversed payout is not counted: {v}");
        assert_eq!(v["excluded_paid_before"], 1, "{v}");
    }
    assert_eq!(
        a.events().await,
        before,
        "no body without dry_run false writes anything"
    );
    assert_eq!(a.status(plain).await, "failed");
    // A real run must name a filter that narrows the failed set.
    for filter in [json!({}), json!({"status": "failed"})] {
        let (code, v) = a
            .post(
                "/api/v1/payouts/bulk-retry",
                Some(&a.admin),
                json!({"filter": filter, "dry_run": false}),
            )
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains("filter"), "{v}");
    }
    assert_eq!(a.events().await, before);
    let (code, done) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"filter": {"payee_id": p}, "dry_run": false}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{done}");
    assert_eq!(done["retried"], 1, "{done}");
    assert_eq!(a.status(plain).await, "queued");
    assert_eq!(
        a.status(reversed).await,
        "failed",
        "a payout paid before is retried only by name"
    );
    // By name it can still be retried, on purpose.
    let (code, one) = a
        .post(
            &format!("/api/v1/payouts/{reversed}/retry"),
            Some(&a.admin),
            json!({"reason": "gateway reversed it; payee fixed their account"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{one}");
    assert_eq!(a.status(reversed).await, "queued");
    // A repeated key is refused, not read last-wins, and an error never
    // echoes a large input whole.
    let r = a
        .http
        .post(format!("{}/api/v1/payouts/bulk-retry", a.base))
        .bearer_auth(&a.admin)
        .header("content-type", "application/json")
        .body(r#"{"dry_run": true, "dry_run": false, "filter": {"payee_id": "1"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("appears twice"));
    let huge = format!(r#"{{"filter": {{"{}": "1"}}}}"#, "k".repeat(30_000));
    let r = a
        .http
        .post(format!("{}/api/v1/payouts/bulk-retry", a.base))
        .bearer_auth(&a.admin)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().len() < 1_000);
}

/// Security finding 5: half a request header, or a body declared and never
/// sent, held a connection open indefinitely, without credentials.
#[tokio::test]
async fn a_stalled_header_or_body_is_cut_off_by_the_listener() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Admin::start_with(&[
        ("PAYOUTS_ADMIN__HEADER_READ_TIMEOUT_SECS", "1"),
        ("PAYOUTS_ADMIN__REQUEST_TIMEOUT_SECS", "1"),
    ])
    .await;
    let addr = a.base.trim_start_matches("http://").to_string();
    // Half a header, then nothing: the server closes the connection.
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        half.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "a half-sent header is still open after 20 s");
    // A body declared and stalled, with valid credentials: 408.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/payouts/bulk-retry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"filter\"",
        a.admin
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stalled.read(&mut answer),
    )
    .await
    .expect("a stalled body is still waiting after 20 s")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The server still serves everyone else.
    assert_eq!(a.get("/health", None).await.0, StatusCode::OK);
}

/// Security finding 6: `/metrics` and `/health/ready` answered any `Host`, so
/// a page on another site could rebind its DNS name to the listener and read
/// them. Only addresses, single-label and cluster names and
/// `admin.allowed_hosts` are answered; anything else is 421 before any route.
#[tokio::test]
async fn a_host_name_the_listener_does_not_know_is_refused_before_any_route() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Admin::start_with(&[("PAYOUTS_ADMIN__ALLOWED_HOSTS", "payouts.example.com")]).await;
    let addr = a.base.trim_start_matches("http://").to_string();
    let status_for = |host: &'static str, path: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf).to_string();
            text.split(' ').nth(1).unwrap_or_default().to_string()
        }
    };
    for path in ["/metrics", "/health/ready", "/login", "/api/v1/session"] {
        assert_eq!(
            status_for("rebound.evil.example", path).await,
            "421",
            "{path}"
        );
    }
    assert_eq!(status_for("127.0.0.1:9300", "/metrics").await, "200");
    assert_eq!(
        status_for("payout-admin:9300", "/health/ready").await,
        "200"
    );
    assert_eq!(status_for("payouts.example.com", "/metrics").await, "200");
    let (_, metrics) = a.get("/metrics", None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(r#"payout_admin_refused_total{reason="host"}"#),
        "the refusals are counted"
    );
}

/// Security finding 6: a NUL byte in a filter or a reason gave 503 and an
/// ERROR log; a terminal escape in a reason was stored and printed raw. A
/// control character is refused at the edge (400 naming the field) and
/// nothing changes.
#[tokio::test]
async fn control_characters_are_refused_at_the_edge_and_change_nothing() {
    let a = Admin::start().await;
    let p = a.payee("acct_c", "USD").await;
    let failed = a.failed(p, "account_closed").await;
    let op = Some(a.operator.as_str());
    for reason in ["red \u{1b}[31m alert", "nul \u{0}", "bell \u{7}"] {
        let (code, body) = a
            .post(
                &format!("/api/v1/payouts/{failed}/retry"),
                op,
                json!({"reason": reason}),
            )
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["error"].as_str().unwrap().contains("reason"), "{body}");
        assert_eq!(a.status(failed).await, "failed");
    }
    for q in ["payee=%00", "failure_code=a%1Bb", "%00=1"] {
        let (code, body) = a.get(&format!("/api/v1/payouts?{q}"), op).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{q}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("control character"),
            "{body}"
        );
    }
    // Line breaks and tabs are text.
    let (code, body) = a
        .post(
            &format!("/api/v1/payouts/{failed}/retry"),
            op,
            json!({"reason": "asked by the payee\n\tticket 42"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
}

/// Security finding 5: 600 bad logins and bad bearer tokens in 5 s were all
/// processed, each a Postgres round trip, none logged.
#[tokio::test]
async fn a_source_that_keeps_failing_to_authenticate_is_locked_out() {
    let a = Admin::start_with(&[("PAYOUTS_ADMIN__AUTH_FAILURES_PER_MINUTE", "5")]).await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(a.get("/api/v1/session", Some("pat_wrong")).await.0);
    }
    assert_eq!(&codes[..5], &[StatusCode::UNAUTHORIZED; 5], "{codes:?}");
    assert_eq!(codes[7], StatusCode::TOO_MANY_REQUESTS, "{codes:?}");
    // While locked out, even a valid token from that source waits.
    let r = a
        .http
        .get(format!("{}/api/v1/session", a.base))
        .bearer_auth(&a.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait > 0 && wait <= 300, "{wait}");
    // And so does the login form.
    let login = a
        .http
        .post(format!("{}/login", a.base))
        .form(&[("token", a.admin.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    assert_eq!(login.headers()["location"], "/login?error=locked");
    // The login page carries no inline script: its CSP allows none.
    let page = a
        .http
        .get(format!("{}/login", a.base))
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let script = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("script-src"));
    assert!(script == Some("script-src 'self'"), "{csp}");
    assert!(!page.text().await.unwrap().contains("<script>"));
    assert_eq!(a.get("/login.js", None).await.0, StatusCode::OK);
    // API answers and errors are never content-sniffed.
    let r = a
        .http
        .get(format!("{}/api/v1/nothing-here", a.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let metrics = a
        .http
        .get(format!("{}/metrics", a.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let locked: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"payout_admin_refused_total{reason="locked_out"} "#))
        .expect("locked_out is counted")
        .parse()
        .unwrap();
    assert!(locked >= 3.0, "{locked}");
}

/// Security finding 5: no statement_timeout, so a viewer could keep the
/// pool busy with wide queries. The admin pool cancels a long statement and
/// the API says why.
#[tokio::test]
async fn the_admin_pool_cancels_a_statement_past_its_timeout() {
    let db = TestDb::new().await;
    let s = settings(
        &db.url,
        &redis_url(),
        &unique("st"),
        "http://127.0.0.1:9",
        &[],
    );
    let pool = payouts::db::connect_with_statement_timeout(
        &s.database,
        std::time::Duration::from_millis(200),
    )
    .await
    .unwrap();
    let e = sqlx::query("SELECT pg_sleep(5)")
        .execute(&pool)
        .await
        .unwrap_err();
    let api: payouts::admin::ApiError = e.into();
    assert!(matches!(api, payouts::admin::ApiError::TooSlow), "{api:?}");
    let resp = axum::response::IntoResponse::into_response(api);
    assert_eq!(resp.status().as_u16(), 503);
}

/// Security finding 6: tokens never expired, sessions had no idle timeout,
/// a revoked token's name could be reused with another role, and token
/// changes left no row in the database.
#[tokio::test]
async fn tokens_expire_names_are_never_reused_sessions_idle_out_and_changes_are_audited() {
    let a = Admin::start().await;
    let soon = (Utc::now() + Duration::hours(1)).to_rfc3339();
    let (code, made) = a
        .post(
            "/api/v1/tokens",
            Some(&a.admin),
            json!({"name": "temp", "role": "viewer", "expires_at": soon}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{made}");
    let temp = made["token"].as_str().unwrap().to_string();
    assert_eq!(
        a.get("/api/v1/session", Some(&temp)).await.0,
        StatusCode::OK
    );
    // An hour and a minute later the token no longer works.
    let later = Utc::now() + Duration::minutes(61);
    assert!(
        tokens::authenticate(a.pool(), &temp, later)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        tokens::authenticate(a.pool(), &temp, Utc::now())
            .await
            .unwrap()
            .is_some()
    );
    // An expiry in the past is refused.
    let (code, _) = a
        .post(
            "/api/v1/tokens",
            Some(&a.admin),
            json!({"name": "stale", "role": "viewer", "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    // Revoked, its name is never given to another credential.
    let r = a
        .http
        .delete(format!("{}/api/v1/tokens/temp", a.base))
        .bearer_auth(&a.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (code, again) = a
        .post(
            "/api/v1/tokens",
            Some(&a.admin),
            json!({"name": "temp", "role": "admin"}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{again}");
    assert!(again["error"].as_str().unwrap().contains("never reused"));
    // Both changes are in the audit log, with who and from where.
    let (code, audit) = a.get("/api/v1/audit", Some(&a.admin)).await;
    assert_eq!(code, StatusCode::OK);
    let rows: Vec<(String, String, String, Option<String>)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == "temp")
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["actor"].as_str().unwrap().to_string(),
                e["target"].as_str().unwrap().to_string(),
                e["source"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "token.revoke".into(),
                "operator:ada".into(),
                "temp".into(),
                Some("127.0.0.1".into())
            ),
            (
                "token.create".into(),
                "operator:ada".into(),
                "temp".into(),
                Some("127.0.0.1".into())
            ),
        ]
    );
    assert!(
        !audit.to_string().contains(&temp),
        "the audit log holds no secret"
    );
    assert_eq!(
        a.get("/api/v1/audit", Some(&a.operator)).await.0,
        StatusCode::FORBIDDEN
    );
    // A session used within its idle time lives on; one left idle ends.
    let (cookie, _) = a.login(&a.viewer).await;
    let value = cookie.split_once('=').unwrap().1;
    let idle = Duration::minutes(30);
    let t0 = Utc::now();
    assert!(
        tokens::session(a.pool(), value, t0 + Duration::minutes(20), idle)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        tokens::session(a.pool(), value, t0 + Duration::minutes(45), idle)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        tokens::session(a.pool(), value, t0 + Duration::minutes(80), idle)
            .await
            .unwrap()
            .is_none()
    );
}

fn hook(secret: &str, t: i64, body: &str) -> String {
    webhooks::signature_header(&[secret], t, body.as_bytes())
}

#[tokio::test]
async fn the_gateway_webhook_is_served_and_only_a_valid_event_changes_state() {
    let a = Admin::start().await;
    let p = a.payee("acct_w", "USD").await;
    let id = a.pending(p, "7.00", "USD", Duration::zero()).await;
    a.finish(
        id,
        Finish::InTransit {
            transfer_id: "tr_w1".into(),
        },
    )
    .await;
    let body = json!({"id": "evt_w1", "type": "transfer.paid",
        "data": {"id": "tr_w1", "status": "paid", "reference": format!("payout_{id}")}})
    .to_string();
    let now = Utc::now().timestamp();
    let send = |sig: String, body: String| {
        let http = a.http.clone();
        let url = format!("{}/webhooks/gateway", a.base);
        async move {
            http.post(url)
                .header("Gateway-Signature", sig)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let before = a.events().await;
    assert_eq!(
        send(hook("wrong", now, &body), body.clone()).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(hook(HOOK_SECRET, now - 301, &body), body.clone()).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send("garbage".into(), body.clone()).await,
        StatusCode::BAD_REQUEST
    );
    let junk = "{not json";
    assert_eq!(
        send(hook(HOOK_SECRET, now, junk), junk.into()).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        (a.events().await, a.status(id).await),
        (before, "in_transit".into())
    );
    assert_eq!(
        send(hook(HOOK_SECRET, now, &body), body.clone()).await,
        StatusCode::OK
    );
    assert_eq!(a.status(id).await, "paid");
    let after = a.events().await;
    assert_eq!(
        send(hook(HOOK_SECRET, now, &body), body.clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        a.events().await,
        after,
        "a replayed event id changes nothing"
    );
    let unknown = json!({"id": "evt_w2", "type": "transfer.paid",
        "data": {"id": "tr_nobody", "status": "paid", "reference": "payout_999999"}})
    .to_string();
    let code = send(hook(HOOK_SECRET, now, &unknown), unknown.clone()).await;
    assert!(
        code.is_success(),
        "an unknown payout is acknowledged (and recorded as unmatched): {code}"
    );
    assert_eq!(a.events().await, after);
}

#[tokio::test]
async fn the_earnings_intake_is_served_to_operators() {
    let a = Admin::start().await;
    let p = a.payee("acct_e", "USD").await;
    let body = json!({"payee_id": p, "source": "booking", "external_ref": "B-77",
                      "gross": "40.00", "currency": "USD", "completed_at": "2026-11-02T10:00:00Z"});
    let (code, out) = a
        .post("/v1/earnings", Some(&a.operator), body.clone())
        .await;
    assert_eq!(code, StatusCode::CREATED, "{out}");
    let (code, _) = a.post("/v1/earnings", Some(&a.operator), body).await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn the_openapi_description_lists_every_api_route() {
    let a = Admin::start().await;
    let (code, doc) = a.get("/api/openapi.json", Some(&a.viewer)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/api/v1/session",
        "/api/v1/overview",
        "/api/v1/payouts",
        "/api/v1/payouts/{id}",
        "/api/v1/payouts/{id}/{action}",
        "/api/v1/payouts/bulk-retry",
        "/api/v1/failures",
        "/api/v1/tokens",
        "/api/v1/tokens/{name}",
        "/v1/earnings",
        "/webhooks/gateway",
        "/webhooks/stripe",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The signature header parser never panics, and nothing but a real
    /// signature verifies.
    #[test]
    fn signature_headers_never_panic_and_never_forge(header in ".{0,200}", t in any::<i64>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let secrets = [String::from("s3cret").into()];
        let r = webhooks::verify(&header, &body, &secrets, std::time::Duration::from_secs(300), t);
        prop_assert!(r.is_err());
        let shaped = format!("t={t},v1={header}");
        prop_assert!(webhooks::verify(&shaped, &body, &secrets, std::time::Duration::from_secs(300), t).is_err());
    }

    /// The query-string filter parser never panics: it accepts or names the problem.
    #[test]
    fn filter_parser_never_panics(q in "[a-z_=&%0-9A-Z:+.-]{0,120}") {
        if let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(&q) {
            match payouts::db::filter::PageRequest::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
                Ok(r) => prop_assert!((1..=500).contains(&r.limit)),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}

#[tokio::test]
async fn random_queries_over_http_get_200_or_400_and_change_nothing() {
    use proptest::{strategy::ValueTree, test_runner::TestRunner};
    let a = Admin::start().await;
    let p = a.payee("acct_q", "USD").await;
    a.failed(p, "account_closed").await;
    let before = (a.events().await, a.status(1).await);
    let keys = [
        "status",
        "payee_id",
        "currency",
        "failure_code",
        "due_from",
        "paid_to",
        "limit",
        "cursor",
        "x",
    ];
    let mut runner = TestRunner::deterministic();
    let strategy = proptest::collection::vec((0..keys.len(), ".{0,30}"), 0..5);
    for _ in 0..150 {
        let pairs = strategy.new_tree(&mut runner).unwrap().current();
        let q = serde_urlencoded::to_string(
            pairs
                .iter()
                .map(|(k, v)| (keys[*k], v.as_str()))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let (code, body) = a
            .get(&format!("/api/v1/payouts?{q}"), Some(&a.viewer))
            .await;
        assert!(
            code == StatusCode::OK || code == StatusCode::BAD_REQUEST,
            "{q}: {code} {body}"
        );
        if code == StatusCode::BAD_REQUEST {
            assert!(body["error"].is_string());
        }
    }
    assert_eq!((a.events().await, a.status(1).await), before);
    eventually(
        std::time::Duration::from_secs(5),
        "server still answers",
        || async { (a.get("/health", None).await.0 == StatusCode::OK).then_some(()) },
    )
    .await;
}

/// Issue 19: every answer carries an `x-request-id` (the caller's short
/// token, else a fresh ULID) for matching a report to the logs.
#[tokio::test]
async fn every_answer_carries_a_request_id() {
    let a = Admin::start().await;
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let r = a
        .http
        .get(format!("{}/health", a.base))
        .send()
        .await
        .unwrap();
    let fresh = id_of(&r).expect("an id");
    assert_eq!(fresh.len(), 26, "a ULID: {fresh}");
    let r = a
        .http
        .get(format!("{}/api/v1/session", a.base))
        .header("x-request-id", "support-ticket-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(id_of(&r).as_deref(), Some("support-ticket-42"));
    let r = a
        .http
        .get(format!("{}/health", a.base))
        .header("x-request-id", "x".repeat(200))
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&r).unwrap().len(), 26, "an odd id is replaced");
}

/// Issue 19: an admin pauses the whole fleet from the API (the Redis key
/// every worker's guard reads before a claim), sees it in `GET /fleet`, and
/// resumes it; both are audited and counted, and only an admin may.
#[tokio::test]
async fn an_admin_pauses_and_resumes_the_fleet_and_workers_obey() {
    use payouts::gateway::guard::{GatewayGuard, GuardSettings};
    let a = Admin::start().await;
    let ok = |action: &str| {
        payouts::metrics::ADMIN_ACTIONS
            .with_label_values(&[action, "ok"])
            .get()
    };
    let (pauses, resumes) = (ok("fleet_pause"), ok("fleet_resume"));
    let (code, v) = a.get("/api/v1/fleet", Some(&a.viewer)).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["paused"], false);
    for t in [&a.viewer, &a.operator] {
        let (code, v) = a.post("/api/v1/fleet/pause", Some(t), json!({})).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{v}");
    }
    // Bad input names the field and changes nothing.
    let (code, v) = a
        .post("/api/v1/fleet/pause", Some(&a.admin), json!({"minutes": 0}))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("minutes"), "{v}");
    let audited = |a: &Admin| {
        let pool = a.pool().clone();
        async move {
            sqlx::query_as::<_, (String, String)>(
                "SELECT action, actor FROM audit_log WHERE target = 'fleet' ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert!(audited(&a).await.is_empty());
    assert_eq!(
        a.get("/api/v1/fleet", Some(&a.viewer)).await.1["paused"],
        false
    );
    // A session needs its CSRF secret for it, like every action.
    let (cookie, csrf) = a.login(&a.admin).await;
    let r = a
        .as_session(reqwest::Method::POST, "/api/v1/fleet/pause", &cookie, None)
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    let (code, v) = a
        .post(
            "/api/v1/fleet/pause",
            Some(&a.admin),
            json!({"reason": "bank holiday"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["paused"], true, "{v}");
    assert_eq!(v["by"]["actor"], "operator:ada", "{v}");
    assert!(v["remaining_secs"].as_u64().unwrap() > 6 * 24 * 3600, "{v}");
    let (_, seen) = a.get("/api/v1/fleet", Some(&a.viewer)).await;
    assert_eq!(seen["paused"], true);
    assert_eq!(seen["by"]["detail"]["reason"], "bank holiday");

    // A worker's guard over the same prefix holds its claims.
    let s = settings(
        &a.db.url,
        &redis_url(),
        a.queue.prefix(),
        "http://127.0.0.1:9",
        &[],
    );
    let conn = payouts::queue::connect(&s.redis).await.unwrap();
    let guard = Arc::new(GatewayGuard::new(
        conn,
        a.queue.prefix(),
        GuardSettings::from_settings(&s.gateway),
    ));
    let waiting = tokio::spawn({
        let g = guard.clone();
        async move { g.wait_unpaused().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a worker claims nothing while paused"
    );

    // Session with its CSRF secret: resumes, and the waiting worker goes on.
    let r = a
        .http
        .post(format!("{}/api/v1/fleet/resume", a.base))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["paused"], false);
    eventually(
        std::time::Duration::from_secs(10),
        "the paused worker to go on after the resume",
        || {
            let done = waiting.is_finished();
            async move { done.then_some(()) }
        },
    )
    .await;
    assert_eq!(
        audited(&a).await,
        [
            ("fleet.pause".to_string(), "operator:ada".to_string()),
            ("fleet.resume".to_string(), "operator:ada".to_string()),
        ]
    );
    assert_eq!(ok("fleet_pause"), pauses + 1);
    assert_eq!(ok("fleet_resume"), resumes + 1);
}

/// Issue 19: the go-to box finds a payout by id, idempotency key (and a later
/// key of its chain) and transfer id, and a payee by account or by the words
/// of its name; wildcards and query syntax in `q` are plain text, bad `q` is
/// a 400 naming it, and no more than 20 results come back.
#[tokio::test]
async fn search_finds_payouts_and_payees_by_every_name_they_go_by() {
    let a = Admin::start().await;
    let ada = payees::create(
        a.pool(),
        "Ada Lovelace",
        "acct_ada_1",
        "USD".parse().unwrap(),
    )
    .await
    .unwrap()
    .id;
    let bob = payees::create(a.pool(), "Bob Stone", "acct_bob", "USD".parse().unwrap())
        .await
        .unwrap()
        .id;
    let paid = a.paid(ada.get()).await;
    let other = a.pending(bob.get(), "1.00", "USD", Duration::zero()).await;
    let find = |q: &str| {
        let path = format!("/api/v1/search?q={}", urlencode(q));
        let a = &a;
        let q = q.to_string();
        async move {
            let (code, v) = a.get(&path, Some(&a.viewer)).await;
            assert_eq!(code, StatusCode::OK, "{q}: {v}");
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h["kind"].as_str().unwrap().to_string(),
                        h["id"].as_i64().unwrap(),
                        h["matched"].as_str().unwrap().to_string(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let payout = |id: i64, m: &str| ("payout".to_string(), id, m.to_string());
    let payee = |id: i64, m: &str| ("payee".to_string(), id, m.to_string());
    assert_eq!(find(&paid.to_string()).await[0], payout(paid, "payout id"));
    assert_eq!(
        find(&format!("#{other}")).await[0],
        payout(other, "payout id")
    );
    assert_eq!(
        find(&format!("payout_{paid}")).await,
        [payout(paid, "idempotency key")]
    );
    assert_eq!(
        find(&format!("payout_{paid}-2")).await,
        [payout(paid, "idempotency key")]
    );
    assert_eq!(
        find(&format!("tr_{paid}")).await,
        [payout(paid, "transfer id")]
    );
    assert_eq!(
        find("acct_ada_1").await,
        [payee(ada.get(), "gateway account")]
    );
    assert_eq!(find("acct_").await.len(), 2, "an account prefix");
    assert_eq!(find("love").await, [payee(ada.get(), "payee name")]);
    assert_eq!(find("ada LOVELACE").await, [payee(ada.get(), "payee name")]);
    // LIKE wildcards and tsquery syntax are text, not patterns.
    for q in ["%", "acct%", "_", "a:* | b", "!(", "'", "\\"] {
        assert!(find(q).await.is_empty(), "{q:?} matched something");
    }
    for q in ["", "   ", &"x".repeat(201)] {
        let (code, v) = a
            .get(
                &format!("/api/v1/search?q={}", urlencode(q)),
                Some(&a.viewer),
            )
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{q:?}: {v}");
        assert!(v["error"].as_str().unwrap().starts_with("q:"), "{v}");
    }
    let (code, _) = a
        .get("/api/v1/search?q=1&colour=red", Some(&a.viewer))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _) = a.get("/api/v1/search?q=1", None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    // At most 20.
    for i in 0..25 {
        payees::create(
            a.pool(),
            &format!("Many {i}"),
            &format!("acct_many_{i}"),
            "USD".parse().unwrap(),
        )
        .await
        .unwrap();
    }
    assert_eq!(find("acct_many").await.len(), 20);
    assert_eq!(find("many").await.len(), 20);
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)]).unwrap()[2..].to_string()
}

/// Issue 19: the selected rows of the payouts list. A bulk cancel
/// (operator) and a bulk retry by ids (admin) count first, change nothing
/// until `"dry_run": false`, go through the single action (one event each,
/// the caller as actor), leave out payouts they cannot move (a paid one, a
/// reversed one for retry) and say which.
#[tokio::test]
async fn selected_payouts_are_counted_then_cancelled_or_retried_one_by_one() {
    let a = Admin::start().await;
    let p = a.payee("acct_sel", "USD").await;
    let pending = a.pending(p, "5.00", "USD", Duration::hours(1)).await;
    let failed = a.failed(p, "account_closed").await;
    let paid = a.paid(p).await;
    let cancel_ids = json!([pending, failed, paid, 999_999, pending]);
    let before = a.events().await;

    // Viewers may not; the default is a dry run.
    let (code, _) = a
        .post(
            "/api/v1/payouts/bulk-cancel",
            Some(&a.viewer),
            json!({"ids": cancel_ids}),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let (code, dry) = a
        .post(
            "/api/v1/payouts/bulk-cancel",
            Some(&a.operator),
            json!({"ids": cancel_ids}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["selected"], 4, "repeats count once: {dry}");
    assert_eq!(dry["matched"], 2, "{dry}");
    assert_eq!(dry["not_found"], 1, "{dry}");
    assert_eq!(dry["skipped"], json!([{"id": paid, "status": "paid"}]));
    assert_eq!(a.events().await, before, "a dry run writes nothing");
    for bad in [
        json!({"ids": []}),
        json!({"ids": [0]}),
        json!({"ids": ["x"]}),
    ] {
        let (code, v) = a
            .post(
                "/api/v1/payouts/bulk-cancel",
                Some(&a.operator),
                bad.clone(),
            )
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains("ids"), "{v}");
    }
    assert_eq!(a.events().await, before);

    // A reversed payout and another failed one, for the retry.
    let reversed = a.failed(p, "account_closed").await;
    sqlx::query("UPDATE payouts SET paid_at = now(), gateway_transfer_id = 'tr_r' WHERE id = $1")
        .bind(reversed)
        .execute(a.pool())
        .await
        .unwrap();
    let again = a.failed(p, "account_frozen").await;
    let retry_ids = json!([failed, reversed, again, pending]);
    let (code, _) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.operator),
            json!({"ids": retry_ids}),
        )
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "bulk retry stays admin only");
    let (code, v) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"ids": retry_ids, "filter": {"payee_id": p}}),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    let (code, dry) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"ids": retry_ids}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["matched"], 2, "{dry}");
    assert_eq!(dry["excluded_paid_before"], 1, "{dry}");
    let (code, done) = a
        .post(
            "/api/v1/payouts/bulk-retry",
            Some(&a.admin),
            json!({"ids": [again], "dry_run": false}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{done}");
    assert_eq!(done["retried"], 1);
    assert_eq!(a.status(again).await, "queued");
    assert_eq!(
        a.last_event(again).await,
        (
            "queued".into(),
            "operator:ada".into(),
            Some("operator bulk retry".into())
        )
    );
    assert_eq!(a.status(reversed).await, "failed");

    // The real cancel: each through the single cancel, one event each.
    let (code, done) = a
        .post(
            "/api/v1/payouts/bulk-cancel",
            Some(&a.operator),
            json!({"ids": [pending, failed, paid, reversed], "dry_run": false, "reason": "duplicates"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{done}");
    assert_eq!(done["cancelled"], 3, "{done}");
    assert_eq!(done["ids"], json!([pending, failed, reversed]));
    for id in [pending, failed, reversed] {
        assert_eq!(a.status(id).await, "cancelled");
        assert_eq!(
            a.last_event(id).await,
            (
                "cancelled".into(),
                "operator:otto".into(),
                Some("duplicates".into())
            )
        );
    }
    assert_eq!(a.status(paid).await, "paid");
}

/// Issue 19: the read-only views' routes: payees with their terms,
/// settlements with their lines (amounts at the currency's exponent),
/// reconciliation runs, each paged newest first; tokens stay admin only.
#[tokio::test]
async fn payees_settlements_and_reconcile_runs_are_served_read_only() {
    use payouts::{
        db::{earnings, payee_terms},
        domain::{Policy, earning::NewEarning},
        services::settlement,
    };
    let a = Admin::start().await;
    let p = a.payee("acct_view", "USD").await;
    let other = a.payee("acct_view_2", "USD").await;
    payee_terms::set_deduction(
        a.pool(),
        p,
        "equipment rental",
        Money::parse("5", "USD").unwrap(),
        Utc::now(),
    )
    .await
    .unwrap();
    let policy: Policy = include_str!("../../config/policy.toml").parse().unwrap();
    let done = Utc::now() - Duration::days(40);
    let e = NewEarning {
        payee_id: p,
        source: "booking".into(),
        external_ref: "bk-1".into(),
        gross: Money::parse("120.00", "USD").unwrap(),
        completed_at: done,
        release_at: policy.release_at(done),
    };
    let mut conn = a.pool().acquire().await.unwrap();
    earnings::record(&mut conn, &e, "operator:test", done)
        .await
        .unwrap();
    drop(conn);
    settlement::run(
        a.pool(),
        &policy,
        Utc::now(),
        &settlement::Options {
            payee: Some(p),
            actor: "settlement:test".into(),
        },
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO reconcile_runs (started_at, finished_at, since, checked, fixed, mismatches, actor, failed, error)
         VALUES (now(), now(), now() - interval '1 day', 12, 1, '{\"paid_in_db_unknown_to_gateway\": 1}', 'cli:ops', false, NULL),
                (now(), now(), now() - interval '1 day', 0, 0, '{}', 'cli:ops', true, 'no look-up endpoint')",
    )
    .execute(a.pool())
    .await
    .unwrap();

    // Payees, paged newest first.
    let (code, page) = a.get("/api/v1/payees?limit=1", Some(&a.viewer)).await;
    assert_eq!(code, StatusCode::OK, "{page}");
    assert_eq!(page["items"][0]["id"], other);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, page) = a
        .get(
            &format!("/api/v1/payees?limit=1&cursor={cursor}"),
            Some(&a.viewer),
        )
        .await;
    assert_eq!(page["items"][0]["id"], p);
    let (code, one) = a.get(&format!("/api/v1/payees/{p}"), Some(&a.viewer)).await;
    assert_eq!(code, StatusCode::OK, "{one}");
    assert_eq!(one["payee"]["gateway_account"], "acct_view");
    assert!(one["terms"]["payout_method"].is_string(), "{one}");
    assert_eq!(
        one["deductions"][0]["amount"], "5.00",
        "at the currency's exponent: {one}"
    );
    assert_eq!(one["deductions"][0]["label"], "equipment rental");
    let settlement_id = one["settlements"][0]["id"].as_i64().expect("a settlement");

    // Settlements, of a payee, and one with its lines summing to its net.
    let (code, list) = a
        .get(
            &format!("/api/v1/settlements?payee_id={p}"),
            Some(&a.viewer),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{list}");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (_, none) = a
        .get(
            &format!("/api/v1/settlements?payee_id={other}"),
            Some(&a.viewer),
        )
        .await;
    assert!(none["items"].as_array().unwrap().is_empty());
    let (code, one) = a
        .get(
            &format!("/api/v1/settlements/{settlement_id}"),
            Some(&a.viewer),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{one}");
    assert_eq!(one["payee"]["id"], p);
    let lines = one["lines"].as_array().unwrap();
    assert!(lines.len() >= 3, "earning, commission, deduction...: {one}");
    let sum: rust_decimal::Decimal = lines
        .iter()
        .map(|l| {
            l["amount"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        sum.to_string(),
        one["settlement"]["net"].as_str().unwrap(),
        "{one}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "deduction" && l["amount"] == "-5.00"),
        "{one}"
    );

    // Reconcile runs, the failed one marked.
    let (code, runs) = a.get("/api/v1/reconcile-runs", Some(&a.viewer)).await;
    assert_eq!(code, StatusCode::OK, "{runs}");
    assert_eq!(runs["items"][0]["failed"], true);
    assert_eq!(runs["items"][0]["error"], "no look-up endpoint");
    assert_eq!(runs["items"][1]["checked"], 12);
    assert_eq!(
        runs["items"][1]["mismatches"]["paid_in_db_unknown_to_gateway"],
        1
    );

    // Bad input names the parameter; unknown ids are 404s; tokens are admin only.
    for (path, field) in [
        ("/api/v1/payees?limit=0", "limit"),
        ("/api/v1/payees?cursor=x", "cursor"),
        ("/api/v1/settlements?payee_id=-1", "payee_id"),
        ("/api/v1/reconcile-runs?colour=red", "colour"),
        ("/api/v1/payees/abc", "id"),
    ] {
        let (code, v) = a.get(path, Some(&a.viewer)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{path}: {v}");
    }
    assert_eq!(
        a.get("/api/v1/payees/999999", Some(&a.viewer)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.get("/api/v1/settlements/999999", Some(&a.viewer)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.get("/api/v1/tokens", Some(&a.operator)).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        a.get("/api/v1/tokens", Some(&a.admin)).await.0,
        StatusCode::OK
    );
}

/// Every route the dashboard's new screens use is in the OpenAPI document.
#[tokio::test]
async fn the_openapi_description_lists_the_dashboard_routes() {
    let a = Admin::start().await;
    let (_, doc) = a.get("/api/openapi.json", Some(&a.viewer)).await;
    for (path, method) in [
        ("/api/v1/fleet", "get"),
        ("/api/v1/fleet/pause", "post"),
        ("/api/v1/fleet/resume", "post"),
        ("/api/v1/search", "get"),
        ("/api/v1/payouts/bulk-cancel", "post"),
        ("/api/v1/payouts/bulk-retry", "post"),
        ("/api/v1/payees", "get"),
        ("/api/v1/payees/{id}", "get"),
        ("/api/v1/settlements", "get"),
        ("/api/v1/settlements/{id}", "get"),
        ("/api/v1/reconcile-runs", "get"),
        ("/api/v1/tokens", "get"),
        ("/api/v1/audit", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from openapi.json"
        );
    }
}

/// A selection names at most 500 payouts (each moves through the single
/// action, within the request's timeout); more is a 400 naming `ids`.
#[tokio::test]
async fn a_selection_of_more_than_500_payouts_is_refused() {
    let a = Admin::start().await;
    let ids: Vec<i64> = (1..=501).collect();
    for (path, token) in [
        ("/api/v1/payouts/bulk-cancel", &a.operator),
        ("/api/v1/payouts/bulk-retry", &a.admin),
    ] {
        let (code, v) = a.post(path, Some(token), json!({"ids": ids})).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().starts_with("ids:"), "{v}");
        let (code, v) = a.post(path, Some(token), json!({"ids": &ids[..500]})).await;
        assert_eq!(code, StatusCode::OK, "{path}: {v}");
        assert_eq!(v["not_found"], 500, "{v}");
    }
}

/// Issue 13 ("Reversible"): a cancel returns a settlement payout's money to
/// the balance, so the API's cancel of a payout sent without a proven answer
/// asks the gateway first: refused (and recorded) when the gateway holds the
/// transfer, refused when the gateway cannot be asked, done when it has none.
#[tokio::test]
async fn a_cancel_of_a_payout_whose_money_may_have_moved_asks_the_gateway_first() {
    use payouts::{
        gateway::{Gateway, TransferRequest, http::HttpGateway},
        testkit::mock_gateway::{MockGateway, MockGatewayConfig},
    };
    let mock = MockGateway::start(MockGatewayConfig::default())
        .await
        .unwrap();
    let a = Admin::start_with(&[("PAYOUTS_GATEWAY__BASE_URL", mock.base_url.as_str())]).await;
    let p = a.payee("acct_c", "USD").await;
    let paid_there = a.failed(p, "attempts_exhausted").await;
    let none_there = a.failed(p, "attempts_exhausted").await;
    let refused = a.failed(p, "account_closed").await;
    // The gateway did move the money of `paid_there` (its answers were lost).
    let s = settings(&a.db.url, &redis_url(), "x", &mock.base_url, &[]);
    let gw = HttpGateway::new(&s.gateway).unwrap();
    gw.transfer(&TransferRequest {
        amount_minor: 1000,
        currency: "USD".into(),
        destination: "acct_c".into(),
        reference: format!("payout_{paid_there}"),
        metadata: Default::default(),
        idempotency_key: format!("payout_{paid_there}"),
        key_index: 0,
        first_attempt: true,
    })
    .await;
    let op = Some(a.operator.as_str());
    let cancel = |id: i64| format!("/api/v1/payouts/{id}/cancel");

    let (code, body) = a.post(&cancel(paid_there), op, json!({})).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the gateway holds transfer"),
        "{body}"
    );
    assert_eq!(body["status"], json!("paid"));
    assert_eq!(
        a.status(paid_there).await,
        "paid",
        "recorded what the gateway says"
    );

    let (code, body) = a.post(&cancel(none_there), op, json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (to, _, why) = a.last_event(none_there).await;
    assert_eq!(to, "cancelled");
    assert!(why.unwrap().contains("the gateway holds no transfer"));

    // A refusal proves nothing moved: no look-up needed.
    let (code, body) = a.post(&cancel(refused), op, json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(mock.gateway.ledger().len(), 1);

    // With the gateway unreachable, a payout that may have been paid stays as it is.
    let down = Admin::start().await;
    let p = down.payee("acct_d", "USD").await;
    let unsure = down.failed(p, "attempts_exhausted").await;
    let (code, body) = down
        .post(&cancel(unsure), Some(down.operator.as_str()), json!({}))
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("could not be asked"),
        "{body}"
    );
    assert_eq!(down.status(unsure).await, "failed");
}

/// The bulk cancel is the single cancel, payout by payout: a selected payout
/// whose money the gateway moved (its answers lost) is not cancelled but
/// recorded as the gateway says, and the answer says why; the others are.
#[tokio::test]
async fn a_bulk_cancel_asks_the_gateway_first_like_the_single_cancel() {
    use payouts::{
        gateway::{Gateway, TransferRequest, http::HttpGateway},
        testkit::mock_gateway::{MockGateway, MockGatewayConfig},
    };
    let mock = MockGateway::start(MockGatewayConfig::default())
        .await
        .unwrap();
    let a = Admin::start_with(&[("PAYOUTS_GATEWAY__BASE_URL", mock.base_url.as_str())]).await;
    let p = a.payee("acct_bc", "USD").await;
    let paid_there = a.failed(p, "attempts_exhausted").await;
    let none_there = a.failed(p, "attempts_exhausted").await;
    let s = settings(&a.db.url, &redis_url(), "x", &mock.base_url, &[]);
    HttpGateway::new(&s.gateway)
        .unwrap()
        .transfer(&TransferRequest {
            amount_minor: 1000,
            currency: "USD".into(),
            destination: "acct_bc".into(),
            reference: format!("payout_{paid_there}"),
            metadata: Default::default(),
            idempotency_key: format!("payout_{paid_there}"),
            key_index: 0,
            first_attempt: true,
        })
        .await;
    let (code, done) = a
        .post(
            "/api/v1/payouts/bulk-cancel",
            Some(&a.operator),
            json!({"ids": [paid_there, none_there], "dry_run": false}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{done}");
    assert_eq!(done["cancelled"], 1, "{done}");
    assert_eq!(done["ids"], json!([none_there]));
    assert_eq!(done["refused"][0]["id"], paid_there, "{done}");
    assert_eq!(done["refused"][0]["status"], "paid", "{done}");
    assert!(
        done["refused"][0]["error"]
            .as_str()
            .unwrap()
            .contains("the gateway holds transfer"),
        "{done}"
    );
    assert_eq!(a.status(paid_there).await, "paid");
    assert_eq!(a.status(none_there).await, "cancelled");
}

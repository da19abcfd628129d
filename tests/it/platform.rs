//! The platform's side of the fleet (#17) over real HTTP, Postgres and
//! Redis, and `payoutctl` as a binary: payee management (suspend, resume,
//! change of account), the `integration` role, and every refusal naming
//! what is wrong and changing nothing.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use common::{Ctl, TestDb, redis_url, settings, unique};
use payouts::{
    admin::{self, AdminState},
    clock::SystemClock,
    db::{
        payees,
        payouts::{self as db_payouts, Finish},
        tokens::{self, Role},
    },
    domain::{Currency, Money},
    queue::Queue,
};
use reqwest::{StatusCode, redirect::Policy};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Server {
    db: TestDb,
    settings: Arc<payouts::config::Settings>,
    base: String,
    viewer: String,
    operator: String,
    admin: String,
    platform: String,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    async fn start() -> Server {
        Server::start_with(&[]).await
    }

    async fn start_with(extra: &[(&str, &str)]) -> Server {
        let db = TestDb::new().await;
        let s = settings(
            &db.url,
            &redis_url(),
            &unique("plat"),
            "http://127.0.0.1:9",
            extra,
        );
        let conn = payouts::queue::connect(&s.redis).await.unwrap();
        let queue = Queue::from_settings(conn, &s);
        let settings = Arc::new(s);
        let state = AdminState::new(
            db.pool.clone(),
            queue,
            settings.clone(),
            Arc::new(SystemClock),
        );
        let stop = CancellationToken::new();
        let (addr, _) = admin::serve("127.0.0.1:0".parse().unwrap(), state, stop.clone())
            .await
            .unwrap();
        let token =
            async |name: &str, role: Role| tokens::create(&db.pool, name, role).await.unwrap().1;
        let viewer = token("vera", Role::Viewer).await;
        let operator = token("otto", Role::Operator).await;
        let admin = token("ada", Role::Admin).await;
        let platform = token("market-backend", Role::Integration).await;
        Server {
            db,
            settings,
            base: format!("http://{addr}"),
            viewer,
            operator,
            admin,
            platform,
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

    async fn send(
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
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    async fn payee(&self, account: &str) -> i64 {
        (payees::create(
            self.pool(),
            account,
            account,
            "USD".parse::<Currency>().unwrap(),
        )
        .await
        .unwrap()
        .id)
            .get()
    }

    async fn due(&self, payee: i64, amount: &str) -> i64 {
        let now = Utc::now();
        let money =
            Money::new(amount.parse().unwrap(), "USD".parse::<Currency>().unwrap()).unwrap();
        (db_payouts::create(
            self.pool(),
            payouts::domain::PayeeId::new(payee),
            money,
            now - Duration::seconds(5),
            "test",
            now,
        )
        .await
        .unwrap()
        .id)
            .get()
    }

    async fn status(&self, id: i64) -> String {
        sqlx::query_scalar("SELECT status FROM payouts WHERE id = $1")
            .bind(id)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    /// Everything a refused request must leave as it was.
    async fn state(&self) -> (Vec<(i64, String, String)>, i64, i64, i64) {
        let payees: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT id, status, gateway_account FROM payees ORDER BY id")
                .fetch_all(self.pool())
                .await
                .unwrap();
        let count = async |sql: &str| -> i64 {
            sqlx::query_scalar(sql)
                .fetch_one(self.pool())
                .await
                .unwrap()
        };
        (
            payees,
            count("SELECT count(*) FROM payout_events").await,
            count("SELECT count(*) FROM audit_log").await,
            count("SELECT count(*) FROM payouts WHERE status <> 'pending'").await,
        )
    }

    /// One producer pass over what is due (the due scan).
    async fn due_scan(&self) -> Vec<payouts::domain::PayoutId> {
        let now = Utc::now();
        db_payouts::queue_due(
            self.pool(),
            now,
            100,
            now + Duration::seconds(60),
            "producer:t",
        )
        .await
        .unwrap()
    }

    async fn audit(&self, action: &str) -> Vec<(String, String, Value)> {
        sqlx::query_as::<_, (String, String, sqlx::types::Json<Value>)>(
            "SELECT actor, target, detail FROM audit_log WHERE action = $1 ORDER BY id",
        )
        .bind(action)
        .fetch_all(self.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|(a, t, d)| (a, t, d.0))
        .collect()
    }
}

/// A refused command: its arguments, its environment, its exit code and what its line says.
type CliCase<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], i32, &'a str);

fn error_of(body: &Value) -> String {
    body["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_suspended_payee_is_not_paid_until_resumed_and_its_queued_payouts_wait() {
    let s = Server::start().await;
    let p = s.payee("acct_sus").await;
    let other = s.payee("acct_other").await;
    let queued = s.due(p, "10.00").await;
    assert_eq!(s.due_scan().await, [queued]);
    let waiting = s.due(p, "20.00").await;
    let others = s.due(other, "30.00").await;

    let (code, out) = s
        .post(
            &format!("/api/v1/payees/{p}/suspend"),
            &s.operator,
            json!({"reason": "fraud review"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{out}");
    assert_eq!(out["payee"]["status"], "suspended");
    assert_eq!(out["parked"], json!([queued]), "the queued payout waits");
    assert_eq!(s.status(queued).await, "pending");
    let (to, actor, reason): (String, String, Option<String>) = sqlx::query_as(
        "SELECT to_status, actor, reason FROM payout_events WHERE payout_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(queued)
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!(
        (to.as_str(), actor.as_str(), reason.as_deref()),
        (
            "pending",
            "operator:otto",
            Some("payee suspended: fraud review")
        )
    );
    assert_eq!(
        s.audit("payee.suspend").await[0].0,
        "operator:otto",
        "audited with its actor"
    );

    // The due scan passes the suspended payee by; the others are paid.
    assert_eq!(s.due_scan().await, [others]);
    assert_eq!(s.status(waiting).await, "pending");

    // A job already in Redis for a payout of the payee (queued before the
    // suspension committed) finds nothing to claim: it goes back to pending.
    sqlx::query("UPDATE payouts SET status = 'queued', lease_until = now() + interval '1 minute' WHERE id = $1")
        .bind(waiting)
        .execute(s.pool())
        .await
        .unwrap();
    let now = Utc::now();
    let claimed = db_payouts::claim(
        s.pool(),
        payouts::domain::PayoutId::new(waiting),
        "worker:w",
        now,
        now + Duration::seconds(30),
    )
    .await
    .unwrap();
    assert!(
        claimed.is_none(),
        "a suspended payee's payout is not claimed"
    );
    assert_eq!(s.status(waiting).await, "pending");

    // Bad input: named, nothing changed.
    let before = s.state().await;
    let (code, out) = s
        .post(
            &format!("/api/v1/payees/{p}/suspend"),
            &s.operator,
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_of(&out).contains("suspended already"), "{out}");
    let (code, out) = s
        .post(
            &format!("/api/v1/payees/{other}/resume"),
            &s.operator,
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_of(&out).contains("not suspended"), "{out}");
    let (code, out) = s
        .post("/api/v1/payees/99999/suspend", &s.operator, json!({}))
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(error_of(&out).contains("payee 99999 not found"), "{out}");
    let (code, out) = s
        .post("/api/v1/payees/x/suspend", &s.operator, json!({}))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{out}");
    let (code, out) = s
        .post(
            &format!("/api/v1/payees/{other}/suspend"),
            &s.operator,
            json!({"why": "typo"}),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(error_of(&out).contains("why"), "{out}");
    for token in [&s.viewer, &s.platform] {
        let (code, _) = s
            .post(&format!("/api/v1/payees/{other}/suspend"), token, json!({}))
            .await;
        assert_eq!(code, StatusCode::FORBIDDEN);
    }
    // An operator cannot queue (enqueue now, or retry) a suspended payee's
    // payout: the claim would only put it back; the answer says why.
    let (code, out) = s
        .post(
            &format!("/api/v1/payouts/{waiting}/enqueue"),
            &s.operator,
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{out}");
    assert!(
        error_of(&out).contains(&format!(
            "payout {waiting} belongs to payee {p}, which is suspended: resume the payee first"
        )),
        "{out}"
    );
    assert_eq!(s.state().await, before, "refusals change nothing");

    // The list filters by status.
    let (code, list) = s.get("/api/v1/payees?status=suspended", &s.viewer).await;
    assert_eq!(code, StatusCode::OK, "{list}");
    let ids: Vec<i64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [p]);
    let (code, _) = s.get("/api/v1/payees?status=gone", &s.viewer).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);

    // Resumed: its payouts go out at the next pass.
    let (code, out) = s
        .post(
            &format!("/api/v1/payees/{p}/resume"),
            &s.operator,
            json!({"reason": "review closed"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{out}");
    assert_eq!(out["payee"]["status"], "active");
    let mut scanned = s.due_scan().await;
    scanned.sort();
    assert_eq!(scanned, [queued, waiting]);
    let resumed = s.audit("payee.resume").await;
    assert_eq!(resumed.len(), 1);
    // The reason given is kept (it was once accepted and dropped).
    assert_eq!(resumed[0].2["reason"], "review closed", "{resumed:?}");
}

#[tokio::test]
async fn a_changed_account_applies_to_payouts_not_yet_sent() {
    let s = Server::start().await;
    let p = s.payee("acct_old").await;
    let sent = s.due(p, "10.00").await;
    let legacy = s.due(p, "11.00").await;
    let unsent = s.due(p, "12.00").await;
    let now = Utc::now();
    let lease = now + Duration::seconds(60);
    // Two payouts are sent to the old account and wait for a retry.
    for id in [sent, legacy] {
        sqlx::query("UPDATE payouts SET status = 'queued', lease_until = $2 WHERE id = $1")
            .bind(id)
            .bind(lease)
            .execute(s.pool())
            .await
            .unwrap();
        let c = db_payouts::claim(
            s.pool(),
            payouts::domain::PayoutId::new(id),
            "worker:w",
            now,
            lease,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(c.gateway_account, "acct_old");
        let retry = Finish::Retrying {
            code: "gateway_unavailable".into(),
            message: "try later".into(),
            next_attempt_at: now - Duration::seconds(1),
        };
        assert!(
            db_payouts::finish(
                s.pool(),
                payouts::domain::PayoutId::new(id),
                c.token(),
                &retry,
                "worker:w",
                "t",
                now
            )
            .await
            .unwrap()
        );
    }
    // One of them was sent before destinations were recorded at the claim.
    sqlx::query("UPDATE payouts SET destination = NULL WHERE id = $1")
        .bind(legacy)
        .execute(s.pool())
        .await
        .unwrap();

    // Only an admin changes where money goes; a bad account is named.
    let before = s.state().await;
    let path = format!("/api/v1/payees/{p}/account");
    for token in [&s.viewer, &s.operator, &s.platform] {
        let (code, out) = s
            .send(
                reqwest::Method::PUT,
                &path,
                token,
                Some(json!({"gateway_account": "acct_new"})),
            )
            .await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{out}");
    }
    for (body, says) in [
        (json!({"gateway_account": "acct new"}), "gateway_account"),
        (json!({"gateway_account": ""}), "gateway_account"),
        (json!({}), "gateway_account: required"),
        (json!({"gateway_account": "acct_old"}), "already"),
    ] {
        let (code, out) = s
            .send(reqwest::Method::PUT, &path, &s.admin, Some(body.clone()))
            .await;
        assert!(code.is_client_error(), "{body}: {code}");
        assert!(error_of(&out).contains(says), "{body}: {out}");
    }
    let (code, _) = s
        .send(
            reqwest::Method::PUT,
            "/api/v1/payees/424242/account",
            &s.admin,
            Some(json!({"gateway_account": "acct_new"})),
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(s.state().await, before, "refusals change nothing");

    let (code, out) = s
        .send(
            reqwest::Method::PUT,
            &path,
            &s.admin,
            Some(json!({"gateway_account": "acct_new"})),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{out}");
    assert_eq!(out["previous"], "acct_old");
    assert_eq!(out["payee"]["gateway_account"], "acct_new");
    assert_eq!(
        (
            out["kept_destination"].as_i64(),
            out["to_new_account"].as_i64()
        ),
        (Some(2), Some(1))
    );
    let audit = s.audit("payee.account").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].0, "operator:ada");
    assert_eq!(audit[0].2, json!({"from": "acct_old", "to": "acct_new"}));

    // The retries go where the first attempts went; the unsent one goes to the new account.
    let mut queued = s.due_scan().await;
    queued.sort();
    assert_eq!(queued, [sent, legacy, unsent]);
    let now = Utc::now();
    for (id, account) in [
        (sent, "acct_old"),
        (legacy, "acct_old"),
        (unsent, "acct_new"),
    ] {
        let c = db_payouts::claim(
            s.pool(),
            payouts::domain::PayoutId::new(id),
            "worker:w",
            now,
            now + Duration::seconds(60),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(c.gateway_account, account, "payout {id}");
    }
}

#[tokio::test]
async fn the_integration_role_posts_earnings_and_reads_but_may_not_act() {
    let s = Server::start().await;
    let p = s.payee("acct_int").await;
    let id = s.due(p, "10.00").await;
    let earning = json!({"payee_id": p, "source": "market", "external_ref": "order-1",
                         "gross": "40.00", "currency": "USD", "completed_at": "2026-11-02T10:00:00Z"});
    let (code, out) = s.post("/v1/earnings", &s.platform, earning).await;
    assert_eq!(code, StatusCode::CREATED, "{out}");
    let actor: String =
        sqlx::query_scalar("SELECT posted_by FROM earnings WHERE external_ref = 'order-1'")
            .fetch_one(s.pool())
            .await
            .unwrap();
    assert_eq!(
        actor, "integration:market-backend",
        "who posted is recorded"
    );

    for path in [
        "/api/v1/session".to_string(),
        "/api/v1/payees".into(),
        format!("/api/v1/payees/{p}"),
        "/api/v1/payouts".into(),
        format!("/api/v1/payouts/{id}"),
    ] {
        let (code, out) = s.get(&path, &s.platform).await;
        assert_eq!(code, StatusCode::OK, "{path}: {out}");
    }
    let (_, me) = s.get("/api/v1/session", &s.platform).await;
    assert_eq!(
        (me["role"].as_str(), me["actor"].as_str()),
        (Some("integration"), Some("integration:market-backend"))
    );
    let (_, detail) = s.get(&format!("/api/v1/payouts/{id}"), &s.platform).await;
    assert_eq!(detail["actions"], json!([]), "offered no actions");

    let before = s.state().await;
    let refused: Vec<(reqwest::Method, String, Value)> = vec![
        (
            reqwest::Method::POST,
            format!("/api/v1/payouts/{id}/retry"),
            json!({}),
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/payouts/{id}/cancel"),
            json!({}),
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/payouts/{id}/enqueue"),
            json!({}),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/payouts/bulk-retry".into(),
            json!({"dry_run": false}),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/payouts/bulk-cancel".into(),
            json!({"ids": [id], "dry_run": false}),
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/payees/{p}/suspend"),
            json!({}),
        ),
        (
            reqwest::Method::PUT,
            format!("/api/v1/payees/{p}/account"),
            json!({"gateway_account": "acct_x"}),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/tokens".into(),
            json!({"name": "x", "role": "admin"}),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/fleet/pause".into(),
            json!({}),
        ),
        (reqwest::Method::GET, "/api/v1/tokens".into(), Value::Null),
        (reqwest::Method::GET, "/api/v1/overview".into(), Value::Null),
        (reqwest::Method::GET, "/api/v1/audit".into(), Value::Null),
        (
            reqwest::Method::GET,
            "/api/v1/search?q=acct".into(),
            Value::Null,
        ),
    ];
    for (method, path, body) in refused {
        let body = (!body.is_null()).then_some(body);
        let (code, out) = s.send(method.clone(), &path, &s.platform, body).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{method} {path}: {out}");
        assert!(
            error_of(&out).contains("integration"),
            "{method} {path}: {out}"
        );
    }
    assert_eq!(s.state().await, before, "refusals change nothing");
    assert_eq!(s.status(id).await, "pending");

    // The dashboard is for operators: an integration token opens no session.
    let resp = s
        .http
        .post(format!("{}/login", s.base))
        .form(&[("token", s.platform.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/login?error=1");
    assert!(resp.headers().get("set-cookie").is_none());

    // An admin issues integration tokens like any other.
    let (code, made) = s
        .post(
            "/api/v1/tokens",
            &s.admin,
            json!({"name": "creator-backend", "role": "integration"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{made}");
    let (code, _) = s
        .get("/api/v1/payees", made["token"].as_str().unwrap())
        .await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn payoutctl_manages_payees_and_refuses_bad_input_with_one_line() {
    let ctl = Ctl::new().await;
    ctl.ok(&["migrate"]);
    // release_funds pays Stripe connected accounts: acct_… only.
    let rf = [
        ("PAYOUTS_GATEWAY__KIND", "release_funds"),
        (
            "PAYOUTS_GATEWAY__RELEASE_FUNDS__BASE_URL",
            "http://127.0.0.1:9",
        ),
    ];
    let add = |name: &str, account: &str| {
        ctl.json(&["payee", "add", "--name", name, "--account", account])["id"]
            .as_i64()
            .unwrap()
            .to_string()
    };
    let ana = add("Ana", "acct_ana");
    let bo = add("Bo", "acct_bo");

    let list = ctl.json(&["payee", "list"]);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let shown = ctl.json(&["payee", "show", &ana]);
    assert_eq!(shown["payee"]["gateway_account"], "acct_ana");
    assert!(ctl.ok(&["payee", "show", &bo]).contains("status    active"));

    let out = ctl.json(&["payee", "suspend", &ana, "--reason", "chargebacks"]);
    assert_eq!(out["payee"]["status"], "suspended");
    let list = ctl.json(&["payee", "list", "--status", "suspended"]);
    assert_eq!(list["items"][0]["id"].as_i64().unwrap().to_string(), ana);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    let count = async |sql: &str| -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&ctl.db.pool)
            .await
            .unwrap()
    };
    let audits = count("SELECT count(*) FROM audit_log").await;
    let cases: Vec<CliCase> = vec![
        (vec!["payee", "suspend", &ana], &[], 4, "suspended already"),
        (vec!["payee", "resume", &bo], &[], 4, "not suspended"),
        (vec!["payee", "show", "777"], &[], 3, "payee 777 not found"),
        (
            vec!["payee", "suspend", "777"],
            &[],
            3,
            "payee 777 not found",
        ),
        (
            vec!["payee", "list", "--status", "gone"],
            &[],
            1,
            "status: expected active or suspended",
        ),
        (
            vec![
                "payee",
                "set-account",
                &bo,
                "--account",
                "DE89370400440532013000",
            ],
            &rf,
            2,
            "release_funds pays Stripe connected accounts",
        ),
        (
            vec!["payee", "set-account", &bo, "--account", "acct_bo"],
            &[],
            4,
            "already",
        ),
    ];
    for (args, env, code, says) in cases {
        let o = ctl.run_with(&args, env);
        assert_eq!(o.code, Some(code), "{args:?}: {}", o.stderr);
        let line = ctl.fails_with(&args, env);
        assert!(line.contains(says), "{args:?}: {line}");
    }
    assert_eq!(
        count("SELECT count(*) FROM audit_log").await,
        audits,
        "nothing changed"
    );

    let out = ctl.run_with(
        &[
            "payee",
            "set-account",
            &bo,
            "--account",
            "acct_bo2",
            "--json",
        ],
        &rf,
    );
    assert!(out.ok, "{}", out.stderr);
    let changed: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(
        (
            changed["previous"].as_str(),
            changed["payee"]["gateway_account"].as_str()
        ),
        (Some("acct_bo"), Some("acct_bo2"))
    );
    assert!(ctl.ok(&["payee", "resume", &ana]).contains("resumed"));
    let actors: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, actor FROM audit_log WHERE action LIKE 'payee.%' AND action <> 'payee.create' ORDER BY id",
    )
    .fetch_all(&ctl.db.pool)
    .await
    .unwrap();
    assert_eq!(
        actors,
        [
            ("payee.suspend".to_string(), "operator:alice".to_string()),
            ("payee.account".into(), "operator:alice".into()),
            ("payee.resume".into(), "operator:alice".into()),
        ]
    );
}

/// `payoutctl` against the server's database, as JSON.
fn ctl_json(s: &Server, args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payoutctl"))
        .args(args)
        .arg("--json")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", &s.db.url)
        .env("REDIS_URL", redis_url())
        .env("PAYOUTS_OPERATOR", "alice")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "payoutctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ago(days: i64) -> String {
    (Utc::now() - Duration::days(days)).to_rfc3339()
}

#[tokio::test]
async fn the_platform_reads_a_payees_balance_earnings_payouts_and_upcoming_payout() {
    let s = Server::start().await;
    let p = s.payee("acct_reads").await;
    let q = s.payee("acct_small").await;
    let post = async |payee: i64, r: &str, gross: &str, days: i64| {
        let (code, out) = s
            .post(
                "/v1/earnings",
                &s.platform,
                json!({"payee_id": payee, "source": "market", "external_ref": r,
                       "gross": gross, "currency": "USD", "completed_at": ago(days)}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{out}");
        out["earning"]["id"].as_i64().unwrap()
    };
    // Settled into a payout (released weeks ago), and a small one carried
    // over below the minimum (another payee).
    let settled = post(p, "o-1", "100.00", 30).await;
    post(q, "o-2", "10.00", 30).await;
    let policy = payouts::services::settlement::policy_for(&s.settings).unwrap();
    let opts = payouts::services::settlement::Options {
        payee: None,
        actor: "system:test".into(),
    };
    payouts::services::settlement::run(s.pool(), &policy, Utc::now(), &opts)
        .await
        .unwrap();
    // Released since (not settled yet), and held.
    let released = post(p, "o-3", "40.00", 8).await;
    let held = post(p, "o-4", "15.50", 1).await;

    let (code, b) = s
        .get(&format!("/api/v1/payees/{p}/balance"), &s.platform)
        .await;
    assert_eq!(code, StatusCode::OK, "{b}");
    let usd = &b["currencies"][0];
    assert_eq!(usd["currency"], "USD");
    assert_eq!(
        (usd["held"].as_str(), usd["held_count"].as_i64()),
        (Some("15.50"), Some(1))
    );
    assert_eq!(
        (usd["releasable"].as_str(), usd["releasable_count"].as_i64()),
        (Some("40.00"), Some(1))
    );
    assert_eq!(usd["carried_over"], "0.00");
    assert_eq!(usd["in_flight_count"], 1, "{b}");
    let payout_amount = usd["in_flight"].as_str().unwrap().to_string();
    assert_eq!(usd["paid_this_period"], "0.00");
    assert!(usd["next_release_at"].is_string());
    let (_, bq) = s
        .get(&format!("/api/v1/payees/{q}/balance"), &s.viewer)
        .await;
    assert_eq!(
        bq["currencies"][0]["carried_over"], "7.00",
        "70% of 10.00, below the minimum: {bq}"
    );

    // Earnings with their state, filtered and paged.
    let (code, page) = s
        .get(&format!("/api/v1/payees/{p}/earnings"), &s.platform)
        .await;
    assert_eq!(code, StatusCode::OK, "{page}");
    let states: Vec<(i64, String)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (held, "held".to_string()),
            (released, "released".into()),
            (settled, "settled".into())
        ]
    );
    let payout_id = page["items"][2]["payout_id"]
        .as_i64()
        .expect("settled into a payout");
    assert_eq!(page["items"][2]["posted_by"], "integration:market-backend");
    assert_eq!(page["items"][0]["gross"], "15.50");
    let (_, only) = s
        .get(
            &format!("/api/v1/payees/{p}/earnings?state=held"),
            &s.platform,
        )
        .await;
    assert_eq!(only["items"].as_array().unwrap().len(), 1);
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, pg) = s
            .get(
                &format!("/api/v1/payees/{p}/earnings?limit=2{cursor}"),
                &s.platform,
            )
            .await;
        seen.extend(
            pg["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_i64().unwrap()),
        );
        match pg["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        [held, released, settled],
        "pages neither repeat nor skip"
    );

    // Payouts with their lines.
    let (code, pays) = s
        .get(&format!("/api/v1/payees/{p}/payouts"), &s.platform)
        .await;
    assert_eq!(code, StatusCode::OK, "{pays}");
    let item = &pays["items"][0];
    assert_eq!(item["id"].as_i64(), Some(payout_id));
    assert_eq!(item["amount"].as_str(), Some(payout_amount.as_str()));
    let lines = item["lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "earning" && l["earning_id"].as_i64() == Some(settled)),
        "{item}"
    );
    assert!(lines.iter().any(|l| l["kind"] == "fee"), "{item}");
    let (_, none) = s
        .get(
            &format!("/api/v1/payees/{p}/payouts?status=paid"),
            &s.platform,
        )
        .await;
    assert_eq!(none["items"], json!([]));

    // The upcoming payout is the preview.
    let (code, up) = s
        .get(&format!("/api/v1/payees/{p}/upcoming"), &s.platform)
        .await;
    assert_eq!(code, StatusCode::OK, "{up}");
    assert_eq!(up["payee_id"].as_i64(), Some(p));
    assert!(
        up["settlements"].is_array() && up["held"].is_array(),
        "{up}"
    );

    // Bad input: a 4xx that names it.
    for (path, code, says) in [
        (
            "/api/v1/payees/999999/balance".to_string(),
            StatusCode::NOT_FOUND,
            "payee 999999 not found",
        ),
        (
            "/api/v1/payees/999999/earnings".to_string(),
            StatusCode::NOT_FOUND,
            "payee 999999 not found",
        ),
        (
            "/api/v1/payees/999999/payouts".to_string(),
            StatusCode::NOT_FOUND,
            "payee 999999 not found",
        ),
        (
            "/api/v1/payees/999999/upcoming".to_string(),
            StatusCode::NOT_FOUND,
            "payee 999999 not found",
        ),
        (
            format!("/api/v1/payees/{p}/earnings?state=lost"),
            StatusCode::BAD_REQUEST,
            "state: expected one of",
        ),
        (
            format!("/api/v1/payees/{p}/earnings?currency=XYZ"),
            StatusCode::BAD_REQUEST,
            "currency",
        ),
        (
            format!("/api/v1/payees/{p}/earnings?completed_from=yesterday"),
            StatusCode::BAD_REQUEST,
            "completed_from",
        ),
        (
            format!("/api/v1/payees/{p}/earnings?sort=amount"),
            StatusCode::BAD_REQUEST,
            "unknown query parameter",
        ),
        (
            format!("/api/v1/payees/{p}/payouts?status=lost"),
            StatusCode::BAD_REQUEST,
            "status",
        ),
        (
            format!("/api/v1/payees/{p}/payouts?limit=0"),
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/api/v1/payees/abc/balance".to_string(),
            StatusCode::BAD_REQUEST,
            "payee id",
        ),
    ] {
        let (got, out) = s.get(&path, &s.platform).await;
        assert_eq!(got, code, "{path}: {out}");
        assert!(error_of(&out).contains(says), "{path}: {out}");
    }

    // Paid: counted in the current period, gone from in flight.
    let now = Utc::now();
    sqlx::query("UPDATE payouts SET status = 'queued', lease_until = $2 WHERE id = $1")
        .bind(payout_id)
        .bind(now + Duration::seconds(60))
        .execute(s.pool())
        .await
        .unwrap();
    let c = db_payouts::claim(
        s.pool(),
        payouts::domain::PayoutId::new(payout_id),
        "worker:w",
        now,
        now + Duration::seconds(60),
    )
    .await
    .unwrap()
    .unwrap();
    let paid = Finish::Paid {
        transfer_id: "tr_1".into(),
    };
    assert!(
        db_payouts::finish(
            s.pool(),
            payouts::domain::PayoutId::new(payout_id),
            c.token(),
            &paid,
            "worker:w",
            "t",
            now
        )
        .await
        .unwrap()
    );
    let (_, b) = s
        .get(&format!("/api/v1/payees/{p}/balance"), &s.platform)
        .await;
    let usd = &b["currencies"][0];
    assert_eq!(
        (usd["in_flight_count"].as_i64(), usd["paid_count"].as_i64()),
        (Some(0), Some(1))
    );
    assert_eq!(
        usd["paid_this_period"].as_str(),
        Some(payout_amount.as_str())
    );
    let (_, pays) = s
        .get(
            &format!("/api/v1/payees/{p}/payouts?status=paid"),
            &s.platform,
        )
        .await;
    assert_eq!(pays["items"][0]["destination"], "acct_reads");

    // payoutctl says the same.
    let cli = ctl_json(&s, &["payee", "balance", &p.to_string()]);
    assert_eq!(cli["currencies"], b["currencies"]);
    let cli = ctl_json(
        &s,
        &["payee", "earnings", &p.to_string(), "--state", "released"],
    );
    assert_eq!(cli["items"][0]["id"].as_i64(), Some(released));
    let cli = ctl_json(&s, &["payee", "payouts", &p.to_string()]);
    assert_eq!(cli["items"][0]["id"].as_i64(), Some(payout_id));
    assert!(!cli["items"][0]["lines"].as_array().unwrap().is_empty());
    let cli = ctl_json(&s, &["payee", "upcoming", &p.to_string()]);
    assert_eq!(cli["payee_id"].as_i64(), Some(p));
}

#[tokio::test]
async fn the_openapi_description_lists_the_platform_routes() {
    let s = Server::start().await;
    let (code, doc) = s.get("/api/openapi.json", &s.platform).await;
    assert_eq!(code, StatusCode::OK);
    for (path, method) in [
        ("/api/v1/payees", "get"),
        ("/api/v1/payees/{id}/suspend", "post"),
        ("/api/v1/payees/{id}/resume", "post"),
        ("/api/v1/payees/{id}/account", "put"),
        ("/api/v1/payees/{id}/account", "post"),
        ("/api/v1/payees/{id}/balance", "get"),
        ("/api/v1/payees/{id}/earnings", "get"),
        ("/api/v1/payees/{id}/payouts", "get"),
        ("/api/v1/payees/{id}/upcoming", "get"),
        ("/api/v1/earnings/{id}/release", "post"),
        ("/api/v1/earnings/{id}/void", "post"),
        ("/api/v1/holds", "get"),
        ("/api/v1/payees/{id}/payout-requests", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from openapi.json"
        );
    }
    assert!(
        doc["paths"]["/api/v1/payees"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "status")
    );
}

/// Escrow actions (#17 item 5): a held earning released early is paid in
/// the current period; a voided one is never settled, paid or counted, and
/// its reference stays taken; both are refused once settled, audited with
/// their actor, and forbidden to viewers and the platform's integration
/// token. Holds list totals per payee and per source.
#[tokio::test]
async fn escrow_releases_and_voids_held_earnings_and_lists_holds() {
    let s = Server::start().await;
    let p = s.payee("acct_escrow").await;
    let q = s.payee("acct_other").await;
    let post = async |payee: i64, source: &str, r: &str, gross: &str, days: i64| {
        let (code, out) = s
            .post(
                "/v1/earnings",
                &s.platform,
                json!({"payee_id": payee, "source": source, "external_ref": r,
                       "gross": gross, "currency": "USD", "completed_at": ago(days)}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{out}");
        out["earning"]["id"].as_i64().unwrap()
    };
    let early = post(p, "booking", "b-1", "100.00", 1).await;
    let voided = post(p, "booking", "b-2", "50.00", 1).await;
    let kept = post(p, "tips", "t-1", "20.00", 2).await;
    let other = post(q, "booking", "b-3", "30.00", 1).await;

    // Holds: per payee and per source, largest first.
    let (code, h) = s.get("/api/v1/holds", &s.viewer).await;
    assert_eq!(code, StatusCode::OK, "{h}");
    let rows = |v: &Value| -> Vec<(String, i64, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_string(),
                    r["earnings"].as_i64().unwrap(),
                    r["gross"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        rows(&h["by_payee"]),
        [
            (p.to_string(), 3, "170.00".into()),
            (q.to_string(), 1, "30.00".into())
        ]
    );
    assert_eq!(
        rows(&h["by_source"]),
        [
            ("booking".into(), 3, "180.00".into()),
            ("tips".into(), 1, "20.00".into())
        ]
    );
    let (_, h) = s.get("/api/v1/holds?source=tips", &s.viewer).await;
    assert_eq!(rows(&h["by_payee"]), [(p.to_string(), 1, "20.00".into())]);
    let (code, e) = s.get("/api/v1/holds?payee=x", &s.viewer).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{e}");

    // Who may act: operators; not viewers, not the platform's token.
    let before = s.state().await;
    for token in [&s.viewer, &s.platform] {
        let (code, e) = s
            .post(
                &format!("/api/v1/earnings/{early}/release"),
                token,
                json!({}),
            )
            .await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{e}");
    }
    // A void needs a reason; an unknown earning is 404: nothing changes.
    let (code, e) = s
        .post(
            &format!("/api/v1/earnings/{voided}/void"),
            &s.operator,
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{e}");
    assert!(error_of(&e).contains("reason"), "{e}");
    let (code, _) = s
        .post(
            "/api/v1/earnings/999999/void",
            &s.operator,
            json!({"reason": "x"}),
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(s.state().await, before, "refusals change nothing");

    // Release early and void.
    let (code, r) = s
        .post(
            &format!("/api/v1/earnings/{early}/release"),
            &s.operator,
            json!({"reason": "guest confirmed"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    assert_eq!(r["state"], "released");
    let (code, r) = s
        .post(
            &format!("/api/v1/earnings/{early}/release"),
            &s.operator,
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "released already: {r}");
    let (code, r) = s
        .post(
            &format!("/api/v1/earnings/{voided}/void"),
            &s.operator,
            json!({"reason": "booking refunded"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{r}");
    let (code, r) = s
        .post(
            &format!("/api/v1/earnings/{voided}/void"),
            &s.operator,
            json!({"reason": "again"}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{r}");
    // The same work posted again is not recorded anew.
    let (code, out) = s
        .post(
            "/v1/earnings",
            &s.platform,
            json!({"payee_id": p, "source": "booking", "external_ref": "b-2",
                   "gross": "50.00", "currency": "USD", "completed_at": ago(1)}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "already recorded: {out}");
    assert_eq!(out["earning"]["id"], voided);

    // The balance: the released one releasable, the voided one nowhere.
    let (_, b) = s
        .get(&format!("/api/v1/payees/{p}/balance"), &s.operator)
        .await;
    let usd = &b["currencies"][0];
    assert_eq!(
        (usd["releasable"].as_str(), usd["held"].as_str()),
        (Some("100.00"), Some("20.00")),
        "{b}"
    );
    let (_, page) = s
        .get(
            &format!("/api/v1/payees/{p}/earnings?state=voided"),
            &s.operator,
        )
        .await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!(
        (items[0]["id"].as_i64(), items[0]["void_reason"].as_str()),
        (Some(voided), Some("booking refunded"))
    );

    // Settlement pays the released one, now, and never the voided one.
    let policy = payouts::services::settlement::policy_for(&s.settings).unwrap();
    let opts = payouts::services::settlement::Options {
        payee: Some(p),
        actor: "system:test".into(),
    };
    sqlx::query("UPDATE payees SET schedule = 'per_earning' WHERE id = $1")
        .bind(p)
        .execute(s.pool())
        .await
        .unwrap();
    payouts::services::settlement::run(s.pool(), &policy, Utc::now(), &opts)
        .await
        .unwrap();
    let settled: Vec<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT id, payout_id FROM earnings WHERE payee_id = $1 AND settlement_id IS NOT NULL ORDER BY id",
    )
    .bind(p)
    .fetch_all(s.pool())
    .await
    .unwrap();
    assert_eq!(settled.len(), 1, "only the released one: {settled:?}");
    assert_eq!(settled[0].0, early);
    assert!(settled[0].1.is_some(), "paid by a payout");
    // Too late to void or release a settled earning.
    let (code, e) = s
        .post(
            &format!("/api/v1/earnings/{early}/void"),
            &s.operator,
            json!({"reason": "late"}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{e}");
    assert!(error_of(&e).contains("settled"), "{e}");
    // Holds after: the kept tip and the other payee's booking.
    let (_, h) = s.get("/api/v1/holds", &s.viewer).await;
    assert_eq!(
        rows(&h["by_payee"]),
        [
            (q.to_string(), 1, "30.00".into()),
            (p.to_string(), 1, "20.00".into())
        ]
    );
    let _ = (kept, other);

    // Audited with the actor.
    let rel = s.audit("earning.release").await;
    let void = s.audit("earning.void").await;
    assert_eq!(rel.len(), 1);
    assert_eq!(
        (rel[0].0.as_str(), rel[0].1.as_str()),
        ("operator:otto", early.to_string().as_str())
    );
    assert_eq!(rel[0].2["reason"], "guest confirmed");
    assert_eq!(void.len(), 1);
    assert_eq!(void[0].2["reason"], "booking refunded");

    // payoutctl: holds, void with its exit codes.
    let out = ctl_json(&s, &["earnings", "holds", "--payee", &q.to_string()]);
    assert_eq!(out["by_payee"][0]["gross"], "30.00", "{out}");
    let out = ctl_json(
        &s,
        &[
            "earnings",
            "void",
            &other.to_string(),
            "--reason",
            "duplicate booking",
        ],
    );
    assert_eq!(out["state"], "voided", "{out}");
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_payoutctl"))
        .args(["earnings", "void", &other.to_string(), "--reason", "x"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", &s.db.url)
        .env("REDIS_URL", redis_url())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(4), "conflict exit code");
    assert!(String::from_utf8_lossy(&again.stderr).contains("voided"));
}

/// `payoutctl` against the server's database: its exit code and output.
fn ctl_run(s: &Server, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payoutctl"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", &s.db.url)
        .env("REDIS_URL", redis_url())
        .env("PAYOUTS_OPERATOR", "alice")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Early payout requests (#17 item 3) over HTTP and `payoutctl request`:
/// the seller market's (002) scout asks for part of what is owed, the
/// barber scheduler's (001) "Requested early payout" takes the rest; a
/// replay answers the same payout; refusals name what is wrong (the
/// available balance for too much) and change nothing.
#[tokio::test]
async fn an_early_payout_request_pays_what_is_released_now_and_refusals_change_nothing() {
    let s = Server::start().await;
    let p = s.payee("acct_scout").await;
    let post = async |r: &str, gross: &str, days: i64| {
        let (code, out) = s
            .post(
                "/v1/earnings",
                &s.platform,
                json!({"payee_id": p, "source": "market", "external_ref": r,
                       "gross": gross, "currency": "USD", "completed_at": ago(days)}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{out}");
        out["earning"]["id"].as_i64().unwrap()
    };
    let first = post("b-1", "60.00", 10).await;
    let second = post("b-2", "40.00", 9).await;
    post("b-3", "15.00", 1).await; // held
    let path = format!("/api/v1/payees/{p}/payout-requests");
    let payouts_now = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM payouts")
            .fetch_one(s.pool())
            .await
            .unwrap()
    };

    // Refused, each naming what is wrong; nothing changed.
    let before = (s.state().await, payouts_now().await);
    let (code, out) = s
        .post(
            &path,
            &s.platform,
            json!({"amount": "100.01", "idempotency_key": "k-over"}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{out}");
    assert_eq!(
        (out["available"].as_str(), out["currency"].as_str()),
        (Some("100.00"), Some("USD"))
    );
    assert!(
        error_of(&out).contains("above the releasable balance"),
        "{out}"
    );
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"amount": "0", "idempotency_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount: ",
        ),
        (
            json!({"amount": "-1.00", "idempotency_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount: ",
        ),
        (
            json!({"amount": "10.001", "idempotency_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount: ",
        ),
        (
            json!({"amount": 10, "idempotency_key": "k"}),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            json!({"currency": "XXX", "idempotency_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency: ",
        ),
        (
            json!({"method": "express", "idempotency_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "method: ",
        ),
        (
            json!({"amount": "10.00"}),
            StatusCode::BAD_REQUEST,
            "idempotency_key: required",
        ),
        (
            json!({"idempotency_key": "k", "extra": 1}),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
    ];
    for (body, want, says) in cases {
        let (code, out) = s.post(&path, &s.platform, body.clone()).await;
        assert_eq!(code, want, "{body}: {out}");
        assert!(error_of(&out).contains(says), "{body}: {out}");
    }
    let (code, out) = s
        .post(
            "/api/v1/payees/999999/payout-requests",
            &s.platform,
            json!({"idempotency_key": "k"}),
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{out}");
    let (code, _) = s
        .post(&path, &s.viewer, json!({"idempotency_key": "k"}))
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "a viewer may not ask");
    assert_eq!((s.state().await, payouts_now().await), before);

    // 002: the scout asks for 80.00 of the 100.00 released, instant: whole
    // earnings in release order while they fit: b-1 (60.00). 70% = 42.00,
    // instant fee 1.25% of 60.00 + 0.25 = 1.00: 41.00.
    let body = json!({"amount": "80.00", "method": "instant", "idempotency_key": "scout-7-req-1"});
    let (code, r) = s.post(&path, &s.platform, body.clone()).await;
    assert_eq!(code, StatusCode::CREATED, "{r}");
    assert_eq!(r["replayed"], false);
    assert_eq!(r["payout"]["amount"], "41.00");
    assert_eq!(r["request"]["amount"], "80.00");
    assert_eq!(r["request"]["requested_by"], "integration:market-backend");
    assert_eq!(r["settlement"]["requested"], true);
    let lines: Vec<(&str, Option<i64>)> = r["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["kind"].as_str().unwrap(), l["earning_id"].as_i64()))
        .collect();
    assert_eq!(
        lines,
        [
            ("earning", Some(first)),
            ("commission", None),
            ("fee", None)
        ]
    );
    let payout = r["payout"]["id"].as_i64().unwrap();
    let (priority, events): (i16, i64) = sqlx::query_as(
        "SELECT priority, (SELECT count(*) FROM payout_events WHERE payout_id = $1 AND actor = 'integration:market-backend')
         FROM payouts WHERE id = $1",
    )
    .bind(payout)
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!(
        (priority, events),
        (1, 1),
        "requested, its creation event by the caller"
    );
    let audit = s.audit("payout.request").await;
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].0.as_str(), audit[0].1.clone()),
        ("integration:market-backend", p.to_string())
    );
    assert_eq!(audit[0].2["payout_id"], payout);

    // A replay (body or header) answers the same payout; another amount is refused.
    let before = (s.state().await, payouts_now().await);
    let (code, again) = s.post(&path, &s.platform, body).await;
    assert_eq!(code, StatusCode::OK, "{again}");
    assert_eq!(
        (again["replayed"].as_bool(), again["payout"]["id"].as_i64()),
        (Some(true), Some(payout))
    );
    let resp = s
        .http
        .post(format!("{}{path}", s.base))
        .bearer_auth(&s.platform)
        .header("Idempotency-Key", "scout-7-req-1")
        .json(&json!({"amount": "80.00", "method": "instant"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (code, out) = s
        .post(
            &path,
            &s.platform,
            json!({"amount": "90.00", "method": "instant", "idempotency_key": "scout-7-req-1"}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{out}");
    assert!(error_of(&out).contains("amount 90.00 (was 80.00)"), "{out}");
    assert_eq!((s.state().await, payouts_now().await), before);

    // 001: the barber's "Requested early payout" by payoutctl: the rest (b-2).
    // 70% of 40.00 = 28.00, standard fee 0.10 + 0.25: 27.65.
    let (code, stdout, stderr) = ctl_run(
        &s,
        &[
            "request",
            &p.to_string(),
            "--idempotency-key",
            "barber-123-early",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["payout"]["amount"], "27.65");
    assert_eq!(r["request"]["requested_by"], "operator:alice");
    assert_eq!(r["lines"][0]["earning_id"], second);
    let (code, stdout, _) = ctl_run(
        &s,
        &[
            "request",
            &p.to_string(),
            "--idempotency-key",
            "barber-123-early",
        ],
    );
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("replayed: payout"), "{stdout}");
    // Nothing released now: exit 4, naming 0.00 available.
    let (code, _, stderr) = ctl_run(&s, &["request", &p.to_string()]);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("available: 0.00 USD"), "{stderr}");
    let (code, _, stderr) = ctl_run(&s, &["request", &p.to_string(), "--method", "express"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, _) = ctl_run(&s, &["request", "999999"]);
    assert_eq!(code, Some(3));

    // A suspended payee is refused (409).
    let (code, _) = s
        .post(
            &format!("/api/v1/payees/{p}/suspend"),
            &s.operator,
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (code, out) = s
        .post(
            &path,
            &s.operator,
            json!({"idempotency_key": "after-suspend"}),
        )
        .await;
    assert_eq!(code, StatusCode::CONFLICT, "{out}");
    assert!(error_of(&out).contains("suspended"), "{out}");
}

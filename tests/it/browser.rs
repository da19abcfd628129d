//! The operator dashboard in a real browser: Debian's headless Chromium,
//! driven through chromedriver with the `fantoccini` WebDriver client,
//! against the admin router on port 0 over a fresh database and Redis prefix.
//!
//! - an operator logs in through the form, sees the overview, filters the
//!   payouts to `failed`, opens one and retries it; the database then says
//!   `queued`, with the operator as the actor of the newest event;
//! - a viewer sees a failed payout without any action button (after a wrong
//!   token was turned away on the form, and the overview refreshed itself),
//!   and logging out ends the session;
//! - an action on a payout that changed behind the page shows the server's
//!   409 in the alert, and the page shows the payout as it now is;
//! - an admin goes from a failure group to its payouts, is told how many
//!   "Retry all matching…" will retry (a dry run), confirms, and exactly those
//!   are queued;
//! - an admin pauses the fleet (a banner on every page, the workers' Redis
//!   key set, audited) and resumes it, goes to a payout and a payee from the
//!   search box, selects rows and cancels them after a dry-run count, sees
//!   the list update live, reads the payee, reconcile, token and settlement
//!   screens, sees Due→paid as `1m 05s` inside its card, and dark mode;
//! - outbound webhooks, with a receiver on loopback and the delivery worker
//!   running: an admin registers an endpoint and sees its `whsec_` secret
//!   once, rotates, disables and deletes it; the delivery log shows a
//!   message refused once and then delivered, with both attempts; an
//!   operator replays a message (and everything since a time) and sees the
//!   new attempt; a viewer is offered no button that writes.
//!
//! Screenshots of the overview and of the payout page are written to
//! `$CARGO_TARGET_TMPDIR/screenshots/`, or to `docs/screenshots/` with
//! `PAYOUTS_SCREENSHOTS=docs`. Needs Debian's `chromium` and `chromedriver`.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use common::{TestDb, eventually, redis_url, unique};
use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use payouts::{
    admin::{AdminState, router},
    config::Settings,
    db::{
        payees,
        tokens::{self, Role},
    },
    domain::{Currency, Money},
    producer::Leadership,
    queue::Queue,
};
use serde_json::{Value, json};
use sqlx::PgPool;

/// How long any one thing may take to appear in the page.
const WAIT: Duration = Duration::from_secs(20);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

// --- the browser ----------------------------------------------------------------

/// A chromedriver process on a free loopback port; killed when dropped.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        assert!(
            std::path::Path::new(CHROMEDRIVER).is_file()
                && std::path::Path::new(CHROMIUM).is_file(),
            "the browser tests need Debian's chromium and chromedriver \
             (apt-get install chromium chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let driver = Chromedriver { child, port };
        let http = reqwest::Client::new();
        let status = format!("http://127.0.0.1:{port}/status");
        eventually(WAIT, "chromedriver to be ready", || {
            let (http, status) = (&http, &status);
            async move {
                let v: Value = http.get(status).send().await.ok()?.json().await.ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await;
        driver
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Chrome's DevTools protocol through chromedriver (`goog/cdp/execute`), for
/// what WebDriver has no command for (emulating the dark colour scheme).
#[derive(Debug)]
struct Cdp {
    cmd: &'static str,
    params: Value,
}

impl fantoccini::wd::WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!(
            "session/{}/goog/cdp/execute",
            session.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (axum::http::Method, Option<String>) {
        let body = json!({"cmd": self.cmd, "params": self.params});
        (axum::http::Method::POST, Some(body.to_string()))
    }
}

/// One WebDriver session: a headless Chromium, with the waiting helpers the
/// tests share (every look-up polls until a deadline, then says what the
/// page showed).
struct Browser {
    client: Client,
    // Dropped after `client` (fields drop in order): the session ends first.
    _driver: Chromedriver,
}

impl Browser {
    async fn start() -> Browser {
        let driver = Chromedriver::start().await;
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless", "--no-sandbox", "--disable-gpu",
                         "--disable-background-networking", "--window-size=1400,1000"],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!("capabilities are an object")
        };
        // Plain HTTP to chromedriver on loopback: no TLS connector needed.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap_or_else(|e| panic!("chromedriver made no session: {e}"));
        Browser {
            client,
            _driver: driver,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// The first element matching `css`, if there is one now.
    async fn find(&self, css: &str) -> Option<Element> {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => Some(e),
            Err(e) if e.is_no_such_element() => None,
            Err(e) => panic!("find {css}: {e}"),
        }
    }

    /// Polls `check` until it gives `Some`; on timeout, panics with what
    /// the page shows (its address, alert and text), to say why.
    async fn until<T, Fut>(&self, what: &str, mut check: impl FnMut() -> Fut) -> T
    where
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self
                    .client
                    .execute(
                        "return location.href + '\\n' + document.body.innerText.slice(0, 1500);",
                        vec![],
                    )
                    .await;
                let page = match page {
                    Ok(v) => v.as_str().unwrap_or_default().to_string(),
                    Err(e) => e.to_string(),
                };
                panic!("timed out after {WAIT:?} waiting for {what}; the page:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The first element matching `css`, once there is one.
    async fn wait(&self, css: &str) -> Element {
        self.until(&format!("an element matching {css}"), || self.find(css))
            .await
    }

    /// The text of `css` once `ok` holds for it.
    async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let ok = &ok;
        self.until(&format!("{css} to show {what}"), || async move {
            let el = self.find(css).await?;
            el.text().await.ok().filter(|t| ok(t))
        })
        .await
    }

    /// Clicks `css` once it is there and clickable (a dialog that is still
    /// opening, say, makes the first tries fail).
    async fn click(&self, css: &str) {
        self.until(&format!("a click on {css}"), || async move {
            self.find(css).await?.click().await.ok()
        })
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.wait(css)
            .await
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    async fn script(&self, js: &str) -> Value {
        self.client
            .execute(js, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {js}: {e}"))
    }

    /// Polls `js` (which returns a value or null) until it returns non-null.
    async fn wait_script(&self, what: &str, js: &str) -> Value {
        self.until(what, || async move {
            let v = self.client.execute(js, vec![]).await.ok()?;
            (!v.is_null()).then_some(v)
        })
        .await
    }

    /// Emulates the system's dark colour scheme.
    async fn prefer_dark(&self) {
        self.client
            .issue_cmd(Cdp {
                cmd: "Emulation.setEmulatedMedia",
                params: json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
            })
            .await
            .expect("emulate dark mode");
    }

    /// A PNG of the whole page (the window grown to the page's height), written
    /// to `name` in the screenshot directory; returns its path.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let dims = self
            .script("return [window.outerHeight - window.innerHeight, document.documentElement.scrollHeight];")
            .await;
        let height = dims[0].as_i64().unwrap_or(0) + dims[1].as_i64().unwrap_or(1000);
        self.client
            .set_window_size(1400, height.clamp(600, 4000) as u32)
            .await
            .expect("resize the window");
        let png = self.client.screenshot().await.expect("screenshot");
        self.client
            .set_window_size(1400, 1000)
            .await
            .expect("restore the window");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("create the screenshot directory");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write the screenshot");
        println!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    /// Ends the session so chromedriver closes Chromium before the driver
    /// itself is killed. `drop` cannot await: the close runs on this
    /// (multi-threaded) test runtime, which also drives fantoccini's session
    /// task.
    fn drop(&mut self) {
        let client = self.client.clone();
        tokio::task::block_in_place(|| {
            let _ = tokio::runtime::Handle::current().block_on(tokio::time::timeout(
                Duration::from_secs(10),
                client.close(),
            ));
        });
    }
}

fn screenshot_dir() -> PathBuf {
    if std::env::var("PAYOUTS_SCREENSHOTS").as_deref() == Ok("docs") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
    }
}

// --- the server and its data ----------------------------------------------------

/// The admin router on a free port over a fresh database and Redis prefix.
struct Admin {
    db: TestDb,
    queue: Queue,
    prefix: String,
    base: String,
    settings: Arc<Settings>,
}

impl Admin {
    async fn start() -> Admin {
        Admin::start_with(&[]).await
    }

    /// With `extra` settings (`PAYOUTS_*` variables).
    async fn start_with(extra: &[(&str, &str)]) -> Admin {
        let db = TestDb::new().await;
        let prefix = unique("t");
        // No gateway is called: nothing here runs a worker.
        let settings =
            common::settings(&db.url, &redis_url(), &prefix, "http://127.0.0.1:9", extra);
        let conn = payouts::queue::connect(&settings.redis)
            .await
            .expect("redis");
        let queue = Queue::from_settings(conn, &settings);
        let settings = Arc::new(settings);
        let state = AdminState::new(
            db.pool.clone(),
            queue.clone(),
            settings.clone(),
            payouts::clock::system(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            axum::serve(listener, router(state))
                .await
                .expect("admin server");
        });
        Admin {
            db,
            queue,
            prefix,
            base,
            settings,
        }
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// A token for `name` with `role`.
    async fn token(&self, name: &str, role: Role) -> String {
        tokens::create(self.pool(), name, role)
            .await
            .expect("token")
            .1
    }

    async fn status(&self, id: i64) -> String {
        sqlx::query_scalar("SELECT status FROM payouts WHERE id = $1")
            .bind(id)
            .fetch_one(self.pool())
            .await
            .expect("status")
    }
}

/// Logs in through the form and waits for the overview.
async fn log_in(browser: &Browser, admin: &Admin, token: &str) {
    browser.goto(&format!("{}/login", admin.base)).await;
    browser.type_into("#token", token).await;
    browser.click("#login").await;
    browser.wait("[data-tile=\"pending\"]").await;
}

/// Moves `ids` from `from` to `to` the way the fleet does (status, the
/// columns the lifecycle needs, and the event), the move of `ids[i]` at
/// `at[i]`, failing with `code[i]` where it fails.
async fn step(
    pool: &PgPool,
    ids: &[i64],
    at: &[DateTime<Utc>],
    from: &str,
    to: &str,
    code: &[&str],
) {
    let codes: Vec<String> = (0..ids.len())
        .map(|i| {
            code.get(i % code.len().max(1))
                .copied()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    sqlx::query(
        "WITH u AS (SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS u(id, at, code)),
         upd AS (
             UPDATE payouts p SET
                 status = $5,
                 updated_at = u.at,
                 attempt = CASE WHEN $5 = 'processing' THEN p.attempt + 1 ELSE p.attempt END,
                 lease_owner = CASE WHEN $5 = 'processing' THEN 'worker:host-7-' || (p.id % 2) END,
                 lease_until = CASE WHEN $5 IN ('queued', 'processing') THEN u.at + interval '5 minutes' END,
                 gateway_transfer_id = CASE WHEN $5 IN ('paid', 'in_transit') THEN 'tr_' || md5(p.id::text)
                                            ELSE p.gateway_transfer_id END,
                 paid_at = CASE WHEN $5 = 'paid' THEN u.at END,
                 next_attempt_at = CASE WHEN $5 = 'retrying' THEN u.at + interval '10 minutes' END,
                 failure_code = CASE WHEN $5 IN ('failed', 'retrying') THEN u.code ELSE p.failure_code END,
                 failure_message = CASE
                     WHEN $5 IN ('failed', 'retrying') THEN CASE u.code
                         WHEN 'account_closed' THEN 'The destination account is closed.'
                         WHEN 'insufficient_funds' THEN 'The platform balance cannot cover this transfer.'
                         WHEN 'invalid_account_number' THEN 'The bank rejected the account number.'
                         WHEN 'rate_limit' THEN 'Too many requests to the gateway; backing off.'
                         ELSE 'The gateway refused the transfer.' END
                     ELSE p.failure_message END
             FROM u WHERE p.id = u.id
             RETURNING p.id, p.attempt, p.lease_owner, p.failure_code, u.at)
         INSERT INTO payout_events (payout_id, from_status, to_status, actor, reason, attempt, at)
         SELECT id, $4, $5,
                CASE WHEN $5 = 'queued' THEN 'producer:host-1'
                     ELSE coalesce(lease_owner, 'worker:host-7-' || (id % 2)) END,
                CASE WHEN $5 = 'queued' THEN 'due'
                     WHEN $5 IN ('failed', 'retrying') THEN failure_code END,
                attempt, at
         FROM upd",
    )
    .bind(ids)
    .bind(at)
    .bind(&codes)
    .bind(from)
    .bind(to)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
}

/// Each payout's whole way from `pending` to `to`, ending at `at[i]`.
async fn drive(pool: &PgPool, ids: &[i64], at: &[DateTime<Utc>], to: &str, code: &[&str]) {
    let before = |secs: i64| -> Vec<DateTime<Utc>> {
        at.iter()
            .map(|t| *t - chrono::Duration::seconds(secs))
            .collect()
    };
    if to == "cancelled" {
        return step(pool, ids, at, "pending", "cancelled", code).await;
    }
    step(pool, ids, &before(3), "pending", "queued", code).await;
    if to == "queued" {
        return;
    }
    step(pool, ids, &before(2), "queued", "processing", code).await;
    if to != "processing" {
        step(pool, ids, at, "processing", to, code).await;
    }
}

/// What [`seed`] made.
struct Seeded {
    /// The failed payouts, newest first, as the dashboard lists them.
    failed: Vec<i64>,
    /// How many are paid.
    paid: usize,
}

/// A fleet's last hour: 180 paid spread over the minutes, failures with
/// three codes, a few payouts in every other status, a producer leader and
/// three workers (as apalis records its consumers).
async fn seed(admin: &Admin) -> Seeded {
    let pool = admin.pool();
    let now = Utc::now();
    let mut payee_ids = Vec::new();
    for (name, account, currency) in [
        ("Ada Lovelace", "acct_ada", "EUR"),
        ("Grace Hopper", "acct_grace", "USD"),
        ("Alan Turing", "acct_alan", "GBP"),
        ("Katherine Johnson", "acct_katherine", "USD"),
        ("Edsger Dijkstra", "acct_edsger", "EUR"),
    ] {
        let payee = payees::create(pool, name, account, currency.parse::<Currency>().unwrap())
            .await
            .expect("payee");
        payee_ids.push((payee.id, currency));
    }
    let amounts = [
        "125.00", "48.50", "1200.00", "9.99", "310.25", "75.40", "2500.00", "18.75", "640.10",
        "99.00", "12.34",
    ];
    let mut n = 0usize;
    let mut create = async |due: DateTime<Utc>| -> i64 {
        n += 1;
        let (payee, currency) = payee_ids[n % payee_ids.len()];
        let money = Money::parse(amounts[n % amounts.len()], currency).unwrap();
        let created = due.min(now) - chrono::Duration::minutes(30);
        payouts::db::payouts::create(pool, payee, money, due, "producer:host-1", created)
            .await
            .expect("payout")
            .id
            .get()
    };
    let secs = chrono::Duration::seconds;
    let mins = chrono::Duration::minutes;

    // Paid, every minute of the hour, due a second or a few before.
    let (mut paid, mut paid_at) = (Vec::new(), Vec::new());
    for m in 0..60i64 {
        for j in 0..(1 + (m * 7 + 3) % 5) {
            let at = now - mins(m) - secs((j * 13) % 45);
            let lag =
                400 + ((m * 37 + j * 11) % 23) * 150 + if (m + j) % 29 == 0 { 6000 } else { 0 };
            paid.push(create(at - chrono::Duration::milliseconds(lag)).await);
            paid_at.push(at);
        }
    }
    drive(pool, &paid, &paid_at, "paid", &[]).await;

    // Failed, with three codes, over the hour.
    let failed_codes = [
        "account_closed",
        "insufficient_funds",
        "account_closed",
        "invalid_account_number",
        "insufficient_funds",
        "account_closed",
        "invalid_account_number",
        "insufficient_funds",
        "account_closed",
    ];
    let mut failed = Vec::new();
    let mut failed_at = Vec::new();
    for i in 0..failed_codes.len() as i64 {
        let at = now - mins(52 - i * 6) - secs(17);
        failed.push(create(at - secs(2)).await);
        failed_at.push(at);
    }
    drive(pool, &failed, &failed_at, "failed", &failed_codes).await;

    // A few in every other status.
    let mut some = async |count: i64, due: DateTime<Utc>| {
        let mut ids = Vec::new();
        for _ in 0..count {
            ids.push(create(due).await);
        }
        ids
    };
    let retrying = some(3, now - mins(4)).await;
    drive(
        pool,
        &retrying,
        &[now - mins(3); 3],
        "retrying",
        &["rate_limit"],
    )
    .await;
    let in_transit = some(4, now - mins(6)).await;
    drive(pool, &in_transit, &[now - mins(5); 4], "in_transit", &[]).await;
    let processing = some(3, now - secs(20)).await;
    drive(pool, &processing, &[now - secs(8); 3], "processing", &[]).await;
    let queued = some(5, now - secs(12)).await;
    drive(pool, &queued, &[now - secs(5); 5], "queued", &[]).await;
    let cancelled = some(2, now + mins(90)).await;
    drive(pool, &cancelled, &[now - mins(20); 2], "cancelled", &[]).await;
    some(6, now + mins(45)).await;

    // A producer leader, and worker heartbeats where apalis keeps them.
    Leadership::new(
        admin.queue.conn(),
        &admin.prefix,
        "producer:host-1",
        Duration::from_secs(120),
    )
    .hold()
    .await
    .expect("leader lock");
    let cfg = admin.queue.config();
    let mut conn = admin.queue.conn();
    let mut pipe = redis::pipe();
    for (name, ago, jobs) in [("host-7-0", 1, 3), ("host-7-1", 2, 2), ("host-9-0", 300, 0)] {
        let key = format!("{}:{name}", cfg.inflight_jobs_set());
        pipe.zadd(cfg.workers_set(), &key, now.timestamp() - ago);
        for j in 0..jobs {
            pipe.sadd(&key, format!("job-{name}-{j}"));
        }
        pipe.expire(&key, 300);
    }
    pipe.expire(cfg.workers_set(), 300);
    let () = pipe
        .query_async(&mut conn)
        .await
        .expect("worker heartbeats");

    failed.reverse();
    Seeded {
        failed,
        paid: paid.len(),
    }
}

// --- the tests ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retries_a_failed_payout_from_the_dashboard() {
    let admin = Admin::start().await;
    let seeded = seed(&admin).await;
    let token = admin.token("alice", Role::Operator).await;
    let browser = Browser::start().await;

    // Log in through the form: the overview renders its tiles.
    log_in(&browser, &admin, &token).await;
    browser
        .wait_text("#who-name", "the operator's name", |t| t == "alice")
        .await;
    browser
        .wait_text("#who-role", "the operator's role", |t| {
            t.eq_ignore_ascii_case("operator")
        })
        .await;
    let failed = seeded.failed.len().to_string();
    let paid = seeded.paid.to_string();
    browser
        .wait_text(
            "[data-tile=\"failed\"] .tile-value",
            "the failed count",
            |t| t == failed,
        )
        .await;
    browser
        .wait_text(
            "[data-tile=\"paid\"] .tile-value",
            "the paid count (exact, or marked ≈ when estimated)",
            |t| t.trim_start_matches("≈ ") == paid,
        )
        .await;
    browser
        .wait_text(
            "[data-tile=\"producer_leader\"] .tile-value",
            "the leader",
            |t| t == "producer:host-1",
        )
        .await;
    browser.wait("#chart .bar-paid").await;
    browser.wait("#workers-table tbody tr").await;
    browser.screenshot("overview.png").await;

    // Payouts, filtered to failed: only failed rows.
    browser.click("#nav-payouts").await;
    browser.wait("#filters #f-status").await;
    browser.click("#f-status option[value=\"failed\"]").await;
    browser.click("#apply").await;
    let rows = browser
        .wait_script(
            "only the failed payouts, listed",
            &format!(
                "const rows = [...document.querySelectorAll('#payouts-table tbody tr[data-id]')]
                   .map(r => [Number(r.dataset.id), r.querySelector('.status').textContent]);
                 return location.hash.includes('status=failed') && rows.length === {}
                   && rows.every(r => r[1] === 'failed') ? rows : null;",
                seeded.failed.len()
            ),
        )
        .await;
    let listed: Vec<i64> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[0].as_i64().expect("id"))
        .collect();
    assert_eq!(listed, seeded.failed, "the failed payouts, newest first");
    // An operator is not offered the admin's bulk retry.
    assert!(browser.find("#bulk-retry").await.is_none());

    // Open the newest failed payout and retry it.
    let id = listed[0];
    browser
        .click(&format!("tr[data-id=\"{id}\"] td.id a"))
        .await;
    browser
        .wait_text("#payout-status", "failed", |t| t == "failed")
        .await;
    browser
        .wait(&format!("#payout[data-id=\"{id}\"] #timeline"))
        .await;
    browser.click("#action-retry").await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser
        .type_into("#confirm-reason", "bank details corrected")
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_text("#payout-status", "queued", |t| t == "queued")
        .await;
    browser
        .wait_text("#notice", "the move", |t| {
            t.contains("from failed to queued")
        })
        .await;
    browser.wait("#timeline li.to-queued").await;
    browser.screenshot("payout.png").await;

    // The database agrees, and the operator is the actor.
    assert_eq!(admin.status(id).await, "queued");
    let (actor, from, to): (String, Option<String>, String) = sqlx::query_as(
        "SELECT actor, from_status, to_status FROM payout_events WHERE payout_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(id)
    .fetch_one(admin.pool())
    .await
    .expect("newest event");
    assert_eq!(
        (actor.as_str(), from.as_deref(), to.as_str()),
        ("operator:alice", Some("failed"), "queued")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_action_buttons() {
    let admin = Admin::start().await;
    let seeded = seed(&admin).await;
    let token = admin.token("vera", Role::Viewer).await;
    let browser = Browser::start().await;

    // A wrong token is turned away with a message on the form.
    browser.goto(&format!("{}/login", admin.base)).await;
    browser.type_into("#token", "pat_not_a_token").await;
    browser.click("#login").await;
    browser
        .wait_text("#error", "the refusal", |t| {
            t == "That token is not valid or was revoked."
        })
        .await;

    log_in(&browser, &admin, &token).await;
    browser
        .wait_text("#who-role", "the viewer's role", |t| {
            t.eq_ignore_ascii_case("viewer")
        })
        .await;
    // The admin's pause button is in the page, hidden (not only marked so).
    let pause = browser.wait("#fleet-pause").await;
    assert!(
        !pause.is_displayed().await.expect("displayed"),
        "a viewer is shown the fleet pause button"
    );

    // The overview refreshes itself: a payout added behind it shows up.
    browser
        .wait_text("[data-tile=\"pending\"] .tile-value", "6 pending", |t| {
            t == "6"
        })
        .await;
    let payee: i64 = sqlx::query_scalar("SELECT min(id) FROM payees")
        .fetch_one(admin.pool())
        .await
        .expect("a payee");
    let due = Utc::now() + chrono::Duration::hours(1);
    let money = Money::parse("10.00", "EUR").unwrap();
    payouts::db::payouts::create(
        admin.pool(),
        payouts::domain::PayeeId::new(payee),
        money,
        due,
        "operator:test",
        Utc::now(),
    )
    .await
    .expect("payout");
    browser
        .wait_text("[data-tile=\"pending\"] .tile-value", "7 pending", |t| {
            t == "7"
        })
        .await;

    // A failed payout, which an operator could retry or cancel.
    let id = seeded.failed[0];
    browser
        .goto(&format!("{}/ui/#/payouts/{id}", admin.base))
        .await;
    browser
        .wait_text("#payout-status", "failed", |t| t == "failed")
        .await;
    browser.wait("#timeline li").await;
    for action in [
        "#action-retry",
        "#action-cancel",
        "#action-enqueue",
        "#payout .actions button",
    ] {
        assert!(
            browser.find(action).await.is_none(),
            "a viewer is offered {action}"
        );
    }

    // Nor the bulk retry on the failed list.
    browser
        .goto(&format!("{}/ui/#/payouts?status=failed", admin.base))
        .await;
    browser
        .wait(&format!("#payouts-table tr[data-id=\"{id}\"]"))
        .await;
    assert!(
        browser.find("#bulk-retry").await.is_none(),
        "a viewer is offered the bulk retry"
    );
    assert_eq!(admin.status(id).await, "failed");

    // Logging out ends the session: the dashboard sends back to the login.
    browser.click("#logout").await;
    browser.wait("#token").await;
    browser.goto(&format!("{}/ui/", admin.base)).await;
    browser
        .wait_script(
            "the login page for a closed session",
            "return location.pathname === '/login' && document.getElementById('token') ? true : null;",
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_retries_every_matching_failed_payout_after_seeing_how_many() {
    let admin = Admin::start().await;
    let seeded = seed(&admin).await;
    let token = admin.token("root", Role::Admin).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, &token).await;

    let closed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM payouts WHERE status = 'failed' AND failure_code = 'account_closed' ORDER BY id",
    )
    .fetch_all(admin.pool())
    .await
    .expect("account_closed payouts");
    assert_eq!(closed.len(), 4);

    // From the failures view to its failed payouts, then retry them all.
    browser.click("#nav-failures").await;
    browser
        .click("#failures-table tr[data-code=\"account_closed\"] a")
        .await;
    browser.wait("#payouts-table").await;
    browser.click("#bulk-retry").await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser
        .wait_text("#confirm-message", "the count", |t| {
            t.starts_with("This will retry 4 payouts.")
        })
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_text("#notice", "the result", |t| t.contains("Retried 4 of 4"))
        .await;
    browser.wait("#payouts-empty").await;

    for id in &closed {
        assert_eq!(admin.status(*id).await, "queued", "payout {id}");
    }
    let still_failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payouts WHERE status = 'failed'")
            .fetch_one(admin.pool())
            .await
            .expect("failed count");
    assert_eq!(
        still_failed,
        seeded.failed.len() as i64 - 4,
        "the others are left alone"
    );
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT actor FROM payout_events WHERE payout_id = ANY($1) AND to_status = 'queued' AND from_status = 'failed'",
    )
    .bind(&closed)
    .fetch_all(admin.pool())
    .await
    .expect("actors");
    assert_eq!(actors, ["operator:root"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_on_a_payout_changed_meanwhile_shows_the_conflict() {
    let admin = Admin::start().await;
    let seeded = seed(&admin).await;
    let token = admin.token("omar", Role::Operator).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, &token).await;

    let id = seeded.failed[1];
    browser
        .goto(&format!("{}/ui/#/payouts/{id}", admin.base))
        .await;
    browser
        .wait_text("#payout-status", "failed", |t| t == "failed")
        .await;
    browser.wait("#action-retry").await;

    // Someone else cancels it while the page still offers a retry.
    payouts::db::payouts::cancel(
        admin.pool(),
        payouts::domain::PayoutId::new(id),
        "operator:someone-else",
        "duplicate",
        Utc::now(),
    )
    .await
    .expect("cancel behind the page");

    browser.click("#action-retry").await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser.click("#confirm-ok").await;
    let alert = browser
        .wait_text("#alert", "the conflict", |t| t.contains("cancelled"))
        .await;
    assert!(
        alert.contains("retry"),
        "the alert says what failed: {alert}"
    );
    browser
        .wait_text("#payout-status", "cancelled", |t| t == "cancelled")
        .await;
    assert!(
        browser.find("#action-retry").await.is_none(),
        "no retry offered once cancelled"
    );
    assert_eq!(admin.status(id).await, "cancelled");
}

/// Issue 19, dashboard parity: an admin pauses the fleet (a banner on every
/// page, the Redis pause key set) and resumes it; goes to a payout and a
/// payee from the search box; selects rows and cancels them after a dry-run
/// count; sees the list update live (and stop while paused); reads the
/// payee, reconcile and token screens; the Due→paid card shows minute-long
/// latencies as `1m 05s` without overflowing; dark mode follows the system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_pauses_the_fleet_searches_and_cancels_selected_payouts() {
    let admin = Admin::start().await;
    let seeded = seed(&admin).await;
    // Minute-long latencies for the Due→paid card.
    sqlx::query(
        "UPDATE payouts SET due_at = paid_at - interval '65 seconds' WHERE status = 'paid'",
    )
    .execute(admin.pool())
    .await
    .expect("minute-long latencies");
    sqlx::query(
        "INSERT INTO reconcile_runs (started_at, finished_at, since, checked, fixed, mismatches, actor, failed, error)
         VALUES (now(), now(), now() - interval '1 day', 180, 0, '{\"paid_in_db_unknown_to_gateway\": 0}', 'cli:ops', false, NULL)",
    )
    .execute(admin.pool())
    .await
    .expect("a reconcile run");
    let token = admin.token("root", Role::Admin).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, &token).await;

    // The Due→paid card: 1m 05s, inside its cell.
    let p50 = browser
        .wait_text(
            "[data-tile=\"due_to_paid\"] dd",
            "the p50 as minutes and seconds",
            |t| t == "1m 05s",
        )
        .await;
    assert_eq!(p50, "1m 05s");
    let overflow = browser
        .script(
            "return [...document.querySelectorAll('[data-tile=\"due_to_paid\"] dd')]
               .filter(d => d.scrollWidth > d.clientWidth + 1).length;",
        )
        .await;
    assert_eq!(overflow, 0, "no latency overflows its cell");

    // Pause: confirmed, then a banner on every page; the key is set.
    browser.click("#fleet-pause").await;
    browser
        .wait_script(
            "the pause dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser.type_into("#confirm-reason", "bank holiday").await;
    browser.click("#confirm-ok").await;
    browser
        .wait_text("#fleet-paused", "the paused banner", |t| {
            t.contains("The fleet is paused")
                && t.contains("operator:root")
                && t.contains("bank holiday")
        })
        .await;
    let key = payouts::gateway::guard::pause_key(&admin.prefix);
    let left = payouts::gateway::guard::read_pause(&mut admin.queue.conn(), &key)
        .await
        .expect("redis");
    assert!(left.is_some(), "the workers' pause key is set");
    browser.click("#nav-failures").await;
    browser.wait("#failures-table").await;
    browser.wait("#fleet-paused #fleet-resume").await;
    browser.click("#fleet-resume").await;
    browser
        .wait_script(
            "the resume dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_script(
            "the banner gone",
            "return document.getElementById('fleet-paused') ? null : true;",
        )
        .await;
    assert!(
        payouts::gateway::guard::read_pause(&mut admin.queue.conn(), &key)
            .await
            .expect("redis")
            .is_none()
    );
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE target = 'fleet' AND actor = 'operator:root' ORDER BY id",
    )
    .fetch_all(admin.pool())
    .await
    .expect("audit");
    assert_eq!(audited, ["fleet.pause", "fleet.resume"]);

    // Search: an idempotency key goes straight to its payout; a name lists payees.
    let target = seeded.failed[0];
    browser
        .type_into("#search-q", &format!("payout_{target}"))
        .await;
    browser.click("#search-go").await;
    browser
        .wait(&format!("#payout[data-id=\"{target}\"]"))
        .await;
    browser
        .script("document.getElementById('search-q').value = '';")
        .await;
    browser.type_into("#search-q", "acct_").await;
    browser.click("#search-go").await;
    browser
        .wait_script(
            "five payees found by account prefix",
            "return document.querySelectorAll('#search-results tr[data-kind=\"payee\"]').length === 5 || null;",
        )
        .await;
    browser
        .click("#search-results tr[data-kind=\"payee\"] a")
        .await;
    browser.wait("#payee #payee-terms").await;

    // Select four failed payouts; another filter starts a new selection.
    browser
        .goto(&format!("{}/ui/#/payouts?status=paid", admin.base))
        .await;
    browser.wait("#payouts-table input.row-select").await;
    browser.click("#payouts-table input.row-select").await;
    browser
        .wait_text("#selection-meta", "one selected", |t| t == "1 selected")
        .await;
    browser
        .goto(&format!("{}/ui/#/payouts?status=failed", admin.base))
        .await;
    browser.wait("#payouts-table input.row-select").await;
    browser
        .wait_text("#selection-meta", "a new filter, a new selection", |t| {
            t.is_empty()
        })
        .await;
    let chosen = &seeded.failed[..4];
    for id in chosen {
        browser
            .click(&format!("input.row-select[data-id=\"{id}\"]"))
            .await;
    }
    browser
        .wait_text("#selection-meta", "four selected", |t| t == "4 selected")
        .await;
    // Someone else cancels one of them meanwhile: the dry run counts 3 of 4.
    payouts::db::payouts::cancel(
        admin.pool(),
        payouts::domain::PayoutId::new(chosen[3]),
        "operator:else",
        "dup",
        Utc::now(),
    )
    .await
    .expect("cancel behind the page");
    browser.click("#bulk-cancel-selected").await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser
        .wait_text("#confirm-message", "the count", |t| {
            t.starts_with("This will cancel 3 of the 4 selected payouts. 1 is left alone")
        })
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_text("#notice", "the result", |t| {
            t.contains("Cancelled 3 payouts")
        })
        .await;
    for id in &chosen[..3] {
        assert_eq!(admin.status(*id).await, "cancelled", "payout {id}");
    }
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT actor FROM payout_events WHERE payout_id = ANY($1) AND to_status = 'cancelled'",
    )
    .bind(&chosen[..3])
    .fetch_all(admin.pool())
    .await
    .expect("actors");
    assert_eq!(actors, ["operator:root"]);
    browser
        .wait_text("#selection-meta", "the selection cleared", |t| t.is_empty())
        .await;

    // Live: a payout cancelled behind the page leaves the failed list by itself.
    let behind = seeded.failed[4];
    browser
        .wait(&format!("#payouts-table tr[data-id=\"{behind}\"]"))
        .await;
    payouts::db::payouts::cancel(
        admin.pool(),
        payouts::domain::PayoutId::new(behind),
        "operator:else",
        "dup",
        Utc::now(),
    )
    .await
    .expect("cancel behind the page");
    browser
        .wait_script(
            "the live list to drop the cancelled payout",
            &format!("return document.querySelector('#payouts-table tr[data-id=\"{behind}\"]') ? null : true;"),
        )
        .await;
    browser.click("#live-toggle").await;
    browser
        .wait_text("#live-state", "paused live updates", |t| t == "Paused")
        .await;
    browser.click("#live-toggle").await;
    browser
        .wait_text("#live-state", "live again", |t| t == "Live")
        .await;

    // The read-only screens.
    browser.click("#nav-payees").await;
    browser
        .wait_script(
            "five payees",
            "return document.querySelectorAll('#payees-table tbody tr').length === 5 || null;",
        )
        .await;
    browser.click("#nav-reconcile").await;
    browser
        .wait_text(
            "#reconcile-table tbody tr td:nth-child(4)",
            "the run's count",
            |t| t == "180",
        )
        .await;
    browser.click("#nav-tokens").await;
    browser.wait("#tokens-table tr[data-name=\"root\"]").await;
    browser.click("#nav-settlements").await;
    browser.wait("#settlements .empty").await;

    // Dark mode follows the system's colour scheme.
    browser.prefer_dark().await;
    let dark = browser
        .wait_script(
            "a dark page",
            "const c = getComputedStyle(document.documentElement).backgroundColor.match(/\\d+/g).map(Number);
             return c[0] + c[1] + c[2] < 150 ? c : null;",
        )
        .await;
    assert!(dark.is_array());
    browser.click("#nav-overview").await;
    browser.wait("[data-tile=\"pending\"]").await;
    browser.screenshot("overview-dark.png").await;
}

// --- outbound webhooks ----------------------------------------------------------

/// Settings for the webhook screens: endpoints on loopback, a retry 1 s
/// after a failure.
const HOOK_SETTINGS: &[(&str, &str)] = &[
    ("PAYOUTS_WEBHOOKS_OUT__ALLOW_PRIVATE", r#"["127.0.0.0/8"]"#),
    ("PAYOUTS_WEBHOOKS_OUT__RETRY_SCHEDULE_SECS", "[1, 1]"),
    ("PAYOUTS_WEBHOOKS_OUT__TIMEOUT_MS", "3000"),
];

#[derive(Clone, Default)]
struct ReceiverState {
    /// The `webhook-id` of every request, in order.
    got: Arc<std::sync::Mutex<Vec<String>>>,
    /// Status codes to answer, in order; then 200.
    script: Arc<std::sync::Mutex<std::collections::VecDeque<u16>>>,
}

/// A platform's receiver on loopback, and the fleet's webhook deliverer
/// running against the admin's database; both stop when dropped.
struct Hooks {
    url: String,
    state: ReceiverState,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Hooks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Hooks {
    async fn start(admin: &Admin) -> Hooks {
        async fn hook(
            axum::extract::State(s): axum::extract::State<ReceiverState>,
            headers: axum::http::HeaderMap,
        ) -> (axum::http::StatusCode, String) {
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            s.got.lock().unwrap().push(id);
            let code = s.script.lock().unwrap().pop_front().unwrap_or(200);
            (
                axum::http::StatusCode::from_u16(code).unwrap(),
                format!("answer {code}"),
            )
        }
        let state = ReceiverState::default();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await
        });
        let dispatcher = payouts::services::webhooks_out::Dispatcher::new(
            admin.pool().clone(),
            admin.settings.webhooks_out.clone(),
            payouts::clock::system(),
            "worker:browser-test",
        )
        .expect("dispatcher");
        tokio::spawn(payouts::services::webhooks_out::run(
            dispatcher,
            stop.clone(),
        ));
        Hooks { url, state, stop }
    }

    /// Registers the receiver for `payout.created`, as an admin would; its id.
    async fn register(&self, admin: &Admin) -> i64 {
        let new = payouts::services::webhooks_out::endpoints::NewEndpoint {
            url: self.url.clone(),
            event_types: vec!["payout.created".into()],
            description: Some("ledger sync".into()),
            enabled: Some(true),
        };
        let policy = payouts::services::webhooks_out::safety::Policy::new(
            &admin.settings.webhooks_out.allow_private,
        );
        payouts::services::webhooks_out::endpoints::register(
            admin.pool(),
            &policy,
            &new,
            "operator:setup",
            None,
            Utc::now(),
        )
        .await
        .expect("register the endpoint")
        .0
    }

    fn got(&self) -> Vec<String> {
        self.state.got.lock().unwrap().clone()
    }

    fn script(&self, codes: &[u16]) {
        self.state.script.lock().unwrap().extend(codes);
    }
}

/// A new payout (its `payout.created` event is what the endpoint hears of).
async fn new_payout(admin: &Admin) -> i64 {
    let payee = payees::create(
        admin.pool(),
        "Ada Lovelace",
        &unique("acct"),
        "EUR".parse::<Currency>().unwrap(),
    )
    .await
    .expect("payee");
    let due = Utc::now() + chrono::Duration::hours(1);
    let money = Money::parse("12.50", "EUR").unwrap();
    (payouts::db::payouts::create(
        admin.pool(),
        payee.id,
        money,
        due,
        "operator:test",
        Utc::now(),
    )
    .await
    .expect("payout")
    .id)
        .get()
}

/// The message to endpoint `endpoint` once it is delivered: (id, attempts).
async fn delivered_message(admin: &Admin, endpoint: i64) -> (i64, i32) {
    eventually(WAIT, "a delivered message", || async {
        sqlx::query_as::<_, (i64, i32)>(
            "SELECT id, attempts FROM webhook_deliveries WHERE endpoint_id = $1 AND status = 'delivered'",
        )
        .bind(endpoint)
        .fetch_optional(admin.pool())
        .await
        .expect("messages")
    })
    .await
}

async fn audited(admin: &Admin, prefix: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT actor, action FROM audit_log WHERE action LIKE $1 || '%' AND actor <> 'operator:setup' ORDER BY id",
    )
    .bind(prefix)
    .fetch_all(admin.pool())
    .await
    .expect("audit")
}

/// Issue 18: an admin registers an endpoint from the dashboard and is shown
/// its `whsec_` secret once (never in a later page or answer); the
/// description is shown as text, not markup; the admin rotates the secret
/// (a new one, shown once), disables and deletes the endpoint; all audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_registers_a_webhook_endpoint_and_sees_its_secret_once() {
    let admin = Admin::start_with(HOOK_SETTINGS).await;
    let token = admin.token("root", Role::Admin).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, &token).await;

    browser.click("#nav-webhooks").await;
    browser.wait("#webhooks-empty").await;
    browser
        .type_into("#wh-url", "http://127.0.0.1:9/hooks/payouts")
        .await;
    browser
        .type_into("#wh-description", "Ledger <b>sync</b>")
        .await;
    browser.click("#wh-all").await;
    browser.click("input.wh-type[value=\"payout.paid\"]").await;
    browser
        .click("input.wh-type[value=\"payout.failed\"]")
        .await;
    browser.click("#wh-create").await;

    let secret = browser
        .wait_text("#webhook-secret-value", "the new secret", |t| {
            t.starts_with("whsec_")
        })
        .await;
    let (id, stored, types): (i64, String, Vec<String>) =
        sqlx::query_as("SELECT id, secret, event_types FROM webhook_endpoints")
            .fetch_one(admin.pool())
            .await
            .expect("the endpoint");
    assert_eq!(secret, stored, "the secret shown is the one that signs");
    assert_eq!(types, ["payout.paid", "payout.failed"]);
    let row = format!("#webhook-endpoints-table tr[data-id=\"{id}\"]");
    browser
        .wait_text(&format!("{row} td.mono"), "the event types", |t| {
            t == "payout.paid, payout.failed"
        })
        .await;
    // Untrusted text is text: the description's tags are shown, not made.
    browser
        .wait_text(&format!("{row} td.url .muted"), "the description", |t| {
            t == "Ledger <b>sync</b>"
        })
        .await;
    assert!(
        browser.find(&format!("{row} b")).await.is_none(),
        "the description made markup"
    );

    // Once: not on the endpoint's page, not back on the list, nor in any answer.
    browser.click(&format!("{row} a")).await;
    browser
        .wait_text("#webhook-url", "the endpoint's URL", |t| {
            t == "http://127.0.0.1:9/hooks/payouts"
        })
        .await;
    browser.click("#webhook .crumb").await;
    browser.wait(&row).await;
    let shown = browser
        .script(&format!(
            "return document.documentElement.outerHTML.includes({});",
            json!(secret)
        ))
        .await;
    assert_eq!(shown, json!(false), "the secret is shown again");
    let http = reqwest::Client::new();
    for path in [
        "/api/v1/webhook-endpoints".to_string(),
        format!("/api/v1/webhook-endpoints/{id}"),
    ] {
        let body = http
            .get(format!("{}{path}", admin.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("body");
        assert!(body.contains("payout.paid"), "{path}: {body}");
        assert!(!body.contains(&secret), "{path} shows the secret");
    }

    // Rotate: a new secret, shown once; the old one signs during the overlap.
    browser.click(&format!("{row} a")).await;
    browser.click("#endpoint-rotate").await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser.click("#confirm-ok").await;
    let rotated = browser
        .wait_text("#webhook-secret-value", "the rotated secret", |t| {
            t.starts_with("whsec_") && t != secret
        })
        .await;
    let (now_signing, previous): (String, Option<String>) =
        sqlx::query_as("SELECT secret, previous_secret FROM webhook_endpoints WHERE id = $1")
            .bind(id)
            .fetch_one(admin.pool())
            .await
            .expect("secrets");
    assert_eq!(
        (now_signing.as_str(), previous.as_deref()),
        (rotated.as_str(), Some(secret.as_str()))
    );

    // Disable, then delete.
    browser.click("#endpoint-disable").await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait("#webhook-state [data-state=\"disabled\"]")
        .await;
    browser.wait("#endpoint-enable").await;
    let enabled: bool = sqlx::query_scalar("SELECT enabled FROM webhook_endpoints WHERE id = $1")
        .bind(id)
        .fetch_one(admin.pool())
        .await
        .expect("enabled");
    assert!(!enabled);
    browser.click("#endpoint-delete").await;
    browser
        .wait_text("#confirm-message", "what is deleted", |t| {
            t.contains("http://127.0.0.1:9/hooks/payouts")
        })
        .await;
    browser.click("#confirm-ok").await;
    browser.wait("#webhooks-empty").await;
    browser
        .wait_text("#notice", "the deletion", |t| {
            t.contains(&format!("Endpoint #{id} deleted"))
        })
        .await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints")
        .fetch_one(admin.pool())
        .await
        .expect("count");
    assert_eq!(left, 0);
    let actions: Vec<String> = audited(&admin, "webhook_endpoint.")
        .await
        .into_iter()
        .map(|(actor, action)| {
            assert_eq!(actor, "operator:root");
            action
        })
        .collect();
    assert_eq!(
        actions,
        [
            "webhook_endpoint.create",
            "webhook_endpoint.rotate_secret",
            "webhook_endpoint.update",
            "webhook_endpoint.delete"
        ]
    );
}

/// Issue 18: the delivery log of an endpoint shows a message that was
/// refused once (HTTP 500, with the answer's excerpt and latency) and then
/// delivered, with both attempts; the page updates by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_log_shows_a_delivered_message_with_its_attempts() {
    let admin = Admin::start_with(HOOK_SETTINGS).await;
    let hooks = Hooks::start(&admin).await;
    let endpoint = hooks.register(&admin).await;
    let token = admin.token("vera", Role::Viewer).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, &token).await;
    browser
        .goto(&format!("{}/ui/#/webhooks/{endpoint}", admin.base))
        .await;
    browser.wait("#webhook-messages-empty").await;

    // The receiver refuses the first request (and the at-once retry), then
    // takes the retry a second later.
    hooks.script(&[500, 500]);
    let payout = new_payout(&admin).await;
    let (message, attempts) = delivered_message(&admin, endpoint).await;
    assert_eq!(attempts, 2, "refused once, then taken");
    let row = format!("#webhook-deliveries-table tbody.message[data-id=\"{message}\"]");
    browser
        .wait(&format!("{row}[data-status=\"delivered\"]"))
        .await;
    let cells = browser
        .script(&format!(
            "const m = document.querySelector('{row}');
             return [...m.querySelectorAll('tr.attempt')].map(a => [
               a.dataset.attempt, a.dataset.ok,
               ...[...a.querySelectorAll('td')].map(td => td.textContent)]);",
            row = row.replace('"', "\\\"")
        ))
        .await;
    let cells: Vec<Vec<String>> = serde_json::from_value(cells).expect("rows of text");
    assert_eq!(cells.len(), 2, "two attempts: {cells:?}");
    let (first, second) = (&cells[0], &cells[1]);
    assert_eq!((first[0].as_str(), first[1].as_str()), ("1", "false"));
    assert_eq!(first[4], "HTTP 500");
    assert!(
        first[5].ends_with("ms") || first[5].ends_with('s'),
        "a latency: {first:?}"
    );
    assert!(
        first[6].contains("answer 500"),
        "the answer's excerpt: {first:?}"
    );
    assert_eq!((second[0].as_str(), second[1].as_str()), ("2", "true"));
    assert_eq!(second[4], "HTTP 200");
    assert!(second[6].contains("answer 200"), "{second:?}");
    browser
        .wait_text(&format!("{row} td .mono"), "the event type", |t| {
            t == "payout.created"
        })
        .await;
    let ids = hooks.got();
    assert_eq!(
        ids.len(),
        3,
        "the attempt and its at-once retry refused, the next attempt taken: {ids:?}"
    );
    assert!(ids.iter().all(|i| i == &ids[0]), "one message: {ids:?}");
    let body: String = sqlx::query_scalar("SELECT body FROM webhook_deliveries WHERE id = $1")
        .bind(message)
        .fetch_one(admin.pool())
        .await
        .expect("body");
    assert!(body.contains(&format!("\"id\":{payout}")), "{body}");
}

/// Issue 18: an operator replays one message from the delivery log (the
/// receiver gets it again, a new attempt joins the log) and everything since
/// a time; both audited. The admin's endpoint buttons are not offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_message_from_the_dashboard_delivers_it_again() {
    let admin = Admin::start_with(HOOK_SETTINGS).await;
    let hooks = Hooks::start(&admin).await;
    let endpoint = hooks.register(&admin).await;
    new_payout(&admin).await;
    let (message, attempts) = delivered_message(&admin, endpoint).await;
    assert_eq!(attempts, 1, "taken at the first try");
    assert_eq!(hooks.got().len(), 1);

    let token = admin.token("omar", Role::Operator).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, &token).await;
    browser.click("#nav-webhooks").await;
    browser
        .click(&format!(
            "#webhook-endpoints-table tr[data-id=\"{endpoint}\"] a"
        ))
        .await;
    let row = format!("#webhook-deliveries-table tbody.message[data-id=\"{message}\"]");
    browser
        .wait(&format!(
            "{row}[data-attempts=\"1\"] tr.attempt[data-attempt=\"1\"]"
        ))
        .await;
    for admins_only in [
        "#endpoint-disable",
        "#endpoint-rotate",
        "#endpoint-delete",
        "#webhook-actions",
    ] {
        assert!(
            browser.find(admins_only).await.is_none(),
            "an operator is offered {admins_only}"
        );
    }

    browser.click(&format!("{row} button.replay")).await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_text("#notice", "the replay", |t| {
            t.contains(&format!("Message {message} will be sent again"))
        })
        .await;
    // Delivered again, and the page shows the new attempt by itself.
    browser
        .wait_text(
            &format!(
                "{row}[data-status=\"delivered\"] tr.attempt[data-attempt=\"2\"] td:nth-child(3)"
            ),
            "the second attempt",
            |t| t == "HTTP 200",
        )
        .await;
    let got = hooks.got();
    assert_eq!(got.len(), 2, "sent again: {got:?}");
    assert_eq!(got[0], got[1], "with the same webhook-id");

    // Everything since a time before the message: it is sent once more.
    browser
        .script(
            "const i = document.getElementById('replay-since');
             const d = new Date(Date.now() - 3600 * 1000);
             const p = (n) => String(n).padStart(2, '0');
             i.value = `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;",
        )
        .await;
    browser.click("#replay-since-go").await;
    browser
        .wait_script(
            "the confirmation dialog",
            "return document.getElementById('confirm').open || null;",
        )
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_text("#notice .message", "the count", |t| {
            t == "1 message will be sent again."
        })
        .await;
    eventually(WAIT, "the third delivery", || async {
        (hooks.got().len() == 3).then_some(())
    })
    .await;
    browser
        .wait(&format!("{row} tr.attempt[data-attempt=\"3\"]"))
        .await;
    assert_eq!(
        audited(&admin, "webhook_").await,
        [
            (
                "operator:omar".to_string(),
                "webhook_delivery.replay".to_string()
            ),
            (
                "operator:omar".to_string(),
                "webhook_endpoint.replay".to_string()
            ),
        ]
    );
}

/// Issue 18: a viewer reads the endpoints and the delivery log, and is
/// offered none of the buttons that write (the API would refuse them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_webhooks_without_any_write_button() {
    let admin = Admin::start_with(HOOK_SETTINGS).await;
    let hooks = Hooks::start(&admin).await;
    let endpoint = hooks.register(&admin).await;
    new_payout(&admin).await;
    let (message, _) = delivered_message(&admin, endpoint).await;

    let token = admin.token("vera", Role::Viewer).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, &token).await;
    browser.click("#nav-webhooks").await;
    let row = format!("#webhook-endpoints-table tr[data-id=\"{endpoint}\"]");
    browser.wait(&row).await;
    browser.wait("#webhooks-readonly").await;
    for write in ["#webhook-create", "#wh-create"] {
        assert!(
            browser.find(write).await.is_none(),
            "a viewer is offered {write}"
        );
    }
    browser.click(&format!("{row} a")).await;
    browser
        .wait(&format!(
            "#webhook-deliveries-table tbody.message[data-id=\"{message}\"][data-status=\"delivered\"]"
        ))
        .await;
    for write in [
        "#webhook-actions",
        "#endpoint-disable",
        "#endpoint-enable",
        "#endpoint-rotate",
        "#endpoint-delete",
        "#replay-since-form",
        "button.replay",
        "#webhook .actions button",
    ] {
        assert!(
            browser.find(write).await.is_none(),
            "a viewer is offered {write}"
        );
    }
}

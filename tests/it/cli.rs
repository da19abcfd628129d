//! `payoutctl`, run as a binary against a fresh database: every command, and
//! every kind of bad input getting one clear line, a non-zero exit, and no change.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use common::Ctl;
use serde_json::Value;

async fn count(ctl: &Ctl, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&ctl.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_command_works_and_bad_input_changes_nothing() {
    let ctl = Ctl::new().await;
    assert!(ctl.ok(&["migrate"]).contains("migrations applied"));

    // payee add
    let payee = ctl.json(&[
        "payee",
        "add",
        "--name",
        "Ana",
        "--account",
        "acct_ana",
        "--currency",
        "USD",
    ]);
    let payee_id = payee["id"].as_i64().unwrap().to_string();
    assert!(
        ctl.fails(&[
            "payee",
            "add",
            "--name",
            "X",
            "--account",
            "acct_x",
            "--currency",
            "XYZ"
        ])
        .contains("unknown currency")
    );
    assert_eq!(
        count(&ctl, "payees").await,
        1,
        "the refused payee was not added"
    );

    // create, and its bad input
    let created = ctl.json(&[
        "create",
        "--payee",
        &payee_id,
        "--amount",
        "120.50",
        "--currency",
        "USD",
        "--due",
        "+1h",
    ]);
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["status"], "pending");
    let before = count(&ctl, "payouts").await;
    let cases: [(&[&str], &str); 6] = [
        (
            &["--amount", "-5.00", "--currency", "USD"],
            "must be greater than zero",
        ),
        (
            &["--amount", "1.001", "--currency", "USD"],
            "more decimals than USD allows",
        ),
        (&["--amount", "10", "--currency", "ABC"], "unknown currency"),
        (
            &["--amount", "ten", "--currency", "USD"],
            "not a decimal number",
        ),
        (
            &["--amount", "10", "--currency", "USD", "--due", "tomorrow"],
            "not RFC 3339",
        ),
        (
            &["--amount", "1.5", "--currency", "JPY"],
            "more decimals than JPY allows",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["create", "--payee", &payee_id];
        args.extend_from_slice(extra);
        let err = ctl.fails(&args);
        assert!(
            err.starts_with("error: ") && err.contains(expected),
            "{args:?}: {err}"
        );
    }
    assert!(
        ctl.fails(&[
            "create",
            "--payee",
            "999999",
            "--amount",
            "1",
            "--currency",
            "USD"
        ])
        .contains("payee 999999 not found")
    );
    // With Stripe, an amount Stripe cannot send is refused at creation: a
    // three-decimal currency must end in 0 there.
    let stripe = [
        ("PAYOUTS_GATEWAY__KIND", "stripe"),
        ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", "sk_test_cli"),
    ];
    let o = ctl.run_with(
        &[
            "create",
            "--payee",
            &payee_id,
            "--amount",
            "25.731",
            "--currency",
            "BHD",
        ],
        &stripe,
    );
    assert!(
        !o.ok && o.stderr.contains("cannot be paid through Stripe"),
        "{}",
        o.stderr
    );
    assert_eq!(
        count(&ctl, "payouts").await,
        before,
        "bad input created nothing"
    );

    // status and list
    let status = ctl.ok(&["status", &id.to_string()]);
    assert!(
        status.contains("pending")
            && status.contains("operator:alice")
            && status.contains("created"),
        "{status}"
    );
    assert!(
        ctl.fails(&["status", "424242"])
            .contains("payout 424242 not found")
    );
    let list = ctl.json(&["list", "--status", "pending", "--limit", "10"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(ctl.ok(&["list"]).starts_with("ID"));
    // A closed set of values is clap's to check: exit 2, every value named.
    let bad = ctl.run(&["list", "--status", "done"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("invalid value 'done'") && bad.stderr.contains("held"),
        "{}",
        bad.stderr
    );

    // enqueue one now (not yet due), enqueue --due, retry/cancel rules
    let enq = ctl.json(&["enqueue", &id.to_string()]);
    assert_eq!(
        (enq["from"].as_str(), enq["status"].as_str()),
        (Some("pending"), Some("queued"))
    );
    let err = ctl.fails(&["retry", &id.to_string()]);
    assert!(
        err.contains(&format!("cannot move payout {id} from queued to queued")),
        "{err}"
    );
    let cancelled = ctl.json(&[
        "cancel",
        &id.to_string(),
        "--reason",
        "duplicate booking\x1b[2J\x1b]0;owned\x07",
    ]);
    assert_eq!(cancelled["from"], "queued");
    // Payee changes are in the audit log, with who made them (finding 6).
    let audited: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, actor FROM audit_log WHERE action LIKE 'payee.%' ORDER BY id",
    )
    .fetch_all(&ctl.db.pool)
    .await
    .unwrap();
    assert!(
        audited
            .iter()
            .any(|(a, who)| a == "payee.create" && who.starts_with("operator:")),
        "{audited:?}"
    );
    // A terminal escape in stored text is shown, never obeyed (finding 6).
    let status = ctl.ok(&["status", &id.to_string()]);
    assert!(status.contains("duplicate booking\\u{1b}[2J"), "{status}");
    assert!(
        !status.contains('\x1b') && !status.contains('\x07'),
        "{status}"
    );
    let events_before = count(&ctl, "payout_events").await;
    assert!(
        ctl.fails(&["cancel", &id.to_string()])
            .contains("from cancelled to cancelled")
    );
    assert!(
        ctl.fails(&["enqueue", &id.to_string()])
            .contains("from cancelled to queued")
    );
    assert!(
        ctl.fails(&["cancel", "777777"])
            .contains("payout 777777 not found")
    );
    assert_eq!(
        count(&ctl, "payout_events").await,
        events_before,
        "refused actions wrote no event"
    );
    let history = ctl.ok(&["status", &id.to_string()]);
    assert!(
        history.contains("duplicate booking") && history.contains("manual enqueue"),
        "{history}"
    );

    // seed, enqueue --due, summary
    let seeded = ctl.json(&["seed", "--count", "25", "--payees", "5"]);
    assert_eq!(seeded["payouts"], 25);
    let pass = ctl.json(&["enqueue", "--due"]);
    assert_eq!(pass["enqueued"], 25);
    let summary = ctl.json(&["summary"]);
    assert_eq!(
        (summary["queued"].as_i64(), summary["cancelled"].as_i64()),
        (Some(25), Some(1))
    );

    // a paid payout cannot be cancelled
    let paid_id: i64 = sqlx::query_scalar("SELECT min(id) FROM payouts WHERE status = 'queued'")
        .fetch_one(&ctl.db.pool)
        .await
        .unwrap();
    let claim = payouts::db::payouts::claim(
        &ctl.db.pool,
        payouts::domain::PayoutId::new(paid_id),
        "worker:t",
        chrono::Utc::now(),
        chrono::Utc::now() + chrono::Duration::seconds(60),
    )
    .await
    .unwrap()
    .unwrap();
    let paid = payouts::db::payouts::Finish::Paid {
        transfer_id: "tr_1".into(),
    };
    assert!(
        payouts::db::payouts::finish(
            &ctl.db.pool,
            payouts::domain::PayoutId::new(paid_id),
            claim.token(),
            &paid,
            "worker:t",
            "ok",
            chrono::Utc::now()
        )
        .await
        .unwrap()
    );
    let err = ctl.fails(&["cancel", &paid_id.to_string()]);
    assert_eq!(
        err,
        format!("error: cannot move payout {paid_id} from paid to cancelled")
    );
}

#[tokio::test]
async fn bad_configuration_is_one_line_naming_the_key() {
    let ctl = Ctl::new().await;
    let err = ctl.fails_with(&["summary"], &[("PAYOUTS_WORKER__CONCURRENCY", "0")]);
    assert!(err.contains("worker.concurrency"), "{err}");
}

// Multi-threaded: the in-process mock gateway must answer while the test blocks on payoutctl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_drift_fixes_what_the_gateway_proves_and_exits_non_zero_for_the_rest() {
    use payouts::testkit::mock_gateway::{MockGateway, MockGatewayConfig};
    let ctl = Ctl::new().await;
    let gw = MockGateway::start(MockGatewayConfig::default())
        .await
        .unwrap();
    let run = |args: &[&str]| {
        let out = ctl.run_with(args, &[("PAYOUTS_GATEWAY__BASE_URL", &gw.base_url)]);
        (out.ok, out.stdout, out.stderr)
    };
    let payee = ctl.json(&["payee", "add", "--name", "Bo", "--account", "acct_bo"])["id"]
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
    // The gateway paid it; the database never heard.
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/transfers", gw.base_url))
        .bearer_auth("sk_test_mock")
        .header("Idempotency-Key", format!("payout_{id}"))
        .json(&serde_json::json!({"amount_minor": 700, "currency": "USD", "destination": "acct_bo", "reference": format!("payout_{id}")}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());

    let (ok, stdout, stderr) = run(&["reconcile", "--since", "1h"]);
    assert!(
        !ok && stdout.contains("paid_at_gateway_not_in_db"),
        "{stdout} {stderr}"
    );
    assert!(
        stderr.contains("1 disagreements between the database and the gateway are not fixed"),
        "{stderr}"
    );
    assert!(ctl.ok(&["status", &id.to_string()]).contains("queued"));

    let (ok, stdout, _) = run(&["reconcile", "--since", "1h", "--fix"]);
    assert!(ok && stdout.contains("[fixed]"), "{stdout}");
    assert!(ctl.ok(&["status", &id.to_string()]).contains("paid"));
    let (ok, stdout, _) = run(&["reconcile", "--since", "1h", "--json"]);
    assert!(ok, "{stdout}");
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["mismatches"].as_array().unwrap().len(), 0);
    assert!(
        run(&["reconcile", "--since", "yesterday"])
            .2
            .contains("since \"yesterday\"")
    );
}

#[tokio::test]
async fn the_admin_commands_match_the_dashboard_tokens_failures_bulk_retry_and_filters() {
    let ctl = Ctl::new().await;
    // Tokens: created once in clear, stored hashed, listed without the secret, revoked.
    let made = ctl.json(&["token", "create", "--name", "bob", "--role", "operator"]);
    let secret = made["token"].as_str().unwrap().to_string();
    assert!(secret.starts_with("pat_") && secret.len() > 60);
    let listed = ctl.ok(&["token", "list"]);
    assert!(listed.contains("bob") && listed.contains("operator"));
    assert!(!listed.contains(&secret));
    assert!(
        ctl.fails(&["token", "create", "--name", "bob", "--role", "viewer"])
            .contains("exists")
    );
    let root = ctl.run(&["token", "create", "--name", "eve", "--role", "root"]);
    assert_eq!(root.code, Some(2), "{}", root.stderr);
    assert!(
        root.stderr
            .contains("[possible values: viewer, operator, admin, integration]"),
        "{}",
        root.stderr
    );
    assert!(
        ctl.fails(&["token", "create", "--name", "has space", "--role", "viewer"])
            .contains("token name")
    );
    assert!(ctl.ok(&["token", "revoke", "bob"]).contains("revoked"));
    assert!(
        ctl.fails(&["token", "revoke", "bob"])
            .contains("no live token")
    );

    // Two failed payouts with one code, one with another, one pending.
    let payee = ctl.json(&["payee", "add", "--name", "Ann", "--account", "acct_ann"])["id"]
        .as_i64()
        .unwrap();
    let p = payee.to_string();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            ctl.json(&[
                "create",
                "--payee",
                &p,
                "--amount",
                "5.00",
                "--currency",
                "USD",
            ])["id"]
                .as_i64()
                .unwrap(),
        );
    }
    for (id, code) in ids[..3]
        .iter()
        .zip(["account_closed", "account_closed", "account_frozen"])
    {
        sqlx::query(
            "UPDATE payouts SET status = 'queued', lease_until = now() + interval '1 minute' WHERE id = $1",
        )
        .bind(id)
        .execute(&ctl.db.pool)
        .await
        .unwrap();
        sqlx::query("UPDATE payouts SET status = 'processing', attempt = 1 WHERE id = $1")
            .bind(id)
            .execute(&ctl.db.pool)
            .await
            .unwrap();
        sqlx::query("UPDATE payouts SET status = 'failed', failure_code = $2, lease_until = NULL WHERE id = $1")
            .bind(id)
            .bind(code)
            .execute(&ctl.db.pool)
            .await
            .unwrap();
    }
    let failures = ctl.json(&["failures"]);
    assert_eq!(failures["groups"][0]["failure_code"], "account_closed");
    assert_eq!(failures["groups"][0]["count"], 2);
    assert_eq!(failures["groups"][1]["count"], 1);

    let listed = ctl.json(&[
        "list",
        "--status",
        "failed",
        "--failure-code",
        "account_closed",
    ]);
    let got: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, [ids[1], ids[0]]);
    assert!(
        ctl.fails(&["list", "--currency", "ZZZ"])
            .contains("currency")
    );
    assert!(
        ctl.fails(&["list", "--due-from", "yesterday"])
            .contains("due_from")
    );

    // Bulk retry: a dry run counts and changes nothing; then it retries only those.
    let dry = ctl.json(&[
        "bulk-retry",
        "--failure-code",
        "account_closed",
        "--dry-run",
    ]);
    assert_eq!(dry["matched"], 2);
    assert_eq!(ctl.json(&["summary"])["failed"], 3);
    assert!(
        ctl.fails(&["bulk-retry", "--status", "paid"])
            .contains("failed payouts only")
    );
    // Without --execute it only counts; --execute needs a narrowing filter.
    let plain = ctl.json(&["bulk-retry", "--failure-code", "account_closed"]);
    assert_eq!(plain["dry_run"], true);
    assert_eq!(ctl.json(&["summary"])["failed"], 3);
    assert!(ctl.fails(&["bulk-retry", "--execute"]).contains("filter"));
    assert_eq!(ctl.json(&["summary"])["failed"], 3);
    let done = ctl.json(&[
        "bulk-retry",
        "--failure-code",
        "account_closed",
        "--execute",
    ]);
    assert_eq!(done["retried"], 2);
    let summary = ctl.json(&["summary"]);
    assert_eq!(
        (summary["failed"].clone(), summary["queued"].clone()),
        (1.into(), 2.into())
    );
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM payout_events WHERE payout_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(ids[0])
    .fetch_one(&ctl.db.pool)
    .await
    .unwrap();
    assert_eq!(actor, "operator:alice");

    // The overview, as the dashboard shows it.
    let o = ctl.json(&["overview"]);
    assert_eq!(o["counts"]["queued"], 2);
    assert_eq!(o["counts"]["pending"], 1);
    assert!(ctl.ok(&["overview"]).contains("producer leader: none"));
}

/// Security finding 6: a payee change and its `audit_log` row commit
/// together. They used to be two statements: when the audit insert failed,
/// the change stood with no record of who made it.
#[tokio::test]
async fn a_payee_change_that_cannot_be_audited_is_not_made() {
    let ctl = Ctl::new().await;
    let added = ctl.json(&["payee", "add", "--name", "Ana", "--account", "acct_ana"]);
    let id = added["id"].as_i64().unwrap().to_string();
    sqlx::query(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'audit_log is read-only in this test'; END $$",
    )
    .execute(&ctl.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log
         FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
    )
    .execute(&ctl.db.pool)
    .await
    .unwrap();
    ctl.fails(&["payee", "set", &id, "--schedule", "manual"]);
    ctl.fails(&["payee", "set", &id, "--minimum", "50.00"]);
    ctl.fails(&[
        "payee",
        "deduction",
        &id,
        "--label",
        "booth rent",
        "--amount",
        "50.00",
    ]);
    ctl.fails(&["payee", "add", "--name", "Bo", "--account", "acct_bo"]);
    let (schedule, minimums, deductions, payees): (Option<String>, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT schedule FROM payees WHERE id = $1),
                    (SELECT count(*) FROM payee_minimums),
                    (SELECT count(*) FROM payee_deductions),
                    (SELECT count(*) FROM payees)",
    )
    .bind(id.parse::<i64>().unwrap())
    .fetch_one(&ctl.db.pool)
    .await
    .unwrap();
    assert_eq!((schedule, minimums, deductions, payees), (None, 0, 0, 1));
}

/// Issue 19: a cron job tells "not found" from "refused by the payout's
/// state" from "Postgres is down" by the exit code (README: exit codes).
#[tokio::test]
async fn exit_codes_tell_usage_not_found_conflict_and_unavailable_apart() {
    let ctl = Ctl::new().await;
    ctl.ok(&["migrate"]);
    let code = |args: &[&str], env: &[(&str, &str)]| ctl.run_with(args, env).code;
    assert_eq!(code(&["status", "--no-such-flag"], &[]), Some(2), "usage");
    assert_eq!(
        code(&["status", "424242"], &[]),
        Some(3),
        "payout not found"
    );
    assert_eq!(code(&["retry", "424242"], &[]), Some(3), "payout not found");
    assert_eq!(
        code(&["payee", "set", "424242", "--schedule", "manual"], &[]),
        Some(3),
        "payee not found"
    );
    let payee = ctl.json(&["payee", "add", "--name", "Cy", "--account", "acct_cy"])["id"]
        .as_i64()
        .unwrap()
        .to_string();
    let id = ctl.json(&[
        "create",
        "--payee",
        &payee,
        "--amount",
        "5.00",
        "--currency",
        "USD",
        "--due",
        "+1d",
    ])["id"]
        .as_i64()
        .unwrap()
        .to_string();
    assert_eq!(
        code(&["retry", &id], &[]),
        Some(4),
        "pending cannot be retried"
    );
    assert_eq!(code(&["status", &id], &[]), Some(0));
    // Postgres out of reach: 69, after the connection attempt gives up.
    assert_eq!(
        code(
            &["status", &id],
            &[
                ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/payouts"),
                ("PAYOUTS_DATABASE__ACQUIRE_TIMEOUT_MS", "500"),
            ]
        ),
        Some(69),
        "unavailable"
    );
}

/// Issue 19: completions and man pages, without a database.
#[test]
fn completions_and_man_pages_need_no_database() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_payoutctl"))
            .args(args)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .output()
            .unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(
        script.contains("complete -F") && script.contains("bulk-retry"),
        "{script}"
    );
    assert!(run(&["completions", "zsh"]).status.success());
    let dir = std::env::temp_dir().join(format!("payoutctl-man-{}", std::process::id()));
    let man = run(&["man", "--dir", &dir.to_string_lossy()]);
    assert!(
        man.status.success(),
        "{}",
        String::from_utf8_lossy(&man.stderr)
    );
    let page = std::fs::read_to_string(dir.join("payoutctl-reconcile.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("reconcile"), "{page}");
    assert!(dir.join("payoutctl-payee-set.1").exists());
    assert!(dir.join("payoutctl.1").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 18: `payoutctl webhooks` registers (the secret printed once),
/// lists, rotates and replays, with the exit codes of the other commands:
/// an unknown endpoint or message 3, bad input 2; replays are audited.
#[tokio::test]
async fn webhooks_commands_print_what_they_did_and_exit_by_the_conventions() {
    let ctl = Ctl::new().await;
    ctl.ok(&["migrate"]);
    let out = ctl.ok(&[
        "webhooks",
        "create",
        "--url",
        "https://hooks.example.com/payouts",
        "--events",
        "payout.paid,payout.failed",
    ]);
    assert!(out.starts_with("endpoint 1 registered"), "{out}");
    let secret = out.lines().nth(1).unwrap_or_default().to_string();
    assert!(secret.starts_with("whsec_"), "{out}");
    let list = ctl.ok(&["webhooks", "list"]);
    assert!(
        list.contains("https://hooks.example.com/payouts")
            && list.contains("payout.paid,payout.failed"),
        "{list}"
    );
    assert!(!list.contains(&secret), "the list shows the secret");
    let rotated = ctl.json(&["webhooks", "rotate-secret", "1"]);
    let new = rotated["secret"].as_str().unwrap_or_default();
    assert!(new.starts_with("whsec_") && new != secret, "{rotated}");
    let since = ctl.ok(&["webhooks", "replay", "--endpoint", "1", "--since", "1h"]);
    assert_eq!(since.trim(), "0 messages to endpoint 1 will be sent again");

    let code = |args: &[&str]| ctl.run(args).code;
    assert_eq!(
        code(&["webhooks", "replay", "424242"]),
        Some(3),
        "no message"
    );
    assert_eq!(
        code(&[
            "webhooks",
            "replay",
            "--endpoint",
            "424242",
            "--since",
            "1h"
        ]),
        Some(3),
        "no endpoint"
    );
    assert_eq!(code(&["webhooks", "rotate-secret", "424242"]), Some(3));
    assert_eq!(code(&["webhooks", "delete", "424242"]), Some(3));
    assert_eq!(
        code(&["webhooks", "create", "--url", "ftp://example.com/hook"]),
        Some(2),
        "a bad URL"
    );
    assert_eq!(
        code(&[
            "webhooks",
            "create",
            "--url",
            "https://example.com/h",
            "--events",
            "payout.nope"
        ]),
        Some(2),
        "an unknown event type"
    );
    assert_eq!(code(&["webhooks", "replay"]), Some(2), "usage");

    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE actor = 'operator:alice' ORDER BY id",
    )
    .fetch_all(&ctl.db.pool)
    .await
    .unwrap();
    assert_eq!(
        actions,
        [
            "webhook_endpoint.create",
            "webhook_endpoint.rotate_secret",
            "webhook_endpoint.replay"
        ]
    );
}

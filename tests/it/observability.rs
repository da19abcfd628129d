//! Observability and deployment, checked for real:
//!
//! - the alert rules pass `promtool check rules` and their unit tests
//!   (`promtool test rules prometheus/alerts_test.yml`), and every alert has a test;
//! - a real Prometheus (Debian's `prometheus`, on loopback) scrapes a worker
//!   and a producer process while the mock gateway rejects 20% of transfers
//!   permanently, and the failure-rate alert becomes `firing`;
//! - every metric named by the alert rules, the Grafana dashboard and the
//!   autoscalers is one the binaries really export (their `/metrics` scraped);
//! - the Grafana provisioning, `docker-compose.yml`, the `Dockerfile` and the
//!   Kubernetes manifests are consistent with each other and with the repo.
//!
//! Needs `promtool` and `prometheus` (Debian's `prometheus` package) and
//! python3 with PyYAML (to read YAML without a new dependency);
//! `scripts/test.sh` installs them when missing.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Fleet, Proc, child_env, eventually, free_port, unique};
use payouts::testkit::mock_gateway::Faults;
use serde_json::Value;

// --- helpers -------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// A tool on PATH, or a panic that says how to get it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found: install Debian's `prometheus` package \
                 (apt-get install prometheus; scripts/test.sh does it)"
            )
        })
}

/// A python3 that can `import yaml`.
fn python() -> &'static str {
    static PY: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        ["python3", "/usr/bin/python3"]
            .into_iter()
            .find(|py| {
                Command::new(py)
                    .args(["-c", "import yaml"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect("python3 with PyYAML is needed: apt-get install python3-yaml (scripts/test.sh does it)")
    })
}

/// Every YAML document in `rel`, as JSON.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let path = root().join(rel);
    assert!(path.is_file(), "{rel} is missing");
    let out = Command::new(python())
        .args([
            "-c",
            "import sys, json, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1], encoding='utf-8')) if d is not None]\n\
             print(json.dumps(docs))",
        ])
        .arg(&path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{rel} is not valid YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

/// `30s`, `1m30s`, `2m`, `1h` -> seconds.
fn duration_secs(text: &str) -> u64 {
    let (mut total, mut num) = (0u64, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {text}"));
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => panic!("bad duration {text}"),
        };
        num.clear();
    }
    if !num.is_empty() {
        total += num.parse::<u64>().unwrap();
    }
    total
}

// --- PromQL: the metric names an expression reads -----------------------------------

const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
];

/// The metric (and recording rule) names a PromQL expression selects: every
/// identifier that is not a function, a keyword, a label (inside `{}` or a
/// `by`/`on`/... list), a string, a duration or a Grafana `$variable`.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    // Strings, label matchers, ranges and variables out.
    let mut flat = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
                flat.push_str(" \"\" ");
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                for d in chars.by_ref() {
                    if d == close {
                        break;
                    }
                }
                flat.push(' ');
            }
            '$' => {
                while chars
                    .peek()
                    .is_some_and(|d| d.is_alphanumeric() || *d == '_')
                {
                    chars.next();
                }
                flat.push(' ');
            }
            _ => flat.push(c),
        }
    }
    let b: Vec<char> = flat.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < b.len() && b[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration (0.95, 1e3, 1d).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_' || b[i] == ':') {
                i += 1;
            }
            let word: String = b[start..i].iter().collect();
            let j = next_non_space(i);
            // `sum by (le) (...)`: an aggregation with its grouping first.
            let next_word: String = b[j..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .collect();
            let call = b.get(j) == Some(&'(') || next_word == "by" || next_word == "without";
            let grouping = [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str());
            if grouping && call {
                // Skip the label list.
                i = j;
                while i < b.len() && b[i] != ')' {
                    i += 1;
                }
                i += 1;
            } else if !call && !PROMQL_KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn promql_metric_names_finds_metrics_and_nothing_else() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (le) (rate(payout_processing_seconds_bucket{job=~"a|b"}[$__rate_interval]))) > 30
           and on(instance) group_left() (payout_producer_leader == 1)
           or sum(x:rec:rate5m offset 1d) without (class) / scalar(vector(900)) > bool 1e3
           unless sum(rate(gateway_requests_total{class="429"}[5m])) by (class)"#,
    );
    let expected: BTreeSet<String> = [
        "payout_processing_seconds_bucket",
        "payout_producer_leader",
        "x:rec:rate5m",
        "gateway_requests_total",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, expected);
}

/// Sample names in a Prometheus text exposition (`_bucket`, `_sum`, `_count` included).
fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

// --- what the rules, the dashboard and the autoscalers read ---------------------

struct Rules {
    /// alert name -> expression.
    alerts: BTreeMap<String, String>,
    /// recording rule name -> expression.
    records: BTreeMap<String, String>,
}

fn rules() -> Rules {
    let doc = yaml("prometheus/alerts.yml");
    let mut r = Rules {
        alerts: BTreeMap::new(),
        records: BTreeMap::new(),
    };
    for group in doc["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = s(&rule["expr"], "expr").to_string();
            if let Some(a) = rule["alert"].as_str() {
                assert!(
                    r.alerts.insert(a.to_string(), expr).is_none(),
                    "alert {a} twice"
                );
            } else {
                r.records
                    .insert(s(&rule["record"], "record").to_string(), expr);
            }
        }
    }
    r
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana/dashboards/payouts.json"))
        .expect("grafana/dashboards/payouts.json is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// (where, expression) of every query in the dashboard, rules and autoscalers.
fn all_queries() -> Vec<(String, String)> {
    let mut q = Vec::new();
    let r = rules();
    for (name, expr) in r.alerts.iter().chain(&r.records) {
        q.push((format!("prometheus/alerts.yml {name}"), expr.clone()));
    }
    let dash = dashboard();
    for p in panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            q.push((
                format!("dashboard panel {:?}", p["title"].as_str().unwrap_or("")),
                s(&t["expr"], "target expr").to_string(),
            ));
        }
    }
    // Query variables: `label_values(<selector>, label)`.
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let text = s(&v["query"]["query"], "variable query");
            let selector = text
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| {
                    panic!("variable query {text} is not label_values(selector, label)")
                });
            q.push((format!("dashboard variable {}", v["name"]), selector));
        }
    }
    for so in yaml_docs("deploy/k8s/keda/scaledobject.yaml") {
        for t in so["spec"]["triggers"].as_array().expect("triggers") {
            q.push((
                "deploy/k8s/keda/scaledobject.yaml".into(),
                s(&t["metadata"]["query"], "query").to_string(),
            ));
        }
    }
    let adapter = yaml("deploy/k8s/hpa/prometheus-adapter-values.yaml");
    for rule in adapter["rules"]["external"].as_array().expect("external") {
        for key in ["seriesQuery", "metricsQuery"] {
            q.push((
                format!("deploy/k8s/hpa/prometheus-adapter-values.yaml {key}"),
                s(&rule[key], key).to_string(),
            ));
        }
    }
    q
}

// --- alert rules: promtool -----------------------------------------------------------

/// GitHub-style anchors of the headings of docs/runbooks.md.
fn runbook_anchors() -> BTreeSet<String> {
    read("docs/runbooks.md")
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn runbook_anchors_follow_github() {
    let a = runbook_anchors();
    assert!(a.contains("payoutfailedafterpaid"), "{a:?}");
    assert!(a.contains("money-signals"), "{a:?}");
}

/// The alerts the product documents and on-call ask for.
const REQUIRED_ALERTS: &[&str] = &[
    "PayoutFailureRateHigh",
    "PayoutProcessingSlow",
    "PayoutBacklogTooOld",
    "PayoutDeadLetter",
    "PayoutNoWorkerAlive",
    "PayoutNoProducerLeading",
    "GatewayRateLimited",
    "PayoutGatewayPlatformProblem",
    "GatewayErrorRateHigh",
    "PayoutThroughputDrop",
    "PayoutFailedAfterPaid",
    "PayoutWebhookFailureRateHigh",
    "PayoutInTransitStuck",
    "PayoutStaleFenceWrites",
    "PayoutInfraErrors",
    "PayoutWorkerRestartLoop",
    "PayoutScrapeTargetDown",
];

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = tool("promtool");
    run_ok(Command::new(&promtool).args(["check", "rules", "prometheus/alerts.yml"]));
    let out = run_ok(Command::new(&promtool).args(["test", "rules", "prometheus/alerts_test.yml"]));
    assert!(out.contains("SUCCESS"), "{out}");

    let r = rules();
    for a in REQUIRED_ALERTS {
        assert!(r.alerts.contains_key(*a), "alert {a} is missing");
    }
    // Every alert has at least one unit test, and one that expects it to fire.
    let tests = yaml("prometheus/alerts_test.yml");
    let mut tested = BTreeSet::new();
    let mut fired = BTreeSet::new();
    for t in tests["tests"].as_array().expect("tests") {
        for case in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = s(&case["alertname"], "alertname").to_string();
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fired.insert(name.clone());
            }
            tested.insert(name);
        }
    }
    for a in r.alerts.keys() {
        assert!(tested.contains(a), "alert {a} has no promtool test");
        assert!(fired.contains(a), "no promtool test makes {a} fire");
    }
    // Every alert: a severity off-the-shelf Alertmanager routes match, and a
    // runbook_url naming a section of docs/runbooks.md that exists.
    let anchors = runbook_anchors();
    let doc = yaml("prometheus/alerts.yml");
    for group in doc["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            let severity = s(&rule["labels"]["severity"], &format!("{name} severity"));
            assert!(
                ["critical", "warning"].contains(&severity),
                "{name}: severity {severity} is neither critical nor warning"
            );
            let url = s(
                &rule["annotations"]["runbook_url"],
                &format!("{name} runbook_url"),
            );
            let anchor = url
                .strip_prefix("docs/runbooks.md#")
                .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not docs/runbooks.md#..."));
            assert_eq!(anchor, name.to_lowercase(), "{name}: runbook anchor");
            assert!(
                anchors.contains(anchor),
                "{name}: docs/runbooks.md has no section #{anchor}"
            );
        }
    }
    // Every metric an alert reads has a panel on the dashboard.
    let dash = dashboard();
    let mut panel_metrics = BTreeSet::new();
    for p in panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            panel_metrics.extend(promql_metric_names(s(&t["expr"], "expr")));
        }
    }
    for (name, expr) in &r.alerts {
        for m in promql_metric_names(expr) {
            assert!(
                r.records.contains_key(&m) || panel_metrics.contains(&m),
                "alert {name} reads {m}, which no dashboard panel shows"
            );
        }
    }
    // The backlog bound is configurable (a recording rule), 15 minutes by default.
    assert_eq!(
        r.records
            .get("payouts:backlog_age_bound_seconds")
            .map(|e| e.trim()),
        Some("vector(900)")
    );
}

#[test]
fn the_compose_prometheus_config_is_valid_and_loads_the_alert_rules() {
    let out = run_ok(Command::new(tool("promtool")).args([
        "check",
        "config",
        "prometheus/prometheus.yml",
    ]));
    assert!(out.contains("alerts.yml"), "{out}");
}

// --- the fleet as processes ----------------------------------------------------------

/// A worker and a producer process on `fleet`, each with its own metrics port.
struct Processes {
    worker_port: u16,
    producer_port: u16,
    _worker: Proc,
    _producer: Proc,
}

fn start_processes(
    f: &Fleet,
    (worker_port, producer_port): (u16, u16),
    extra: &[(&str, &str)],
    tag: &str,
) -> Processes {
    let mut env = child_env(
        &f.db.url,
        &common::redis_url(),
        &f.prefix,
        &f.gateway.base_url,
    );
    let listen = [
        ("PAYOUTS_WORKER__LISTEN", format!("127.0.0.1:{worker_port}")),
        (
            "PAYOUTS_PRODUCER__LISTEN",
            format!("127.0.0.1:{producer_port}"),
        ),
    ];
    for (k, v) in listen
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(extra.iter().copied())
    {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    let worker = Proc::worker(&env, &format!("{tag}-worker"));
    let producer = Proc::producer(&env, &format!("{tag}-producer"));
    Processes {
        worker_port,
        producer_port,
        _worker: worker,
        _producer: producer,
    }
}

async fn get_text(http: &reqwest::Client, url: &str) -> Option<String> {
    let resp = http.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

// --- every metric named is exported ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_dashboard_alerts_and_autoscalers_is_exported_by_the_binaries() {
    let queries = all_queries();
    let recorded: BTreeSet<String> = rules().records.into_keys().collect();
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    for (place, expr) in &queries {
        let names = promql_metric_names(expr);
        assert!(
            !names.is_empty() || recorded.contains(place.rsplit(' ').next().unwrap()),
            "{place}: no metric in {expr:?}"
        );
        for n in names {
            // `up` is Prometheus' own, per scrape target.
            if !recorded.contains(&n) && n != "up" {
                wanted.entry(n).or_insert_with(|| place.clone());
            }
        }
    }

    assert!(
        wanted.len() >= 15 && wanted.contains_key("payouts_finished_total"),
        "too few metric names found: {wanted:?}"
    );

    // A fleet that does a bit of everything the panels show: pays, rejects
    // (dead letters), is rate limited (a fleet pause), leaves payouts in
    // transit, and gets a job for an unknown payout (a skipped job).
    let f = Fleet::start(Faults {
        latency_ms: 2,
        rate_permanent: 0.15,
        rate_429: 0.05,
        rate_5xx: 0.05,
        rate_pending: 0.1,
        retry_after_secs: 1,
        ..Default::default()
    })
    .await;
    f.seed(200, 20).await;
    f.queue
        .push(&[payouts::domain::PayoutId::new(9_000_000_000)])
        .await
        .unwrap();
    let procs = start_processes(&f, (free_port(), free_port()), &[], "names");
    let http = reqwest::Client::new();
    let urls = [
        format!("http://127.0.0.1:{}/metrics", procs.worker_port),
        format!("http://127.0.0.1:{}/metrics", procs.producer_port),
    ];

    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let mut exported = BTreeSet::new();
        for url in &urls {
            if let Some(text) = get_text(&http, url).await {
                exported.extend(exposition_names(&text));
            }
        }
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(n, _)| !exported.contains(*n))
            .map(|(n, place)| format!("{n} (used by {place})"))
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.is_empty(),
        "named in the dashboard, alert rules or autoscalers but not exported by payout-worker or payout-producer:\n  {}",
        missing.join("\n  ")
    );
}

// --- the money counter ---------------------------------------------------------------

/// `payout_paid_minor_units_total` by currency in one exposition.
fn paid_minor_units(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("payout_paid_minor_units_total{currency=\"") else {
            continue;
        };
        let (cur, value) = rest.split_once("\"}").expect("one label");
        let v: u64 = value.trim().parse().expect("an integer counter");
        *out.entry(cur.to_string()).or_default() += v;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_paid_amount_counter_is_the_exact_sum_of_what_was_recorded_paid() {
    use payouts::domain::{Currency, Money};
    // Some transfers rejected (failed: not money paid), some left pending at
    // the gateway (in_transit, then paid through the producer's poll).
    let f = Fleet::start(Faults {
        latency_ms: 1,
        rate_permanent: 0.15,
        rate_pending: 0.3,
        ..Default::default()
    })
    .await;
    let now = chrono::Utc::now();
    let amounts = [
        (
            "USD",
            ["12.34", "0.01", "999.99", "250.50", "7.05", "1234.56"],
        ),
        ("JPY", ["1500", "1", "98765", "42", "300", "7"]),
        ("BHD", ["1.234", "0.005", "12.5", "100.001", "3", "0.999"]),
    ];
    for (cur, list) in amounts {
        let currency: Currency = cur.parse().unwrap();
        for (i, a) in list.iter().enumerate() {
            let payee = payouts::db::payees::create(
                f.pool(),
                "Money",
                &format!("acct_{cur}_{i}"),
                currency,
            )
            .await
            .unwrap();
            payouts::db::payouts::create(
                f.pool(),
                payee.id,
                Money::parse(a, cur).unwrap(),
                now,
                "operator:test",
                now,
            )
            .await
            .unwrap();
        }
    }
    let procs = start_processes(
        &f,
        (free_port(), free_port()),
        &[
            ("PAYOUTS_GATEWAY__SYNC__MIN_AGE_SECS", "0"),
            ("PAYOUTS_GATEWAY__SYNC__INTERVAL_SECS", "1"),
            ("PAYOUTS_PRODUCER__GAUGES_EVERY_SECS", "1"),
        ],
        "money",
    );
    // Every payout ends paid, failed or in transit.
    eventually(Duration::from_secs(60), "every payout worked off", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM payouts WHERE status IN ('pending', 'queued', 'processing', 'retrying')",
        )
        .fetch_one(f.pool())
        .await
        .ok()?;
        (open == 0).then_some(())
    })
    .await;
    // The gateway pays what it left pending; the poll records it paid.
    let in_transit: Vec<String> =
        sqlx::query_scalar("SELECT gateway_transfer_id FROM payouts WHERE status = 'in_transit'")
            .fetch_all(f.pool())
            .await
            .unwrap();
    assert!(!in_transit.is_empty(), "the gateway left nothing pending");
    // The leader publishes how long the oldest has been in transit.
    let gauge = |text: &str| -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix("payout_oldest_in_transit_age_seconds "))
            .and_then(|v| v.trim().parse().ok())
    };
    let http = reqwest::Client::new();
    let producer_url = format!("http://127.0.0.1:{}/metrics", procs.producer_port);
    eventually(
        Duration::from_secs(30),
        "in-transit age published",
        || async {
            let age = gauge(&get_text(&http, &producer_url).await?)?;
            (age >= 1).then_some(())
        },
    )
    .await;
    for t in &in_transit {
        assert!(f.gateway.set_transfer_status(t, "paid"), "{t}");
    }
    eventually(
        Duration::from_secs(60),
        "in-transit payouts resolved",
        || async { (f.count("in_transit").await == 0).then_some(()) },
    )
    .await;
    assert!(f.count("failed").await > 0, "nothing failed");
    eventually(
        Duration::from_secs(30),
        "in-transit age back to 0",
        || async { (gauge(&get_text(&http, &producer_url).await?)? == 0).then_some(()) },
    )
    .await;

    // Expected: the paid rows, in exact minor units.
    let rows: Vec<(rust_decimal::Decimal, String)> =
        sqlx::query_as("SELECT amount, currency FROM payouts WHERE status = 'paid'")
            .fetch_all(f.pool())
            .await
            .unwrap();
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for (amount, cur) in rows {
        let minor = Money::new(amount, cur.parse().unwrap())
            .unwrap()
            .to_minor_units()
            .unwrap();
        *want.entry(cur).or_default() += u64::try_from(minor).unwrap();
    }
    assert_eq!(want.len(), 3, "each currency has paid payouts: {want:?}");

    let worker_url = format!("http://127.0.0.1:{}/metrics", procs.worker_port);
    let (worker, producer) = eventually(
        Duration::from_secs(30),
        "the counters match the paid payouts",
        || async {
            let w = paid_minor_units(&get_text(&http, &worker_url).await?);
            let p = paid_minor_units(&get_text(&http, &producer_url).await?);
            let mut total = w.clone();
            for (c, v) in &p {
                *total.entry(c.clone()).or_default() += v;
            }
            total.retain(|_, v| *v > 0);
            (total == want).then_some((w, p))
        },
    )
    .await;
    // Both places that record paid counted: the worker's fenced write and the poll.
    assert!(worker.values().sum::<u64>() > 0, "{worker:?}");
    assert!(producer.values().sum::<u64>() > 0, "{producer:?}");
    eprintln!(
        "paid minor units: worker {worker:?}, producer (poll) {producer:?}; database {want:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_records_a_payout_paid_counts_its_amount_once() {
    use payouts::{
        admin::webhooks::{WebhookState, router, signature_header},
        domain::{Currency, Money},
        metrics::PAID_MINOR_UNITS,
    };
    // OMR: no other test of this binary pays it in this process.
    let f = Fleet::start(Faults::default()).await;
    let omr: Currency = "OMR".parse().unwrap();
    let payee = payouts::db::payees::create(f.pool(), "Hook", "acct_hook", omr)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let id = payouts::db::payouts::create(
        f.pool(),
        payee.id,
        Money::parse("1.234", "OMR").unwrap(),
        now,
        "operator:test",
        now,
    )
    .await
    .unwrap()
    .id;
    for status in ["queued", "processing", "in_transit"] {
        sqlx::query(
            "UPDATE payouts SET status = $2, gateway_transfer_id = 'tr_hook',
                 lease_until = CASE WHEN $2 = 'in_transit' THEN NULL ELSE now() + interval '1 minute' END
             WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .execute(f.pool())
        .await
        .unwrap();
    }
    let state = WebhookState {
        pool: f.pool().clone(),
        clock: f.clock.clone(),
        gateway_secrets: std::sync::Arc::new(vec!["whsec_obs".to_string().into()]),
        stripe_secrets: std::sync::Arc::new(vec![]),
        tolerance: payouts::admin::webhooks::DEFAULT_TOLERANCE,
        kind: payouts::config::GatewayKind::Contract,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhooks/gateway", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let http = reqwest::Client::new();
    let send = |event: &str| {
        let body = serde_json::json!({"id": event, "type": "transfer.paid",
            "data": {"id": "tr_hook", "status": "paid", "reference": format!("payout_{id}")}})
        .to_string();
        let sig = signature_header(
            &["whsec_obs"],
            chrono::Utc::now().timestamp(),
            body.as_bytes(),
        );
        let (http, url) = (http.clone(), url.clone());
        async move {
            let resp = http
                .post(url)
                .header("Gateway-Signature", sig)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            resp.json::<Value>().await.unwrap()["outcome"].clone()
        }
    };
    let counted = || PAID_MINOR_UNITS.with_label_values(&["OMR"]).get();
    let before = counted();
    assert_eq!(send("evt_hook_1").await, "paid");
    assert_eq!(f.status(id.get()).await, "paid");
    assert_eq!(counted() - before, 1234, "1.234 OMR = 1,234 baisa");
    // A redelivery and a second event for the paid payout change nothing.
    assert_eq!(send("evt_hook_1").await, "duplicate");
    assert_eq!(send("evt_hook_2").await, "already_paid");
    assert_eq!(counted() - before, 1234, "counted once");
}

/// A gateway that answers every look-up with one paid transfer for the
/// reference it is asked about.
#[derive(Debug)]
struct PaysEverything {
    amount_minor: i64,
    currency: &'static str,
}

#[async_trait::async_trait]
impl payouts::gateway::Lookup for PaysEverything {
    async fn lookup(
        &self,
        reference: &str,
    ) -> Result<Vec<payouts::gateway::TransferRecord>, payouts::gateway::LookupError> {
        Ok(vec![payouts::gateway::TransferRecord {
            id: format!("tr_{reference}"),
            status: "paid".into(),
            amount_minor: self.amount_minor,
            currency: self.currency.into(),
            destination: "acct_fix".into(),
            reference: reference.into(),
        }])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_that_records_a_payout_paid_counts_its_amount_once() {
    use payouts::{
        domain::{Currency, Money},
        metrics::PAID_MINOR_UNITS,
        services::reconcile,
    };
    // KWD: no other test of this binary pays it in this process.
    let f = Fleet::start(Faults::default()).await;
    let kwd: Currency = "KWD".parse().unwrap();
    let payee = payouts::db::payees::create(f.pool(), "Fix", "acct_fix", kwd)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = payouts::db::payouts::create(
            f.pool(),
            payee.id,
            Money::parse("2.5", "KWD").unwrap(),
            now,
            "operator:test",
            now,
        )
        .await
        .unwrap()
        .id;
        // Sent once, its answer lost: `retrying`, attempt 1.
        for status in ["queued", "processing", "retrying"] {
            sqlx::query(
                "UPDATE payouts SET status = $2, attempt = 1,
                     lease_until = CASE WHEN $2 <> 'retrying' THEN now() + interval '1 minute' END,
                     next_attempt_at = CASE WHEN $2 = 'retrying' THEN now() + interval '1 hour' END
                 WHERE id = $1",
            )
            .bind(id)
            .bind(status)
            .execute(f.pool())
            .await
            .unwrap();
        }
        ids.push(id);
    }
    let gw = PaysEverything {
        amount_minor: 2500,
        currency: "KWD",
    };
    let counted = || PAID_MINOR_UNITS.with_label_values(&["KWD"]).get();
    let before = counted();

    // `payoutctl reconcile --fix` records the lost payment...
    let opts = reconcile::Options {
        since: now - chrono::Duration::hours(1),
        fix: true,
        concurrency: 2,
        actor: "operator:reconcile".into(),
    };
    let report = reconcile::run(f.pool(), &gw, &opts, chrono::Utc::now())
        .await
        .unwrap();
    let fixed: Vec<i64> = report
        .mismatches
        .iter()
        .filter(|m| m.fixed)
        .map(|m| m.payout_id)
        .collect();
    assert_eq!(fixed.len(), 2, "{report:?}");
    assert_eq!(f.status(ids[0].get()).await, "paid");
    assert_eq!(
        counted() - before,
        5000,
        "two payouts of 2.500 KWD = 5,000 fils"
    );
    // ...once: a second run finds nothing to record.
    reconcile::run(f.pool(), &gw, &opts, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(counted() - before, 5000, "counted once");

    // A refused cancel that records the gateway's payment counts it too.
    let id = payouts::db::payouts::create(
        f.pool(),
        payee.id,
        Money::parse("1.25", "KWD").unwrap(),
        now,
        "operator:test",
        now,
    )
    .await
    .unwrap()
    .id;
    for status in ["queued", "processing", "retrying"] {
        sqlx::query(
            "UPDATE payouts SET status = $2, attempt = 1,
                 lease_until = CASE WHEN $2 <> 'retrying' THEN now() + interval '1 minute' END,
                 next_attempt_at = CASE WHEN $2 = 'retrying' THEN now() + interval '1 hour' END
             WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .execute(f.pool())
        .await
        .unwrap();
    }
    let gw: std::sync::Arc<dyn payouts::gateway::Lookup> = std::sync::Arc::new(PaysEverything {
        amount_minor: 1250,
        currency: "KWD",
    });
    let refused = reconcile::cancel(
        f.pool(),
        async || Ok(gw),
        id,
        "operator:ana",
        "gave up",
        chrono::Utc::now(),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.status(), Some(payouts::domain::PayoutStatus::Paid));
    assert_eq!(
        counted() - before,
        6250,
        "the cancel check's record counted"
    );
}

// --- a real Prometheus ---------------------------------------------------------------

/// A Prometheus server on loopback with its own config and storage; killed
/// and cleaned up when dropped.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    fn start(rules: &str, worker_port: u16, producer_port: u16) -> Prometheus {
        let dir = std::env::temp_dir().join(unique("payouts_prometheus"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("rules.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - rules.yml\n\
             scrape_configs:\n\
             \x20 - job_name: payout-worker\n    static_configs:\n      - targets: ['127.0.0.1:{worker_port}']\n\
             \x20 - job_name: payout-producer\n    static_configs:\n      - targets: ['127.0.0.1:{producer_port}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        run_ok(
            Command::new(tool("promtool"))
                .args(["check", "config"])
                .arg(dir.join("prometheus.yml")),
        );
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, dir, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The production rules with test-sized windows: every `[range]` becomes
/// `[30s]` and every `for:` becomes `for: 5s` (offsets stay).
fn short_window_rules(rules: &str) -> String {
    let mut out = String::new();
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for:") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(indent);
            out.push_str("for: 5s\n");
            continue;
        }
        let mut rest = line;
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match after.find(']') {
                Some(close)
                    if after.starts_with(|c: char| c.is_ascii_digit())
                        && after[..close].chars().all(|c| c.is_ascii_alphanumeric()) =>
                {
                    out.push_str("[30s]");
                    rest = &after[close + 1..];
                }
                _ => {
                    out.push('[');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

#[test]
fn short_window_rules_only_shrink_ranges_and_for() {
    let out = short_window_rules(
        "  expr: rate(x[15m]) > 0 and increase(y[1h] offset 1d) > 0 # [see]\n  for: 5m\n",
    );
    assert_eq!(
        out,
        "  expr: rate(x[30s]) > 0 and increase(y[30s] offset 1d) > 0 # [see]\n  for: 5s\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_the_failure_rate_alert_when_the_gateway_rejects_a_fifth() {
    let rules = short_window_rules(&read("prometheus/alerts.yml"));

    // 20% of transfers are rejected permanently (-> failed). Few jobs in
    // flight so the flow lasts while Prometheus looks.
    let f = Fleet::start(Faults {
        latency_ms: 20,
        rate_permanent: 0.2,
        ..Default::default()
    })
    .await;
    f.seed(5000, 100).await;
    // Prometheus first, so it sees the whole flow from its start.
    let ports = (free_port(), free_port());
    let prom = Prometheus::start(&rules, ports.0, ports.1);
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "prometheus is ready", || {
        let (http, url) = (&http, prom.url("/-/ready"));
        async move { get_text(http, &url).await.map(|_| ()) }
    })
    .await;
    let _procs = start_processes(&f, ports, &[("PAYOUTS_WORKER__CONCURRENCY", "4")], "prom");

    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let value = loop {
        let alerts: Option<Value> = get_text(&http, &prom.url("/api/v1/alerts"))
            .await
            .and_then(|t| serde_json::from_str(&t).ok());
        let found = alerts.as_ref().and_then(|a| {
            a["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|x| x["labels"]["alertname"] == "PayoutFailureRateHigh")
                .map(|x| {
                    (
                        x["state"].as_str().unwrap_or("").to_string(),
                        x["value"].as_str().unwrap_or("").to_string(),
                    )
                })
        });
        if let Some((_, value)) = found.as_ref().filter(|(state, _)| state == "firing") {
            break value.clone();
        }
        if Instant::now() >= deadline {
            let rules_state = get_text(&http, &prom.url("/api/v1/rules"))
                .await
                .unwrap_or_default();
            let targets = get_text(&http, &prom.url("/api/v1/targets"))
                .await
                .unwrap_or_default();
            panic!(
                "PayoutFailureRateHigh not firing after 90 s (last seen: {found:?}); \
                 paid {}, failed {}\nrules: {rules_state}\ntargets: {targets}\nprometheus log:\n{}",
                f.count("paid").await,
                f.count("failed").await,
                prom.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rate: f64 = value.parse().unwrap_or(f64::NAN);
    assert!(
        (0.1..=0.35).contains(&rate),
        "the alert's failure rate is {value}; the gateway rejects 20%"
    );
    eprintln!(
        "PayoutFailureRateHigh firing {:.1} s after the fleet started, failure rate {rate:.3}",
        started.elapsed().as_secs_f64()
    );
    // The same failures are dead letters: that alert fires too.
    eventually(
        Duration::from_secs(30),
        "PayoutDeadLetter firing",
        || async {
            let alerts: Value =
                serde_json::from_str(&get_text(&http, &prom.url("/api/v1/alerts")).await?).ok()?;
            alerts["data"]["alerts"]
                .as_array()?
                .iter()
                .any(|x| x["labels"]["alertname"] == "PayoutDeadLetter" && x["state"] == "firing")
                .then_some(())
        },
    )
    .await;
    let alerts = get_text(&http, &prom.url("/api/v1/alerts"))
        .await
        .unwrap_or_default();
    // A healthy fleet is not paged for its workers or its producer.
    assert!(!alerts.contains("PayoutNoWorkerAlive"), "{alerts}");
    assert!(!alerts.contains("PayoutNoProducerLeading"), "{alerts}");
}

// --- Grafana -------------------------------------------------------------------------

#[test]
fn grafana_provisioning_and_dashboard_fit_together() {
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let source = &ds["datasources"][0];
    assert_eq!(source["type"], "prometheus");
    assert_eq!(source["url"], "http://prometheus:9090");
    let uid = s(&source["uid"], "datasource uid");
    assert_eq!(
        source["isDefault"], true,
        "the dashboard's variable defaults to it"
    );

    let provider = yaml("grafana/provisioning/dashboards/payouts.yml");
    let path = s(
        &provider["providers"][0]["options"]["path"],
        "provider path",
    );
    assert_eq!(path, "/var/lib/grafana/dashboards");

    let dash = dashboard();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    // Imports anywhere: no datasource uid of ours in it, an input for the
    // import dialog, and datasource / namespace / job variables.
    let text = read("grafana/dashboards/payouts.json");
    assert!(
        !text.contains(uid),
        "the dashboard still names the provisioned datasource uid {uid}"
    );
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dash["__inputs"][0]["type"], "datasource");
    assert_eq!(dash["__inputs"][0]["pluginId"], "prometheus");
    let vars: BTreeMap<&str, &Value> = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| (s(&v["name"], "variable name"), v))
        .collect();
    let ds_var = vars.get("datasource").expect("a datasource variable");
    assert_eq!(ds_var["type"], "datasource");
    assert_eq!(ds_var["query"], "prometheus");
    assert_eq!(ds_var["current"]["value"], "${DS_PROMETHEUS}");
    // `${DS_PROMETHEUS}` (replaced at import) only sets the variable's default.
    assert_eq!(
        text.matches("${DS_PROMETHEUS}").count(),
        2,
        "text and value"
    );
    let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    for name in ["namespace", "job"] {
        let v = vars
            .get(name)
            .unwrap_or_else(|| panic!("no {name} variable"));
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"], ds, "{name} variable datasource");
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["multi"], true, "{name}");
    }
    // All namespaces matches series without the label too (docker compose).
    assert_eq!(vars["namespace"]["allValue"], ".*");
    let recorded: BTreeSet<String> = rules().records.into_keys().collect();
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels(&dash) {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {id} is wider than the grid");
        if p["type"] == "row" {
            continue;
        }
        let title = s(&p["title"], "title").to_string();
        assert_eq!(p["datasource"], ds, "panel {title} datasource");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"], ds, "panel {title} target datasource");
            let expr = s(&t["expr"], "expr");
            for m in promql_metric_names(expr) {
                if !recorded.contains(&m) {
                    assert_selectors_filtered(expr, &m, &title);
                }
            }
        }
        titles.push(title.to_lowercase());
    }
    for want in [
        "throughput by outcome",
        "success rate",
        "due to paid",
        "processing time",
        "backlog age",
        "queue depth",
        "retries and dead letters",
        "gateway results",
        "gateway latency",
        "workers alive",
        "producer leading",
        "money paid per currency per hour",
        "webhooks",
        "webhook failure rate",
        "email to payees",
        "failed after paid",
        "in transit",
        "infrastructure errors",
        "stale fences",
        "restarts",
        "scrape targets",
        "settlement",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel for {want:?} in {titles:?}"
        );
    }
}

/// Every selector of `metric` in `expr` carries the dashboard's job and namespace matchers.
fn assert_selectors_filtered(expr: &str, metric: &str, title: &str) {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut seen = 0;
    for (at, _) in expr.match_indices(metric) {
        let before = expr[..at].chars().next_back();
        let rest = &expr[at + metric.len()..];
        if before.is_some_and(is_name) || rest.starts_with(is_name) {
            continue; // part of a longer name
        }
        seen += 1;
        let matchers = rest
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .map(|(m, _)| m)
            .unwrap_or_else(|| panic!("panel {title}: {metric} without matchers in {expr}"));
        for want in [r#"job=~"$job""#, r#"namespace=~"$namespace""#] {
            assert!(
                matchers.contains(want),
                "panel {title}: {metric}{{{matchers}}} lacks {want}"
            );
        }
    }
    assert!(seen > 0, "panel {title}: {metric} not found in {expr}");
}

#[test]
fn the_money_panel_divides_each_currency_by_its_own_minor_unit() {
    // Every currency the code knows, by exponent (all three-letter codes tried).
    let mut by_exp: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for a in b'A'..=b'Z' {
        for b in b'A'..=b'Z' {
            for c in b'A'..=b'Z' {
                let code = String::from_utf8(vec![a, b, c]).unwrap();
                if let Ok(cur) = code.parse::<payouts::domain::Currency>() {
                    by_exp.entry(cur.exponent()).or_default().push(code);
                }
            }
        }
    }
    assert_eq!(
        by_exp.keys().copied().collect::<Vec<_>>(),
        vec![0, 2, 3],
        "a currency exponent the money panel does not handle"
    );
    let zero = by_exp[&0].join("|");
    let three = by_exp[&3].join("|");
    let dash = dashboard();
    let money: Vec<&Value> = panels(&dash)
        .into_iter()
        .filter(|p| {
            p["title"]
                .as_str()
                .is_some_and(|t| t.to_lowercase().starts_with("money paid"))
        })
        .collect();
    assert_eq!(money.len(), 2, "per hour and last 24 hours");
    for p in money {
        let expr = s(&p["targets"][0]["expr"], "money expr");
        let parts: Vec<&str> = expr.split("\nor ").collect();
        assert_eq!(parts.len(), 3, "{expr}");
        assert!(
            parts[0].contains(&format!(r#"currency!~"{zero}|{three}""#))
                && parts[0].trim_end().ends_with(") / 100"),
            "two-decimal currencies: {}",
            parts[0]
        );
        assert!(
            parts[1].contains(&format!(r#"currency=~"{zero}""#)) && !parts[1].contains(" / "),
            "zero-decimal currencies: {}",
            parts[1]
        );
        assert!(
            parts[2].contains(&format!(r#"currency=~"{three}""#))
                && parts[2].trim_end().ends_with(") / 1000"),
            "three-decimal currencies: {}",
            parts[2]
        );
        for part in parts {
            assert!(
                part.contains("increase(payout_paid_minor_units_total{"),
                "{part}"
            );
        }
    }
}

// --- docker compose ----------------------------------------------------------------------

/// The binaries Cargo.toml declares.
fn cargo_bins() -> BTreeSet<String> {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["bin"]
        .as_array()
        .expect("[[bin]]")
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

fn env_of<'a>(svc: &'a Value, key: &str) -> Option<&'a str> {
    svc["environment"][key].as_str()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

#[test]
fn docker_compose_runs_the_whole_fleet_from_files_that_exist() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    let volumes: BTreeSet<&str> = compose["volumes"]
        .as_object()
        .map(|v| v.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let bins = cargo_bins();
    for want in [
        "redis",
        "postgres",
        "migrate",
        "producer",
        "worker",
        "mock-gateway",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(want), "service {want} is missing");
    }

    for (name, svc) in services {
        // Image or build.
        if let Some(build) = svc.get("build") {
            let ctx = build["context"].as_str().or(build.as_str()).unwrap_or(".");
            let file = build["dockerfile"].as_str().unwrap_or("Dockerfile");
            assert!(
                root().join(ctx).join(file).is_file(),
                "{name}: {ctx}/{file} missing"
            );
        } else {
            let image = s(&svc["image"], &format!("{name}: image or build"));
            assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{name}: pin the image tag ({image})"
            );
        }
        // Our image: the command is one of our binaries.
        if svc.get("build").is_some() {
            let cmd = svc["command"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: command must be a list naming the binary"));
            let bin = s(&cmd[0], "command");
            assert!(
                bins.contains(bin),
                "{name}: {bin} is not a binary of Cargo.toml ({bins:?})"
            );
        }
        // Bind mounts exist; named volumes are declared.
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let spec = s(v, "volume");
            let source = spec.split(':').next().unwrap();
            if source.starts_with('.') || source.starts_with('/') {
                assert!(
                    root().join(source).exists(),
                    "{name}: mounts {source}, which does not exist"
                );
            } else {
                assert!(
                    volumes.contains(source),
                    "{name}: volume {source} not declared"
                );
            }
        }
        // Ports: loopback on the host, a container port the service listens on.
        for p in svc["ports"].as_array().into_iter().flatten() {
            let spec = s(p, "port");
            assert!(
                spec.starts_with("127.0.0.1:"),
                "{name}: publish {spec} on loopback only"
            );
        }
        for dep in svc["depends_on"]
            .as_object()
            .into_iter()
            .flat_map(|d| d.iter())
        {
            let (dep_name, cond) = (dep.0, dep.1["condition"].as_str().unwrap_or(""));
            let target = services
                .get(dep_name)
                .unwrap_or_else(|| panic!("{name} depends on unknown {dep_name}"));
            if cond == "service_healthy" {
                assert!(
                    target.get("healthcheck").is_some(),
                    "{dep_name} has no healthcheck"
                );
            }
        }
        // Restart policy and health check on everything that keeps running.
        if name == "migrate" {
            assert_eq!(svc["restart"], "no");
        } else {
            assert!(
                ["always", "unless-stopped", "on-failure"]
                    .contains(&svc["restart"].as_str().unwrap_or("")),
                "{name}: no restart policy"
            );
            assert!(svc.get("healthcheck").is_some(), "{name}: no healthcheck");
        }
    }

    let health_port = |svc: &Value| -> u16 {
        let test: Vec<&str> = svc["healthcheck"]["test"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let url = test.iter().find(|a| a.starts_with("http://")).unwrap();
        port_of(url.split('/').nth(2).unwrap())
    };

    // Redis keeps an AOF on a volume; Postgres keeps its data on a volume.
    let redis_cmd = compose["services"]["redis"]["command"].to_string();
    assert!(
        redis_cmd.contains("\"--appendonly\",\"yes\""),
        "{redis_cmd}"
    );
    assert!(
        compose["services"]["postgres"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_str().unwrap().ends_with(":/var/lib/postgresql/data"))
    );

    // Migrations first, once.
    let migrate = &compose["services"]["migrate"];
    assert_eq!(
        migrate["command"],
        serde_json::json!(["payoutctl", "migrate"])
    );
    for svc in ["producer", "worker"] {
        assert_eq!(
            compose["services"][svc]["depends_on"]["migrate"]["condition"],
            "service_completed_successfully"
        );
    }

    // Producers: leader and standby. Workers: three, scalable (no fixed name or host port).
    let producer = &compose["services"]["producer"];
    let worker = &compose["services"]["worker"];
    assert_eq!(producer["command"][0], "payout-producer");
    assert_eq!(worker["command"][0], "payout-worker");
    assert_eq!(producer["deploy"]["replicas"], 2);
    assert_eq!(worker["deploy"]["replicas"], 3);
    for (svc, name) in [(producer, "producer"), (worker, "worker")] {
        assert!(
            svc.get("ports").is_none(),
            "{name}: a host port stops --scale"
        );
        assert!(
            svc.get("container_name").is_none(),
            "{name}: a fixed name stops --scale"
        );
    }
    let producer_port = port_of(env_of(producer, "PAYOUTS_PRODUCER__LISTEN").unwrap());
    let worker_port = port_of(env_of(worker, "PAYOUTS_WORKER__LISTEN").unwrap());
    assert_eq!(health_port(producer), producer_port);
    assert_eq!(health_port(worker), worker_port);
    let deadline: u64 = env_of(worker, "PAYOUTS_WORKER__SHUTDOWN_DEADLINE_SECS")
        .unwrap()
        .parse()
        .unwrap();
    let grace = duration_secs(s(&worker["stop_grace_period"], "worker stop_grace_period"));
    assert!(
        grace > deadline,
        "worker stop_grace_period {grace}s must outlast the shutdown deadline {deadline}s"
    );

    // The mock gateway listens where the workers call it.
    let gw = &compose["services"]["mock-gateway"];
    let gw_listen = gw["command"]
        .as_array()
        .unwrap()
        .windows(2)
        .find(|w| w[0] == "--listen")
        .map(|w| port_of(w[1].as_str().unwrap()))
        .expect("mock-gateway --listen");
    assert_eq!(
        port_of(env_of(worker, "PAYOUTS_GATEWAY__BASE_URL").unwrap()),
        gw_listen
    );
    assert!(
        env_of(worker, "PAYOUTS_GATEWAY__BASE_URL")
            .unwrap()
            .contains("//mock-gateway:")
    );
    assert_eq!(health_port(gw), gw_listen);
    assert!(
        gw["ports"][0]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{gw_listen}"))
    );

    // Prometheus loads the rules and finds every producer and worker replica.
    let prom = &compose["services"]["prometheus"];
    let mounts: Vec<&str> = prom["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"));
    assert!(mounts.contains(&"./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"));
    assert_eq!(port_of(prom["ports"][0].as_str().unwrap()), 9090);
    assert_eq!(health_port(prom), 9090);
    let prom_cfg = yaml("prometheus/prometheus.yml");
    assert_eq!(prom_cfg["rule_files"], serde_json::json!(["alerts.yml"]));
    let mut scraped = BTreeMap::new();
    for job in prom_cfg["scrape_configs"].as_array().unwrap() {
        for sd in job["dns_sd_configs"].as_array().into_iter().flatten() {
            for n in sd["names"].as_array().unwrap() {
                scraped.insert(
                    n.as_str().unwrap().to_string(),
                    sd["port"].as_u64().unwrap() as u16,
                );
            }
        }
    }
    assert_eq!(scraped.get("producer"), Some(&producer_port));
    assert_eq!(scraped.get("worker"), Some(&worker_port));

    // Grafana: provisioning and the dashboard mounted where the provider looks.
    let grafana = &compose["services"]["grafana"];
    let gmounts: Vec<&str> = grafana["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(gmounts.contains(&"./grafana/dashboards:/var/lib/grafana/dashboards:ro"));
    assert!(gmounts.iter().any(|m| {
        m.starts_with("./grafana/provisioning/datasources:/etc/grafana/provisioning/datasources")
    }));
    assert!(gmounts.iter().any(|m| {
        m.starts_with("./grafana/provisioning/dashboards:/etc/grafana/provisioning/dashboards")
    }));
    assert_eq!(port_of(grafana["ports"][0].as_str().unwrap()), 3000);
    assert_eq!(health_port(grafana), 3000);
    let home = env_of(grafana, "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH").unwrap();
    let rel = home.replace("/var/lib/grafana/dashboards", "grafana/dashboards");
    assert!(
        root().join(&rel).is_file(),
        "home dashboard {home} -> {rel} missing"
    );
}

// --- Dockerfile ----------------------------------------------------------------------------

#[test]
fn the_dockerfile_builds_the_product_binaries_only_into_a_non_root_image() {
    let text = read("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(
        froms[0].starts_with("FROM rust:1-bookworm AS builder"),
        "{}",
        froms[0]
    );
    assert!(
        froms
            .last()
            .unwrap()
            .starts_with("FROM debian:bookworm-slim")
    );
    // The product only: no testkit (mock gateway, stand-in, chaos, bench)
    // in the production image, which is the last stage (the default target).
    assert!(text.contains("cargo build --release --locked --no-default-features --bins"));
    let runtime = text.rsplit("FROM ").next().unwrap();
    assert!(runtime.contains("COPY --from=builder "), "{runtime}");
    assert!(!runtime.contains("mock"), "{runtime}");
    assert!(text.contains("ca-certificates"));
    assert!(text.contains("COPY --from=builder"));
    let user = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("USER");
    let who = user.trim_start_matches("USER ").split(':').next().unwrap();
    assert!(who != "root" && who != "0", "runs as root: {user}");

    // Everything the crate compiles from is copied, and not ignored.
    let copied: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().skip(1).collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for c in &copied {
        assert!(root().join(c).exists(), "COPY {c}: missing");
        assert!(
            !ignored.iter().any(|i| i == c),
            "{c} is copied but .dockerignore drops it"
        );
    }
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    // Every target Cargo must find (an explicit path of any target kind; a
    // build script), the library, and what is embedded at compile time.
    let mut sources: Vec<String> = ["bin", "test", "bench", "example"]
        .iter()
        .filter_map(|kind| manifest.get(*kind).and_then(|t| t.as_array()))
        .flatten()
        .filter_map(|t| t.get("path").and_then(|p| p.as_str()))
        .map(String::from)
        .collect();
    sources.push(
        manifest["lib"]["path"]
            .as_str()
            .unwrap_or("src/lib.rs")
            .to_string(),
    );
    if root().join("build.rs").exists() {
        sources.push("build.rs".into());
    }
    // Embedded at compile time: the default settings and the migrations;
    // read at compile time: the checked statements' offline data (a build
    // has no database) and the setting that says to use it.
    sources.push("config/default.toml".into());
    sources.push("migrations".into());
    sources.push(".sqlx".into());
    sources.push(".cargo/config.toml".into());
    for src in sources {
        assert!(
            copied
                .iter()
                .any(|c| src == *c || src.starts_with(&format!("{c}/"))),
            "{src} is not copied into the build stage (COPY lines: {copied:?})"
        );
    }
}

// --- Kubernetes -----------------------------------------------------------------------------

fn k8s_objects(dir: &str) -> Vec<Value> {
    let kust = yaml(&format!("deploy/k8s/{dir}/kustomization.yaml"));
    let mut objs = Vec::new();
    for r in kust["resources"].as_array().expect("resources") {
        let r = s(r, "resource");
        let path = root().join("deploy/k8s").join(dir).join(r);
        assert!(path.exists(), "deploy/k8s/{dir}: resource {r} missing");
        if path.is_dir() {
            let sub = path
                .strip_prefix(root().join("deploy/k8s"))
                .unwrap()
                .to_string_lossy()
                .to_string();
            objs.extend(k8s_objects(&sub));
        } else {
            objs.extend(yaml_docs(&format!("deploy/k8s/{dir}/{r}")));
        }
    }
    objs
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container_port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name}"))
}

#[test]
fn kubernetes_manifests_scale_workers_safely_and_run_two_producers() {
    let base = k8s_objects("base");
    let config = find(&base, "ConfigMap", "payouts-config");
    let bins = cargo_bins();

    let check_deployment = |name: &str, listen_var: &str| -> (u64, Value) {
        let d = find(&base, "Deployment", name);
        let spec = &d["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let bin = s(&c["command"][0], "command");
        assert!(bins.contains(bin), "{name}: {bin} is not a binary");
        let port = container_port(c, "metrics");
        let listen = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == listen_var)
            .map(|e| s(&e["value"], listen_var).to_string())
            .unwrap_or_else(|| panic!("{name}: {listen_var} not set"));
        assert_eq!(
            u64::from(port_of(&listen)),
            port,
            "{name}: listens where probed"
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"], "/health/ready",
            "{name}"
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health", "{name}");
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{name} {probe}");
        }
        assert_eq!(
            d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"],
            "{name}: selector"
        );
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        let envs: Vec<&str> = c["envFrom"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["configMapRef"]["name"].as_str())
            .collect();
        assert!(envs.contains(&"payouts-config"), "{name}: settings");
        (
            spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
            d["spec"]["template"]["metadata"]["labels"].clone(),
        )
    };

    // Worker: probes, a grace period longer than the shutdown deadline, a PDB.
    let (grace, worker_labels) = check_deployment("payout-worker", "PAYOUTS_WORKER__LISTEN");
    let deadline: u64 = config["data"]["PAYOUTS_WORKER__SHUTDOWN_DEADLINE_SECS"]
        .as_str()
        .map(|v| v.parse().unwrap())
        .unwrap_or(30);
    assert!(
        grace > deadline,
        "worker terminationGracePeriodSeconds {grace} must outlast worker.shutdown_deadline_secs {deadline}"
    );
    let pdb = find(&base, "PodDisruptionBudget", "payout-worker");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], worker_labels);

    // Producer: two replicas (leader and standby); it waits for the
    // migration Job (tests/it/deploy.rs checks the Job and every pod's wait).
    let (_, producer_labels) = check_deployment("payout-producer", "PAYOUTS_PRODUCER__LISTEN");
    let producer = find(&base, "Deployment", "payout-producer");
    assert_eq!(producer["spec"]["replicas"], 2);
    assert_eq!(
        producer["spec"]["template"]["spec"]["initContainers"][0]["command"],
        serde_json::json!(["payoutctl", "migrate", "--check", "--wait-secs", "600"])
    );
    let ppdb = find(&base, "PodDisruptionBudget", "payout-producer");
    assert_eq!(ppdb["spec"]["selector"]["matchLabels"], producer_labels);

    // Autoscaling: KEDA on the backlog, or a plain HPA; never both at once.
    let keda = k8s_objects("keda");
    let so = find(&keda, "ScaledObject", "payout-worker");
    assert_eq!(so["spec"]["scaleTargetRef"]["name"], "payout-worker");
    assert!(
        so["spec"]["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["type"] == "prometheus")
    );
    assert!(!keda.iter().any(|o| o["kind"] == "HorizontalPodAutoscaler"));
    let hpa_objs = k8s_objects("hpa");
    let hpa = find(&hpa_objs, "HorizontalPodAutoscaler", "payout-worker");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "payout-worker");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert!(!hpa_objs.iter().any(|o| o["kind"] == "ScaledObject"));
    let adapter = yaml("deploy/k8s/hpa/prometheus-adapter-values.yaml");
    let external = hpa["spec"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["type"] == "External")
        .expect("an external (backlog) metric");
    assert_eq!(
        external["external"]["metric"]["name"],
        adapter["rules"]["external"][0]["name"]["as"]
    );
    // Under an autoscaler the Deployment leaves replicas to it.
    for dir in ["keda", "hpa"] {
        let kust = read(&format!("deploy/k8s/{dir}/kustomization.yaml"));
        assert!(
            kust.contains("path: /spec/replicas") && kust.contains("name: payout-worker"),
            "{dir}: remove the worker's replicas"
        );
    }

    // Where kubectl is installed, kustomize must build every variant.
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|out| out.status.success());
    if kubectl {
        for dir in ["base", "keda", "hpa"] {
            let built =
                run_ok(Command::new("kubectl").args(["kustomize", &format!("deploy/k8s/{dir}")]));
            assert!(built.contains("kind: Deployment"), "{dir}: {built}");
            if dir != "base" {
                let worker = built
                    .split("\n---\n")
                    .find(|d| d.contains("name: payout-worker") && d.contains("kind: Deployment"))
                    .unwrap();
                assert!(
                    !worker.contains("\n  replicas:"),
                    "{dir}: the worker still sets replicas"
                );
            }
        }
    } else {
        eprintln!("kubectl not installed: kustomize build not checked (structure checked above)");
    }
}

//! The deployment runs the whole job, checked against the files and with real
//! validators:
//!
//! - `docker-compose.yml` passes the compose-spec schema and every kustomize
//!   variant passes strict Kubernetes schemas, custom resources included
//!   (`scripts/validate-deploy.sh`), and the validators do refuse a misspelt
//!   field;
//! - a fresh install reconciles by itself (a daily CronJob, a compose
//!   service), migrations run as their own Job and every pod waits for them,
//!   the PodMonitor scrapes every port that serves metrics and carries the
//!   `release` label, the PrometheusRule is the rule file, the admin
//!   Deployment has a disruption budget;
//! - the autoscalers' queries (run by `promtool test rules`) add no worker
//!   while the gateway is failing;
//! - `payoutctl migrate --check` (the pods' wait) and `payoutctl reconcile
//!   --every` (the compose scheduler) do what the manifests rely on.
//!
//! Needs python3 with PyYAML, `kubectl`, `check-jsonschema`,
//! `kubernetes-validate` and `promtool`; `scripts/test.sh` installs them.

use crate::common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Ctl, eventually};
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> &'static str {
    ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|py| {
            Command::new(py)
                .args(["-c", "import yaml"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("python3 with PyYAML is needed (scripts/test.sh installs it)")
}

/// Every YAML document of `text`, as JSON.
fn docs_of(text: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args([
            "-c",
            "import sys, json, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not YAML");
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(d) => d,
        other => panic!("{other}"),
    }
}

fn file_docs(rel: &str) -> Vec<Value> {
    docs_of(&std::fs::read_to_string(root().join(rel)).unwrap())
}

/// `kubectl kustomize deploy/k8s/<variant>`, as JSON objects.
fn rendered(variant: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", &format!("deploy/k8s/{variant}")])
        .current_dir(root())
        .output()
        .expect("kubectl is needed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    docs_of(&String::from_utf8_lossy(&out.stdout))
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn pod_spec(o: &Value) -> &Value {
    match o["kind"].as_str() {
        Some("CronJob") => &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &o["spec"]["template"]["spec"],
    }
}

fn validate(dir: &Path) -> (bool, String) {
    let out = Command::new("bash")
        .arg(dir.join("scripts/validate-deploy.sh"))
        .output()
        .expect("run scripts/validate-deploy.sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// --- validators -----------------------------------------------------------------

#[test]
fn the_compose_file_and_every_kustomize_variant_pass_their_schemas_strictly() {
    let (ok, out) = validate(&root());
    assert!(ok, "{out}");
    for variant in ["base", "keda", "hpa", "monitoring", "pgbouncer", "ingress"] {
        assert!(
            out.contains(&format!("deploy/k8s/{variant}: valid")),
            "{out}"
        );
    }
}

/// A copy of the deployment files (and the scripts that check them) with
/// `file`'s `from` replaced by `to`.
fn mutated(file: &str, from: &str, to: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(common::unique("deploy"));
    std::fs::create_dir_all(&dir).unwrap();
    for sub in ["deploy", "scripts"] {
        let ok = Command::new("cp")
            .arg("-r")
            .arg(root().join(sub))
            .arg(dir.join(sub))
            .status()
            .unwrap();
        assert!(ok.success(), "copy {sub}");
    }
    for compose in ["docker-compose.yml", "docker-compose.sentinel.yml"] {
        std::fs::copy(root().join(compose), dir.join(compose)).unwrap();
    }
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    dir
}

#[test]
fn the_validators_refuse_a_misspelt_field_in_compose_kubernetes_and_custom_resources() {
    for (file, from, to, what) in [
        (
            "docker-compose.yml",
            "stop_grace_period: 15s",
            "stop_grace_periods: 15s",
            "compose",
        ),
        (
            "docker-compose.sentinel.yml",
            "    command: [",
            "    commands: [",
            "compose (Sentinel)",
        ),
        (
            "deploy/k8s/base/reconcile-cronjob.yaml",
            "concurrencyPolicy: Forbid",
            "concurrencyPolicies: Forbid",
            "CronJob",
        ),
        (
            "deploy/k8s/keda/scaledobject.yaml",
            "minReplicaCount: 2",
            "minReplicas: 2",
            "ScaledObject",
        ),
        (
            "deploy/k8s/monitoring/podmonitor.yaml",
            "interval: 15s",
            "scrapeInterval: 15s",
            "PodMonitor",
        ),
    ] {
        let dir = mutated(file, from, to);
        let (ok, out) = validate(&dir);
        assert!(!ok, "{what}: {to:?} passed: {out}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// --- what the manifests do --------------------------------------------------------

#[test]
fn a_fresh_install_reconciles_daily_in_kubernetes_and_in_compose() {
    let base = rendered("base");
    let cron = find(&base, "CronJob", "payout-reconcile");
    let schedule = cron["spec"]["schedule"].as_str().unwrap();
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "{schedule}");
    assert!(
        fields[0].parse::<u32>().is_ok() && fields[1].parse::<u32>().is_ok(),
        "once a day: {schedule}"
    );
    assert_eq!(&fields[2..], ["*", "*", "*"], "every day: {schedule}");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    let spec = pod_spec(cron);
    let cmd = &spec["containers"][0]["command"];
    assert_eq!(cmd, &json!(["payoutctl", "reconcile", "--since", "48h"]));
    // Money out of step fails the Job at once; an unreachable gateway is retried.
    let rules = &cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"];
    assert_eq!(rules[0]["action"], "FailJob");
    assert_eq!(
        rules[0]["onExitCodes"]["values"],
        json!([payouts::cli::EXIT_MISMATCHES])
    );
    // Every other kustomize variant includes it.
    for variant in ["keda", "hpa"] {
        find(&rendered(variant), "CronJob", "payout-reconcile");
    }

    let compose = &file_docs("docker-compose.yml")[0];
    let svc = &compose["services"]["reconcile"];
    assert_eq!(
        svc["command"],
        json!(["payoutctl", "reconcile", "--since", "48h", "--every", "24h"])
    );
    assert_eq!(
        svc["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
}

#[test]
fn migrations_run_as_their_own_job_and_no_pod_starts_before_the_schema_is_current() {
    let base = rendered("base");
    let job = find(&base, "Job", "payout-migrate");
    let c = &pod_spec(job)["containers"][0];
    assert_eq!(c["command"], json!(["payoutctl", "migrate"]));
    let wait = json!(["payoutctl", "migrate", "--check", "--wait-secs", "600"]);
    let mut checked = 0;
    for o in base
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "CronJob")
    {
        let name = o["metadata"]["name"].as_str().unwrap();
        let spec = pod_spec(o);
        let init = &spec["initContainers"][0];
        assert_eq!(init["command"], wait, "{name} waits for the migration Job");
        for key in ["requests", "limits"] {
            assert!(
                init["resources"][key]["memory"].is_string(),
                "{name}: the init container has {key}"
            );
        }
        assert!(init["resources"]["requests"]["cpu"].is_string(), "{name}");
        // Only the Job migrates.
        for c in spec["containers"].as_array().unwrap() {
            assert_ne!(c["command"], json!(["payoutctl", "migrate"]), "{name}");
        }
        checked += 1;
    }
    assert_eq!(checked, 4, "producer, worker, admin, reconcile");
}

#[test]
fn the_pod_monitor_scrapes_every_port_that_serves_metrics_with_the_release_label() {
    let monitoring = rendered("monitoring");
    let pm = find(&monitoring, "PodMonitor", "payouts");
    assert_eq!(pm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let ports: Vec<&str> = pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    for d in rendered("base")
        .iter()
        .filter(|o| o["kind"] == "Deployment")
    {
        let name = d["metadata"]["name"].as_str().unwrap();
        let c = &pod_spec(d)["containers"][0];
        // The port the pod's own prometheus.io/port annotation names.
        let annotated = d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
            .as_str()
            .unwrap();
        let port = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["containerPort"]
                    .as_u64()
                    .map(|n| n.to_string())
                    .as_deref()
                    == Some(annotated)
            })
            .unwrap_or_else(|| panic!("{name}: no port {annotated}"));
        let port_name = port["name"].as_str().unwrap();
        assert!(
            ports.contains(&port_name),
            "{name}: port {port_name} is not scraped by the PodMonitor ({ports:?})"
        );
        assert!(
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
                == pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            "{name}: selected"
        );
    }
    let rule = find(&monitoring, "PrometheusRule", "payouts");
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
}

#[test]
fn the_prometheus_rule_is_the_rule_file_prometheus_and_promtool_read() {
    let rules = &file_docs("prometheus/alerts.yml")[0];
    let rule = &file_docs("deploy/k8s/monitoring/prometheusrule.yaml")[0];
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"], rules["groups"],
        "deploy/k8s/monitoring/prometheusrule.yaml is stale: run scripts/prometheus-rule.sh"
    );
}

#[test]
fn the_admin_deployment_keeps_one_replica_through_a_drain() {
    let base = rendered("base");
    let admin = find(&base, "Deployment", "payout-admin");
    let pdb = find(&base, "PodDisruptionBudget", "payout-admin");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        admin["spec"]["template"]["metadata"]["labels"]
    );
    let min = pdb["spec"]["minAvailable"].as_i64().unwrap();
    assert!(min >= 1 && min < admin["spec"]["replicas"].as_i64().unwrap());
}

/// Security finding 5/6 behind an ingress: the lockout keys on the client
/// (the controller's X-Forwarded-For), not on the controller, and the public
/// name is the one Host the listener answers besides cluster names.
#[test]
fn behind_the_ingress_the_lockout_keys_on_the_client_and_the_public_host_is_answered() {
    let dir = std::env::temp_dir().join(format!("ingress-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k8s = root().join("deploy/k8s");
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "resources: [{}]\ncomponents: [{}]\n",
            pathdiff(&k8s.join("base"), &dir),
            pathdiff(&k8s.join("ingress"), &dir),
        ),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .args(["kustomize", &dir.to_string_lossy()])
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objs = docs_of(&String::from_utf8_lossy(&out.stdout));
    let ingress = find(&objs, "Ingress", "payout-admin");
    let host = ingress["spec"]["rules"][0]["host"].as_str().unwrap();
    let admin = find(&objs, "Deployment", "payout-admin");
    let env = &pod_spec(admin)["containers"][0]["env"];
    let var = |name: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(str::to_string)
    };
    assert_eq!(
        var("PAYOUTS_ADMIN__CLIENT_IP_HEADER").as_deref(),
        Some("x-forwarded-for")
    );
    assert_eq!(var("PAYOUTS_ADMIN__ALLOWED_HOSTS").as_deref(), Some(host));
    assert_eq!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"],
        "payout-admin"
    );
}

#[test]
fn the_sentinel_component_points_every_process_at_the_charts_sentinels() {
    let dir = std::env::temp_dir().join(format!("sentinel-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k8s = root().join("deploy/k8s");
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "resources: [{}]\ncomponents: [{}]\n",
            pathdiff(&k8s.join("base"), &dir),
            pathdiff(&k8s.join("sentinel"), &dir),
        ),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .args(["kustomize", &dir.to_string_lossy()])
        .output()
        .expect("kubectl");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objs = docs_of(&String::from_utf8_lossy(&out.stdout));
    let data = find(&objs, "ConfigMap", "payouts-config")["data"]
        .as_object()
        .unwrap();
    let env: Vec<(String, String)> = data
        .iter()
        .filter(|(k, _)| k.starts_with("PAYOUTS_"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        // The Secret's part, as payouts-secrets would give it.
        .chain([("PAYOUTS_GATEWAY__SECRET".into(), "sk_live_example".into())])
        .collect();
    // The fleet reads them as it would in the pod.
    let settings = payouts::config::Settings::load_from(None, &env).expect("valid settings");
    assert_eq!(settings.redis.sentinels, ["redis.payouts.svc:26379"]);
    // The master name is the one the chart's values give its sentinels.
    let values = &file_docs("deploy/k8s/sentinel/redis-values.yaml")[0];
    assert_eq!(values["sentinel"]["enabled"], true);
    assert_eq!(
        values["sentinel"]["masterSet"].as_str(),
        Some(settings.redis.sentinel_master.as_str())
    );
    // Every fleet workload takes its settings from that ConfigMap.
    for (kind, name) in [
        ("Deployment", "payout-producer"),
        ("Deployment", "payout-worker"),
        ("Deployment", "payout-admin"),
    ] {
        let spec = pod_spec(find(&objs, kind, name));
        let from = spec["containers"][0]["envFrom"].to_string();
        assert!(from.contains("payouts-config"), "{name}: {from}");
    }
}

/// `to` relative to `from` (kustomize refuses absolute resource paths).
fn pathdiff(to: &Path, from: &Path) -> String {
    let up = from.components().count() - 1;
    let mut s = "../".repeat(up);
    s.push_str(to.to_string_lossy().trim_start_matches('/'));
    s
}

// --- autoscaling and the gateway ------------------------------------------------------

/// The PromQL of every autoscaler: KEDA's two triggers, the adapter's metric.
fn autoscaler_queries() -> Vec<(String, String)> {
    let so = &file_docs("deploy/k8s/keda/scaledobject.yaml")[0];
    let mut out: Vec<(String, String)> = so["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("keda_{i}"),
                t["metadata"]["query"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let adapter = &file_docs("deploy/k8s/hpa/prometheus-adapter-values.yaml")[0];
    out.push((
        "adapter".into(),
        adapter["rules"]["external"][0]["metricsQuery"]
            .as_str()
            .unwrap()
            .to_string(),
    ));
    out
}

#[test]
fn the_autoscalers_add_no_worker_while_the_gateway_fails_or_a_circuit_is_open() {
    let queries = autoscaler_queries();
    assert_eq!(queries.len(), 3);
    let dir = std::env::temp_dir().join(common::unique("autoscale"));
    std::fs::create_dir_all(&dir).unwrap();
    // Each query as a recording rule, so promtool evaluates exactly it.
    let rules = json!({"groups": [{"name": "autoscalers", "rules":
        queries.iter().map(|(n, q)| json!({"record": format!("autoscale:{n}"), "expr": q})).collect::<Vec<_>>()}]});
    std::fs::write(dir.join("rules.json"), rules.to_string()).unwrap();
    // A backlog on the leader (window 500, oldest due 900 s) in three worlds:
    // a healthy gateway, a gateway answering 50% 503s, an open circuit.
    let backlog = |instance: &str| {
        vec![
            json!({"series": format!("payout_producer_leader{{instance=\"{instance}\"}}"), "values": "1x20"}),
            json!({"series": format!("payout_queue_window_depth{{instance=\"{instance}\"}}"), "values": "500x20"}),
            json!({"series": format!("payout_oldest_due_age_seconds{{instance=\"{instance}\"}}"), "values": "900x20"}),
        ]
    };
    let world = |name: &str, ok_per_min: u64, err_per_min: u64, circuit: u64| {
        let mut series = backlog("p:9101");
        series.push(
            json!({"series": "gateway_requests_total{class=\"2xx\",instance=\"w:9102\"}",
            "values": format!("0+{ok_per_min}x20")}),
        );
        series.push(
            json!({"series": "gateway_requests_total{class=\"5xx\",instance=\"w:9102\"}",
            "values": format!("0+{err_per_min}x20")}),
        );
        series.push(
            json!({"series": "gateway_circuit_state{instance=\"w:9102\"}",
            "values": format!("{circuit}x20")}),
        );
        let healthy = ok_per_min > err_per_min * 3 && circuit == 0;
        let expect = |metric: &str, value: u64| {
            json!({"expr": metric, "eval_time": "10m",
                "exp_samples": if healthy { json!([{"labels": metric, "value": value}]) } else { json!([]) }})
        };
        json!({"name": name, "interval": "1m", "input_series": series, "promql_expr_test": [
            expect("autoscale:keda_0", 500), expect("autoscale:keda_1", 900), expect("autoscale:adapter", 500),
        ]})
    };
    let tests = json!({"rule_files": [dir.join("rules.json")], "evaluation_interval": "1m", "tests": [
        world("healthy gateway: scale on the backlog", 600, 0, 0),
        world("gateway answering half 503s: no scale-up", 300, 300, 0),
        world("a worker's circuit open: no scale-up", 0, 0, 2),
    ]});
    std::fs::write(dir.join("tests.json"), tests.to_string()).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.join("tests.json"))
        .output()
        .expect("promtool is needed (Debian's prometheus; scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{text}");
}

// --- the commands the manifests run ------------------------------------------------------

#[tokio::test]
async fn migrate_check_waits_for_the_migrations_and_names_the_missing_ones() {
    let ctl = Ctl::new().await;
    let code = |args: &[&str]| {
        let out = ctl.command(args, &[]).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (c, stdout, _) = code(&["migrate", "--check"]);
    assert_eq!(c, Some(0));
    assert!(stdout.contains("schema current"), "{stdout}");
    // The newest migration not applied yet: the schema is behind this binary.
    let newest: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&ctl.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = $1")
        .bind(newest)
        .execute(&ctl.db.pool)
        .await
        .unwrap();
    let (c, _, stderr) = code(&["migrate", "--check"]);
    assert_eq!(c, Some(payouts::cli::EXIT_SCHEMA_BEHIND), "{stderr}");
    assert!(stderr.contains(&newest.to_string()), "{stderr}");
    // The Job finishes while a pod waits: the wait ends with the schema current.
    let mut waiting = ctl
        .command(&["migrate", "--check", "--wait-secs", "60"], &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET success = true WHERE version = $1")
        .bind(newest)
        .execute(&ctl.db.pool)
        .await
        .unwrap();
    let status = eventually(Duration::from_secs(30), "the wait to end", || {
        let s = waiting.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_every_records_a_run_then_stops_cleanly_on_sigterm() {
    use payouts::testkit::mock_gateway::{MockGateway, MockGatewayConfig};
    let ctl = Ctl::new().await;
    let gw = MockGateway::start(MockGatewayConfig::default())
        .await
        .unwrap();
    let mut child = ctl
        .command(
            &["reconcile", "--since", "48h", "--every", "1h"],
            &[("PAYOUTS_GATEWAY__BASE_URL", gw.base_url.as_str())],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pool = ctl.db.pool.clone();
    eventually(Duration::from_secs(30), "a recorded run", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM reconcile_runs WHERE NOT failed")
                .fetch_one(&pool)
                .await
                .unwrap();
            (n >= 1).then_some(())
        }
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "still scheduling");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = eventually(Duration::from_secs(10), "exit on SIGTERM", || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "{status:?}");
}

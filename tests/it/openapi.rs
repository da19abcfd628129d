//! The OpenAPI document is generated from the handlers
//! (`payouts::admin::openapi`); these tests keep it whole and honest, with
//! no database or server:
//! - the committed copy (`docs/openapi.json`) is what the code generates
//!   (`UPDATE_OPENAPI=1 cargo test --test it openapi::` or
//!   `payoutctl openapi > docs/openapi.json` rewrites it);
//! - every route the admin server's routers declare is in the document, and
//!   every operation of the document is a declared route;
//! - the roles it names agree with what an integration token may reach;
//! - no amount is a JSON number;
//! - it is a valid OpenAPI 3.1 document (`openapi-spec-validator`, from PyPI).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const COMMITTED: &str = "docs/openapi.json";

#[test]
fn the_committed_document_is_the_generated_one() {
    let generated = payouts::admin::openapi::pretty();
    let path = root().join(COMMITTED);
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{COMMITTED} is not what the handlers generate: run \
         `UPDATE_OPENAPI=1 cargo test --test it openapi::` (or `payoutctl openapi > {COMMITTED}`) \
         and commit the result"
    );
}

/// `(METHOD, path)` of every `.route("path", get(..).post(..))` in `text`:
/// the methods are the calls at the top level of the route's second argument.
fn routes_in(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        // The whole argument list, up to the matching parenthesis.
        let (mut depth, mut end) = (1usize, 0usize);
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let args = &rest[..end];
        let Some(q1) = args.find('"') else { continue };
        let Some(q2) = args[q1 + 1..].find('"') else {
            continue;
        };
        let path = &args[q1 + 1..q1 + 1 + q2];
        let handlers = &args[q1 + 1 + q2 + 1..];
        let mut depth = 0usize;
        let mut word = String::new();
        for c in handlers.chars() {
            match c {
                '(' => {
                    if depth == 0
                        && ["get", "post", "put", "patch", "delete"].contains(&word.as_str())
                    {
                        out.push((word.to_uppercase(), path.to_string()));
                    }
                    depth += 1;
                    word.clear();
                }
                ')' => {
                    depth = depth.saturating_sub(1);
                    word.clear();
                }
                c if c.is_alphanumeric() || c == '_' => word.push(c),
                _ => word.clear(),
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every route the admin server serves: its routers (`src/admin/`) and the
/// `/health*` and `/metrics` every binary serves (`src/server.rs`).
fn declared_routes() -> BTreeSet<(String, String)> {
    let mut files = vec![root().join("src/server.rs")];
    rust_files(&root().join("src/admin"), &mut files);
    let mut all = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests build routers of their own.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        all.extend(routes_in(text));
    }
    all
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut all = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                all.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    all
}

#[test]
fn the_route_reader_finds_methods_at_the_top_level_only() {
    let text = r#"
        .route("/a/{id}", get(show).patch(update).delete(remove))
        .route(
            "/b",
            get(|| async { asset(X, "text/html") }).post(auth::login),
        )
        .route("/c", axum::routing::delete(api::revoke))
        .route("/d", get(|s| async move { s.get("x").await }))
    "#;
    let found: BTreeSet<(String, String)> = routes_in(text).into_iter().collect();
    let want: BTreeSet<(String, String)> = [
        ("GET", "/a/{id}"),
        ("PATCH", "/a/{id}"),
        ("DELETE", "/a/{id}"),
        ("GET", "/b"),
        ("POST", "/b"),
        ("DELETE", "/c"),
        ("GET", "/d"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(found, want);
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let declared = declared_routes();
    assert!(declared.len() > 40, "the route reader found {declared:?}");
    let documented = documented_routes(payouts::admin::openapi::document());
    let missing: Vec<_> = declared.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&declared).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes not in the document: {missing:?}; documented routes no router declares: {extra:?}"
    );
}

#[test]
fn the_roles_named_match_what_an_integration_token_may_reach() {
    let doc = payouts::admin::openapi::document();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(bearer) = op["security"]
                .as_array()
                .and_then(|s| s.iter().find_map(|r| r.get("bearer")))
            else {
                continue;
            };
            let named = bearer
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "integration");
            let concrete = path
                .replace("{id}", "1")
                .replace("{action}", "retry")
                .replace("{name}", "t");
            let m: axum::http::Method = method.to_uppercase().parse().unwrap();
            assert_eq!(
                named,
                payouts::admin::auth::integration_route(&m, &concrete),
                "{method} {path}: the document and the integration gate disagree"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "{checked}");
}

#[test]
fn every_authenticated_operation_documents_its_errors_and_security() {
    let doc = payouts::admin::openapi::document();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let security = op["security"].as_array().expect("security is explicit");
            let bearer = security.iter().any(|r| r.get("bearer").is_some());
            if !bearer {
                continue;
            }
            for code in ["401", "403", "429", "503"] {
                assert_eq!(
                    op["responses"][code]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error",
                    "{method} {path}: {code}"
                );
            }
            let session = security
                .iter()
                .find(|r| r.get("session").is_some())
                .expect("a session requirement");
            assert_eq!(
                session.get("csrf").is_some(),
                method != "get",
                "{method} {path}: a session's write needs X-CSRF-Token"
            );
        }
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["session"]["in"], "cookie");
    assert_eq!(schemes["csrf"]["name"], "X-CSRF-Token");
    // The answers that carry a status of their own are documented where they happen.
    let paths = &doc["paths"];
    assert!(paths["/api/v1/payouts/{id}/{action}"]["post"]["responses"]["409"].is_object());
    assert!(paths["/v1/earnings"]["post"]["responses"]["422"].is_object());
    assert!(paths["/v1/earnings"]["post"]["responses"]["409"].is_object());
    assert!(paths["/api/v1/tokens"]["post"]["responses"]["201"].is_object());
}

/// Every schema object in `v` with its JSON pointer.
fn schemas<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(m) => {
            out.push((at.clone(), v));
            for (k, x) in m {
                schemas(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(xs) => {
            for (i, x) in xs.iter().enumerate() {
                schemas(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn amounts_are_decimal_strings_never_numbers() {
    let doc = payouts::admin::openapi::document();
    let decimal = &doc["components"]["schemas"]["Decimal"];
    assert_eq!(decimal["type"], "string");
    assert_eq!(decimal["format"], "decimal");
    let pattern = decimal["pattern"].as_str().unwrap();
    assert_eq!(pattern, r"^-?[0-9]+(\.[0-9]+)?$");
    // The only numbers are the overview's rates, latencies and ages.
    let allowed = [
        "success_rate",
        "throughput_per_min",
        "p50",
        "p95",
        "p99",
        "backlog_age_seconds",
    ];
    let mut all = Vec::new();
    schemas(doc, String::new(), &mut all);
    for (at, s) in all {
        let number = s["type"] == "number"
            || s["type"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "number"));
        if number {
            assert!(
                allowed.iter().any(|a| at.ends_with(&format!("/{a}"))),
                "{at} is a JSON number: amounts are Decimal strings"
            );
        }
    }
    // The amounts of the main answers point at it.
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("Payout", "amount"),
        ("Settlement", "net"),
        ("LineRow", "amount"),
        ("EarningView", "gross"),
        ("CurrencyBalance", "releasable"),
        ("Earning", "gross"),
    ] {
        let f = &schemas[schema]["properties"][field];
        assert!(
            f["$ref"] == "#/components/schemas/Decimal"
                || f.to_string().contains("#/components/schemas/Decimal"),
            "{schema}.{field}: {f}"
        );
    }
    // An earning's line carries its id negated.
    assert!(
        schemas["LineRow"]["properties"]["id"]["description"]
            .as_str()
            .unwrap()
            .contains("negated")
    );
}

#[test]
fn the_document_is_valid_openapi() {
    let validator = "openapi-spec-validator";
    let out = Command::new(validator)
        .arg(root().join(COMMITTED))
        .output()
        .unwrap_or_else(|e| {
            panic!("{validator} not found ({e}): `pip install {validator}` (scripts/test.sh does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
}

#[test]
fn operation_ids_are_unique() {
    let doc = payouts::admin::openapi::document();
    let mut seen = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            assert!(
                seen.insert(id.clone()),
                "{method} {path}: operationId {id:?} twice"
            );
        }
    }
}

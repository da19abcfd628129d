#!/usr/bin/env bash
# The main job, end to end: local Redis and Postgres, migrations, the mock
# gateway, a producer and two workers; seeds 1,000 due payouts, waits until
# every one is final, reconciles against the gateway and prints a summary.
# Pass --gateway-kind release_funds to run the fleet on the booking worker's
# release-funds API (served by the same mock) instead of the gateway contract.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --release --locked --bins
exec "${CARGO_TARGET_DIR:-target}/release/payout-demo" "$@"

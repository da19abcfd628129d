#!/usr/bin/env bash
# The main job, end to end: local Redis and Postgres, migrations, the mock
# gateway, a producer and two workers; seeds 1,000 due payouts, waits until
# every one is final and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo build --release --locked --bins
exec target/release/payout-demo "$@"

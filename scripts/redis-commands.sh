#!/usr/bin/env bash
# Redis commands per payout, attributed by step (#21, BENCHMARKS.md): one
# payout-bench run (2,000 payouts + 200 warm-up, 1 worker, 0 ms) against a
# private redis-server on PORT (default 6390) recorded with MONITOR, then
# every command attributed to the script or client call that sent it.
#   scripts/redis-commands.sh [BIN_DIR] [PORT]   # BIN_DIR: target/release
set -euo pipefail
bin=${1:-target/release}; port=${2:-6390}
dir=$(mktemp -d /tmp/redis-commands.XXXXXX)
redis-server --port "$port" --save '' --appendonly no --daemonize yes \
  --pidfile "$dir/redis.pid" --dir "$dir" >/dev/null
trap 'kill "$(cat "$dir/mon.pid")" 2>/dev/null || true; kill "$(cat "$dir/redis.pid")" 2>/dev/null || true' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
redis-cli -p "$port" monitor > "$dir/monitor.txt" & echo $! > "$dir/mon.pid"
sleep 0.3
REDIS_URL=redis://127.0.0.1:$port "$bin/payout-bench" --payouts 2000 --warmup 200 \
  --workers 1 --latency-ms 0 --runs 1 --json "$dir/bench.json" --log-dir "$dir/logs" |
  grep -E '^\| (workers|1 )' | head -2
kill "$(cat "$dir/mon.pid")"
python3 "$(dirname "$0")/redis-attribute.py" "$dir/monitor.txt" 2200
echo "monitor capture: $dir/monitor.txt"

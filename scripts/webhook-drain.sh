#!/usr/bin/env bash
# The cost of outbound webhooks to the drain (issue #18, BENCHMARKS.md
# "Webhooks out"): payout-bench's 20,000-payout drain (2 workers, gateway
# latency 0) without an endpoint and with one local receiving endpoint,
# alternating configurations run by run (ROUNDS rounds), then the median
# of each configuration: payouts/s, the paid -> received lag p50 / p99,
# every payout.paid received or not, CPU of the busiest worker (the one
# delivering), of the receiver (inside payout-bench) and of Postgres.
#
#   BIN_DIR=/work/tgt/x/release scripts/webhook-drain.sh
#
# BIN_DIR holds payout-bench, payout-worker, payout-producer and
# mock-gateway (default target/release). CONFIGS lists the configurations:
# `none` (no endpoint), `paid` (subscribed to payout.paid, the issue's
# case) and `all` (subscribed to every type: three messages per payout).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-target/release}
ROUNDS=${ROUNDS:-3}
PAYOUTS=${PAYOUTS:-20000}
CONFIGS=${CONFIGS:-"none paid"}
OUT=${OUT:-.bench/webhook-drain-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
echo "results in $OUT (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
for round in $(seq 1 "$ROUNDS"); do
  for config in $CONFIGS; do
    case $config in
      none) extra=() ;;
      paid) extra=(--webhook --webhook-events payout.paid) ;;
      all) extra=(--webhook --webhook-events '*') ;;
      *) echo "unknown configuration $config" >&2; exit 2 ;;
    esac
    echo "round $round: $config (load $(cut -d' ' -f1 /proc/loadavg))"
    "$BIN_DIR/payout-bench" --workers 2 --latency-ms 0 --payouts "$PAYOUTS" \
      --warmup 2000 --runs 1 --log-dir "$OUT/logs-$config-$round" \
      --json "$OUT/$config-$round.json" "${extra[@]}" >/dev/null
  done
done
python3 - "$OUT" $CONFIGS <<'PY'
import glob, json, statistics, sys
out, configs = sys.argv[1], sys.argv[2:]
print("| configuration | payouts/s median (min-max) | paid -> received p50 / p99 (s) | payout.paid received | busiest worker CPU s | receiver CPU s | Postgres CPU s |")
print("|---|---|---|---|---|---|---|")
base = None
for c in configs:
    runs = [json.load(open(f))[0]["runs"][0] for f in sorted(glob.glob(f"{out}/{c}-*.json"))]
    rate = [r["payouts_per_sec"] for r in runs]
    med = statistics.median(rate)
    base = med if c == "none" else base
    cost = f" ({(med / base - 1) * 100:+.0f} %)" if base and c != "none" else ""
    hooks = [r["webhook"] for r in runs if r.get("webhook")]
    lag = (f"{statistics.median(h[1] for h in hooks):.2f} / {statistics.median(h[2] for h in hooks):.2f}"
           if hooks else "-")
    got = ", ".join(str(h[0]) for h in hooks) if hooks else "-"
    busiest = statistics.median(max(r["worker_cpu_secs"]) for r in runs)
    rcpu = [r["receiver_cpu_secs"] for r in runs if r.get("receiver_cpu_secs") is not None]
    rcpu = f"{statistics.median(rcpu):.2f}" if rcpu else "-"
    pg = statistics.median(r["postgres_cpu_secs"] for r in runs)
    print(f"| {c} | {med:.0f} ({min(rate):.0f}-{max(rate):.0f}){cost} | {lag} | {got} | {busiest:.2f} | {rcpu} | {pg:.2f} |")
PY

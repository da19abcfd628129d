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
#   BUILDS="before after" BIN_DIR_before=... BIN_DIR_after=... scripts/webhook-drain.sh
#
# A BIN_DIR holds payout-bench, payout-worker, payout-producer and
# mock-gateway (default target/release); with BUILDS, each build's runs
# alternate with the others' too. CONFIGS lists the configurations:
# `none` (no endpoint), `paid` (subscribed to payout.paid, the issue's
# case), `all` (subscribed to every type: three messages per payout) and
# CONFIGS_<build> overrides CONFIGS for one build. `paid-noyield` (`paid` with webhooks_out.yield_secs = 0: delivery never
# waits for the drain) and `paid-yield30` (yield_secs = 30).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-target/release}
BUILDS=${BUILDS:-}
ROUNDS=${ROUNDS:-3}
PAYOUTS=${PAYOUTS:-20000}
CONFIGS=${CONFIGS:-"none paid"}
OUT=${OUT:-.bench/webhook-drain-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
echo "results in $OUT (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
runs=()
for build in ${BUILDS:-default}; do
  configs="CONFIGS_$build"
  for config in ${!configs:-$CONFIGS}; do runs+=("$build/$config"); done
done
for round in $(seq 1 "$ROUNDS"); do
  for run in "${runs[@]}"; do
    build=${run%/*} config=${run#*/}
    dir=$BIN_DIR
    if [ "$build" != default ]; then
      var="BIN_DIR_$build"
      dir=${!var:?"set $var"}
    fi
    env=()
    case $config in
      none) extra=() ;;
      paid) extra=(--webhook --webhook-events payout.paid) ;;
      all) extra=(--webhook --webhook-events '*') ;;
      paid-noyield) extra=(--webhook --webhook-events payout.paid)
                    env=(PAYOUTS_WEBHOOKS_OUT__YIELD_SECS=0) ;;
      paid-yield30) extra=(--webhook --webhook-events payout.paid)
                    env=(PAYOUTS_WEBHOOKS_OUT__YIELD_SECS=30) ;;
      *) echo "unknown configuration $config" >&2; exit 2 ;;
    esac
    name=${build}-${config}
    echo "round $round: $name (load $(cut -d' ' -f1 /proc/loadavg))"
    env "${env[@]}" "$dir/payout-bench" --workers 2 --latency-ms 0 --payouts "$PAYOUTS" \
      --warmup 2000 --runs 1 --log-dir "$OUT/logs-$name-$round" \
      --json "$OUT/$name-$round.json" "${extra[@]}" >/dev/null 2>"$OUT/$name-$round.err" ||
      { cat "$OUT/$name-$round.err" >&2; exit 1; }
    grep -h "payouts/s\|webhooks:" "$OUT/$name-$round.err" | sed 's/^/    /'
  done
done
python3 - "$OUT" "${runs[@]}" <<'PY'
import glob, json, statistics, sys
out, runs = sys.argv[1], sys.argv[2:]
print("| build / configuration | payouts/s median (min-max) | vs no endpoint | paid -> received p50 / p99 (s) | payout.paid received | busiest worker CPU s | receiver CPU s | Postgres CPU s |")
print("|---|---|---|---|---|---|---|---|")
base = {}
for run in runs:
    build, config = run.split("/")
    name = f"{build}-{config}"
    rs = [json.load(open(f))[0]["runs"][0] for f in sorted(glob.glob(f"{out}/{name}-[0-9]*.json"))]
    if not rs:
        continue
    rate = [r["payouts_per_sec"] for r in rs]
    med = statistics.median(rate)
    if config == "none":
        base[build] = med
    cost = f"{(med / base[build] - 1) * 100:+.1f} %" if build in base and config != "none" else "-"
    hooks = [r["webhook"] for r in rs if r.get("webhook")]
    lag = (f"{statistics.median(h[1] for h in hooks):.2f} / {statistics.median(h[2] for h in hooks):.2f}"
           if hooks else "-")
    got = ", ".join(str(h[0]) for h in hooks) if hooks else "-"
    busiest = statistics.median(max(r["worker_cpu_secs"]) for r in rs)
    rcpu = [r["receiver_cpu_secs"] for r in rs if r.get("receiver_cpu_secs") is not None]
    rcpu = f"{statistics.median(rcpu):.2f}" if rcpu else "-"
    pg = statistics.median(r["postgres_cpu_secs"] for r in rs)
    label = config if build == "default" else f"{build} / {config}"
    print(f"| {label} | {med:.0f} ({min(rate):.0f}-{max(rate):.0f}) | {cost} | {lag} | {got} | {busiest:.2f} | {rcpu} | {pg:.2f} |")
PY

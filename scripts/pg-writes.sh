#!/usr/bin/env bash
# What Postgres does per payout in a `payout-bench` run, on a private
# Postgres instance only this run uses (so the WAL position and the
# statement counts are the bench's own): `payouts` updates and their HOT
# share, `payout_events` rows, WAL bytes, statements and trigger-function
# calls per payout, and the statements that write most. Used for
# BENCHMARKS.md ("Postgres diet").
#
#   scripts/pg-writes.sh                                   # release build in target/release
#   BIN=/work/tgt/rel/release scripts/pg-writes.sh         # other binaries
#   TEMPLATE_SQL=try.sql scripts/pg-writes.sh              # a schema change tried without a rebuild
#   scripts/pg-writes.sh --payouts 20000 --warmup 2000 --workers 2 --latency-ms 0 --runs 1   # (the default)
#
# TEMPLATE_SQL: the instance's template1 gets every migration the binaries
# embed (payoutctl migrate, so they count as applied), then this file; the
# bench's fresh database is made from template1 and so has both.
# Counts cover the whole run (warm-up included) and are divided by warm-up +
# burst payouts; the bench's own "WAL bytes/payout (burst)" is the burst alone.
# Needs a release build (`cargo build --release --bins`) and Redis (shared,
# keys under a fresh prefix).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
PORT=${PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
ARGS=("$@")
[ "${#ARGS[@]}" -gt 0 ] || ARGS=(--payouts 20000 --warmup 2000 --workers 2 --latency-ms 0 --runs 1)
total=$(python3 - "${ARGS[@]}" <<'PY'
import sys
a = sys.argv[1:]
def val(k, d):
    return int(a[a.index(k) + 1]) if k in a else d
print(val('--payouts', 100000) + val('--warmup', 2000))
PY
)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
dir=$(mktemp -d /tmp/pg-writes.XXXXXX)
chmod 755 "$dir"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$dir"
cleanup() { as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
as_pg "$PGBIN/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
# As the shared instance runs (stock, autovacuum off), plus the counters.
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -o "-p $PORT -k $dir -c listen_addresses=127.0.0.1 \
  -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all \
  -c track_functions=all -c autovacuum=off" start >/dev/null
URL="postgres://postgres@127.0.0.1:$PORT"
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" "$URL/postgres" -c "CREATE EXTENSION pg_stat_statements"
DATABASE_URL="$URL/template1" "$BIN/payoutctl" migrate >/dev/null
if [ -n "${TEMPLATE_SQL:-}" ]; then
  "${PSQL[@]}" "$URL/template1" -f "$TEMPLATE_SQL"
fi
"${PSQL[@]}" "$URL/postgres" -c "SELECT pg_stat_statements_reset()" -c "SELECT pg_stat_reset_shared('wal')" >/dev/null
lsn0=$("${PSQL[@]}" -At "$URL/postgres" -c "SELECT pg_current_wal_lsn()")
json="$dir/bench.json"
DATABASE_URL="$URL/payouts" "$BIN/payout-bench" --json "$json" --log-dir "$dir/logs" "${ARGS[@]}"
sleep 1
echo
echo "whole run: $total payouts (warm-up included), private Postgres on port $PORT"
"${PSQL[@]}" "$URL/payouts_bench" -v total="$total" -v lsn0="$lsn0" <<'SQL'
\pset footer off
SELECT relname, n_tup_ins AS inserted, n_tup_upd AS updated, n_tup_hot_upd AS hot,
       round(100.0 * n_tup_hot_upd / greatest(n_tup_upd, 1), 1) AS hot_pct,
       round(n_tup_upd::numeric / :total, 2) AS upd_per_payout,
       round(n_tup_ins::numeric / :total, 2) AS ins_per_payout
  FROM pg_stat_user_tables WHERE relname IN ('payouts', 'payout_events') ORDER BY relname;
SELECT round((pg_current_wal_lsn() - :'lsn0'::pg_lsn) / :total) AS wal_bytes_per_payout_whole_run,
       (SELECT round(wal_fpi::numeric / :total, 2) FROM pg_stat_wal) AS full_page_images_per_payout,
       (SELECT round(wal_records::numeric / :total, 1) FROM pg_stat_wal) AS wal_records_per_payout;
SELECT funcname, calls, round(calls::numeric / :total, 2) AS per_payout, round(self_time::numeric, 0) AS self_ms
  FROM pg_stat_user_functions ORDER BY calls DESC;
SQL
"${PSQL[@]}" "$URL/postgres" -v total="$total" <<'SQL'
\pset footer off
SELECT round(sum(calls) FILTER (WHERE toplevel)::numeric / :total, 2) AS statements_per_payout,
       round(sum(calls) FILTER (WHERE NOT toplevel)::numeric / :total, 2) AS nested_per_payout
  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'payouts_bench');
SELECT round(calls::numeric / :total, 3) AS per_payout, toplevel AS top, rows AS rows_total,
       round(total_exec_time::numeric, 0) AS ms, round(mean_exec_time::numeric, 2) AS mean_ms, wal_bytes,
       left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS statement
  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'payouts_bench')
  ORDER BY total_exec_time DESC LIMIT 25;
SQL
python3 - "$json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for c in r:
    for run in c['runs']:
        print(f"bench (burst): {run['payouts_per_sec']:.0f} payouts/s, WAL {run.get('wal_bytes_per_payout', float('nan')):.0f} bytes/payout, "
              f"postgres CPU {run['postgres_cpu_secs'] / c['payouts'] * 1e6:.0f} us/payout")
PY

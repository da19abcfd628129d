#!/usr/bin/env bash
# The offline data of the compile-time checked queries (`.sqlx/`): what each
# `sqlx::query!`/`query_as!`/`query_scalar!` statement takes and returns, so a
# build needs no database (`.cargo/config.toml` sets SQLX_OFFLINE=true).
#
#   scripts/sqlx-prepare.sh           rewrite .sqlx/ (after changing a statement or a migration)
#   scripts/sqlx-prepare.sh --check   fail when .sqlx/ is not what the code and migrations give
#   ... -- COMMAND ARGS...            compile with COMMAND (default: cargo check --all-targets --all-features)
#
# How: a fresh database gets every migration (psql, in order, each in one
# transaction as sqlx runs them), then the crate is compiled against it with
# SQLX_OFFLINE=false and SQLX_OFFLINE_DIR set to a scratch directory, where the
# macros save the data of every statement they check (sqlx-macros-core 0.8:
# data is saved only online and only when SQLX_OFFLINE_DIR is set). The same
# files `cargo sqlx prepare` writes, with nothing to install. A statement the
# schema breaks fails this compile; --check then compares the scratch
# directory with .sqlx/, file for file. The test command runs --check with its
# clippy pass as COMMAND, so it costs a database and no extra compile.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=write
if [ "${1:-}" = --check ]; then
  mode=check
  shift
fi
if [ "${1:-}" = -- ]; then shift; fi
cmd=("$@")
[ "${#cmd[@]}" -gt 0 ] || cmd=(cargo check --all-targets --all-features --locked)

say() { printf 'sqlx-prepare: %s\n' "$*" >&2; }
server=${SQLX_PREPARE_SERVER:-postgres://postgres@127.0.0.1:5432}
db="sqlx_prepare_$$_${RANDOM}"
scratch=$(mktemp -d)
cleanup() {
  psql "$server/postgres" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

psql "$server/postgres" -v ON_ERROR_STOP=1 -qAtc "CREATE DATABASE $db" >/dev/null
for m in migrations/*.sql; do
  # sqlx runs a migration in one transaction unless its first line says otherwise.
  if head -n 1 "$m" | grep -q -- '-- no-transaction'; then one=(); else one=(--single-transaction); fi
  psql "$server/$db" -v ON_ERROR_STOP=1 -qX "${one[@]}" -f "$m" >/dev/null ||
    { say "migration $m failed"; exit 1; }
done

# The macros run only when the crate compiles: make it compile (every target
# depends on the library, so they all recompile with it).
touch src/lib.rs
SQLX_OFFLINE=false DATABASE_URL="$server/$db" SQLX_OFFLINE_DIR="$scratch" "${cmd[@]}"

if ! compgen -G "$scratch/query-*.json" >/dev/null; then
  say "no statement was checked: nothing compiled, or COMMAND does not build the crate"
  exit 1
fi
if [ "$mode" = check ]; then
  mkdir -p .sqlx
  if ! diff -r -q .sqlx "$scratch" >/dev/null; then
    say ".sqlx/ is out of date with the statements or the migrations:"
    diff -r -q .sqlx "$scratch" | sed -e "s#$scratch#(fresh)#g" >&2 || true
    say "run scripts/sqlx-prepare.sh and commit .sqlx/"
    exit 1
  fi
  say ".sqlx/ is up to date ($(ls "$scratch" | wc -l) statements)"
else
  rm -rf .sqlx
  mkdir .sqlx
  cp "$scratch"/query-*.json .sqlx/
  say "wrote $(ls .sqlx | wc -l) statements to .sqlx/"
fi

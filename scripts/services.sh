#!/usr/bin/env bash
# Makes sure a local Redis (127.0.0.1:6379) and Postgres (127.0.0.1:5432,
# user postgres, no password) are installed and running. Starts them if they
# are installed, installs them with apt if not (as root), or says exactly what
# to do. Idempotent; safe to run before every command.
set -euo pipefail

say() { printf 'services: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {
  say "installing $* with apt"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null ||
    { say "could not install $*: run 'sudo apt-get install $*' and try again"; exit 1; }
}

# --- Redis -------------------------------------------------------------------
command -v redis-server >/dev/null || apt_install redis-server
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  say "starting redis-server on 127.0.0.1:6379"
  mkdir -p /tmp/payouts-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/payouts-redis --logfile /tmp/payouts-redis/redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 ping >/dev/null || { say "Redis did not start; see /tmp/payouts-redis/redis.log"; exit 1; }

# --- Postgres ----------------------------------------------------------------
command -v psql >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || apt_install postgresql postgresql-client
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! pg_up; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || { say "no Postgres cluster found: run 'sudo pg_createcluster <version> main'"; exit 1; }
  say "starting Postgres $version/main"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
    as_root pg_ctlcluster "$version" main start ||
    { say "could not start Postgres: run 'sudo pg_ctlcluster $version main start'"; exit 1; }
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
fi
pg_up || { say "Postgres is not accepting connections on 127.0.0.1:5432"; exit 1; }
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; then
  # A fresh Debian cluster wants a password on TCP: trust loopback for local development.
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  say "allowing passwordless loopback connections for user postgres in $hba"
  as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba" &&
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload ||
    { say "cannot connect as postgres@127.0.0.1: allow it in $hba (trust) and reload"; exit 1; }
  sleep 0.5
fi
psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null
say "Redis and Postgres are up"

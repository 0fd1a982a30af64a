#!/usr/bin/env bash
# Make sure the services the relay and its tests need are running on this
# machine: PostgreSQL on 127.0.0.1:5432 (user root, database test, trust auth
# from loopback) and Redis on 127.0.0.1:6379. Starts them when stopped,
# installs them from Debian's packages when missing; also installs the tools
# the tests start themselves (pgbouncer, prometheus's promtool and server, and the
# openssl command that makes a TLS test server's certificate, Chromium and
# ChromeDriver for the console's browser tests).
# Needs root for installs.
# Idempotent: on a machine where both already run it only checks.
set -euo pipefail

PG_URL=${OUTBOX_TEST_PG:-postgres://root@127.0.0.1:5432/test}

log() { echo "services: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

apt_install() {
  log "installing $* from Debian's packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # Package scripts may try to start services; in a container without an
  # init they cannot, which is fine: we start them ourselves below.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null || ! command -v psql >/dev/null; then
    apt_install postgresql postgresql-client
  fi
  if ! pg_up; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
      log "no PostgreSQL cluster found; creating one"
      version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
      as_root pg_createcluster "$version" main
    fi
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
    pg_up || { log "PostgreSQL did not start"; return 1; }
  fi
  if ! psql "$PG_URL" -Atqc 'SELECT 1' >/dev/null 2>&1; then
    # A fresh Debian install: no role root, no database test, password auth
    # on TCP. Set it up the way the tests and the default config expect.
    log "preparing role root and database test (trust auth on loopback)"
    local version hba
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    as_root su postgres -c "psql -Atqc \"SELECT 1 FROM pg_roles WHERE rolname = 'root'\" | grep -q 1 || psql -qc 'CREATE ROLE root SUPERUSER LOGIN'"
    as_root su postgres -c "psql -Atqc \"SELECT 1 FROM pg_database WHERE datname = 'test'\" | grep -q 1 || createdb -O root test"
    if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    fi
    psql "$PG_URL" -Atqc 'SELECT 1' >/dev/null || { log "cannot connect to $PG_URL"; return 1; }
  fi
  log "PostgreSQL is up"
}

# `scripts/test` runs two test processes at once; together they peaked at
# 75 sessions (sampled every 2 s) of Debian's default 100. Tests need
# headroom, not a limit a busy moment crosses: on the local Debian cluster
# (the default OUTBOX_TEST_PG) raise it to 300, once, with a restart.
ensure_pg_connections() {
  [ -z "${OUTBOX_TEST_PG:-}" ] || return 0
  local have version
  have=$(psql "$PG_URL" -Atqc 'SHOW max_connections') || return 1
  [ "$have" -lt 300 ] || return 0
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$version" ]; then
    log "PostgreSQL max_connections is $have (300 wanted) and this is not a Debian cluster; leaving it"
    return 0
  fi
  log "raising PostgreSQL max_connections from $have to 300 (a restart)"
  psql "$PG_URL" -qc 'ALTER SYSTEM SET max_connections = 300'
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { log "PostgreSQL did not come back after the restart"; return 1; }
  have=$(psql "$PG_URL" -Atqc 'SHOW max_connections')
  [ "$have" -ge 300 ] || { log "max_connections is still $have after the restart"; return 1; }
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server
  fi
  if ! redis_up; then
    log "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /tmp --logfile /tmp/outbox-relay-redis.log
    for _ in $(seq 1 60); do redis_up && break; sleep 0.25; done
    redis_up || { log "Redis did not start"; return 1; }
  fi
  log "Redis is up"
}

ensure_tools() {
  local missing=()
  command -v pgbouncer >/dev/null || missing+=(pgbouncer)
  # Debian's prometheus package has both promtool and the server
  # (tests/alerts.rs starts one).
  { command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)
  command -v openssl >/dev/null || missing+=(openssl)
  # The console's browser tests drive Debian's Chromium through its
  # ChromeDriver (tests/console/in_a_browser.rs).
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  log "pgbouncer, promtool, openssl, chromium and chromedriver are installed"
}

ensure_postgres
ensure_pg_connections
ensure_redis
ensure_tools

#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the test suite.
#
#   eval "$(.ci/postgres.sh)"        # installs (once), starts, exports CT2I_TEST_POSTGRES_URL
#   .ci/postgres.sh stop             # stops the server started from the same CT2I_PG_DIR
#
# Only the `export ...` line goes to stdout, so `eval` picks up nothing else; progress goes to stderr.
# Runs as root (CI container): the server itself runs as the `postgres` user, which Debian's package creates.
set -euo pipefail

PORT="${CT2I_PG_PORT:-54329}"
DATA_ROOT="${CT2I_PG_DIR:-/tmp/ct2i-postgres}"
DB_NAME="${CT2I_PG_DB:-ct2i_test}"

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

as_postgres() {
  if [ "$(id -un)" = "postgres" ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

BINDIR="$(find_bindir || true)"

if [ "${1:-start}" = "stop" ]; then
  if [ -n "$BINDIR" ] && [ -f "$DATA_ROOT/data/postmaster.pid" ]; then
    as_postgres "$BINDIR/pg_ctl" -D "$DATA_ROOT/data" -m fast -w stop >&2
  fi
  exit 0
fi

if [ -z "$BINDIR" ]; then
  log "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends postgresql >&2
  BINDIR="$(find_bindir)"
fi
[ -x "$BINDIR/initdb" ] || { log "no initdb under $BINDIR"; exit 1; }

mkdir -p "$DATA_ROOT"
chown postgres:postgres "$DATA_ROOT" 2>/dev/null || true
if [ ! -f "$DATA_ROOT/data/PG_VERSION" ]; then
  log "initdb into $DATA_ROOT/data"
  as_postgres "$BINDIR/initdb" -D "$DATA_ROOT/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >&2 \
    || as_postgres "$BINDIR/initdb" -D "$DATA_ROOT/data" -U postgres --auth=trust -E UTF8 >&2
fi

if ! as_postgres "$BINDIR/pg_ctl" -D "$DATA_ROOT/data" status >/dev/null 2>&1; then
  log "starting on 127.0.0.1:$PORT"
  # The socket goes into the data root, so no /var/run/postgresql (absent in slim containers) is needed.
  as_postgres "$BINDIR/pg_ctl" -D "$DATA_ROOT/data" -l "$DATA_ROOT/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA_ROOT -c max_connections=200 -c fsync=off" start >&2
fi

if ! as_postgres "$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
  as_postgres "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB_NAME" >&2
fi

echo "export CT2I_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB_NAME"

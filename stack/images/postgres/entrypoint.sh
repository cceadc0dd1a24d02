#!/bin/sh
# First start of a primary: initdb, the application role and database, a replication role.
# First start of a replica: pg_basebackup from PRIMARY_HOST and follow it.
# SYNC_REPLICATION=on (default) makes the primary wait for the replica on every commit, so a
# failover loses nothing acknowledged; off is the seeded asynchronous configuration.
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (generated per run by the harness)}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD (generated per run by the harness)}"
ROLE=${PG_ROLE:-primary}
APP_USER=${POSTGRES_USER:-qoe}
APP_DB=${POSTGRES_DB:-qoe}

init_primary() {
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -U postgres --encoding=UTF8 --locale=C.UTF-8 --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
  rm -f "$pwfile"
  if [ "${SYNC_REPLICATION:-on}" = on ]; then standby="'replica'"; else standby="''"; fi
  cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
synchronous_standby_names = $standby
synchronous_commit = on
max_connections = 200
shared_buffers = 256MB
fsync = ${PG_FSYNC:-on}
CONF
  cat >>"$PGDATA/pg_hba.conf" <<HBA
host replication replicator all scram-sha-256
host all all all scram-sha-256
HBA
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c synchronous_standby_names=''" -w start >/dev/null
  psql -v ON_ERROR_STOP=1 -q -U postgres <<SQL
CREATE ROLE "$APP_USER" LOGIN PASSWORD '$POSTGRES_PASSWORD';
CREATE DATABASE "$APP_DB" OWNER "$APP_USER";
CREATE ROLE replicator REPLICATION LOGIN PASSWORD '$REPLICATION_PASSWORD';
SQL
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
}

init_replica() {
  : "${PRIMARY_HOST:?set PRIMARY_HOST for a replica}"
  until pg_isready -q -h "$PRIMARY_HOST" -U postgres; do sleep 0.5; done
  PGPASSWORD=$REPLICATION_PASSWORD pg_basebackup -h "$PRIMARY_HOST" -U replicator -D "$PGDATA" \
    -X stream -R -c fast -d "application_name=replica"
  # A promoted replica must not wait for a standby of its own.
  echo "synchronous_standby_names = ''" >>"$PGDATA/postgresql.auto.conf"
  chmod 700 "$PGDATA"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  case "$ROLE" in
    primary) init_primary ;;
    replica) init_replica ;;
    *) echo "PG_ROLE must be primary or replica, got '$ROLE'" >&2; exit 2 ;;
  esac
fi
# SYNC_REPLICATION applies on every start of a node that starts as a primary (not only at
# initdb), so a stack reconfigured between runs really switches modes. A node that starts as a
# standby gets nothing here: if it is promoted, whoever promoted it sets the mode (ALTER SYSTEM).
if [ ! -f "$PGDATA/standby.signal" ]; then
  if [ "${SYNC_REPLICATION:-on}" = on ]; then names=replica; else names=; fi
  exec postgres -D "$PGDATA" -c "synchronous_standby_names=$names"
fi
exec postgres -D "$PGDATA"

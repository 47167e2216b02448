#!/usr/bin/env bash
# Streaming replication by hand, PostgreSQL 15: one primary, one hot standby on this machine.
# Run as the postgres OS user (PostgreSQL refuses to run as root).
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
WORKDIR=${WORKDIR:-$HOME/replication-demo}
PRIMARY_PORT=${PRIMARY_PORT:-5432}
REPLICA_PORT=${REPLICA_PORT:-5433}
REPLICATION_PASSWORD=${REPLICATION_PASSWORD:-change-me}
export PATH="$PGBIN:$PATH"
PRIMARY="$WORKDIR/primary"
REPLICA="$WORKDIR/replica"
mkdir -p "$WORKDIR/archive"

# --- 1. The primary ----------------------------------------------------------------------
# Data checksums let pg_rewind bring a former primary back later (or set wal_log_hints = on).
initdb -D "$PRIMARY" --data-checksums --auth-local=peer --auth-host=scram-sha-256 \
  --no-instructions >/dev/null
cat >>"$PRIMARY/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PRIMARY_PORT
unix_socket_directories = '$WORKDIR'
wal_level = replica              # enough WAL for a standby (the default in 15)
max_wal_senders = 10             # one per standby and per pg_basebackup
max_replication_slots = 10       # one slot per standby keeps the WAL it still needs
wal_keep_size = '128MB'          # extra WAL kept for standbys without a slot
hot_standby = on                 # standbys answer read-only queries
archive_mode = on                # optional: a WAL archive for point-in-time recovery
archive_command = 'test ! -f $WORKDIR/archive/%f && cp %p $WORKDIR/archive/%f'
CONF
# The replication user may connect for replication, with a SCRAM password.
echo "host replication replicator 127.0.0.1/32 scram-sha-256" >>"$PRIMARY/pg_hba.conf"
pg_ctl -D "$PRIMARY" -l "$WORKDIR/primary.log" -w start >/dev/null
psql -h "$WORKDIR" -p "$PRIMARY_PORT" -d postgres -v ON_ERROR_STOP=1 -q \
  -c "CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '$REPLICATION_PASSWORD'"

# The replication password goes in a libpq passfile (0600), never on a command line.
echo "127.0.0.1:$PRIMARY_PORT:replication:replicator:$REPLICATION_PASSWORD" >"$WORKDIR/pgpass"
chmod 600 "$WORKDIR/pgpass"

# --- 2. The replica: a base backup of the primary ------------------------------------------
# -X stream copies the WAL written during the backup; -C -S creates the physical slot
# `replica1` on the primary, so the primary keeps the WAL this standby has not received yet.
PGPASSFILE="$WORKDIR/pgpass" pg_basebackup -h 127.0.0.1 -p "$PRIMARY_PORT" -U replicator \
  -D "$REPLICA" -X stream -c fast -C -S replica1

# --- 3. Recovery configuration: standby.signal + primary_conninfo --------------------------
cat >>"$REPLICA/postgresql.conf" <<CONF
port = $REPLICA_PORT
primary_conninfo = 'host=127.0.0.1 port=$PRIMARY_PORT user=replicator passfile=$WORKDIR/pgpass application_name=replica1'
primary_slot_name = 'replica1'
recovery_target_timeline = 'latest'   # follow a promoted primary's new timeline
CONF
touch "$REPLICA/standby.signal"

# --- 4. Start the replica --------------------------------------------------------------------
pg_ctl -D "$REPLICA" -l "$WORKDIR/replica.log" -w start >/dev/null

# --- 5. Verify: write on the primary, read on the replica ------------------------------------
psql -h "$WORKDIR" -p "$PRIMARY_PORT" -d postgres -v ON_ERROR_STOP=1 -q \
  -c "CREATE TABLE demo (id int PRIMARY KEY, note text)" \
  -c "INSERT INTO demo VALUES (1, 'written on the primary')"
for _ in $(seq 100); do
  seen=$(psql -h "$WORKDIR" -p "$REPLICA_PORT" -d postgres -Atq \
    -c "SELECT note FROM demo WHERE id = 1" 2>/dev/null || true)
  [ "$seen" = "written on the primary" ] && break
  sleep 0.1
done
echo "replica reads: $seen"
[ "$seen" = "written on the primary" ]

# The primary sees the standby streaming; the standby's WAL receiver streams.
psql -h "$WORKDIR" -p "$PRIMARY_PORT" -d postgres -Atq \
  -c "SELECT application_name, state, sync_state FROM pg_stat_replication"
psql -h "$WORKDIR" -p "$REPLICA_PORT" -d postgres -Atq \
  -c "SELECT status, slot_name FROM pg_stat_wal_receiver" | grep -q '^streaming|replica1$'
psql -h "$WORKDIR" -p "$REPLICA_PORT" -d postgres -Atq -c "SELECT pg_is_in_recovery()" | grep -q '^t$'

# --- 6. Stop (replica first) -------------------------------------------------------------------
pg_ctl -D "$REPLICA" -m fast -w stop >/dev/null
pg_ctl -D "$PRIMARY" -m fast -w stop >/dev/null
echo "streaming replication works"

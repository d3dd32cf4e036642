# A throwaway Postgres for the benchmark scripts (sourced, not run): `pg_start` makes one
# on a free port with wal_level=logical and Supabase's roles and helpers, and sets
# `dburl`; `pg_stop` removes it. Without PostgreSQL's server binaries `pg_start` returns 1.
pg_start() {
  pgbin=$(pg_config --bindir 2>/dev/null || true)
  [ -x "$pgbin/initdb" ] || return 1
  pgdir=$(mktemp -d)
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_pg=()
  if [ "$(id -u)" = 0 ]; then chown postgres "$pgdir"; as_pg=(runuser -u postgres --); fi
  "${as_pg[@]}" "$pgbin/initdb" -D "$pgdir/data" -A trust -U postgres > /dev/null
  printf "wal_level = logical\nport = %s\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nfsync = off\nmax_connections = 200\n" \
    "$port" "$pgdir" >> "$pgdir/data/postgresql.conf"
  "${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w start > /dev/null
  dburl="postgresql://postgres@127.0.0.1:$port/postgres"
  "$pgbin/psql" -X -q -v ON_ERROR_STOP=1 "$dburl" -f tests/sql/supabase.sql
}

pg_stop() {
  "${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdir/data" -w stop > /dev/null
  rm -rf "$pgdir"
}

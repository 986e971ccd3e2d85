# Sourced by the bench scripts: the binaries under test and the lab topology.
#
# The topology (switch namespace with bridge br0, server namespace with srv0, client
# namespaces with eth0, per-run names) comes from `fleetboot-lab net up`, the same
# fleetboot_lab::netns::Lab the end-to-end tests use. It lives while this script does:
# when the script exits — normally, on an error, on Ctrl-C, or killed outright — the
# helper stops every process still inside the namespaces and deletes them.

# bench_bins PACKAGE...: builds the release binaries unless they are given, and sets
#   FB (fleetboot, or $FLEETBOOT_BIN), FB_STREAMD (fleetboot-streamd, or
#   $FLEETBOOT_STREAMD_BIN) and FB_LAB (fleetboot-lab, or $FLEETBOOT_LAB_BIN).
bench_bins() {
  local build=() p
  for p in "$@"; do
    case $p in
      fleetboot) [ -n "${FLEETBOOT_BIN:-}" ] || build+=(-p fleetboot) ;;
      fleetboot-streamd) [ -n "${FLEETBOOT_STREAMD_BIN:-}" ] || build+=(-p fleetboot-streamd) ;;
    esac
  done
  [ -n "${FLEETBOOT_LAB_BIN:-}" ] || build+=(-p fleetboot-lab)
  if [ ${#build[@]} -gt 0 ]; then cargo build --release --quiet "${build[@]}"; fi
  FB=${FLEETBOOT_BIN:-$PWD/target/release/fleetboot}
  FB_STREAMD=${FLEETBOOT_STREAMD_BIN:-$PWD/target/release/fleetboot-streamd}
  FB_LAB=${FLEETBOOT_LAB_BIN:-$PWD/target/release/fleetboot-lab}
}

# lab_up DIR ARGS...: `fleetboot-lab net up ARGS` (see `fleetboot-lab --help`), held while
#   this script runs; sets LAB_SWITCH, LAB_SERVER, LAB_CLIENTn, LAB_PORTn, ... from its
#   output (kept in DIR/lab.env). Fails if the topology cannot be built.
lab_up() {
  local dir=$1; shift
  "$FB_LAB" net up --while-alive $$ "$@" >"$dir/lab.env" 2>"$dir/lab.err" &
  LAB_PID=$!
  local _
  for _ in $(seq 300); do
    grep -q '^LAB_READY=1$' "$dir/lab.env" 2>/dev/null && break
    kill -0 "$LAB_PID" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q '^LAB_READY=1$' "$dir/lab.env" 2>/dev/null; then
    echo "fleetboot-lab net up failed:" >&2; cat "$dir/lab.err" >&2
    lab_down; return 1
  fi
  # shellcheck disable=SC1091
  . "$dir/lab.env"
  echo "bench: lab namespaces $LAB_ID-* (removed on exit)" >&2
}

# lab_down: tears the topology down now (idempotent); processes still inside are stopped.
lab_down() {
  [ -n "${LAB_PID:-}" ] || return 0
  kill "$LAB_PID" 2>/dev/null || true
  wait "$LAB_PID" 2>/dev/null || true
  LAB_PID=
}

# Run CLEANUP (a function name) once, on any exit; Ctrl-C and SIGTERM exit through it.
bench_on_exit() {
  trap "$1" EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# The usual end of a bench: stop PID... (the script's own background processes), take the
# lab down and remove the work directory $W.
bench_stop_all() {
  set +e  # a failing kill (a process already gone) must not end the cleanup early
  for p in "$@"; do kill "$p" 2>/dev/null; done
  lab_down
  rm -rf "$W"
}

# A private PostgreSQL for this run: initdb in a temporary directory as the postgres user,
# Unix socket only (no TCP), PostgreSQL's default durability. Sets PGW, PG_BIN, PG_PORT and
# PG_URL (database "fleetboot"); the initdb log goes to LOGDIR. pg_down stops and removes it.
PGW=; PG_BIN=; PG_PORT=; PG_URL=
pg_up() {
  local logdir=$1
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$PG_BIN/initdb" ] || { echo "$(basename "$0"): PostgreSQL missing (scripts/setup.sh)" >&2; exit 1; }
  PGW=$(mktemp -d /tmp/fb-bench-pg.XXXX); chmod 755 "$PGW"; mkdir -p "$PGW/sock"; chown -R postgres: "$PGW"
  PG_PORT=$((20000 + $$ % 20000))  # names the socket file; no TCP (listen_addresses='')
  runuser -u postgres -- "$PG_BIN/initdb" -D "$PGW/data" -U fleetboot -E UTF8 --no-sync \
    --auth-local=trust --auth-host=trust >"$logdir/initdb.log" 2>&1 || { cat "$logdir/initdb.log" >&2; exit 1; }
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGW/data" -l "$PGW/postgres.log" -w -t 60 \
    -o "-k $PGW/sock -p $PG_PORT -c listen_addresses='' -c max_connections=200" start >/dev/null \
    || { cat "$PGW/postgres.log" >&2; exit 1; }
  PG_URL="postgresql://fleetboot@${PGW//\//%2F}%2Fsock:$PG_PORT/fleetboot"
  echo "bench: private PostgreSQL in $PGW (removed on exit)" >&2
}
pg_down() {
  [ -n "$PGW" ] || return 0
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGW/data" -m immediate -w -t 30 stop >/dev/null 2>&1
  rm -rf "$PGW"
  PGW=
}
# psql DB ARGS...: quiet, unaligned, stopping at the first error.
psql_() { local db=$1; shift; PGOPTIONS="-c client_min_messages=warning" psql -h "$PGW/sock" -p "$PG_PORT" -U fleetboot -d "$db" -qAtX -v ON_ERROR_STOP=1 "$@"; }

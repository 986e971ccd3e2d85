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

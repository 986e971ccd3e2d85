#!/usr/bin/env bash
# What the operators' dashboard costs in a boot storm. CLIENTS emulated iPXE clients
# (`fleetboot emulate`, one client namespace, each client its own MAC and leased address)
# boot a small payload (64 KiB kernel, 16 KiB initrd) over HTTP from one `fleetboot serve`,
# twice per run and with the same load: once with nobody watching, once with a viewer
# following `/dashboard/events` (the server-sent events the page's script reads; a Python
# client here, so no browser's CPU competes with the server). The order flips every run.
#
# Reports per storm: clients booted, the server's CPU time (utime + stime from
# /proc/PID/stat, over the storm and the 2 s after it), wall time and its share of one
# core; for the watched storm, how long after a client's latest event its row reached
# the viewer (arrival time minus the row's `last_ms`, the server's time of the event:
# same host, same clock): p50, p99, max, and how many row updates were sent. Then, per
# run, what watching added: CPU with minus CPU without, as a share of one core over the
# watched storm, and the ratio of the two CPU times.
#
# Rows are fed by every trace event whether anybody watches or not: "without a viewer"
# still pays for that bookkeeping; the difference is what serving the page's events costs.
#
# The storm's own CPU varies from storm to storm by more than a viewer costs, so after each
# storm the same server, its board holding the storm's rows, is also measured quiet:
# HOLD_PAIRS pairs of HOLD_SECS windows, one without and one with a viewer connected (the
# order flips every pair), the server's CPU over each. Nothing else runs in the server then,
# so what a viewer costs by itself (its first event with every row, then one tick a second
# scanning the rows, and the panels read every 2 s) stands out of a baseline near zero.
#
# Run as root after scripts/setup.sh. Every run is bounded (emulate --timeout, the viewer
# and the storm under `timeout`) and the lab namespaces go when the script exits.
# usage: scripts/bench-dashboard.sh [CLIENTS=1000] [RUNS=1]
#   BENCH_STORM_SECS (default 240): the emulator's limit per storm;
#   BENCH_HOLD_SECS (default 20, 0: none) and BENCH_HOLD_PAIRS (default 2): the quiet
#   windows after each storm;
#   FLEETBOOT_BIN=PATH benchmarks an already built binary.
set -euo pipefail
CLIENTS=${1:-1000}; RUNS=${2:-1}
STORM_SECS=${BENCH_STORM_SECS:-240}
HOLD_SECS=${BENCH_HOLD_SECS:-20}; HOLD_PAIRS=${BENCH_HOLD_PAIRS:-2}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-dashboard.sh: run as root" >&2; exit 1; }
[ "$CLIENTS" -ge 1 ] && [ "$CLIENTS" -le 3000 ] || { echo "bench-dashboard.sh: CLIENTS must be 1..3000" >&2; exit 1; }
[ "$RUNS" -ge 1 ] && [ "$RUNS" -le 10 ] || { echo "bench-dashboard.sh: RUNS must be 1..10" >&2; exit 1; }
[ "$STORM_SECS" -ge 10 ] && [ "$STORM_SECS" -le 900 ] || { echo "bench-dashboard.sh: BENCH_STORM_SECS must be 10..900" >&2; exit 1; }
[ "$HOLD_SECS" -ge 0 ] && [ "$HOLD_SECS" -le 300 ] || { echo "bench-dashboard.sh: BENCH_HOLD_SECS must be 0..300" >&2; exit 1; }
[ "$HOLD_PAIRS" -ge 1 ] && [ "$HOLD_PAIRS" -le 10 ] || { echo "bench-dashboard.sh: BENCH_HOLD_PAIRS must be 1..10" >&2; exit 1; }
. scripts/bench-common.sh
bench_bins fleetboot
W=$(mktemp -d /tmp/fb-bench-dash.XXXX); mkdir -p "$W/root"
SPID=; VPID=
stop() {  # pid...: stops processes this script started, by pid
  local p
  for p in "$@"; do [ -n "$p" ] && { kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; }; done
  return 0
}
cleanup() {
  set +e
  stop "$VPID" "$SPID"
  lab_down
  rm -rf "$W"
}
bench_on_exit cleanup
head -c 65536 /dev/urandom > "$W/root/vmlinuz"; head -c 16384 /dev/urandom > "$W/root/initrd.gz"
KSHA=$(sha256sum < "$W/root/vmlinuz" | cut -d' ' -f1); ISHA=$(sha256sum < "$W/root/initrd.gz" | cut -d' ' -f1)
# A /20: room for 3,000 clients' leases. The storm namespace's eth0 has no address: the
# emulator adds each client's leased one.
lab_up "$W" --server 10.83.0.1/20 --client none
SRV=$LAB_SERVER; CLI=$LAB_CLIENT0; CLI_IF=$LAB_CLIENT_IF
cat > "$W/fb.toml" <<EOF
data_dir = "$W/state"
[server]
address = "10.83.0.1"
interface = "srv0"
root = "$W/root"
max_clients = 10000
[dhcp]
mode = "server"
authoritative = true
[[dhcp.subnet]]
network = "10.83.0.0/20"
range = ["10.83.1.0", "10.83.15.250"]
router = "10.83.0.1"
lease_time = 3600
[pxe]
transport = "http"
[tftp]
enabled = false
[http]
enabled = true
listen = "10.83.0.1:8080"
[admin]
listen = "127.0.0.1:8081"
dashboard_max_clients = 10000
[[profile]]
name = "storm"
priority = 10
boot = { kind = "linux", kernel = "vmlinuz", initrd = ["initrd.gz"], cmdline = "console=ttyS0" }
EOF
"$FB" check-config --config "$W/fb.toml" >/dev/null

# The viewer: follows the events like the page does, writes what it saw when stopped.
cat > "$W/viewer.py" <<'EOF'
import json, signal, sys, time, urllib.request
token, out, ready = sys.argv[1], sys.argv[2], sys.argv[3]
lat, updates, events = [], 0, 0
def done(*_):
    with open(out, "w") as f:
        json.dump({"lat": lat, "updates": updates, "events": events}, f)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
req = urllib.request.Request("http://127.0.0.1:8081/dashboard/events", headers={"Authorization": "Bearer " + token})
with urllib.request.urlopen(req, timeout=60) as r:
    event = None
    for line in r:
        line = line.decode().rstrip("\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "rows":
            now = time.time() * 1000
            events += 1
            rows = json.loads(line[5:])
            if events == 1:
                open(ready, "w").close()  # connected: the first event carries every row
                continue
            for row in rows:
                updates += 1
                lat.append(now - row["last_ms"])
        elif line == "":
            event = None
done()
EOF

cpu_ticks() { awk '{print $14 + $15}' "/proc/$SPID/stat"; }
wait_for() {  # tries(0.1 s) command...
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" && return 0; sleep 0.1; done
  return 1
}
start_viewer() {  # follows the events until stopped; returns once its first event came
  rm -f "$W/viewer.json" "$W/viewer.ready"
  ip netns exec "$SRV" timeout $((STORM_SECS + HOLD_SECS + 60)) python3 "$W/viewer.py" "$(cat "$W/state/admin.token")" \
    "$W/viewer.json" "$W/viewer.ready" >/dev/null 2>>"$W/viewer.err" & VPID=$!
  wait_for 100 test -e "$W/viewer.ready" || { echo "the viewer did not connect" >&2; cat "$W/viewer.err" >&2; return 1; }
}
# hold STORM: the quiet windows after a storm, appended to $W/hold as
# "storm pair viewer cpu_s wall_s".
hold() {
  local storm=$1 pair order v c0 t0 c1 t1
  [ "$HOLD_SECS" -gt 0 ] || return 0
  for pair in $(seq "$HOLD_PAIRS"); do
    order="0 1"; [ $((pair % 2)) = 0 ] && order="1 0"
    for v in $order; do
      [ "$v" = 1 ] && start_viewer
      c0=$(cpu_ticks); t0=$(date +%s.%N)
      sleep "$HOLD_SECS"
      c1=$(cpu_ticks); t1=$(date +%s.%N)
      if [ "$v" = 1 ]; then kill "$VPID" 2>/dev/null; wait "$VPID" 2>/dev/null || true; VPID=; fi
      echo "$storm $pair $v $(awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) / hz}') \
$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')" >> "$W/hold"
      sleep 1  # the viewer's connection closed before the next window
    done
  done
}
# run_storm WATCHED(0|1) RESULT_FILE: one storm against a fresh server; writes
# "cpu_s wall_s booted [p50 p99 max updates]" to RESULT_FILE.
run_storm() {
  local watched=$1 result=$2
  rm -rf "$W/state" "$W/viewer.json" "$W/viewer.ready"
  ip netns exec "$SRV" env RUST_LOG=warn "$FB" serve --config "$W/fb.toml" >/dev/null 2>>"$W/fb.log" & SPID=$!
  wait_for 200 sh -c "ip netns exec '$SRV' ss -Hltn | grep -q '127.0.0.1:8081 '" || { echo "the server did not start" >&2; tail "$W/fb.log" >&2; return 1; }
  wait_for 50 test -s "$W/state/admin.token" || { echo "no admin token" >&2; return 1; }
  if [ "$watched" = 1 ]; then
    start_viewer || return 1
  fi
  local c0 t0 c1 t1 booted extra=""
  c0=$(cpu_ticks); t0=$(date +%s.%N)
  ip netns exec "$CLI" timeout $((STORM_SECS + 30)) "$FB" emulate --clients "$CLIENTS" --interface "$CLI_IF" \
    --timeout "$STORM_SECS" --json --expect "vmlinuz=$KSHA" --expect "initrd.gz=$ISHA" \
    >"$W/storm.json" 2>"$W/emulate.err" || true
  sleep 2  # the last rows reach the viewer (one tick), in both storms alike
  c1=$(cpu_ticks); t1=$(date +%s.%N)
  booted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["succeeded"])' "$W/storm.json" 2>/dev/null || echo ERR)
  if [ "$watched" = 1 ]; then
    kill "$VPID" 2>/dev/null; wait "$VPID" 2>/dev/null || true; VPID=
    extra=$(python3 -c '
import json, sys
v = json.load(open(sys.argv[1])); l = sorted(v["lat"])
q = lambda p: l[min(len(l) - 1, int(p * len(l)))] if l else 0
print(round(q(0.5)), round(q(0.99)), round(l[-1]) if l else 0, v["updates"])' "$W/viewer.json" 2>/dev/null || echo "ERR ERR ERR ERR")
  fi
  hold "$3"
  stop "$SPID"; SPID=
  echo "$(awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) / hz}') \
$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') $booted $extra" > "$result"
}

pct() { awk -v c="$1" -v w="$2" 'BEGIN {printf "%.1f", 100 * c / w}'; }
echo "Dashboard under a boot storm: $CLIENTS emulated clients (HTTP boot, 64 KiB kernel + 16 KiB initrd),"
echo "$RUNS run(s), each a storm without and one with a viewer of /dashboard/events; load average"
echo "at the start: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores."
echo
echo "| run | viewer | clients booted | server CPU s | wall s | CPU % of one core | event→viewer p50 ms | p99 ms | max ms | row updates sent |"
echo "|---|---|---|---|---|---|---|---|---|---|"
SUMMARY=(); ALL0="0 0"; ALL1="0 0"  # CPU s and wall s summed over the runs
add() { awk -v s="$1" -v c="$2" -v w="$3" 'BEGIN {split(s, a, " "); printf "%.2f %.2f", a[1] + c, a[2] + w}'; }
for run in $(seq "$RUNS"); do
  order="0 1"; [ $((run % 2)) = 0 ] && order="1 0"
  for watched in $order; do
    run_storm "$watched" "$W/r$watched" "$run/$([ "$watched" = 1 ] && echo yes || echo no)"
    echo "run $run watched=$watched: $(cat "$W/r$watched")" >&2
  done
  read -r cpu0 wall0 ok0 < "$W/r0"
  read -r cpu1 wall1 ok1 p50 p99 max upd < "$W/r1"
  echo "| $run | no | $ok0/$CLIENTS | $cpu0 | $wall0 | $(pct "$cpu0" "$wall0") | | | | |"
  echo "| $run | yes | $ok1/$CLIENTS | $cpu1 | $wall1 | $(pct "$cpu1" "$wall1") | $p50 | $p99 | $max | $upd |"
  # Per second of storm, so storms of different lengths compare: CPU-seconds per second.
  extra=$(awk -v c0="$cpu0" -v w0="$wall0" -v c1="$cpu1" -v w1="$wall1" 'BEGIN {printf "%.1f", 100 * (c1 / w1 - c0 / w0)}')
  ratio=$(awk -v c0="$cpu0" -v c1="$cpu1" 'BEGIN {if (c0 > 0) printf "%.2f", c1 / c0; else print "-"}')
  ALL0=$(add "$ALL0" "$cpu0" "$wall0"); ALL1=$(add "$ALL1" "$cpu1" "$wall1")
  SUMMARY+=("run $run: watching added $extra % of one core (CPU with ÷ without a viewer: ${ratio}x); event→viewer p99 $p99 ms")
done
echo
for line in "${SUMMARY[@]}"; do echo "$line"; done
read -r c0 w0 <<<"$ALL0"; read -r c1 w1 <<<"$ALL1"
echo "all runs: $(pct "$c0" "$w0") % of one core without a viewer, $(pct "$c1" "$w1") % with one: watching added \
$(awk -v c0="$c0" -v w0="$w0" -v c1="$c1" -v w1="$w1" 'BEGIN {printf "%.1f", 100 * (c1 / w1 - c0 / w0)}') % of one core"
if [ -s "$W/hold" ]; then
  echo
  echo "Quiet windows after each storm ($HOLD_SECS s each, the board holding the storm's rows): the server's CPU"
  echo "without and with a viewer connected."
  echo
  echo "| after storm (run/viewer) | pair | viewer | server CPU s | wall s | CPU % of one core |"
  echo "|---|---|---|---|---|---|"
  while read -r storm pair v cpu wall; do
    echo "| $storm | $pair | $([ "$v" = 1 ] && echo yes || echo no) | $cpu | $wall | $(awk -v c="$cpu" -v w="$wall" 'BEGIN {printf "%.2f", 100 * c / w}') |"
  done < "$W/hold"
  echo
  awk '{c[$3] += $4; w[$3] += $5; n[$3]++} END {
    printf "quiet windows: %.2f %% of one core without a viewer (%d windows), %.2f %% with one (%d windows): a viewer costs %.2f %% of one core by itself\n",
      100 * c[0] / w[0], n[0], 100 * c[1] / w[1], n[1], 100 * (c[1] / w[1] - c[0] / w[0]) }' "$W/hold"
fi

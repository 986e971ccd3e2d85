#!/usr/bin/env bash
# What the dashboard costs in a boot storm: CLIENTS emulated iPXE clients (`fleetboot
# emulate`, each its own MAC and leased address) boot a small payload over HTTP from one
# `fleetboot serve`, twice in one run: with nobody watching, and with a viewer following
# `/dashboard/events` (the stream the page's script reads). Reports, per storm, the
# server's CPU time (utime + stime from /proc) and its share of one core over the storm,
# and for the watched storm how long after a client's event the viewer had its row
# (arrival time minus the event's server time: same host, same clock): p50, p99, max.
# Run as root after scripts/setup.sh.
# usage: scripts/bench-dashboard.sh [CLIENTS=1000] [RUNS=2]
set -euo pipefail
CLIENTS=${1:-1000}; RUNS=${2:-2}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-dashboard.sh: run as root" >&2; exit 1; }
[ "$CLIENTS" -ge 1 ] && [ "$CLIENTS" -le 3000 ] || { echo "bench-dashboard.sh: CLIENTS must be 1..3000" >&2; exit 1; }
. scripts/bench-common.sh
bench_bins fleetboot
W=$(mktemp -d /tmp/fb-bench-dash.XXXX); mkdir -p "$W/root"
SPID=; VPID=
cleanup() {
  set +e
  for p in $VPID $SPID; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  lab_down
  rm -rf "$W"
}
bench_on_exit cleanup
head -c 65536 /dev/urandom > "$W/root/vmlinuz"; head -c 16384 /dev/urandom > "$W/root/initrd.gz"
KSHA=$(sha256sum < "$W/root/vmlinuz" | cut -d' ' -f1); ISHA=$(sha256sum < "$W/root/initrd.gz" | cut -d' ' -f1)
lab_up "$W" --server 10.83.0.1/20 --client none
SRV=$LAB_SERVER; CLI=$LAB_CLIENT0; CLI_IF=$LAB_CLIENT_IF
cat > "$W/fb.toml" <<EOF
data_dir = "$W/state"
[server]
address = "10.83.0.1"
interface = "srv0"
root = "$W/root"
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
[[profile]]
name = "storm"
priority = 10
boot = { kind = "linux", kernel = "vmlinuz", initrd = ["initrd.gz"], cmdline = "console=ttyS0" }
EOF
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SPID/stat"; }
run_storm() {  # watched(0|1) -> "cpu_s wall_s succeeded [p50 p99 max updates]"
  rm -rf "$W/state"
  ip netns exec "$SRV" env RUST_LOG=warn "$FB" serve --config "$W/fb.toml" 2>>"$W/fb.log" & SPID=$!
  for _ in $(seq 100); do ip netns exec "$SRV" ss -Hltn | grep -q ':8081 ' && break; sleep 0.1; done
  for _ in $(seq 50); do [ -s "$W/state/admin.token" ] && break; sleep 0.1; done
  if [ "$1" = 1 ]; then
    ip netns exec "$SRV" python3 - "$(cat "$W/state/admin.token")" "$W/viewer.json" <<'EOF' & VPID=$!
import json, sys, time, urllib.request, signal
token, out = sys.argv[1], sys.argv[2]
lat, updates = [], 0
def done(*_):
    json.dump({"lat": lat, "updates": updates}, open(out, "w")); sys.exit(0)
signal.signal(signal.SIGTERM, done)
req = urllib.request.Request("http://127.0.0.1:8081/dashboard/events", headers={"Authorization": "Bearer " + token})
with urllib.request.urlopen(req) as r:
    event = None
    for line in r:
        line = line.decode().rstrip("\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "rows":
            now = time.time() * 1000
            for row in json.loads(line[5:]):
                updates += 1
                lat.append(now - row["last_ms"])
        elif line == "":
            event = None
EOF
    sleep 0.5
  fi
  local c0 t0 c1 t1 ok
  c0=$(cpu_ticks); t0=$(date +%s.%N)
  ip netns exec "$CLI" timeout 600 "$FB" emulate --clients "$CLIENTS" --interface "$CLI_IF" --timeout 500 \
    --json --expect "vmlinuz=$KSHA" --expect "initrd.gz=$ISHA" >"$W/storm.json" 2>"$W/emulate.err" || true
  sleep 2  # the last updates reach the viewer (one tick)
  c1=$(cpu_ticks); t1=$(date +%s.%N)
  ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["succeeded"])' "$W/storm.json" 2>/dev/null || echo ERR)
  local extra=""
  if [ "$1" = 1 ]; then
    kill "$VPID"; wait "$VPID" 2>/dev/null || true; VPID=
    extra=$(python3 -c '
import json, sys
v = json.load(open(sys.argv[1])); l = sorted(v["lat"])
q = lambda p: l[min(len(l) - 1, int(p * len(l)))] if l else 0
print(round(q(0.5)), round(q(0.99)), round(l[-1]) if l else 0, v["updates"])' "$W/viewer.json")
  fi
  kill "$SPID"; wait "$SPID" 2>/dev/null || true; SPID=
  local hz; hz=$(getconf CLK_TCK)
  echo "$(echo "scale=2; ($c1 - $c0) / $hz" | bc) $(echo "scale=2; $t1 - $t0" | bc) $ok $extra"
}
echo "| run | viewer | clients ok | server CPU s | wall s | CPU % of one core | event→viewer p50 ms | p99 ms | max ms | row updates sent |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for run in $(seq "$RUNS"); do
  for watched in 0 1; do
    read -r cpu wall ok p50 p99 max upd <<<"$(run_storm $watched)"
    pct=$(echo "scale=1; 100 * $cpu / $wall" | bc)
    if [ "$watched" = 1 ]; then
      echo "| $run | yes | $ok/$CLIENTS | $cpu | $wall | $pct | $p50 | $p99 | $max | $upd |"
    else
      echo "| $run | no | $ok/$CLIENTS | $cpu | $wall | $pct | | | | |"
    fi
  done
done

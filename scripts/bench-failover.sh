#!/usr/bin/env bash
# DHCP failover time, side by side: a Kea 2.2 HA hot-standby pair against two fleetboot
# servers sharing one PostgreSQL store, under the same load, each with its defaults and
# with a tuned (aggressive) failure detection.
#
# Topology (fleetboot-lab): a bridge with three namespaces: the clients (perfdhcp,
# 10.79.0.2), server "a" (10.79.0.1) and server "b" (10.79.0.3). For every cell, fresh
# servers start in "a" and "b", perfdhcp sends a steady stream of new clients (full DORA,
# RATE per second, a reply later than 1 s is a drop) for the cell's duration, tcpdump
# records the clients' side of the wire, and KILL_AT seconds in, "a" is SIGKILLed:
#   - kea-*: kea-dhcp4 2.2 with libdhcp_ha.so in hot-standby mode, "a" primary (server1),
#     "b" standby (server2), each with its own memfile lease file (Kea's usual HA setup);
#     the lease updates and heartbeats go over the dhcp4 process's own HTTP listener
#     (HA multi-threading, `http-dedicated-listener`), so no kea-ctrl-agent is needed.
#     The standby answers nobody until it declares the primary down, so every client is
#     the dead server's.
#   - fleetboot-*: two `fleetboot serve` on one private PostgreSQL (docs/store.md,
#     "Several servers on one database"): each answers the clients its MAC hashes to; the
#     dead server's clients are those whose owner among {a, b} was "a"
#     (`fleetboot::serve::cluster::owner`, recomputed here).
# Measured from the capture: the time from the SIGKILL to the survivor's first ACK to a
# client the dead server would have served (the kill's time and the capture's are both the
# host's clock); how many DISCOVERs sent after the kill got no OFFER and how many REQUESTs
# no ACK, ever (the capture outlives perfdhcp by 1.5 s); how many sent before it were left
# in flight (REQUESTs naming the dead server); and, as a check of the hash, ACKs the
# survivor sent before the kill to the dead server's clients (should be 0).
#
# The settings (CELL names):
#   kea-default   Kea's documented defaults: heartbeat-delay 10000, max-response-delay
#                 60000, max-ack-delay 10000 ms, max-unacked-clients 10. Once the primary
#                 has been silent for max-response-delay, the standby also waits until it
#                 has seen more than 10 clients whose `secs` field exceeds max-ack-delay
#                 (clients retrying for 10 s); perfdhcp's clients are all new (secs 0), so
#                 under this load it never takes over: the cell shows "never".
#   kea-default-mu0  the same with max-unacked-clients 0 (no client check: partner-down as
#                 soon as max-response-delay has passed). Real clients retrying since the
#                 kill pass the client check at once by then, so this is what the defaults
#                 give with real clients.
#   kea-tuned     heartbeat-delay 500, max-response-delay 2000, max-ack-delay 1000,
#                 max-unacked-clients 0 (take over as soon as the primary is silent 2 s).
#   fleetboot-default  `[store]` heartbeat_ms 1000, peer_timeout_ms 3000 (the defaults).
#   fleetboot-tuned    heartbeat_ms 500, peer_timeout_ms 2000.
#
# Run as root after scripts/setup.sh. Bounded: every cell lasts KILL_AT + twice its
# detection bound + 6 s of load (kea-default*: 76 s after the kill), every wait is bounded; the namespaces, the processes (by pid) and the PostgreSQL cluster
# are removed on exit.
# usage: scripts/bench-failover.sh [RUNS=2] [RATE=200] [KILL_AT=3]
#   BENCH_CELLS="fleetboot-tuned kea-tuned" chooses the cells (default: all five).
#   FLEETBOOT_BIN=PATH benchmarks an already built binary. BENCH_KEEP=DIR keeps the
#   captures and logs there.
set -euo pipefail
RUNS=${1:-2}; RATE=${2:-200}; KILL_AT=${3:-3}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-failover.sh: run as root" >&2; exit 1; }
for t in perfdhcp kea-dhcp4 tcpdump python3; do
  command -v $t >/dev/null || [ -x /usr/sbin/$t ] || { echo "bench-failover.sh: $t missing (scripts/setup.sh)" >&2; exit 1; }
done
HOOKS=/usr/lib/x86_64-linux-gnu/kea/hooks
for h in libdhcp_ha.so libdhcp_lease_cmds.so; do
  [ -f "$HOOKS/$h" ] || { echo "bench-failover.sh: $HOOKS/$h missing (kea-dhcp4-server)" >&2; exit 1; }
done
[ "$RATE" -ge 10 ] && [ "$RATE" -le 2000 ] || { echo "bench-failover.sh: RATE must be 10..2000" >&2; exit 1; }
[ "$KILL_AT" -ge 1 ] && [ "$KILL_AT" -le 30 ] || { echo "bench-failover.sh: KILL_AT must be 1..30" >&2; exit 1; }
[ "$RUNS" -ge 1 ] && [ "$RUNS" -le 10 ] || { echo "bench-failover.sh: RUNS must be 1..10" >&2; exit 1; }
read -ra CELLS <<< "${BENCH_CELLS:-fleetboot-default fleetboot-tuned kea-default kea-default-mu0 kea-tuned}"
. scripts/bench-common.sh
bench_bins fleetboot
W=$(mktemp -d /tmp/fb-bench-failover.XXXX)
SPID=; CAP_PID=
cleanup() {
  set +e  # a failing kill (the process already gone) must not end the cleanup early
  for p in $SPID $CAP_PID; do kill "$p" 2>/dev/null; done
  lab_down
  pg_down
  if [ -n "${BENCH_KEEP:-}" ]; then mkdir -p "$BENCH_KEEP" && cp -r "$W"/. "$BENCH_KEEP"/; fi
  rm -rf "$W"
}
bench_on_exit cleanup
# A /16 pool (10.79.1.0 - 10.79.200.255) holds every client of the longest cell.
lab_up "$W" --server 10.79.0.1/16 --client 10.79.0.2/16 --client 10.79.0.3/16
NS_A=$LAB_SERVER; IF_A=srv0; NS_B=$LAB_CLIENT1; IF_B=$LAB_CLIENT_IF
CLI=$LAB_CLIENT0; CLI_IF=$LAB_CLIENT_IF
IP_A=10.79.0.1; IP_B=10.79.0.3

# The private PostgreSQL for fleetboot.
pg_up "$W"

# fleetboot "a" and "b": HEARTBEAT_MS PEER_TIMEOUT_MS (empty: the defaults).
fleetboot_configs() {
  local name ip ifc
  mkdir -p "$W/root"
  for name in a b; do
    if [ $name = a ]; then ip=$IP_A; ifc=$IF_A; else ip=$IP_B; ifc=$IF_B; fi
    cat > "$W/fb-$name.toml" <<EOF
data_dir = "$W/state-$name"
[server]
address = "$ip"
interface = "$ifc"
root = "$W/root"
[dhcp]
mode = "server"
authoritative = true
[[dhcp.subnet]]
network = "10.79.0.0/16"
range = ["10.79.1.0", "10.79.200.255"]
router = "10.79.0.1"
lease_time = 3600
[tftp]
enabled = false
[http]
enabled = true
listen = "$ip:8080"
[store]
url = "$PG_URL"
name = "$name"
EOF
    if [ -n "$1" ]; then printf 'heartbeat_ms = %s\npeer_timeout_ms = %s\n' "$1" "$2" >> "$W/fb-$name.toml"; fi
  done
}
# Kea server1 (primary, in "a") and server2 (standby, in "b"): HEARTBEAT MAX_RESPONSE
# MAX_ACK MAX_UNACKED.
kea_configs() {
  local name ifc n
  for n in 1 2; do
    if [ $n = 1 ]; then ifc=$IF_A; else ifc=$IF_B; fi
    name=server$n
    mkdir -p "$W/kea$n"
    cat > "$W/kea$n.json" <<EOF
{ "Dhcp4": {
    "interfaces-config": { "interfaces": [ "$ifc" ] },
    "lease-database": { "type": "memfile", "persist": true, "lfc-interval": 0,
                        "name": "$W/kea$n/leases4.csv" },
    "multi-threading": { "enable-multi-threading": true, "thread-pool-size": 2, "packet-queue-size": 64 },
    "valid-lifetime": 3600,
    "hooks-libraries": [
      { "library": "$HOOKS/libdhcp_lease_cmds.so" },
      { "library": "$HOOKS/libdhcp_ha.so",
        "parameters": { "high-availability": [ {
          "this-server-name": "$name",
          "mode": "hot-standby",
          "heartbeat-delay": $1,
          "max-response-delay": $2,
          "max-ack-delay": $3,
          "max-unacked-clients": $4,
          "multi-threading": { "enable-multi-threading": true, "http-dedicated-listener": true,
                               "http-listener-threads": 2, "http-client-threads": 2 },
          "peers": [
            { "name": "server1", "url": "http://$IP_A:8001/", "role": "primary", "auto-failover": true },
            { "name": "server2", "url": "http://$IP_B:8001/", "role": "standby", "auto-failover": true } ]
        } ] } } ],
    "subnet4": [ { "id": 1, "subnet": "10.79.0.0/16",
                   "pools": [ { "pool": "10.79.1.0 - 10.79.200.255" } ],
                   "option-data": [ { "name": "routers", "data": "10.79.0.1" } ] } ],
    "loggers": [ { "name": "kea-dhcp4", "severity": "WARN",
                   "output_options": [ { "output": "$W/kea$n/kea.log" } ] },
                 { "name": "kea-dhcp4.ha-hooks", "severity": "INFO",
                   "output_options": [ { "output": "$W/kea$n/kea.log" } ] } ] } }
EOF
  done
}
# Until both fleetboot servers answer on port 67 and list each other as live.
wait_fleetboot_pair() {
  for _ in $(seq 200); do
    if ip netns exec "$NS_B" ss -Hlun | grep -q ':67 ' && ip netns exec "$NS_A" ss -Hlun | grep -q ':67 ' \
       && grep -q 'live=a,b' "$W/fb-a.log" && grep -q 'live=a,b' "$W/fb-b.log"; then return 0; fi
    sleep 0.1
  done
  echo "fleetboot: the servers never saw each other" >&2; tail -5 "$W/fb-a.log" "$W/fb-b.log" >&2; return 1
}
# Until both Kea servers are in the hot-standby state (the primary serving, the standby
# receiving its lease updates). Kea's first heartbeats come heartbeat-delay apart.
wait_kea_pair() {
  for _ in $(seq 900); do
    if grep -q 'to HOT-STANDBY state' "$W/kea1/kea.log" 2>/dev/null \
       && grep -q 'to HOT-STANDBY state' "$W/kea2/kea.log" 2>/dev/null; then sleep 0.5; return 0; fi
    sleep 0.1
  done
  echo "kea: the HA pair never reached hot-standby" >&2; tail -8 "$W/kea1/kea.log" "$W/kea2/kea.log" >&2; return 1
}
# Starts the pair of CELL; PID_A is the server that will be killed.
start_pair() {
  rm -rf "$W/state-a" "$W/state-b" "$W/kea1" "$W/kea2"; : > "$W/fb-a.log"; : > "$W/fb-b.log"
  case $1 in
    fleetboot-*)
      psql_ postgres -c "DROP DATABASE IF EXISTS fleetboot WITH (FORCE)" -c "CREATE DATABASE fleetboot" >/dev/null
      if [ "$1" = fleetboot-tuned ]; then fleetboot_configs 500 2000; else fleetboot_configs "" ""; fi
      ip netns exec "$NS_A" env NO_COLOR=1 RUST_LOG=warn,fleetboot::serve::cluster=info "$FB" serve --config "$W/fb-a.toml" 2>>"$W/fb-a.log" & PID_A=$!
      # "b" starts once "a" has migrated the new database.
      for _ in $(seq 100); do grep -q 'live=a' "$W/fb-a.log" && break; sleep 0.1; done
      ip netns exec "$NS_B" env NO_COLOR=1 RUST_LOG=warn,fleetboot::serve::cluster=info "$FB" serve --config "$W/fb-b.toml" 2>>"$W/fb-b.log" & PID_B=$!
      SPID="$PID_A $PID_B"
      wait_fleetboot_pair ;;
    kea-*)
      case $1 in
        kea-tuned) kea_configs 500 2000 1000 0 ;;
        kea-default) kea_configs 10000 60000 10000 10 ;;
        kea-default-mu0) kea_configs 10000 60000 10000 0 ;;
        *) echo "unknown cell $1" >&2; return 1 ;;
      esac
      ip netns exec "$NS_A" env KEA_PIDFILE_DIR="$W/kea1" KEA_LOCKFILE_DIR="$W/kea1" \
        kea-dhcp4 -c "$W/kea1.json" >>"$W/kea1/stdout.log" 2>&1 & PID_A=$!
      ip netns exec "$NS_B" env KEA_PIDFILE_DIR="$W/kea2" KEA_LOCKFILE_DIR="$W/kea2" \
        kea-dhcp4 -c "$W/kea2.json" >>"$W/kea2/stdout.log" 2>&1 & PID_B=$!
      SPID="$PID_A $PID_B"
      wait_kea_pair ;;
  esac
}
stop_pair() { local p; for p in $SPID; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done; SPID=; }
# Seconds of load after the kill: twice the cell's detection bound, plus 6.
after_kill() {
  case $1 in
    fleetboot-default) echo $(( 2 * 4 + 6 )) ;;  # peer_timeout 3 s + a heartbeat
    fleetboot-tuned) echo $(( 2 * 3 + 6 )) ;;    # 2 s + 0.5 s
    kea-default*) echo $(( 70 + 6 )) ;;           # max-response-delay 60 s + a heartbeat 10 s
    kea-tuned) echo $(( 2 * 3 + 6 )) ;;          # 2 s + 0.5 s
    *) echo 10 ;;
  esac
}

# Reads a capture: prints "recovery_ms unanswered_discovers_after unanswered_requests_after
# in_flight_at_kill acks_after_by_survivor survivor_acks_to_dead_clients_before
# dead_server_acks_before" (messages "after" = sent after the kill).
analyse() {
  python3 - "$@" <<'PY'
import struct, sys
pcap, kill_at, survivor, dead_ip, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
M = (1 << 64) - 1
def score(server, mac):  # fleetboot::serve::cluster::score
    h = 0xcbf29ce484222325
    for b in server.encode() + b"\0" + mac:
        h ^= b; h = (h * 0x100000001b3) & M
    h ^= h >> 33; h = (h * 0xff51afd7ed558ccd) & M; h ^= h >> 33
    return h
def dead_owns(mac):  # owner among {a, b} is "a" (the killed one)
    if mode == "kea": return True
    return max(("a", "b"), key=lambda s: (score(s, mac), s)) == "a"
data = open(pcap, "rb").read()
magic = struct.unpack("<I", data[:4])[0]
scale = 1e-9 if magic == 0xa1b23c4d else 1e-6
off, pkts = 24, []
while off + 16 <= len(data):
    ts, frac, incl, _ = struct.unpack("<IIII", data[off:off + 16]); off += 16
    f = data[off:off + incl]; off += incl
    if len(f) < 14 + 20 + 8 + 240 or f[12:14] != b"\x08\x00": continue
    ihl = (f[14] & 15) * 4; u = 14 + ihl; b = f[u + 8:]
    if len(b) < 240 or b[236:240] != b"\x63\x82\x53\x63": continue
    src = ".".join(str(x) for x in f[26:30])
    xid, mac = b[4:8], bytes(b[28:34])
    i, mtype = 240, None
    while i < len(b) and b[i] != 255:
        if b[i] == 0: i += 1; continue
        if i + 1 >= len(b): break
        if b[i] == 53 and b[i + 1] >= 1: mtype = b[i + 2]
        i += 2 + b[i + 1]
    if mtype: pkts.append((ts + frac * scale, mtype, src, xid, mac))
offered = {p[3] for p in pkts if p[1] == 2}
acked = {p[3] for p in pkts if p[1] in (5, 6)}
un_d_after = sum(1 for p in pkts if p[1] == 1 and p[0] >= kill_at and p[3] not in offered)
un_r_after = sum(1 for p in pkts if p[1] == 3 and p[0] >= kill_at and p[3] not in acked)
un_before = sum(1 for p in pkts if p[1] in (1, 3) and p[0] < kill_at and p[3] not in (offered if p[1] == 1 else acked))
acks = [p for p in pkts if p[1] == 5]
taken = [p[0] for p in acks if p[0] >= kill_at and p[2] == survivor and dead_owns(p[4])]
early = sum(1 for p in acks if p[0] < kill_at and p[2] == survivor and dead_owns(p[4]))
dead_before = sum(1 for p in acks if p[0] < kill_at and p[2] == dead_ip)
after = sum(1 for p in acks if p[0] >= kill_at and p[2] == survivor)
rec = "%.0f" % ((min(taken) - kill_at) * 1000) if taken else "never"
print(rec, un_d_after, un_r_after, un_before, after, early, dead_before)
PY
}

declare -A R
for run in $(seq "$RUNS"); do
  for c in "${CELLS[@]}"; do
    start_pair "$c"
    secs=$((KILL_AT + $(after_kill "$c")))
    rm -f "$W/cap.pcap"
    ip netns exec "$CLI" tcpdump -i "$CLI_IF" -n -s 400 -U -w "$W/cap.pcap" 'udp port 67 or udp port 68' 2>"$W/tcpdump.err" & CAP_PID=$!
    for _ in $(seq 50); do grep -q listening "$W/tcpdump.err" && break; sleep 0.1; done
    ip netns exec "$CLI" timeout $((secs + 30)) perfdhcp -4 -l "$CLI_IF" -r "$RATE" -p "$secs" -R 1000000 \
      -W 1000000 >"$W/perf.out" 2>&1 & PERF=$!
    sleep "$KILL_AT"
    kill -0 "$PID_A" 2>/dev/null || echo "$c: server a died before the kill" >&2
    killed=$(date +%s.%N); kill -KILL "$PID_A"; wait "$PID_A" 2>/dev/null || true
    SPID=$PID_B
    wait "$PERF" || true
    sleep 1.5  # the last replies
    kill "$CAP_PID"; wait "$CAP_PID" 2>/dev/null || true; CAP_PID=
    kill -0 "$PID_B" 2>/dev/null || echo "$c: the survivor died" >&2
    mode=fleetboot; [[ $c = kea-* ]] && mode=kea
    R[$run,$c]=$(analyse "$W/cap.pcap" "$killed" "$IP_B" "$IP_A" $mode)
    pd=$(awk '/^drops:/ {s = s $2 " "} END {print s}' "$W/perf.out")
    read -r rec ud ur uf sa early da <<< "${R[$run,$c]}"
    echo "run=$run $c: kill -> survivor's first ACK to a dead server's client: $rec ms; sent after the kill and unanswered: $ud DISCOVER, $ur REQUEST; in flight at the kill: $uf; ACKs before the kill: dead server $da, survivor to the dead one's clients $early (0 expected); survivor's ACKs after: $sa; perfdhcp drops DO RA: $pd" >&2
    if [[ $c = kea-* ]]; then grep -h 'HA_STATE_TRANSITION\|PARTNER_DOWN\|COMMUNICATION_INTERRUPTED' "$W/kea2/kea.log" | tail -3 >&2 || true; fi
    if [ -n "${BENCH_KEEP:-}" ]; then
      mkdir -p "$W/keep"; cp "$W/cap.pcap" "$W/keep/$c-run$run.pcap"; cp "$W/perf.out" "$W/keep/$c-run$run.perf"
      cat "$W"/kea?/kea.log "$W"/fb-?.log > "$W/keep/$c-run$run.log" 2>/dev/null || true
    fi
    stop_pair
  done
done

median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "-"; exit} print a[int((NR+1)/2)] }'; }
echo "DHCP failover: perfdhcp -r $RATE (new clients, DORA, 1 s drop), server a SIGKILLed ${KILL_AT}s in; $RUNS run(s)"
echo
echo "| setting | kill -> survivor's first ACK to a dead server's client (ms), per run | unanswered after the kill: DISCOVER + REQUEST, per run |"
echo "|---|---|---|"
declare -A MED
for c in "${CELLS[@]}"; do
  recs=(); un=()
  for run in $(seq "$RUNS"); do
    read -r rec ud ur _ <<< "${R[$run,$c]}"
    recs+=("$rec"); un+=("$ud+$ur")
  done
  MED[$c]=$(printf '%s\n' "${recs[@]}" | { grep -E '^[0-9]+$' || true; } | median)
  echo "| $c | ${recs[*]} (median ${MED[$c]}) | ${un[*]} |"
done
echo
ratio() { [[ ${1:-} =~ ^[0-9]+$ && ${2:-} =~ ^[0-9]+$ ]] && echo "scale=2; $1 / $2" | bc | sed 's/^\./0./' || echo "-"; }
for p in default:default default-mu0:default tuned:tuned; do
  k=kea-${p%%:*}; f=fleetboot-${p##*:}
  [ -n "${MED[$k]:-}" ] && [ -n "${MED[$f]:-}" ] && echo "$k ÷ $f (median failover): $(ratio "${MED[$k]}" "${MED[$f]}")"
done
exit 0

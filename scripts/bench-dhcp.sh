#!/usr/bin/env bash
# DHCP throughput, side by side in one run: perfdhcp (from kea-admin) in a client namespace
# runs DORA exchanges at increasing rates against fleetboot (durable leases: SQLite WAL,
# synchronous=FULL, an ACK only after its lease is on disk), dnsmasq and kea-dhcp4 (memfile
# lease file), each in a server namespace across a bridge. Every cell is one bounded
# perfdhcp run against a server started afresh with an empty lease store; the servers take
# turns at each rate, and the whole sweep repeats RUNS times. Prints a markdown table (per
# rate and server: runs with 0 drops, median drops and median average delays) and per
# server the highest rate with 0 drops in every run.
# Run as root after scripts/setup.sh (it installs kea-dhcp4-server without starting it).
# usage: scripts/bench-dhcp.sh [SECONDS=4] [RATES="100 250 500 1000 2000 4000"] [CLIENTS=10000] [RUNS=1]
#   FLEETBOOT_BIN=PATH benchmarks an already built binary.
#   BENCH_SERVERS="fleetboot kea kea-mt" chooses the servers (default: fleetboot dnsmasq
#   kea); kea-mt is kea-dhcp4 with multi-threading on (2 threads; off by default in 2.2).
#   Leases in PostgreSQL: fleetboot-pg (one fleetboot with `[store] url`), fleetboot-pg2
#   (two fleetboot sharing the pool, each in its namespace on the bridge: perfdhcp's
#   broadcasts reach both), kea-pg / kea-pg-mt (kea-dhcp4's postgresql lease backend,
#   1 thread / 2 threads). For those the script runs a private PostgreSQL (initdb in a
#   temporary directory as the postgres user, Unix socket only, PostgreSQL's default
#   durability: fsync and synchronous_commit on), stopped and removed on exit; every cell
#   starts from an empty lease table (fleetboot: a new database, migrated at start; Kea:
#   its lease tables emptied).
#   BENCH_PROFILE=DIR records each fleetboot cell with perf (DIR/fleetboot-RATE-runN.data).
set -euo pipefail
SECS=${1:-4}; RATES=${2:-100 250 500 1000 2000 4000}; CLIENTS=${3:-10000}; RUNS=${4:-1}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-dhcp.sh: run as root" >&2; exit 1; }
for t in perfdhcp kea-dhcp4 dnsmasq; do
  command -v $t >/dev/null || [ -x /usr/sbin/$t ] || { echo "bench-dhcp.sh: $t missing (scripts/setup.sh)" >&2; exit 1; }
done
[ "$SECS" -ge 1 ] && [ "$SECS" -le 30 ] || { echo "bench-dhcp.sh: SECONDS must be 1..30" >&2; exit 1; }
. scripts/bench-common.sh
bench_bins fleetboot
W=$(mktemp -d /tmp/fb-bench-dhcp.XXXX)
SPID=
cleanup() {
  set +e  # a failing kill (the server already gone) must not end the cleanup early
  for p in $SPID; do kill "$p" 2>/dev/null; done
  lab_down
  pg_down
  rm -rf "$W"
}
bench_on_exit cleanup
# A /16 so the pool (10.79.1.0 - 10.79.200.255, 51200 addresses) holds every client;
# perfdhcp runs from 10.79.0.2 in the client namespace.
# fleetboot-pg2's second server is 10.79.0.3, in a namespace of its own on the bridge.
lab_up "$W" --server 10.79.0.1/16 --client 10.79.0.2/16 --client 10.79.0.3/16
SRV=$LAB_SERVER; CLI=$LAB_CLIENT0; CLI_IF=$LAB_CLIENT_IF; SRV_B=$LAB_CLIENT1
read -ra SERVERS <<< "${BENCH_SERVERS:-fleetboot dnsmasq kea}"

# The private PostgreSQL, if a server keeps its leases there.
if [[ " ${SERVERS[*]} " =~ -pg ]]; then
  pg_up "$W"
  psql_ postgres -c "CREATE DATABASE kea" >/dev/null
  psql_ kea -f /usr/share/kea/scripts/pgsql/dhcpdb_create.pgsql >"$W/kea-schema.log" 2>&1 \
    || { tail "$W/kea-schema.log" >&2; exit 1; }
fi

mkdir -p "$W/root"
cat > "$W/fb.toml" <<EOF
data_dir = "$W/state"
[server]
address = "10.79.0.1"
interface = "srv0"
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
listen = "10.79.0.1:8080"
EOF
# The same server on PostgreSQL: "a" alone (fleetboot-pg), or "a" and "b" sharing the pool.
{ cat "$W/fb.toml"; printf '[store]\nurl = "%s"\nname = "a"\n' "$PG_URL"; } > "$W/fb-a.toml"
sed -e 's/^address = "10.79.0.1"/address = "10.79.0.3"/' -e 's/^interface = "srv0"/interface = "eth0"/' \
    -e 's/10.79.0.1:8080/10.79.0.3:8080/' -e 's/^name = "a"/name = "b"/' -e "s#$W/state#$W/state-b#" \
    "$W/fb-a.toml" > "$W/fb-b.toml"
for mt in false true; do
cat > "$W/kea-$mt.json" <<EOF
{ "Dhcp4": {
    "interfaces-config": { "interfaces": [ "srv0" ] },
    "lease-database": { "type": "memfile", "persist": true, "lfc-interval": 0,
                        "name": "$W/kea/leases4.csv" },
    "multi-threading": { "enable-multi-threading": $mt, "thread-pool-size": 2, "packet-queue-size": 64 },
    "valid-lifetime": 3600,
    "subnet4": [ { "id": 1, "subnet": "10.79.0.0/16",
                   "pools": [ { "pool": "10.79.1.0 - 10.79.200.255" } ],
                   "option-data": [ { "name": "routers", "data": "10.79.0.1" } ] } ],
    "loggers": [ { "name": "kea-dhcp4", "severity": "WARN",
                   "output_options": [ { "output": "$W/kea/kea.log" } ] } ] } }
EOF
sed -e 's#"type": "memfile", "persist": true, "lfc-interval": 0,#"type": "postgresql", "name": "kea", "user": "fleetboot",#' \
    -e "s#\"name\": \"$W/kea/leases4.csv\"#\"host\": \"$PGW/sock\", \"port\": ${PG_PORT:-0}#" \
    "$W/kea-$mt.json" > "$W/kea-pg-$mt.json"
done
# A fresh, empty lease store for a server on PostgreSQL.
pg_reset() {
  case $1 in
    fleetboot-pg*) psql_ postgres -c "DROP DATABASE IF EXISTS fleetboot WITH (FORCE)" -c "CREATE DATABASE fleetboot" >/dev/null ;;
    kea-pg*) psql_ kea -c "TRUNCATE lease4, lease4_stat" >/dev/null ;;
  esac
}
# Until both fleetboot-pg2 servers answer on port 67 and list each other as live (each logs
# its live set).
wait_pair() {
  for _ in $(seq 150); do
    if ip netns exec "$SRV_B" ss -Hlun | grep -q ':67 ' && grep -q 'live=a,b' "$W/fb.log" \
       && grep -q 'live=a,b' "$W/fb-b.log"; then return 0; fi
    sleep 0.1
  done
  echo "fleetboot-pg2: the servers never saw each other" >&2; tail -5 "$W/fb.log" "$W/fb-b.log" >&2; return 1
}
start_server() {
  rm -rf "$W/state" "$W/state-b" "$W/kea" "$W/dnsmasq.leases"; mkdir -p "$W/kea"; : > "$W/fb.log"; : > "$W/fb-b.log"
  pg_reset "$1"
  case $1 in
    fleetboot) ip netns exec "$SRV" env RUST_LOG=warn "$FB" serve --config "$W/fb.toml" 2>>"$W/fb.log" & SPID=$! ;;
    fleetboot-pg) ip netns exec "$SRV" env RUST_LOG=warn "$FB" serve --config "$W/fb-a.toml" 2>>"$W/fb.log" & SPID=$! ;;
    fleetboot-pg2)
      ip netns exec "$SRV" env NO_COLOR=1 RUST_LOG=warn,fleetboot::serve::cluster=info "$FB" serve --config "$W/fb-a.toml" 2>>"$W/fb.log" & SPID=$!
      ip netns exec "$SRV_B" env NO_COLOR=1 RUST_LOG=warn,fleetboot::serve::cluster=info "$FB" serve --config "$W/fb-b.toml" 2>>"$W/fb-b.log" & SPID="$SPID $!"
      wait_pair || return 1 ;;
    # --no-ping: fleetboot and Kea do not ping an address before offering it either.
    dnsmasq) ip netns exec "$SRV" dnsmasq --no-daemon --port=0 --interface=srv0 --bind-interfaces \
               --dhcp-range=10.79.1.0,10.79.200.255,255.255.0.0,1h --dhcp-lease-max=60000 \
               --dhcp-authoritative --no-ping --quiet-dhcp --dhcp-leasefile="$W/dnsmasq.leases" \
               --log-facility="$W/dnsmasq.log" --pid-file= 2>>"$W/dnsmasq.err" & SPID=$! ;;
    kea|kea-mt) local mt=false; [ "$1" = kea-mt ] && mt=true
         ip netns exec "$SRV" env KEA_PIDFILE_DIR="$W/kea" KEA_LOCKFILE_DIR="$W/kea" \
               kea-dhcp4 -c "$W/kea-$mt.json" >>"$W/kea/stdout.log" 2>&1 & SPID=$! ;;
    kea-pg|kea-pg-mt) local mt=false; [ "$1" = kea-pg-mt ] && mt=true
         ip netns exec "$SRV" env KEA_PIDFILE_DIR="$W/kea" KEA_LOCKFILE_DIR="$W/kea" \
               kea-dhcp4 -c "$W/kea-pg-$mt.json" >>"$W/kea/stdout.log" 2>&1 & SPID=$! ;;
  esac
  for _ in $(seq 100); do
    ip netns exec "$SRV" ss -Hlun | grep -q ':67 ' && { sleep 0.3; return; }
    # Kea's default raw socket shows as a packet socket; its UDP socket on 67 is there too
    sleep 0.1
  done
  echo "$1 did not start" >&2; cat "$W/fb.log" "$W/kea/"*.log 2>/dev/null | tail -20 >&2; return 1
}
stop_server() { local p; for p in $SPID; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done; SPID=; }
# One bounded perfdhcp run: RATE exchanges/s for SECS seconds from CLIENTS random MACs,
# 1 s for late replies. Prints "do_sent do_drops ra_sent ra_drops do_avg_ms ra_avg_ms".
perf() {
  local out="$W/perf.out"
  ip netns exec "$CLI" timeout $((SECS + 30)) perfdhcp -4 -l "$CLI_IF" -r "$1" -p "$SECS" -R "$CLIENTS" \
    -W 1000000 >"$out" 2>&1 || true
  awk '
    /Statistics for: DISCOVER-OFFER/ {x="do"} /Statistics for: REQUEST-ACK/ {x="ra"}
    /^sent packets:/ {s[x]=$3} /^drops:/ {d[x]=$2} /^avg delay:/ {a[x]=$3}
    END { if (s["do"]=="") { print "ERR"; exit }
          printf "%s %s %s %s %s %s\n", s["do"], d["do"], s["ra"], d["ra"], a["do"], a["ra"] }' "$out"
}
read -ra RATE_LIST <<< "$RATES"
declare -A R
for run in $(seq "$RUNS"); do
  for rate in "${RATE_LIST[@]}"; do
    for s in "${SERVERS[@]}"; do
      start_server "$s"
      # BENCH_PROFILE=DIR: record where fleetboot spends each cell (perf record -g).
      PPID_=
      if [ -n "${BENCH_PROFILE:-}" ] && [ "$s" = fleetboot ]; then
        mkdir -p "$BENCH_PROFILE"
        command perf record -q -g -o "$BENCH_PROFILE/fleetboot-$rate-run$run.data" -p "$SPID" -- sleep "$SECS" 2>/dev/null & PPID_=$!
      fi
      R[$run,$rate,$s]=$(perf "$rate")
      [ -n "$PPID_" ] && wait "$PPID_" 2>/dev/null
      for p in $SPID; do kill -0 "$p" 2>/dev/null || echo "$s died at rate $rate" >&2; done
      stop_server
      echo "run=$run rate=$rate $s: ${R[$run,$rate,$s]}" >&2
      [ "${R[$run,$rate,$s]}" = ERR ] && tail -5 "$W/perf.out" >&2
    done
  done
done
clean() {  # "do_sent do_drops ra_sent ra_drops ..." -> 1 if no drops and a REQUEST for every DISCOVER
  [ "$1" = ERR ] && { echo 0; return; }
  read -r dos dod ras rad _ _ <<< "$1"
  if [ "$dod" = 0 ] && [ "$rad" = 0 ] && [ "$ras" = "$dos" ]; then echo 1; else echo 0; fi
}
median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "-"; exit} print a[int((NR+1)/2)] }'; }
cell() {  # rate server -> "k/RUNS clean; drops D; DO/RA ms" (medians over runs)
  local k=0 v dos dod ras rad da ra drops=() doa=() raa=()
  for run in $(seq "$RUNS"); do
    v=${R[$run,$1,$2]}; k=$((k + $(clean "$v")))
    [ "$v" = ERR ] && continue
    read -r dos dod ras rad da ra <<< "$v"
    drops+=($((dod + rad))); doa+=("$da"); raa+=("$ra")
  done
  printf '%s/%s clean; drops %s; %.2f/%.2f ms' "$k" "$RUNS" \
    "$(printf '%s\n' "${drops[@]}" | median)" "$(printf '%s\n' "${doa[@]}" | median)" "$(printf '%s\n' "${raa[@]}" | median)"
}
declare -A BEST
for rate in "${RATE_LIST[@]}"; do
  for s in "${SERVERS[@]}"; do
    k=0; for run in $(seq "$RUNS"); do k=$((k + $(clean "${R[$run,$rate,$s]}"))); done
    [ "$k" = "$RUNS" ] && BEST[$s]=$rate
  done
done
echo "DHCP, perfdhcp -r RATE -p $SECS -R $CLIENTS (DORA), one fresh server per cell, $RUNS run(s);"
echo "cell: runs with 0 drops; median drops (DISCOVER-OFFER + REQUEST-ACK); median average delay DO/RA"
echo
printf '| rate/s | %s |\n' "$(IFS='|'; echo "${SERVERS[*]}" | sed 's/|/ | /g')"
printf '|---|%s\n' "$(for _ in "${SERVERS[@]}"; do printf -- '---|'; done)"
for rate in "${RATE_LIST[@]}"; do
  row="| $rate |"; for s in "${SERVERS[@]}"; do row="$row $(cell "$rate" "$s") |"; done; echo "$row"
done
echo
for s in "${SERVERS[@]}"; do echo "highest rate with 0 drops in every run, $s: ${BEST[$s]:-none}/s"; done
ratio() { [[ ${1:-} =~ ^[0-9]+$ && ${2:-} =~ ^[0-9]+$ ]] && echo "scale=2; $1 / $2" | bc || echo "-"; }
for p in "${SERVERS[@]}"; do
  [[ $p = fleetboot* ]] && continue
  # fleetboot on the same kind of lease store as $p: on PostgreSQL, one server and two.
  for f in "${SERVERS[@]}"; do
    case $f:$p in
      fleetboot:dnsmasq|fleetboot:kea|fleetboot:kea-mt|fleetboot-pg*:kea-pg*)
        echo "$f ÷ $p: $(ratio "${BEST[$f]:-}" "${BEST[$p]:-}")" ;;
    esac
  done
done

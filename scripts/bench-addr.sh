#!/usr/bin/env bash
# Leased addresses installed per second, beside perfdhcp on the same server.
#
# fleetboot-addr's example (`thousand_clients`) leases COUNT addresses at once (256 in
# flight) from a DHCP server and installs each on the client's interface: DORA with a
# client id and MAC per address, an ARP probe (`--dad quick`: 2 probes 100 ms apart, 200 ms
# of listening; or `--dad off`), then RTM_NEWADDR with the lease's lifetime. perfdhcp -R
# COUNT runs the same DORA exchanges from COUNT simulated clients at a fixed rate and
# installs nothing. Servers: `fleetboot serve` (durable leases: SQLite, an ACK only after
# the commit) and dnsmasq, each in a server namespace across a bridge, started afresh with
# an empty lease store for every cell. Prints a markdown table of medians over RUNS.
# Run as root after scripts/setup.sh.
# usage: scripts/bench-addr.sh [COUNT=1000] [RUNS=3] [PERF_RATES="1000 2000 4000"]
#   POOL_PENDING=N: leases in flight at once (default 256); BENCH_SERVERS="fleetboot dnsmasq".
set -euo pipefail
COUNT=${1:-1000}; RUNS=${2:-3}; RATES=${3:-1000 2000 4000}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-addr.sh: run as root" >&2; exit 1; }
for t in perfdhcp dnsmasq; do
  command -v $t >/dev/null || [ -x /usr/sbin/$t ] || { echo "bench-addr.sh: $t missing (scripts/setup.sh)" >&2; exit 1; }
done
[ "$COUNT" -ge 1 ] && [ "$COUNT" -le 5000 ] || { echo "bench-addr.sh: COUNT must be 1..5000" >&2; exit 1; }
# BENCH_BUILD=debug checks the script without waiting for an optimised build.
if [ "${BENCH_BUILD:-release}" = debug ]; then B=debug; F=; else B=release; F=--release; fi
cargo build $F --quiet -p fleetboot --bin fleetboot
cargo build $F --quiet -p fleetboot-addr --example thousand_clients
FB=$PWD/target/$B/fleetboot
EX=$PWD/target/$B/examples/thousand_clients
W=$(mktemp -d /tmp/fb-bench-addr.XXXX)
SW=fba$$sw; SRV=fba$$srv; CLI=fba$$cli; SPID=
cleanup() {
  set +e
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null; sleep 0.2
  for n in "$CLI" "$SRV" "$SW"; do ip netns del "$n" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT INT TERM
ip netns add "$SW"; ip netns add "$SRV"; ip netns add "$CLI"
ip -n "$SW" link add br0 type bridge stp_state 0 forward_delay 0; ip -n "$SW" link set br0 up
ip -n "$SW" link add sw-srv type veth peer name srv0 netns "$SRV"
ip -n "$SW" link add sw-cli type veth peer name cli0 netns "$CLI"
for p in sw-srv sw-cli; do ip -n "$SW" link set "$p" master br0 up; done
ip -n "$SRV" addr add 10.80.0.1/16 brd + dev srv0; ip -n "$SRV" link set srv0 up; ip -n "$SRV" link set lo up
# perfdhcp sends from the interface's address; the pool's addresses join it as secondaries.
ip -n "$CLI" addr add 10.80.0.2/16 brd + dev cli0; ip -n "$CLI" link set cli0 up; ip -n "$CLI" link set lo up

mkdir -p "$W/root"
cat > "$W/fb.toml" <<EOF
data_dir = "$W/state"
[server]
address = "10.80.0.1"
interface = "srv0"
root = "$W/root"
[dhcp]
mode = "server"
[[dhcp.subnet]]
network = "10.80.0.0/16"
range = ["10.80.1.0", "10.80.200.255"]
lease_time = 3600
[tftp]
enabled = false
[http]
enabled = true
listen = "10.80.0.1:8080"
EOF
start_server() {
  rm -rf "$W/state" "$W/dnsmasq.leases"
  case $1 in
    fleetboot) ip netns exec "$SRV" env RUST_LOG=warn "$FB" serve --config "$W/fb.toml" 2>>"$W/fb.log" & SPID=$! ;;
    dnsmasq) ip netns exec "$SRV" dnsmasq --no-daemon --port=0 --interface=srv0 --bind-interfaces \
               --dhcp-range=10.80.1.0,10.80.200.255,255.255.0.0,1h --dhcp-lease-max=60000 \
               --dhcp-authoritative --no-ping --quiet-dhcp --dhcp-leasefile="$W/dnsmasq.leases" \
               --log-facility="$W/dnsmasq.log" --pid-file= 2>>"$W/dnsmasq.err" & SPID=$! ;;
  esac
  for _ in $(seq 100); do
    ip netns exec "$SRV" ss -Hlun | grep -q ':67 ' && { sleep 0.3; return; }
    sleep 0.1
  done
  echo "$1 did not start" >&2; tail -n 20 "$W/fb.log" "$W/dnsmasq.err" 2>/dev/null >&2; return 1
}
stop_server() { kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; SPID=; }
# The pool: prints "leased rate_per_s release_s left" (or ERR).
pool() {
  local out="$W/pool.out"
  ip netns exec "$CLI" timeout 180 "$EX" --interface cli0 --count "$COUNT" --dad "$1" --pending "${POOL_PENDING:-256}" >"$out" 2>"$W/pool.err" || true
  awk '
    / addresses leased, installed in / { l=$1; r=$NF; gsub(/[(\/s)]/, "", r) }
    / released and removed in / { t=$6; k=$8 }
    END { if (l=="") { print "ERR"; exit } printf "%s %s %s %s\n", l, r, t, k }' "$out"
}
# perfdhcp at RATE for COUNT exchanges from COUNT clients, 1 s for late replies. Prints
# "drops do_avg_ms ra_avg_ms ra_received" (or ERR).
perf() {
  local out="$W/perf.out"
  ip netns exec "$CLI" timeout 60 perfdhcp -4 -l cli0 -r "$1" -n "$COUNT" -R "$COUNT" -W 1000000 >"$out" 2>&1 || true
  awk '
    /Statistics for: DISCOVER-OFFER/ {x="do"} /Statistics for: REQUEST-ACK/ {x="ra"}
    /^received packets:/ {g[x]=$3} /^drops:/ {d[x]=$2} /^avg delay:/ {a[x]=$3}
    END { if (d["do"]=="") { print "ERR"; exit }
          printf "%s %s %s %s\n", d["do"]+d["ra"], a["do"], a["ra"], g["ra"] }' "$out"
}
read -ra RATE_LIST <<< "$RATES"
declare -A R
read -ra SERVERS <<< "${BENCH_SERVERS:-fleetboot dnsmasq}"
for run in $(seq "$RUNS"); do
  for s in "${SERVERS[@]}"; do
    for dad in quick off; do
      start_server "$s"; R[$run,$s,pool-$dad]=$(pool "$dad"); stop_server
      echo "run=$run $s pool --dad $dad: ${R[$run,$s,pool-$dad]}" >&2
      [ "${R[$run,$s,pool-$dad]}" = ERR ] && tail -5 "$W/pool.out" "$W/pool.err" >&2
    done
    for rate in "${RATE_LIST[@]}"; do
      start_server "$s"; R[$run,$s,perf-$rate]=$(perf "$rate"); stop_server
      echo "run=$run $s perfdhcp -r $rate: ${R[$run,$s,perf-$rate]}" >&2
    done
  done
done
median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "-"; exit} print a[int((NR+1)/2)] }'; }
pool_cell() {  # server dad -> "median rate/s (all COUNT leased in k/RUNS; release s)"
  local k=0 v l r t left rates=() rel=()
  for run in $(seq "$RUNS"); do
    v=${R[$run,$1,pool-$2]}; [ "$v" = ERR ] && continue
    read -r l r t left <<< "$v"
    [ "$l" = "$COUNT" ] && [ "$left" = 0 ] && k=$((k + 1))
    rates+=("$r"); rel+=("$t")
  done
  printf '%s/s (%s/%s runs all %s, 0 left); release %s s' "$(printf '%s\n' "${rates[@]}" | median)" \
    "$k" "$RUNS" "$COUNT" "$(printf '%s\n' "${rel[@]}" | median)"
}
perf_cell() {  # server rate -> "k/RUNS clean; drops D; DO/RA ms"
  local k=0 v d da ra got drops=() doa=() raa=()
  for run in $(seq "$RUNS"); do
    v=${R[$run,$1,perf-$2]}; [ "$v" = ERR ] && continue
    read -r d da ra got <<< "$v"
    # perfdhcp counts an ACK to a retransmitted REQUEST as received too: >= COUNT.
    [ "$d" = 0 ] && [ "$got" -ge "$COUNT" ] && k=$((k + 1))
    drops+=("$d"); doa+=("$da"); raa+=("$ra")
  done
  printf '%s/%s clean; drops %s; %s/%s ms' "$k" "$RUNS" "$(printf '%s\n' "${drops[@]}" | median)" \
    "$(printf '%s\n' "${doa[@]}" | median)" "$(printf '%s\n' "${raa[@]}" | median)"
}
echo "Leases installed per second ($COUNT addresses, ${POOL_PENDING:-256} in flight, median of $RUNS) and perfdhcp -r RATE -n $COUNT -R $COUNT (DORA, nothing installed):"
echo
echo "| server | pool, ARP probe + install | pool, install only |$(for r in "${RATE_LIST[@]}"; do printf ' perfdhcp -r %s |' "$r"; done)"
echo "|---|---|---|$(for _ in "${RATE_LIST[@]}"; do printf -- '---|'; done)"
for s in "${SERVERS[@]}"; do
  row="| $s | $(pool_cell "$s" quick) | $(pool_cell "$s" off) |"
  for r in "${RATE_LIST[@]}"; do row="$row $(perf_cell "$s" "$r") |"; done
  echo "$row"
done

#!/usr/bin/env bash
# Multicast image distribution, side by side in one run at the same rate cap: fleetboot
# (fleetboot-streamd send/receive), udpcast (udp-sender/udp-receiver --max-bitrate) and
# uftp (uftpd on the receivers, uftp -R) send one image from a server namespace to N
# receiver namespaces on a bridge; then again with 1% of the packets towards one receiver
# dropped on the bridge (nftables; this kernel has no netem). For each: seconds until every
# receiver has the image (all checked by SHA-256) and the server's egress bytes
# (srv0 tx_bytes before/after, Ethernet frames), printed as a markdown table with ratios.
# Everything runs in private namespaces (multicast included, TTL 1) and is removed on exit.
# fleetboot's sender keeps each image's block hashes (what its signed manifest lists) in
# a cache directory: "fleetboot-cold" is a session with that directory empty (the sender
# hashes the whole image first, as every session did before the cache), "fleetboot" one
# with the hashes kept by an earlier session (the first run of the script builds them if
# no fleetboot-cold came before it).
# Run as root after scripts/setup.sh.
# usage: scripts/bench-multicast.sh [SIZE_MIB=256] [RECEIVERS=3] [RATE_MBIT=400]
#   BENCH_TOOLS="fleetboot uftp" BENCH_LOSSES="0" narrow the run;
#   FLEETBOOT_STREAMD_BIN=PATH benchmarks an already built binary;
#   BENCH_MTU=9000 runs every link (veths and the bridge) with jumbo frames and each tool
#   with its largest block that fits one frame (fleetboot 8192, uftp 8800; udpcast keeps
#   its default, it has no larger block);
#   BENCH_VERBOSE=1 prints fleetboot's sender and receiver logs after each run, with
#   where the time went (the sender's phases and rounds, each receiver's completion, in
#   ms since the session opened or was found).
set -euo pipefail
SIZE=${1:-256}; N=${2:-3}; RATE_MBIT=${3:-400}
TOOLS=${BENCH_TOOLS:-fleetboot-cold fleetboot udpcast uftp}; LOSSES=${BENCH_LOSSES:-0 1}
MTU=${BENCH_MTU:-1500}
# Each tool's data block: the largest that fits one frame at this MTU (fleetboot's DATA
# header is 21 bytes, IP and UDP 28; uftp wants ~100-200 bytes of headroom).
if [ "$MTU" -ge 9000 ]; then FB_BLOCK=8192; UFTP_BLOCK=8800; else FB_BLOCK=1450; UFTP_BLOCK=1300; fi
# How long one tool's run may take: ten times the image at the rate cap, and 30 s. A tool
# that hangs (udpcast once did at 1% loss, its receivers waiting for an end that never
# came) is stopped there and reported with the receivers it served, instead of holding
# up the rest of the run for minutes.
RUN_LIMIT=$((30 + SIZE * 8 * 10 / RATE_MBIT))
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-multicast.sh: run as root" >&2; exit 1; }
. scripts/bench-common.sh
bench_bins fleetboot-streamd
FB=$FB_STREAMD
[ -n "${BENCH_VERBOSE:-}" ] && export RUST_LOG=${RUST_LOG:-info,fleetboot_streamd=debug}
# The site secret fleetboot's sender and receivers share (they refuse to run without one).
export FLEETBOOT_STREAM_SECRET=${FLEETBOOT_STREAM_SECRET:-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')}
W=$(mktemp -d /tmp/fb-bench-mc.XXXX)
# The sender signs what it streams; receivers take its public key from the environment.
export FLEETBOOT_STREAM_SENDER_KEY=$("$FB" keygen --signing-key-file "$W/sender.key")
PIDS=()
cleanup() { bench_stop_all "${PIDS[@]}"; }
bench_on_exit cleanup

head -c $((SIZE << 20)) /dev/urandom > "$W/image.raw"
SHA=$(sha256sum "$W/image.raw" | cut -d' ' -f1)
BYTES=$((SIZE << 20))

# The sender at 10.79.0.1 (multicast routed out srv0), receiver i at 10.79.0.(10+i).
clients=()
for i in $(seq 0 $((N - 1))); do clients+=(--client "10.79.0.$((10 + i))/24"); done
lab_up "$W" --server 10.79.0.1/24 --multicast "${clients[@]}"
SW=$LAB_SWITCH; SRV=$LAB_SERVER
rx_ns() { local v="LAB_CLIENT$1"; echo "${!v}"; }  # receiver i's namespace
if [ "$MTU" != 1500 ]; then
  for dev in $(ip -n "$SW" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
    [ "$dev" = lo ] || ip -n "$SW" link set dev "$dev" mtu "$MTU"
  done
  ip -n "$SRV" link set dev srv0 mtu "$MTU"
  for i in $(seq 0 $((N - 1))); do ip -n "$(rx_ns "$i")" link set dev eth0 mtu "$MTU"; done
fi
sleep 1  # let the veths come up (no DAD on IPv4, but the bridge ports need a moment)

set_loss() {  # percent towards the last receiver
  ip netns exec "$SW" nft delete table bridge fbmloss 2>/dev/null || true
  [ "$1" = 0 ] && return
  ip netns exec "$SW" nft add table bridge fbmloss
  ip netns exec "$SW" nft add chain bridge fbmloss c '{ type filter hook forward priority 0; }'
  local port="LAB_PORT$((N - 1))"
  ip netns exec "$SW" nft add rule bridge fbmloss c oifname "${!port}" numgen random mod 100 '<' "$1" drop
}
txb() { ip netns exec "$SRV" cat /sys/class/net/srv0/statistics/tx_bytes; }
now() { date +%s.%N; }

# A binary from before the hash cache has no --hash-cache: every session hashes.
HASH_CACHE=()
"$FB" send --help 2>/dev/null | grep -q -- --hash-cache && HASH_CACHE=(--hash-cache "$W/hashes")

# Each run_* starts the receivers, then the sender, waits for every receiver, and leaves
# the received files in $W/rx<i>/ for the check.
run_fleetboot-cold() {
  rm -rf "$W/hashes"
  run_fleetboot
}
run_fleetboot() {
  local rx=() i
  for i in $(seq 0 $((N - 1))); do
    mkdir -p "$W/rx$i"
    ip netns exec "$(rx_ns "$i")" timeout "$RUN_LIMIT" "$FB" receive --iface eth0 --sha256 "$SHA" \
      --out "$W/rx$i" --group 239.192.79.1:10900 >"$W/rx$i.log" 2>&1 & rx+=($!)
  done
  sleep 0.3
  T0=$(now)
  ip netns exec "$SRV" timeout "$RUN_LIMIT" "$FB" send --iface srv0 --file "$W/image.raw" --sha256 "$SHA" \
    --signing-key-file "$W/sender.key" "${HASH_CACHE[@]}" \
    --group 239.192.79.1:10900 --rate $((RATE_MBIT * 125000)) --receivers "$N" --block-size "$FB_BLOCK" \
    >"$W/snd.log" 2>"$W/snd.err" || true
  for p in "${rx[@]}"; do wait "$p" || true; done
  T1=$(now)
  for i in $(seq 0 $((N - 1))); do mv "$W/rx$i/$SHA.img" "$W/rx$i/out" 2>/dev/null || true; done
  EXTRA=$(grep -o 'bytes_sent=[0-9]*' "$W/snd.log" | cut -d= -f2)
  EXTRA="$EXTRA$(grep -o ' hashes=[a-z]* hashing_ms=[0-9]*' "$W/snd.log" || true)"
  if [ -n "${BENCH_VERBOSE:-}" ]; then
    cat "$W/snd.log" "$W/snd.err" >&2
    for i in $(seq 0 $((N - 1))); do echo "-- receiver $i" >&2; grep -v '^received ' "$W/rx$i.log" >&2; done
  fi
}
run_udpcast() {
  local rx=() i
  for i in $(seq 0 $((N - 1))); do
    mkdir -p "$W/rx$i"
    ip netns exec "$(rx_ns "$i")" timeout "$RUN_LIMIT" udp-receiver --interface eth0 --nokbd --portbase 9000 \
      --file "$W/rx$i/out" >"$W/rx$i.log" 2>&1 & rx+=($!)
  done
  sleep 0.3
  T0=$(now)
  ip netns exec "$SRV" timeout "$RUN_LIMIT" udp-sender --interface srv0 --nokbd --portbase 9000 \
    --min-receivers "$N" --max-bitrate "${RATE_MBIT}m" --mcast-data-address 239.192.79.2 \
    --file "$W/image.raw" >"$W/snd.log" 2>&1 || true
  for p in "${rx[@]}"; do wait "$p" || true; done
  T1=$(now)
  EXTRA=
}
run_uftp() {
  local i
  UPIDS=()
  for i in $(seq 0 $((N - 1))); do
    mkdir -p "$W/rx$i" "$W/rx$i.tmp"
    ip netns exec "$(rx_ns "$i")" timeout "$RUN_LIMIT" uftpd -d -I eth0 -D "$W/rx$i" -T "$W/rx$i.tmp" \
      -L "$W/rx$i.log" -P "$W/rx$i.pid" >/dev/null 2>&1 & UPIDS+=($!); PIDS+=($!)
  done
  sleep 0.5
  cp "$W/image.raw" "$W/out"  # uftp names the file after its source
  T0=$(now)
  ip netns exec "$SRV" timeout "$RUN_LIMIT" uftp -I srv0 -R $((RATE_MBIT * 1000)) -b "$UFTP_BLOCK" -D out -L "$W/snd.log" \
    "$W/out" >/dev/null 2>&1 || true
  T1=$(now)
  # uftp returns once every client reported completion; give uftpd a moment to rename.
  sleep 0.3
  for p in "${UPIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -f "$W/out"
  EXTRA=
}

declare -A TIME EGRESS OK
for loss in $LOSSES; do
  set_loss "$loss"
  for t in $TOOLS; do
    for i in $(seq 0 $((N - 1))); do rm -rf "$W/rx$i" "$W/rx$i.tmp"; done
    B0=$(txb)
    "run_$t"
    B1=$(txb)
    ok=0
    for i in $(seq 0 $((N - 1))); do
      [ -f "$W/rx$i/out" ] && [ "$(sha256sum "$W/rx$i/out" | cut -d' ' -f1)" = "$SHA" ] && ok=$((ok + 1))
    done
    TIME[$t,$loss]=$(echo "$T1 - $T0" | bc)
    EGRESS[$t,$loss]=$((B1 - B0))
    OK[$t,$loss]=$ok
    late=
    [ "$(echo "${TIME[$t,$loss]} >= $RUN_LIMIT - 1" | bc)" = 1 ] && late=" (stopped at the ${RUN_LIMIT} s limit)"
    echo "  $t loss=$loss%: ${TIME[$t,$loss]} s, egress $((B1 - B0)) B, $ok/$N receivers OK ${EXTRA:+(datagram bytes $EXTRA)}$late" >&2
    sleep 0.5
  done
done
set_loss 0

echo
echo "Multicast, ${SIZE} MiB image to $N receivers, rate cap ${RATE_MBIT} Mbit/s, MTU $MTU, $(date -u +%F)"
echo
echo "| loss on one link | tool | receivers OK | time (s) | time / uftp | egress (MiB) | egress / image |"
echo "|---|---|---|---|---|---|---|"
for loss in $LOSSES; do
  for t in $TOOLS; do
    ref=${TIME[uftp,$loss]:-}
    r=$( [ -n "$ref" ] && echo "scale=2; ${TIME[$t,$loss]} / $ref" | bc || echo -)
    printf "| %s%% | %s | %s/%s | %.2f | %s | %.1f | %.4f |\n" "$loss" "$t" "${OK[$t,$loss]}" "$N" \
      "${TIME[$t,$loss]}" "$r" "$(echo "${EGRESS[$t,$loss]} / 1048576" | bc -l)" \
      "$(echo "${EGRESS[$t,$loss]} / $BYTES" | bc -l)"
  done
done

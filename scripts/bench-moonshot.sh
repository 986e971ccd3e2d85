#!/usr/bin/env bash
# The moonshot on the wire: CLIENTS emulated machines, spread over NAMESPACES client
# namespaces on one bridge (CLIENTS/NAMESPACES each), all boot the same SIZE_MIB image at
# once, three ways, from one server namespace:
#   stream: `fleetboot emulate --stream`: each client leases its own address (DHCP from
#           `fleetboot serve`, through the address library) and then receives the image
#           from `fleetboot-streamd send` (multicast, rate cap RATE_MBIT) with the stream's
#           own receiver, from that address (registered, acknowledged and repaired as a
#           host of its own), and checks its SHA-256. Run with 1 client and with CLIENTS,
#           on clean links and with LOSS% of the packets towards the first namespace (a
#           tenth of the links with 10 namespaces; the 1-client run's client is there)
#           dropped on the bridge (nftables: this kernel has
#           no netem; the namespace's clients share their link, so they lose the same
#           packets).
#   http:   `fleetboot emulate` (iPXE: DHCP, the script, the image as its kernel over HTTP
#           from `fleetboot serve`), every client from its own leased address, checked by
#           SHA-256. 1 client and CLIENTS.
#   nbd:    `nbdcopy nbd://server/IMAGE -` into sha256sum, CLIENTS copies at once from
#           fleetboot's NBD server (same `fleetboot serve`); nbdcopy cannot choose its source
#           address, so each namespace's copies share one address.
# Measured per run: clients with the right image; time until every client has it (stream:
# from the sender's start — every client already holds its lease and listens — to the last
# client's last block; http: the slowest client's DISCOVER to last byte; nbd: start to the
# last copy); server egress = tx_bytes of the server's veth (Ethernet frames) ÷ image size.
# Prints a markdown table. Timings are rough on a shared machine; counts and bytes exact.
# Everything runs in private namespaces (multicast TTL 1) and is removed on exit; only the
# processes this script started are stopped. Run as root after scripts/setup.sh.
# usage: scripts/bench-moonshot.sh [CLIENTS=100] [NAMESPACES=10] [SIZE_MIB=32] [RATE_MBIT=100] [LOSS=1]
#   BENCH_MODES="stream http nbd" narrows the run; BENCH_KEEP=1 keeps the work directory
#   (every client's JSON report, the sender's log); FLEETBOOT_BIN / FLEETBOOT_STREAMD_BIN /
#   FLEETBOOT_LAB_BIN benchmark already built binaries.
set -euo pipefail
CLIENTS=${1:-100}; NS=${2:-10}; SIZE=${3:-32}; RATE_MBIT=${4:-100}; LOSS=${5:-1}
MODES=${BENCH_MODES:-stream http nbd}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-moonshot.sh: run as root" >&2; exit 1; }
[ "$NS" -ge 1 ] && [ "$NS" -le 20 ] || { echo "bench-moonshot.sh: NAMESPACES must be 1..20" >&2; exit 1; }
[ "$CLIENTS" -ge "$NS" ] && [ "$CLIENTS" -le 400 ] && [ $((CLIENTS % NS)) = 0 ] ||
  { echo "bench-moonshot.sh: CLIENTS must be a multiple of NAMESPACES, at most 400" >&2; exit 1; }
[ "$SIZE" -ge 1 ] && [ "$SIZE" -le 256 ] || { echo "bench-moonshot.sh: SIZE_MIB must be 1..256" >&2; exit 1; }
. scripts/bench-common.sh
bench_bins fleetboot fleetboot-streamd
export FLEETBOOT_STREAM_SECRET=${FLEETBOOT_STREAM_SECRET:-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')}
W=$(mktemp -d /tmp/fb-bench-moon.XXXX); mkdir -p "$W/root"
export FLEETBOOT_STREAM_SENDER_KEY=$("$FB_STREAMD" keygen --signing-key-file "$W/sender.key")
PIDS=(); SPID=
cleanup() {
  set +e
  for p in "${PIDS[@]}" $SPID; do kill "$p" 2>/dev/null; done
  lab_down
  if [ -n "${BENCH_KEEP:-}" ]; then echo "bench: kept $W" >&2; else rm -rf "$W"; fi
}
bench_on_exit cleanup

BYTES=$((SIZE << 20))
head -c "$BYTES" /dev/urandom > "$W/root/image.raw"
SHA=$(sha256sum "$W/root/image.raw" | cut -d' ' -f1)
GROUP=239.192.80.1:10900

# Server 10.80.0.1/16; the client namespaces' eth0 start without an address (the emulator
# adds each client's lease). Multicast is routed out of srv0.
args=(); for i in $(seq 0 $((NS - 1))); do args+=(--client none); done
lab_up "$W" --server 10.80.0.1/16 --multicast "${args[@]}"
SW=$LAB_SWITCH; SRV=$LAB_SERVER
cns() { local v="LAB_CLIENT$1"; echo "${!v}"; }
CIF=$LAB_CLIENT_IF
sleep 1

cat > "$W/fb.toml" <<EOF
data_dir = "$W/state"
[server]
address = "10.80.0.1"
interface = "srv0"
root = "$W/root"
[dhcp]
mode = "server"
authoritative = true
[[dhcp.subnet]]
network = "10.80.0.0/16"
range = ["10.80.1.1", "10.80.4.250"]
router = "10.80.0.1"
lease_time = 3600
[pxe]
transport = "http"
[http]
enabled = true
listen = "10.80.0.1:8080"
[nbd]
enabled = true
listen = "10.80.0.1:10809"
[[profile]]
name = "moon"
priority = 10
boot = { kind = "linux", kernel = "image.raw", initrd = [], cmdline = "console=ttyS0" }
EOF
"$FB" image import "$W/root/image.raw" --name moon -c "$W/fb.toml" >"$W/import.log" 2>&1
ip netns exec "$SRV" env RUST_LOG=warn "$FB" serve --config "$W/fb.toml" 2>>"$W/fb.log" & SPID=$!
for port in "u 67" "t 8080" "t 10809"; do
  set -- $port
  for _ in $(seq 100); do ip netns exec "$SRV" ss -Hl"$1"n | grep -q ":$2 " && break; sleep 0.1; done
  ip netns exec "$SRV" ss -Hl"$1"n | grep -q ":$2 " || { echo "nothing listens on $1 $2" >&2; cat "$W/fb.log" >&2; exit 1; }
done

txb() { ip netns exec "$SRV" cat /sys/class/net/srv0/statistics/tx_bytes; }
now() { date +%s.%N; }
set_loss() {  # percent towards the first namespace (where a 1-client run's client is)
  ip netns exec "$SW" nft delete table bridge fbmoon 2>/dev/null || true
  [ "$1" = 0 ] && return
  ip netns exec "$SW" nft add table bridge fbmoon
  ip netns exec "$SW" nft add chain bridge fbmoon c '{ type filter hook forward priority 0; }'
  local port="LAB_PORT0"
  ip netns exec "$SW" nft add rule bridge fbmoon c oifname "${!port}" numgen random mod 100 '<' "$1" drop
}
# Clients per namespace for a run of $1 clients: all in the first when it is 1.
per_ns() { [ "$1" = 1 ] && echo 1 || echo $(($1 / NS)); }
used_ns() { [ "$1" = 1 ] && echo 1 || echo "$NS"; }
addrs_in() { ip netns exec "$(cns "$1")" ip -4 -o addr show dev "$CIF" | wc -l; }

# emulate RUN CLIENTS EXTRA...: one `fleetboot emulate` per namespace (distinct MACs), JSON
# reports in $W/RUN.<i>.json; sets EPIDS.
emulate() {
  local run=$1 n=$2; shift 2
  local k i; k=$(per_ns "$n"); EPIDS=()
  for i in $(seq 0 $(($(used_ns "$n") - 1))); do
    ip netns exec "$(cns "$i")" timeout 300 "$FB" emulate --clients "$k" --interface "$CIF" \
      --mac-base "$(printf '02:fb:%02x:%02x:00:00' "$RUNNO" "$i")" --timeout 240 --release --json "$@" \
      >"$W/$run.$i.json" 2>"$W/$run.$i.err" & EPIDS+=($!); PIDS+=($!)
  done
}
RUNNO=0
summarize() {  # RUN MODE T0 -> "ok time_s"
  python3 - "$W" "$1" "$2" "$3" <<'EOF'
import glob, json, sys
w, run, mode, t0 = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ok, ends, tot, errors = 0, [], [], []
for f in sorted(glob.glob(f"{w}/{run}.*.json")):
    try:
        r = json.load(open(f))
    except Exception:
        continue
    for c in r["clients"]:
        good = c["phase"] == "done" and c["error"] is None and all(x["verified"] for x in c["files"] if x["role"] in ("stream", "kernel"))
        ok += good
        if mode == "stream" and c.get("stream") and c["stream"].get("complete_unix_ms"):
            ends.append(c["stream"]["complete_unix_ms"] / 1000.0)
        if mode == "http" and c["timeline"].get("total_ms"):
            tot.append(c["timeline"]["total_ms"] / 1000.0)
        if not good and len(errors) < 3:
            errors.append(f"{c['ip']}: {c['error']} {c.get('stream') or ''}")
t = (max(ends) - t0) if ends else (max(tot) if tot else float("nan"))
for e in errors:
    print("  failed:", e, file=sys.stderr)
print(ok, f"{t:.3f}")
EOF
}

run_stream() {  # CLIENTS LOSS -> sets R_OK R_T R_EGRESS, R_NOTE
  local n=$1 run="stream-$1-$2" i k want _
  RUNNO=$((RUNNO + 1)); set_loss "$2"
  emulate "$run" "$n" --stream "$GROUP" --stream-sha256 "$SHA"
  # Every client holds its lease (and listens for the session) before the sender starts.
  for _ in $(seq 600); do
    k=0; for i in $(seq 0 $(($(used_ns "$n") - 1))); do k=$((k + $(addrs_in "$i"))); done
    [ "$k" -ge "$n" ] && break; sleep 0.1
  done
  [ "$k" -ge "$n" ] || echo "  only $k of $n clients leased an address" >&2
  sleep 0.5
  local b0; b0=$(txb); T0=$(now)
  ip netns exec "$SRV" timeout 300 "$FB_STREAMD" send --iface srv0 --file "$W/root/image.raw" --sha256 "$SHA" \
    --signing-key-file "$W/sender.key" --group "$GROUP" --rate $((RATE_MBIT * 125000)) --receivers "$n" \
    --solicit 30 >"$W/$run.snd.log" 2>"$W/$run.snd.err" || true
  for p in "${EPIDS[@]}"; do wait "$p" || true; done
  R_EGRESS=$(($(txb) - b0))
  read -r R_OK R_T <<< "$(summarize "$run" stream "$T0")"
  R_NOTE=$(grep -o 'repair[a-z_]*=[0-9]*\|fec[a-z_]*=[0-9]*\|rounds=[0-9]*' "$W/$run.snd.log" | tr '\n' ' ' || true)
  set_loss 0
}
run_http() {  # CLIENTS
  local n=$1 run="http-$1"
  RUNNO=$((RUNNO + 1))
  local b0; b0=$(txb)
  emulate "$run" "$n" --expect "image.raw=$SHA"
  for p in "${EPIDS[@]}"; do wait "$p" || true; done
  R_EGRESS=$(($(txb) - b0))
  read -r R_OK R_T <<< "$(summarize "$run" http 0)"
  R_NOTE=
}
run_nbd() {  # CLIENTS
  local n=$1 i j k pids=() ok=0
  k=$(per_ns "$n")
  for i in $(seq 0 $(($(used_ns "$n") - 1))); do
    ip -n "$(cns "$i")" addr add "10.80.9.$((10 + i))/16" dev "$CIF"
  done
  sleep 0.5
  local b0; b0=$(txb); T0=$(now)
  for i in $(seq 0 $(($(used_ns "$n") - 1))); do
    for j in $(seq "$k"); do
      ip netns exec "$(cns "$i")" timeout 300 sh -c \
        "nbdcopy nbd://10.80.0.1/moon - | sha256sum > '$W/nbd.$i.$j'" 2>>"$W/nbd.err" & pids+=($!); PIDS+=($!)
    done
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  R_T=$(printf '%.3f' "$(echo "$(now) - $T0" | bc)")
  R_EGRESS=$(($(txb) - b0))
  for f in "$W"/nbd.*.*; do [ "$(cut -d' ' -f1 "$f")" = "$SHA" ] && ok=$((ok + 1)); done
  rm -f "$W"/nbd.*.*
  R_OK=$ok; R_NOTE=
  for i in $(seq 0 $(($(used_ns "$n") - 1))); do
    ip -n "$(cns "$i")" addr del "10.80.9.$((10 + i))/16" dev "$CIF"
  done
}

ROWS=()
row() {  # label clients
  local ratio; ratio=$(echo "scale=4; $R_EGRESS / $BYTES" | bc)
  ROWS+=("| $1 | $2 | $R_OK/$2 | $R_T | $ratio |")
  echo "  $1 x$2: $R_OK/$2 OK, ${R_T} s, egress $R_EGRESS B (${ratio}x image) $R_NOTE" >&2
  sleep 1
}
declare -A T E
for m in $MODES; do
  case $m in
    stream)
      run_stream 1 0; row "stream, clean" 1; T[s1]=$R_T
      run_stream "$CLIENTS" 0; row "stream, clean" "$CLIENTS"; T[sN]=$R_T; E[s0]=$R_EGRESS
      if [ "$LOSS" != 0 ]; then
        run_stream 1 "$LOSS"; row "stream, ${LOSS}% loss (lossy link)" 1; T[s1l]=$R_T
        run_stream "$CLIENTS" "$LOSS"; row "stream, ${LOSS}% loss on 1 of $NS links" "$CLIENTS"; T[sNl]=$R_T; E[sl]=$R_EGRESS
      fi ;;
    http) run_http 1; row "http" 1; run_http "$CLIENTS"; row "http" "$CLIENTS" ;;
    nbd) run_nbd 1; row "nbd (nbdcopy)" 1; run_nbd "$CLIENTS"; row "nbd (nbdcopy)" "$CLIENTS" ;;
  esac
done

echo
echo "The moonshot on the wire: $CLIENTS clients in $NS namespaces, ${SIZE} MiB image, stream rate cap ${RATE_MBIT} Mbit/s, $(date -u +%F)"
echo
echo "| setup | clients | image OK | time to all (s) | egress / image |"
echo "|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
if [ -n "${T[s1]:-}" ] && [ -n "${T[sN]:-}" ]; then
  echo "stream: time for $CLIENTS ÷ time for 1, clean: $(echo "scale=3; ${T[sN]} / ${T[s1]}" | bc)"
fi
if [ -n "${T[s1l]:-}" ] && [ -n "${T[sNl]:-}" ]; then
  echo "stream: time for $CLIENTS with loss on 1 of $NS links ÷ 1 client on a lossy link: $(echo "scale=3; ${T[sNl]} / ${T[s1l]}" | bc)"
fi
if [ -n "${E[s0]:-}" ] && [ -n "${E[sl]:-}" ]; then
  # The floor: the clean run's frames, each block sent again as often as a ${LOSS}% link loses it.
  echo "stream: egress with loss ÷ loss floor (clean egress / (1 - ${LOSS}%)): $(echo "scale=4; ${E[sl]} * (100 - $LOSS) / 100 / ${E[s0]}" | bc)"
fi

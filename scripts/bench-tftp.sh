#!/usr/bin/env bash
# TFTP throughput, side by side in one run: fleetboot, dnsmasq, atftpd and tftpd-hpa serve
# the same file across a bridge between two private namespaces, fetched by atftp
# (blksize 1468), curl (blksize 1428) and atftp with windowsize 16; then the same with 1%
# of the packets towards the client dropped on the bridge (nftables; this kernel has no
# netem). Prints a markdown table of median seconds per fetch and ratios to dnsmasq.
# Run as root after scripts/setup.sh.
# usage: scripts/bench-tftp.sh [SIZE_MIB=64] [RUNS=3] [LOSSY_SIZE_MIB=4]
#   BENCH_SERVERS="fleetboot dnsmasq" BENCH_LOSSES="0" narrow the run;
#   FLEETBOOT_BASE_BIN=PATH adds server "fleetboot-base" (another build, for A/B);
#   server "floor" is scripts/floor-tftpd.c: recv + send per block and nothing else, the
#   fastest lock-step server this host allows (BENCH_SERVERS="fleetboot dnsmasq floor").
# Runs are interleaved: each round starts every server in turn, so load that comes and
# goes on the machine falls on all of them alike.
set -euo pipefail
SIZE=${1:-64}; RUNS=${2:-3}; LOSSY_SIZE=${3:-4}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-tftp.sh: run as root" >&2; exit 1; }
. scripts/bench-common.sh
# FLEETBOOT_BIN=PATH benchmarks an already built binary (FLEETBOOT_LAB_BIN: the lab helper).
bench_bins fleetboot
read -ra SERVERS <<< "${BENCH_SERVERS:-fleetboot dnsmasq atftpd tftpd-hpa}"
read -ra LOSSES <<< "${BENCH_LOSSES:-0 1}"
W=$(mktemp -d /tmp/fb-bench-tftp.XXXX); mkdir -p "$W/root"
SPID=
cleanup() { bench_stop_all $SPID; }
bench_on_exit cleanup
HPA=/var/cache/fleetboot-lab/tftpd-hpa/usr/sbin/in.tftpd
# tftpd-hpa conflicts with atftpd as a package; its server binary is taken from the .deb.
if [[ " ${SERVERS[*]} " == *" tftpd-hpa "* ]] && [ ! -x "$HPA" ]; then
  (cd "$W" && apt-get download -qq tftpd-hpa 2>/dev/null && mkdir -p /var/cache/fleetboot-lab/tftpd-hpa &&
   dpkg-deb -x tftpd-hpa_*.deb /var/cache/fleetboot-lab/tftpd-hpa) || true
fi
head -c $((SIZE << 20)) /dev/urandom > "$W/root/big.bin"
head -c $((LOSSY_SIZE << 20)) /dev/urandom > "$W/root/small.bin"
# Server 10.78.0.1 in its namespace, the client 10.78.0.2 in another, across the bridge.
lab_up "$W" --server 10.78.0.1/24 --client 10.78.0.2/24
SW=$LAB_SWITCH; SRV=$LAB_SERVER; CLI=$LAB_CLIENT0

cat > "$W/fb.toml" <<EOF
data_dir = "$W/state"
[server]
address = "10.78.0.1"
interface = "srv0"
root = "$W/root"
[dhcp]
mode = "off"
[pxe]
transport = "tftp"
[http]
enabled = false
[tftp]
listen = "10.78.0.1:69"
EOF
start_server() {
  case $1 in
    fleetboot) ip netns exec "$SRV" "$FB" serve --config "$W/fb.toml" 2>"$W/fb.log" & SPID=$! ;;
    floor) ip netns exec "$SRV" "$W/floor-tftpd" 10.78.0.1 "$W/root" & SPID=$! ;;
    fleetboot-base) ip netns exec "$SRV" "$FLEETBOOT_BASE_BIN" serve --config "$W/fb.toml" 2>"$W/fb-base.log" & SPID=$! ;;
    dnsmasq) ip netns exec "$SRV" dnsmasq --no-daemon --port=0 --enable-tftp --tftp-root="$W/root" \
               --interface=srv0 --bind-interfaces --log-facility="$W/dnsmasq.log" --pid-file= & SPID=$! ;;
    atftpd) ip netns exec "$SRV" atftpd --daemon --no-fork --user root.root --bind-address 10.78.0.1 \
               --logfile "$W/atftpd.log" "$W/root" & SPID=$! ;;
    tftpd-hpa) ip netns exec "$SRV" "$HPA" -L -u root -s "$W/root" -a 10.78.0.1:69 & SPID=$! ;;
  esac
  # A socket bound to an interface shows as ADDR%DEV:69 (fleetboot binds TFTP to server.interface).
  for _ in $(seq 50); do ip netns exec "$SRV" ss -lun | grep -qE '(10\.78\.0\.1|0\.0\.0\.0|\*)(%[^ :]+)?:69 ' && return; sleep 0.1; done
  echo "$1 did not start" >&2; return 1
}
stop_server() { kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; SPID=; }
# The server's CPU time so far (user + system, all threads and reaped children), in ticks.
server_ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$SPID/stat" 2>/dev/null || echo 0; }
TICK_HZ=$(getconf CLK_TCK)
fetch() {  # client file -> seconds, or FAIL; the server's CPU milliseconds go to $W/cpu
  local out="$W/out" t0 t1 c0; rm -f "$out"; c0=$(server_ticks); t0=$(date +%s.%N)
  case $1 in
    atftp) ip netns exec "$CLI" timeout 120 atftp --option "blksize 1468" -g -r "$2" -l "$out" 10.78.0.1 >/dev/null 2>&1 ;;
    atftp-w16) ip netns exec "$CLI" timeout 120 atftp --option "blksize 1468" --option "windowsize 16" -g -r "$2" -l "$out" 10.78.0.1 >/dev/null 2>&1 ;;
    curl) ip netns exec "$CLI" timeout 120 curl -s --tftp-blksize 1428 -o "$out" "tftp://10.78.0.1/$2" ;;
  esac || true
  t1=$(date +%s.%N)
  echo "($(server_ticks) - $c0) * 1000 / $TICK_HZ" | bc > "$W/cpu"
  if cmp -s "$out" "$W/root/$2"; then echo "$t1 - $t0" | bc; else echo FAIL; fi
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "-"; exit} if(a[1]=="FAIL"){print "FAIL"; exit} print a[int((NR+1)/2)] }'; }
set_loss() {
  ip netns exec "$SW" nft delete table bridge lossy 2>/dev/null || true
  [ "$1" = 0 ] && return
  ip netns exec "$SW" nft add table bridge lossy
  ip netns exec "$SW" nft add chain bridge lossy c '{ type filter hook forward priority 0; }'
  ip netns exec "$SW" nft add rule bridge lossy c oifname "$LAB_PORT0" numgen random mod 100 '<' "$1" drop
}
[ -x "$HPA" ] || read -ra SERVERS <<< "${SERVERS[*]/tftpd-hpa}"
if [[ " ${SERVERS[*]} " == *" floor "* ]]; then cc -O2 -o "$W/floor-tftpd" scripts/floor-tftpd.c; fi
declare -A R T C
for loss in "${LOSSES[@]}"; do
  set_loss $loss
  file=big.bin; [ $loss = 1 ] && file=small.bin
  for run in $(seq "$RUNS"); do
    for s in "${SERVERS[@]}"; do
      start_server "$s"
      for c in atftp curl atftp-w16; do
        t=$(fetch $c $file); T[$loss,$s,$c]="${T[$loss,$s,$c]:-} $t"
        C[$loss,$s,$c]="${C[$loss,$s,$c]:-} $(cat "$W/cpu")"
        echo "loss=$loss% round $run $s $c: $t s, server CPU $(cat "$W/cpu") ms" >&2
      done
      stop_server
    done
  done
  for s in "${SERVERS[@]}"; do for c in atftp curl atftp-w16; do
    R[$loss,$s,$c]=$(echo "${T[$loss,$s,$c]}" | median)
    echo "loss=$loss% $s $c:${T[$loss,$s,$c]}" >&2
  done; done
done
set_loss 0
ratio() { [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] && echo "scale=2; $2 / $1" | bc || echo "-"; }
echo "TFTP, $SIZE MiB clean / $LOSSY_SIZE MiB at 1% loss towards the client, median of $RUNS, seconds (lower is better)"
echo
printf '| loss | client | %s | dnsmasq ÷ fleetboot |\n' "$(IFS='|'; echo "${SERVERS[*]}" | sed 's/|/ | /g')"
printf '|---|---|%s---|\n' "$(for _ in "${SERVERS[@]}"; do printf -- '---|'; done)"
for loss in "${LOSSES[@]}"; do
  for c in atftp curl atftp-w16; do
    row="| $loss% | $c |"; for s in "${SERVERS[@]}"; do row="$row ${R[$loss,$s,$c]} |"; done
    echo "$row $(ratio "${R[$loss,fleetboot,$c]:-}" "${R[$loss,dnsmasq,$c]:-}") |"
  done
done
echo
echo "Server CPU time per fetch (user + system, all threads), median ms:"
echo
printf '| loss | client | %s |\n' "$(IFS='|'; echo "${SERVERS[*]}" | sed 's/|/ | /g')"
printf '|---|---|%s\n' "$(for _ in "${SERVERS[@]}"; do printf -- '---|'; done)"
for loss in "${LOSSES[@]}"; do
  for c in atftp curl atftp-w16; do
    row="| $loss% | $c |"; for s in "${SERVERS[@]}"; do row="$row $(echo "${C[$loss,$s,$c]}" | median) |"; done
    echo "$row"
  done
done
echo
# Only for the losses this run measured (BENCH_LOSSES may leave either out).
for loss in "${LOSSES[@]}"; do
  what="clean"; [ "$loss" = 0 ] || what="$loss% loss"
  echo "fleetboot with atftp windowsize 16 vs dnsmasq with lock-step atftp ($what): $(ratio "${R[$loss,fleetboot,atftp-w16]:-}" "${R[$loss,dnsmasq,atftp]:-}")x"
done

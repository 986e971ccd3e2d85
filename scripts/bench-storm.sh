#!/usr/bin/env bash
# Boot storm, side by side in one run: CLIENTS emulated iPXE clients (`fleetboot emulate`,
# one client namespace, each client its own MAC and leased address) start at once and boot
# the lab payload (scripts/setup.sh builds it: a ~14 MB kernel and a ~1 MB initrd):
#   http: DHCP, then the iPXE script, kernel and initrd over HTTP — served by fleetboot
#         alone, by dnsmasq (DHCP, dhcp-boot = the URL of a static script) +
#         `python3 -m http.server`, and by the same dnsmasq + nginx (Debian's, `sendfile
#         on`, `tcp_nopush on`, one worker per core, no access log);
#   tftp: DHCP, then script, kernel and initrd over TFTP (lock-step, blksize 1432) — served
#         by fleetboot, and by dnsmasq (DHCP + TFTP, tftp-max raised to 400).
# Every server starts afresh (empty lease store) for every storm; the setups take turns,
# the order flipping every run. Every client must fetch both images byte-identical
# (--expect SHA-256). Then PAR concurrent TFTP downloads (curl, blksize 1428) of one
# PAR_MIB MiB file from a second client namespace, fleetboot vs dnsmasq: every copy is
# compared with cmp, and the server's peak RSS (VmHWM) is reported.
# Prints markdown tables: boot time p50/p99 (median over runs), failures, ratios.
# Run as root after scripts/setup.sh.
# usage: scripts/bench-storm.sh [CLIENTS=200] [RUNS=3] [MODES="http tftp"] [PAR=100] [PAR_MIB=4]
#   BENCH_PAR_RUNS (default 1) repeats the concurrent-TFTP section; FLEETBOOT_BIN=PATH
#   benchmarks an already built binary; FLEETBOOT_PAYLOAD=DIR serves another payload.
set -euo pipefail
CLIENTS=${1:-200}; RUNS=${2:-3}; MODES=${3:-http tftp}; PAR=${4:-100}; PAR_MIB=${5:-4}
PAR_RUNS=${BENCH_PAR_RUNS:-1}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-storm.sh: run as root" >&2; exit 1; }
[ "$CLIENTS" -ge 1 ] && [ "$CLIENTS" -le 240 ] || { echo "bench-storm.sh: CLIENTS must be 1..240 (pool size)" >&2; exit 1; }
[ "$PAR" -ge 0 ] && [ "$PAR" -le 200 ] || { echo "bench-storm.sh: PAR must be 0..200" >&2; exit 1; }
PAYLOAD=${FLEETBOOT_PAYLOAD:-/var/cache/fleetboot-lab/payload}
[ -s "$PAYLOAD/vmlinuz" ] && [ -s "$PAYLOAD/initrd.gz" ] || { echo "bench-storm.sh: no payload in $PAYLOAD (scripts/setup.sh)" >&2; exit 1; }
. scripts/bench-common.sh
bench_bins fleetboot
W=$(mktemp -d /tmp/fb-bench-storm.XXXX); mkdir -p "$W/root"
SPID=; HPID=
cleanup() { bench_stop_all $SPID $HPID; }
bench_on_exit cleanup
cp "$PAYLOAD/vmlinuz" "$PAYLOAD/initrd.gz" "$W/root/"
head -c $((PAR_MIB << 20)) /dev/urandom > "$W/root/par.bin"
KSHA=$(sha256sum < "$W/root/vmlinuz" | cut -d' ' -f1); ISHA=$(sha256sum < "$W/root/initrd.gz" | cut -d' ' -f1)
printf '#!ipxe\nkernel http://10.81.0.1:8080/vmlinuz console=ttyS0\ninitrd http://10.81.0.1:8080/initrd.gz\nboot\n' > "$W/root/boot-http.ipxe"
printf '#!ipxe\nkernel tftp://10.81.0.1/vmlinuz console=ttyS0\ninitrd tftp://10.81.0.1/initrd.gz\nboot\n' > "$W/root/boot-tftp.ipxe"
# The storm namespace's eth0 has no address: the emulator adds each client's leased one.
# The concurrent-TFTP namespace is 10.81.0.2.
lab_up "$W" --server 10.81.0.1/24 --client none --client 10.81.0.2/24
SRV=$LAB_SERVER; CLI=$LAB_CLIENT0; CLI_IF=$LAB_CLIENT_IF; CLI2=$LAB_CLIENT1

fb_config() {  # transport
  cat > "$W/fb.toml" <<EOF
data_dir = "$W/state"
[server]
address = "10.81.0.1"
interface = "srv0"
root = "$W/root"
[dhcp]
mode = "server"
authoritative = true
[[dhcp.subnet]]
network = "10.81.0.0/24"
range = ["10.81.0.10", "10.81.0.250"]
router = "10.81.0.1"
lease_time = 3600
[pxe]
transport = "$1"
[tftp]
enabled = true
listen = "10.81.0.1:69"
# The concurrent-TFTP section's PAR curls share one address; dnsmasq has no per-client cap.
max_transfers_per_client = 200
[http]
enabled = true
listen = "10.81.0.1:8080"
[[profile]]
name = "storm"
priority = 10
boot = { kind = "linux", kernel = "vmlinuz", initrd = ["initrd.gz"], cmdline = "console=ttyS0" }
EOF
}
wait_port() {  # proto(u|t) port
  for _ in $(seq 100); do ip netns exec "$SRV" ss -Hl"$1"n | grep -q ":$2 " && return; sleep 0.1; done
  echo "nothing listens on $1 $2" >&2; return 1
}
nginx_config() {
  mkdir -p "$W/nginx-tmp"
  cat > "$W/nginx.conf" <<EOF
daemon off;
user root;
worker_processes auto;
pid $W/nginx.pid;
error_log $W/nginx.err warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 60;
  default_type application/octet-stream;
  client_body_temp_path $W/nginx-tmp/body;
  proxy_temp_path $W/nginx-tmp/proxy;
  fastcgi_temp_path $W/nginx-tmp/fastcgi;
  uwsgi_temp_path $W/nginx-tmp/uwsgi;
  scgi_temp_path $W/nginx-tmp/scgi;
  server { listen 10.81.0.1:8080; root $W/root; }
}
EOF
}
# setups: fleetboot-http, dnsmasq-http (dnsmasq + python3 http.server), nginx-http
# (dnsmasq + nginx), fleetboot-tftp, dnsmasq-tftp
start_setup() {
  rm -rf "$W/state" "$W/dnsmasq.leases"
  local server=${1%-*} mode=${1#*-}
  case $server in
    fleetboot)
      fb_config "$mode"
      ip netns exec "$SRV" env RUST_LOG=warn "$FB" serve --config "$W/fb.toml" 2>>"$W/fb.log" & SPID=$!
      wait_port u 67; wait_port u 69; wait_port t 8080 ;;
    dnsmasq|nginx)
      local boot=http://10.81.0.1:8080/boot-http.ipxe extra=()
      [ "$mode" = tftp ] && { boot=boot-tftp.ipxe; extra=(--enable-tftp --tftp-root="$W/root" --tftp-max=400); }
      # --no-ping: fleetboot does not ping an address before offering it either.
      ip netns exec "$SRV" dnsmasq --no-daemon --port=0 --interface=srv0 --bind-interfaces \
        --dhcp-range=10.81.0.10,10.81.0.250,255.255.255.0,1h --dhcp-authoritative --no-ping \
        --quiet-dhcp --dhcp-leasefile="$W/dnsmasq.leases" --dhcp-boot="$boot" "${extra[@]}" \
        --log-facility="$W/dnsmasq.log" --pid-file= 2>>"$W/dnsmasq.err" & SPID=$!
      wait_port u 67
      if [ "$server" = nginx ]; then
        nginx_config
        ip netns exec "$SRV" nginx -c "$W/nginx.conf" -e "$W/nginx.err" 2>>"$W/nginx.err" & HPID=$!
        wait_port t 8080
      elif [ "$mode" = http ]; then
        ip netns exec "$SRV" python3 -m http.server 8080 --bind 10.81.0.1 --directory "$W/root" \
          >>"$W/http.log" 2>&1 & HPID=$!
        wait_port t 8080
      else
        wait_port u 69
      fi ;;
  esac
}
peak_rss() { awk '/^VmHWM/ {print $2}' "/proc/$SPID/status" 2>/dev/null || echo 0; }  # KiB
stop_setup() {
  for p in $SPID $HPID; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done
  SPID=; HPID=
}
storm() {  # setup -> "succeeded failed p50_ms p99_ms dhcp_retransmits tftp_timeouts rss_kib"
  local out="$W/storm.json"
  ip netns exec "$CLI" timeout 420 "$FB" emulate --clients "$CLIENTS" --interface "$CLI_IF" --timeout 360 \
    --json --expect "vmlinuz=$KSHA" --expect "initrd.gz=$ISHA" >"$out" 2>"$W/emulate.err" || true
  local rss; rss=$(peak_rss)
  python3 - "$out" "$rss" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception:
    print("ERR"); sys.exit()
b = r.get("boot") or {}
print(r["succeeded"], r["requested"] - r["succeeded"],
      round(b.get("p50", 0)), round(b.get("p99", 0)), r["dhcp_retransmits"], r["tftp_timeouts"], sys.argv[2])
EOF
}
par_tftp() {  # -> "identical seconds rss_kib"
  rm -rf "$W/par"; mkdir -p "$W/par"
  local t0 t1 pids=() ok=0
  t0=$(date +%s.%N)
  for i in $(seq "$PAR"); do
    ip netns exec "$CLI2" timeout 300 curl -s --tftp-blksize 1428 -o "$W/par/$i" tftp://10.81.0.1/par.bin &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  t1=$(date +%s.%N)
  for i in $(seq "$PAR"); do cmp -s "$W/par/$i" "$W/root/par.bin" && ok=$((ok + 1)); done
  echo "$ok $(printf "%.2f" "$(echo "$t1 - $t0" | bc)") $(peak_rss)"
}

declare -A S
SETUPS=()
others() { [ "$1" = http ] && echo "dnsmasq nginx" || echo dnsmasq; }  # mode -> the setups fleetboot is compared with
for m in $MODES; do SETUPS+=("fleetboot-$m"); for o in $(others "$m"); do SETUPS+=("$o-$m"); done; done
for run in $(seq "$RUNS"); do
  order=("${SETUPS[@]}")
  if [ $((run % 2)) = 0 ]; then  # flip the order within each mode every other run
    order=(); for m in $MODES; do for o in $(others "$m"); do order+=("$o-$m"); done; order+=("fleetboot-$m"); done
  fi
  for s in "${order[@]}"; do
    start_setup "$s"
    S[$run,$s]=$(storm "$s")
    stop_setup
    echo "run $run $s: ${S[$run,$s]}" >&2
  done
done
declare -A P
if [ "$PAR" -gt 0 ]; then
  for run in $(seq "$PAR_RUNS"); do
    for s in fleetboot-tftp dnsmasq-tftp; do
      start_setup "$s"; P[$run,$s]=$(par_tftp); stop_setup
      echo "concurrent TFTP run $run $s: ${P[$run,$s]}" >&2
    done
  done
fi

median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "-"; exit} print a[int((NR+1)/2)] }'; }
col() {  # setup field-number -> median over runs (or "-")
  for run in $(seq "$RUNS"); do
    v=${S[$run,$1]:-ERR}; [ "$v" = ERR ] || echo "$v" | cut -d' ' -f"$2"
  done | median
}
sum() { for run in $(seq "$RUNS"); do v=${S[$run,$1]:-ERR}; [ "$v" = ERR ] && echo "$CLIENTS" || echo "$v" | cut -d' ' -f"$2"; done | paste -sd+ | bc; }
ratio() { [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ && $1 != 0 ]] && echo "scale=2; $2 / $1" | bc || echo "-"; }
echo "Boot storm: $CLIENTS emulated clients at once, lab payload (kernel $(stat -c %s "$W/root/vmlinuz") B,"
echo "initrd $(stat -c %s "$W/root/initrd.gz") B), $RUNS runs alternating; boot time = DHCPDISCOVER to the"
echo "last byte of the initrd, per client; p50/p99 are medians over the runs, failures summed."
echo
echo "| transport | setup | p50 ms | p99 ms | failed clients | DHCP retransmits | TFTP timeouts | server peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
for m in $MODES; do
  for srv in fleetboot $(others "$m"); do
    s=$srv-$m; name=$srv; [ "$s" = dnsmasq-http ] && name="dnsmasq + python3 http.server"
    [ "$s" = nginx-http ] && name="dnsmasq + nginx"
    rss=$(col "$s" 7); [[ $rss =~ ^[0-9]+$ ]] && rss=$(echo "scale=1; $rss / 1024" | bc)
    [ "$srv" != fleetboot ] && [ "$m" = http ] && rss="$rss (dnsmasq only)"
    echo "| $m | $name | $(col "$s" 3) | $(col "$s" 4) | $(sum "$s" 2) of $((CLIENTS * RUNS)) | $(col "$s" 5) | $(col "$s" 6) | $rss |"
  done
done
echo
for m in $MODES; do
  for o in $(others "$m"); do
    name=$o; [ "$o-$m" = dnsmasq-http ] && name="dnsmasq + http.server"; [ "$o" = nginx ] && name="dnsmasq + nginx"
    echo "$m: $name ÷ fleetboot, p50 $(ratio "$(col fleetboot-$m 3)" "$(col "$o-$m" 3)")x, p99 $(ratio "$(col fleetboot-$m 4)" "$(col "$o-$m" 4)")x (above 1: fleetboot faster)"
  done
done
echo
echo "Every run, p50/p99 ms:"
for m in $MODES; do
  for srv in fleetboot $(others "$m"); do
    echo "  $srv-$m: $(for run in $(seq "$RUNS"); do v=${S[$run,$srv-$m]:-ERR}; [ "$v" = ERR ] && printf 'ERR ' || printf '%s/%s ' "$(echo "$v" | cut -d' ' -f3)" "$(echo "$v" | cut -d' ' -f4)"; done)"
  done
done
if [ "$PAR" -gt 0 ]; then
  echo
  echo "$PAR concurrent TFTP downloads (curl, blksize 1428) of a $PAR_MIB MiB file, one client namespace:"
  echo
  echo "| server | run | byte-identical | wall s | server peak RSS (VmHWM) MiB |"
  echo "|---|---|---|---|---|"
  for run in $(seq "$PAR_RUNS"); do
    for s in fleetboot-tftp dnsmasq-tftp; do
      read -r ok secs rss <<< "${P[$run,$s]}"
      echo "| ${s%-*} | $run | $ok of $PAR | $secs | $(echo "scale=1; $rss / 1024" | bc) |"
    done
  done
fi

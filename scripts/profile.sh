#!/usr/bin/env bash
# Where fleetboot spends its CPU on each hot path, and what this machine can carry at most.
#
# Profiles: each path runs the workload of its bench script (same clients, peers and
# topology; sizes below) with fleetboot's server-side processes under `perf record`: the
# bench script gets a wrapper as FLEETBOOT_BIN / FLEETBOOT_STREAMD_BIN that execs
# `perf record -F FREQ --call-graph dwarf -- the-real-binary ARGS` for `serve`, `send` and
# `receive`, and the real binary for everything else (`emulate`, `image import`, `keygen`:
# the clients and the preparation). DWARF call graphs, because release builds carry line
# tables (debug = 1) but no frame pointers. Every process recorded for a path is merged.
#   http       bench-storm.sh CLIENTS 1 http 0        (DHCP + iPXE script + kernel + initrd over HTTP)
#   tftp       bench-storm.sh CLIENTS 1 tftp PAR 4    (the same storm over TFTP, then PAR concurrent 4 MiB downloads)
#   nbd        BENCH_MODES=nbd bench-moonshot.sh NBD_CLIENTS 2 MIB 100 0   (nbdcopy readers, 1 then NBD_CLIENTS at once)
#   dhcp       BENCH_SERVERS=fleetboot bench-dhcp.sh SECS DHCP_RATE 10000 1   (perfdhcp DORA)
#   multicast  BENCH_TOOLS=fleetboot BENCH_LOSSES=0 bench-multicast.sh MIB 3 RATE_MBIT
#              (fleetboot-streamd send and receive: multicast-send.*, multicast-receive.*)
# The bench scripts' peers (dnsmasq, nginx, python3 http.server) run too where the script
# runs them, unrecorded. Writes into OUT, per profile: NAME.folded (collapsed stacks,
# inferno-collapse-perf; docs/profiles keeps only the rest), NAME.svg (inferno-flamegraph),
# NAME.top (the frames with the most samples, self and inclusive) and NAME.bench.txt (the
# bench script's own table, and the load average before and after).
#
# Limits (`scripts/profile.sh limits`): one core's memory copy bandwidth (memcpy of 64 MiB
# buffers), page-cache read (a cached file read into a buffer, and sent by sendfile), TCP
# over one namespace's loopback and over the lab's veth + bridge between two namespaces
# (iperf3, copying and -Z sendfile), UDP over the bridge (1400-byte datagrams, as fast as
# iperf3 can send: datagrams/s, Mbit/s, loss), and per core SHA-256 (openssl speed on
# 1400-byte messages, about a stream block, and on 64 KiB), BLAKE3 (b3sum --num-threads 1)
# and ed25519 sign/verify (openssl speed), and durable 4 KiB writes per second in /tmp (dd
# oflag=dsync; where the bench scripts keep their lease stores). Prints a markdown table.
#
# Run as root after scripts/setup.sh (linux-perf, iperf3, b3sum). Flame graphs need
# inferno: taken from PATH or target/tools/bin, else installed there
# (`cargo install inferno --locked --root target/tools`).
# usage: scripts/profile.sh [PATHS="http tftp nbd dhcp multicast"] | limits
#   PROFILE_OUT=DIR (default docs/profiles), PROFILE_FREQ=Hz (default 999),
#   PROFILE_CLIENTS (storm clients, 200), PROFILE_PAR (concurrent TFTP, 100),
#   PROFILE_NBD_CLIENTS (4), PROFILE_MIB (NBD and multicast image, 128),
#   PROFILE_SECS / PROFILE_DHCP_RATE (perfdhcp, 5 s at 2000/s), PROFILE_RATE_MBIT (400),
#   PROFILE_LIMIT_SECS (iperf3 seconds per measurement, 5);
#   FLEETBOOT_BIN / FLEETBOOT_STREAMD_BIN / FLEETBOOT_LAB_BIN profile already built binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "profile.sh: run as root" >&2; exit 1; }
PATHS=${1:-http tftp nbd dhcp multicast}
OUT=${PROFILE_OUT:-docs/profiles}; FREQ=${PROFILE_FREQ:-999}
CLIENTS=${PROFILE_CLIENTS:-200}; PAR=${PROFILE_PAR:-100}; NBD_CLIENTS=${PROFILE_NBD_CLIENTS:-4}
MIB=${PROFILE_MIB:-128}; SECS=${PROFILE_SECS:-5}; DHCP_RATE=${PROFILE_DHCP_RATE:-2000}
RATE_MBIT=${PROFILE_RATE_MBIT:-400}; LSECS=${PROFILE_LIMIT_SECS:-5}
. scripts/bench-common.sh
W=$(mktemp -d /tmp/fb-profile.XXXX)
PIDS=()
cleanup() { bench_stop_all "${PIDS[@]}"; }
bench_on_exit cleanup
load() { cut -d' ' -f1-3 /proc/loadavg; }

# ---------------------------------------------------------------------------- limits
if [ "$PATHS" = limits ]; then
  for t in iperf3 b3sum openssl cc; do
    command -v $t >/dev/null || { echo "profile.sh: $t missing (scripts/setup.sh)" >&2; exit 1; }
  done
  bench_bins
  echo "load average before: $(load)" >&2
  # One core's copy bandwidth, and a page-cache file read into a buffer / sent by sendfile
  # to /dev/null's neighbour (a pipe to nowhere costs nothing: the file goes to a socket
  # pair instead, whose reader discards).
  cat > "$W/membw.c" <<'EOF'
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  size_t n = 64u << 20; int rounds = 40;
  char *a = malloc(n), *b = malloc(n);
  memset(a, 1, n); memset(b, 2, n);
  /* the fastest round: on a shared machine, the one least disturbed by others */
  double best = 1e9, t0, t;
  for (int i = 0; i < rounds; i++) {
    t0 = now(); memcpy(b, a, n); a[i] = b[n - 1 - i]; t = now() - t0;
    if (t < best) best = t;
  }
  printf("memcpy %.2f\n", (double)n / best / 1e9);
  if (argc < 2) return 0;
  /* page-cache read of argv[1] (cached: read once first) */
  int fd = open(argv[1], O_RDONLY); off_t size = lseek(fd, 0, SEEK_END); ssize_t r;
  best = 1e9;
  for (int pass = 0; pass < 4; pass++) {  /* the first pass fills the page cache */
    lseek(fd, 0, SEEK_SET); t0 = now();
    while ((r = read(fd, b, 1 << 20)) > 0) {}
    t = now() - t0; if (pass > 0 && t < best) best = t;
  }
  printf("read %.2f\n", (double)size / best / 1e9);
  /* sendfile of the cached file into a Unix socket whose other end a child drains */
  int sv[2]; socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  if (fork() == 0) { close(sv[0]); while (read(sv[1], b, 1 << 20) > 0) {} _exit(0); }
  close(sv[1]); off_t off = 0; t0 = now();
  while (off < size && sendfile(sv[0], fd, &off, 1 << 20) > 0) {}
  printf("sendfile_unix %.2f\n", (double)size / (now() - t0) / 1e9);
  return 0;
}
EOF
  cc -O2 -o "$W/membw" "$W/membw.c"
  head -c $((512 << 20)) /dev/urandom > "$W/cached.bin"
  declare -A M
  while read -r k v; do M[$k]=$v; done < <(taskset -c 0 "$W/membw" "$W/cached.bin")
  # Hashes and signatures, one core. The stream hashes each block (SHA-256, checked by
  # every receiver) and tags each datagram (keyed BLAKE3 over ~1.4 KB).
  sha_mbs() { taskset -c 0 openssl speed -seconds 2 -bytes "$1" -evp sha256 2>/dev/null | awk '/^sha256/ {sub(/k$/, "", $NF); printf "%.0f", $NF / 1000}'; }
  sha=$(sha_mbs 1400); sha64=$(sha_mbs 65536)
  b3t0=$(date +%s.%N); taskset -c 0 b3sum --num-threads 1 --no-mmap "$W/cached.bin" >/dev/null; b3t1=$(date +%s.%N)
  b3=$(printf "%.2f" "$(echo "512 * 1.048576 / ($b3t1 - $b3t0) / 1000" | bc -l)")
  read -r ed_sign ed_verify < <(taskset -c 0 openssl speed -seconds 2 ed25519 2>/dev/null | awk '/EdDSA \(Ed25519\)/ {print $(NF-1), $NF; exit}' || true)
  # Durable writes where the bench scripts keep their lease stores (/tmp): one 4 KiB write
  # + fdatasync at a time, as a commit of a lease costs at least.
  t0=$(date +%s.%N); dd if=/dev/zero of="$W/sync.bin" bs=4k count=1000 oflag=dsync 2>/dev/null; t1=$(date +%s.%N)
  syncs=$(echo "1000 / ($t1 - $t0)" | bc); syncfs=$(df --output=fstype "$W" | tail -1)
  # Network: a lab with the server namespace and one client namespace on the bridge.
  lab_up "$W" --server 10.78.0.1/24 --client 10.78.0.2/24
  SRV=$LAB_SERVER; CLI=$LAB_CLIENT0
  sleep 1
  ip netns exec "$SRV" iperf3 -s -B 10.78.0.1 -p 5201 >/dev/null 2>&1 & PIDS+=($!)
  ip netns exec "$SRV" iperf3 -s -B 127.0.0.1 -p 5202 >/dev/null 2>&1 & PIDS+=($!)
  for _ in $(seq 50); do ip netns exec "$SRV" ss -Hltn | grep -q ':5202 ' && break; sleep 0.1; done
  ip3() {  # namespace args... -> JSON in $W/ip3.json
    ip netns exec "$1" timeout $((LSECS + 20)) iperf3 -J -t "$LSECS" "${@:2}" >"$W/ip3.json" 2>/dev/null || true
  }
  tcp() { python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]; print("%.2f" % (e["sum_received"]["bits_per_second"]/1e9))' "$W/ip3.json" 2>/dev/null || echo ERR; }
  udp() { python3 -c '
import json,sys
e=json.load(open(sys.argv[1]))["end"]; s, r = e["sum_sent"], e["sum_received"]
print("%.0f %.0f %.0f %.1f" % (s["packets"]/s["seconds"], s["bits_per_second"]/1e6, r["bits_per_second"]/1e6, r["lost_percent"]))' "$W/ip3.json" 2>/dev/null || echo "ERR ERR ERR ERR"; }
  ip3 "$SRV" -c 127.0.0.1 -p 5202; lo=$(tcp)
  ip3 "$SRV" -c 127.0.0.1 -p 5202 -Z; loz=$(tcp)
  ip3 "$CLI" -c 10.78.0.1 -p 5201; br=$(tcp)
  ip3 "$CLI" -c 10.78.0.1 -p 5201 -Z; brz=$(tcp)
  ip3 "$CLI" -c 10.78.0.1 -p 5201 -P 4; br4=$(tcp)
  # Server to client, as the multicast sender's datagrams go: -R.
  ip3 "$CLI" -c 10.78.0.1 -p 5201 -u -b 0 -l 1400 -R; read -r udp_pps udp_sent udp_mbit udp_loss <<< "$(udp)"
  ip3 "$CLI" -c 10.78.0.1 -p 5201 -u -b 1000M -l 1400 -R; read -r udp1_pps udp1_sent udp1_mbit udp1_loss <<< "$(udp)"
  echo "load average after: $(load)" >&2
  echo "Machine limits, $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r), $(date -u '+%F %H:%M UTC'), load average $(load) at the end"
  echo
  echo "| limit | measured | how |"
  echo "|---|---:|---|"
  echo "| memory copy, one core | ${M[memcpy]} GB/s | memcpy of 64 MiB buffers, the fastest of 40 rounds, \`taskset -c 0\` |"
  echo "| page-cache read, one core | ${M[read]} GB/s | read(2) of a cached 512 MiB file, 1 MiB at a time, the fastest of 3 passes |"
  echo "| page cache → sendfile → Unix socket | ${M[sendfile_unix]} GB/s | sendfile(2) of the same file, a child draining the socket |"
  echo "| TCP, loopback of one namespace | $lo Gbit/s | iperf3 -t $LSECS, one stream |"
  echo "| TCP, loopback, sendfile (-Z) | $loz Gbit/s | iperf3 -Z |"
  echo "| TCP, veth + bridge between namespaces | $br Gbit/s | iperf3 client namespace → server namespace, one stream |"
  echo "| TCP, veth + bridge, sendfile (-Z) | $brz Gbit/s | iperf3 -Z |"
  echo "| TCP, veth + bridge, 4 streams | $br4 Gbit/s | iperf3 -P 4 |"
  echo "| UDP over the bridge, unlimited | $udp_pps datagrams/s sent ($udp_sent Mbit/s), $udp_mbit Mbit/s received, $udp_loss % lost | iperf3 -u -b 0 -l 1400 -R (server namespace → client), one sending and one receiving thread |"
  echo "| UDP over the bridge, 1 Gbit/s offered | $udp1_pps datagrams/s sent ($udp1_sent Mbit/s), $udp1_mbit Mbit/s received, $udp1_loss % lost | iperf3 -u -b 1000M -l 1400 -R |"
  echo "| durable 4 KiB writes in /tmp ($syncfs) | $syncs per second | dd bs=4k count=1000 oflag=dsync (one write + fdatasync at a time) |"
  echo "| SHA-256, one core | $sha MB/s (1400-byte messages), $sha64 MB/s (64 KiB) | openssl speed -evp sha256 -bytes N (SHA-NI where the CPU has it) |"
  echo "| BLAKE3, one core | $b3 GB/s | b3sum --num-threads 1 of the cached 512 MiB file |"
  echo "| ed25519, one core | ${ed_sign:-?} signs/s, ${ed_verify:-?} verifies/s | openssl speed ed25519 |"
  exit 0
fi

# ---------------------------------------------------------------------------- profiles
command -v perf >/dev/null || { echo "profile.sh: perf missing (scripts/setup.sh: linux-perf)" >&2; exit 1; }
TOOLS=$PWD/target/tools/bin
if ! command -v inferno-flamegraph >/dev/null && [ ! -x "$TOOLS/inferno-flamegraph" ]; then
  echo "profile.sh: installing inferno into target/tools" >&2
  cargo install inferno --locked --root "$PWD/target/tools" --quiet
fi
PATH=$PATH:$TOOLS
bench_bins fleetboot fleetboot-streamd
export FLEETBOOT_LAB_BIN=$FB_LAB
mkdir -p "$OUT"
# wrapper REAL NAME: a stand-in for REAL that records `serve`, `send` and `receive`.
wrapper() {
  cat > "$W/$2" <<EOF
#!/bin/sh
case "\$1" in
  serve|send|receive)
    echo \$\$ >> "$W/recorded.pids"
    exec perf record -q -F $FREQ --call-graph dwarf,16384 --no-buildid --no-buildid-cache \\
      -o "$W/data/\$1.\$\$.data" -- "$1" "\$@" ;;
esac
exec "$1" "\$@"
EOF
  chmod 755 "$W/$2"
}
wrapper "$FB" fleetboot
wrapper "$FB_STREAMD" fleetboot-streamd
export FLEETBOOT_BIN=$W/fleetboot FLEETBOOT_STREAMD_BIN=$W/fleetboot-streamd

# fold NAME SUBCOMMAND: the recorded processes of SUBCOMMAND into NAME.folded/.svg/.top.
fold() {
  local name=$1 sub=$2 f n=0
  : > "$OUT/$name.folded"
  for f in "$W/data/$sub".*.data; do
    [ -s "$f" ] || continue
    perf script -i "$f" 2>/dev/null | inferno-collapse-perf >> "$W/$name.raw"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || { echo "profile.sh: $name: no recording of $sub" >&2; return 1; }
  # Merge the same stacks from several processes.
  python3 -c '
import collections, sys
merged = collections.Counter()
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip("\n").rpartition(" ")
    merged[stack] += int(n)
for stack in sorted(merged):
    print(stack, merged[stack])' "$W/$name.raw" > "$OUT/$name.folded"
  rm -f "$W/$name.raw"
  inferno-flamegraph --title "fleetboot: $name" --minwidth 0.2 < "$OUT/$name.folded" > "$OUT/$name.svg"
  # Self = the stack's last frame; inclusive = every stack through the frame (once).
  python3 - "$OUT/$name.folded" > "$OUT/$name.top" <<'EOF'
import collections, sys
self_, incl, total = collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip("\n").rpartition(" ")
    n = int(n); total += n
    frames = stack.split(";")
    self_[frames[-1]] += n
    for f in set(frames[1:]):
        incl[f] += n
print(f"weight: {total} (sum of sample periods: with perf's cpu-clock event, ns of CPU)")
print("self %   frame")
for f, n in self_.most_common(25):
    print(f"{100 * n / total:6.2f}  {f}")
ours = [(f, n) for f, n in incl.items() if f.startswith(("fleetboot", "<fleetboot"))]
print("inclusive %   frame (fleetboot's own code)")
for f, n in sorted(ours, key=lambda x: -x[1])[:30]:
    print(f"{100 * n / total:6.2f}  {f}")
print("inclusive %   frame (all)")
for f, n in incl.most_common(20):
    print(f"{100 * n / total:6.2f}  {f}")
EOF
  echo "profile.sh: $name: $n process(es), $(head -1 "$OUT/$name.top"), $OUT/$name.svg" >&2
}
# run NAME BENCH-SCRIPT ARGS...: the bench script's workload with the recorders on; waits
# until every recorder has written its file.
run() {
  local name=$1 p _; shift
  rm -rf "$W/data"; mkdir -p "$W/data"; : > "$W/recorded.pids"
  { echo "$ $*"; echo "load average before: $(load)"; } > "$OUT/$name.bench.txt"
  "$@" >> "$OUT/$name.bench.txt" 2>"$W/$name.err" || { cat "$W/$name.err" >&2; return 1; }
  echo "load average after: $(load)" >> "$OUT/$name.bench.txt"
  grep '^bench: lab namespaces' "$W/$name.err" >&2 || true
  for p in $(cat "$W/recorded.pids"); do
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
}
for path in $PATHS; do
  case $path in
    http) run http env scripts/bench-storm.sh "$CLIENTS" 1 http 0; fold http serve ;;
    tftp) run tftp env scripts/bench-storm.sh "$CLIENTS" 1 tftp "$PAR" 4; fold tftp serve ;;
    nbd) run nbd env BENCH_MODES=nbd scripts/bench-moonshot.sh "$NBD_CLIENTS" 2 "$MIB" 100 0; fold nbd serve ;;
    dhcp) run dhcp env BENCH_SERVERS=fleetboot scripts/bench-dhcp.sh "$SECS" "$DHCP_RATE" 10000 1; fold dhcp serve ;;
    multicast)
      run multicast env BENCH_TOOLS=fleetboot BENCH_LOSSES=0 scripts/bench-multicast.sh "$MIB" 3 "$RATE_MBIT"
      fold multicast-send send; fold multicast-receive receive ;;
    *) echo "profile.sh: unknown path $path (http tftp nbd dhcp multicast, or limits)" >&2; exit 1 ;;
  esac
done

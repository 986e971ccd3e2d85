#!/usr/bin/env bash
# Branch boot storm with and without an edge cache, in one topology and one run
# (crates/fleetboot/tests/cache_common: origin — WAN shaped with tc tbf, 1% loss each way
# — gateway — branch clients): CLIENTS `fleetboot emulate` clients boot the lab payload
# (kernel + initrd over HTTP, each client hashing what it got) straight from the origin,
# through nginx proxy_cache + proxy_cache_lock on the gateway (cold, then warm), and
# through `fleetboot cache` (transparent, cold, then warm). Prints a markdown table: boot
# p50/p99, the storm's wall time, bytes on the origin's WAN interface.
# It is the ignored test `bench_branch_storm_direct_nginx_and_cache` of
# crates/fleetboot/tests/cache_e2e.rs: its lab (namespaces, nginx, dnsmasq, fleetboot) is
# torn down when it ends; every client run is bounded by emulate's own timeout.
# Run as root after scripts/setup.sh (nginx, dnsmasq, the lab payload).
# usage: scripts/bench-cache.sh [CLIENTS=50 (1..70)] [WAN=100mbit]
set -euo pipefail
CLIENTS=${1:-50}; WAN=${2:-100mbit}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-cache.sh: run as root" >&2; exit 1; }
[ "$CLIENTS" -ge 1 ] && [ "$CLIENTS" -le 70 ] || { echo "bench-cache.sh: CLIENTS must be 1..70 (the origin's pool serves two sets of clients)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "bench-cache.sh: no nginx (scripts/setup.sh installs it)" >&2; exit 1; }
export FLEETBOOT_REQUIRE_E2E=1 FLEETBOOT_BENCH_CLIENTS="$CLIENTS" FLEETBOOT_BENCH_WAN="$WAN" CARGO_INCREMENTAL=0
exec timeout 3600 cargo nextest run -p fleetboot --test cache_e2e --run-ignored only \
  -E 'test(bench_branch_storm_direct_nginx_and_cache)' --no-capture

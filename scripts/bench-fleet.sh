#!/usr/bin/env bash
# N emulated nodes against one provisioning master on loopback: pristine boot, then
# "prepare all nodes now" and its warm boot. Prints bytes per node per stage, the warm
# boot's verification rate and the master's CPU time (docs/benchmarks.md).
#   scripts/bench-fleet.sh [AGENTS] [--release]
set -euo pipefail
agents="${1:-500}"
profile=debug
if [[ "${2:-}" == "--release" ]]; then profile=release; fi
root="$(cd "$(dirname "$0")/.." && pwd)"
exe="$root/target/$profile/fleetboot"
[[ -x "$exe" ]] || { echo "build first: cargo build ${2:-} -p fleetboot" >&2; exit 1; }
work="$(mktemp -d /tmp/fleetboot-bench-fleet.XXXXXX)"
master_pid=""
cleanup() {
    if [[ -n "$master_pid" ]]; then kill "$master_pid" 2>/dev/null || true; wait "$master_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port="$(free_port)"
admin_port="$(free_port)"
cat > "$work/fleetboot.toml" <<TOML
data_dir = "state"
[server]
address = "127.0.0.1"
[dhcp]
mode = "off"
[tftp]
enabled = false
[http]
enabled = false
[admin]
listen = "127.0.0.1:$admin_port"
[fleet]
listen = "127.0.0.1:$port"
register_unknown = true
default_class = "bench"
heartbeat_s = 2
max_nodes = 5000
TOML

src="$work/src"
mkdir -p "$src"
head -c $((256 << 10)) /dev/urandom > "$src/vmlinuz"
for p in base routing monitor; do head -c $((64 << 10)) /dev/urandom > "$src/$p"; done
cat > "$src/bundle.toml" <<TOML
format = 1
[[image]]
name = "lc-boot"
version = "1.0"
node_types = ["linecard"]
[[image.build]]
arch = "x86_64"
files = [{ path = "vmlinuz", source = "vmlinuz" }]
[[package]]
name = "base"
version = "1.0"
[[package.build]]
arch = "noarch"
files = [{ path = "base", source = "base" }]
[[package]]
name = "routing"
version = "1.0"
depends = [{ name = "base", version = ">=1" }]
[[package.build]]
arch = "noarch"
files = [{ path = "routing", source = "routing" }]
[[package]]
name = "monitor"
version = "1.0"
depends = [{ name = "base" }]
[[package.build]]
arch = "noarch"
files = [{ path = "monitor", source = "monitor" }]
[[class]]
name = "bench"
packages = { routing = "latest", monitor = "latest" }
TOML
"$exe" bundle build "$src" -o "$work/bench.fbundle" >/dev/null
"$exe" bundle import "$work/bench.fbundle" -c "$work/fleetboot.toml" >/dev/null
RUST_LOG=warn "$exe" master --config "$work/fleetboot.toml" 2>"$work/master.log" &
master_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/fleet/v1/master-key" >/dev/null && break; sleep 0.1; done
echo "fleetboot $profile, $agents emulated nodes, $(nproc) cores; per node: image 256 KiB + 3 packages of 64 KiB"
# The master made an admin token for its operator routes on its first start.
RUST_LOG=warn "$exe" fleet emulate --master "http://127.0.0.1:$port" --admin "http://127.0.0.1:$admin_port" --agents "$agents" --work "$work/nodes" \
    --token-file "$work/state/admin.token" --master-pid "$master_pid" --deadline 300 --json

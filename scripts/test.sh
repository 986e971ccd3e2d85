#!/usr/bin/env bash
# Runs every fleetboot test: unit, property and simulation tests, loopback integration
# tests, and the end-to-end tests in private network namespaces with real clients
# (dhclient, curl, tftp-hpa, atftp) and real firmware (QEMU's iPXE).
# Installs what those need first (scripts/setup.sh). Run as root.   usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the end-to-end tests create network namespaces)" >&2; exit 1; }
scripts/setup.sh
# The serving code must build without the lab and the emulator (the `lab` feature).
cargo build -p fleetboot --no-default-features
# In this run a missing tool or missing root is a failure, not a skipped test.
export FLEETBOOT_REQUIRE_E2E=1
# The bench scripts' smoke test runs fleetboot, fleetboot-streamd and fleetboot-lab from
# target/debug: build them all, even when "$@" narrows the run to one package.
cargo build --workspace --bins --quiet
cargo nextest run --workspace --no-fail-fast "$@"

#!/usr/bin/env bash
# fleetboot's main job, end to end on this one machine: builds a private network in
# namespaces, runs fleetboot in it, boots QEMU VMs (iPXE ROM on BIOS, or UEFI firmware)
# from it and prints each VM's timeline from DHCPDISCOVER to the payload's marker line.
# Installs what it needs first (scripts/setup.sh). Run as root.
# usage: scripts/run-lab.sh [--vms N] [--mode http|tftp|proxy] [--compare RUNS] [--keep]
#          [--firmware bios|uefi|uefi-http|secureboot|arm64] [--loader ipxe|ipxe-full|grub|pxelinux]
#          [--unsigned]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run-lab.sh: run as root (the lab creates network namespaces)" >&2; exit 1; }
scripts/setup.sh
cargo build --release --quiet -p fleetboot
exec target/release/fleetboot lab "$@"

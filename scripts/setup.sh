#!/usr/bin/env bash
# Prepares a Debian bookworm machine for fleetboot's end-to-end tests and the boot lab:
# real firmware clients (QEMU + iPXE ROMs; OVMF and AAVMF UEFI firmware, qemu-system-arm),
# the boot files fleets run (Debian's iPXE EFI builds, shim-signed, signed GRUB network
# images, GRUB's i386-pc modules, PXELINUX), the DHCP clients operating systems run
# (dhcpcd, busybox udhcpc, systemd-networkd), systemd-nspawn and cargo-deb for the package's
# tests, peers to compare against (dnsmasq, atftpd, tftp-hpa, udpcast, uftp, nbdkit, kea's
# perfdhcp, nginx as the HTTP caching proxy edge caches are compared with), network tools,
# and the lab payloads
# (x86 and arm64 kernels + busybox initramfs, GRUB's i386-pc network image; see
# scripts/build-payload.sh).
# Idempotent; run as root.  usage: scripts/setup.sh
#   FLEETBOOT_PAYLOAD=DIR   where to build/cache the payload (default /var/cache/fleetboot-lab/payload)
# QEMU: the machine ships qemu-utils from bookworm-backports, and bookworm's own
# qemu-system-x86 (7.2) conflicts with it, so qemu-system-x86 comes from backports too; the
# backports entry reuses the mirror the machine is already configured with.
# Server packages never get to run a daemon on the host: service starts are blocked while
# installing (policy-rc.d), and atftpd, kea-dhcp4-server (the DHCP peer of
# scripts/bench-dhcp.sh, which runs it in the foreground inside a namespace) and nginx (to
# be run in the foreground inside a namespace, never as a host daemon) are stopped and
# disabled afterwards. tftpd-hpa is NOT installed: it conflicts with atftpd (apt would
# remove atftpd, the RFC 2090 multicast peer) and would start a daemon on the host's port
# 69; tftp-hpa (the client) is installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root" >&2; exit 1; }
pkgs=(dnsmasq-base busybox-static e2fsprogs tcpdump tshark udpcast uftp atftp atftpd tftp-hpa curl openssl
      nbdkit libnbd-bin nbd-client isc-dhcp-client kea-admin kea-dhcp4-server nftables iproute2 bc python3 coreutils
      ovmf qemu-efi-aarch64 ipxe shim-signed grub-efi-amd64-signed grub-efi-amd64-bin grub-pc-bin grub-common
      pxelinux syslinux-common dhcpcd-base udhcpc systemd systemd-container man-db chromium chromium-driver nginx)
# PostgreSQL: the shared store's tests start a private cluster (initdb in a temporary
# directory, as the postgres user); Debian's own cluster service stays stopped.
pkgs+=(postgresql)
# scripts/profile.sh: perf for the profiles; iperf3 and b3sum for the machine's limits.
pkgs+=(linux-perf iperf3 b3sum)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || need+=("$p"); done
have_qemu=1
command -v qemu-system-x86_64 >/dev/null 2>&1 && command -v qemu-system-aarch64 >/dev/null 2>&1 \
  && dpkg -s ipxe-qemu >/dev/null 2>&1 || have_qemu=0
if [ ${#need[@]} -gt 0 ] || [ $have_qemu = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if [ $have_qemu = 0 ] && ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q bpo; then
    src=/etc/apt/sources.list.d/debian.sources
    if [ -f "$src" ]; then
      uri=$(awk '/^URIs:/{print $2; exit}' "$src")
    else
      uri=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    uri=${uri:-http://deb.debian.org/debian}
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$uri" > /etc/apt/sources.list.d/lab-backports.sources
  fi
  # Block service starts during the install (atftpd would otherwise listen on the
  # host's port 69). Keep an existing policy-rc.d untouched.
  policy=/usr/sbin/policy-rc.d; own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; own_policy=1
  fi
  trap '[ $own_policy = 1 ] && rm -f "$policy"' EXIT
  apt-get update -qq
  [ ${#need[@]} -gt 0 ] && apt-get install -y -qq --no-install-recommends "${need[@]}"
  # qemu-system-arm from backports too: it must match qemu-system-common of qemu-system-x86.
  [ $have_qemu = 1 ] || apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-system-arm ipxe-qemu
fi
# No TFTP, DHCP, web, database or iperf3 daemons on the host: tests start their own peers inside
# network namespaces and their own PostgreSQL clusters.
for svc in tftpd-hpa atftpd kea-dhcp4-server nginx postgresql iperf3; do
  if [ -d /run/systemd/system ]; then
    systemctl disable --now "$svc.service" "$svc.socket" >/dev/null 2>&1 || true
  else
    if [ -x "/etc/init.d/$svc" ]; then "/etc/init.d/$svc" stop >/dev/null 2>&1 || true; update-rc.d "$svc" disable >/dev/null 2>&1 || true; fi
  fi
done
if [ -f /etc/default/tftpd-hpa ]; then sed -i 's/^RUN_DAEMON=.*/RUN_DAEMON="no"/' /etc/default/tftpd-hpa; fi
for t in qemu-system-x86_64 qemu-system-aarch64 dnsmasq python3 ip ss timeout busybox curl dhcpcd grub-mknetdir nginx; do
  command -v "$t" >/dev/null || { echo "setup.sh: $t is still missing" >&2; exit 1; }
done
# The firmware and boot files the lab's --firmware modes use, where Debian installs them.
for f in /usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/OVMF/OVMF_CODE_4M.ms.fd /usr/share/OVMF/OVMF_VARS_4M.ms.fd \
         /usr/share/AAVMF/AAVMF_CODE.fd /usr/lib/ipxe/snponly.efi /usr/lib/ipxe/ipxe.efi \
         /usr/lib/shim/shimx64.efi.signed /usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed \
         /usr/lib/PXELINUX/lpxelinux.0 /usr/lib/syslinux/modules/bios/ldlinux.c32; do
  [ -e "$f" ] || { echo "setup.sh: $f is missing" >&2; exit 1; }
done
[ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || [ -e /usr/share/qemu/efi-virtio.rom ] || echo "setup.sh: warning: no efi-virtio.rom (iPXE ROM for virtio-net)" >&2
payload=${FLEETBOOT_PAYLOAD:-/var/cache/fleetboot-lab/payload}
"$here/build-payload.sh" "$payload" x86 x86-net grub-pc arm64 >/dev/null
command -v cargo >/dev/null || echo "setup.sh: note: no Rust toolchain on PATH (https://rustup.rs); the lab itself only needs the packages above" >&2
# The Debian package is built with cargo-deb (packaging/build-deb.sh; tests/package_e2e.rs
# also boots its units with systemd-nspawn, from systemd-container above).
if command -v cargo >/dev/null && ! command -v cargo-deb >/dev/null; then
  cargo install cargo-deb --locked --version 3.8.0 --quiet
fi
# scripts/profile.sh folds perf's stacks and draws flame graphs with inferno (its smoke
# test in crates/fleetboot-lab/tests/bench_scripts_e2e.rs needs it too).
if command -v cargo >/dev/null && ! command -v inferno-flamegraph >/dev/null; then
  cargo install inferno --locked --version 0.12.8 --quiet
fi
echo "setup.sh: lab dependencies installed; payload in $payload"

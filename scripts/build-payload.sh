#!/usr/bin/env bash
# Builds the tiny bootable payload the lab harness (crates/fleetboot-lab) serves: a Debian
# cloud kernel and a busybox initramfs whose /init prints
#   FLEETBOOT-LAB-MARKER nonce=<value of fleetboot.nonce= on the kernel command line> uptime=...
# on the serial console and powers off. Output: OUTDIR/vmlinuz, OUTDIR/initrd.gz.
# Idempotent (an existing payload is kept). Needs busybox-static and apt (`apt-get download`).
# usage: scripts/build-payload.sh [OUTDIR]   (default: $FLEETBOOT_PAYLOAD or
#        /var/cache/fleetboot-lab/payload)
set -euo pipefail
out=${1:-${FLEETBOOT_PAYLOAD:-/var/cache/fleetboot-lab/payload}}
mkdir -p "$out"; out=$(cd "$out" && pwd)
[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && exit 0
command -v busybox >/dev/null || { echo "build-payload.sh: busybox-static is not installed (run scripts/setup.sh)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"   # apt-get download runs as _apt and must be able to write here
cd "$tmp"
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$kpkg" ] || { echo "build-payload.sh: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
apt-get download "$kpkg" >/dev/null
dpkg-deb -x ./*.deb x
cp x/boot/vmlinuz-* "$out/vmlinuz.tmp"
mkdir -p ir/bin ir/dev ir/proc ir/sys
cp "$(command -v busybox)" ir/bin/busybox
cat > ir/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys
NONCE=$(sed -n 's/.*fleetboot\.nonce=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "FLEETBOOT-LAB-MARKER nonce=${NONCE:-none} uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
INIT
chmod 755 ir/init
(cd ir && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9) > "$out/initrd.gz.tmp"
# publish atomically so a half-built payload is never taken for a finished one
mv "$out/vmlinuz.tmp" "$out/vmlinuz"; mv "$out/initrd.gz.tmp" "$out/initrd.gz"
chmod a+r "$out/vmlinuz" "$out/initrd.gz"
ls -la "$out"

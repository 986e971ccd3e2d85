#!/usr/bin/env bash
# Builds the tiny bootable payloads the lab harness (crates/fleetboot-lab) serves. Each is a
# Debian cloud kernel and a busybox initramfs whose /init prints
#   FLEETBOOT-LAB-MARKER nonce=<value of fleetboot.nonce= on the kernel command line> uptime=...
# on the serial console and powers off.
#
# usage: scripts/build-payload.sh [OUTDIR] [PART...]
#   OUTDIR  default: $FLEETBOOT_PAYLOAD or /var/cache/fleetboot-lab/payload
#   PART    x86      (default) OUTDIR/vmlinuz, OUTDIR/initrd.gz: linux-image-cloud-amd64 (the
#                    signed kernel, so it also boots under Secure Boot) + this host's busybox
#           x86-net  OUTDIR/x86-modules/*.ko: the modules the x86 kernel needs for a virtio
#                    NIC (virtio-pci and virtio-net are modules in Debian's cloud kernel), from
#                    the package of exactly the kernel version in OUTDIR/vmlinuz, with
#                    OUTDIR/x86-modules/order listing them in loading order
#           grub-pc  OUTDIR/grub-pc/grub/i386-pc/core.0 and its modules: GRUB's i386-pc
#                    network image (grub-mknetdir, from grub-pc-bin), prefix /grub
#           arm64    OUTDIR/arm64/{vmlinuz,initrd.gz,grubnetaa64.efi}: linux-image-cloud-arm64,
#                    busybox-static and grub-efi-arm64-signed's network image, all from
#                    Debian's arm64 packages through a private apt state (the host's apt
#                    configuration and architectures are left alone)
# Idempotent: a part that is already built is kept. Needs busybox-static and apt.
set -euo pipefail
out=${1:-${FLEETBOOT_PAYLOAD:-/var/cache/fleetboot-lab/payload}}
shift || true
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(x86)
mkdir -p "$out"; out=$(cd "$out" && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"   # apt-get download runs as _apt and must be able to write here

# initramfs BUSYBOX OUT: the marker-printing /init around a static busybox
initramfs() {
  local ir; ir=$(mktemp -d "$tmp/ir.XXXX")
  mkdir -p "$ir/bin" "$ir/dev" "$ir/proc" "$ir/sys"
  cp "$1" "$ir/bin/busybox"
  cat > "$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys
NONCE=$(sed -n 's/.*fleetboot\.nonce=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "FLEETBOOT-LAB-MARKER nonce=${NONCE:-none} uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
INIT
  chmod 755 "$ir/init"
  (cd "$ir" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9) > "$2"
}

build_x86() {
  [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && return 0
  command -v busybox >/dev/null || { echo "build-payload.sh: busybox-static is not installed (run scripts/setup.sh)" >&2; exit 1; }
  local d="$tmp/x86"; mkdir -p "$d"; chmod 755 "$d"
  local kpkg
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$kpkg" ] || { echo "build-payload.sh: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
  (cd "$d" && apt-get download "$kpkg" >/dev/null && dpkg-deb -x ./*.deb x)
  cp "$d"/x/boot/vmlinuz-* "$out/vmlinuz.tmp"
  initramfs "$(command -v busybox)" "$out/initrd.gz.tmp"
  # publish atomically so a half-built payload is never taken for a finished one
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"; mv "$out/initrd.gz.tmp" "$out/initrd.gz"
  chmod a+r "$out/vmlinuz" "$out/initrd.gz"
}

# The modules for a virtio NIC, in the order insmod must load them.
X86_NET_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net)

build_x86_net() {
  local m="$out/x86-modules"
  [ -s "$m/order" ] && return 0
  [ -s "$out/vmlinuz" ] || build_x86
  # The kernel's version string: the bzImage header points to it (offset 0x20e, + 0x200).
  local off ver
  off=$(od -An -tu2 -j526 -N2 "$out/vmlinuz" | tr -d ' ')
  ver=$(dd if="$out/vmlinuz" bs=1 skip=$((off + 512)) count=128 2>/dev/null | tr '\0' ' ' | cut -d' ' -f1)
  [ -n "$ver" ] || { echo "build-payload.sh: cannot read the kernel version of $out/vmlinuz" >&2; exit 1; }
  local d="$tmp/x86-net"; mkdir -p "$d"; chmod 755 "$d"
  (cd "$d" && apt-get download "linux-image-$ver" >/dev/null && dpkg-deb -x ./*.deb x) || {
    echo "build-payload.sh: linux-image-$ver is not downloadable; rebuild the x86 part (remove $out/vmlinuz and $out/initrd.gz)" >&2; exit 1; }
  rm -rf "$m.tmp"; mkdir -p "$m.tmp"
  local name f
  for name in "${X86_NET_MODULES[@]}"; do
    f=$(find "$d/x/lib/modules/$ver" -name "$name.ko" | head -1)
    [ -n "$f" ] || { echo "build-payload.sh: $name.ko is not in linux-image-$ver" >&2; exit 1; }
    cp "$f" "$m.tmp/"
    echo "$name" >> "$m.tmp/order"
  done
  chmod -R a+rX "$m.tmp"
  rm -rf "$m"; mv "$m.tmp" "$m"
}

build_grub_pc() {
  [ -s "$out/grub-pc/grub/i386-pc/core.0" ] && return 0
  [ -d /usr/lib/grub/i386-pc ] || { echo "build-payload.sh: grub-pc-bin is not installed (run scripts/setup.sh)" >&2; exit 1; }
  rm -rf "$out/grub-pc.tmp"; mkdir -p "$out/grub-pc.tmp"
  grub-mknetdir --net-directory="$out/grub-pc.tmp" --subdir=grub -d /usr/lib/grub/i386-pc \
    --locales= --fonts= --themes= >/dev/null
  # fleetboot renders grub/grub.cfg per client; grub-mknetdir's own only sources it
  rm -f "$out/grub-pc.tmp/grub/grub.cfg"
  chmod -R a+rX "$out/grub-pc.tmp"
  rm -rf "$out/grub-pc"; mv "$out/grub-pc.tmp" "$out/grub-pc"
}

build_arm64() {
  local a="$out/arm64"
  [ -s "$a/vmlinuz" ] && [ -s "$a/initrd.gz" ] && [ -s "$a/grubnetaa64.efi" ] && return 0
  # A private apt state for arm64: lists, cache and an empty dpkg status under $tmp.
  local st="$tmp/apt-arm64"; mkdir -p "$st/lists/partial" "$st/cache/archives/partial" "$st/dl"
  : > "$st/status"; chmod -R 777 "$st"
  local o=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::Lists="$st/lists"
           -o Dir::Cache="$st/cache" -o Dir::State::status="$st/status" -o Debug::NoLocking=1)
  apt-get "${o[@]}" update -qq
  local kpkg
  kpkg=$(apt-cache "${o[@]}" depends linux-image-cloud-arm64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$kpkg" ] || { echo "build-payload.sh: cannot resolve linux-image-cloud-arm64 for arm64" >&2; exit 1; }
  (cd "$st/dl" && apt-get "${o[@]}" download "$kpkg" busybox-static grub-efi-arm64-signed >/dev/null)
  for deb in "$st"/dl/*.deb; do dpkg-deb -x "$deb" "$st/x"; done
  mkdir -p "$a.tmp"
  cp "$st"/x/boot/vmlinuz-* "$a.tmp/vmlinuz"
  cp "$st/x/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed" "$a.tmp/grubnetaa64.efi"
  initramfs "$st/x/bin/busybox" "$a.tmp/initrd.gz"
  chmod -R a+rX "$a.tmp"
  rm -rf "$a"; mv "$a.tmp" "$a"
}

for p in "${parts[@]}"; do
  case "$p" in
    x86) build_x86 ;;
    x86-net) build_x86_net ;;
    grub-pc) build_grub_pc ;;
    arm64) build_arm64 ;;
    *) echo "build-payload.sh: unknown part $p (x86, x86-net, grub-pc, arm64)" >&2; exit 2 ;;
  esac
done
ls -la "$out"

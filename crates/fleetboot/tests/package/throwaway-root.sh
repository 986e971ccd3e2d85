#!/usr/bin/env bash
# Installs a fleetboot .deb into a throwaway copy of this host's root and runs its units
# under systemd there, writing what it saw to OUT for package_e2e.rs to check.
#   usage: unshare --mount --net --pid --fork --propagation private throwaway-root.sh DEB OUT
# The copy is an overlay over / whose writes go to a tmpfs: dpkg -i creates the user, the
# directories and the units there, not on the host. The private mount namespace drops it
# all when this script ends; the private network namespace (and systemd-nspawn's own)
# keeps the booted container and its DHCP server off every real network.
set -euo pipefail
deb=$1 out=$2
[ -n "$deb" ] && [ -d "$out" ]
# This PID namespace's own /proc (systemd-nspawn finds its child by pid in it).
mount -t proc proc /proc
scratch=$(mktemp -d /tmp/fleetboot-root.XXXXXX)
trap 'umount -R "$scratch" 2>/dev/null || umount -l "$scratch" 2>/dev/null || true; rmdir "$scratch" 2>/dev/null || true' EXIT
mount -t tmpfs tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
R=$scratch/root
# A clean /tmp and /run in the copy; /proc and /dev for dpkg and the tools it runs.
mount -t tmpfs tmpfs "$R/tmp"
mount -t tmpfs tmpfs "$R/run"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
inroot() { chroot "$R" "$@"; }
cp "$deb" "$R/tmp/fleetboot.deb"

# --- install -----------------------------------------------------------------------------
inroot dpkg -i /tmp/fleetboot.deb > "$out/dpkg-install.log" 2>&1
inroot getent passwd fleetboot > "$out/passwd"
inroot stat -c '%U:%G %a %n' /var/lib/fleetboot /etc/fleetboot/fleetboot.toml /srv/fleetboot /usr/bin/fleetboot > "$out/stat"
inroot man -w fleetboot-doctor > "$out/man-doctor" 2>&1 || true
units="fleetboot.service fleetboot-negotiate@fleetboot.service fleetboot-files@fleetboot.service
fleetboot-stream@fleetboot.service fleetboot-nbd@fleetboot.service fleetboot-cache@fleetboot.service
fleetboot-master@fleetboot.service"
: > "$out/verify"
for u in $units; do
  rc=0; inroot systemd-analyze verify "$u" > "$out/verify-$u.log" 2>&1 || rc=$?
  echo "$u $rc $(wc -c < "$out/verify-$u.log")" >> "$out/verify"
  inroot systemd-analyze security --offline=true --no-pager "/lib/systemd/system/${u/@fleetboot/@}" \
    > "$out/security-$u.log" 2>&1 || true
done
rc=0; inroot runuser -u fleetboot -- fleetboot check-config --config /etc/fleetboot/fleetboot.toml \
  > "$out/check-config-as-fleetboot.log" 2>&1 || rc=$?
echo "$rc" > "$out/check-config-as-fleetboot.rc"
rc=0; inroot fleetboot doctor --config /etc/fleetboot/fleetboot.toml --json --no-dhcp-probe \
  > "$out/doctor.json" 2> "$out/doctor.err" || rc=$?
echo "$rc" > "$out/doctor.rc"
sed 's|^data_dir = .*|data_dir = "/srv/state"|' "$R/etc/fleetboot/fleetboot.toml" > "$R/tmp/elsewhere.toml"
inroot fleetboot doctor --config /tmp/elsewhere.toml --json --no-dhcp-probe > "$out/doctor-elsewhere.json" 2>/dev/null || true

# --- fleetboot.service and a role template under systemd -----------------------------------
# A server config for a veth pair inside the container: fleetboot on fb0 (10.77.0.1),
# dhclient on fbc0. The container boots only fb-test.target.
sed -i -e 's|^address = "192.0.2.1"|address = "10.77.0.1"\ninterface = "fb0"|' \
       -e 's|^mode = "off"|mode = "server"\n[[dhcp.subnet]]\nnetwork = "10.77.0.0/24"\nrange = ["10.77.0.100", "10.77.0.199"]|' \
       "$R/etc/fleetboot/fleetboot.toml"
echo hello-from-fleetboot > "$R/srv/fleetboot/hello.txt"
cat > "$R/etc/systemd/system/fb-net.service" <<'U'
[Unit]
Description=veth pair for the fleetboot package test
DefaultDependencies=no
Before=fleetboot.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link add fb0 type veth peer name fbc0
ExecStart=/sbin/ip addr add 10.77.0.1/24 dev fb0
ExecStart=/sbin/ip link set fb0 up
ExecStart=/sbin/ip link set fbc0 up
ExecStart=/sbin/ip link set lo up
U
cat > "$R/etc/systemd/system/fb-check.service" <<'U'
[Unit]
Description=what the fleetboot package test checks, then power off
After=fleetboot.service fleetboot-nbd@fleetboot.service
[Service]
Type=oneshot
ExecStart=/bin/sh /root/fb-check.sh
ExecStopPost=/bin/systemctl poweroff --no-block
U
cat > "$R/etc/systemd/system/fb-test.target" <<'U'
[Unit]
Description=fleetboot package test
Wants=fb-net.service fleetboot.service fleetboot-nbd@fleetboot.service fb-check.service
AllowIsolate=yes
U
cat > "$R/root/fb-check.sh" <<'S'
#!/bin/sh
# Runs inside the container: facts about the running units, one file each, in /root/out.
mkdir -p /root/out; cd /root/out
for i in $(seq 1 120); do
  ss -Hltn | grep -q ':8080 ' && ss -Hltn | grep -q ':8081 ' && ss -Hltn | grep -q ':10809 ' && break; sleep 0.5
done
for u in fleetboot.service fleetboot-nbd@fleetboot.service; do
  systemctl show "$u" -p ActiveState -p SubState -p Result -p NRestarts > "show-$u"
  pid=$(systemctl show "$u" -p MainPID --value)
  grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$pid/status" > "status-$u"
  awk '$5 == "/" || $5 == "/var/lib/fleetboot" || $5 == "/srv/fleetboot" {print $5, $6}' "/proc/$pid/mountinfo" > "mounts-$u"
  journalctl -u "$u" --no-pager > "journal-$u" 2>&1
done
ss -Hlunp > listening-udp; ss -Hltnp > listening-tcp
curl -sS --max-time 10 http://10.77.0.1:8080/files/hello.txt > http.txt 2>&1
curl -sS --max-time 10 tftp://10.77.0.1/hello.txt > tftp.txt 2>&1
timeout 30 dhclient -1 -v -sf /bin/true -lf /tmp/dhclient.leases -pf /tmp/dhclient.pid fbc0 > dhclient.log 2>&1
echo $? > dhclient.rc
# The API is on the admin listener (this host only), behind the token the first start made.
curl -sS --max-time 10 -H "Authorization: Bearer $(cat /var/lib/fleetboot/admin.token)" http://127.0.0.1:8081/api/leases > leases.json 2>&1
ls -ln /var/lib/fleetboot > state-dir
systemd-analyze critical-chain fb-check.service > boot-chain 2>&1
S
# The container has no network to wait for: the host's wait-online services would hold
# network-online.target (which the units want) for minutes.
for u in networking.service ifupdown-wait-online.service systemd-networkd-wait-online.service \
         NetworkManager-wait-online.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$u"
done
umount -R "$R/dev" "$R/proc" "$R/run" "$R/tmp"
# systemd-nspawn keeps its bookkeeping in /run: a private one here.
mount -t tmpfs tmpfs /run
# A machine id of its own (the copy has the host's).
rm -f "$R/etc/machine-id"
uuid=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
rc=0
timeout 240 systemd-nspawn --directory="$R" --boot --private-network --register=no --keep-unit \
  --uuid="$uuid" --link-journal=no --console=pipe -- systemd.unit=fb-test.target > "$out/console.log" 2>&1 < /dev/null || rc=$?
echo "$rc" > "$out/nspawn.rc"
cp -r "$R/root/out" "$out/booted" 2>/dev/null || true

# --- remove and purge --------------------------------------------------------------------
mount -t proc proc "$R/proc"
inroot dpkg -r fleetboot > "$out/dpkg-remove.log" 2>&1
ls "$R/lib/systemd/system" | grep '^fleetboot' > "$out/units-after-remove" || true
ls "$R/etc/fleetboot" > "$out/etc-after-remove" 2>&1 || true
inroot dpkg -P fleetboot > "$out/dpkg-purge.log" 2>&1
ls "$R/etc/fleetboot" > "$out/etc-after-purge" 2>&1 || true
inroot getent passwd fleetboot > "$out/passwd-after-purge" || true
[ -d "$R/var/lib/fleetboot" ] && echo kept > "$out/state-after-purge" || echo gone > "$out/state-after-purge"
umount "$R/proc"
echo done > "$out/finished"

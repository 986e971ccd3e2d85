//! The provisioning master and the node agent with real machines: two QEMU VMs (TCG),
//! each with its own local disk (a qcow2 file on an NVMe drive, ext4), run the real
//! `fleetboot agent node` in their initramfs against a real `fleetboot master` in the
//! lab's server namespace, over a virtio NIC on the lab's bridge.
//!
//! A boot of a node is one run of QEMU: the guest's `/init` loads the virtio NIC modules
//! (`scripts/build-payload.sh DIR x86-net`: Debian's cloud kernel has them as modules),
//! sets its address, mounts its disk, prints a digest of what the agent stores there, runs
//! the agent once (`--boots 1`, its storage on the disk, test packages in a tmpfs), prints
//! the digest again and powers off. A node that asks to reboot is booted again with the
//! same disk, so "reboot" here is a power cycle: only what is on the disk survives. The
//! kernel and initramfs come from QEMU (`-kernel/-initrd`); network boot itself is
//! covered by `lab_e2e.rs`. The boot image the master hands out is a small stand-in file
//! the agent stores like any other.
//!
//! Packages are `run` scripts printing `PKG <name> <version>`, so the console shows what
//! runs. Both nodes are linecards of class `linecards`; they ask by features — `lc1`
//! for `bgp`, `lc2` for `bgp` and `snmp` —, so the class's preferred versions apply to both
//! and features give them different sets. Four rounds, the two VMs booting side by side
//! in each (eight boots):
//! 1. pristine: both install (image + their set), ask to reboot;
//! 2. `lc1` verifies: a match, 0 bytes of images or packages from the master (its
//!    counters), the stored set runs; `lc2`'s disk has a corrupted package: the
//!    verification finds it, only that package moves, and it runs;
//! 3. routing 1.1 imported (the class prefers the latest): `lc1` gets only routing 1.1's
//!    bytes and runs it; `lc2` is in test mode on routing 1.1: it runs from memory, the
//!    disk is unchanged;
//! 4. routing rolled back to 1.0 for the class, `lc2`'s test mode ended: `lc1` gets only
//!    routing 1.0's bytes and runs it; `lc2` runs its stored set with no download, its
//!    disk still as before the test boot.
//!
//! A second test runs `fleetboot fleet prepare` with three VMs (lc1..lc3, no features:
//! the class's configuration): the three boot together into the campaign from empty disks
//! and store, the master orders the warm boot, and the power-cycled three only validate
//! (two rounds, six boots).
//!
//! Assertions are counts (bytes the master served per node, verifications, bytes the
//! agent fetched), verdicts, console markers and disk digests; never times. Needs root,
//! QEMU, qemu-img, mkfs.ext4, busybox, strip and the lab payload with its `x86-net` part;
//! skips otherwise unless `FLEETBOOT_REQUIRE_E2E=1`.

mod common;

use common::{s, TestDir, BIN};
use fleetboot_lab::netns::{Lab, Proto, SERVER_ADDR};
use fleetboot_lab::payload::{self, Part};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const MASTER_PORT: u16 = 8790;
/// The master's operator API (`[admin]`), on loopback in the server's namespace.
const MASTER_ADMIN_PORT: u16 = 8791;
/// A VM whose console stays silent this long is hung (a slow one keeps printing).
const SILENCE_SECS: u64 = 150;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt; mount -t tmpfs tmpfs /tmp
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
BOOT=$(arg fleet.boot); ADDR=$(arg fleet.addr); MAC=$(arg fleet.mac); MASTER=$(arg fleet.master)
FEATURES=$(arg fleet.features); CORRUPT=$(arg fleet.corrupt)
fail() { echo; echo "FLEET-VM-FAIL boot=$BOOT $*"; poweroff -f; }
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || fail "insmod $m"; done
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
ip link set lo up; ip addr add $ADDR/24 dev eth0 && ip link set eth0 up || fail "no eth0"
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/nvme0n1 /mnt || fail "cannot mount the local disk"
digest() { if [ -d /mnt/fleet ]; then (cd /mnt/fleet && find . -type f | sort | xargs sha256sum) | sha256sum | cut -d' ' -f1; else echo empty; fi; }
if [ -n "$CORRUPT" ]; then
  [ -f /mnt/fleet/blobs/$CORRUPT ] || fail "no stored blob $CORRUPT to corrupt"
  printf X | dd of=/mnt/fleet/blobs/$CORRUPT bs=1 count=1 conv=notrunc 2>/dev/null; sync
fi
echo; echo "FLEET-VM-DISK boot=$BOOT before=$(digest)"
set --; for f in $(echo $FEATURES | tr , ' '); do set -- "$@" --feature $f; done
# fleet.master: one HOST:PORT or a comma list of them (the master and its backups).
MASTERS=$(echo "$MASTER" | sed 's#\([^,][^,]*\)#http://\1#g')
fleetboot agent node --master "$MASTERS" --mac $MAC --type linecard --arch x86_64 --exec --json \
  --storage /mnt/fleet --volatile /tmp/volatile --boots 1 "$@"
RC=$?
sync; AFTER=$(digest); umount /mnt
echo; echo "FLEET-VM-END boot=$BOOT rc=$RC after=$AFTER"
poweroff -f
"#;

fn run_script(name: &str, version: &str) -> String {
    format!("#!/bin/sh\necho \"PKG {name} {version}\"\n")
}

fn len(name: &str, version: &str) -> u64 {
    run_script(name, version).len() as u64
}

fn sha_hex(bytes: &[u8]) -> String {
    fleetboot_fleet::Sha256::of(bytes).as_str().to_string()
}

const IMAGE: &str = "lab boot image 1.0\n";

/// Class `linecards` (routing and monitor, latest) and `n` linecards in it, `lc1`..: MAC
/// `52:54:00:66:00:0i`.
fn linecards(n: usize) -> String {
    let mut toml = String::from("[[class]]\nname = \"linecards\"\npackages = { routing = \"latest\", monitor = \"latest\" }\n");
    for i in 1..=n {
        toml.push_str(&format!("[[node]]\nname = \"lc{i}\"\nmac = \"52:54:00:66:00:0{i}\"\ntype = \"linecard\"\narch = \"x86_64\"\nclass = \"linecards\"\n"));
    }
    toml
}

/// A bundle source directory: the boot image and packages whose `run` prints a marker.
fn bundle_dir(root: &Path, name: &str, packages: &[(&str, &str, &str, &str)], extra_toml: &str) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("vmlinuz"), IMAGE).unwrap();
    let mut toml = String::from(
        "format = 1\n[[image]]\nname = \"lc-boot\"\nversion = \"1.0\"\nnode_types = [\"linecard\"]\n[[image.build]]\narch = \"x86_64\"\nfiles = [{ path = \"vmlinuz\", source = \"vmlinuz\" }]\n",
    );
    for (pkg, version, deps, provides) in packages {
        let file = format!("{pkg}-{version}.run");
        fs::write(dir.join(&file), run_script(pkg, version)).unwrap();
        toml.push_str(&format!(
            "[[package]]\nname = \"{pkg}\"\nversion = \"{version}\"\ndepends = [{deps}]\nprovides = [{provides}]\n[[package.build]]\narch = \"noarch\"\nfiles = [{{ path = \"run\", source = \"{file}\" }}]\n"
        ));
    }
    toml.push_str(extra_toml);
    fs::write(dir.join("bundle.toml"), toml).unwrap();
    dir
}

/// `fleetboot ARGS` on the host (the CLI works on the master's store), which must succeed.
fn cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "fleetboot {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET PATH` on the master's operator API, from the lab's server namespace; `auth` is
/// curl's `@FILE` of the header with the master's token (not on curl's command line).
fn master_get(lab: &Lab, auth: &str, path: &str) -> Value {
    let url = format!("http://127.0.0.1:{MASTER_ADMIN_PORT}{path}");
    let out = lab.exec(lab.server_ns(), &["curl", "-sf", "--max-time", "20", "-H", auth, &url], Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {path} on the master: {e:#}"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("GET {path} on the master: {e}"))
}

/// The master's per-node counters: (image bytes, package bytes, verifications).
fn counters(lab: &Lab, auth: &str, node: &str) -> (u64, u64, u64) {
    let v = master_get(lab, auth, "/api/fleet/counters");
    let c = &v["nodes"][node];
    (c["image_bytes"].as_u64().unwrap_or(0), c["package_bytes"].as_u64().unwrap_or(0), c["verifications"].as_u64().unwrap_or(0))
}

/// The guest's initramfs: static busybox, the agent binary (stripped) with the libraries
/// it links, the virtio NIC modules and [`INIT`], as a newc cpio.
fn build_initramfs(dir: &Path, payload: &Path) -> PathBuf {
    let ir = dir.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules"] {
        fs::create_dir_all(ir.join(d)).unwrap();
    }
    fs::copy(common::which("busybox").expect("busybox"), ir.join("bin/busybox")).unwrap();
    let strip = Command::new("strip").arg("-o").arg(ir.join("bin/fleetboot")).arg(BIN).status().unwrap();
    assert!(strip.success(), "strip {BIN}");
    // The dynamic loader and the libraries ldd names, at the paths the binary looks for.
    let ldd = Command::new("ldd").arg(BIN).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path {
            let dest = ir.join(p.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(p, &dest).unwrap_or_else(|e| panic!("copying {p}: {e}"));
        }
    }
    let modules = payload.join("x86-modules");
    for e in fs::read_dir(&modules).unwrap().flatten() {
        fs::copy(e.path(), ir.join("lib/modules").join(e.file_name())).unwrap();
    }
    fs::write(ir.join("init"), INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(ir.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("agent-initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | busybox cpio -o -H newc > {} 2>/dev/null", s(&ir), s(&out)))
        .status()
        .unwrap();
    assert!(st.success(), "cpio");
    let _ = fs::remove_dir_all(&ir);
    out
}

/// A 32 MiB ext4 file system as a qcow2 image: the node's local disk, empty.
fn make_disk(dir: &Path, name: &str) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let qcow = dir.join(format!("{name}.qcow2"));
    let st = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&raw).arg("32M").stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "mkfs.ext4");
    let st = Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow).status().unwrap();
    assert!(st.success(), "qemu-img convert");
    fs::remove_file(&raw).unwrap();
    qcow
}

/// One VM of the lab: its NIC on a tap, its disk, its identity.
struct Vm {
    node: &'static str,
    mac: &'static str,
    addr: &'static str,
    tap: String,
    disk: PathBuf,
    features: &'static str,
}

/// What one boot showed on the console.
#[derive(Debug)]
struct Boot {
    /// The agent's summary of the boot (`--json`).
    summary: Value,
    /// `PKG <name> <version>` lines: what ran.
    markers: Vec<String>,
    disk_before: String,
    disk_after: String,
}

impl Boot {
    fn verdict(&self) -> &str {
        self.summary["summary"]["verdict"].as_str().unwrap_or("none")
    }

    fn fetched(&self) -> u64 {
        self.summary["summary"]["fetched_bytes"].as_u64().unwrap()
    }
}

struct Run<'a> {
    lab: &'a Lab,
    /// The masters the guest's agent is given, `HOST:PORT[,HOST:PORT...]`.
    masters: &'a str,
    dir: &'a Path,
    kernel: &'a Path,
    initrd: &'a Path,
}

impl Run<'_> {
    /// Boots `vm` once (QEMU until the guest powers off) with `extra` on the kernel command
    /// line, and reads what the console showed; panics with the console's tail when the
    /// boot fails, hangs or the agent exits with an error.
    fn boot(&self, vm: &Vm, name: &str, extra: &str) -> Boot {
        let log_path = self.dir.join(format!("{}-{name}.log", vm.node));
        let err_path = log_path.with_extension("qemu.err");
        let mut log = File::create(&log_path).unwrap();
        let append = format!(
            "console=ttyS0 panic=-1 loglevel=1 fleet.boot={name} fleet.addr={} fleet.mac={} fleet.master={} fleet.features={} {extra}",
            vm.addr, vm.mac, self.masters, vm.features
        );
        let mut cmd = self.lab.cmd(self.lab.switch_ns(), "timeout");
        cmd.args(["--kill-after=5", &(SILENCE_SECS * 4).to_string(), "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-m", "512", "-nodefaults", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(self.kernel)
            .arg("-initrd")
            .arg(self.initrd)
            .arg("-append")
            .arg(&append)
            .arg("-netdev")
            .arg(format!("tap,id=n0,ifname={},script=no,downscript=no", vm.tap))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={},romfile=", vm.mac))
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=none,id=d0", s(&vm.disk)))
            .args(["-device", "nvme,drive=d0,serial=fleetnode"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&err_path).unwrap());
        let t0 = Instant::now();
        let mut child = self.lab.spawn_tracked(&mut cmd).expect("starting QEMU");
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let silence = Duration::from_secs(SILENCE_SECS);
        let mut deadline = Instant::now() + silence;
        let (end, fail) = (format!("FLEET-VM-END boot={name} "), "FLEET-VM-FAIL");
        let mut console: Vec<String> = Vec::new();
        let result = loop {
            let now = Instant::now();
            if now >= deadline {
                break Err(format!("the console was silent for {SILENCE_SECS} s"));
            }
            match rx.recv_timeout(deadline - now) {
                Ok(line) => {
                    deadline = Instant::now() + silence;
                    let _ = writeln!(log, "{:8.3} {line}", t0.elapsed().as_secs_f64());
                    let clean = fleetboot_lab::vm::strip_ansi(&line);
                    console.push(clean.clone());
                    if clean.starts_with(&end) {
                        break Ok(clean);
                    } else if clean.starts_with(fail) || clean.contains("Kernel panic") {
                        break Err(clean);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break Err("QEMU exited before the boot ended".into()),
            }
        };
        // The guest powers off right after its last line; give QEMU a moment, then stop it.
        let stop_at = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < stop_at => thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        self.lab.untrack(pid);
        drop(rx);
        let _ = reader.join();
        let tail = || {
            let n = console.len().saturating_sub(30);
            format!("console {}:\n{}\nqemu: {}", log_path.display(), console[n..].join("\n"), fs::read_to_string(&err_path).unwrap_or_default())
        };
        let end_line = match result {
            Ok(l) => l,
            Err(why) => panic!("{} boot {name}: {why}\n{}", vm.node, tail()),
        };
        let field = |line: &str, key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string).unwrap_or_default();
        assert_eq!(field(&end_line, "rc="), "0", "{} boot {name}: the agent failed\n{}", vm.node, tail());
        let before_prefix = format!("FLEET-VM-DISK boot={name} ");
        let disk_before = console.iter().find(|l| l.starts_with(&before_prefix)).map(|l| field(l, "before=")).unwrap_or_default();
        let summary = console
            .iter()
            .find_map(|l| l.find("{\"reboot\"").and_then(|i| serde_json::from_str::<Value>(&l[i..]).ok()))
            .unwrap_or_else(|| panic!("{} boot {name}: no summary from the agent\n{}", vm.node, tail()));
        let markers = console.iter().filter(|l| l.starts_with("PKG ")).map(|l| l.trim().to_string()).collect();
        let boot = Boot { summary, markers, disk_before, disk_after: field(&end_line, "after=") };
        eprintln!("{} boot {name}: {} fetched {} bytes, ran {:?} ({:.1} s)", vm.node, boot.verdict(), boot.fetched(), boot.markers, t0.elapsed().as_secs_f64());
        boot
    }

    /// Boots every VM once, side by side; `extra` per node name.
    fn round<'v>(&self, vms: &'v [Vm], name: &str, extra: &BTreeMap<&str, String>) -> BTreeMap<&'v str, Boot> {
        thread::scope(|sc| {
            let handles: Vec<_> = vms
                .iter()
                .map(|vm| {
                    let e = extra.get(vm.node).cloned().unwrap_or_default();
                    (vm.node, sc.spawn(move || self.boot(vm, name, &e)))
                })
                .collect();
            handles.into_iter().map(|(n, h)| (n, h.join().unwrap_or_else(|_| panic!("{n}: boot {name} failed")))).collect()
        })
    }
}

/// What every VM test needs: its directory, the lab kernel, the agent's initramfs and a
/// fresh lab; `None` when this machine cannot run the test (the gate says why).
struct VmKit {
    dir: TestDir,
    kernel: PathBuf,
    initrd: PathBuf,
    lab: Lab,
}

impl VmKit {
    fn new(dir_name: &str) -> Option<VmKit> {
        let test = "fleet_vm_e2e";
        if !fleetboot_lab::gate::e2e_ready(test, &["ip", "timeout", "curl", "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "busybox", "strip", "ldd"]) {
            return None;
        }
        // Built here if missing, like the lab's other payload parts (scripts/setup.sh builds it).
        let payload = payload::ensure_part(None, Part::X86Net);
        let why = match &payload {
            Ok(_) => String::new(),
            Err(e) => format!("no lab payload with its x86-net part: {e:#}"),
        };
        if !fleetboot_lab::gate::ready_if(test, &[(payload.is_ok(), &why)]) {
            return None;
        }
        let payload = payload.unwrap();
        let dir = TestDir::new(dir_name);
        let kernel = payload.join("vmlinuz");
        let initrd = build_initramfs(&dir.path, &payload);
        let lab = Lab::new().expect("creating the lab");
        Some(VmKit { dir, kernel, initrd, lab })
    }
}

/// A running `fleetboot master` in a fresh lab, its store holding release 1 (the boot
/// image; base, routing and monitor 1.0) and the nodes of `nodes_toml`, and what a guest
/// boots (the lab kernel, the agent's initramfs).
struct MasterLab {
    dir: TestDir,
    kernel: PathBuf,
    initrd: PathBuf,
    lab: Lab,
    /// The master's configuration file: the CLI works on its store from the host.
    cfg: String,
    /// The master's operator routes need a token: curl's `@FILE` of the header with the
    /// admin token the master wrote in its `data_dir` at its first start.
    auth: String,
}

impl MasterLab {
    /// `None` when this machine cannot run the test (the gate says why).
    fn start(dir_name: &str, nodes_toml: &str) -> Option<MasterLab> {
        let VmKit { dir, kernel, initrd, lab } = VmKit::new(dir_name)?;
        let mut lab = lab;

        // The master, in the lab's server namespace.
        let config = dir.join("fleetboot.toml");
        fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n[server]\naddress = \"{SERVER_ADDR}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:{MASTER_ADMIN_PORT}\"\n[fleet]\nlisten = \"{SERVER_ADDR}:{MASTER_PORT}\"\n",
                s(&dir.join("state"))
            ),
        )
        .unwrap();
        let cfg = s(&config);
        let release1 = bundle_dir(
            &dir.path,
            "release1",
            &[
                ("base", "1.0", "", "\"core\""),
                ("routing", "1.0", "{ name = \"base\", version = \">=1\" }", "\"bgp\""),
                ("monitor", "1.0", "{ name = \"base\" }", "\"snmp\""),
            ],
            nodes_toml,
        );
        let b1 = dir.join("release1.fbundle");
        cli(&["bundle", "build", &s(&release1), "-o", &s(&b1)]);
        cli(&["bundle", "import", &s(&b1), "-c", &cfg]);
        let mut master = lab.cmd(lab.server_ns(), "timeout");
        master
            .args(["900", BIN, "master", "--config", &cfg])
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("master.log")).unwrap());
        lab.spawn("fleetboot master", master).expect("starting the master");
        lab.wait_listening(lab.server_ns(), Proto::Tcp, MASTER_PORT, Duration::from_secs(60)).expect("the master listens");
        let token_file = dir.join("state").join("admin.token");
        let token = fs::read_to_string(&token_file).unwrap_or_else(|e| panic!("the master's bootstrap token {}: {e}", token_file.display()));
        let header = dir.join("api-auth.header");
        fs::write(&header, format!("Authorization: Bearer {}\n", token.trim())).unwrap();
        let auth = format!("@{}", s(&header));
        Some(MasterLab { dir, kernel, initrd, lab, cfg, auth })
    }
}

#[test]
fn vms_store_verify_update_roll_back_test_and_repair_with_a_real_master() {
    let Some(MasterLab { dir, kernel, initrd, mut lab, cfg, auth }) = MasterLab::start("fleetvm", &linecards(2)) else {
        return;
    };
    let vms = [
        Vm { node: "lc1", mac: "52:54:00:66:00:01", addr: "10.77.0.21", tap: lab.add_tap().unwrap(), disk: make_disk(&dir.path, "lc1"), features: "bgp" },
        Vm { node: "lc2", mac: "52:54:00:66:00:02", addr: "10.77.0.22", tap: lab.add_tap().unwrap(), disk: make_disk(&dir.path, "lc2"), features: "bgp,snmp" },
    ];
    let master = format!("{SERVER_ADDR}:{MASTER_PORT}");
    let run = Run { lab: &lab, masters: &master, dir: &dir.path, kernel: &kernel, initrd: &initrd };
    let image = IMAGE.len() as u64;
    let set1 = len("base", "1.0") + len("routing", "1.0");
    let set2 = set1 + len("monitor", "1.0");
    let none = BTreeMap::new();

    // 1. Pristine: each node stores the image and its set, then asks to reboot.
    let r1 = run.round(&vms, "pristine", &none);
    for (node, set) in [("lc1", set1), ("lc2", set2)] {
        let b = &r1[node];
        assert_eq!((b.verdict(), b.summary["reboot"].as_bool()), ("install", Some(true)), "{node}: {b:?}");
        assert_eq!(b.fetched(), image + set, "{node}: the image and the whole set");
        assert_eq!(b.disk_before, "empty", "{node}: a pristine disk");
        assert_ne!(b.disk_after, "empty", "{node}: stored on its disk");
        assert_eq!(counters(&lab, &auth, node), (image, set, 0), "{node}");
    }

    // 2. The reboot: lc1 verifies and runs from its disk, nothing moves; features gave the
    //    two linecards different sets. lc2's stored monitor is corrupted before its agent
    //    starts: the verification finds it and only monitor moves.
    let monitor_blob = sha_hex(run_script("monitor", "1.0").as_bytes());
    let r2 = run.round(&vms, "reboot", &BTreeMap::from([("lc2", format!("fleet.corrupt={monitor_blob}"))]));
    let b = &r2["lc1"];
    assert_eq!((b.verdict(), b.fetched(), b.summary["reboot"].as_bool()), ("match", 0, Some(false)), "{b:?}");
    assert_eq!(b.markers, ["PKG base 1.0", "PKG routing 1.0"]);
    assert_eq!(b.disk_before, r1["lc1"].disk_after, "what the pristine boot stored survived the power cycle");
    assert_eq!(b.disk_after, b.disk_before, "a verified boot writes nothing");
    assert_eq!(counters(&lab, &auth, "lc1"), (image, set1, 1), "the reboot moved 0 bytes, one verification");
    let b = &r2["lc2"];
    assert_eq!((b.verdict(), b.fetched()), ("update", len("monitor", "1.0")), "{b:?}");
    assert_eq!(b.markers, ["PKG base 1.0", "PKG monitor 1.0", "PKG routing 1.0"]);
    assert_eq!(counters(&lab, &auth, "lc2"), (image, set2 + len("monitor", "1.0"), 1), "only the corrupted package moved again");
    assert_ne!(b.disk_after, b.disk_before, "the repaired blob is stored");

    // 3. routing 1.1 arrives (the class prefers the latest). lc1 takes it at its next
    //    verification; lc2 runs it in test mode.
    let release2 = bundle_dir(&dir.path, "release2", &[("routing", "1.1", "{ name = \"base\", version = \">=1\" }", "\"bgp\"")], "");
    let b2 = dir.join("release2.fbundle");
    cli(&["bundle", "build", &s(&release2), "-o", &s(&b2)]);
    cli(&["bundle", "import", &s(&b2), "-c", &cfg]);
    cli(&["node", "set", "lc2", "--test", "routing=1.1", "-c", &cfg]);
    let lc2_disk = r2["lc2"].disk_after.clone();
    let (before1, before2) = (counters(&lab, &auth, "lc1"), counters(&lab, &auth, "lc2"));
    let r3 = run.round(&vms, "new-version", &none);
    let b = &r3["lc1"];
    assert_eq!((b.verdict(), b.fetched()), ("update", len("routing", "1.1")), "{b:?}");
    assert_eq!(b.markers, ["PKG base 1.0", "PKG routing 1.1"]);
    let after = counters(&lab, &auth, "lc1");
    assert_eq!((after.0 - before1.0, after.1 - before1.1, after.2 - before1.2), (0, len("routing", "1.1"), 1), "only routing 1.1's bytes");
    let b = &r3["lc2"];
    assert_eq!((b.verdict(), b.fetched()), ("test", len("routing", "1.1")), "{b:?}");
    assert_eq!(b.markers, ["PKG base 1.0", "PKG monitor 1.0", "PKG routing 1.1"]);
    assert_eq!((b.disk_before.as_str(), b.disk_after.as_str()), (lc2_disk.as_str(), lc2_disk.as_str()), "test mode stores nothing");
    let after = counters(&lab, &auth, "lc2");
    assert_eq!((after.0 - before2.0, after.1 - before2.1), (0, len("routing", "1.1")));

    // 4. Rollback for the class, and lc2's test mode ends: lc1 returns to routing 1.0
    //    (only its bytes move); after its reboot lc2 runs the stored set, no download,
    //    and its disk is what it was before the test boot.
    cli(&["package", "rollback", "routing", "--to", "1.0", "--class", "linecards", "-c", &cfg]);
    cli(&["node", "set", "lc2", "--no-test", "-c", &cfg]);
    let (before1, before2) = (counters(&lab, &auth, "lc1"), counters(&lab, &auth, "lc2"));
    let r4 = run.round(&vms, "rollback", &none);
    let b = &r4["lc1"];
    assert_eq!((b.verdict(), b.fetched()), ("update", len("routing", "1.0")), "{b:?}");
    assert_eq!(b.markers, ["PKG base 1.0", "PKG routing 1.0"]);
    let after = counters(&lab, &auth, "lc1");
    assert_eq!((after.0 - before1.0, after.1 - before1.1), (0, len("routing", "1.0")), "only routing 1.0's bytes");
    let b = &r4["lc2"];
    assert_eq!((b.verdict(), b.fetched()), ("match", 0), "{b:?}");
    assert_eq!(b.markers, ["PKG base 1.0", "PKG monitor 1.0", "PKG routing 1.0"]);
    assert_eq!((b.disk_before.as_str(), b.disk_after.as_str()), (lc2_disk.as_str(), lc2_disk.as_str()), "the stored set is untouched");
    let after = counters(&lab, &auth, "lc2");
    assert_eq!((after.0 - before2.0, after.1 - before2.1, after.2 - before2.2), (0, 0, 1), "a verification only");

    // The master recorded every verification, with its result.
    let recorded: Value = serde_json::from_str(&cli(&["fleet", "verifications", "--node", "lc2", "-c", &cfg, "--json"])).unwrap();
    let results: Vec<&str> = recorded.as_array().unwrap().iter().map(|r| r["result"].as_str().unwrap_or("?")).collect();
    assert_eq!(results, ["install", "update", "test", "match"], "{recorded}");
    lab.stop_all(Duration::from_secs(5));
}

/// The master's one prepare campaign (`GET /api/fleet/campaigns`: the campaign and its
/// tally) once `ready` holds for it; panics with the master's last report if it never does.
fn campaign_when(lab: &Lab, auth: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    // The master picks up an operator's campaign and moves it on within half a second of
    // the event; this only bounds a master that never does.
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let all = master_get(lab, auth, "/api/fleet/campaigns");
        let cs = all.as_array().expect("a list of campaigns");
        assert!(cs.len() <= 1, "one campaign was started: {all}");
        if let Some(c) = cs.first().filter(|c| ready(c)) {
            return c.clone();
        }
        assert!(Instant::now() < give_up, "the campaign was never {what}; the master reports {all}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// Each node's state in `campaign` (the master's JSON), by node name.
fn prep_states(campaign: &Value) -> BTreeMap<String, String> {
    let nodes = campaign["campaign"]["nodes"].as_object().expect("the campaign's nodes");
    nodes.iter().map(|(n, s)| (n.clone(), s.as_str().map(str::to_string).unwrap_or_else(|| s.to_string()))).collect()
}

/// `fleetboot fleet prepare` with three VMs: the operator starts the campaign with the CLI
/// (which follows it until it is done); the three VMs boot together from empty disks and
/// each stores its image and set, so the master moves the campaign to its warm boot; all
/// three are power-cycled together on the same disks and only validate: 0 bytes of images
/// or packages, one verification each, and the CLI reports every node validated.
#[test]
fn fleet_prepare_stores_three_vms_then_a_warm_boot_only_validates() {
    let Some(MasterLab { dir, kernel, initrd, mut lab, cfg, auth }) = MasterLab::start("fleetvm3", &linecards(3)) else {
        return;
    };
    let nodes = ["lc1", "lc2", "lc3"];
    let vms: Vec<Vm> = [("lc1", "52:54:00:66:00:01", "10.77.0.21"), ("lc2", "52:54:00:66:00:02", "10.77.0.22"), ("lc3", "52:54:00:66:00:03", "10.77.0.23")]
        .into_iter()
        .map(|(node, mac, addr)| Vm { node, mac, addr, tap: lab.add_tap().unwrap(), disk: make_disk(&dir.path, node), features: "" })
        .collect();
    let master = format!("{SERVER_ADDR}:{MASTER_PORT}");
    let run = Run { lab: &lab, masters: &master, dir: &dir.path, kernel: &kernel, initrd: &initrd };
    let image = IMAGE.len() as u64;
    // The class's configuration: routing and monitor, and base for both.
    let set = len("base", "1.0") + len("routing", "1.0") + len("monitor", "1.0");
    let all = |state: &str| nodes.iter().map(|n| (n.to_string(), state.to_string())).collect::<BTreeMap<_, _>>();

    // The operator's command, on the master's store, left running: it prints the campaign
    // (--json) once the master has finished it. Tracked by the lab: a failing test stops it.
    let cli_out = dir.join("prepare.out");
    let cli_err = dir.join("prepare.err");
    let mut cmd = Command::new("timeout");
    cmd.args(["1300", BIN, "fleet", "prepare", "--class", "linecards", "--deadline", "600", "-c", &cfg, "--json"])
        .stdin(Stdio::null())
        .stdout(File::create(&cli_out).unwrap())
        .stderr(File::create(&cli_err).unwrap());
    let mut prepare = lab.spawn_tracked(&mut cmd).expect("starting fleetboot fleet prepare");
    let started = campaign_when(&lab, &auth, "started", |_| true);
    assert_eq!(started["campaign"]["stage"], "preparing", "{started}");
    assert_eq!(prep_states(&started), all("reset_ordered"), "every linecard is in the campaign");

    // 1. The nodes boot into the campaign: each is served its image and set, stores them on
    //    its disk, reports "stored" and asks to reboot.
    let r1 = run.round(&vms, "prepare", &BTreeMap::new());
    for node in nodes {
        let b = &r1[node];
        assert_eq!((b.verdict(), b.summary["reboot"].as_bool()), ("install", Some(true)), "{node}: {b:?}");
        assert_eq!(b.fetched(), image + set, "{node}: the image and the whole set");
        assert_eq!(b.disk_before, "empty", "{node}: an empty disk");
        assert_ne!(b.disk_after, "empty", "{node}: stored on its disk");
        assert_eq!(counters(&lab, &auth, node), (image, set, 0), "{node}");
        let view = master_get(&lab, &auth, &format!("/api/fleet/nodes/{node}"));
        assert_eq!(view["state"]["phase"], "stored", "{node}: the master's record: {view}");
    }
    // The master orders the warm boot only once every node of the campaign reported
    // "stored" (a node that had not would be "timed_out" here), and only those get
    // "reboot_ordered".
    let warm = campaign_when(&lab, &auth, "past its preparing stage", |c| c["campaign"]["stage"] != "preparing");
    assert_eq!(warm["campaign"]["stage"], "warm_boot", "{warm}");
    assert_eq!(prep_states(&warm), all("reboot_ordered"), "all three stored: {warm}");
    assert_eq!(warm["tally"], serde_json::json!({ "reboot_ordered": 3 }), "{warm}");
    let stored = master_get(&lab, &auth, "/api/fleet/counters");

    // 2. The warm boot: the same disks, power-cycled together. Each node only validates
    //    with the master and runs its stored set.
    let r2 = run.round(&vms, "warm-boot", &BTreeMap::new());
    let now = master_get(&lab, &auth, "/api/fleet/counters");
    for node in nodes {
        let b = &r2[node];
        assert_eq!((b.verdict(), b.fetched(), b.summary["reboot"].as_bool()), ("match", 0, Some(false)), "{node}: {b:?}");
        assert_eq!(b.markers, ["PKG base 1.0", "PKG monitor 1.0", "PKG routing 1.0"], "{node}");
        assert_eq!(b.disk_before, r1[node].disk_after, "{node}: what it stored survived the power cycle");
        assert_eq!(b.disk_after, b.disk_before, "{node}: a validating boot writes nothing");
        let (was, is) = (&stored["nodes"][node], &now["nodes"][node]);
        let delta = |k: &str| is[k].as_u64().unwrap_or(0) - was[k].as_u64().unwrap_or(0);
        assert_eq!(
            [("image_bytes", delta("image_bytes")), ("package_bytes", delta("package_bytes")), ("blobs_served", delta("blobs_served"))],
            [("image_bytes", 0), ("package_bytes", 0), ("blobs_served", 0)],
            "{node}: the warm boot moved nothing: {was} then {is}"
        );
        assert_eq!((delta("verifications"), delta("matches")), (1, 1), "{node}: one verification, a match: {was} then {is}");
    }
    let done = campaign_when(&lab, &auth, "done", |c| c["campaign"]["stage"] == "done");
    assert_eq!(prep_states(&done), all("validated"), "{done}");

    // The operator's command saw it through and reports the same.
    let give_up = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = prepare.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > give_up {
            let _ = prepare.kill();
            let _ = prepare.wait();
            lab.untrack(prepare.id());
            panic!("fleetboot fleet prepare did not end after the master finished the campaign: {}", fs::read_to_string(&cli_err).unwrap_or_default());
        }
        thread::sleep(Duration::from_millis(200));
    };
    lab.untrack(prepare.id());
    let out = fs::read_to_string(&cli_out).unwrap();
    assert!(status.success(), "fleetboot fleet prepare: {status}\n{out}\n{}", fs::read_to_string(&cli_err).unwrap_or_default());
    let reported: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("fleetboot fleet prepare --json: {e}\n{out}"));
    assert_eq!(reported["stage"], "done", "{reported}");
    for node in nodes {
        assert_eq!(reported["nodes"][node], "validated", "{node}: {reported}");
    }
    lab.stop_all(Duration::from_secs(5));
}

/// The lease TTL of the takeover test's masters: a dead master's lease lapses after this.
const TAKEOVER_TTL_MS: u64 = 6000;
/// A file of package `base` big enough that a VM is still downloading it when its master
/// is killed (TCG guests move a few MiB a second).
const BIG_BLOB: usize = 8 << 20;

/// One of the fleet's three masters in the takeover test: its own data directory and blob
/// copies (`state/`, whose `fleetboot.db` links to the one shared SQLite file), its
/// configuration, its agents' and operators' ports in the lab's server namespace.
struct FleetMaster {
    name: &'static str,
    dir: PathBuf,
    cfg: String,
    port: u16,
    admin_port: u16,
}

impl FleetMaster {
    /// `fleetboot master` in the server namespace (the process itself: `ip netns exec`
    /// execs it, so killing the child kills the master).
    fn start(&self, lab: &Lab, run: usize) -> std::process::Child {
        let mut cmd = lab.cmd(lab.server_ns(), BIN);
        cmd.args(["master", "--config", &self.cfg])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.join(format!("master-{run}.log"))).unwrap());
        lab.spawn_tracked(&mut cmd).expect("starting a master")
    }

    fn log_tail(&self) -> String {
        let mut out = String::new();
        for run in 1..=2 {
            if let Ok(t) = fs::read_to_string(self.dir.join(format!("master-{run}.log"))) {
                let lines: Vec<&str> = t.lines().collect();
                out.push_str(&format!("--- {} run {run} ---\n{}\n", self.name, lines[lines.len().saturating_sub(25)..].join("\n")));
            }
        }
        out
    }
}

/// SIGKILL, reaped and forgotten by the lab.
fn kill_now(lab: &Lab, mut child: std::process::Child) {
    let pid = child.id();
    let _ = child.kill();
    let _ = child.wait();
    lab.untrack(pid);
}

/// `fleetboot ARGS --json` on the host, read from the shared store: `None` while it fails
/// (the store not created yet).
fn store_json(args: &[&str]) -> Option<Value> {
    let out = Command::new(BIN).args(args).arg("--json").output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `f` every 100 ms; panics with `logs()` if it does not hold within `limit` (a bound
/// for a master that never gets there, not a measurement).
fn wait_until(what: &str, limit: Duration, logs: &dyn Fn() -> String, mut f: impl FnMut() -> bool) {
    let give_up = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}\n{}", logs());
        thread::sleep(Duration::from_millis(100));
    }
}

/// Backup masters with a real machine among the nodes: three `fleetboot master` in the
/// lab's server namespace on one SQLite file (`[fleet] backup_order = ["m1", "m2"]`, each
/// with its own blob directory, the fleet's master key shared), two emulated linecards
/// (`fleetboot agent node --stay`, all three URLs) and one QEMU VM whose agent is given
/// all three URLs too. `fleetboot fleet prepare` starts from empty disks and store:
///
/// 1. m1 is SIGKILLed once it has handed the VM its plan and begun serving it packages
///    (the VM is downloading a big blob): m2, designated, takes the lease with the next
///    epoch, the VM's agent finds it, finishes its install and powers off;
/// 2. once every node reported "stored" (the campaign's warm boot), m2 freezes (SIGSTOP:
///    hung, it still accepts connections but answers nothing) and the VM is power-cycled
///    at once: its agent gives up on the silent m2 and keeps asking until m3, not
///    designated, takes the lease, and validates with m3. m2, woken up (SIGCONT) with its
///    old epoch in memory, steps down to a backup;
/// 3. the campaign ends with every node validated, each node's set stored, nothing
///    recorded under an epoch after the next one took over; m1, restarted on its old data
///    directory, comes back as a backup that sends agents to m3, and a write fenced with
///    m1's old epoch is refused by the store.
///
/// Asserted: lease holders and epochs, verdicts, bytes, disk digests, campaign states and
/// the epoch on each verification; the takeover times are printed only.
#[test]
fn backups_take_over_a_prepare_campaign_with_a_vm_among_the_nodes() {
    let Some(VmKit { dir, kernel, initrd, mut lab }) = VmKit::new("fleetvmha") else {
        return;
    };
    let t_start = Instant::now();
    let root = dir.path.clone();
    let tap = lab.add_tap().unwrap();
    let key = root.join("fleet-master.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key).unwrap();
        f.write_all("42".repeat(32).as_bytes()).unwrap();
    }
    let shared_db = root.join("shared/fleetboot.db");
    fs::create_dir_all(shared_db.parent().unwrap()).unwrap();
    let masters: Vec<FleetMaster> = ["m1", "m2", "m3"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let mdir = root.join(name);
            fs::create_dir_all(mdir.join("state")).unwrap();
            std::os::unix::fs::symlink(&shared_db, mdir.join("state/fleetboot.db")).unwrap();
            let (port, admin_port) = (MASTER_PORT + 2 * i as u16, MASTER_ADMIN_PORT + 2 * i as u16);
            let config = mdir.join("fleetboot.toml");
            fs::write(
                &config,
                format!(
                    "data_dir = \"{}\"\n[server]\naddress = \"{SERVER_ADDR}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nenabled = false\n\
                     [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
                     [fleet]\nlisten = \"{SERVER_ADDR}:{port}\"\nheartbeat_s = 1\nname = \"{name}\"\nlease_ttl_ms = {TAKEOVER_TTL_MS}\n\
                     backup_order = [\"m1\", \"m2\"]\nkey_file = {:?}\n",
                    s(&mdir.join("state")),
                    s(&key)
                ),
            )
            .unwrap();
            FleetMaster { name, dir: mdir, cfg: s(&config), port, admin_port }
        })
        .collect();
    let logs = || masters.iter().map(FleetMaster::log_tail).collect::<String>();
    let cfg = masters[0].cfg.clone();
    let status = || store_json(&["master", "status", "-c", &cfg]).unwrap_or(Value::Null);
    let holder = |s: &Value| s["master"]["name"].as_str().map(str::to_string);
    let replica = |s: &Value, name: &str| s["replicas"].as_array().and_then(|r| r.iter().find(|r| r["name"] == name).cloned()).unwrap_or(Value::Null);
    let campaign = || store_json(&["fleet", "status", "-c", &cfg]).and_then(|v| v.as_array().and_then(|a| a.last().cloned())).unwrap_or(Value::Null);

    // m1 first: it takes the free lease; then the backups.
    let mut procs: Vec<Option<std::process::Child>> = vec![Some(masters[0].start(&lab, 1)), None, None];
    wait_until("m1 to hold the lease", Duration::from_secs(60), &logs, || holder(&status()).as_deref() == Some("m1"));
    let epoch1 = status()["epoch"].as_u64().unwrap();
    procs[1] = Some(masters[1].start(&lab, 1));
    procs[2] = Some(masters[2].start(&lab, 1));

    // Release 1 goes into m1's blob directory only; the backups copy it from m1. Package
    // base carries a big file so that a VM's download takes a while.
    let release = bundle_dir(
        &root,
        "release1",
        &[
            ("base", "1.0", "", "\"core\""),
            ("routing", "1.0", "{ name = \"base\", version = \">=1\" }", "\"bgp\""),
            ("monitor", "1.0", "{ name = \"base\" }", "\"snmp\""),
        ],
        &linecards(3),
    );
    fs::write(release.join("base.data"), vec![b'b'; BIG_BLOB]).unwrap();
    let toml = fs::read_to_string(release.join("bundle.toml")).unwrap();
    let with_data = toml.replacen("source = \"base-1.0.run\" }]", "source = \"base-1.0.run\" }, { path = \"data\", source = \"base.data\" }]", 1);
    assert_ne!(with_data, toml, "base gets its big file");
    fs::write(release.join("bundle.toml"), with_data).unwrap();
    let b1 = root.join("release1.fbundle");
    cli(&["bundle", "build", &s(&release), "-o", &s(&b1)]);
    cli(&["bundle", "import", &s(&b1), "-c", &cfg]);
    // The image, base's two files, routing, monitor.
    let blobs = 5;
    wait_until("the backups to copy every blob", Duration::from_secs(120), &logs, || {
        let s = status();
        ["m1", "m2", "m3"].iter().all(|n| {
            let r = replica(&s, n);
            r["blobs_wanted"] == blobs && r["blobs_missing"] == 0 && r["revisions_behind"] == 0
        })
    });
    let s0 = status();
    assert_eq!((replica(&s0, "m2")["role"].as_str(), replica(&s0, "m3")["role"].as_str()), (Some("backup"), Some("backup")), "{s0}");

    // The operators' API token m1 wrote at its first start (the token table is shared).
    let token = fs::read_to_string(masters[0].dir.join("state/admin.token")).expect("m1's bootstrap token");
    let header = root.join("api-auth.header");
    fs::write(&header, format!("Authorization: Bearer {}\n", token.trim())).unwrap();
    let auth = format!("@{}", s(&header));
    let m1_counters = |node: &str| -> Option<(u64, u64)> {
        let url = format!("http://127.0.0.1:{}/api/fleet/counters", masters[0].admin_port);
        let out = lab.exec(lab.server_ns(), &["curl", "-sf", "--max-time", "5", "-H", &auth, &url], Duration::from_secs(10)).ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let c = &v["nodes"][node];
        Some((c["image_bytes"].as_u64().unwrap_or(0), c["package_bytes"].as_u64().unwrap_or(0)))
    };

    // The operator's campaign, followed by the CLI from the shared store.
    let cli_out = root.join("prepare.out");
    let cli_err = root.join("prepare.err");
    let mut cmd = Command::new("timeout");
    cmd.args(["900", BIN, "fleet", "prepare", "--class", "linecards", "--deadline", "600", "-c", &cfg, "--json"])
        .stdin(Stdio::null())
        .stdout(File::create(&cli_out).unwrap())
        .stderr(File::create(&cli_err).unwrap());
    let mut prepare = lab.spawn_tracked(&mut cmd).expect("starting fleetboot fleet prepare");
    wait_until("the campaign to start", Duration::from_secs(60), &logs, || campaign()["stage"] == "preparing");

    // lc2 and lc3: emulated linecards that stay and obey the campaign, knowing all three.
    let all_masters: Vec<String> = masters.iter().map(|m| format!("{SERVER_ADDR}:{}", m.port)).collect();
    let all_urls = all_masters.iter().map(|m| format!("http://{m}")).collect::<Vec<_>>().join(",");
    let agent = |i: usize, masters: &str, extra: &[&str]| {
        let mut cmd = lab.cmd(lab.server_ns(), BIN);
        cmd.args(["agent", "node", "--master", masters, "--type", "linecard", "--arch", "x86_64", "--json"])
            .args(["--mac", &format!("52:54:00:66:00:0{i}"), "--storage", &s(&root.join(format!("node{i}")))])
            .args(extra)
            .stdin(Stdio::null());
        cmd
    };
    let emulated: Vec<std::process::Child> = (2..=3)
        .map(|i| {
            let mut cmd = agent(i, &all_urls, &["--boots", "12", "--stay", "--heartbeat", "1"]);
            cmd.stdout(File::create(root.join(format!("node{i}.out"))).unwrap()).stderr(File::create(root.join(format!("node{i}.err"))).unwrap());
            lab.spawn_tracked(&mut cmd).expect("starting an emulated agent")
        })
        .collect();

    // lc1, the VM, boots into the campaign from an empty disk with all three masters.
    let vm = Vm { node: "lc1", mac: "52:54:00:66:00:01", addr: "10.77.0.21", tap, disk: make_disk(&root, "lc1"), features: "" };
    let vm_masters = all_masters.join(",");
    let run = Run { lab: &lab, masters: &vm_masters, dir: &root, kernel: &kernel, initrd: &initrd };
    let image = IMAGE.len() as u64;
    let set = len("base", "1.0") + BIG_BLOB as u64 + len("routing", "1.0") + len("monitor", "1.0");

    // 1. m1 dies while the VM is being served: its plan is out, a package is on its way.
    let (r1, seen_at_kill, takeover_1, s1) = thread::scope(|sc| {
        let booting = sc.spawn(|| run.boot(&vm, "prepare", ""));
        let give_up = Instant::now() + Duration::from_secs(300);
        let seen = loop {
            match m1_counters("lc1") {
                Some(c) if c.1 > 0 => break c,
                _ => {}
            }
            assert!(!booting.is_finished(), "the VM's boot ended before m1 served it a package\n{}", logs());
            assert!(Instant::now() < give_up, "m1 never served the VM a package\n{}", logs());
            thread::sleep(Duration::from_millis(50));
        };
        kill_now(&lab, procs[0].take().unwrap());
        let killed = Instant::now();
        let mut s = Value::Null;
        wait_until("a backup to take over from m1", Duration::from_secs(60), &logs, || {
            s = status();
            holder(&s).is_some_and(|h| h != "m1")
        });
        let took = killed.elapsed();
        let r1 = booting.join().unwrap_or_else(|_| panic!("lc1's campaign boot failed\n{}", logs()));
        (r1, seen, took, s)
    });
    assert_eq!(holder(&s1).as_deref(), Some("m2"), "the designated backup took over: {s1}");
    assert_eq!(s1["epoch"].as_u64(), Some(epoch1 + 1), "{s1}");
    let m2_since = s1["master"]["since_ms"].as_u64().unwrap();
    assert_eq!((r1.verdict(), r1.summary["reboot"].as_bool()), ("install", Some(true)), "{r1:?}");
    assert_eq!(r1.disk_before, "empty");
    assert_ne!(r1.disk_after, "empty", "stored on its disk");
    assert!(r1.fetched() >= image + set, "at least the image and the whole set: {r1:?}");

    // Every node reported "stored" (m2 recorded what m1 did not): the warm boot is ordered.
    wait_until("the campaign's warm boot", Duration::from_secs(120), &logs, || campaign()["stage"] != "preparing");
    let warm = campaign();
    assert_eq!(warm["stage"], "warm_boot", "{warm}");
    assert_eq!(warm["nodes"]["lc1"], "reboot_ordered", "the VM stored its set: {warm}");

    // 2. m2 freezes (SIGSTOP: a hung master still accepts connections, its lease lapses),
    //    and the VM is power-cycled at once: m3 is elected meanwhile.
    let m2_pid = procs[1].as_ref().unwrap().id() as libc::pid_t;
    let (r2, takeover_2, s2) = thread::scope(|sc| {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(m2_pid, libc::SIGSTOP) }, 0);
        let killed = Instant::now();
        let booting = sc.spawn(|| run.boot(&vm, "warm-boot", ""));
        let mut s = Value::Null;
        wait_until("m3 to take over", Duration::from_secs(60), &logs, || {
            s = status();
            holder(&s).as_deref() == Some("m3")
        });
        let took = killed.elapsed();
        let r2 = booting.join().unwrap_or_else(|_| panic!("lc1's warm boot failed\n{}", logs()));
        (r2, took, s)
    });
    assert_eq!(s2["epoch"].as_u64(), Some(epoch1 + 2), "{s2}");
    assert_eq!((r2.verdict(), r2.fetched(), r2.summary["reboot"].as_bool()), ("match", 0, Some(false)), "{r2:?}");
    assert_eq!(r2.markers, ["PKG base 1.0", "PKG monitor 1.0", "PKG routing 1.0"]);
    assert_eq!(r2.disk_before, r1.disk_after, "what it stored under m2 survived the power cycle");
    assert_eq!(r2.disk_after, r2.disk_before, "a validating boot writes nothing");
    let m3_since = s2["master"]["since_ms"].as_u64().unwrap();

    // m2 wakes up still believing it holds the second epoch: it finds the lease gone and
    // steps down; anything it tried to write meanwhile was refused by the store.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(m2_pid, libc::SIGCONT) }, 0);
    let m2_log = || fs::read_to_string(masters[1].dir.join("master-1.log")).unwrap_or_default();
    wait_until("the woken m2 to step down", Duration::from_secs(60), &logs, || m2_log().contains("this master stops serving and goes on as a backup"));
    wait_until("m2 to report as a backup", Duration::from_secs(60), &logs, || replica(&status(), "m2")["role"] == "backup");
    let m2_refused = m2_log().matches("the store refused a write of an old epoch").count();

    // 3. The campaign ends with every node validated; the operator's command says so.
    let give_up = Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let Some(st) = prepare.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= give_up {
            // What the emulated linecards saw of the takeovers, for the one that is stuck.
            let nodes: String = (2..=3)
                .map(|i| {
                    let err = fs::read_to_string(root.join(format!("node{i}.err"))).unwrap_or_default();
                    let out = fs::read_to_string(root.join(format!("node{i}.out"))).unwrap_or_default();
                    let tail = |t: &str| {
                        let mut start = t.len().saturating_sub(3000);
                        while !t.is_char_boundary(start) {
                            start += 1;
                        }
                        t[start..].to_string()
                    };
                    format!("--- lc{i} stderr ---\n{}\n--- lc{i} stdout ---\n{}\n", tail(&err), tail(&out))
                })
                .collect();
            panic!("fleetboot fleet prepare did not end: {:?}\n{}\n{nodes}", campaign(), logs());
        }
        thread::sleep(Duration::from_millis(200));
    };
    lab.untrack(prepare.id());
    let out = fs::read_to_string(&cli_out).unwrap();
    assert!(exit.success(), "fleetboot fleet prepare: {exit}\n{out}\n{}\n{}", fs::read_to_string(&cli_err).unwrap_or_default(), logs());
    let done: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("fleetboot fleet prepare --json: {e}\n{out}"));
    assert_eq!(done["stage"], "done", "{done}");
    for node in ["lc1", "lc2", "lc3"] {
        assert_eq!(done["nodes"][node], "validated", "{node}: {done}\n{}", logs());
    }
    let nodes: Value = serde_json::from_str(&cli(&["node", "list", "-c", &cfg, "--json"])).unwrap();
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["state"]["installed"].as_array().map(Vec::len), Some(4), "image, base, routing, monitor stored: {n}");
    }
    // The VM's warm boot was validated by m3, under the third epoch.
    let recorded: Value = serde_json::from_str(&cli(&["fleet", "verifications", "--node", "lc1", "--limit", "100", "-c", &cfg, "--json"])).unwrap();
    let lc1: Vec<(String, u64)> = recorded.as_array().unwrap().iter().map(|r| (r["result"].as_str().unwrap_or("?").to_string(), r["epoch"].as_u64().unwrap_or(0))).collect();
    assert_eq!(lc1.last().map(|(r, e)| (r.as_str(), *e)), Some(("match", epoch1 + 2)), "lc1's verifications: {lc1:?}");

    // m1 comes back on its old data directory: a backup (the lease is m3's), which sends
    // an agent that knows only m1 on to m3.
    procs[0] = Some(masters[0].start(&lab, 2));
    wait_until("m1 to report as a backup", Duration::from_secs(60), &logs, || {
        let r = replica(&status(), "m1");
        r["role"] == "backup" && r["stale"] == false && r["blobs_missing"] == 0
    });
    let s3 = status();
    assert_eq!((holder(&s3).as_deref(), s3["epoch"].as_u64()), (Some("m3"), Some(epoch1 + 2)), "{s3}");
    let out = fleetboot_lab::netns::output_with_timeout(agent(2, &format!("http://{}", all_masters[0]), &["--boots", "1"]), Duration::from_secs(60)).unwrap();
    let boots: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(out.status.success(), "an agent given only m1: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(boots.first().map(|b| b["summary"]["verdict"].clone()), Some(Value::from("match")), "m1 sent the agent to m3: {boots:?}");

    // Nothing m1 could write with its old epoch is accepted, and nothing of that epoch
    // was recorded after m2 took over.
    let store = fleetboot_store::Store::open(&shared_db).unwrap();
    let fenced = vec![fleetboot_store::Write::Fleet { fence: Some(epoch1), write: fleetboot_store::fleet::FleetWrite::TrimVerifications { keep: 1 } }];
    match store.write_blocking(fenced) {
        Err(fleetboot_store::StoreError::StaleEpoch { held, current }) => assert_eq!((held, current), (epoch1, epoch1 + 2)),
        other => panic!("a write fenced with m1's old epoch: {other:?}"),
    }
    drop(store);
    let all: Value = serde_json::from_str(&cli(&["fleet", "verifications", "--limit", "1000", "-c", &cfg, "--json"])).unwrap();
    let all = all.as_array().unwrap();
    let late_old: Vec<_> = all.iter().filter(|v| v["epoch"] == epoch1 && v["ts_ms"].as_u64().unwrap_or(0) >= m2_since).collect();
    assert!(late_old.is_empty(), "writes of m1's epoch after m2 took over: {late_old:?}");
    let late_m2: Vec<_> = all.iter().filter(|v| v["epoch"] == epoch1 + 1 && v["ts_ms"].as_u64().unwrap_or(0) >= m3_since).collect();
    assert!(late_m2.is_empty(), "writes of the frozen m2's epoch after m3 took over: {late_m2:?}");
    let by_epoch = |e: u64| all.iter().filter(|v| v["epoch"] == e).count();

    eprintln!(
        "vm takeover: m1 -> m2 {:.1} s after SIGKILL, m2 -> m3 {:.1} s after SIGSTOP (lease TTL {} s); the woken m2 had {} write(s) refused; m1 had served lc1 {} image + {} package bytes when killed; \
         lc1 fetched {} bytes in its campaign boot ({} downloads failed and were retried), verifications {:?}; per epoch {} / {} / {}; test {:.0} s",
        takeover_1.as_secs_f64(),
        takeover_2.as_secs_f64(),
        TAKEOVER_TTL_MS / 1000,
        m2_refused,
        seen_at_kill.0,
        seen_at_kill.1,
        r1.fetched(),
        r1.summary["summary"]["refetched"],
        lc1,
        by_epoch(epoch1),
        by_epoch(epoch1 + 1),
        by_epoch(epoch1 + 2),
        t_start.elapsed().as_secs_f64()
    );
    for child in emulated.into_iter().chain(procs.into_iter().flatten()) {
        kill_now(&lab, child);
    }
    lab.stop_all(Duration::from_secs(5));
}


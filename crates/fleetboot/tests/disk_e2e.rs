//! End to end: virtual disks. QEMU VMs (TCG) run the lab kernel with a disk that is a
//! fleetboot NBD export of a catalog image, each VM with its own copy-on-write overlay.
//!
//! The VMs boot their kernel directly (`-kernel/-initrd/-append`): PXE itself is covered by
//! `lab_e2e.rs`. What is under test is everything else: `fleetboot image import` fills the
//! catalog; `fleetboot serve` renders each VM's boot plan (a profile with
//! `disk = { image = ... }`), and the VM is started with exactly the kernel command line
//! fleetboot rendered, its disk being the `fleetboot.disk=nbd://...` URL in it. The lab
//! kernel has no virtio-blk built in, so the disk is an NVMe drive (`/dev/nvme0n1`).
//!
//! The VM's initramfs (built here: busybox + `/init`) mounts the disk (ext4, made with
//! `mkfs.ext4 -d`), reports the note a previous boot left, writes its own note (this run's
//! nonce and the boot's name), syncs, re-reads it from the device with the page cache
//! dropped, and prints one `DISK-E2E ...` line. Checked:
//! - a second VM (other MAC) on the same image does not see the first VM's note;
//! - private overlay: the note is still there when the first VM boots again;
//! - standard overlay: it is gone on the next boot;
//! - the image's SHA-256 never changes; the HTTP image routes and API answer; an image read
//!   over HTTP lands in the trace of the client whose address it came from (one holding a
//!   reservation), and no machine reads another's script;
//! - each VM runs in a namespace of its own, at the address its reservation gives it, as
//!   a real machine connects from its own address: its disk opens there, while from
//!   another machine's address nbdinfo can neither open that VM's overlay nor see it in
//!   the export list (which names catalog images only).
//!
//! At most two VMs run at once; each is bounded by `timeout`. Needs root, QEMU,
//! mkfs.ext4, busybox and nbdinfo (scripts/setup.sh); skips otherwise unless
//! `FLEETBOOT_REQUIRE_E2E=1`.

mod common;

use common::{e2e_ready, fleetboot_with_config as fleetboot, host, s, sha256, Env, HTTP};
use fleetboot_lab::netns::{Lab, Proto};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const VM_A: &str = "52:54:00:77:00:a1";
const VM_B: &str = "52:54:00:77:00:a2";
const VM_C: &str = "52:54:00:77:00:a3";
/// The machine that reads images over HTTP from 10.77.0.20 (its reservation).
const HTTP_CLIENT: &str = "52:54:00:77:0d:20";
const NBD_PORT: u16 = 10809;
const VM_TIMEOUT_SECS: u64 = 120;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
NONCE=$(arg fleetboot.nonce); BOOT=$(arg fleetboot.boot); DISK=$(arg fleetboot.disk)
fail() { echo; echo "DISK-E2E-FAIL nonce=$NONCE boot=$BOOT $*"; poweroff -f; }
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/nvme0n1 ] || fail "no /dev/nvme0n1"
mkdir -p /mnt
mount -t ext4 /dev/nvme0n1 /mnt || fail "mount failed"
BASE=$(cat /mnt/etc/fleetboot-image 2>/dev/null || echo none)
FOUND=$(cat /mnt/note 2>/dev/null || echo none)
echo "$NONCE/$BOOT" > /mnt/note || fail "write failed"
sync; umount /mnt || fail "umount failed"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/nvme0n1 /mnt || fail "remount failed"
REREAD=$(cat /mnt/note 2>/dev/null || echo none)
umount /mnt
echo; echo "DISK-E2E nonce=$NONCE boot=$BOOT base=$BASE found=$FOUND reread=$REREAD disk=$DISK"
poweroff -f
"#;



/// Waits until the server in `srv` has no NBD connection left (every VM's overlay released:
/// a standard one discarded, a private one closed), then a little longer.
fn nbd_idle(lab: &Lab, srv: &str) {
    let filter = format!("( sport = :{NBD_PORT} )");
    for _ in 0..100 {
        let out = lab
            .exec(
                srv,
                // Sockets the server still holds; after its close they linger in
                // TIME-WAIT/FIN-WAIT, which no longer count.
                &[
                    "ss",
                    "-Htn",
                    "state",
                    "established",
                    "state",
                    "close-wait",
                    "state",
                    "syn-recv",
                    &filter,
                ],
                Duration::from_secs(10),
            )
            .expect("ss");
        let open = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        if open == 0 {
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("NBD connections still open 10 s after the VMs stopped");
}

/// The VM's initramfs: static busybox and [`INIT`], as a newc cpio (uncompressed).
fn build_initramfs(dir: &Path) -> PathBuf {
    let ir = dir.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "mnt"] {
        fs::create_dir_all(ir.join(d)).unwrap();
    }
    let busybox = common::which("busybox").expect("busybox");
    fs::copy(&busybox, ir.join("bin/busybox")).unwrap();
    fs::write(ir.join("init"), INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(ir.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("disk-initrd.cpio");
    let script = format!(
        "cd {} && find . | busybox cpio -o -H newc > {}",
        s(&ir),
        s(&out)
    );
    host(&["sh", "-c", &script], 60);
    out
}

/// A 32 MiB ext4 image whose root holds busybox and `/etc/fleetboot-image`.
fn build_image(dir: &Path, nonce: &str) -> PathBuf {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::copy(common::which("busybox").unwrap(), root.join("bin/busybox")).unwrap();
    fs::write(root.join("etc/fleetboot-image"), format!("base-{nonce}\n")).unwrap();
    let img = dir.join("rootfs.img");
    let mkfs = common::which("mkfs.ext4").expect("mkfs.ext4");
    host(
        &[
            &s(&mkfs),
            "-q",
            "-F",
            "-L",
            "fbroot",
            "-d",
            &s(&root),
            &s(&img),
            "32M",
        ],
        120,
    );
    img
}

/// What one VM reported.
#[derive(Debug, Default)]
struct Report {
    found: String,
    reread: String,
    base: String,
    disk: String,
}

/// Boots one VM in `ns` with `kernel`, `initrd`, the command line and disk URL and
/// returns what its `DISK-E2E` line of this boot reported.
#[allow(clippy::too_many_arguments)]
fn boot_vm(
    lab: &Lab,
    ns: &str,
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    disk: &str,
    boot: &str,
) -> Report {
    let line = common::boot_disk_vm(lab, ns, dir, kernel, initrd, cmdline, disk, boot, "DISK-E2E", VM_TIMEOUT_SECS);
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    Report {
        found: field("found"),
        reread: field("reread"),
        base: field("base"),
        disk: field("disk"),
    }
}

/// The kernel command line fleetboot renders for `mac` (the script the API says it gets),
/// and the disk URL on it.
fn rendered_plan(env: &mut Env, mac: &str) -> (String, String) {
    let url = format!("/api/clients/{mac}/script");
    let (code, body) = env.api(&[], &url);
    let script = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{url}: {script}");
    let kernel = script
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap_or_else(|| panic!("no kernel line in {script}"));
    let cmdline = kernel.splitn(3, ' ').nth(2).unwrap_or("").to_string();
    let disk = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fleetboot.disk="))
        .unwrap_or_else(|| panic!("no fleetboot.disk= in {script}"))
        .to_string();
    (cmdline, disk)
}

#[test]
fn vms_on_nbd_exports_keep_their_writes_apart() {
    if !e2e_ready("disk_e2e", &["qemu-system-x86_64", "mkfs.ext4", "busybox", "nbdinfo"]) {
        return;
    }
    let payload =
        fleetboot_lab::payload::ensure(None).expect("the lab payload (scripts/build-payload.sh)");
    let kernel = payload.join("vmlinuz");
    let nonce = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            & 0xffff_ffff_ffff
    );

    let mut env = Env::new("disk");
    let dir = env.dir.path.clone();
    let initrd = build_initramfs(&dir);
    let image = build_image(&dir, &nonce);
    let image_sha = sha256(&image);

    // Profiles: A and B share the image with private overlays; C uses it with standard
    // overlays and places the URL on its command line itself.
    let cmdline = format!("console=ttyS0 panic=-1 quiet fleetboot.nonce={nonce}");
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!(
        r#"
[[dhcp.reservation]]
mac = "{HTTP_CLIENT}"
ip = "10.77.0.20"

[[dhcp.reservation]]
mac = "{VM_A}"
ip = "10.77.0.31"

[[dhcp.reservation]]
mac = "{VM_B}"
ip = "10.77.0.32"

[[dhcp.reservation]]
mac = "{VM_C}"
ip = "10.77.0.33"

[nbd]
enabled = true
listen = "0.0.0.0:{NBD_PORT}"
overlay = "standard"
overlay_per_image = {{ "disk-priv" = "private" }}

[[profile]]
name = "disk-private"
priority = 1
match = {{ mac = ["{VM_A}", "{VM_B}"] }}
boot = {{ kind = "linux", kernel = "vmlinuz", initrd = ["initrd.gz"], cmdline = "{cmdline}", disk = {{ image = "disk-priv" }} }}

[[profile]]
name = "disk-standard"
priority = 1
match = {{ mac = ["{VM_C}"] }}
boot = {{ kind = "linux", kernel = "vmlinuz", cmdline = "{cmdline} fleetboot.disk={{disk_url}}", disk = {{ image = "disk-std", overlay = "client" }} }}
"#
    ));
    fs::write(&env.config, cfg).unwrap();
    fleetboot(&["check-config"], &env.config);

    // The catalog, from the CLI: two names, one content.
    let out = fleetboot(
        &["image", "import", &s(&image), "--name", "disk-priv"],
        &env.config,
    );
    assert!(out.contains("imported disk-priv:1"), "{out}");
    fleetboot(
        &[
            "image",
            "import",
            &s(&image),
            "--name",
            "disk-std",
            "--format",
            "raw",
        ],
        &env.config,
    );
    let listed: serde_json::Value =
        serde_json::from_str(&fleetboot(&["image", "list", "--json"], &env.config)).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.iter().all(|v| v["sha256"] == image_sha.as_str()),
        "{listed:?}"
    );
    let blob = dir.join("data/images/sha256").join(&image_sha);
    let check_image =
        |when: &str| assert_eq!(sha256(&blob), image_sha, "the shared image changed {when}");

    env.start_server();
    let srv = env.server_ns();
    env.lab
        .wait_listening(&srv, Proto::Tcp, NBD_PORT, Duration::from_secs(30))
        .expect("NBD listening");
    let ns = env.add_client(Some("10.77.0.20/24"), Some(HTTP_CLIENT)).ns;

    // HTTP: the API and ranged, read-only image reads.
    let imgs: serde_json::Value = {
        let (code, body) = env.api(&[], "/api/images");
        assert_eq!(code, 200);
        serde_json::from_slice(&body).unwrap()
    };
    assert_eq!(imgs.as_array().unwrap().len(), 2, "{imgs}");
    let (code, body) = env.api(&[], "/api/images/disk-priv");
    assert_eq!(code, 200);
    let shown: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(shown[0]["version"], 1, "{shown}");
    assert_eq!(
        env.api(&[], "/api/images/nothing").0,
        404
    );
    assert_eq!(env.http(&ns, &[], &format!("{HTTP}/images/nothing")).0, 404);
    assert_eq!(
        env.http(&ns, &[], &format!("{HTTP}/images/..%2Fetc")).0,
        400
    );
    let bytes = fs::read(&image).unwrap();
    let (code, part) = env.http(
        &ns,
        &["-r", "1024-2047"],
        &format!("{HTTP}/images/disk-priv:1"),
    );
    assert_eq!(code, 206);
    assert_eq!(
        part,
        bytes[1024..2048],
        "the ext4 superblock over HTTP Range"
    );
    let (code, _) = env.http(
        &ns,
        &["-r", "999999999-"],
        &format!("{HTTP}/images/disk-priv"),
    );
    assert_eq!(code, 416);
    let (code, whole) = env.http(&ns, &[], &format!("{HTTP}/images/disk-std"));
    assert_eq!(code, 200);
    assert!(whole == bytes, "GET /images/disk-std returned other bytes");
    let (code, _) = env.http(
        &ns,
        &["-X", "PUT", "--data", "x"],
        &format!("{HTTP}/images/disk-std"),
    );
    assert_eq!(code, 405, "images are read-only over HTTP");
    // A third name on the same content, removed through the API: the content stays.
    fleetboot(
        &["image", "import", &s(&image), "--name", "scratch"],
        &env.config,
    );
    let (code, body) = env.api(&["-X", "DELETE"], "/api/images/scratch:1");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        env.api(&[], "/api/images/scratch").0,
        404
    );
    assert_eq!(
        env.api(&["-X", "DELETE"], "/api/images/scratch").0,
        404
    );
    check_image("after removing another name of it");

    // What fleetboot renders for each VM. The boot network gets no VM's script from
    // 10.77.0.20: that address is another machine's.
    let (cmd_c, disk_c) = rendered_plan(&mut env, VM_C);
    let (cmd_b, disk_b) = rendered_plan(&mut env, VM_B);
    let (cmd_a, disk_a) = rendered_plan(&mut env, VM_A);
    let vm_a_script = format!("{HTTP}/boot/{}.ipxe", VM_A.replace(':', "-"));
    assert_eq!(env.http(&ns, &[], &vm_a_script).0, 403);
    assert_eq!(
        disk_a,
        format!("nbd://10.77.0.1:{NBD_PORT}/disk-priv@52-54-00-77-00-a1")
    );
    assert_eq!(
        disk_b,
        format!("nbd://10.77.0.1:{NBD_PORT}/disk-priv@52-54-00-77-00-a2")
    );
    assert_eq!(
        disk_c,
        format!("nbd://10.77.0.1:{NBD_PORT}/disk-std@52-54-00-77-00-a3")
    );
    assert_eq!(cmd_c.matches("fleetboot.disk=").count(), 1, "{cmd_c}");
    // An image read over HTTP by a client whose IP is known (it fetched its own script
    // from its reserved address) lands in its trace.
    let own_script = format!("{HTTP}/boot/{}.ipxe", HTTP_CLIENT.replace(':', "-"));
    assert_eq!(env.http(&ns, &[], &own_script).0, 200);
    env.http(&ns, &["-r", "0-511"], &format!("{HTTP}/images/disk-priv"));
    assert!(
        env.eventually(50, |e| e
            .trace_kinds(HTTP_CLIENT)
            .iter()
            .any(|k| k == "HTTP-IMAGE")),
        "no HTTP-IMAGE in {HTTP_CLIENT}'s trace"
    );

    // Another machine (10.77.0.20) gets catalog images and their list, but not a VM's
    // overlay, not even its name.
    let nbd = |export: &str| format!("nbd://10.77.0.1:{NBD_PORT}/{export}");
    let r = env.run(&ns, &["nbdinfo", "--list", &nbd("")], 60);
    let listed = r.stdout_str();
    assert!(r.ok() && listed.contains("disk-priv"), "{listed}{}", r.stderr);
    assert!(!listed.contains('@'), "the export list shows a client's overlay: {listed}");
    assert!(env.run(&ns, &["nbdinfo", &nbd("disk-priv")], 60).ok(), "a catalog image from the boot network");
    for (disk, what) in [(&disk_a, "A's private overlay"), (&disk_c, "C's standard overlay")] {
        let r = env.run(&ns, &["nbdinfo", disk], 60);
        assert!(!r.ok(), "10.77.0.20 opened {what}: {}", r.stdout_str());
    }
    // Each VM runs where its reservation puts it.
    let ns_of: std::collections::HashMap<&str, String> = [(VM_A, "10.77.0.31"), (VM_B, "10.77.0.32"), (VM_C, "10.77.0.33")]
        .into_iter()
        .map(|(mac, ip)| (mac, env.add_client(Some(&format!("{ip}/24")), Some(mac)).ns))
        .collect();
    let vm_ns = |disk: &str| {
        let mac = [VM_A, VM_B, VM_C].into_iter().find(|m| disk.ends_with(&m.replace(':', "-"))).unwrap();
        ns_of[mac].clone()
    };

    let lab = &env.lab;
    let vm = |cmdline: &str, disk: &str, boot: &str| {
        boot_vm(lab, &vm_ns(disk), &dir, &kernel, &initrd, cmdline, disk, boot)
    };
    let base = format!("base-{nonce}");

    // 1. A writes its note.
    let a1 = vm(&cmd_a, &disk_a, "a1");
    assert_eq!(
        (a1.found.as_str(), a1.base.as_str(), a1.disk.as_str()),
        ("none", base.as_str(), disk_a.as_str())
    );
    assert_eq!(
        a1.reread,
        format!("{nonce}/a1"),
        "A's write did not reach its overlay"
    );
    check_image("after A wrote to its private overlay");
    nbd_idle(&env.lab, &srv); // A's connection is gone, and with it its overlay

    // 2. B (another MAC, same image) does not see it; C writes to a standard overlay.
    let (b1, c1) = std::thread::scope(|sc| {
        let b = sc.spawn(|| vm(&cmd_b, &disk_b, "b1"));
        let c = sc.spawn(|| vm(&cmd_c, &disk_c, "c1"));
        (b.join().unwrap(), c.join().unwrap())
    });
    assert_eq!(b1.found, "none", "B sees A's write");
    assert_eq!(b1.reread, format!("{nonce}/b1"));
    assert_eq!(
        (c1.found.as_str(), c1.reread.as_str()),
        ("none", format!("{nonce}/c1").as_str())
    );
    check_image("after B and C wrote");
    nbd_idle(&env.lab, &srv);

    // 3. A boots again (private: its note is there, B's is not); C again (standard: gone).
    let (a2, c2) = std::thread::scope(|sc| {
        let a = sc.spawn(|| vm(&cmd_a, &disk_a, "a2"));
        let c = sc.spawn(|| vm(&cmd_c, &disk_c, "c2"));
        (a.join().unwrap(), c.join().unwrap())
    });
    assert_eq!(
        a2.found,
        format!("{nonce}/a1"),
        "A's private overlay lost its write across a reboot"
    );
    assert_eq!(c2.found, "none", "C's standard overlay survived a reboot");
    assert_eq!(c2.base, base);
    check_image("after every boot");
    let private = dir.join("data/overlays/private").join(&image_sha);
    for mac in ["52-54-00-77-00-a1", "52-54-00-77-00-a2"] {
        assert!(
            private.join(mac).is_dir(),
            "no private overlay for {mac} under {}",
            private.display()
        );
    }
    assert!(
        !private.join("52-54-00-77-00-a3").exists(),
        "C's standard overlay was kept as private"
    );
    // Through all of it the catalog and the CLI agree.
    let out = fleetboot(&["image", "show", "disk-priv"], &env.config);
    assert!(out.contains("disk-priv:1"), "{out}");
}

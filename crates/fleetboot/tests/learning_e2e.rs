//! End to end in network namespaces: the streaming agent (a local disk filled by the
//! multicast stream) and sector-sequence learning (the block order recorded from a client's
//! reads).
//!
//! The lab's server namespace runs `fleetboot nbd` (the catalog over NBD, with the
//! sequence recorder every NBD service installs) and `fleetboot stream serve` (multicast
//! on `srv0`, TTL 1); each client namespace runs one `fleetboot agent stream`, whose local
//! NBD disk listens on the namespace's own loopback.
//!
//! 1. [`agent_serves_the_image_before_and_after_its_stream_and_keeps_writes_local`]: `qemu-img convert`
//!    from the agent's disk while the (rate-capped) stream is still running, and again
//!    after it completed, gives the image byte for byte (SHA-256); reads of blocks not yet
//!    received were fetched by unicast; a write through the agent's disk reads back there
//!    but never reaches the server (the catalog blob and the server's export keep their
//!    SHA-256).
//! 2. [`learned_sequence_then_three_vms_boot_through_agents`]: phase 1, no sequence yet and
//!    no stream: one QEMU VM (TCG, the lab kernel via `-kernel`, an initramfs of its own
//!    that mounts an ext4 root from the NVMe disk = the agent's export, reads a set of files
//!    and runs the disk's busybox, then prints `LEARN-E2E ... sum=`) boots; every block it
//!    reads is a miss the agent fetches from the server, whose recorder stores the order
//!    as `images/sequences/<sha256>.seq`. Phase 2: a fresh NBD server and a stream session
//!    that loads that sequence; three VMs boot at once, each through its own agent in its
//!    own namespace, and all print the marker with the right checksum.
//!
//! Reported (printed) per phase: the server's image reads, sequential vs random, from the
//! NBD recorder's `images/sequences/<sha256>.reads` (written every 10 s) and from the stream
//! sender's `stream session finished` log line (its `pread`s in stream order).
//!
//! Network safety: everything runs inside this lab's namespaces (multicast included: the
//! sender is bound to `srv0`, receivers join on their `eth0`, TTL 1); the agents' NBD
//! disks listen on each client namespace's own 127.0.0.1. Every process runs under
//! `timeout` and is owned by the lab (stopped by pid; namespaces removed on drop).
//!
//! Gating: root, QEMU, qemu-img/qemu-io, mkfs.ext4, busybox and the lab payload; skips
//! otherwise unless `FLEETBOOT_REQUIRE_E2E=1`.

mod common;

use common::{host, s, sha256, tail, Env, BIN};
use fleetboot_lab::netns::{Lab, Proto, SERVER_IF};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

const NBD_PORT: u16 = 10809;
const AGENT_PORT: u16 = 10810;
const IMAGE: &str = "lroot";
const IMAGE_MIB: usize = 32;
const VM_TIMEOUT_SECS: u64 = 150;
/// How often the NBD service stores sequences and read counts (`stream_cmd::learn_sequences`).
const STORE_EVERY: Duration = Duration::from_secs(10);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
BOOT=$(arg fleetboot.boot)
fail() { echo; echo "LEARN-E2E-FAIL boot=$BOOT $*"; poweroff -f; }
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/nvme0n1 ] || fail "no /dev/nvme0n1"
mkdir -p /mnt
mount -t ext4 -o ro /dev/nvme0n1 /mnt || fail "mount failed"
SUM=$(cat /mnt/data/* | sha256sum | cut -d' ' -f1)
/mnt/bin/busybox true || fail "the disk's busybox does not run"
BASE=$(cat /mnt/etc/fleetboot-image)
umount /mnt
echo; echo "LEARN-E2E boot=$BOOT base=$BASE sum=$SUM"
poweroff -f
"#;

/// One lab at a time even under `cargo test` (nextest runs `*e2e*` binaries one by one).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ready(test: &str, more: &[&str]) -> bool {
    let mut tools = vec!["qemu-img", "qemu-io"];
    tools.extend_from_slice(more);
    common::e2e_ready(test, &tools)
}



fn fleetboot(env: &Env, args: &[&str]) -> String {
    let mut full = vec![BIN];
    full.extend_from_slice(args);
    let cfg = s(&env.config);
    full.extend_from_slice(&["--config", &cfg]);
    host(&full, 120)
}

/// `key=value` of a log or report line (ANSI colours stripped).
fn field(line: &str, key: &str) -> Option<String> {
    fleetboot_lab::vm::strip_ansi(line)
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.trim_end_matches([',', ';', ')']).parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Polls `f` every 100 ms until it returns `Some`, at most `limit`.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Adds `[nbd]` to the test's config and imports `image` as [`IMAGE`]; returns its SHA-256.
fn catalog(env: &Env, image: &Path) -> String {
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!(
        "\n[nbd]\nenabled = true\nlisten = \"0.0.0.0:{NBD_PORT}\"\n"
    ));
    fs::write(&env.config, cfg).unwrap();
    let out = fleetboot(env, &["image", "import", &s(image), "--name", IMAGE]);
    assert!(out.contains(&format!("imported {IMAGE}:1")), "{out}");
    sha256(image)
}

/// A process the lab owns, its output in files.
struct Proc {
    pid: u32,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn start(lab: &mut Lab, ns: &str, name: &str, dir: &Path, args: &[&str]) -> Proc {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let mut cmd = lab.cmd(ns, "timeout");
        cmd.args(["-s", "TERM", "-k", "10", "600", BIN])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("FLEETBOOT_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let pid = lab.spawn(name, cmd).expect("starting fleetboot");
        Proc { pid, out, err }
    }

    fn stop(&self, lab: &mut Lab) {
        lab.stop(self.pid, Duration::from_secs(10));
    }

    fn logs(&self) -> String {
        format!(
            "{}\n{}",
            fs::read_to_string(&self.out).unwrap_or_default(),
            fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// The first line of its output containing `what`, waiting at most `limit`.
    fn wait_line(&self, what: &str, limit: Duration) -> String {
        eventually(limit, || {
            self.logs()
                .lines()
                .find(|l| l.contains(what))
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            panic!(
                "no {what:?} within {limit:?}; output:\n{}",
                tail(&self.err, 30)
            )
        })
    }
}

fn start_nbd(env: &mut Env, name: &str) -> Proc {
    let (dir, cfg, ns) = (env.dir.path.clone(), s(&env.config), env.server_ns());
    let p = Proc::start(&mut env.lab, &ns, name, &dir, &["nbd", "--config", &cfg]);
    env.lab
        .wait_listening(&ns, Proto::Tcp, NBD_PORT, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("NBD did not listen: {e:#}\n{}", p.logs()));
    p
}

/// `fleetboot stream serve` for [`IMAGE`]: one session, starting once `receivers` agents
/// registered, capped at `rate` bytes/s.
fn start_stream(env: &mut Env, name: &str, receivers: u32, rate: u64) -> Proc {
    let dir = env.dir.path.clone();
    let conf = dir.join(format!("{name}.toml"));
    fs::write(
        &conf,
        format!(
            "data_dir = \"{}\"\n[server]\naddress = \"10.77.0.1\"\ninterface = \"{SERVER_IF}\"\n\
             [dhcp]\nmode = \"off\"\n\n[stream]\nsite_secret_file = \"{}\"\nsigning_key_file = \"{}\"\n\n[[stream.session]]\nimage = \"{IMAGE}\"\n\
             rate = {rate}\nsolicit_secs = 60.0\nmin_receivers = {receivers}\nstart_at = {receivers}\n",
            s(&dir.join("data")),
            s(&site_secret(&dir)),
            s(&signing_key(&dir))
        ),
    )
    .unwrap();
    let ns = env.server_ns();
    Proc::start(
        &mut env.lab,
        &ns,
        name,
        &dir,
        &["stream", "serve", "--config", &s(&conf)],
    )
}

/// The site secret the stream session and its agents share: a 0600 file in the test's
/// directory, written once.
fn site_secret(dir: &Path) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("site.secret");
    if let Ok(mut f) = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p) {
        let hex: String = common::random_bytes(0x5EC2E7, 32).iter().map(|b| format!("{b:02x}")).collect();
        writeln!(f, "{hex}").unwrap();
    }
    p
}

/// The stream sender's signing key (0600, made once) in the test's directory; its public
/// half, beside it, is what the agents are given.
fn signing_key(dir: &Path) -> PathBuf {
    let p = dir.join("stream.key");
    fleetboot_streamd::secret::load_signing_key(&p, true).unwrap();
    p
}

/// `fleetboot agent stream` in `ns`, its disk on `127.0.0.1:AGENT_PORT` there.
fn start_agent(env: &mut Env, ns: &str, name: &str) -> Proc {
    let dir = env.dir.path.clone();
    let cache = s(&dir.join(format!("{name}-cache")));
    let listen = format!("127.0.0.1:{AGENT_PORT}");
    let server = format!("10.77.0.1:{NBD_PORT}");
    let secret = s(&site_secret(&dir));
    let public_key = s(&fleetboot_streamd::secret::public_key_path(&signing_key(&dir)));
    let args = [
        "agent",
        "stream",
        "--server",
        &server,
        "--image",
        IMAGE,
        "--interface",
        "eth0",
        "--cache",
        &cache,
        "--nbd-listen",
        &listen,
        "--site-secret-file",
        &secret,
        "--sender-key-file",
        &public_key,
    ];
    let p = Proc::start(&mut env.lab, ns, name, &dir, &args);
    env.lab
        .wait_listening(ns, Proto::Tcp, AGENT_PORT, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the agent's disk did not listen: {e:#}\n{}", p.logs()));
    p
}

/// Stops an agent: `(verified, disk reads, reads fetched by unicast)` from its summary line
/// (printed when it stops after a verified stream), else from its last progress line (an
/// agent stopped before any stream came: not verified).
fn agent_summary(env: &mut Env, agent: &Proc) -> (bool, u64, u64) {
    agent.stop(&mut env.lab);
    let logs = agent.logs();
    let line = (logs.lines().rev())
        .find(|l| l.contains("disk reads") && l.contains("verified="))
        .or_else(|| logs.lines().rev().find(|l| l.contains("disk reads")))
        .unwrap_or_else(|| panic!("no agent summary or progress:\n{}", agent.logs()))
        .to_string();
    let after = |k: &str| -> u64 {
        line.split(k)
            .nth(1)
            .and_then(|r| r.trim().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {k:?} in {line:?}"))
    };
    (
        field(&line, "verified").as_deref() == Some("true"),
        after("disk reads"),
        after("fetched"),
    )
}

/// The NBD recorder's read counts of `sha` once a store round after `since` wrote them:
/// `(reads, sequential, random)`; `None` if no round wrote any (no NBD reads).
fn nbd_reads(data: &Path, sha: &str, since: SystemTime) -> Option<(u64, u64, u64)> {
    let p = data.join("images/sequences").join(format!("{sha}.reads"));
    eventually(STORE_EVERY + Duration::from_secs(3), || {
        let m = fs::metadata(&p).ok()?.modified().ok()?;
        (m >= since).then(|| fs::read_to_string(&p).ok()).flatten()
    })
    .map(|line| {
        (
            num(&line, "reads"),
            num(&line, "sequential"),
            num(&line, "random"),
        )
    })
}

/// The stream sender's reads from its `stream session finished` line: `(reads, sequential,
/// random)`.
fn sender_reads(stream: &Proc) -> (u64, u64, u64) {
    let line = stream.wait_line("stream session finished", Duration::from_secs(60));
    (
        num(&line, "reads"),
        num(&line, "sequential_reads"),
        num(&line, "random_reads"),
    )
}

/// `qemu-img convert` of an NBD export into `out` from inside `ns`.
fn read_export(env: &mut Env, ns: &str, url: &str, out: &Path) -> String {
    let _ = fs::remove_file(out);
    env.run_ok(
        ns,
        &[
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            url,
            &s(out),
        ],
        120,
    );
    sha256(out)
}

#[test]
fn agent_serves_the_image_before_and_after_its_stream_and_keeps_writes_local() {
    if !ready(
        "agent_serves_the_image_before_and_after_its_stream_and_keeps_writes_local",
        &[],
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let mut env = Env::new("agent");
    let dir = env.dir.path.clone();
    let image = dir.join("image.raw");
    let mut bytes = common::random_bytes(0xA6E7, IMAGE_MIB << 20);
    bytes[(8 << 20)..(12 << 20)].fill(0); // a zero run: sparse handling must not matter
    fs::write(&image, &bytes).unwrap();
    drop(bytes);
    let sha = catalog(&env, &image);
    let blob = dir.join("data/images/sha256").join(&sha);

    let nbd = start_nbd(&mut env, "nbd");
    // The session waits for two receivers, so while only this agent has registered no
    // block has arrived yet: every read of the first pass must be fetched by unicast.
    let stream = start_stream(&mut env, "stream", 2, 4_000_000);
    let ns = env.add_client(Some("10.77.0.21/24"), None).ns;
    let agent = start_agent(&mut env, &ns, "agent");
    let local = format!("nbd://127.0.0.1:{AGENT_PORT}/{IMAGE}");

    // 1. Before any block was streamed: misses come by unicast.
    let first = read_export(&mut env, &ns, &local, &dir.join("read1.raw"));
    assert_eq!(first, sha, "reading the agent's disk before the stream");
    assert!(
        !fs::read_to_string(&agent.err).unwrap_or_default().contains("image complete"),
        "the stream completed with only one of two receivers registered"
    );
    // A second receiver completes the session's solicitation and the stream flows.
    let ns2 = env.add_client(Some("10.77.0.22/24"), None).ns;
    let _agent2 = start_agent(&mut env, &ns2, "agent2");

    // 2. After the stream completed: everything local.
    agent.wait_line("image complete and verified", Duration::from_secs(90));
    let second = read_export(&mut env, &ns, &local, &dir.join("read2.raw"));
    assert_eq!(second, sha, "reading the agent's disk after the stream");
    let cached = dir.join("agent-cache").join(format!("{sha}.img"));
    assert_eq!(sha256(&cached), sha, "the agent's cache");

    // 3. A write through the agent's disk stays in its overlay.
    let w = env.run_ok(
        &ns,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1048576 65536",
            &local,
        ],
        60,
    );
    assert!(w.stdout_str().contains("wrote 65536"), "{}", w.stdout_str());
    let r = env.run_ok(
        &ns,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x5a 1048576 65536",
            &local,
        ],
        60,
    );
    let r = r.stdout_str();
    assert!(
        r.contains("read 65536") && !r.contains("Pattern verification failed"),
        "the write does not read back through the agent: {r}"
    );
    let third = read_export(&mut env, &ns, &local, &dir.join("read3.raw"));
    assert_ne!(third, sha, "the agent's disk does not show its own write");
    assert_eq!(sha256(&blob), sha, "the server's image changed");
    let server = format!("nbd://10.77.0.1:{NBD_PORT}/{IMAGE}");
    let on_server = read_export(&mut env, &ns, &server, &dir.join("server.raw"));
    assert_eq!(on_server, sha, "the server's export changed");

    let (verified, reads, fetched) = agent_summary(&mut env, &agent);
    let (s_reads, s_seq, s_rand) = sender_reads(&stream);
    eprintln!(
        "AGENT-E2E agent: verified={verified}, disk reads {reads} of which {fetched} fetched by \
         unicast; stream sender's image reads {s_reads} (sequential {s_seq}, random {s_rand}); \
         {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(verified, "the agent's stream did not verify");
    assert!(
        fetched > 0,
        "no read was fetched by unicast before the stream"
    );
    assert!(reads > fetched, "no read was served locally");

    // 4. A cache changed on disk after it was verified is not served: one byte flipped,
    //    the agent started again over it reads the image's bytes (from the server).
    let mut tampered = fs::read(&cached).unwrap();
    tampered[5 << 20] ^= 0x01;
    fs::write(&cached, &tampered).unwrap();
    drop(tampered);
    let again = start_agent(&mut env, &ns, "agent");
    let fourth = read_export(&mut env, &ns, &local, &dir.join("read4.raw"));
    assert_eq!(fourth, sha, "the agent served a cache that changed after it was verified");
    again.stop(&mut env.lab);
    assert!(
        again.logs().contains("the cache from an earlier run is not used"),
        "the agent does not say it refused the changed cache:\n{}",
        again.logs()
    );
    stream.stop(&mut env.lab);
    nbd.stop(&mut env.lab);
}

/// The VM's initramfs: static busybox and [`INIT`], as a newc cpio.
fn build_initramfs(dir: &Path) -> PathBuf {
    let ir = dir.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "mnt"] {
        fs::create_dir_all(ir.join(d)).unwrap();
    }
    fs::copy(
        common::which("busybox").expect("busybox"),
        ir.join("bin/busybox"),
    )
    .unwrap();
    fs::write(ir.join("init"), INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(ir.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("learn-initrd.cpio");
    let script = format!(
        "cd {} && find . | busybox cpio -o -H newc > {}",
        s(&ir),
        s(&out)
    );
    host(&["sh", "-c", &script], 60);
    out
}

/// A 32 MiB ext4 image: busybox, `/etc/fleetboot-image` and `/data/f0..f7` (256 KiB each,
/// spread over the disk by ext4). Returns the image and the SHA-256 of `cat /data/*`.
fn build_image(dir: &Path, nonce: &str) -> (PathBuf, String) {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "data"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(common::which("busybox").unwrap(), root.join("bin/busybox")).unwrap();
    fs::write(root.join("etc/fleetboot-image"), format!("base-{nonce}\n")).unwrap();
    let mut h = Sha256::new();
    for i in 0..8u64 {
        let b = common::random_bytes(0x1EA7 + i, 256 << 10);
        h.update(&b);
        fs::write(root.join(format!("data/f{i}")), b).unwrap();
    }
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
            &format!("{IMAGE_MIB}M"),
        ],
        120,
    );
    (img, format!("{:x}", h.finalize()))
}

/// Boots one VM in `ns` whose NVMe disk is `disk` and returns its `LEARN-E2E` line.
fn boot_vm(lab: &Lab, ns: &str, dir: &Path, kernel: &Path, initrd: &Path, disk: &str, boot: &str) -> String {
    let append = "console=ttyS0 panic=-1 quiet";
    common::boot_disk_vm(lab, ns, dir, kernel, initrd, append, disk, boot, "LEARN-E2E", VM_TIMEOUT_SECS)
}

#[test]
fn learned_sequence_then_three_vms_boot_through_agents() {
    if !ready(
        "learned_sequence_then_three_vms_boot_through_agents",
        &["qemu-system-x86_64", "mkfs.ext4", "busybox"],
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let payload =
        fleetboot_lab::payload::ensure(None).expect("the lab payload (scripts/build-payload.sh)");
    let kernel = payload.join("vmlinuz");
    let nonce = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            & 0xffff_ffff_ffff
    );
    let mut env = Env::new("learning");
    let dir = env.dir.path.clone();
    let data = dir.join("data");
    let initrd = build_initramfs(&dir);
    let (image, want_sum) = build_image(&dir, &nonce);
    let sha = catalog(&env, &image);
    let seq_path = data.join("images/sequences").join(format!("{sha}.seq"));
    assert!(!seq_path.exists());
    let local = format!("nbd://127.0.0.1:{AGENT_PORT}/{IMAGE}");
    let check = |line: &str, boot: &str| {
        assert_eq!(
            field(line, "sum").as_deref(),
            Some(want_sum.as_str()),
            "boot {boot} read other file contents"
        );
        assert_eq!(
            field(line, "base"),
            Some(format!("base-{nonce}")),
            "boot {boot}"
        );
    };

    // Phase 1: no sequence, no stream. Every block the VM reads is a miss its agent
    // fetches from the server, whose recorder learns the order.
    let nbd1 = start_nbd(&mut env, "nbd-phase1");
    let ns0 = env.add_client(Some("10.77.0.21/24"), None).ns;
    let agent0 = start_agent(&mut env, &ns0, "agent-learn");
    let line = boot_vm(&env.lab, &ns0, &dir, &kernel, &initrd, &local, "learn");
    check(&line, "learn");
    let booted = SystemTime::now();
    let (p1_reads, p1_seq, p1_rand) = nbd_reads(&data, &sha, booted).unwrap_or_else(|| {
        panic!(
            "no read counts stored after phase 1:\n{}",
            tail(&nbd1.err, 20)
        )
    });
    let seq = fs::read(&seq_path)
        .unwrap_or_else(|e| panic!("no sequence {} after phase 1: {e}", seq_path.display()));
    assert!(
        seq.len() >= 14 && &seq[..6] == b"FBSEQ1",
        "not a sequence file"
    );
    let seq_blocks = u32::from_be_bytes(seq[10..14].try_into().unwrap());
    let seq_bs = u32::from_be_bytes(seq[6..10].try_into().unwrap());
    assert!(seq_blocks > 0, "an empty sequence");
    let (_, _, fetched0) = agent_summary(&mut env, &agent0);
    nbd1.stop(&mut env.lab);
    eprintln!(
        "LEARN-E2E phase 1 (1 VM, learning): server NBD image reads {p1_reads}: sequential {p1_seq}, \
         random {p1_rand}; agent fetched {fetched0} reads by unicast; sequence of {seq_blocks} \
         blocks of {seq_bs} bytes ({} KiB of the {IMAGE_MIB} MiB image)",
        (seq_blocks as u64 * seq_bs as u64) >> 10
    );
    assert!(p1_reads > 0, "the server recorded no reads in phase 1");

    // Phase 2: a fresh NBD server (counts only: the image has a sequence now) and a stream
    // session that starts once all three agents registered, in the learned order.
    let t2 = Instant::now();
    let nbd2 = start_nbd(&mut env, "nbd-phase2");
    // Slow enough (~23 s for the image) that the VMs boot while most of the image is
    // still on its way: only the learned order puts what they read in their caches first.
    let stream = start_stream(&mut env, "stream-phase2", 3, 1_500_000);
    let mut clients = Vec::new();
    for i in 0..3 {
        let ns = env
            .add_client(Some(&format!("10.77.0.{}/24", 22 + i)), None)
            .ns;
        let agent = start_agent(&mut env, &ns, &format!("agent-{i}"));
        clients.push((ns, agent));
    }
    // The VMs boot once every agent holds the learned part of the stream (its progress
    // line says so; the rest of the image is still streaming): then every read the
    // boot makes is in the cache, and a unicast fetch means the stream did not send
    // what the boot reads first.
    for (_, agent) in &clients {
        eventually(Duration::from_secs(90), || {
            let logs = fs::read_to_string(&agent.err).unwrap_or_default();
            logs.lines()
                .filter_map(|l| l.strip_prefix("agent: ")?.split('/').next()?.parse::<u64>().ok())
                .any(|blocks| blocks >= seq_blocks as u64)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("an agent never received the learned sequence:\n{}", tail(&agent.err, 20)));
    }
    let lines: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, (ns, _))| {
                let (lab, dir, kernel, initrd, local) = (&env.lab, &dir, &kernel, &initrd, &local);
                sc.spawn(move || boot_vm(lab, ns, dir, kernel, initrd, local, &format!("vm{i}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let booted = SystemTime::now();
    for (i, l) in lines.iter().enumerate() {
        check(l, &format!("vm{i}"));
    }
    for (_, agent) in &clients {
        agent.wait_line("image complete and verified", Duration::from_secs(90));
    }
    let (s_reads, s_seq, s_rand) = sender_reads(&stream);
    let mut fetched = Vec::new();
    let mut fetched_total = 0;
    for (_, agent) in &clients {
        let (verified, reads, f) = agent_summary(&mut env, agent);
        assert!(verified, "an agent's stream did not verify");
        fetched.push(format!("{f}/{reads}"));
        fetched_total += f;
    }
    // None at all: the VMs started once every agent held the learned part of the stream,
    // so everything they read was local; only a datagram lost on the lab's lossless
    // bridge (a full socket buffer at 1.5 MB/s with 16 MiB of buffer) could make one
    // fetch. Streamed in natural order instead, the same boots fetch (3 reads in a run
    // made to check this assertion).
    assert_eq!(
        fetched_total,
        0,
        "the streamed boots fetched reads by unicast ({})",
        fetched.join(", ")
    );
    // Only the agents' misses reach the server's NBD service in this phase: none, none to
    // wait for.
    let p2 = if fetched_total == 0 {
        (0, 0, 0)
    } else {
        nbd_reads(&data, &sha, booted).expect("no read counts stored after phase 2")
    };
    stream.stop(&mut env.lab);
    nbd2.stop(&mut env.lab);
    eprintln!(
        "LEARN-E2E phase 2 (3 VMs at once, streamed by the sequence, {:.1} s): server image reads: \
         stream sender {s_reads} (sequential {s_seq}, random {s_rand}), NBD {} (sequential {}, \
         random {}); agents' disk reads fetched by unicast / all: {}; whole test {:.1} s",
        t2.elapsed().as_secs_f64(),
        p2.0,
        p2.1,
        p2.2,
        fetched.join(", "),
        t0.elapsed().as_secs_f64()
    );
    // In natural order the sender reads the image in one sequential sweep (one random
    // read, the first); the learned order jumps between the runs the VM read.
    assert!(
        s_rand > 1,
        "the session did not stream in the learned order ({s_rand} random reads)"
    );
    assert_eq!(
        fs::read(&seq_path).unwrap(),
        seq,
        "phase 2 changed the learned sequence"
    );
    assert_eq!(sha256(&data.join("images/sha256").join(&sha)), sha);
}

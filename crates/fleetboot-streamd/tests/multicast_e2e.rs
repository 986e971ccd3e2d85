//! End to end in network namespaces: one sender (`fleetboot-streamd send`) in the lab's
//! server namespace and three receivers in client namespaces on the lab bridge, a 64 MiB
//! image, without loss and with 1% loss towards one receiver (nftables on the bridge).
//! Every receiver's copy must hash to the image's SHA-256, and at 0% loss the server's
//! interface must have sent at most 1.05× the image (frames, headers included).
//!
//! Multicast never leaves the lab: the sender's socket is bound to `srv0` in the server
//! namespace, receivers join on `eth0` in their own namespaces, TTL 1.
//!
//! Gating: without root or a tool (`ip`, `nft`, `timeout`) the tests print why and pass,
//! unless `FLEETBOOT_REQUIRE_E2E=1`, which makes that a failure. Pass/fail is counts and
//! hashes, never times.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fleetboot_lab::netns::{Lab, SERVER_IF};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot-streamd");
const IMAGE_MIB: usize = 64;
const RECEIVERS: usize = 3;
/// Rate cap, bytes per second.
const RATE: u64 = 40_000_000;

fn ready(test: &str) -> bool {
    fleetboot_lab::gate::e2e_ready(test, &["ip", "nft", "timeout"])
}

/// A deterministic pseudo-random image with some zero runs (sparse files must still match).
fn write_image(path: &Path, mib: usize, seed: u64) -> String {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = Sha256::new();
    let mut x = seed;
    let mut chunk = vec![0u8; 1 << 20];
    for m in 0..mib {
        if m % 7 == 3 {
            chunk.iter_mut().for_each(|b| *b = 0);
        } else {
            for c in chunk.chunks_mut(8) {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                c.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
        }
        f.write_all(&chunk).unwrap();
        h.update(&chunk);
    }
    f.flush().unwrap();
    format!("{:x}", h.finalize())
}

fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

fn tx_bytes(lab: &Lab) -> u64 {
    let out = lab
        .exec(
            lab.server_ns(),
            &[
                "cat",
                &format!("/sys/class/net/{SERVER_IF}/statistics/tx_bytes"),
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `key=value` pairs of a summary line.
fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

fn wait(lab: &Lab, mut child: Child, what: &str, limit: Duration) -> (bool, String, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            use std::io::Read;
            child.stdout.take().unwrap().read_to_string(&mut out).ok();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            lab.untrack(child.id());
            return (st.success(), out, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            lab.untrack(child.id());
            panic!("{what} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        if std::env::var("FLEETBOOT_E2E_KEEP").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One lab at a time even under `cargo test` (nextest runs e2e binaries one by one).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(loss_percent: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TmpDir(std::env::temp_dir().join(format!(
        "fleetboot-mc-e2e-{}-{loss_percent}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let img = dir.0.join("image.raw");
    let sha = write_image(&img, IMAGE_MIB, 0xF1EE_7B00 + loss_percent as u64);
    let size = (IMAGE_MIB << 20) as u64;

    let mut lab = Lab::new().unwrap();
    let mut clients = Vec::new();
    for i in 0..RECEIVERS {
        clients.push(
            lab.add_client(Some(&format!("10.77.0.{}/24", 21 + i)))
                .unwrap(),
        );
    }
    if loss_percent > 0 {
        let port = &clients[RECEIVERS - 1].switch_port;
        let rules = format!(
            "table bridge fbloss {{\n  chain c {{\n    type filter hook forward priority 0;\n    \
             oifname \"{port}\" numgen random mod 100 < {loss_percent} counter drop\n  }}\n}}\n"
        );
        let mut c = lab.cmd(lab.switch_ns(), "nft");
        c.args(["-f", "-"]).stdin(Stdio::piped());
        let mut ch = c.spawn().unwrap();
        ch.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(ch.wait().unwrap().success(), "nft rules");
    }

    let group = "239.192.77.1:10900";
    // The sender takes the site secret from the environment, the receivers from a file.
    let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + loss_percent as usize + 1) % 251)).collect();
    let secret_file = dir.0.join("site.secret");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&secret_file).unwrap();
        writeln!(f, "{secret}").unwrap();
    }
    // The sender signs with its key; the receivers are given the public half.
    let signing_key = dir.0.join("sender.key");
    fleetboot_streamd::secret::load_signing_key(&signing_key, true).unwrap();
    let public_key = fleetboot_streamd::secret::public_key_path(&signing_key);
    let mut rx = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let out = dir.0.join(format!("rx{i}"));
        let mut cmd = lab.cmd(&c.ns, "timeout");
        cmd.args([
            "120", BIN, "receive", "--iface", "eth0", "--sha256", &sha, "--group", group,
        ])
        .arg("--out")
        .arg(&out)
        .arg("--site-secret-file")
        .arg(&secret_file)
        .arg("--sender-key-file")
        .arg(&public_key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        rx.push((lab.spawn_tracked(&mut cmd).unwrap(), out));
    }
    // Receivers listen before the session opens; the sender waits for all three anyway.
    std::thread::sleep(Duration::from_millis(300));
    let before = tx_bytes(&lab);
    let mut cmd = lab.cmd(lab.server_ns(), "timeout");
    cmd.args([
        "120", BIN, "send", "--iface", SERVER_IF, "--sha256", &sha, "--group", group,
    ])
    .args([
        "--rate",
        &RATE.to_string(),
        "--receivers",
        &RECEIVERS.to_string(),
    ])
    .args(["--solicit", "20"])
    .arg("--file")
    .arg(&img)
    .arg("--signing-key-file")
    .arg(&signing_key)
    .env("FLEETBOOT_STREAM_SECRET", &secret)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let snd = lab.spawn_tracked(&mut cmd).unwrap();
    let (ok, sout, serr) = wait(&lab, snd, "sender", Duration::from_secs(150));
    let after = tx_bytes(&lab);
    let summary = sout.lines().last().unwrap_or_default().to_string();
    eprintln!("loss {loss_percent}%: sender {summary}");
    let rx: Vec<_> = rx
        .into_iter()
        .map(|(child, out)| (wait(&lab, child, "receiver", Duration::from_secs(30)), out))
        .collect();
    if !ok {
        for (i, ((_, o, e), _)) in rx.iter().enumerate() {
            eprintln!("receiver {i}:\n{o}\n{e}");
        }
        panic!("sender failed:\n{sout}\n{serr}");
    }
    let mut summaries = Vec::new();
    for (i, ((ok, o, e), out)) in rx.into_iter().enumerate() {
        assert!(ok, "receiver {i} failed:\n{o}\n{e}");
        eprintln!("loss {loss_percent}%: receiver {i} {}", o.trim());
        assert_eq!(
            field(&o, "sha256_ok").as_deref(),
            Some("true"),
            "receiver {i}"
        );
        assert_eq!(
            sha256_file(&out.join(format!("{sha}.img"))),
            sha,
            "receiver {i}"
        );
        summaries.push(o);
    }
    check_repairs(loss_percent, &summary, &summaries);

    let sent: u64 = field(&summary, "bytes_sent").unwrap().parse().unwrap();
    let egress = after - before;
    let ratio = egress as f64 / size as f64;
    eprintln!(
        "loss {loss_percent}%: srv0 tx {egress} bytes = {ratio:.4}x the image; datagrams {sent} = {:.4}x",
        sent as f64 / size as f64
    );
    assert_eq!(field(&summary, "complete").as_deref(), Some("3"));
    // Datagram bytes can never exceed what left the interface.
    assert!(sent <= egress, "sender counted {sent} > interface {egress}");
    // Frame overhead (~4.3% at 1450-byte blocks) and the signed manifest (36 bytes per
    // block and a signature per 32 blocks, ~2.7%).
    if loss_percent == 0 {
        assert!(ratio <= 1.08, "egress {ratio:.4}x the image at 0% loss");
    } else {
        // The same + the loss rate + FEC/repair slack.
        assert!(
            ratio <= 1.08 + 2.0 * loss_percent as f64 / 100.0,
            "egress {ratio:.4}x under loss"
        );
    }
}

fn count(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Where the repairs went. Without loss: none at all. With loss on the last receiver's
/// link only: every repair went by unicast to that receiver (no FEC, no multicast
/// repair), the others heard no repair at all, and the sender sent it what it lacked
/// plus what the same 1% loss took from the repairs themselves.
///
/// A receiver on a clean link can still lose datagrams to a full socket buffer on a
/// busy machine; then several receivers need repairs and multicast is right. That is
/// said, and the unicast claim is not checked on that run.
fn check_repairs(loss_percent: u32, sender: &str, receivers: &[String]) {
    let (fec, mc, uc) = (count(sender, "fec"), count(sender, "repair_mc"), count(sender, "repair_uc"));
    let blocks = count(sender, "data");
    let lost: Vec<usize> = (0..receivers.len()).filter(|&i| count(&receivers[i], "data") < blocks).collect();
    eprintln!("loss {loss_percent}%: repairs fec={fec} multicast={mc} unicast={uc}; receivers that lost DATA: {lost:?}");
    if loss_percent == 0 {
        if lost.is_empty() {
            assert_eq!((fec, mc, uc), (0, 0, 0), "repairs without loss");
        }
        return;
    }
    let last = receivers.len() - 1;
    assert!(lost.contains(&last), "the lossy link lost nothing");
    if lost != [last] {
        eprintln!("loss {loss_percent}%: receivers {lost:?} lost datagrams (socket buffers?): the unicast-only claim is not checked on this run");
        return;
    }
    assert_eq!((fec, mc), (0, 0), "repairs for one receiver went by FEC or multicast");
    for (i, r) in receivers.iter().enumerate().take(last) {
        assert_eq!((count(r, "repairs"), count(r, "duplicates")), (0, 0), "receiver {i} heard repairs meant for another");
    }
    let needed = blocks - count(&receivers[last], "data");
    let got = count(&receivers[last], "repairs");
    assert_eq!(got, needed, "the lossy receiver's repairs");
    // What 1% loss takes from `needed` repairs, with a wide margin (binomial tail).
    assert!((needed..=needed + needed / 20 + 5).contains(&uc), "{uc} unicast repairs for {needed} lost blocks");
}

#[test]
fn e2e_three_receivers_no_loss() {
    if ready("e2e_three_receivers_no_loss") {
        run(0);
    }
}

#[test]
fn e2e_three_receivers_one_percent_loss_on_one_link() {
    if ready("e2e_three_receivers_one_percent_loss_on_one_link") {
        run(1);
    }
}

/// Without a site secret, or with the all-zero one, neither side starts; nor does a
/// receiver without the sender's public key (no namespace needed: they refuse before
/// opening a socket).
#[test]
fn no_secret_no_stream() {
    let dir = std::env::temp_dir().join(format!("fleetboot-mc-secret-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("image.raw");
    std::fs::write(&img, vec![1u8; 4096]).unwrap();
    let zero = dir.join("zero.secret");
    std::fs::write(&zero, "0".repeat(64)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&zero, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sha = "ab".repeat(32);
    let send = |extra: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["send", "--iface", "lo", "--sha256", &sha, "--solicit", "0"])
            .arg("--file")
            .arg(&img)
            .arg("--signing-key-file")
            .arg(dir.join("sender.key"))
            .args(extra)
            .env_remove("FLEETBOOT_STREAM_SECRET")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = send(&[]);
    assert!(!ok && err.contains("no site secret"), "{err}");
    let (ok, err) = send(&["--site-secret-file", zero.to_str().unwrap()]);
    assert!(!ok && err.contains("all zeros"), "{err}");
    let out = std::process::Command::new(BIN)
        .args(["receive", "--iface", "lo", "--sha256", &sha, "--out"])
        .arg(&dir)
        .env("FLEETBOOT_STREAM_SECRET", "0".repeat(64))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("all zeros"), "{err}");
    let out = std::process::Command::new(BIN)
        .args(["receive", "--iface", "lo", "--sha256", &sha, "--out"])
        .arg(&dir)
        .env("FLEETBOOT_STREAM_SECRET", "01".repeat(32))
        .env_remove("FLEETBOOT_STREAM_SENDER_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no sender public key"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! End to end in network namespaces: `fleetboot emulate --stream`. The real `fleetboot
//! serve` (DHCP) and `fleetboot stream serve` (one session of a catalog image, starting
//! once every client registered) in a lab server namespace; `fleetboot emulate --clients 6
//! --stream GROUP` in one lab client namespace: six emulated machines, each leasing its
//! own address, then receiving the image from the multicast stream with the stream's own
//! receiver from that address.
//!
//! Pass/fail is counts and bytes, never times: every client has the image (SHA-256), each
//! from a distinct leased address and registered as a receiver of its own (the sender
//! counted six), nothing was refused, and the server sent the image about once, not six
//! times (egress of the server's veth below 1.5× the image: six unicast copies would be
//! 6×; the margin is for the clients' repairs on a busy machine).
//!
//! Network safety: every packet stays inside namespaces this test creates
//! (`fleetboot_lab::netns::Lab`, deleted on drop with the processes it started); the
//! session's multicast leaves the server only on its veth, TTL 1.
//!
//! Gating: needs root and `ip`, `ss`, `timeout`; otherwise it prints why and passes, unless
//! `FLEETBOOT_REQUIRE_E2E=1`, which makes that a failure.

mod common;

use common::{random_bytes, TestDir};
use fleetboot_lab::netns::{output_with_timeout, Lab, Proto, CLIENT_IF, SERVER_IF};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");
const CLIENTS: usize = 6;
const IMAGE: usize = 3 * 1024 * 1024 + 123;
const GROUP: &str = "239.192.77.9:10900";
/// A site secret for this test only.
const SECRET: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

fn config(dir: &Path) -> String {
    format!(
        r#"data_dir = "{data}"

[server]
address = "10.77.0.1"
interface = "{SERVER_IF}"
root = "{root}"

[dhcp]
mode = "server"
authoritative = true

[[dhcp.subnet]]
network = "10.77.0.0/24"
range = ["10.77.0.100", "10.77.0.250"]
router = "10.77.0.1"
lease_time = 3600

[stream]
interface = "{SERVER_IF}"

[[stream.session]]
image = "moon"
group = "{GROUP}"
rate = 20000000
solicit_secs = 60.0
min_receivers = {CLIENTS}
start_at = {CLIENTS}
ttl = 1
"#,
        data = dir.join("data").display(),
        root = dir.join("root").display(),
    )
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The log without its colours (the subscriber may write them even to a file).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tx_bytes(lab: &Lab) -> u64 {
    let out = lab
        .exec(
            lab.server_ns(),
            &["cat", &format!("/sys/class/net/{SERVER_IF}/statistics/tx_bytes")],
            Duration::from_secs(10),
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn clients_each_on_their_own_address_take_one_stream() {
    if !fleetboot_lab::gate::e2e_ready("clients_each_on_their_own_address_take_one_stream", &["ip", "ss", "timeout"]) {
        return;
    }
    let dir = TestDir::new("emulate-stream");
    std::fs::create_dir_all(dir.join("root")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let image = random_bytes(0x6d6f_6f6e, IMAGE);
    let sha = fleetboot_emulator::sha256_hex(&image);
    let file = dir.join("moon.raw");
    std::fs::write(&file, &image).unwrap();
    let cfg = dir.join("fleetboot.toml");
    std::fs::write(&cfg, config(&dir.path)).unwrap();
    let import = std::process::Command::new(BIN)
        .args(["image", "import"])
        .arg(&file)
        .args(["--name", "moon", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(import.status.success(), "image import: {}", String::from_utf8_lossy(&import.stderr));

    let mut lab = Lab::new().expect("creating the lab namespaces");
    let client = lab.add_client(None).expect("adding the client namespace");
    let srv_ns = lab.server_ns().to_string();
    let server_log = dir.join("server.log");
    let log = std::fs::File::create(&server_log).unwrap();
    let mut serve = lab.cmd(&srv_ns, "timeout");
    serve
        .args(["300", BIN, "serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let server = lab.spawn("fleetboot serve", serve).unwrap();
    if let Err(e) = lab.wait_listening(&srv_ns, Proto::Udp, 67, Duration::from_secs(30)) {
        panic!("{e}; server log:\n{}", log_tail(&server_log));
    }

    let before = tx_bytes(&lab);
    let stream_log = dir.join("stream.log");
    let log = std::fs::File::create(&stream_log).unwrap();
    let mut stream = lab.cmd(&srv_ns, "timeout");
    stream
        .args(["300", BIN, "stream", "serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("FLEETBOOT_STREAM_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let sender = lab.spawn("fleetboot stream serve", stream).unwrap();
    // The sender writes its public key on its first run: what the clients are given.
    let public = dir.join("data/stream/sender.pub");
    let t0 = Instant::now();
    while !public.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(public.exists(), "no sender public key; stream log:\n{}", log_tail(&stream_log));

    let clients = CLIENTS.to_string();
    let mut emulate = lab.cmd(&client.ns, "timeout");
    emulate
        .args(["200", BIN, "emulate", "--clients", &clients, "--interface"])
        .arg(CLIENT_IF)
        .args(["--timeout", "150", "--json", "--release"])
        .args(["--stream", GROUP, "--stream-sha256", &sha, "--sender-key-file"])
        .arg(&public)
        .env("FLEETBOOT_STREAM_SECRET", SECRET)
        .env("RUST_LOG", "warn");
    let out = output_with_timeout(emulate, Duration::from_secs(240)).expect("running emulate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); status {}; stderr:\n{stderr}\nstream log:\n{}",
            out.status,
            log_tail(&stream_log)
        )
    });
    let failures: Vec<&Value> = report["clients"].as_array().unwrap().iter().filter(|c| !c["error"].is_null()).take(3).collect();
    assert!(
        out.status.success() && report["succeeded"] == CLIENTS,
        "{} of {CLIENTS} succeeded; first failures: {failures:#?}\nstderr:\n{stderr}\nstream log:\n{}",
        report["succeeded"],
        log_tail(&stream_log)
    );
    assert_eq!(report["addresses_added"], CLIENTS);
    let mut ips = HashSet::new();
    for c in report["clients"].as_array().unwrap() {
        assert_eq!(c["phase"], "done", "{c:#}");
        assert!(ips.insert(c["ip"].as_str().unwrap().to_string()), "an address was leased twice: {c:#}");
        let f = &c["files"][0];
        assert_eq!((f["role"].as_str(), f["transport"].as_str()), (Some("stream"), Some("stream")), "{c:#}");
        assert_eq!(f["bytes"], IMAGE, "{f:#}");
        assert_eq!(f["sha256"], sha.as_str());
        assert_eq!(f["verified"], true);
        let s = &c["stream"];
        assert_eq!(s["image_size"], IMAGE, "{s:#}");
        assert_eq!(s["blocks"].as_u64(), Some(IMAGE.div_ceil(1450) as u64), "{s:#}");
        assert_eq!(s["refused"], 0, "{s:#}");
        assert_eq!(s["cache_overflow"], 0, "{s:#}");
        // Everything came from the stream: at least the image's bytes were received.
        assert!(s["bytes_received"].as_u64().unwrap() >= IMAGE as u64, "{s:#}");
    }
    assert_eq!(ips.len(), CLIENTS);

    // The sender's session ends once every receiver has everything; its egress is about
    // one image, not one per client.
    let t0 = Instant::now();
    while lab.exited(sender).is_none() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let egress = tx_bytes(&lab) - before;
    let log = strip_ansi(&std::fs::read_to_string(&stream_log).unwrap_or_default());
    assert!(
        (egress as f64) < 1.5 * IMAGE as f64,
        "the server sent {egress} bytes for a {IMAGE}-byte image to {CLIENTS} clients; stream log:\n{}",
        log_tail(&stream_log)
    );
    assert!(
        log.contains(&format!("receivers={CLIENTS} complete={CLIENTS}")),
        "the sender did not count {CLIENTS} receivers; stream log:\n{}",
        log_tail(&stream_log)
    );
    assert!(lab.exited(server).is_none(), "the DHCP server died: {}", log_tail(&server_log));
    eprintln!(
        "stream storm: {CLIENTS} clients, egress {:.4}× the image",
        egress as f64 / IMAGE as f64
    );
}

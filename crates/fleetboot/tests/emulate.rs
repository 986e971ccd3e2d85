//! End-to-end boot storm: the real `fleetboot serve` in a lab server namespace, and
//! `fleetboot emulate --clients 50` in ONE lab client namespace — 50 emulated iPXE clients,
//! each with its own MAC and leased address on that namespace's `eth0`, fetching their
//! script, kernel and initrd over HTTP, then again over TFTP (windowsize 8).
//!
//! Network safety: every packet stays inside namespaces this test creates
//! (`fleetboot_lab::netns::Lab`, deleted on drop with the processes it started). The
//! emulator itself refuses to run outside a lab namespace, which the last test checks
//! with an interface name that does not exist.
//!
//! Gating: needs root and `ip`, `ss`, `timeout`; otherwise it prints why and passes,
//! unless `FLEETBOOT_REQUIRE_E2E=1`, which makes that a failure. Pass/fail is counts and
//! bytes, never times.

use fleetboot_lab::netns::{output_with_timeout, Lab, Proto, CLIENT_IF, SERVER_IF};
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");
const CLIENTS: usize = 50;

/// The two storms each bring up a lab; on two cores they run one after the other.
static SERIAL: Mutex<()> = Mutex::new(());

fn ready(test: &str) -> bool {
    fleetboot_lab::gate::e2e_ready(test, &["ip", "ss", "timeout"])
}

/// Deterministic bytes (xorshift), so a failure reproduces.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var("FLEETBOOT_E2E_KEEP").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn config(dir: &Path, transport: &str) -> String {
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

[pxe]
transport = "{transport}"

[tftp]
enabled = true
listen = "0.0.0.0:69"

[http]
enabled = true
listen = "0.0.0.0:8080"

[[profile]]
name = "storm"
priority = 10
boot = {{ kind = "linux", kernel = "vmlinuz", initrd = ["initrd.gz"], cmdline = "console=ttyS0 id={{mac_hyphen}}" }}
"#,
        data = dir.join("data").display(),
        root = dir.join("root").display(),
    )
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs one storm and checks every client's files byte for byte (size and SHA-256).
fn storm(transport: &str, emulate_args: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = WorkDir(std::env::temp_dir().join(format!(
        "fleetboot-emulate-{}-{transport}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("root")).unwrap();
    std::fs::create_dir_all(dir.0.join("data")).unwrap();
    let kernel = random_bytes(0x6b65_726e, 300 * 1024 + 17);
    let initrd = random_bytes(0x696e_6974, 500 * 1024 + 3);
    std::fs::write(dir.0.join("root/vmlinuz"), &kernel).unwrap();
    std::fs::write(dir.0.join("root/initrd.gz"), &initrd).unwrap();
    let (kernel_sha, initrd_sha) = (
        fleetboot_emulator::sha256_hex(&kernel),
        fleetboot_emulator::sha256_hex(&initrd),
    );
    let cfg = dir.0.join("fleetboot.toml");
    std::fs::write(&cfg, config(&dir.0, transport)).unwrap();

    let mut lab = Lab::new().expect("creating the lab namespaces");
    let client = lab.add_client(None).expect("adding the client namespace");
    let server_log = dir.0.join("server.log");
    let log = std::fs::File::create(&server_log).unwrap();
    let mut serve = lab.cmd(lab.server_ns(), "timeout");
    serve
        .args(["300", BIN, "serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let server = lab.spawn("fleetboot serve", serve).unwrap();
    let srv_ns = lab.server_ns().to_string();
    for (proto, port) in [(Proto::Udp, 67), (Proto::Udp, 69), (Proto::Tcp, 8080)] {
        if let Err(e) = lab.wait_listening(&srv_ns, proto, port, Duration::from_secs(30)) {
            panic!("{e}; server log:\n{}", log_tail(&server_log));
        }
    }

    let clients = CLIENTS.to_string();
    let expect_kernel = format!("vmlinuz={kernel_sha}");
    let expect_initrd = format!("initrd.gz={initrd_sha}");
    let mut emulate = lab.cmd(&client.ns, "timeout");
    emulate
        .args(["200", BIN, "emulate", "--clients", &clients, "--interface"])
        .arg(CLIENT_IF)
        .args(["--timeout", "150", "--json", "--release"])
        .args(["--expect", &expect_kernel, "--expect", &expect_initrd])
        .args(emulate_args)
        .env("RUST_LOG", "warn");
    let out = output_with_timeout(emulate, Duration::from_secs(240)).expect("running emulate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); status {}; stderr:\n{stderr}\nserver log:\n{}",
            out.status,
            log_tail(&server_log)
        )
    });
    let failures: Vec<&Value> = report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["error"].is_null())
        .take(5)
        .collect();
    assert!(
        out.status.success() && report["succeeded"] == CLIENTS,
        "{} of {CLIENTS} succeeded; first failures: {failures:#?}\nstderr:\n{stderr}\nserver log:\n{}",
        report["succeeded"],
        log_tail(&server_log)
    );
    assert_eq!(report["requested"], CLIENTS);
    assert_eq!(report["failed"], 0);
    assert!(report["stopped"].is_null());
    assert_eq!(report["addresses_added"], CLIENTS);

    let mut ips = HashSet::new();
    let mut macs = HashSet::new();
    for c in report["clients"].as_array().unwrap() {
        assert_eq!(c["phase"], "done", "{c:#}");
        let ip = c["ip"].as_str().unwrap().to_string();
        assert!(ip.starts_with("10.77.0."), "{ip}");
        assert!(ips.insert(ip), "an address was leased twice: {c:#}");
        assert!(macs.insert(c["mac"].as_str().unwrap().to_string()));
        let files = c["files"].as_array().unwrap();
        let roles: Vec<&str> = files.iter().map(|f| f["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["script", "kernel", "initrd"], "{c:#}");
        for f in files {
            assert_eq!(f["transport"], transport, "{f:#}");
        }
        let (k, i) = (&files[1], &files[2]);
        assert_eq!(k["bytes"], kernel.len(), "{k:#}");
        assert_eq!(k["sha256"], kernel_sha.as_str());
        assert_eq!(k["verified"], true);
        assert_eq!(i["bytes"], initrd.len(), "{i:#}");
        assert_eq!(i["sha256"], initrd_sha.as_str());
        assert_eq!(i["verified"], true);
        assert!(c["timeline"]["total_ms"].is_number());
    }
    assert_eq!(ips.len(), CLIENTS);
    assert_eq!(macs.len(), CLIENTS);

    // The emulator removed every address it added.
    let addrs = lab
        .exec(
            &client.ns,
            &["ip", "-4", "-o", "addr", "show", "dev", CLIENT_IF],
            Duration::from_secs(10),
        )
        .unwrap();
    let left = String::from_utf8_lossy(&addrs.stdout);
    assert!(!left.contains("inet "), "addresses left behind: {left}");
    assert!(
        lab.exited(server).is_none(),
        "the server died: {}",
        log_tail(&server_log)
    );
    eprintln!(
        "{transport} storm: {} clients, boot p50 {} ms p99 {} ms, DHCP retransmits {}, TFTP timeouts {}",
        report["succeeded"],
        report["boot"]["p50"],
        report["boot"]["p99"],
        report["dhcp_retransmits"],
        report["tftp_timeouts"]
    );
}

#[test]
fn storm_of_50_over_http() {
    if ready("storm_of_50_over_http") {
        storm("http", &[]);
    }
}

#[test]
fn storm_of_50_over_tftp_windowsize_8() {
    if ready("storm_of_50_over_tftp_windowsize_8") {
        storm("tftp", &["--tftp-windowsize", "8"]);
    }
}

/// Outside a lab namespace the emulator refuses before opening any socket. The interface
/// name exists nowhere, so even a broken check could not reach a network.
#[test]
fn refuses_the_default_namespace() {
    let init = std::fs::read_link("/proc/self/ns/net")
        .is_ok_and(|l| l.to_string_lossy() == "net:[4026531833]");
    if !init {
        eprintln!("refuses_the_default_namespace: skipped: not in the initial namespace");
        return;
    }
    let mut c = std::process::Command::new(BIN);
    c.args(["emulate", "--clients", "1", "--interface", "fbemu-none0"])
        .env("RUST_BACKTRACE", "0");
    let out = output_with_timeout(c, Duration::from_secs(30)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refusing to run in the default network namespace"),
        "{stderr}"
    );
}

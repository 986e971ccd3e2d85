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
//! `--pxe-mtftp`: addresses from dnsmasq, a ProxyDHCP offer from a second dnsmasq naming a
//! `fleetboot negotiate` boot server for type 0x8000, and a `fleetboot files` file server;
//! the emulated PXE ROMs find the negotiator through the proxy offer, wait as told, and
//! fetch the boot file over PXE MTFTP.
//!
//! Gating: needs root and `ip`, `ss`, `timeout` (and `dnsmasq` for PXE); otherwise it
//! prints why and passes, unless `FLEETBOOT_REQUIRE_E2E=1`, which makes that a failure.
//! Pass/fail is counts and bytes, never times.

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

/// Clients of [`storm_where_every_client_has_its_own_address`]; `FLEETBOOT_EMULATE_CLIENTS`
/// changes it. 500 fits CI's time on two cores (lease, ARP probe, install, HTTP boot).
fn many_clients() -> usize {
    std::env::var("FLEETBOOT_EMULATE_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// The subnet of the many-client storm: a /22 beside the lab's /24, 1000 addresses.
const MANY_NET: &str = "10.79.0.0/22";
const MANY_SERVER: &str = "10.79.0.1";

fn many_config(dir: &Path) -> String {
    format!(
        r#"data_dir = "{data}"

[server]
address = "{MANY_SERVER}"
interface = "{SERVER_IF}"
root = "{root}"

[dhcp]
mode = "server"
authoritative = true

[[dhcp.subnet]]
network = "{MANY_NET}"
range = ["10.79.0.10", "10.79.3.250"]
lease_time = 3600

[pxe]
transport = "http"

[tftp]
enabled = false

[http]
enabled = true
listen = "0.0.0.0:8080"

[[profile]]
name = "storm"
priority = 10
boot = {{ kind = "linux", kernel = "vmlinuz", initrd = ["initrd.gz"], cmdline = "id={{mac_hyphen}}" }}
"#,
        data = dir.join("data").display(),
        root = dir.join("root").display(),
    )
}

/// GETs `paths` from `fleetboot serve`'s admin listener (loopback of the server's
/// namespace) with the token its first start wrote; one JSON value per path.
fn admin_get(lab: &Lab, dir: &Path, paths: &[String]) -> Vec<Value> {
    let token = std::fs::read_to_string(dir.join("data/admin.token")).expect("fleetboot's bootstrap token");
    let auth = format!("Authorization: Bearer {}", token.trim());
    let mut values = Vec::new();
    for chunk in paths.chunks(200) {
        let urls: Vec<String> = chunk.iter().map(|p| format!("http://127.0.0.1:8081{p}")).collect();
        let mut args = vec!["curl", "-sS", "--fail", "--max-time", "60", "-H", auth.as_str()];
        args.extend(urls.iter().map(String::as_str));
        let out = lab.exec(lab.server_ns(), &args, Duration::from_secs(90)).expect("curl the admin API");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for v in serde_json::Deserializer::from_slice(&out.stdout).into_iter::<Value>() {
            values.push(v.expect("JSON from the admin API"));
        }
    }
    assert_eq!(values.len(), paths.len());
    values
}

/// `fleetboot emulate` with hundreds of clients in one namespace, each on its own leased
/// address of the one interface, against `fleetboot serve`: the server must have seen as
/// many distinct hosts as there were clients — a lease bound to each client's MAC at the
/// client's address, and the client's iPXE script fetched from that address (the source
/// the server recorded in the client's trace) — every client must boot, and the
/// interface must be bare afterwards. No `--release`: the leases stay for the check.
#[test]
fn storm_where_every_client_has_its_own_address() {
    if !fleetboot_lab::gate::e2e_ready(
        "storm_where_every_client_has_its_own_address",
        &["ip", "ss", "timeout", "curl"],
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = many_clients();
    let dir = WorkDir(std::env::temp_dir().join(format!("fleetboot-emulate-{}-many", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("root")).unwrap();
    std::fs::create_dir_all(dir.0.join("data")).unwrap();
    let kernel = random_bytes(0x6d61_6e79, 48 * 1024 + 5);
    let initrd = random_bytes(0x6164_6472, 16 * 1024 + 7);
    std::fs::write(dir.0.join("root/vmlinuz"), &kernel).unwrap();
    std::fs::write(dir.0.join("root/initrd.gz"), &initrd).unwrap();
    let cfg = dir.0.join("fleetboot.toml");
    std::fs::write(&cfg, many_config(&dir.0)).unwrap();

    let mut lab = Lab::new().expect("creating the lab namespaces");
    let srv_ns = lab.server_ns().to_string();
    fleetboot_lab::netns::ip(&["-n", &srv_ns, "addr", "add", &format!("{MANY_SERVER}/22"), "dev", SERVER_IF]).unwrap();
    let client = lab.add_client(None).expect("adding the client namespace");
    let server_log = dir.0.join("server.log");
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
    for (proto, port) in [(Proto::Udp, 67), (Proto::Tcp, 8080), (Proto::Tcp, 8081)] {
        if let Err(e) = lab.wait_listening(&srv_ns, proto, port, Duration::from_secs(30)) {
            panic!("{e}; server log:\n{}", log_tail(&server_log));
        }
    }

    let expect_kernel = format!("vmlinuz={}", fleetboot_emulator::sha256_hex(&kernel));
    let expect_initrd = format!("initrd.gz={}", fleetboot_emulator::sha256_hex(&initrd));
    let mut emulate = lab.cmd(&client.ns, "timeout");
    emulate
        .args(["200", BIN, "emulate", "--clients", &n.to_string(), "--interface", CLIENT_IF])
        .args(["--timeout", "150", "--json"])
        .args(["--expect", &expect_kernel, "--expect", &expect_initrd])
        .env("RUST_LOG", "warn");
    let out = output_with_timeout(emulate, Duration::from_secs(240)).expect("running emulate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no JSON report ({e}); status {}; stderr:\n{stderr}\nserver log:\n{}", out.status, log_tail(&server_log))
    });
    let failures: Vec<&Value> = report["clients"].as_array().unwrap().iter().filter(|c| !c["error"].is_null()).take(5).collect();
    assert!(
        out.status.success() && report["succeeded"] == n,
        "{} of {n} succeeded; first failures: {failures:#?}\nstderr:\n{stderr}\nserver log:\n{}",
        report["succeeded"],
        log_tail(&server_log)
    );
    assert_eq!(report["addresses_added"], n);

    // Each client as the emulator saw it: MAC → its leased address.
    let mut leased = std::collections::HashMap::new();
    for c in report["clients"].as_array().unwrap() {
        assert_eq!(c["phase"], "done", "{c:#}");
        // The DHCP steps the pool ran for the client reached its timeline.
        for step in ["discover_ms", "offer_ms", "ack_ms", "address_ms", "total_ms"] {
            assert!(c["timeline"][step].is_number(), "{step}: {c:#}");
        }
        assert!(c["dhcp"]["discovers"].as_u64() >= Some(1) && c["dhcp"]["requests"].as_u64() >= Some(1), "{c:#}");
        let ip: std::net::Ipv4Addr = c["ip"].as_str().unwrap().parse().unwrap();
        assert!(ip.octets()[..2] == [10, 79], "{ip}");
        leased.insert(c["mac"].as_str().unwrap().to_string(), ip);
    }
    assert_eq!(leased.len(), n);
    assert_eq!(leased.values().collect::<HashSet<_>>().len(), n, "an address was leased twice");

    // The server's side: a bound lease per client at its address...
    let leases = admin_get(&lab, &dir.0, &["/api/leases".to_string()]).remove(0);
    let bound: std::collections::HashMap<String, String> = leases
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["state"] == "bound")
        .map(|l| (l["mac"].as_str().unwrap_or_default().to_string(), l["ip"].as_str().unwrap_or_default().to_string()))
        .collect();
    for (mac, ip) in &leased {
        assert_eq!(bound.get(mac), Some(&ip.to_string()), "the server's lease for {mac}: {leases}");
    }
    // ...and each client's script fetched from that address.
    let macs: Vec<&String> = leased.keys().collect();
    let paths: Vec<String> = macs.iter().map(|m| format!("/api/trace/{m}")).collect();
    let traces = admin_get(&lab, &dir.0, &paths);
    let mut sources = HashSet::new();
    for (mac, trace) in macs.iter().zip(&traces) {
        let source = trace
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "HTTP-SCRIPT")
            .find_map(|e| e["detail"].as_str()?.split(" from ").nth(1)?.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| panic!("no HTTP-SCRIPT event in {mac}'s trace: {trace}"));
        assert_eq!(source, leased[*mac].to_string(), "{mac} fetched its script from another address");
        sources.insert(source);
    }
    assert_eq!(sources.len(), n, "the server saw {} distinct sources for {n} clients", sources.len());

    // Every address left the interface with its client.
    let addrs = lab.exec(&client.ns, &["ip", "-4", "-o", "addr", "show", "dev", CLIENT_IF], Duration::from_secs(10)).unwrap();
    let left = String::from_utf8_lossy(&addrs.stdout);
    assert!(!left.contains("inet "), "addresses left behind: {left}");
    assert!(lab.exited(server).is_none(), "the server died: {}", log_tail(&server_log));
    eprintln!(
        "{n} clients on {n} addresses: boot p50 {} ms p99 {} ms, DHCP p50 {} ms, DHCP retransmits {}, wall {} ms",
        report["boot"]["p50"], report["boot"]["p99"], report["dhcp"]["p50"], report["dhcp_retransmits"], report["wall_ms"]
    );
}

/// The network namespace of `/proc/PID/ns/net` as (device, inode), if readable.
fn netns_of(pid: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The inode of the kernel's initial network namespace (`PROC_NET_INIT_INO`, fixed by the
/// kernel since Linux 3.8): the host's own network.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// In the host's network namespace the emulator refuses before opening any socket. It runs
/// there: directly when this test already is (the kernel's initial namespace, or PID 1's),
/// through `nsenter` into PID 1's otherwise. The interface name exists nowhere, so even a
/// broken check could not reach a network.
#[test]
fn refuses_the_default_namespace() {
    let (me, host) = (netns_of("self"), netns_of("1"));
    let here = me.is_some_and(|(_, ino)| ino == INIT_NET_INO) || (host.is_some() && me == host);
    let mut c = if here {
        std::process::Command::new(BIN)
    } else {
        if !fleetboot_lab::gate::e2e_ready_with(
            "refuses_the_default_namespace",
            &["nsenter"],
            &[(
                host.is_some(),
                "this test runs in a network namespace of its own and cannot read PID 1's",
            )],
        ) {
            return;
        }
        let mut c = std::process::Command::new("nsenter");
        c.arg("--net=/proc/1/ns/net").arg(BIN);
        c
    };
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

/// The PXE options are checked by the command line before anything runs.
#[test]
fn pxe_options_are_checked_before_anything_runs() {
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(BIN);
        c.args(["emulate", "--clients", "1", "--interface", "fbemu-none0"])
            .args(args);
        let out = output_with_timeout(c, Duration::from_secs(30)).unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--boot-server", "10.77.0.11"]);
    assert!(e.contains("--pxe-mtftp"), "{e}");
    let e = run(&["--pxe-mtftp", "--boot-type", "pxe"]);
    assert!(e.contains("boot server type"), "{e}");
    let e = run(&["--pxe-mtftp", "--boot-server", "10.77.0"]);
    assert!(e.contains("--boot-server"), "{e}");
}

const PXE_CLIENTS: usize = 12;

/// dnsmasq with `conf` in `ns`, waited for on UDP 67.
fn dnsmasq(lab: &mut Lab, ns: &str, dir: &Path, name: &str, conf: &str) -> u32 {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(
        &path,
        format!(
            "port=0\nbind-interfaces\nlog-dhcp\nlog-facility={}\ndhcp-leasefile={}\n{conf}",
            dir.join(format!("{name}.log")).display(),
            dir.join(format!("{name}.leases")).display()
        ),
    )
    .unwrap();
    let mut c = lab.cmd(ns, "timeout");
    c.args(["300", "dnsmasq", "--no-daemon"])
        .arg(format!("--conf-file={}", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap());
    let pid = lab.spawn(name, c).unwrap();
    if let Err(e) = lab.wait_listening(ns, Proto::Udp, 67, Duration::from_secs(20)) {
        panic!(
            "{name}: {e}\n{}",
            log_tail(&dir.join(format!("{name}.err")))
        );
    }
    pid
}

/// `fleetboot SUB --config CFG` in `ns`, logging to `DIR/SUB.log`.
fn fleetboot_role(lab: &mut Lab, ns: &str, dir: &Path, sub: &str, cfg: &str) -> u32 {
    let path = dir.join(format!("{sub}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let log = std::fs::File::create(dir.join(format!("{sub}.log"))).unwrap();
    let mut c = lab.cmd(ns, "timeout");
    c.args(["300", BIN, sub, "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    lab.spawn(sub, c).unwrap()
}

#[test]
fn pxe_mtftp_storm_through_a_proxydhcp_offer() {
    if !fleetboot_lab::gate::e2e_ready(
        "pxe_mtftp_storm_through_a_proxydhcp_offer",
        &["ip", "ss", "timeout", "dnsmasq"],
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir =
        WorkDir(std::env::temp_dir().join(format!("fleetboot-emulate-{}-pxe", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let root = dir.0.join("root");
    std::fs::create_dir_all(root.join("nbp")).unwrap();
    // 3000 blocks of 512, lock-step: long enough for staggered clients to join late.
    let nbp = random_bytes(0x006e_6270, 1_536_000 + 77);
    std::fs::write(root.join("nbp/pxeboot.0"), &nbp).unwrap();
    let nbp_sha = fleetboot_emulator::sha256_hex(&nbp);

    let mut lab = Lab::new().expect("creating the lab namespaces");
    let proxy = lab.add_client(Some("10.77.0.2/24")).unwrap();
    let neg = lab.add_client(Some("10.77.0.11/24")).unwrap();
    let fs = lab.add_client(Some("10.77.0.21/24")).unwrap();
    let client = lab.add_client(None).unwrap();
    let srv_ns = lab.server_ns().to_string();
    dnsmasq(
        &mut lab,
        &srv_ns,
        &dir.0,
        "dhcp",
        &format!(
            "interface={SERVER_IF}\ndhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h\n\
             dhcp-authoritative\nno-ping\n"
        ),
    );
    // The proxy offer lists the negotiator as the boot server of type 0x8000 (32768).
    dnsmasq(
        &mut lab,
        &proxy.ns,
        &dir.0,
        "proxy",
        &format!(
            "interface={CLIENT_IF}\ndhcp-range=10.77.0.0,proxy,255.255.255.0\n\
             pxe-service=x86PC,\"fleetboot negotiate\",32768,10.77.0.11\n"
        ),
    );
    // One data_dir for both: the file server makes the negotiation key there on its first
    // start and the (lone) negotiator finds it, or the other way round.
    let data_dir = dir.0.join("data");
    let base = |addr: &str| {
        format!(
            "data_dir = \"{}\"\n[server]\naddress = \"{addr}\"\ninterface = \"{CLIENT_IF}\"\nroot = \"{}\"\n\
             [dhcp]\nmode = \"off\"\n",
            data_dir.display(),
            root.display()
        )
    };
    let neg_records = dir.0.join("negotiate.jsonl");
    let fs_records = dir.0.join("files.jsonl");
    fleetboot_role(
        &mut lab,
        &fs.ns,
        &dir.0,
        "files",
        &format!(
            "{}[files]\nregistration_ttl_secs = 60\nrecords = \"{}\"\n",
            base("10.77.0.21"),
            fs_records.display()
        ),
    );
    fleetboot_role(
        &mut lab,
        &neg.ns,
        &dir.0,
        "negotiate",
        &format!(
            "{}[negotiate]\nboot_files = [\"nbp/pxeboot.0\"]\nfile_servers = [\"10.77.0.21\"]\n\
             groups = [\"239.255.3.1\", \"239.255.3.8\"]\npeers = [\"10.77.0.11\", \"10.77.0.21\"]\n\
             wait_period_ms = 300\nmtftp_timeout = 1\nmtftp_delay = 1\nrecords = \"{}\"\n",
            base("10.77.0.11"),
            neg_records.display()
        ),
    );
    for (ns, port) in [(&fs.ns, 4013), (&neg.ns, 4011)] {
        if let Err(e) = lab.wait_listening(ns, Proto::Udp, port, Duration::from_secs(20)) {
            panic!(
                "{e}\nfiles:\n{}\nnegotiate:\n{}",
                log_tail(&dir.0.join("files.log")),
                log_tail(&dir.0.join("negotiate.log"))
            );
        }
    }

    let clients = PXE_CLIENTS.to_string();
    let expect = format!("pxeboot.0={nbp_sha}");
    let mut emulate = lab.cmd(&client.ns, "timeout");
    emulate
        .args(["200", BIN, "emulate", "--clients", &clients, "--interface"])
        .arg(CLIENT_IF)
        .args(["--pxe-mtftp", "--stagger-ms", "150", "--timeout", "150"])
        .args(["--json", "--release", "--expect", &expect])
        .env("RUST_LOG", "warn");
    let out = output_with_timeout(emulate, Duration::from_secs(240)).expect("running emulate");
    // Kept with the work directory under FLEETBOOT_E2E_KEEP=1.
    let _ = std::fs::write(dir.0.join("report.json"), &out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = || {
        format!(
            "stderr:\n{stderr}\nnegotiate:\n{}\nfiles:\n{}\nproxy:\n{}",
            log_tail(&dir.0.join("negotiate.log")),
            log_tail(&dir.0.join("files.log")),
            log_tail(&dir.0.join("proxy.log"))
        )
    };
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); status {}; {}", out.status, logs()));
    let failures: Vec<&Value> = report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["error"].is_null())
        .take(3)
        .collect();
    assert!(
        out.status.success() && report["succeeded"] == PXE_CLIENTS,
        "{} of {PXE_CLIENTS} succeeded; first failures: {failures:#?}\n{}",
        report["succeeded"],
        logs()
    );
    assert_eq!(report["addresses_added"], PXE_CLIENTS);

    let answered: Vec<Value> = std::fs::read_to_string(&neg_records)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "answered")
        .collect();
    let mut ips = HashSet::new();
    let mut starts: std::collections::BTreeMap<String, usize> = Default::default();
    for c in report["clients"].as_array().unwrap() {
        assert_eq!(c["phase"], "done", "{c:#}");
        assert!(ips.insert(c["ip"].as_str().unwrap().to_string()), "{c:#}");
        let files = c["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "{c:#}");
        let f = &files[0];
        assert_eq!(
            (&f["role"], &f["transport"], &f["verified"]),
            (
                &Value::from("boot"),
                &Value::from("mtftp"),
                &Value::from(true)
            ),
            "{f:#}"
        );
        assert_eq!(f["bytes"], nbp.len(), "{f:#}");
        assert_eq!(f["sha256"], nbp_sha.as_str());
        // Found through the ProxyDHCP offer.
        let p = &c["pxe"];
        assert_eq!(p["proxy"], "10.77.0.2", "{p:#}");
        assert_eq!(p["servers_from"], "proxy_boot_servers", "{p:#}");
        assert_eq!(
            p["boot_servers"],
            serde_json::json!(["10.77.0.11"]),
            "{p:#}"
        );
        assert_eq!(p["boot_type"], 0x8000);
        assert_eq!(p["answered_by"], "10.77.0.11", "{p:#}");
        assert_eq!(p["file"], "nbp/pxeboot.0");
        assert_eq!(
            p["file_server"].as_str().unwrap().split(':').next(),
            Some("10.77.0.21")
        );
        let start = p["transfer"].as_str().unwrap().to_string();
        assert!(
            ["opened", "shared", "joined_late"].contains(&start.as_str()),
            "{p:#}"
        );
        if start != "joined_late" {
            assert_eq!(p["first_block"], 1, "{p:#}");
        }
        *starts.entry(start).or_default() += 1;
        // The negotiator recorded this answer: same client, group and port.
        let (group, port) = p["group"].as_str().unwrap().split_once(':').unwrap();
        assert!(
            answered.iter().any(|r| r["client"] == c["mac"]
                && r["group"] == group
                && r["port"] == port.parse::<u64>().unwrap()
                && r["file"] == "nbp/pxeboot.0"),
            "no negotiator record of {}'s answer: {answered:?}",
            c["mac"]
        );
    }
    // Someone opened the transfer; the first request needed clearing, so a wait packet.
    assert!(starts.get("opened").is_some_and(|&n| n >= 1), "{starts:?}");
    // Every transfer the file server opened had one of our clients as master, and that
    // client reports having sent an RRQ.
    let opened: Vec<Value> = std::fs::read_to_string(&fs_records)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["event"] == "opened")
        .collect();
    assert!(!opened.is_empty());
    for o in &opened {
        let master = o["master"].as_str().unwrap().split(':').next().unwrap();
        let c = report["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["ip"] == master)
            .unwrap_or_else(|| panic!("{o}: the master is none of the clients"));
        assert!(c["pxe"]["rrqs"].as_u64().unwrap() >= 1, "{o}\n{c:#}");
    }
    let summary = &report["pxe"];
    assert!(summary["waits"].as_u64().unwrap() >= 1, "{summary:#}");
    assert_eq!(
        ["opened", "shared", "joined_late"]
            .iter()
            .map(|k| summary[*k].as_u64().unwrap())
            .sum::<u64>(),
        PXE_CLIENTS as u64
    );
    eprintln!(
        "pxe-mtftp storm: {PXE_CLIENTS} clients, boot p50 {} ms p99 {} ms, transfers {starts:?} \
         ({} opened at the file server), {} wait packets",
        report["boot"]["p50"],
        report["boot"]["p99"],
        opened.len(),
        summary["waits"]
    );
    lab.stop_all(Duration::from_secs(2));
}

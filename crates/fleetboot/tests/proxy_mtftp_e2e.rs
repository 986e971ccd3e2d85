//! PXE boot server discovery in ProxyDHCP mode, answered with MTFTP parameters, and the
//! emulator's PXE MTFTP clients fetching their boot files from the multicast groups.
//!
//! The network: an address-only dnsmasq at 10.77.0.2 (the site's DHCP server), and one
//! `fleetboot serve` at 10.77.0.1 with `dhcp.mode = "proxy"`, `[negotiate]` and `[files]`:
//! ProxyDHCP, the negotiator on UDP 4011 and the multicast file server in one process.
//!
//! - A raw PXE ROM exchange from a namespace of its own: the ProxyDHCP REQUEST to 4011
//!   gets the boot server list (unicast discovery, no file to take); the boot server
//!   discovery REQUEST for item 0x8000 gets, after wait packets, the file and option 43
//!   sub-options 1-5 (group from the pool, client port, server port, timeout, delay).
//! - Two `fleetboot emulate --pxe-mtftp` runs at once, in two namespaces, with MAC
//!   ranges that profiles send to two different files: DHCP from dnsmasq, the boot server
//!   from fleetboot's ProxyDHCP offer, the file by PXE MTFTP. Once the file server has
//!   recorded each file's transfer as opened, one more client per file starts and joins the
//!   flowing transfer: it must report `joined_late`. Every file must be byte-identical
//!   (SHA-256), and the servers' own records must never show one (group, port) carrying
//!   two files.
//!
//! The late joins are arranged by events, not by a stagger: while they are set up, the
//! server's multicast data is throttled (htb class for the MTFTP client port) to a rate at
//! which each file takes minutes; the throttle is lifted once both late clients are
//! listening on their groups (the group joined and the MTFTP client port bound in their
//! namespaces).
//!
//! Network safety: only namespaces this test creates; processes killed by pid on drop.

mod mcast_common;

use fleetboot_dhcp::codec::{opt, BOOTREQUEST};
use fleetboot_dhcp::pxe::{discovery, BootItem, PxeOptions};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use fleetboot_lab::gate::e2e_ready;
use fleetboot_lab::netns::{output_with_timeout, Lab, Proto, CLIENT_IF, SERVER_IF};
use fleetboot_lab::netns::in_namespace;
use mcast_common::{random_bytes, records, wait_record};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLIENTS_PER_RUN: usize = 8;

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn config(dir: &Path) -> String {
    format!(
        r#"data_dir = "{dir}/data"

[server]
address = "10.77.0.1"
interface = "{SERVER_IF}"
root = "{dir}/root"

[dhcp]
mode = "proxy"

[tftp]
listen = "0.0.0.0:69"

[http]
enabled = false

[pxe]
transport = "tftp"

[negotiate]
boot_files = ["pxe-a.0", "pxe-b.0"]
file_servers = ["10.77.0.1"]
groups = ["239.255.77.10", "239.255.77.20"]
peer_group = "239.255.77.1"
wait_period_ms = 200
mtftp_timeout = 1
mtftp_delay = 1
records = "{dir}/negotiator.jsonl"

[files]
peer_group = "239.255.77.1"
rfc2090_port = 1069
records = "{dir}/files.jsonl"

[[profile]]
name = "a"
priority = 10
match = {{ mac = ["02:fb:ee:00:00:*"] }}
boot = {{ kind = "boot_file", path = "pxe-a.0" }}

[[profile]]
name = "b"
priority = 20
match = {{ mac = ["02:fb:ee:00:01:*"] }}
boot = {{ kind = "boot_file", path = "pxe-b.0" }}
"#,
        dir = dir.display()
    )
}

/// The network's own DHCP server: addresses only, no boot options, like a router.
fn start_address_dhcp(lab: &mut Lab, dir: &Path) {
    let c = lab.add_client(Some("10.77.0.2/24")).unwrap();
    let conf = dir.join("dnsmasq.conf");
    std::fs::write(
        &conf,
        format!(
            "port=0\ninterface={}\nbind-interfaces\nlog-dhcp\nlog-facility={}\ndhcp-leasefile={}\n\
             dhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h\ndhcp-authoritative\nno-ping\n",
            c.ifname,
            dir.join("dnsmasq.log").display(),
            dir.join("dnsmasq.leases").display()
        ),
    )
    .unwrap();
    let mut cmd = lab.cmd(&c.ns, "timeout");
    cmd.arg("300")
        .arg("dnsmasq")
        .arg("--no-daemon")
        .arg(format!("--conf-file={}", conf.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("dnsmasq.err")).unwrap());
    lab.spawn("dnsmasq (addresses)", cmd).unwrap();
    lab.wait_listening(&c.ns, Proto::Udp, 67, Duration::from_secs(20))
        .expect("dnsmasq listening");
}

fn pxe_request(mac: [u8; 6], ciaddr: Ipv4Addr, item: Option<u16>) -> Vec<u8> {
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&mac);
    let mut m = DhcpMessage {
        op: BOOTREQUEST,
        xid: 0x4011_0001,
        ciaddr,
        chaddr,
        ..DhcpMessage::default()
    };
    m.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
    m.set_option(opt::VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001".to_vec());
    m.set_option(opt::CLIENT_ARCH, vec![0, 0]);
    let pxe = PxeOptions {
        boot_item: item.map(|t| BootItem {
            server_type: t,
            layer: 0,
        }),
        ..Default::default()
    };
    m.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    m.encode()
}

/// What a PXE ROM exchanges with port 4011: the ProxyDHCP REQUEST, then discovery.
fn raw_rom_exchange(me: Ipv4Addr) -> (PxeOptions, DhcpMessage, PxeOptions, u32) {
    let sock = UdpSocket::bind(SocketAddrV4::new(me, 68)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mac = [0x02, 0xfb, 0xee, 0x00, 0x00, 0x77];
    let to = SocketAddrV4::new(SERVER, 4011);
    let mut buf = [0u8; 2048];
    let mut ask = |req: &[u8], want_file: bool| -> (DhcpMessage, u32) {
        let end = Instant::now() + Duration::from_secs(15);
        let mut waits = 0;
        while Instant::now() < end {
            sock.send_to(req, to).unwrap();
            let Ok(n) = sock.recv(&mut buf) else { continue };
            let m = DhcpMessage::parse(&buf[..n]).expect("a DHCP message from 4011");
            assert_eq!(m.message_type(), Some(MessageType::Ack));
            if want_file && m.file.is_empty() {
                waits += 1; // a wait packet: the negotiator is clearing a group
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            return (m, waits);
        }
        panic!("no answer from {to}");
    };
    let (proxy_ack, _) = ask(&pxe_request(mac, me, None), false);
    let proxy = PxeOptions::decode(proxy_ack.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
    let (ack, waits) = ask(&pxe_request(mac, me, Some(0x8000)), true);
    let pxe = PxeOptions::decode(ack.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
    (proxy, ack, pxe, waits)
}

/// `fleetboot emulate --pxe-mtftp` in `ns`. Starts are staggered by 250 ms: dnsmasq offers
/// one address to DISCOVERs that arrive together and NAKs all but one REQUEST.
fn emulate(lab: &Lab, ns: &str, mac_base: &str, clients: usize, expect: &str) -> Command {
    let mut c = lab.cmd(ns, "timeout");
    c.args(["150", BIN, "emulate", "--interface", CLIENT_IF, "--json"])
        .args(["--clients", &clients.to_string()])
        .args(["--mac-base", mac_base, "--pxe-mtftp", "--stagger-ms", "250"])
        .args(["--timeout", "120", "--expect", expect])
        .env("RUST_LOG", "warn");
    c
}

/// Waits until a PXE MTFTP client in `ns` listens on a group of the pool: the group joined
/// on its interface and the client port (1758) bound. From then on it hears every block.
fn wait_listening_on_group(lab: &Lab, ns: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let maddr = lab
            .exec(ns, &["ip", "maddr", "show", "dev", CLIENT_IF], Duration::from_secs(10))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if maddr.contains("239.255.77.") && lab.is_listening(ns, Proto::Udp, 1758).unwrap_or(false) {
            return;
        }
        assert!(Instant::now() < end, "no PXE MTFTP client listening in {ns} after 60 s:\n{maddr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pxe_roms_boot_by_multicast_through_proxydhcp() {
    if !e2e_ready(
        "pxe_roms_boot_by_multicast_through_proxydhcp",
        &["dnsmasq", "timeout", "ip", "ss", "tc"],
    ) {
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("fleetboot-proxy-mtftp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("root")).unwrap();
    // 1 MiB and 768 KiB: thousands of 512-byte blocks, minutes each at the throttled rate.
    let files = [("pxe-a.0", random_bytes(0xa, 1 << 20)), ("pxe-b.0", random_bytes(0xb, 768 << 10))];
    for (name, data) in &files {
        std::fs::write(dir.join("root").join(name), data).unwrap();
    }
    let cfg = dir.join("fleetboot.toml");
    std::fs::write(&cfg, config(&dir)).unwrap();

    let mut lab = Lab::new().unwrap();
    start_address_dhcp(&mut lab, &dir);
    let log = dir.join("serve.log");
    let mut serve = lab.cmd(lab.server_ns(), "timeout");
    serve
        .args(["300", BIN, "serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let server = lab.spawn("fleetboot serve", serve).unwrap();
    let srv_ns = lab.server_ns().to_string();
    for port in [67, 4011, 4013, 1759, 69, 1069] {
        if let Err(e) = lab.wait_listening(&srv_ns, Proto::Udp, port, Duration::from_secs(30)) {
            panic!("{e}; serve log:\n{}", tail(&log));
        }
    }

    // A ROM's own exchange with port 4011.
    let rom = lab.add_client(Some("10.77.0.40/24")).unwrap();
    let (proxy, ack, pxe, waits) = in_namespace(&rom.ns, || raw_rom_exchange(Ipv4Addr::new(10, 77, 0, 40)))
        .join()
        .expect("the ROM thread");
    assert_eq!(
        proxy.discovery_control,
        Some(discovery::NO_BROADCAST | discovery::NO_MULTICAST),
        "the ProxyDHCP ACK sends the ROM to unicast discovery: {proxy:?}"
    );
    assert_eq!(proxy.boot_servers[0].server_type, 0x8000);
    assert_eq!(proxy.boot_servers[0].addrs, [SERVER]);
    assert_eq!(ack.file, b"pxe-a.0");
    assert_eq!(ack.siaddr, SERVER, "the file server");
    let group = pxe.mtftp_ip.expect("sub-option 1: multicast IP");
    assert!((10..=20).contains(&group.octets()[3]) && group.octets()[..3] == [239, 255, 77], "{group}");
    assert_eq!(pxe.mtftp_client_port, Some(1758), "sub-option 2");
    assert_eq!(pxe.mtftp_server_port, Some(1759), "sub-option 3");
    assert_eq!(pxe.mtftp_timeout, Some(1), "sub-option 4");
    assert_eq!(pxe.mtftp_delay, Some(1), "sub-option 5");
    eprintln!("raw ROM: answered after {waits} wait packet(s): {group}:1758");

    // Two storms of emulated PXE ROMs, one per boot file, at once, with the multicast data
    // throttled: 128 kbit/s for everything sent to the MTFTP client port, ~30 blocks a
    // second for both transfers together. DHCP and port 4011 answers are not held back (a
    // ROM that hears the ProxyDHCP offer late takes the DHCP server for the boot server).
    let tc = |lab: &Lab, args: &[&str]| {
        lab.exec(&srv_ns, args, Duration::from_secs(10)).expect("tc");
    };
    for cmd in [
        &["tc", "qdisc", "add", "dev", SERVER_IF, "root", "handle", "1:", "htb", "default", "10"][..],
        &["tc", "class", "add", "dev", SERVER_IF, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit", "quantum", "60000"],
        &["tc", "class", "add", "dev", SERVER_IF, "parent", "1:", "classid", "1:20", "htb", "rate", "128kbit", "burst", "1600", "cburst", "1600"],
        &["tc", "filter", "add", "dev", SERVER_IF, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "dport", "1758", "0xffff", "flowid", "1:20"],
    ] {
        tc(&lab, cmd);
    }
    let sha: Vec<String> = files.iter().map(|(_, d)| fleetboot_emulator::sha256_hex(d)).collect();
    let expect = |i: usize| format!("{}={}", files[i].0, sha[i]);
    let first = CLIENTS_PER_RUN - 1;
    let mut runs = Vec::new();
    for (i, base) in ["02:fb:ee:00:00:00", "02:fb:ee:00:01:00"].into_iter().enumerate() {
        let ns = lab.add_client(None).unwrap();
        let cmd = emulate(&lab, &ns.ns, base, first, &expect(i));
        runs.push((i, first, std::thread::spawn(move || output_with_timeout(cmd, Duration::from_secs(200)))));
    }
    // Each file's transfer is flowing once the file server has opened it: then one more
    // client per file, which must join it late.
    let fs_records = dir.join("files.jsonl");
    for (file, _) in &files {
        wait_record(
            &fs_records,
            |r| r["event"] == "opened" && r["file"] == *file,
            Duration::from_secs(120),
        );
    }
    let mut late_ns = Vec::new();
    for (i, base) in ["02:fb:ee:00:00:40", "02:fb:ee:00:01:40"].into_iter().enumerate() {
        let ns = lab.add_client(None).unwrap();
        let cmd = emulate(&lab, &ns.ns, base, 1, &expect(i));
        runs.push((i, 1, std::thread::spawn(move || output_with_timeout(cmd, Duration::from_secs(200)))));
        late_ns.push(ns.ns);
    }
    for ns in &late_ns {
        wait_listening_on_group(&lab, ns);
    }
    tc(&lab, &["tc", "qdisc", "del", "dev", SERVER_IF, "root"]);

    let mut late = 0;
    for (i, clients, run) in runs {
        let out = run.join().unwrap().unwrap();
        let (file, want) = (files[i].0, &sha[i]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}): {stderr}\nserve log:\n{}", tail(&log)));
        assert!(
            out.status.success() && report["succeeded"] == clients,
            "{file}: {} of {clients} booted: {report:#}\n{stderr}\nserve log:\n{}",
            report["succeeded"],
            tail(&log)
        );
        for c in report["clients"].as_array().unwrap() {
            let f = &c["files"][0];
            // The boot server came from fleetboot's ProxyDHCP offer, even when it was
            // heard after dnsmasq's ACK: dnsmasq has no port 4011.
            assert_eq!(c["pxe"]["servers_from"], "proxy_boot_servers", "{c:#}");
            assert_eq!(f["transport"], "mtftp", "{c:#}");
            assert_eq!(f["sha256"], want.as_str(), "{c:#}");
            assert_eq!(f["verified"], true, "{c:#}");
            if clients == 1 {
                // Started after the transfer opened, listening before it could end.
                assert_eq!(c["pxe"]["transfer"], "joined_late", "{file}: the late client: {c:#}");
                late += 1;
            }
        }
    }
    assert_eq!(late, 2);

    // The servers' own records: one file per (group, port), ever.
    let mut carried: BTreeMap<(String, u64), BTreeSet<String>> = BTreeMap::new();
    let neg = records(&dir.join("negotiator.jsonl"));
    let fs = records(&dir.join("files.jsonl"));
    for r in neg.iter().chain(&fs) {
        if let (Some(g), Some(p), Some(f)) = (r["group"].as_str(), r["port"].as_u64(), r["file"].as_str()) {
            carried.entry((g.to_string(), p)).or_default().insert(f.to_string());
        }
    }
    assert!(carried.len() >= 2, "records: {carried:?}");
    for (slot, files) in &carried {
        assert_eq!(files.len(), 1, "{slot:?} carried {files:?}");
    }
    assert!(lab.exited(server).is_none(), "serve died:\n{}", tail(&log));
    eprintln!("{} clients joined late; slots {carried:?}", late);
    let _ = std::fs::remove_dir_all(&dir);
}

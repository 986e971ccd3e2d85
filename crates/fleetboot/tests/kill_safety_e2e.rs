//! Kill-safety, end to end: the real `fleetboot serve` in a lab server namespace is killed
//! with SIGKILL in the middle of a perfdhcp run (from `kea-admin`) and restarted on the
//! same `data_dir`. Every lease the clients saw ACKed before the kill must still be bound
//! to the same client, and no address may be bound to two clients.
//!
//! Which leases were ACKed is taken from the wire, not from perfdhcp: tcpdump captures
//! UDP 67/68 in the client namespace (`-w FILE -U -s 0`), and this test parses the pcap
//! itself (global header, records, Ethernet/IPv4/UDP, then
//! [`fleetboot_dhcp::DhcpMessage::parse`]): every DHCPACK gives a (chaddr, yiaddr) pair.
//! After the restart `GET /api/leases` must list every such pair, no IP twice and no MAC
//! with two IPs; one more perfdhcp round (also captured) shows the server still serves,
//! and that clients ACKed before the kill get their old address back.
//!
//! The kill happens once the capture holds a given number of ACKs (a count, not a
//! time). Assertions are about addresses and counts, never about how long anything took.
//!
//! Gating: needs root, perfdhcp and tcpdump; otherwise it prints why and passes, unless
//! `FLEETBOOT_REQUIRE_E2E=1`. Network safety: everything runs inside the namespaces of a
//! [`fleetboot_lab::netns::Lab`] (deleted on drop, with the processes it tracks).

mod common;

use common::{e2e_ready, s, Env};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Distinct perfdhcp clients (`-R`); the pool below holds 241 addresses.
const CLIENTS: &str = "220";
/// SIGKILL once the capture holds this many ACKs: perfdhcp picks its clients at random
/// among `CLIENTS`, so by then about half of them hold a lease and the server is still
/// allocating new addresses (not only renewing) when it dies.
const KILL_AFTER_ACKS: usize = 150;

/// One DHCP message seen on the wire (server → client direction only).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    kind: MessageType,
    mac: String,
    yiaddr: Ipv4Addr,
}

/// Parses a classic pcap file (either byte order, micro- or nanosecond timestamps,
/// Ethernet link type) and returns the DHCP replies (UDP source port 67) in order. A
/// record cut short at the end (tcpdump still writing) is ignored.
fn dhcp_replies_in_pcap(bytes: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    if bytes.len() < 24 {
        return out;
    }
    let magic = &bytes[0..4];
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file (magic {magic:02x?})"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(bytes, 20);
    assert_eq!(linktype, 1, "expected an Ethernet capture (link type 1)");
    let mut i = 24;
    while i + 16 <= bytes.len() {
        let incl = u32_at(bytes, i + 8) as usize;
        let start = i + 16;
        let Some(end) = start.checked_add(incl).filter(|&e| e <= bytes.len()) else {
            break; // partial record at the end
        };
        if let Some(r) = dhcp_reply_in_frame(&bytes[start..end]) {
            out.push(r);
        }
        i = end;
    }
    out
}

/// Ethernet (optionally one 802.1Q tag) / IPv4 (unfragmented) / UDP from port 67 / DHCP.
fn dhcp_reply_in_frame(f: &[u8]) -> Option<Reply> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]);
    if ethertype == 0x8100 {
        off += 4;
        ethertype = u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]);
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ip = f.get(off + 2..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
    if ip.first()? >> 4 != 4 || ihl < 20 || *ip.get(9)? != 17 || frag & 0x3fff != 0 {
        return None;
    }
    let ip = ip.get(..total.min(ip.len()))?;
    let udp = ip.get(ihl..)?;
    let sport = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    let ulen = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if sport != 67 || ulen < 8 {
        return None;
    }
    let payload = udp.get(8..ulen.min(udp.len()))?;
    let m = DhcpMessage::parse(payload).ok()?;
    let kind = m.message_type()?;
    let hlen = usize::from(m.hlen).min(16);
    let mac = m.chaddr[..hlen]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    Some(Reply {
        kind,
        mac,
        yiaddr: m.yiaddr,
    })
}

/// The (mac, ip) pairs of the ACKs in `replies`, checking on the way that no address was
/// ACKed to two clients and no client was ACKed two addresses.
fn acked(replies: &[Reply], what: &str) -> BTreeMap<String, Ipv4Addr> {
    let mut by_mac: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    let mut by_ip: HashMap<Ipv4Addr, String> = HashMap::new();
    for r in replies.iter().filter(|r| r.kind == MessageType::Ack) {
        if let Some(prev) = by_mac.insert(r.mac.clone(), r.yiaddr) {
            assert_eq!(
                prev, r.yiaddr,
                "{what}: {} was ACKed {prev} and then {}",
                r.mac, r.yiaddr
            );
        }
        if let Some(prev) = by_ip.insert(r.yiaddr, r.mac.clone()) {
            assert_eq!(
                prev, r.mac,
                "{what}: {} was ACKed to {prev} and to {}",
                r.yiaddr, r.mac
            );
        }
    }
    by_mac
}

/// A background process in a namespace, under `timeout`, tracked by the lab until reaped.
fn spawn_bg(env: &Env, ns: &str, args: &[&str], limit_secs: u64, log: &Path) -> Child {
    let limit = limit_secs.to_string();
    let mut cmd = env.lab.cmd(ns, "timeout");
    cmd.args(["-k", "5", &limit])
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(log).unwrap())
        .stderr(fs::File::create(log.with_extension("err")).unwrap());
    env.lab
        .spawn_tracked(&mut cmd)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits (bounded) for a background process; stops it (SIGTERM, then SIGKILL) if it
/// outlives `limit`.
fn reap(env: &Env, mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if Instant::now() >= deadline {
            // SIGTERM first: `timeout` passes it on to its child; SIGKILL would orphan it.
            // SAFETY: kill(2) on a child this test started and has not reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            for _ in 0..40 {
                if let Some(s) = child.try_wait().expect("waiting for a child") {
                    env.lab.untrack(child.id());
                    return s;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            break child.wait().expect("reaping a killed child");
        }
        thread::sleep(Duration::from_millis(50));
    };
    env.lab.untrack(child.id());
    status
}

/// tcpdump on the client's eth0 writing `pcap`; returns once it reports it is listening.
fn start_capture(env: &Env, ns: &str, pcap: &Path) -> Child {
    let log = pcap.with_extension("log");
    let pcap_s = s(pcap);
    let child = spawn_bg(
        env,
        ns,
        &[
            "tcpdump", "-i", "eth0", "-n", "-U", "-s", "0", "-Z", "root", "-w", &pcap_s, "udp",
            "port", "67", "or", "udp", "port", "68",
        ],
        600,
        &log,
    );
    let err = log.with_extension("err");
    for _ in 0..200 {
        if fs::read_to_string(&err).is_ok_and(|t| t.contains("listening on")) {
            return child;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let why = fs::read_to_string(&err).unwrap_or_default();
    reap(env, child, Duration::ZERO);
    panic!("tcpdump did not start: {why}");
}

/// Stops tcpdump with SIGTERM (it flushes and exits) and returns the replies captured.
fn stop_capture(env: &Env, child: Child, pcap: &Path) -> Vec<Reply> {
    // `ip netns exec` execs `timeout`, which passes SIGTERM on to tcpdump.
    // SAFETY: kill(2) on a child this test started and has not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    reap(env, child, Duration::from_secs(20));
    dhcp_replies_in_pcap(&fs::read(pcap).expect("reading the capture"))
}

/// perfdhcp's "received packets" count of the REQUEST-ACK exchange in its report.
fn perfdhcp_acks(report: &str) -> u64 {
    let mut in_ra = false;
    for l in report.lines() {
        if l.contains("Statistics for:") {
            in_ra = l.contains("REQUEST-ACK");
        }
        if in_ra {
            if let Some(n) = l.strip_prefix("received packets:") {
                return n.trim().parse().unwrap_or(0);
            }
        }
    }
    0
}

#[test]
fn sigkill_during_perfdhcp_loses_no_acked_lease() {
    if !e2e_ready(
        "sigkill_during_perfdhcp_loses_no_acked_lease",
        &["perfdhcp", "tcpdump"],
    ) {
        return;
    }
    let mut env = Env::new("kill-safety");
    // A pool of 241 addresses for 220 perfdhcp clients; info logs would only slow it down.
    let cfg = fs::read_to_string(&env.config).unwrap().replace(
        r#"range = ["10.77.0.100", "10.77.0.199"]"#,
        r#"range = ["10.77.0.10", "10.77.0.250"]"#,
    );
    assert!(cfg.contains("10.77.0.250"));
    fs::write(&env.config, cfg).unwrap();
    env.start_server();
    // perfdhcp sends from the interface's address (and listens on port 68).
    let c = env.add_client(Some("10.77.0.2/24"), None);

    // Phase 1: perfdhcp at 500 exchanges/s for at most 20 s; SIGKILL the server once the
    // capture holds KILL_AFTER_ACKS ACKs.
    let pcap1 = env.dir.join("before.pcap");
    let cap = start_capture(&env, &c.ns, &pcap1);
    let perf_log = env.dir.join("perfdhcp1.out");
    let perf = spawn_bg(
        &env,
        &c.ns,
        &[
            "perfdhcp", "-4", "-l", "eth0", "-r", "500", "-p", "20", "-R", CLIENTS, "-W", "1000000",
        ],
        60,
        &perf_log,
    );
    let mut seen = 0;
    for _ in 0..1200 {
        let bytes = fs::read(&pcap1).unwrap_or_default();
        seen = dhcp_replies_in_pcap(&bytes)
            .iter()
            .filter(|r| r.kind == MessageType::Ack)
            .count();
        if seen >= KILL_AFTER_ACKS {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    assert!(
        seen >= KILL_AFTER_ACKS,
        "only {seen} ACKs captured before perfdhcp ended:\n{}\n{}",
        fs::read_to_string(&perf_log).unwrap_or_default(),
        env.log_tail()
    );
    env.crash_server();
    // perfdhcp keeps sending into the void until its period ends.
    reap(&env, perf, Duration::from_secs(60));
    let replies1 = stop_capture(&env, cap, &pcap1);
    let before = acked(&replies1, "before the kill");
    let total_acks = replies1
        .iter()
        .filter(|r| r.kind == MessageType::Ack)
        .count();
    assert!(
        total_acks >= KILL_AFTER_ACKS,
        "{total_acks} ACKs in the capture"
    );
    assert!(!before.is_empty());
    eprintln!(
        "before the kill: {total_acks} ACKs to {} distinct clients",
        before.len()
    );

    // Restart on the same data_dir: every ACKed (mac, ip) is still there, bound.
    env.start_server();
    let leases = env.leases();
    let mut ip_to_mac: HashMap<String, String> = HashMap::new();
    let mut mac_to_ip: HashMap<String, String> = HashMap::new();
    for l in &leases {
        let ip = l["ip"].as_str().expect("lease ip").to_string();
        let mac = l["mac"].as_str().expect("lease mac").to_ascii_lowercase();
        if let Some(prev) = ip_to_mac.insert(ip.clone(), mac.clone()) {
            panic!("{ip} is listed for {prev} and for {mac}");
        }
        if let Some(prev) = mac_to_ip.insert(mac.clone(), ip.clone()) {
            panic!("{mac} holds {prev} and {ip}");
        }
    }
    let mut missing = Vec::new();
    for (mac, ip) in &before {
        let ip_s = ip.to_string();
        let listed = leases
            .iter()
            .find(|l| l["ip"].as_str() == Some(ip_s.as_str()));
        match listed {
            Some(l)
                if l["mac"].as_str().map(str::to_ascii_lowercase).as_deref()
                    == Some(mac.as_str())
                    && l["state"].as_str() == Some("bound") => {}
            other => missing.push(format!("{mac} -> {ip}: listed as {other:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} ACKed leases lost or changed by the SIGKILL:\n{}",
        missing.len(),
        before.len(),
        missing.join("\n")
    );

    // Phase 2: one more perfdhcp round against the restarted server, captured too.
    let pcap2 = env.dir.join("after.pcap");
    let cap = start_capture(&env, &c.ns, &pcap2);
    let r = env.run(
        &c.ns,
        &[
            "perfdhcp", "-4", "-l", "eth0", "-r", "100", "-p", "3", "-R", CLIENTS, "-W", "1000000",
        ],
        60,
    );
    let replies2 = stop_capture(&env, cap, &pcap2);
    let report = r.stdout_str();
    let acks = perfdhcp_acks(&report);
    assert!(
        acks > 0,
        "no ACK after the restart:\n{report}\n{}",
        r.stderr
    );
    let after = acked(&replies2, "after the restart");
    assert!(
        !after.is_empty(),
        "the capture holds no ACK after the restart"
    );
    // A client ACKed before the kill gets its address back; no address changes hands.
    let mut all = replies1.clone();
    all.extend(replies2.iter().cloned());
    acked(&all, "before and after the kill");
    let again = after.keys().filter(|m| before.contains_key(*m)).count();
    eprintln!(
        "after the restart: perfdhcp counted {acks} ACKs; {} clients ACKed, {again} of them \
         also before the kill (same address)",
        after.len()
    );
    assert!(env.server_alive(), "the server died:\n{}", env.log_tail());
}

#[test]
fn pcap_parser_reads_a_handmade_capture() {
    // One Ethernet/IPv4/UDP frame carrying a DHCPACK, in a little-endian pcap, plus a
    // record cut short (ignored).
    let mut dhcp = vec![0u8; 240];
    dhcp[0] = 2; // BOOTREPLY
    dhcp[1] = 1;
    dhcp[2] = 6;
    dhcp[16..20].copy_from_slice(&[10, 77, 0, 42]); // yiaddr
    dhcp[28..34].copy_from_slice(&[0x00, 0x0c, 0x01, 0x02, 0x03, 0x04]);
    dhcp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    dhcp.extend_from_slice(&[53, 1, 5, 255]);
    let udp_len = 8 + dhcp.len();
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let total = 20 + udp_len;
    frame.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
    ]);
    frame.extend_from_slice(&[10, 77, 0, 1, 255, 255, 255, 255]);
    frame.extend_from_slice(&[0, 67, 0, 68, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    frame.extend_from_slice(&dhcp);
    let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    pcap.extend_from_slice(&[0; 8]);
    pcap.extend_from_slice(&65535u32.to_le_bytes());
    pcap.extend_from_slice(&1u32.to_le_bytes());
    for _ in 0..2 {
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&frame);
    }
    pcap.truncate(pcap.len() - 10);
    let r = dhcp_replies_in_pcap(&pcap);
    assert_eq!(
        r,
        vec![Reply {
            kind: MessageType::Ack,
            mac: "00:0c:01:02:03:04".into(),
            yiaddr: Ipv4Addr::new(10, 77, 0, 42),
        }]
    );
    let m = acked(&r, "handmade");
    assert_eq!(m.len(), 1);
}

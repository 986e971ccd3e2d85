//! Floods against a real `fleetboot serve` while legitimate clients boot from it.
//!
//! The attacker is a namespace of its own on the lab's bridge; its datagrams carry forged
//! source addresses where the attack would (spoofed TFTP requests never answer). The
//! server's own namespace gets permanent neighbour entries for those forged addresses
//! pointing at a MAC nobody has, so its replies leave and go nowhere, as they would on a
//! real network. Every flood is bounded in count. The assertions are on the server process
//! (`/proc/PID/status` Threads and VmRSS, `/proc/PID/fd`), on its `/metrics`, on the rows
//! in its SQLite file (opened read-only) and on what the legitimate clients receive — never
//! on how long anything took.

mod common;

use common::{assert_same_file, e2e_ready, random_bytes, s, Dhclient, Env, HTTP};
use fleetboot_lab::netns::Proto;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;
use fleetboot_lab::netns::in_namespace;

// ---------------------------------------------------------------------------------------
// The server process, as /proc sees it.

/// The `fleetboot` process under the `timeout` wrapper the lab started.
fn fleetboot_pid(env: &Env) -> u32 {
    let wrapper = env.server_pid.expect("server running");
    let children = fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == "fleetboot"))
        .unwrap_or_else(|| panic!("no fleetboot process under pid {wrapper}"))
}

/// One look at the process: threads, open descriptors, resident memory (KiB).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    threads: u64,
    fds: u64,
    rss_kib: u64,
}

fn usage(pid: u32) -> Option<Usage> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Usage { threads: field("Threads:")?, fds, rss_kib: field("VmRSS:")? })
}

/// Samples the server's usage every few milliseconds until stopped; keeps the peaks.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Usage, u64)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut peak = Usage::default();
            let mut samples = 0;
            while !flag.load(Ordering::Relaxed) {
                if let Some(u) = usage(pid) {
                    peak.threads = peak.threads.max(u.threads);
                    peak.fds = peak.fds.max(u.fds);
                    peak.rss_kib = peak.rss_kib.max(u.rss_kib);
                    samples += 1;
                }
                thread::sleep(Duration::from_millis(5));
            }
            (peak, samples)
        });
        Sampler { stop, handle }
    }

    /// The peaks seen, and the number of samples they come from.
    fn finish(self) -> (Usage, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler")
    }
}

/// UDP datagrams the kernel dropped in `ns` for want of receive buffer space (all sockets):
/// a flood the server could not read in time is not one it refused.
fn udp_rcvbuf_errors(env: &Env, ns: &str) -> u64 {
    let out = env.lab.exec(ns, &["cat", "/proc/net/snmp"], Duration::from_secs(10)).expect("reading /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
    names.zip(values).find(|(n, _)| *n == "RcvbufErrors").and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
}

/// Appends `lines` right after the `[section]` header of the config.
fn set_in_section(env: &Env, section: &str, lines: &str) {
    let header = format!("[{section}]\n");
    let cfg = fs::read_to_string(&env.config).unwrap();
    let cfg = if cfg.contains(&header) {
        cfg.replacen(&header, &format!("{header}{lines}\n"), 1)
    } else {
        format!("{cfg}\n{header}{lines}\n")
    };
    fs::write(&env.config, cfg).unwrap();
}

/// Like `Env::start_server`, with the process's `RLIMIT_NOFILE` (soft and hard) set to
/// `nofile` before exec, as `ulimit -n` would: fleetboot cannot raise it.
fn start_server_with_nofile(env: &mut Env, nofile: u64) {
    let log = fs::OpenOptions::new().create(true).append(true).open(env.server_log()).unwrap();
    let mut cmd = env.lab.cmd(env.lab.server_ns(), "timeout");
    cmd.args(["-s", "TERM", "-k", "10", "1800", common::BIN, "serve", "--config"])
        .arg(&env.config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only setrlimit(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit { rlim_cur: nofile as libc::rlim_t, rlim_max: nofile as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let pid = env.lab.spawn("fleetboot", cmd).expect("starting fleetboot");
    env.server_pid = Some(pid);
    let ns = env.server_ns();
    for (proto, port) in [(Proto::Udp, 67), (Proto::Udp, 69), (Proto::Tcp, 8080), (Proto::Tcp, 8081)] {
        if let Err(e) = env.lab.wait_listening(&ns, proto, port, Duration::from_secs(30)) {
            panic!("fleetboot did not come up: {e:#}\n--- server log ---\n{}", env.log_tail());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Packet generators (bounded in count).

/// The forged sources of the TFTP floods: 10.77.0.200–249, outside the DHCP range. The
/// server's namespace resolves each to a MAC no host has, so replies go nowhere.
fn spoofed_sources(env: &Env) -> Vec<Ipv4Addr> {
    let sources: Vec<Ipv4Addr> = (200..250).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect();
    let ns = env.server_ns();
    for a in &sources {
        env.ip(&ns, &["neigh", "replace", &a.to_string(), "lladdr", "02:fb:ff:00:00:01", "dev", "srv0", "nud", "permanent"]);
    }
    sources
}

/// An IPv4 + UDP datagram from `src` to `dst` (the kernel fills in the IP checksum; UDP's
/// is left out, which IPv4 allows).
fn ipv4_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A TFTP read request.
fn rrq(file: &str, mode: &str) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(file.as_bytes());
    p.push(0);
    p.extend_from_slice(mode.as_bytes());
    p.push(0);
    p
}

/// Sends `count` RRQs to the server's port 69 from `ns` with a raw socket, each from one of
/// `sources` and a port of its own, alternating octet and netascii over `files`. Counts
/// what it sent in `sent`.
fn spoofed_rrq_flood(ns: &str, sources: Vec<Ipv4Addr>, files: Vec<String>, count: u64, sent: Arc<AtomicU64>) -> JoinHandle<()> {
    in_namespace(ns, move || {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).expect("raw socket");
        let server = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 69);
        let to = SockAddr::from(server);
        for i in 0..count {
            let src = SocketAddrV4::new(sources[i as usize % sources.len()], 20_000 + (i / sources.len() as u64) as u16);
            let mode = if i % 2 == 0 { "octet" } else { "netascii" };
            let file = &files[(i / 2) as usize % files.len()];
            sock.send_to(&ipv4_udp(src, server, &rrq(file, mode)), &to).expect("sending a forged RRQ");
            sent.fetch_add(1, Ordering::Relaxed);
            // Bursts, so the flood is a flood and not a kernel buffer overrun.
            if i % 100 == 99 {
                thread::sleep(Duration::from_millis(2));
            }
        }
    })
}

/// A BOOTREQUEST (DHCPDISCOVER or DHCPINFORM) from `mac`, as PXE firmware sends it (so
/// the server works out a boot decision for each, and remembers who asked).
fn dhcp_request(kind: u8, mac: [u8; 6], xid: u32, ciaddr: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 240];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80; // broadcast
    p[12..16].copy_from_slice(&ciaddr.octets());
    p[28..34].copy_from_slice(&mac);
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    p.extend_from_slice(&[53, 1, kind, 55, 3, 1, 3, 6, 93, 2, 0, 0, 60, 32]);
    p.extend_from_slice(b"PXEClient:Arch:00000:UNDI:002001");
    p.push(255);
    p.resize(300, 0);
    p
}

/// Broadcasts `count` DISCOVERs and INFORMs (alternating) from random MACs, from `ns`'s
/// port 68.
fn random_mac_dhcp_flood(ns: &str, ciaddr: Ipv4Addr, count: u64, sent: Arc<AtomicU64>) -> JoinHandle<()> {
    in_namespace(ns, move || {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("UDP socket");
        sock.set_broadcast(true).unwrap();
        sock.set_reuse_address(true).unwrap();
        sock.bind_device(Some(b"eth0")).unwrap();
        sock.bind(&SockAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))).expect("binding port 68");
        let to = SockAddr::from(SocketAddrV4::new(Ipv4Addr::BROADCAST, 67));
        let bytes = random_bytes(0xd15c, count as usize * 6);
        for i in 0..count as usize {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&bytes[i * 6..i * 6 + 6]);
            mac[0] = (mac[0] & 0xfe) | 0x02; // unicast, locally administered
            let (kind, ci) = if i % 2 == 0 { (1, Ipv4Addr::UNSPECIFIED) } else { (8, ciaddr) };
            sock.send_to(&dhcp_request(kind, mac, i as u32, ci), &to).expect("sending a DHCP packet");
            sent.fetch_add(1, Ordering::Relaxed);
            if i % 100 == 99 {
                thread::sleep(Duration::from_millis(3));
            }
        }
    })
}

fn wait_until_sent(sent: &AtomicU64, n: u64) {
    while sent.load(Ordering::Relaxed) < n {
        thread::sleep(Duration::from_millis(5));
    }
}

fn tftp_get(env: &mut Env, ns: &str, name: &str, out: &std::path::Path) -> common::Ran {
    let _ = fs::remove_file(out);
    env.run(ns, &["tftp", "-m", "binary", "10.77.0.1", "-c", "get", name, &s(out)], 120)
}

// ---------------------------------------------------------------------------------------

const TFTP_MAX: u64 = 64;

/// 5,000 forged RRQs (octet and netascii) from 50 addresses that never answer: the
/// transfer cap holds the threads, descriptors and memory, every request past it is
/// counted, and a real client gets its file byte-identical while the flood runs.
#[test]
fn tftp_rrq_flood_stays_under_the_transfer_cap() {
    if !e2e_ready("tftp_rrq_flood_stays_under_the_transfer_cap", &["tftp"]) {
        return;
    }
    const FLOOD: u64 = 5_000;
    let mut env = Env::new("flood-tftp");
    set_in_section(&env, "tftp", &format!("max_transfers = {TFTP_MAX}\nmax_transfers_per_client = 8\nidle_timeout_secs = 5"));
    let legit = env.put_file("legit.bin", &random_bytes(1, 1024 * 1024 + 333));
    let text: String = (0..20_000).map(|i| format!("line {i} of a text file\n")).collect();
    env.put_file("text.txt", text.as_bytes());
    env.start_server();
    let pid = fleetboot_pid(&env);
    let attacker = env.add_client(Some("10.77.0.30/24"), None);
    let client = env.add_client(Some("10.77.0.20/24"), None);
    let sources = spoofed_sources(&env);
    // The legitimate client's first download sets the baseline (its thread, its buffers).
    let out = env.dir.join("legit.out");
    assert!(tftp_get(&mut env, &client.ns, "legit.bin", &out).ok(), "TFTP before the flood");
    assert_same_file("TFTP before the flood", &legit, &out);
    let base = usage(pid).expect("server usage");
    let drops_before = udp_rcvbuf_errors(&env, &env.server_ns());

    let sampler = Sampler::start(pid);
    let sent = Arc::new(AtomicU64::new(0));
    let files = vec!["legit.bin".to_string(), "text.txt".to_string()];
    let flood = spoofed_rrq_flood(&attacker.ns, sources, files, FLOOD, sent.clone());
    wait_until_sent(&sent, 1_000);
    let during = tftp_get(&mut env, &client.ns, "legit.bin", &out);
    flood.join().expect("the flood");
    assert!(during.ok(), "TFTP during the flood failed: {}\n{}", during.stderr, env.log_tail());
    assert_same_file("TFTP during the flood", &legit, &out);
    // The forged transfers idle out: everything they held is released.
    let drained = env.eventually(150, |e| e.metric("fleetboot_tftp_transfers_active") == 0.0);
    let (peak, samples) = sampler.finish();
    assert!(drained, "forged transfers still active after their idle timeout");
    let after = usage(pid).expect("server usage");
    assert!(env.server_alive(), "the server exited");

    let evicted = env.metric("fleetboot_tftp_evictions_total");
    let dropped = env.metric("fleetboot_tftp_requests_dropped_total");
    let kernel_drops = udp_rcvbuf_errors(&env, &env.server_ns()) - drops_before;
    eprintln!(
        "TFTP flood: {FLOOD} forged RRQs; base {base:?}, peak {peak:?} over {samples} samples, after {after:?}; \
         evicted {evicted}, dropped {dropped}, kernel receive-buffer drops {kernel_drops}"
    );
    assert!(samples > 10, "too few samples of the server ({samples})");
    assert!(peak.threads <= base.threads + TFTP_MAX + 8, "threads: {} at peak, base {}, cap {TFTP_MAX}", peak.threads, base.threads);
    assert!(peak.fds <= base.fds + 2 * TFTP_MAX + 16, "descriptors: {} at peak, base {}", peak.fds, base.fds);
    // Each transfer holds a read-ahead buffer and its thread's stack: far less than 1 MiB.
    assert!(
        peak.rss_kib <= base.rss_kib + (TFTP_MAX + 32) * 1024,
        "RSS: {} KiB at peak, base {} KiB",
        peak.rss_kib,
        base.rss_kib
    );
    // Everything the cap kept out was counted (what the kernel dropped never reached it).
    let past_cap = (FLOOD - TFTP_MAX).saturating_sub(kernel_drops);
    assert!(
        evicted + dropped >= past_cap as f64,
        "{evicted} evictions + {dropped} drops < {past_cap} requests past the cap"
    );
    // Nothing leaked: the descriptors and threads of the flood are gone.
    assert!(after.fds <= base.fds + 4, "descriptors after the flood: {} (base {})", after.fds, base.fds);
    assert!(after.threads <= base.threads + 2, "threads after the flood: {} (base {})", after.threads, base.threads);
    // The client still boots from the same server afterwards.
    assert!(tftp_get(&mut env, &client.ns, "legit.bin", &out).ok(), "TFTP after the flood");
    assert_same_file("TFTP after the flood", &legit, &out);
}

/// 100,000 DHCPDISCOVERs and DHCPINFORMs from random MACs: the trace keeps at most its
/// configured rows (in the SQLite file), the client maps at most `server.max_clients`, and
/// a reserved client still gets its address from ISC dhclient.
#[test]
fn random_mac_dhcp_flood_keeps_trace_and_maps_bounded() {
    if !e2e_ready("random_mac_dhcp_flood_keeps_trace_and_maps_bounded", &["dhclient"]) {
        return;
    }
    const FLOOD: u64 = 100_000;
    const MAX_CLIENTS: u64 = 256;
    const MAX_ROWS: u64 = 1_000;
    const MAX_ROWS_PER_MAC: u64 = 10;
    let reserved_mac = "52:54:00:77:0f:01";
    let reserved_ip: Ipv4Addr = "10.77.0.60".parse().unwrap();
    let mut env = Env::new("flood-dhcp");
    set_in_section(&env, "server", &format!("max_clients = {MAX_CLIENTS}"));
    set_in_section(&env, "admin", &format!("dashboard_max_clients = {MAX_CLIENTS}"));
    set_in_section(&env, "trace", &format!("max_rows = {MAX_ROWS}\nmax_rows_per_mac = {MAX_ROWS_PER_MAC}"));
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!("\n[[dhcp.reservation]]\nmac = \"{reserved_mac}\"\nip = \"{reserved_ip}\"\n"));
    fs::write(&env.config, cfg).unwrap();
    env.start_server();
    let pid = fleetboot_pid(&env);
    let attacker = env.add_client(Some("10.77.0.31/24"), None);
    let victim = env.add_client(None, Some(reserved_mac));
    let dhclient = Dhclient::new(&env, &victim, "reserved");
    assert_eq!(dhclient.obtain(&mut env), reserved_ip, "the reserved address before the flood");
    let base = usage(pid).expect("server usage");

    let sampler = Sampler::start(pid);
    let sent = Arc::new(AtomicU64::new(0));
    let flood = random_mac_dhcp_flood(&attacker.ns, Ipv4Addr::new(10, 77, 0, 31), FLOOD, sent.clone());
    wait_until_sent(&sent, FLOOD / 4);
    let during = dhclient.obtain(&mut env);
    flood.join().expect("the flood");
    assert_eq!(during, reserved_ip, "the reserved address during the flood");
    let drained = env.eventually(300, |e| e.metric("fleetboot_trace_queue_len") == 0.0);
    let (peak, samples) = sampler.finish();
    assert!(drained, "the trace queue did not drain");
    assert!(env.server_alive(), "the server exited");

    let metrics = {
        let (code, body) = env.api(&[], "/metrics");
        assert_eq!(code, 200);
        String::from_utf8_lossy(&body).into_owned()
    };
    let m = |name: &str| common::parse_metric(&metrics, name);
    let traced = m("fleetboot_trace_events_total");
    let queue_full = m("fleetboot_trace_events_total{outcome=\"queue_full\"}");
    let deleted = m("fleetboot_trace_rows_deleted_total");
    let forgotten = m("fleetboot_clients_forgotten_total");
    let remembered: Vec<(String, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("fleetboot_clients_remembered{"))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::MAX))))
        .collect();
    let dashboard = m("fleetboot_dashboard_clients");
    let kernel_drops = udp_rcvbuf_errors(&env, &env.server_ns());
    eprintln!(
        "DHCP flood: {FLOOD} packets; base {base:?}, peak {peak:?} over {samples} samples; trace events {traced} \
         (queue full {queue_full}), rows deleted {deleted}, clients forgotten {forgotten}, maps {remembered:?}, dashboard rows {dashboard}, \
         kernel receive-buffer drops (all UDP sockets) {kernel_drops}"
    );
    // The rows in the file, read as an operator would, without the server's help.
    let db = rusqlite::Connection::open_with_flags(env.dir.join("data/fleetboot.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("opening the database read-only");
    let count = |sql: &str| -> u64 { db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64 };
    let rows = count("SELECT count(*) FROM trace");
    let macs = count("SELECT count(DISTINCT mac) FROM trace");
    let most_per_mac = count("SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM trace GROUP BY mac)");
    eprintln!("trace table: {rows} rows, {macs} MACs, at most {most_per_mac} rows for one MAC");
    assert!(rows <= MAX_ROWS, "{rows} trace rows, trace.max_rows = {MAX_ROWS}");
    assert!(most_per_mac <= MAX_ROWS_PER_MAC, "{most_per_mac} rows for one MAC, trace.max_rows_per_mac = {MAX_ROWS_PER_MAC}");
    // The flood reached the trace and the row limit did the work (it is not an idle table).
    assert!(deleted > 0.0 && traced > MAX_ROWS as f64, "the flood never reached the trace limit: {traced} events, {deleted} deleted");
    assert!(remembered.iter().any(|(k, _)| k.contains("map=\"clients\"")), "no gauge of the identity map in /metrics");
    for (map, n) in &remembered {
        assert!(*n <= MAX_CLIENTS as f64, "{map} = {n}, server.max_clients = {MAX_CLIENTS}");
    }
    assert!(forgotten > 0.0, "the client maps never reached server.max_clients");
    assert!(dashboard <= MAX_CLIENTS as f64, "{dashboard} dashboard rows, admin.dashboard_max_clients = {MAX_CLIENTS}");
    assert!(m("fleetboot_dashboard_evicted_total") > 0.0, "the dashboard never reached admin.dashboard_max_clients");
    // 100,000 identities would be tens of MiB; bounded maps and a bounded queue are not.
    assert!(peak.rss_kib <= base.rss_kib + 64 * 1024, "RSS: {} KiB at peak, base {} KiB", peak.rss_kib, base.rss_kib);
    assert!(peak.threads <= base.threads + 8, "threads: {} at peak, base {}", peak.threads, base.threads);
    // After the flood the reserved client renews into the same address.
    assert_eq!(dhclient.obtain(&mut env), reserved_ip, "the reserved address after the flood");
}

/// `ulimit -n 256`: a TFTP flood with the default caps runs the process out of
/// descriptors while a flood of idle HTTP connections is held open. The services say so in
/// the log and in `/metrics`, the process stays up, and once the flood stops a client
/// leases, downloads over TFTP and HTTP, byte-identical.
#[test]
fn out_of_descriptors_degrades_and_recovers() {
    if !e2e_ready("out_of_descriptors_degrades_and_recovers", &["tftp", "dhclient"]) {
        return;
    }
    const NOFILE: u64 = 256;
    const FLOOD: u64 = 2_000;
    let mut env = Env::new("flood-nofile");
    set_in_section(&env, "tftp", "idle_timeout_secs = 4");
    let legit = env.put_file("legit.bin", &random_bytes(2, 512 * 1024 + 17));
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str("\n[[dhcp.reservation]]\nmac = \"52:54:00:77:0f:02\"\nip = \"10.77.0.61\"\n");
    fs::write(&env.config, cfg).unwrap();
    start_server_with_nofile(&mut env, NOFILE);
    let pid = fleetboot_pid(&env);
    let attacker = env.add_client(Some("10.77.0.32/24"), None);
    for i in 33..37 {
        env.ip(&attacker.ns, &["addr", "add", &format!("10.77.0.{i}/24"), "dev", "eth0"]);
    }
    let sources = spoofed_sources(&env);
    let sampler = Sampler::start(pid);

    // Idle HTTP connections from five addresses, held for the whole flood.
    let hold = Arc::new(AtomicBool::new(true));
    let holding = hold.clone();
    let http_flood = in_namespace(&attacker.ns, move || {
        let mut conns = Vec::new();
        for i in 0..100u32 {
            let src = Ipv4Addr::new(10, 77, 0, 32 + (i % 5) as u8);
            let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            sock.bind(&SockAddr::from(SocketAddrV4::new(src, 0))).unwrap();
            if sock.connect_timeout(&SockAddr::from(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 8080)), Duration::from_secs(5)).is_ok() {
                conns.push(sock);
            }
        }
        while holding.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(20));
        }
        conns.len()
    });
    let sent = Arc::new(AtomicU64::new(0));
    spoofed_rrq_flood(&attacker.ns, sources, vec!["legit.bin".into()], FLOOD, sent).join().expect("the flood");
    let out_of_fds = env.eventually(100, |e| fs::read_to_string(e.server_log()).unwrap_or_default().contains("out of file descriptors"));
    hold.store(false, Ordering::Relaxed);
    let held = http_flood.join().expect("HTTP connections");
    assert!(out_of_fds, "no log line says the server ran out of descriptors:\n{}", env.log_tail());
    assert!(env.server_alive(), "the server exited when it ran out of descriptors");
    // The forged transfers idle out; then a client boots as if nothing happened.
    let drained = env.eventually(150, |e| e.metric("fleetboot_tftp_transfers_active") == 0.0);
    let (peak, samples) = sampler.finish();
    assert!(drained, "forged transfers still active after their idle timeout");
    let no_fds = env.metric("fleetboot_tftp_requests_dropped_total{reason=\"no_file_descriptors\"}");
    let log = fs::read_to_string(env.server_log()).unwrap_or_default();
    eprintln!("RLIMIT_NOFILE {NOFILE}: {held} idle HTTP connections held, peak {peak:?} over {samples} samples, TFTP requests dropped for want of a descriptor {no_fds}");
    assert!(log.contains("open file limit") && log.contains(&format!("soft={NOFILE}")), "the start does not log the descriptor limit");
    assert!(no_fds > 0.0, "no TFTP request counted as dropped for want of a descriptor");
    // Said once per interval, not once per request, whichever step ran out (the file or
    // the transfer's socket).
    let said = log.lines().filter(|l| l.contains("TFTP: out of file descriptors")).count();
    let unthrottled = log
        .lines()
        .filter(|l| l.contains("serve::tftp") && l.contains("Too many open files") && !l.contains("TFTP: out of file descriptors"))
        .count();
    assert!(said <= 2, "the descriptor shortage was logged {said} times");
    assert_eq!(unthrottled, 0, "descriptor errors logged one line per request");
    // Every TCP listener (HTTP, the API this test reads /metrics from) counts and
    // throttles its accept errors; none is left to axum's line per second.
    let per_second = log.lines().filter(|l| l.contains("accept error:")).count();
    assert_eq!(per_second, 0, "a listener logs its accept errors once a second");
    assert!(peak.fds <= NOFILE, "{} descriptors open under a limit of {NOFILE}", peak.fds);

    let client = env.add_client(None, Some("52:54:00:77:0f:02"));
    let dhclient = Dhclient::new(&env, &client, "after");
    let ip = dhclient.obtain(&mut env);
    assert_eq!(ip, "10.77.0.61".parse::<Ipv4Addr>().unwrap());
    env.ip(&client.ns, &["addr", "replace", "10.77.0.61/24", "dev", "eth0"]);
    let out = env.dir.join("legit.out");
    let r = tftp_get(&mut env, &client.ns, "legit.bin", &out);
    assert!(r.ok(), "TFTP after the flood: {}", r.stderr);
    assert_same_file("TFTP after the flood", &legit, &out);
    let (code, body) = env.http(&client.ns, &[], &format!("{HTTP}/files/legit.bin"));
    assert_eq!(code, 200, "HTTP after the flood");
    assert_eq!(body, fs::read(&legit).unwrap(), "HTTP after the flood: different bytes");
    assert!(env.server_alive(), "the server exited");
}

const NBD_PORT: u16 = 10809;

/// What the NBD attacker saw of its connections.
#[derive(Debug, Default)]
struct NbdFlood {
    /// Closed before the greeting (refused at the cap).
    refused: u64,
    /// Greeted, but the export was not opened.
    handshake_failed: u64,
    /// Opened the export and then sat idle.
    idle: u64,
    /// Opened the export and sent a 32 MiB WRITE header with part of its payload.
    writing: u64,
}

/// Opens `count` NBD connections from `sources` in turn (fixed newstyle, `NBD_OPT_EXPORT_NAME`
/// of `export`); every second one that gets in sends a WRITE header of 32 MiB followed by
/// as much of the payload as the socket takes without blocking (up to 4 MiB). The
/// connections stay open until `hold` is cleared.
fn nbd_flood(ns: &str, sources: Vec<Ipv4Addr>, export: &'static str, count: u64, hold: Arc<AtomicBool>, admitted: Arc<AtomicU64>) -> JoinHandle<NbdFlood> {
    use std::io::{Read, Write};
    in_namespace(ns, move || {
        let server = SockAddr::from(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), NBD_PORT));
        let payload = vec![0x5au8; 1 << 20];
        let mut seen = NbdFlood::default();
        let mut open = Vec::new();
        for i in 0..count {
            let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            sock.bind(&SockAddr::from(SocketAddrV4::new(sources[i as usize % sources.len()], 0))).unwrap();
            if sock.connect_timeout(&server, Duration::from_secs(5)).is_err() {
                seen.refused += 1;
                continue;
            }
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut stream: std::net::TcpStream = sock.into();
            let mut greeting = [0u8; 18];
            if stream.read_exact(&mut greeting).is_err() {
                seen.refused += 1;
                continue;
            }
            let mut hello = Vec::new();
            hello.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
            hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes()); // IHAVEOPT
            hello.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
            hello.extend_from_slice(&(export.len() as u32).to_be_bytes());
            hello.extend_from_slice(export.as_bytes());
            let mut reply = [0u8; 10];
            if stream.write_all(&hello).is_err() || stream.read_exact(&mut reply).is_err() {
                seen.handshake_failed += 1;
                continue;
            }
            admitted.fetch_add(1, Ordering::Relaxed);
            if i % 2 == 0 {
                let mut write = Vec::new();
                write.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                write.extend_from_slice(&0u16.to_be_bytes());
                write.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
                write.extend_from_slice(&i.to_be_bytes());
                write.extend_from_slice(&0u64.to_be_bytes());
                write.extend_from_slice(&(32u32 << 20).to_be_bytes());
                let _ = stream.write_all(&write);
                stream.set_nonblocking(true).unwrap();
                for _ in 0..4 {
                    if stream.write(&payload).is_err() {
                        break;
                    }
                }
                seen.writing += 1;
            } else {
                seen.idle += 1;
            }
            open.push(stream);
        }
        while hold.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

/// 2,000 NBD connections from 25 addresses, every second one sending a 32 MiB WRITE
/// header: the connection caps hold the descriptors, the per-connection input buffer holds
/// the memory, everything past the caps is counted, and nbdcopy still copies the image
/// byte-identical while the attacker keeps its connections open.
#[test]
fn nbd_connection_flood_is_capped() {
    if !e2e_ready("nbd_connection_flood_is_capped", &["nbdcopy"]) {
        return;
    }
    const FLOOD: u64 = 2_000;
    const MAX_CONN: u64 = 64;
    let mut env = Env::new("flood-nbd");
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!(
        "\n[nbd]\nenabled = true\nlisten = \"0.0.0.0:{NBD_PORT}\"\nmax_connections = {MAX_CONN}\nmax_connections_per_client = 16\nrequest_timeout = 3\nidle_timeout = 120\n"
    ));
    fs::write(&env.config, cfg).unwrap();
    let image = env.dir.join("disk.raw");
    fs::write(&image, random_bytes(21, 8 << 20)).unwrap();
    common::host(&[common::BIN, "image", "import", &s(&image), "--name", "disk", "--format", "raw", "--config", &s(&env.config)], 120);
    env.start_server();
    env.lab.wait_listening(&env.server_ns(), Proto::Tcp, NBD_PORT, Duration::from_secs(30)).expect("NBD listening");
    let pid = fleetboot_pid(&env);
    let attacker = env.add_client(Some("10.77.0.40/24"), None);
    let sources: Vec<Ipv4Addr> = (40..65).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect();
    for a in &sources[1..] {
        env.ip(&attacker.ns, &["addr", "add", &format!("{a}/24"), "dev", "eth0"]);
    }
    let client = env.add_client(Some("10.77.0.20/24"), None);
    let uri = format!("nbd://10.77.0.1:{NBD_PORT}/disk");
    let out = env.dir.join("copy.raw");
    env.run_ok(&client.ns, &["nbdcopy", &uri, &s(&out)], 120);
    assert_same_file("nbdcopy before the flood", &image, &out);
    let base = usage(pid).expect("server usage");

    let sampler = Sampler::start(pid);
    let hold = Arc::new(AtomicBool::new(true));
    let admitted = Arc::new(AtomicU64::new(0));
    let flood = nbd_flood(&attacker.ns, sources, "disk", FLOOD, hold.clone(), admitted.clone());
    // The flood runs to its end and keeps what it got open. Idle connections are not
    // evictable before nbd.idle_timeout; the stalled WRITEs end at nbd.request_timeout
    // and give their places back, which the copy takes while the attacker holds the rest.
    while !flood.is_finished() && admitted.load(Ordering::Relaxed) + env.metric("fleetboot_nbd_connections_refused_total") as u64 + 64 < FLOOD {
        thread::sleep(Duration::from_millis(50));
    }
    let freed = env.eventually(150, |e| e.metric("fleetboot_nbd_connections") <= (MAX_CONN - 8) as f64);
    assert!(freed, "the stalled WRITEs never gave their places back");
    let _ = fs::remove_file(&out);
    let copy = env.run(&client.ns, &["nbdcopy", &uri, &s(&out)], 120);
    let peak_mid = usage(pid).expect("server usage");
    hold.store(false, Ordering::Relaxed);
    let seen = flood.join().expect("the flood");
    let (peak, samples) = sampler.finish();
    assert!(env.server_alive(), "the server exited");
    assert!(copy.ok(), "nbdcopy during the flood failed: {}", copy.stderr);
    assert_same_file("nbdcopy during the flood", &image, &out);
    let refused = env.metric("fleetboot_nbd_connections_refused_total");
    let evicted = env.metric("fleetboot_nbd_connections_evicted_total");
    let timed_out = env.metric("fleetboot_nbd_connections_timed_out_total");
    eprintln!(
        "NBD flood: {FLOOD} connections, attacker saw {seen:?}; base {base:?}, peak {peak:?} over {samples} samples \
         (at the end of the flood {peak_mid:?}); refused {refused}, evicted {evicted}, timed out {timed_out}"
    );
    assert!(samples > 10, "too few samples of the server ({samples})");
    assert!(seen.writing > 0, "no connection got as far as its WRITE");
    assert!(refused >= seen.refused as f64, "the attacker saw {} refusals, /metrics counts {refused}", seen.refused);
    // Every flood connection was refused, evicted, timed out (the stalled WRITEs, whose
    // places later connections took) or still held when the attacker let go: at most the cap.
    assert!(
        refused + evicted + timed_out >= (FLOOD - MAX_CONN) as f64,
        "{refused} refused + {evicted} evicted + {timed_out} timed out < {} past the cap",
        FLOOD - MAX_CONN
    );
    // A connection holds its socket and the image it reads.
    assert!(peak.fds <= base.fds + 2 * MAX_CONN + 16, "descriptors: {} at peak, base {}", peak.fds, base.fds);
    // A connection buffers at most its input buffer and one read piece, not its 32 MiB.
    assert!(peak.rss_kib <= base.rss_kib + (MAX_CONN + 32) * 1024, "RSS: {} KiB at peak, base {} KiB", peak.rss_kib, base.rss_kib);
    let _ = fs::remove_file(&out);
    env.run_ok(&client.ns, &["nbdcopy", &uri, &s(&out)], 120);
    assert_same_file("nbdcopy after the flood", &image, &out);
}

/// How a slow HTTP client behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// Connects and sends nothing.
    Silent,
    /// Sends a request header a byte at a time, never finishing it.
    Dribble,
    /// Makes one complete request, reads its answer, and keeps the connection open.
    KeepAlive,
}

/// Opens one connection per entry of `plan` to `server` from `ns` and runs them all until
/// the server closes each (or 120 s pass); returns how many the server closed.
fn slow_http_clients(ns: &str, server: SocketAddrV4, plan: Vec<Slow>) -> JoinHandle<usize> {
    use std::io::{Read, Write};
    in_namespace(ns, move || {
        let mut conns: Vec<(Slow, std::net::TcpStream, usize, bool)> = plan
            .iter()
            .map(|&how| {
                let mut c = std::net::TcpStream::connect_timeout(&server.into(), Duration::from_secs(5)).expect("connecting");
                if how == Slow::KeepAlive {
                    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                }
                c.set_nonblocking(true).unwrap();
                (how, c, 0, false)
            })
            .collect();
        let header = b"GET / HTTP/1.1\r\nHost: slow.example\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut buf = [0u8; 4096];
        for _round in 0..1200 {
            for (how, c, sent, closed) in conns.iter_mut() {
                if *closed {
                    continue;
                }
                if *how == Slow::Dribble && *sent < header.len() && c.write(&header[*sent..*sent + 1]).is_ok() {
                    *sent += 1;
                }
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => {
                            *closed = true;
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            *closed = true;
                            break;
                        }
                    }
                }
            }
            if conns.iter().all(|c| c.3) {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        conns.iter().filter(|c| c.3).count()
    })
}

/// Connections that send nothing, dribble a header a byte at a time or sit idle after a
/// request are closed by the boot network's HTTP listener and by the API listener after
/// the configured timeouts, each counted in `/metrics`; curl still gets its file.
#[test]
fn slow_and_silent_http_connections_are_closed() {
    if !e2e_ready("slow_and_silent_http_connections_are_closed", &[]) {
        return;
    }
    const EACH: usize = 8;
    let mut env = Env::new("flood-slowhttp");
    set_in_section(&env, "http", "header_timeout_secs = 2\nidle_timeout_secs = 3");
    set_in_section(&env, "admin", "header_timeout_secs = 2\nidle_timeout_secs = 3");
    let file = env.put_file("legit.bin", &random_bytes(4, 256 * 1024));
    env.start_server();
    let attacker = env.add_client(Some("10.77.0.33/24"), None);
    let client = env.add_client(Some("10.77.0.20/24"), None);
    let plan: Vec<Slow> = [Slow::Silent, Slow::Dribble, Slow::KeepAlive].iter().flat_map(|&h| std::iter::repeat_n(h, EACH)).collect();
    // The boot listener from the attacker's namespace (a share per address: 16 by default,
    // so keep to that), the API listener from the server's own host.
    let boot = slow_http_clients(&attacker.ns, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 8080), plan[..2 * EACH].to_vec());
    let boot_keepalive = {
        let mut p = plan[2 * EACH..].to_vec();
        p.truncate(EACH);
        slow_http_clients(&client.ns, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 8080), p)
    };
    let admin = slow_http_clients(&env.server_ns(), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081), plan.clone());
    let (code, body) = env.http(&client.ns, &[], &format!("{HTTP}/files/legit.bin"));
    assert_eq!(code, 200);
    assert_eq!(body, fs::read(&file).unwrap(), "HTTP beside the slow clients: different bytes");
    let closed_boot = boot.join().expect("slow clients") + boot_keepalive.join().expect("slow clients");
    let closed_admin = admin.join().expect("slow clients");
    let metrics = {
        let (code, body) = env.api(&[], "/metrics");
        assert_eq!(code, 200);
        String::from_utf8_lossy(&body).into_owned()
    };
    let count = |listener: &str, phase: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("fleetboot_connections_timed_out_total{"))
            .filter(|l| l.contains(&format!("listener=\"{listener}\"")) && l.contains(&format!("phase=\"{phase}\"")))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    let (http_header, http_idle, admin_header, admin_idle) = (count("http", "header"), count("http", "idle"), count("admin", "header"), count("admin", "idle"));
    eprintln!(
        "slow HTTP: closed {closed_boot}/{} on the boot listener, {closed_admin}/{} on the API; timed out: http header {http_header} idle {http_idle}, admin header {admin_header} idle {admin_idle}",
        3 * EACH,
        3 * EACH
    );
    assert_eq!(closed_boot, 3 * EACH, "the boot listener left slow connections open");
    assert_eq!(closed_admin, 3 * EACH, "the API listener left slow connections open");
    assert!(http_header >= (2 * EACH) as f64 && http_idle >= EACH as f64, "boot listener timeouts not counted: {http_header} header, {http_idle} idle");
    // The API's own connections (curl for /metrics) may add to its idle count.
    assert!(admin_header >= (2 * EACH) as f64 && admin_idle >= EACH as f64, "API timeouts not counted: {admin_header} header, {admin_idle} idle");
    let log = fs::read_to_string(env.server_log()).unwrap_or_default();
    assert!(log.contains("a request header took longer than its timeout"), "no log line for the header timeout");
    assert!(log.contains("silent longer than its idle timeout"), "no log line for the idle timeout");
    assert!(env.server_alive(), "the server exited");
}

/// An ext4 file system in a file under the test directory, loop-mounted on `at`; unmounted
/// on drop (lazily if something still holds it), whatever the test did.
struct LoopMount {
    at: std::path::PathBuf,
}

impl LoopMount {
    fn new(image: &std::path::Path, mib: u64, at: &std::path::Path) -> LoopMount {
        let f = fs::File::create(image).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        common::host(&["mkfs.ext4", "-q", "-F", "-m", "0", &s(image)], 60);
        fs::create_dir_all(at).unwrap();
        common::host(&["mount", "-o", "loop", &s(image), &s(at)], 60);
        LoopMount { at: at.to_path_buf() }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = std::process::Command::new("timeout");
            c.args(["30", "umount"]);
            if lazy {
                c.arg("-l");
            }
            c.arg(&self.at).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("could not unmount {}", self.at.display());
        }
    }
}

/// Fills the file system holding `dir` until a write fails with ENOSPC; returns the bytes
/// written.
fn fill(dir: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut f = fs::File::create(dir.join("filler")).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0xeeu8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n > 0 => written += n as u64,
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling: {e}");
                    break;
                }
            }
        }
    }
    let _ = f.sync_all();
    written
}

fn qemu_io(env: &mut Env, ns: &str, uri: &str, cmd: &str) -> common::Ran {
    env.run(ns, &["qemu-io", "-f", "raw", "-c", cmd, uri], 60)
}

/// `data_dir` on a small file system filled to ENOSPC: the leased client keeps its
/// address, a new client gets no ACK and the log says why, NBD writes fail with ENOSPC
/// while reads go on, and `fleetboot image import` fails leaving the catalog as it was.
#[test]
fn a_full_data_dir_keeps_leases_and_reads_and_fails_cleanly() {
    if !e2e_ready("a_full_data_dir_keeps_leases_and_reads_and_fails_cleanly", &["dhclient", "qemu-io", "mkfs.ext4", "mount", "umount"]) {
        return;
    }
    let mut env = Env::new("enospc");
    let data = env.dir.join("data");
    let _mount = LoopMount::new(&env.dir.join("data.ext4"), 48, &data);
    let (mac_a, ip_a) = ("52:54:00:77:0e:01", "10.77.0.70");
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!(
        "\n[nbd]\nenabled = true\nlisten = \"0.0.0.0:{NBD_PORT}\"\noverlay = \"private\"\n\n[[dhcp.reservation]]\nmac = \"{mac_a}\"\nip = \"{ip_a}\"\n"
    ));
    fs::write(&env.config, cfg).unwrap();
    let image = env.dir.join("disk.raw");
    let image_bytes = random_bytes(31, 4 << 20);
    fs::write(&image, &image_bytes).unwrap();
    common::host(&[common::BIN, "image", "import", &s(&image), "--name", "disk", "--format", "raw", "--config", &s(&env.config)], 120);
    env.start_server();
    env.lab.wait_listening(&env.server_ns(), Proto::Tcp, NBD_PORT, Duration::from_secs(30)).expect("NBD listening");
    let a = env.add_client(None, Some(mac_a));
    let dh_a = Dhclient::new(&env, &a, "a");
    assert_eq!(dh_a.obtain(&mut env).to_string(), ip_a);
    env.ip(&a.ns, &["addr", "replace", &format!("{ip_a}/24"), "dev", "eth0"]);
    let uri = format!("nbd://10.77.0.1:{NBD_PORT}/disk@{}", mac_a.replace(':', "-"));
    // The client's overlay exists before the disk fills (it is private: it stays).
    let r = qemu_io(&mut env, &a.ns, &uri, "write -P 0x11 0 64k");
    assert!(r.ok(), "NBD write before the disk filled: {}{}", r.stdout_str(), r.stderr);
    let catalog_before = fs::read(data.join("images/catalog.json")).expect("catalog.json");
    let stored_before = fs::read_dir(data.join("images/sha256")).map(|d| d.count()).unwrap_or(0);

    let filled = fill(&data);
    eprintln!("data_dir filled with {filled} bytes");

    // NBD: a write into new blocks fails with ENOSPC; reads go on, old writes included.
    let w = qemu_io(&mut env, &a.ns, &uri, "write -P 0x22 1M 2M");
    let w_out = format!("{}{}", w.stdout_str(), w.stderr);
    eprintln!("NBD write on the full disk: {w_out}");
    assert!(w_out.contains("No space left on device"), "NBD write on a full disk: {w_out}");
    let r = qemu_io(&mut env, &a.ns, &uri, "read -P 0x11 0 64k");
    assert!(r.ok(), "NBD read of the client's own write on a full disk: {}{}", r.stdout_str(), r.stderr);
    let off = 3 << 20;
    let r = qemu_io(&mut env, &a.ns, &uri, &format!("read -P {} {off} 512", image_bytes[off]));
    let r_out = format!("{}{}", r.stdout_str(), r.stderr);
    // (only the first byte's value is checked by pattern when the block is uniform; the
    // read itself must succeed)
    assert!(r.ok() || r_out.contains("Pattern verification failed"), "NBD read of the image on a full disk: {r_out}");

    // The import fails and leaves nothing behind.
    let big = env.dir.join("big.raw");
    fs::write(&big, random_bytes(32, 8 << 20)).unwrap();
    let mut c = std::process::Command::new("timeout");
    c.args(["120", common::BIN, "image", "import", &s(&big), "--name", "big", "--format", "raw", "--config", &s(&env.config)]);
    let out = fleetboot_lab::netns::output_with_timeout(c, Duration::from_secs(130)).expect("running the import");
    let import_err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("import on the full disk: {} {import_err}", out.status);
    assert!(!out.status.success(), "the import succeeded on a full disk");
    assert!(import_err.contains("No space left on device"), "the import does not say the disk is full: {import_err}");
    assert_eq!(fs::read(data.join("images/catalog.json")).unwrap(), catalog_before, "catalog.json changed");
    assert_eq!(fs::read_dir(data.join("images/sha256")).map(|d| d.count()).unwrap_or(0), stored_before, "a stored image was added");
    let leftovers: Vec<_> = fs::read_dir(data.join("images/tmp")).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "images/tmp holds {leftovers:?}");

    // DHCP: no ACK leaves for a lease that cannot be stored, renewal or new; the lease on
    // disk stands, the log says why (once per interval), and the service goes on.
    let try_lease = |env: &mut Env, dh: &Dhclient| -> bool {
        let _ = fs::remove_file(&dh.lease_file);
        let r = env.run(&dh.ns, &["dhclient", "-1", "-v", "-sf", "/bin/true", "-lf", &s(&dh.lease_file), "-pf", &s(&dh.pid_file), "eth0"], 30);
        thread::sleep(Duration::from_millis(200));
        dh.kill_daemon();
        r.ok()
    };
    let b = env.add_client(None, Some("52:54:00:77:0e:02"));
    let dh_b = Dhclient::new(&env, &b, "b");
    assert!(!try_lease(&mut env, &dh_b), "a new client got a lease that could not be stored");
    let withheld = env.metric("fleetboot_dhcp_withheld_total");
    let log = fs::read_to_string(env.server_log()).unwrap_or_default();
    let said = log.lines().filter(|l| l.contains("lease not stored; reply withheld")).count();
    eprintln!("full disk: {withheld} replies withheld, said {said} times");
    assert!(withheld >= 1.0, "no reply counted as withheld");
    assert!(
        log.lines().any(|l| l.contains("lease not stored; reply withheld") && l.contains("disk is full")),
        "the log does not say why leases fail"
    );
    assert!(said <= 2, "the withheld replies were logged {said} times");
    let commits_said = log.lines().filter(|l| l.contains("store commit failed")).count();
    assert!(commits_said <= 2, "failed store commits were logged {commits_said} times");
    let db = rusqlite::Connection::open_with_flags(data.join("fleetboot.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("opening the database");
    let held_by_a: String = db.query_row("SELECT mac FROM leases WHERE ip = ?1", [ip_a], |r| r.get(0)).expect("the leased client's row");
    assert_eq!(held_by_a.to_ascii_lowercase(), mac_a, "the lease on disk changed hands");
    drop(db);
    assert!(env.server_alive(), "the server exited on a full disk");
    // Space again: both clients lease, the leased one into its address.
    fs::remove_file(data.join("filler")).unwrap();
    assert_eq!(dh_a.obtain(&mut env).to_string(), ip_a, "the leased client once there is space");
    dh_b.obtain(&mut env);
    env.stop_server();
}

//! Two `fleetboot serve` answering DHCP from one PostgreSQL store, end to end.
//!
//! A private PostgreSQL cluster (`fleetboot_store::testing::PgCluster`: initdb in a temp
//! directory, Unix socket only, removed on drop); server "a" in the lab's server namespace
//! (10.81.0.1), server "b" in a namespace of its own on the same bridge (10.81.0.2), both
//! with `[store] url` on that cluster and one pool of 16,000 addresses; perfdhcp (from
//! kea-admin) in a client namespace drives full DORA exchanges from `CLIENTS` distinct
//! clients with its uniqueness check (`-u`). Server "a" is SIGKILLed once the wire has
//! carried `KILL_AFTER_ACKS` ACKs.
//!
//! What is checked, all by counts and addresses (never by time):
//! - perfdhcp found no address handed out twice (`-u`);
//! - on the wire (tcpdump in the client namespace, parsed here): no address ACKed to two
//!   clients, no client ACKed two addresses; both servers ACKed before the kill;
//! - after the kill, "b" ACKed clients whose owner among {a, b} was "a" (the rendezvous
//!   hash of `fleetboot::serve::cluster::owner`): a dead server's clients move;
//! - the PostgreSQL lease table holds every (MAC, address) ACKed on the wire, bound, and no
//!   MAC with two live leases: no lease lost or doubled, "a"'s included.
//!
//! The recovery time (kill → "b"'s first ACK to one of "a"'s clients, on the capture's
//! clock) is printed, not asserted.
//!
//! `postgresql_crashed_and_restarted_under_dhcp_load_no_ack_without_a_committed_lease`
//! runs the same pair under a lighter perfdhcp load and crashes PostgreSQL
//! (`pg_ctl stop -m immediate`) once the wire has carried `CRASH_AFTER_ACKS` ACKs, then
//! starts it again on the same data: every ACK on the wire must be a bound row of its
//! client in the table that came back, no address or client doubled, both servers alive,
//! and ACKs after the restart to clients first answered after it. How long DHCP was
//! interrupted is printed, not asserted.
//!
//! `a_bind_the_database_refuses_is_never_acked` runs one server in this process on
//! loopback over the same kind of cluster: an address it offered is taken in the database
//! behind its back (as by another server whose notice it has not seen yet); its REQUEST
//! gets no ACK, and the retry a NAK.
//!
//! Gating: root, perfdhcp, tcpdump and PostgreSQL (`scripts/setup.sh`); otherwise it says
//! why and passes, unless `FLEETBOOT_REQUIRE_E2E=1`. Network safety: everything runs in
//! the namespaces of a [`fleetboot_lab::netns::Lab`] (deleted on drop with its processes)
//! or on loopback.

mod loopback;

use fleetboot_dhcp::{DhcpMessage, MessageType};
use fleetboot_lab::netns::{Lab, Proto};
use fleetboot_store::testing::{PgCluster, PgOptions};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");

/// Distinct perfdhcp clients, one DORA each (`-R` and `-n`).
const CLIENTS: u32 = 10_000;
/// Exchanges started per second (`-r`).
const RATE: u32 = 400;
/// SIGKILL server "a" once the capture holds this many ACKs.
const KILL_AFTER_ACKS: usize = 3_000;

const SERVERS: [(&str, &str, &str); 2] = [("a", "10.81.0.1", "srv0"), ("b", "10.81.0.2", "eth0")];

/// One DHCP reply seen on the wire.
#[derive(Debug, Clone)]
struct Reply {
    kind: MessageType,
    mac: [u8; 6],
    yiaddr: Ipv4Addr,
    server: Option<Ipv4Addr>,
    /// Unix microseconds (the capture's clock).
    at_us: u64,
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The DHCP replies (UDP source port 67) of a classic pcap file (Ethernet); a record cut
/// short at the end (tcpdump still writing) is ignored.
fn replies_in_pcap(bytes: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    if bytes.len() < 24 {
        return out;
    }
    let (le, nanos) = match &bytes[0..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] => (true, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (true, true),
        [0xa1, 0xb2, 0xc3, 0xd4] => (false, false),
        [0xa1, 0xb2, 0x3c, 0x4d] => (false, true),
        m => panic!("not a pcap file (magic {m:02x?})"),
    };
    let u32_at = |i: usize| {
        let a = [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    assert_eq!(u32_at(20), 1, "expected an Ethernet capture");
    let mut i = 24;
    while i + 16 <= bytes.len() {
        let (sec, frac, incl) = (u32_at(i) as u64, u32_at(i + 4) as u64, u32_at(i + 8) as usize);
        let start = i + 16;
        let Some(end) = start.checked_add(incl).filter(|&e| e <= bytes.len()) else { break };
        let at_us = sec * 1_000_000 + if nanos { frac / 1000 } else { frac };
        if let Some(r) = reply_in_frame(&bytes[start..end], at_us) {
            out.push(r);
        }
        i = end;
    }
    out
}

fn reply_in_frame(f: &[u8], at_us: u64) -> Option<Reply> {
    if u16::from_be_bytes([*f.get(12)?, *f.get(13)?]) != 0x0800 {
        return None;
    }
    let ip = f.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.first()? >> 4 != 4 || ihl < 20 || *ip.get(9)? != 17 {
        return None;
    }
    let udp = ip.get(ihl..)?;
    let ulen = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if u16::from_be_bytes([*udp.first()?, *udp.get(1)?]) != 67 || ulen < 8 {
        return None;
    }
    let m = DhcpMessage::parse(udp.get(8..ulen.min(udp.len()))?).ok()?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&m.chaddr[..6]);
    Some(Reply { kind: m.message_type()?, mac, yiaddr: m.yiaddr, server: m.server_id(), at_us })
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// A server's config: its own data_dir and address, the shared store, one pool.
fn server_config(dir: &Path, name: &str, addr: &str, iface: &str, url: &str) -> PathBuf {
    let data = dir.join(name);
    fs::create_dir_all(data.join("root")).unwrap();
    let cfg = format!(
        r#"data_dir = "{data}"

[server]
address = "{addr}"
interface = "{iface}"
root = "{root}"

[dhcp]
mode = "server"

[[dhcp.subnet]]
network = "10.81.0.0/16"
range = ["10.81.1.0", "10.81.63.250"]
lease_time = 7200

[tftp]
enabled = false

[http]
enabled = true
listen = "127.0.0.1:8080"

[store]
url = "{url}"
name = "{name}"
heartbeat_ms = 500
peer_timeout_ms = 2000
"#,
        data = data.join("data").display(),
        root = data.join("root").display(),
    );
    let path = data.join("fb.toml");
    fs::write(&path, cfg).unwrap();
    path
}

/// A background process in `ns` under `timeout`, tracked by the lab until reaped.
fn spawn_bg(lab: &Lab, ns: &str, args: &[&str], limit_secs: u64, log: &Path) -> Child {
    let mut cmd = lab.cmd(ns, "timeout");
    cmd.args(["-k", "5", &limit_secs.to_string()])
        .args(args)
        .env("RUST_LOG", "warn,fleetboot::serve::cluster=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(fs::File::create(log).unwrap())
        .stderr(fs::File::create(log.with_extension("err")).unwrap());
    lab.spawn_tracked(&mut cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits (bounded) for a background process; SIGTERM (then SIGKILL) if it outlives `limit`.
fn reap(lab: &Lab, mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on a child this test started and has not reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            thread::sleep(Duration::from_secs(2));
            let _ = child.kill();
            break child.wait().unwrap();
        }
        thread::sleep(Duration::from_millis(50));
    };
    lab.untrack(child.id());
    status
}

/// SIGKILL for the fleetboot process under the `timeout` wrapper `wrapper`.
fn sigkill_fleetboot(wrapper: &Child) {
    let pid = wrapper.id();
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut killed = 0;
    for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
        if fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default().trim() == "fleetboot" {
            // SAFETY: kill(2) on the fleetboot process this test started.
            unsafe { libc::kill(child, libc::SIGKILL) };
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "found no fleetboot process under pid {pid}");
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A figure of one exchange's section of perfdhcp's report ("DISCOVER-OFFER",
/// "REQUEST-ACK"), such as "drops" or "non unique addresses" (`-u`).
fn perfdhcp_figure(report: &str, exchange: &str, figure: &str) -> Option<u64> {
    let mut inside = false;
    for l in report.lines() {
        if l.contains("Statistics for:") {
            inside = l.contains(exchange);
        } else if inside {
            if let Some(v) = l.strip_prefix(figure).and_then(|r| r.strip_prefix(':')) {
                return v.trim().parse().ok();
            }
        }
    }
    None
}

/// Servers "a" and "b" (`SERVERS`) on the store at `url`, one per namespace; returns once
/// both answer on port 67 and each has seen the other (the wrapper and the log of each).
fn start_servers(lab: &Lab, dir: &Path, url: &str, namespaces: &[String; 2]) -> Vec<(Child, PathBuf)> {
    let mut servers = Vec::new();
    for ((name, addr, iface), ns) in SERVERS.iter().zip(namespaces) {
        let cfg = server_config(dir, name, addr, iface, url);
        let log = dir.join(format!("{name}.log"));
        let child = spawn_bg(lab, ns, &[BIN, "serve", "--config", &cfg.display().to_string()], 300, &log);
        servers.push((child, log));
    }
    for ((child, log), ns) in servers.iter_mut().zip(namespaces) {
        let up = (0..600).any(|_| {
            assert!(child.try_wait().unwrap().is_none(), "a server exited:\n{}", tail(&log.with_extension("err")));
            thread::sleep(Duration::from_millis(100));
            lab.is_listening(ns, Proto::Udp, 67).unwrap_or(false)
        });
        assert!(up, "a server did not come up:\n{}", tail(&log.with_extension("err")));
    }
    // Both see both before the clients come (each logs the live set when it changes).
    let sees_both = |log: &Path| fs::read_to_string(log.with_extension("err")).unwrap_or_default().contains("live=a,b");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !servers.iter().all(|(_, log)| sees_both(log)) {
        assert!(Instant::now() < deadline, "the servers never saw each other:\n{}\n{}", tail(&servers[0].1.with_extension("err")), tail(&servers[1].1.with_extension("err")));
        thread::sleep(Duration::from_millis(100));
    }
    servers
}

/// tcpdump of the DHCP replies on `ns`'s eth0 into `pcap`, once it is listening.
fn start_capture(lab: &Lab, ns: &str, pcap: &Path) -> Child {
    let cap_log = pcap.with_extension("log");
    let pcap_s = pcap.display().to_string();
    let cap = spawn_bg(
        lab,
        ns,
        &["tcpdump", "-i", "eth0", "-n", "-U", "-s", "0", "-B", "8192", "-Z", "root", "-w", &pcap_s, "udp", "src", "port", "67"],
        300,
        &cap_log,
    );
    let listening = (0..200).any(|_| {
        thread::sleep(Duration::from_millis(50));
        fs::read_to_string(cap_log.with_extension("err")).is_ok_and(|t| t.contains("listening on"))
    });
    assert!(listening, "tcpdump did not start: {}", tail(&cap_log.with_extension("err")));
    cap
}

/// The ACKs in the capture so far.
/// Waits (at most 60 s) until the capture holds `n` ACKs; fails with both logs' tails.
fn wait_for_acks(pcap: &Path, n: usize, perf_log: &Path, server_err: &Path) {
    let mut seen = 0;
    for _ in 0..2400 {
        seen = acks_in(pcap);
        if seen >= n {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!("only {seen} ACKs before perfdhcp ended:\n{}\n{}", tail(perf_log), tail(server_err));
}

fn acks_in(pcap: &Path) -> usize {
    replies_in_pcap(&fs::read(pcap).unwrap_or_default()).iter().filter(|r| r.kind == MessageType::Ack).count()
}

/// The ACKs as client -> address, asserting that no client was ACKed two addresses and
/// no address was ACKed to two clients.
fn one_address_per_client(acks: &[&Reply]) -> BTreeMap<[u8; 6], Ipv4Addr> {
    let mut by_mac: BTreeMap<[u8; 6], Ipv4Addr> = BTreeMap::new();
    let mut by_ip: HashMap<Ipv4Addr, [u8; 6]> = HashMap::new();
    for r in acks {
        if let Some(prev) = by_mac.insert(r.mac, r.yiaddr) {
            assert_eq!(prev, r.yiaddr, "{} was ACKed {prev} and {}", mac_str(&r.mac), r.yiaddr);
        }
        if let Some(prev) = by_ip.insert(r.yiaddr, r.mac) {
            assert_eq!(prev, r.mac, "{} was ACKed to {} and to {}", r.yiaddr, mac_str(&prev), mac_str(&r.mac));
        }
    }
    by_mac
}

/// Reads the shared lease table (through the store of the server config `config`) and
/// asserts that every (client, address) ACKed is a bound row of that client and that no
/// client holds two live leases. Returns the number of rows.
fn every_ack_is_a_committed_lease(config: &Path, acked: &BTreeMap<[u8; 6], Ipv4Addr>) -> usize {
    let store = fleetboot::config::Config::load(config).unwrap().open_store().unwrap();
    let rows = store.leases().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let mut live_per_mac: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
    let mut row_of: HashMap<Ipv4Addr, &fleetboot_store::LeaseRecord> = HashMap::new();
    for r in &rows {
        row_of.insert(r.ip, r);
        if r.state == "bound" && r.expires_at > now {
            live_per_mac.entry(r.mac.to_ascii_lowercase()).or_default().push(r.ip);
        }
    }
    let doubled: Vec<_> = live_per_mac.iter().filter(|(_, ips)| ips.len() > 1).collect();
    assert!(doubled.is_empty(), "{} clients hold two leases: {:?}", doubled.len(), &doubled[..doubled.len().min(5)]);
    let lost: Vec<String> = acked
        .iter()
        .filter(|(mac, ip)| {
            !row_of.get(ip).is_some_and(|r| r.state == "bound" && r.mac.eq_ignore_ascii_case(&mac_str(mac)))
        })
        .map(|(mac, ip)| format!("{} -> {ip}: {:?}", mac_str(mac), row_of.get(ip)))
        .collect();
    assert!(lost.is_empty(), "{} ACKed leases are not in the table:\n{}", lost.len(), lost[..lost.len().min(10)].join("\n"));
    rows.len()
}

#[test]
fn two_servers_on_one_postgresql_hand_out_unique_addresses_and_survive_a_sigkill() {
    let test = "two_servers_on_one_postgresql_hand_out_unique_addresses_and_survive_a_sigkill";
    if !fleetboot_lab::gate::e2e_ready(test, &["ip", "ss", "timeout", "perfdhcp", "tcpdump"])
        || !fleetboot_store::testing::ready(test)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start(PgOptions::default()).expect("starting a private PostgreSQL");
    let mut lab = Lab::with_server_addr("10.81.0.1/16").expect("creating the lab");
    let b_ns = lab.add_client(Some("10.81.0.2/16")).expect("server b's namespace").ns;
    let client = lab.add_client(Some("10.81.0.3/16")).expect("the client namespace");
    let namespaces = [lab.server_ns().to_string(), b_ns];

    let mut servers = start_servers(&lab, dir.path(), &pg.url(), &namespaces);

    // perfdhcp, captured on the client's side.
    let pcap = dir.path().join("dhcp.pcap");
    let cap = start_capture(&lab, &client.ns, &pcap);
    let perf_log = dir.path().join("perfdhcp.log");
    let (n, rate) = (CLIENTS.to_string(), RATE.to_string());
    let period = (CLIENTS / RATE + 20).to_string();
    let perf_started = Instant::now();
    let perf = spawn_bg(
        &lab,
        &client.ns,
        &["perfdhcp", "-4", "-l", "eth0", "-u", "-r", &rate, "-n", &n, "-R", &n, "-p", &period, "-W", "2000000"],
        120,
        &perf_log,
    );

    // SIGKILL "a" once the wire has carried KILL_AFTER_ACKS ACKs (a count, not a time).
    wait_for_acks(&pcap, KILL_AFTER_ACKS, &perf_log, &servers[0].1.with_extension("err"));
    let killed_at_us = unix_us();
    sigkill_fleetboot(&servers[0].0);
    let (a_child, a_log) = servers.remove(0);
    reap(&lab, a_child, Duration::from_secs(10));

    let perf_status = reap(&lab, perf, Duration::from_secs(120));
    let perf_secs = perf_started.elapsed().as_secs_f64();
    // SAFETY: kill(2) on the tcpdump wrapper this test started: it flushes and exits.
    unsafe { libc::kill(cap.id() as i32, libc::SIGTERM) };
    reap(&lab, cap, Duration::from_secs(20));
    let report = fs::read_to_string(&perf_log).unwrap_or_default();
    let b_log = servers[0].1.clone();
    eprintln!("perfdhcp ({perf_status}, {perf_secs:.1} s):\n{report}");

    // 1. The wire: one address per client, one client per address (checked first: it
    // names the client and address when something is wrong).
    let replies = replies_in_pcap(&fs::read(&pcap).unwrap());
    let acks: Vec<&Reply> = replies.iter().filter(|r| r.kind == MessageType::Ack).collect();
    let by_mac = one_address_per_client(&acks);
    // A client ACKed more than once (the same address each time, or the check above
    // fails): what perfdhcp's count of "non unique addresses" would include.
    let acked_again = acks.len() - by_mac.len();

    // 2. perfdhcp's own uniqueness check. No address ACKed twice; an address offered
    // twice only if the first offer never became a lease: its REQUEST went to the killed
    // server and was dropped, and the address went back to the pool.
    let figure = |x: &str, f: &str| {
        perfdhcp_figure(&report, x, f).unwrap_or_else(|| panic!("no {f:?} for {x} in perfdhcp's report:\n{report}"))
    };
    assert_eq!(
        figure("REQUEST-ACK", "non unique addresses"),
        0,
        "perfdhcp saw an address ACKed twice; on the wire no address went to two clients, {acked_again} ACKs repeated one"
    );
    let (offered_twice, unanswered_requests) = (figure("DISCOVER-OFFER", "non unique addresses"), figure("REQUEST-ACK", "drops"));
    assert!(
        offered_twice <= unanswered_requests,
        "{offered_twice} addresses offered twice, but only {unanswered_requests} offers were left without an ACK"
    );

    let server_ip = |name: &str| SERVERS.iter().find(|s| s.0 == name).unwrap().1.parse::<Ipv4Addr>().unwrap();
    let (a_ip, b_ip) = (server_ip("a"), server_ip("b"));
    let before: Vec<&&Reply> = acks.iter().filter(|r| r.at_us < killed_at_us).collect();
    let after: Vec<&&Reply> = acks.iter().filter(|r| r.at_us >= killed_at_us).collect();
    let by = |set: &[&&Reply], ip: Ipv4Addr| set.iter().filter(|r| r.server == Some(ip)).count();
    let both: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    let owned_by_a = |r: &Reply| fleetboot::serve::cluster::owner(&both, &r.mac) == Some("a");
    let taken_over: Vec<&&&Reply> = after.iter().filter(|r| r.server == Some(b_ip) && owned_by_a(r)).collect();
    let recovery_ms = taken_over.iter().map(|r| r.at_us).min().map(|t| (t - killed_at_us) as f64 / 1000.0);
    eprintln!(
        "ACKs on the wire: {} to {} clients; before the kill a {} / b {}; after it a {} / b {} ({} of them to a's clients); \
         recovery (kill -> b's first ACK to one of a's clients): {}",
        acks.len(),
        by_mac.len(),
        by(&before, a_ip),
        by(&before, b_ip),
        by(&after, a_ip),
        by(&after, b_ip),
        taken_over.len(),
        recovery_ms.map_or("never".into(), |ms| format!("{ms:.0} ms")),
    );
    assert!(by(&before, a_ip) > 0 && by(&before, b_ip) > 0, "both servers answer while both live");
    assert!(!taken_over.is_empty(), "b never served a client of the dead a:\n{}", tail(&b_log.with_extension("err")));
    // Only the dead server's clients moved: b answered its own clients before the kill.
    let b_took_a_before = before.iter().filter(|r| r.server == Some(b_ip) && owned_by_a(r)).count();
    eprintln!("before the kill b ACKed {b_took_a_before} of a's clients (takeover by secs only)");

    // 3. The database: every ACK on the wire is a bound lease of that client; no MAC with
    // two live leases.
    let rows = every_ack_is_a_committed_lease(&dir.path().join("b").join("fb.toml"), &by_mac);
    eprintln!("lease table: {rows} rows, every ACKed lease present, no client with two");
    let _ = a_log;

    // The survivor is still up; stop it.
    let (b_child, _) = servers.remove(0);
    assert!(fs::read_to_string(b_log.with_extension("err")).unwrap_or_default().contains("live=b"), "b never saw a go:\n{}", tail(&b_log.with_extension("err")));
    // SAFETY: kill(2) on the timeout wrapper this test started; it passes SIGTERM on.
    unsafe { libc::kill(b_child.id() as i32, libc::SIGTERM) };
    reap(&lab, b_child, Duration::from_secs(15));
}

/// Exchanges of the restart test (`-n`), from (nearly always) distinct clients.
const RESTART_EXCHANGES: u32 = 4_000;
/// Exchanges started per second in the restart test: modest, so that what drops is the
/// outage's doing and not the load's.
const RESTART_RATE: u32 = 200;
/// Crash PostgreSQL once the capture holds this many ACKs (about the middle of the run).
const CRASH_AFTER_ACKS: usize = 1_500;
/// How long PostgreSQL stays down.
const DOWN: Duration = Duration::from_millis(2_500);

#[test]
fn postgresql_crashed_and_restarted_under_dhcp_load_no_ack_without_a_committed_lease() {
    let test = "postgresql_crashed_and_restarted_under_dhcp_load_no_ack_without_a_committed_lease";
    if !fleetboot_lab::gate::e2e_ready(test, &["ip", "ss", "timeout", "perfdhcp", "tcpdump"])
        || !fleetboot_store::testing::ready(test)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut pg = PgCluster::start(PgOptions::default()).expect("starting a private PostgreSQL");
    let mut lab = Lab::with_server_addr("10.81.0.1/16").expect("creating the lab");
    let b_ns = lab.add_client(Some("10.81.0.2/16")).expect("server b's namespace").ns;
    let client = lab.add_client(Some("10.81.0.3/16")).expect("the client namespace");
    let namespaces = [lab.server_ns().to_string(), b_ns];
    let mut servers = start_servers(&lab, dir.path(), &pg.url(), &namespaces);
    let pcap = dir.path().join("dhcp.pcap");
    let cap = start_capture(&lab, &client.ns, &pcap);

    // Full DORA from random MACs out of a million (a client seldom comes twice), no retries:
    // an exchange whose ACK is withheld counts as a REQUEST-ACK drop.
    let perf_log = dir.path().join("perfdhcp.log");
    let (n, rate) = (RESTART_EXCHANGES.to_string(), RESTART_RATE.to_string());
    let period = (RESTART_EXCHANGES / RESTART_RATE + 20).to_string();
    let perf = spawn_bg(
        &lab,
        &client.ns,
        &["perfdhcp", "-4", "-l", "eth0", "-u", "-r", &rate, "-n", &n, "-R", "1000000", "-p", &period, "-W", "2000000"],
        120,
        &perf_log,
    );

    // Crash PostgreSQL once the wire has carried CRASH_AFTER_ACKS ACKs (a count, not a
    // time): no checkpoint, connections cut; committed transactions survive in the WAL.
    wait_for_acks(&pcap, CRASH_AFTER_ACKS, &perf_log, &servers[0].1.with_extension("err"));
    let crashed_at_us = unix_us();
    pg.stop("immediate").expect("crashing PostgreSQL");
    let stopped_at_us = unix_us();
    thread::sleep(DOWN);
    let restarting_at_us = unix_us();
    pg.start_again().unwrap_or_else(|e| panic!("starting PostgreSQL again: {e}\n{}", pg.log()));
    let restarted_at_us = unix_us();

    let perf_status = reap(&lab, perf, Duration::from_secs(120));
    // SAFETY: kill(2) on the tcpdump wrapper this test started: it flushes and exits.
    unsafe { libc::kill(cap.id() as i32, libc::SIGTERM) };
    reap(&lab, cap, Duration::from_secs(20));
    let report = fs::read_to_string(&perf_log).unwrap_or_default();
    eprintln!("perfdhcp ({perf_status}):\n{report}");

    // The servers lived through it.
    for (child, log) in &mut servers {
        assert!(child.try_wait().unwrap().is_none(), "a server exited when PostgreSQL went away:\n{}", tail(&log.with_extension("err")));
    }

    // perfdhcp: no address ACKed twice; the outage did cost exchanges (their ACKs were
    // withheld, or their REQUEST answered by nobody), so the checks below had something to catch.
    let figure = |x: &str, f: &str| {
        perfdhcp_figure(&report, x, f).unwrap_or_else(|| panic!("no {f:?} for {x} in perfdhcp's report:\n{report}"))
    };
    assert_eq!(figure("REQUEST-ACK", "non unique addresses"), 0, "perfdhcp saw an address ACKed twice");
    let unanswered = figure("REQUEST-ACK", "drops");
    assert!(unanswered > 0, "no REQUEST went unanswered: the crash did not hit the exchanges");

    // The wire: one address per client, one client per address.
    let replies = replies_in_pcap(&fs::read(&pcap).unwrap());
    let acks: Vec<&Reply> = replies.iter().filter(|r| r.kind == MessageType::Ack).collect();
    let by_mac = one_address_per_client(&acks);

    // No ACK without a committed lease: every ACK on the wire, before, during and after the
    // outage, is a bound row of its client in the table that survived the crash.
    let rows = every_ack_is_a_committed_lease(&dir.path().join("a").join("fb.toml"), &by_mac);

    // Service resumed: ACKs after the restart, among them to clients the servers had never
    // answered before it (exchanges begun after the restart, not only stragglers).
    let first_reply: HashMap<[u8; 6], u64> = replies.iter().fold(HashMap::new(), |mut m, r| {
        let t = m.entry(r.mac).or_insert(r.at_us);
        *t = (*t).min(r.at_us);
        m
    });
    let after: Vec<&&Reply> = acks.iter().filter(|r| r.at_us >= restarting_at_us).collect();
    let new_clients = after.iter().filter(|r| first_reply[&r.mac] >= restarting_at_us).count();
    let during = acks.iter().filter(|r| r.at_us >= stopped_at_us && r.at_us < restarting_at_us).count();
    let before = acks.iter().filter(|r| r.at_us < crashed_at_us).count();
    let first_after = after.iter().map(|r| r.at_us).min();
    let mut times: Vec<u64> = acks.iter().map(|r| r.at_us).collect();
    times.sort_unstable();
    let longest_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let ms = |us: u64| us as f64 / 1000.0;
    eprintln!(
        "ACKs on the wire: {} to {} clients; {before} before the crash, {during} while PostgreSQL was down, {} after the restart \
         ({new_clients} to clients first answered after it); {unanswered} REQUESTs unanswered; lease table: {rows} rows, every ACKed lease in it.\n\
         PostgreSQL down {:.0} ms (stop took {:.0} ms, start {:.0} ms); crash -> first ACK after the restart: {}; \
         pg_ctl start returned -> first ACK: {}; longest gap between ACKs: {:.0} ms",
        acks.len(),
        by_mac.len(),
        after.len(),
        ms(restarting_at_us - stopped_at_us),
        ms(stopped_at_us - crashed_at_us),
        ms(restarted_at_us - restarting_at_us),
        first_after.map_or("never".into(), |t| format!("{:.0} ms", ms(t - crashed_at_us))),
        first_after.map_or("never".into(), |t| format!("{:.0} ms", (t as f64 - restarted_at_us as f64) / 1000.0)),
        ms(longest_gap),
    );
    assert!(!after.is_empty(), "no ACK after PostgreSQL came back:\n{}\n{}", tail(&servers[0].1.with_extension("err")), tail(&servers[1].1.with_extension("err")));
    assert!(new_clients > 0, "after the restart only clients answered before it were ACKed");

    for (child, _) in servers {
        // SAFETY: kill(2) on the timeout wrapper this test started; it passes SIGTERM on.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        reap(&lab, child, Duration::from_secs(15));
    }
}

/// A client's DHCP message: `kind` (option 53), broadcast flag, `options` as given.
fn client_message(kind: u8, mac: [u8; 6], xid: u32, options: &[(u8, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[..3].copy_from_slice(&[1, 1, 6]);
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[10] = 0x80;
    b[28..34].copy_from_slice(&mac);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b.extend_from_slice(&[53, 1, kind]);
    for (code, value) in options {
        b.extend_from_slice(&[*code, value.len() as u8]);
        b.extend_from_slice(value);
    }
    b.push(255);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_the_database_refuses_is_never_acked() {
    if !fleetboot_store::testing::ready("a_bind_the_database_refuses_is_never_acked") {
        return;
    }
    let pg = PgCluster::start(PgOptions::default()).expect("starting a private PostgreSQL");
    let sections = format!(
        "[[dhcp.subnet]]\nnetwork = \"127.0.0.0/8\"\nrange = [\"127.77.0.10\", \"127.77.0.250\"]\n\
         [store]\nurl = \"{}\"\nname = \"solo\"\n",
        pg.url()
    );
    let lb = loopback::Loopback::start("shared-conflict", "server", &sections).await;
    let (mac, xid) = ([0x52, 0x54, 0, 0x77, 0, 1], 0x0777_0001);
    let offer = lb.dhcp_exchange(&client_message(1, mac, xid, &[]), Duration::from_secs(20)).await.expect("an OFFER");
    let offer = DhcpMessage::parse(&offer).unwrap();
    assert_eq!(offer.message_type(), Some(MessageType::Offer));
    let (ip, server) = (offer.yiaddr, offer.server_id().unwrap());

    // Another server's client takes the address in the database, unannounced.
    let expires = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let sql = format!(
        "INSERT INTO leases (ip, mac, client_id, expires_at, hostname, state) VALUES ('{ip}', '52:54:00:99:00:01', NULL, {expires}, NULL, 'bound')"
    );
    let socket_dir = pg.socket_dir().display().to_string();
    let port = pg.port().to_string();
    let out = std::process::Command::new("psql")
        .args(["-h", &socket_dir, "-p", &port, "-U", "fleetboot", "-d", "fleetboot", "-v", "ON_ERROR_STOP=1", "-c", &sql])
        .output()
        .expect("running psql");
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));

    // The engine binds it, the database refuses: the ACK never leaves.
    let request = client_message(3, mac, xid, &[(50, &ip.octets()), (54, &server.octets())]);
    let reply = lb.dhcp_exchange(&request, Duration::from_secs(3)).await;
    let kind = reply.as_deref().and_then(|r| DhcpMessage::parse(r).ok()?.message_type());
    assert_ne!(kind, Some(MessageType::Ack), "{ip} was ACKed although the database gave it to another client");
    assert_eq!(kind, None, "nothing at all answers a REQUEST whose bind was refused");
    // The engine learned the holder: the client's retry is NAKed, and it starts over. A
    // retry that came while a slow database was still refusing the first bind is
    // answered by nothing as well; the client tries again, as a real one would.
    let mut answer = None;
    for _ in 0..4 {
        answer = lb.dhcp_exchange(&request, Duration::from_secs(5)).await;
        if answer.is_some() {
            break;
        }
    }
    let reply = answer.expect("an answer to the retries");
    assert_eq!(DhcpMessage::parse(&reply).unwrap().message_type(), Some(MessageType::Nak));
    let row = lb.server.shared().store.leases().unwrap().into_iter().find(|l| l.ip == ip).expect("the row");
    assert_eq!(row.mac, "52:54:00:99:00:01", "the other client's lease stands");
    // A fresh DISCOVER gets another address, and that one is ACKed.
    let offer = lb.dhcp_exchange(&client_message(1, mac, xid + 1, &[]), Duration::from_secs(20)).await.expect("an OFFER");
    let other = DhcpMessage::parse(&offer).unwrap().yiaddr;
    assert_ne!(other, ip);
    let request = client_message(3, mac, xid + 1, &[(50, &other.octets()), (54, &server.octets())]);
    let ack = lb.dhcp_exchange(&request, Duration::from_secs(20)).await.expect("an ACK");
    assert_eq!(DhcpMessage::parse(&ack).unwrap().message_type(), Some(MessageType::Ack));
    lb.server.shutdown().await.unwrap();
}

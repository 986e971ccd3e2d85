//! Boot negotiation end to end: 3 `fleetboot negotiate` and 2 `fleetboot files` processes, each in
//! its own namespace, clearing multicast groups with each other over a peer group; 20
//! concurrent emulated PXE clients (boot server discovery REQUEST to 4011 with option 43,
//! then PXE MTFTP) asking for 4 boot files. Checked from the servers' own records: no
//! (group, port) ever carried two files, and every client's file is byte-identical. Then
//! the primary negotiator and the primary file server are killed, and clients that start
//! afterwards still get their files, none of them sent to the dead file server. Wait
//! packets (`docs/protocols.md`): every answer that needed clearing went to a client that negotiator
//! had told to wait, and again after each conflict of that clearing.
//!
//! Every process shares one negotiation key (`peer_key_file`); a separate test has two
//! attacker namespaces without it — an unconfigured host and a configured peer's address —
//! send spoofed DELETE/PREPARE/Announce/NAK and checks that nothing changed and that every
//! one was counted.
//!
//! The same again on one host: the five servers share one namespace and one interface,
//! each on an address of its own leased from a `fleetboot-addr` static range (held by this
//! test, ARP-probed, installed over netlink) and bound to it (`server.bind_to_address`),
//! talking to each other and to the clients as separate machines would. The interface is
//! bare again once the addresses are let go.

mod mcast_common;

use fleetboot_lab::gate::e2e_ready;
use fleetboot_lab::netns::Lab;
use mcast_common::*;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use fleetboot_lab::netns::in_namespace;

const FILES: [&str; 4] = [
    "bios/pxelinux.0",
    "uefi/grubx64.efi",
    "arm64/grub.efi",
    "kiosk/ipxe.efi",
];
const NEGS: [&str; 3] = ["10.77.0.11", "10.77.0.12", "10.77.0.13"];
const FSS: [&str; 2] = ["10.77.0.21", "10.77.0.22"];

/// The key every negotiator and file server of a test shares (64 hex digits, 0600).
fn write_key(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("negotiate.key");
    let key: String = random_bytes(99, 32).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Where the five servers run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hosts {
    /// A namespace each, addresses [`NEGS`] and [`FSS`].
    OneEach,
    /// One namespace, one interface, five addresses from an address pool.
    Shared,
}

fn base(addr: &str, root: &std::path::Path, hosts: Hosts) -> String {
    format!(
        "[server]\naddress = \"{addr}\"\ninterface = \"eth0\"\nroot = \"{}\"\nbind_to_address = {}\n[dhcp]\nmode = \"off\"\n",
        root.display(),
        hosts == Hosts::Shared
    )
}

/// Addresses leased from a `fleetboot-addr` static range on `eth0` of `ns`, held by a
/// thread of this test (in that namespace) until dropped; then released and removed.
struct HeldAddresses {
    ips: Vec<Ipv4Addr>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl HeldAddresses {
    fn lease(ns: &str, first: Ipv4Addr, count: u8) -> HeldAddresses {
        let (ips_tx, ips_rx) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel::<()>();
        let last = Ipv4Addr::from(u32::from(first) + u32::from(count) - 1);
        let thread = in_namespace(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut cfg = fleetboot_addr::PoolConfig::static_range("eth0", first, last, 24);
                cfg.dad = Some(fleetboot_addr::DadConfig::quick());
                let pool = fleetboot_addr::AddrPool::start(cfg).expect("an address pool on eth0");
                let mut held = Vec::new();
                for _ in 0..count {
                    held.push(pool.lease().await.expect("an address of the range"));
                }
                let _ = ips_tx.send(held.iter().map(|a| a.ip()).collect::<Vec<_>>());
                // Held (their kernel lifetimes refreshed by the pool) until told.
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                drop(held);
                pool.idle().await;
                pool.installed().map(|a| a.len()).unwrap_or(usize::MAX)
            })
        });
        let ips = ips_rx.recv_timeout(Duration::from_secs(30)).expect("the addresses were leased");
        HeldAddresses { ips, stop: Some(stop), thread: Some(thread) }
    }

    /// Lets every address go; returns how many addresses are left on the interface.
    fn release(mut self) -> usize {
        drop(self.stop.take());
        self.thread.take().unwrap().join().expect("the address holder")
    }
}

impl Drop for HeldAddresses {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

/// Waits until `ss` in `ns` shows UDP `ip:port` bound (several servers share the port);
/// `ss` writes a socket bound to an interface too as `ip%interface:port`.
fn wait_bound(lab: &Lab, ns: &str, ip: &str, port: u16) {
    let want = format!("{ip}:{port}");
    let bound = |w: &str| w == want || (w.starts_with(&format!("{ip}%")) && w.ends_with(&format!(":{port}")));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = lab.exec(ns, &["ss", "-Hnlu"], Duration::from_secs(10)).expect("ss");
        if String::from_utf8_lossy(&out.stdout).split_whitespace().any(bound) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing bound to {want} in {ns}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (group:port) -> the files any party's records say it carried.
fn slot_files(recs: &[serde_json::Value]) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut m: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for r in recs {
        let ev = r["event"].as_str().unwrap_or("");
        if !matches!(ev, "activated" | "answered" | "configured") || r["scheme"] == "rfc2090" {
            continue;
        }
        let slot = format!("{}:{}", r["group"].as_str().unwrap(), r["port"]);
        let who = format!(
            "{} {} {ev}",
            r["role"].as_str().unwrap(),
            r["server"].as_str().unwrap()
        );
        m.entry(slot)
            .or_default()
            .entry(r["file"].as_str().unwrap().to_string())
            .or_default()
            .push(who);
    }
    m
}

/// Wait packets, from the negotiators' records. An answer recorded `cleared` (one of the
/// waiters of the assignment that just activated) needed clearing, and by protocol its
/// client was sent a wait packet when it joined the clearing (`wait` record, same negotiator,
/// client and file, no later than the answer) and another for every `conflict` of that file
/// at that negotiator while it waited. Returns (cleared answers, conflicts they waited
/// through).
fn check_waits(all: &[serde_json::Value], wait_ms: u64, phase: &str) -> (usize, usize) {
    let ts = |r: &serde_json::Value| r["ts_ms"].as_u64().unwrap();
    fn of<'a>(
        all: &'a [serde_json::Value],
        ev: &'static str,
    ) -> impl Iterator<Item = &'a serde_json::Value> {
        all.iter().filter(move |r| r["event"] == ev)
    }
    for w in of(all, "wait") {
        assert_eq!(w["wait_ms"], wait_ms, "{phase}: {w}");
    }
    let (mut cleared, mut conflicts) = (0, 0);
    for a in of(all, "answered").filter(|a| a["cleared"] == true) {
        cleared += 1;
        let (server, client, file) = (&a["server"], &a["client"], &a["file"]);
        // This request's waits: after this client's previous answer from this negotiator.
        let since = of(all, "answered")
            .filter(|b| b["server"] == *server && b["client"] == *client && ts(b) < ts(a))
            .map(ts)
            .max()
            .unwrap_or(0);
        let waits: Vec<u64> = of(all, "wait")
            .filter(|w| w["server"] == *server && w["client"] == *client && w["file"] == *file)
            .map(ts)
            .filter(|&t| t >= since && t <= ts(a))
            .collect();
        let first = *waits.iter().min().unwrap_or_else(|| {
            panic!("{phase}: {client} was answered after clearing ({a}) but got no wait packet")
        });
        let during = of(all, "conflict")
            .filter(|c| c["server"] == *server && c["file"] == *file)
            .filter(|c| ts(c) > first && ts(c) <= ts(a))
            .count();
        let again = waits.iter().filter(|&&t| t > first).count();
        assert!(
            again >= during,
            "{phase}: {client} waited through {during} conflicts for {file} at {server} but got \
             {again} more wait packets ({waits:?})"
        );
        conflicts += during;
    }
    (cleared, conflicts)
}

fn run_clients(
    clients: &[fleetboot_lab::netns::ClientNs],
    first: usize,
    n: usize,
    order: &[Ipv4Addr],
) -> Vec<(usize, Result<Fetched, String>)> {
    let handles: Vec<_> = (first..first + n)
        .map(|i| {
            let c = &clients[i % clients.len()];
            let me: Ipv4Addr = c
                .addr
                .as_deref()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let mut negs = order.to_vec();
            let k = i % negs.len();
            negs.rotate_left(k);
            let mac = [0x52, 0x54, 0x00, 0x60, (i >> 8) as u8, i as u8];
            let h = in_namespace(&c.ns, move || {
                pxe_client(
                    me,
                    mac,
                    &negs,
                    0x8000 + (i % 4) as u16,
                    Duration::from_secs(90),
                )
            });
            (i, h)
        })
        .collect();
    handles
        .into_iter()
        .map(|(i, h)| (i, h.join().expect("client thread")))
        .collect()
}

/// Peers over a multicast group (negotiators and file servers join it).
#[test]
fn three_negotiators_two_file_servers_twenty_clients_and_failover() {
    if !e2e_ready(
        "three_negotiators_two_file_servers_twenty_clients_and_failover",
        &["timeout"],
    ) {
        return;
    }
    run(false, Hosts::OneEach);
}

/// The same with a peer list instead of a group (queries unicast to every negotiator and
/// file server).
#[test]
fn peer_list_instead_of_a_group_with_failover() {
    if !e2e_ready("peer_list_instead_of_a_group_with_failover", &["timeout"]) {
        return;
    }
    run(true, Hosts::OneEach);
}

/// Three negotiators and two file servers on one host (one namespace, one interface, five
/// addresses from an address pool), peers over a multicast group: the same checks.
#[test]
fn five_servers_on_one_host_each_on_its_own_address() {
    if !e2e_ready("five_servers_on_one_host_each_on_its_own_address", &["timeout", "ss"]) {
        return;
    }
    run(false, Hosts::Shared);
}

/// The same five on one host with a peer list.
#[test]
fn five_servers_on_one_host_with_a_peer_list() {
    if !e2e_ready("five_servers_on_one_host_with_a_peer_list", &["timeout", "ss"]) {
        return;
    }
    run(true, Hosts::Shared);
}

fn run(peer_list: bool, hosts: Hosts) {
    let dir = work_dir(match (peer_list, hosts) {
        (true, Hosts::OneEach) => "negotiators-list-e2e",
        (false, Hosts::OneEach) => "negotiators-e2e",
        (true, Hosts::Shared) => "negotiators-host-list-e2e",
        (false, Hosts::Shared) => "negotiators-host-e2e",
    });
    let mut lab = Lab::new().unwrap();
    // The servers' namespaces and addresses.
    let (neg_ns, fs_ns, negs, fss, held) = match hosts {
        Hosts::OneEach => {
            let mut ns = |a: &str| lab.add_client(Some(&format!("{a}/24"))).unwrap().ns;
            let neg_ns: Vec<String> = NEGS.iter().map(|a| ns(a)).collect();
            let fs_ns: Vec<String> = FSS.iter().map(|a| ns(a)).collect();
            let own = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            (neg_ns, fs_ns, own(&NEGS), own(&FSS), None)
        }
        Hosts::Shared => {
            let host = lab.add_client(None).unwrap().ns;
            let held = HeldAddresses::lease(&host, Ipv4Addr::new(10, 77, 0, 11), 5);
            let ips: Vec<String> = held.ips.iter().map(|a| a.to_string()).collect();
            (vec![host.clone(); 3], vec![host; 2], ips[..3].to_vec(), ips[3..].to_vec(), Some(held))
        }
    };
    let (fs_peers, neg_peers) = if peer_list {
        let all: Vec<&String> = negs.iter().chain(fss.iter()).collect();
        (String::new(), format!("peers = {all:?}\n"))
    } else {
        let g = "peer_group = \"239.255.77.1\"\n".to_string();
        (g.clone(), g)
    };
    let root = dir.join("root");
    let key = write_key(&dir);
    let data: Vec<Vec<u8>> = FILES
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let d = random_bytes(7 + i as u64, 200_000 + 77_777 * i);
            std::fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
            std::fs::write(root.join(f), &d).unwrap();
            d
        })
        .collect();
    let clients: Vec<_> = (0..4)
        .map(|i| {
            lab.add_client(Some(&format!("10.77.0.{}/24", 101 + i)))
                .unwrap()
        })
        .collect();

    let rec = |name: &str| dir.join(format!("{name}.jsonl"));
    let mut rec_files: Vec<PathBuf> = Vec::new();
    let mut fs_pids = Vec::new();
    for (i, a) in fss.iter().enumerate() {
        let cfg = dir.join(format!("fs{i}.toml"));
        let r = rec(&format!("fs{i}"));
        std::fs::write(
            &cfg,
            format!(
                "{}[files]\n{fs_peers}registration_ttl_secs = 20\nrecords = \"{}\"\npeer_key_file = \"{}\"\n",
                base(a, &root, hosts),
                r.display(),
                key.display()
            ),
        )
        .unwrap();
        fs_pids.push(spawn_fleetboot(
            &mut lab,
            &fs_ns[i],
            "files",
            &cfg,
            &dir.join(format!("fs{i}.log")),
            240,
        ));
        rec_files.push(r);
    }
    let mut neg_pids = Vec::new();
    for (i, a) in negs.iter().enumerate() {
        let cfg = dir.join(format!("neg{i}.toml"));
        let r = rec(&format!("neg{i}"));
        std::fs::write(
            &cfg,
            format!(
                "{}[negotiate]\nboot_files = {:?}\nfile_servers = [\"{}\", \"{}\"]\ngroups = [\"239.255.1.1\", \"239.255.1.16\"]\n\
                 {neg_peers}wait_period_ms = 500\nmtftp_timeout = 1\nmtftp_delay = 1\nrecords = \"{}\"\npeer_key_file = \"{}\"\n",
                base(a, &root, hosts),
                FILES,
                fss[0],
                fss[1],
                r.display(),
                key.display()
            ),
        )
        .unwrap();
        neg_pids.push(spawn_fleetboot(
            &mut lab,
            &neg_ns[i],
            "negotiate",
            &cfg,
            &dir.join(format!("neg{i}.log")),
            240,
        ));
        rec_files.push(r);
    }
    for (ns, a) in fs_ns.iter().zip(&fss) {
        match hosts {
            Hosts::OneEach => wait_udp(&lab, ns, 4013),
            Hosts::Shared => wait_bound(&lab, ns, a, 4013),
        }
    }
    for (ns, a) in neg_ns.iter().zip(&negs) {
        match hosts {
            Hosts::OneEach => wait_udp(&lab, ns, 4011),
            Hosts::Shared => wait_bound(&lab, ns, a, 4011),
        }
    }
    let order: Vec<Ipv4Addr> = negs.iter().map(|a| a.parse().unwrap()).collect();
    let logs = || {
        let mut s = String::new();
        for n in ["fs0", "fs1", "neg0", "neg1", "neg2"] {
            let l = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
            let tail: Vec<&str> = l.lines().rev().take(15).collect();
            s += &format!(
                "--- {n}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        s
    };
    let check = |results: &[(usize, Result<Fetched, String>)], phase: &str| {
        for (i, r) in results {
            let f = r
                .as_ref()
                .unwrap_or_else(|e| panic!("{phase}: client {i}: {e}\n{}", logs()));
            let want = i % 4;
            assert_eq!(
                f.file, FILES[want],
                "{phase}: client {i} was told another file"
            );
            assert!(
                f.bytes == data[want],
                "{phase}: client {i}: {} bytes of {}, not identical",
                f.bytes.len(),
                f.file
            );
        }
    };
    let invariant = |phase: &str| {
        let all: Vec<serde_json::Value> = rec_files.iter().flat_map(|p| records(p)).collect();
        let slots = slot_files(&all);
        for (slot, files) in &slots {
            assert_eq!(
                files.len(),
                1,
                "{phase}: {slot} carried {} files: {files:?}",
                files.len()
            );
        }
        (all, slots)
    };

    // Phase 1: 20 concurrent clients, 4 files.
    let first = run_clients(&clients, 0, 20, &order);
    check(&first, "phase 1");
    let (all, slots) = invariant("phase 1");
    // Every client was answered by a negotiator that recorded that (slot, file) for its MAC.
    for (i, r) in &first {
        let f = r.as_ref().unwrap();
        let mac = f
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert!(
            all.iter().any(|r| r["event"] == "answered"
                && r["client"] == mac.as_str()
                && r["group"] == f.group.ip().to_string().as_str()
                && r["port"] == f.group.port()
                && r["file"] == f.file.as_str()),
            "client {i} ({mac}): no negotiator record of its answer {f:?}"
        );
    }
    // Wait packets: each file's first request needed clearing, so at least one cleared
    // answer per file; each of them went to a client told to wait (and again per conflict).
    let (cleared, conflicts) = check_waits(&all, 500, "phase 1");
    assert!(
        cleared >= FILES.len(),
        "phase 1: {cleared} answers after clearing, for {} files",
        FILES.len()
    );
    // The clients saw them: a client answered after clearing received a wait packet first.
    for (i, r) in &first {
        let f = r.as_ref().unwrap();
        let mac = f
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let was_cleared = all.iter().any(|r| {
            r["event"] == "answered"
                && r["cleared"] == true
                && r["client"] == mac.as_str()
                && r["server"] == f.negotiator.to_string().as_str()
        });
        if was_cleared {
            assert!(
                f.waits >= 1,
                "client {i} ({mac}) was answered after clearing without receiving a wait packet"
            );
        }
    }
    let client_waits: u32 = first.iter().map(|(_, r)| r.as_ref().unwrap().waits).sum();
    let starts = |results: &[(usize, Result<Fetched, String>)]| {
        let mut n: BTreeMap<String, usize> = BTreeMap::new();
        for (_, r) in results {
            let s = format!("{:?}", r.as_ref().unwrap().start);
            *n.entry(s).or_default() += 1;
        }
        n
    };
    eprintln!(
        "phase 1: {cleared} answers after clearing ({conflicts} conflicts waited through); \
         clients received {client_waits} wait packets; transfers {:?}",
        starts(&first)
    );
    let answered_by: std::collections::BTreeSet<String> = all
        .iter()
        .filter(|r| r["event"] == "answered")
        .map(|r| r["server"].as_str().unwrap().to_string())
        .collect();
    eprintln!(
        "phase 1: slots {:?}; answered by {answered_by:?}",
        slots
            .iter()
            .map(|(k, v)| (k, v.keys().collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    );
    assert!(
        answered_by.len() >= 2,
        "clients were spread over the negotiators: {answered_by:?}"
    );

    // Phase 2: kill the primary negotiator and the primary file server; new clients.
    lab.stop(neg_pids[0], Duration::from_secs(2));
    lab.stop(fs_pids[0], Duration::from_secs(2));
    let killed_at = fleetboot_ms();
    // Past the negotiators' confirm_within (1 s): an assignment on the dead file server is
    // now unconfirmed, so no client may be sent there any more.
    std::thread::sleep(Duration::from_millis(1500));
    let second = run_clients(&clients, 20, 8, &order);
    check(&second, "phase 2 (after failover)");
    let (all, slots) = invariant("phase 2");
    check_waits(&all, 500, "phase 2");
    for (i, r) in &second {
        let f = r.as_ref().unwrap();
        assert_eq!(
            f.file_server.ip().to_string(),
            fss[1],
            "client {i} after the kill was sent to the dead file server"
        );
        assert_ne!(
            f.negotiator.to_string(),
            negs[0],
            "client {i} answered by the killed negotiator"
        );
    }
    let after: Vec<_> = all
        .iter()
        .filter(|r| r["event"] == "answered" && r["ts_ms"].as_u64() > Some(killed_at))
        .collect();
    assert!(after.len() >= 8, "answers after the kill: {after:?}");
    let stale = after.iter().filter(|r| r["file_server"] == fss[0].as_str()).count();
    assert_eq!(
        stale, 0,
        "answers after the kill that sent a client to the dead file server: {after:?}"
    );
    eprintln!(
        "phase 2: slots over the run {:?}; {} answers after the kill, none to the dead file server",
        slots.iter().map(|(k, v)| (k, v.keys().collect::<Vec<_>>())).collect::<Vec<_>>(),
        after.len()
    );
    lab.stop_all(Duration::from_secs(2));
    if let Some(held) = held {
        let host = neg_ns[0].clone();
        assert_eq!(held.release(), 0, "addresses the pool still lists on the servers' interface");
        let out = lab.exec(&host, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"], Duration::from_secs(10)).unwrap();
        let left = String::from_utf8_lossy(&out.stdout);
        assert!(!left.contains("inet "), "addresses left on the servers' interface: {left}");
        eprintln!("five servers on one host: addresses {negs:?} (negotiators) and {fss:?} (file servers), all removed afterwards");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn fleetboot_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The local port of the negotiator's file-server socket (bound to its address, port
/// chosen by the kernel), from `ss` in its namespace.
fn file_server_socket_port(lab: &Lab, ns: &str, addr: &str) -> u16 {
    let out = lab.cmd(ns, "ss").args(["-Huan"]).output().expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.strip_prefix(&format!("{addr}:")))
        .filter_map(|p| p.parse::<u16>().ok())
        .find(|p| ![4011, 4012].contains(p))
        .unwrap_or_else(|| panic!("no file-server socket of {addr} in:\n{text}"))
}

/// The latest `refused` record's total in a records file.
fn refused_total(path: &std::path::Path) -> u64 {
    records(path).iter().filter(|r| r["event"] == "refused").filter_map(|r| r["total"].as_u64()).max().unwrap_or(0)
}

/// Two negotiators and a file server sharing a key, peers listed (10.77.0.13 is a
/// configured peer that is not running: an attacker holds its address). After a client has
/// its file, an unconfigured host (10.77.0.66) and the configured address send DELETE of the
/// live slot, PREPAREs claiming every slot and one with a unicast "group", Announces of the
/// live slot for another file, and NAKs to the negotiator's file-server socket — unsigned
/// and signed with another key. Nothing changes (no release, no new group, the next client
/// gets the same slot and identical bytes) and every datagram is counted as refused.
#[test]
fn spoofed_delete_prepare_announce_and_nak_are_ignored_and_counted() {
    if !e2e_ready("spoofed_delete_prepare_announce_and_nak_are_ignored_and_counted", &["timeout", "ss"]) {
        return;
    }
    use fleetboot_negotiate::{ConflictOp, ConflictPacket, FsMessage, FsOp, NakReason, PeerAuth, PeerKey, Slot};
    let dir = work_dir("negotiators-spoof-e2e");
    let root = dir.join("root");
    let key = write_key(&dir);
    let file = FILES[0];
    let data = random_bytes(5, 150_000);
    std::fs::create_dir_all(root.join(file).parent().unwrap()).unwrap();
    std::fs::write(root.join(file), &data).unwrap();
    let (negs, fs, absent_peer, outsider) = (["10.77.0.11", "10.77.0.12"], "10.77.0.21", "10.77.0.13", "10.77.0.66");
    let mut lab = Lab::new().unwrap();
    let neg_ns: Vec<_> = negs.iter().map(|a| lab.add_client(Some(&format!("{a}/24"))).unwrap()).collect();
    let fs_ns = lab.add_client(Some(&format!("{fs}/24"))).unwrap();
    let eve_in = lab.add_client(Some(&format!("{absent_peer}/24"))).unwrap();
    let eve_out = lab.add_client(Some(&format!("{outsider}/24"))).unwrap();
    let client = lab.add_client(Some("10.77.0.101/24")).unwrap();
    let peers = format!("peers = [\"{}\", \"{}\", \"{absent_peer}\", \"{fs}\"]\n", negs[0], negs[1]);
    let fs_rec = dir.join("fs.jsonl");
    let fs_cfg = dir.join("fs.toml");
    std::fs::write(
        &fs_cfg,
        format!("{}[files]\nrecords = \"{}\"\npeer_key_file = \"{}\"\n", base(fs, &root, Hosts::OneEach), fs_rec.display(), key.display()),
    )
    .unwrap();
    spawn_fleetboot(&mut lab, &fs_ns.ns, "files", &fs_cfg, &dir.join("fs.log"), 120);
    let neg_rec: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("neg{i}.jsonl"))).collect();
    for (i, a) in negs.iter().enumerate() {
        let cfg = dir.join(format!("neg{i}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "{}[negotiate]\nboot_files = [\"{file}\"]\nfile_servers = [\"{fs}\"]\ngroups = [\"239.255.1.1\", \"239.255.1.4\"]\n\
                 {peers}wait_period_ms = 300\nmtftp_timeout = 1\nmtftp_delay = 1\nrecords = \"{}\"\npeer_key_file = \"{}\"\n",
                base(a, &root, Hosts::OneEach),
                neg_rec[i].display(),
                key.display()
            ),
        )
        .unwrap();
        spawn_fleetboot(&mut lab, &neg_ns[i].ns, "negotiate", &cfg, &dir.join(format!("neg{i}.log")), 120);
    }
    wait_udp(&lab, &fs_ns.ns, 4013);
    for ns in &neg_ns {
        wait_udp(&lab, &ns.ns, 4011);
    }
    let neg0: Ipv4Addr = negs[0].parse().unwrap();
    let fetch = |last: u8| {
        let mac = [0x52, 0x54, 0x00, 0x61, 0x00, last];
        in_namespace(&client.ns, move || pxe_client(Ipv4Addr::new(10, 77, 0, 101), mac, &[neg0], 0x8000, Duration::from_secs(60)))
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client {last}: {e}"))
    };
    let first = fetch(1);
    assert!(first.bytes == data, "the first client's file");
    let slot = Slot { group: *first.group.ip(), port: first.group.port() };
    let nak_port = file_server_socket_port(&lab, &neg_ns[0].ns, negs[0]);

    // What the attackers send, each datagram both unsigned and signed with a wrong key
    // (claiming to be negotiator 0 or the file server).
    let wrong = PeerKey::from_bytes([0x42; 32]).unwrap();
    let fs_msg = |op, xid, group: Ipv4Addr, reason| {
        FsMessage { op, xid, slot: Slot { group, port: slot.port }, server_port: 1759, reason, boot_file: file.into() }.encode().unwrap()
    };
    let announce = ConflictPacket {
        op: ConflictOp::Announce,
        file_server: fs.parse().unwrap(),
        negotiator_type: 0x8000,
        layer: 0,
        group: slot.group,
        port: slot.port,
        boot_file: "evil.efi".into(),
    }
    .encode()
    .unwrap();
    let fs_ctl = SocketAddrV4::new(fs.parse().unwrap(), 4013);
    let mut plan: Vec<(SocketAddrV4, Vec<u8>, Ipv4Addr)> = Vec::new();
    plan.push((fs_ctl, fs_msg(FsOp::Delete, 1, slot.group, None), neg0));
    plan.push((fs_ctl, fs_msg(FsOp::Prepare, 2, outsider.parse().unwrap(), None), neg0));
    for g in 1..=4u8 {
        plan.push((fs_ctl, fs_msg(FsOp::Prepare, 10 + g as u32, Ipv4Addr::new(239, 255, 1, g), None), neg0));
    }
    for a in negs {
        plan.push((SocketAddrV4::new(a.parse().unwrap(), 4012), announce.clone(), neg0));
    }
    plan.push((SocketAddrV4::new(neg0, nak_port), fs_msg(FsOp::Nak, 3, slot.group, Some(NakReason::Busy)), fs.parse().unwrap()));
    let to_fs = plan.iter().filter(|(to, ..)| *to == fs_ctl).count() as u64;
    let to_neg0 = plan.iter().filter(|(to, ..)| *to.ip() == neg0).count() as u64;
    let attack = |ns: &str, plan: Vec<(SocketAddrV4, Vec<u8>, Ipv4Addr)>, wrong: PeerKey| {
        in_namespace(ns, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let now = std::time::Instant::now();
            let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
            for (to, bytes, claims) in plan {
                sock.send_to(&bytes, to).unwrap();
                let mut forger = PeerAuth::new(wrong.clone(), claims, now, unix);
                sock.send_to(&forger.seal(now, bytes), to).unwrap();
            }
        })
        .join()
        .unwrap()
    };
    attack(&eve_out.ns, plan.clone(), wrong.clone());
    attack(&eve_in.ns, plan, wrong);
    // Every one of them counted: 2 forms × 2 attackers. The totals are recorded at most
    // once a second, so unsigned probes keep coming (and are counted too) until they show.
    let (want_fs, want_neg) = (to_fs * 4, to_neg0 * 4);
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while refused_total(&fs_rec) < want_fs || refused_total(&neg_rec[0]) < want_neg {
        assert!(
            std::time::Instant::now() < end,
            "refusals recorded: file server {} of {want_fs}, negotiator {} of {want_neg}",
            refused_total(&fs_rec),
            refused_total(&neg_rec[0])
        );
        let probe = vec![(fs_ctl, fs_msg(FsOp::Delete, 9, slot.group, None), neg0), (SocketAddrV4::new(neg0, 4012), announce.clone(), neg0)];
        in_namespace(&eve_out.ns, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            for (to, b, _) in probe {
                sock.send_to(&b, to).unwrap();
            }
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
    }
    let counts = |p: &std::path::Path| records(p).into_iter().rfind(|r| r["event"] == "refused").unwrap()["counts"].clone();
    let (fs_counts, neg_counts) = (counts(&fs_rec), counts(&neg_rec[0]));
    // The configured address without the key is refused for its tag or its missing trailer;
    // the outsider is refused before its tag is even checked where a peer list applies.
    assert!(fs_counts["bad_tag"].as_u64().unwrap() >= 2 * to_fs, "{fs_counts}");
    assert!(neg_counts["unknown_peer"].as_u64().unwrap() >= to_neg0, "{neg_counts}");
    assert!(neg_counts["bad_tag"].as_u64().unwrap() >= to_neg0, "{neg_counts}");

    // Nothing changed: no release, no conflict, no group configured but the live one.
    for p in neg_rec.iter().chain([&fs_rec]) {
        let bad: Vec<_> = records(p).into_iter().filter(|r| r["event"] == "released" || r["event"] == "conflict").collect();
        assert!(bad.is_empty(), "{}: {bad:?}", p.display());
    }
    let configured: Vec<_> = records(&fs_rec).into_iter().filter(|r| r["event"] == "configured").collect();
    assert_eq!(configured.len(), 1, "{configured:?}");
    assert_eq!(configured[0]["group"], slot.group.to_string().as_str());
    // The next client is sent to the same live slot and gets identical bytes.
    let second = fetch(2);
    assert_eq!(second.group, first.group);
    assert!(second.bytes == data, "the second client's file");
    let log = std::fs::read_to_string(dir.join("fs.log")).unwrap_or_default();
    assert!(log.contains("did not authenticate"), "the file server logged the refusals:\n{log}");
    lab.stop_all(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&dir);
}

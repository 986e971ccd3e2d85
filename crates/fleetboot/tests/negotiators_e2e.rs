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
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const FILES: [&str; 4] = [
    "bios/pxelinux.0",
    "uefi/grubx64.efi",
    "arm64/grub.efi",
    "kiosk/ipxe.efi",
];
const NEGS: [&str; 3] = ["10.77.0.11", "10.77.0.12", "10.77.0.13"];
const FSS: [&str; 2] = ["10.77.0.21", "10.77.0.22"];

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
        let thread = in_ns(ns, move || {
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
            let h = in_ns(&c.ns, move || {
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
                "{}[files]\n{fs_peers}registration_ttl_secs = 20\nrecords = \"{}\"\n",
                base(a, &root, hosts),
                r.display()
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
                 {neg_peers}wait_period_ms = 500\nmtftp_timeout = 1\nmtftp_delay = 1\nrecords = \"{}\"\n",
                base(a, &root, hosts),
                FILES,
                fss[0],
                fss[1],
                r.display()
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

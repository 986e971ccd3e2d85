//! Deterministic simulation of conflict clearing and the negotiator <-> file server protocol:
//! three negotiators and two file servers over `fleetboot_testkit`'s in-memory network,
//! which loses, duplicates and delays datagrams, with simultaneous queries, a negotiator and
//! a file server that die, and clients that re-ask another negotiator when theirs goes
//! quiet. Seeded, simulated time. The invariant, checked after every step from every live
//! party's own records: no (group, port) slot carries two different files.
//!
//! `FLEETBOOT_SIM_SEED=N` replays seed N in every scenario (and nothing else);
//! `FLEETBOOT_SIM_TRACE=1` prints each negotiator's events.

use fleetboot_negotiate::{Assignment, Event, FileRegistry, Negotiator, NegotiatorConfig, Slot};
use fleetboot_testkit::{LinkConfig, Network, Node, Rng, Sim, SimClock, Transmit};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::time::{Duration, Instant};

const PEER_PORT: u16 = 4012;
const FS_PORT: u16 = 4013;
/// The negotiators' file-server socket.
const NEG_FS_PORT: u16 = 4113;
const FILES: [&str; 4] = ["bios/pxelinux.0", "uefi/grubx64.efi", "arm64/grub.efi", "kiosk/ipxe.efi"];

fn neg_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 1 + i as u8)
}
fn fs_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 1 + i as u8)
}

/// The seeds a scenario runs: its range, or only `FLEETBOOT_SIM_SEED` when that is set
/// (whether or not the range holds it). A value that is not a seed is an error, never a
/// reason to run nothing.
fn seeds(range: Range<u64>) -> (Vec<u64>, bool) {
    match std::env::var("FLEETBOOT_SIM_SEED") {
        Ok(v) => {
            let seed = v.trim().parse().unwrap_or_else(|_| panic!("FLEETBOOT_SIM_SEED={v:?} is not a seed (a u64)"));
            eprintln!("FLEETBOOT_SIM_SEED: replaying seed {seed} only (this scenario's own seeds are {range:?}); checks over the whole range are skipped");
            (vec![seed], false)
        }
        Err(_) => (range.collect(), true),
    }
}

/// A negotiator behind its two sockets (peer port, file-server socket).
struct NegHost {
    i: usize,
    n: Negotiator,
    dead: bool,
    /// Events not yet read by the driver.
    events: Vec<Event>,
    trace: bool,
}

impl NegHost {
    fn collect(&mut self, now: Instant) {
        while let Some(e) = self.n.poll_event() {
            if self.trace {
                eprintln!("{now:?} neg{} {e:?}", self.i);
            }
            self.events.push(e);
        }
    }
}

/// A file server's registry, behind its control and peer ports.
struct FsHost {
    reg: FileRegistry,
    dead: bool,
    /// Answer conflict queries for the slots it carries.
    answers_queries: bool,
    /// The port the datagram being answered came to (replies leave from it).
    last_port: u16,
}

#[allow(clippy::large_enum_variant)] // five hosts per simulation
enum Host {
    Neg(NegHost),
    Fs(FsHost),
}

impl Node for Host {
    fn handle(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        match self {
            Host::Neg(h) if !h.dead => {
                if to.port() == PEER_PORT {
                    h.n.handle_peer(now, from, bytes);
                } else {
                    h.n.handle_file_server(now, from, bytes);
                }
                h.collect(now);
            }
            Host::Fs(f) if !f.dead => {
                f.last_port = to.port();
                match to.port() {
                    PEER_PORT if f.answers_queries => {
                        f.reg.handle_peer(now, from, bytes);
                    }
                    PEER_PORT => {}
                    _ => f.reg.handle(now, from, bytes),
                }
            }
            _ => {}
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Host::Neg(h) if !h.dead => {
                h.n.handle_timeout(now);
                h.collect(now);
            }
            Host::Fs(f) if !f.dead => f.reg.handle_timeout(now),
            _ => {}
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Host::Neg(h) if !h.dead => h.n.poll_timeout(),
            Host::Fs(f) if !f.dead => f.reg.poll_timeout(),
            _ => None,
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
        match self {
            Host::Neg(h) if !h.dead => {
                let t = h.n.poll_transmit(now, buf)?;
                let port = if h.n.is_file_server(t.destination) { NEG_FS_PORT } else { PEER_PORT };
                Some((SocketAddr::from((neg_ip(h.i), port)), t))
            }
            Host::Fs(f) if !f.dead => {
                let t = f.reg.poll_transmit(now, buf)?;
                Some((SocketAddr::from((f.reg.address, f.last_port)), t))
            }
            _ => None,
        }
    }
}

struct Client {
    file: &'static str,
    asked: usize,
    tries: u32,
    done: Option<Assignment>,
}

#[derive(Default, Debug)]
struct Stats {
    datagrams: u64,
    conflicts: u64,
    waits: u64,
    failed: u64,
    ready: u64,
}

struct Scenario {
    clients: usize,
    slots: usize,
    /// Per mille lost and duplicated, and the most a datagram is late.
    loss: u32,
    dup: u32,
    max_delay_ms: u64,
    kill_primary_at: Option<u64>,
    fs_answer: bool,
    query_tries: u32,
    /// Every party signs and checks with one shared key.
    keyed: bool,
}

fn auth(me: Ipv4Addr, now: Instant) -> fleetboot_negotiate::PeerAuth {
    let key = fleetboot_negotiate::PeerKey::from_bytes([0x5a; 32]).unwrap();
    fleetboot_negotiate::PeerAuth::new(key, me, now, 1_800_000_000_000_000)
}

fn new_sim(seed: u64, s: &Scenario) -> Sim<Host> {
    let link = LinkConfig {
        loss_ppm: s.loss * 1000,
        duplicate_ppm: s.dup * 1000,
        delay: Duration::from_micros(200),
        jitter: Duration::from_millis(s.max_delay_ms),
        ..LinkConfig::PERFECT
    };
    let mut sim = Sim::new(SimClock::new(), Network::new(Rng::new(seed), link));
    let pool: Vec<Slot> = (0..s.slots).map(|i| Slot { group: Ipv4Addr::new(239, 192, 0, 1 + i as u8), port: 1758 }).collect();
    let fs_addr = |i: usize| SocketAddrV4::new(fs_ip(i), FS_PORT);
    let peers: Vec<SocketAddrV4> =
        (0..3).map(neg_ip).chain((0..2).map(fs_ip)).map(|ip| SocketAddrV4::new(ip, PEER_PORT)).collect();
    let trace = std::env::var("FLEETBOOT_SIM_TRACE").is_ok();
    for i in 0..3 {
        // Different primaries: the same file may come from two file servers.
        let servers = if i == 1 { vec![fs_addr(1), fs_addr(0)] } else { vec![fs_addr(0), fs_addr(1)] };
        let mut c = NegotiatorConfig::new(neg_ip(i), pool.clone(), 1759, servers, peers.clone());
        c.used_ttl = Duration::from_secs(20);
        c.hold = Duration::from_secs(15);
        c.query_tries = s.query_tries;
        if s.keyed {
            c.auth = Some(auth(neg_ip(i), sim.now()));
        }
        let host = NegHost { i, n: Negotiator::new(c), dead: false, events: Vec::new(), trace };
        sim.add(Host::Neg(host), &[IpAddr::V4(neg_ip(i))]);
    }
    for i in 0..2 {
        // The primary file server lacks one file: NAK "no such file" sends that one to the
        // secondary.
        let files: BTreeSet<&'static str> = if i == 0 { FILES[..3].iter().copied().collect() } else { FILES.iter().copied().collect() };
        let mut reg = FileRegistry::new(fs_ip(i), Duration::from_secs(15), move |f: &str| files.contains(f));
        if s.keyed {
            reg = reg.with_auth(auth(fs_ip(i), sim.now()));
        }
        sim.add(Host::Fs(FsHost { reg, dead: false, answers_queries: s.fs_answer, last_port: FS_PORT }), &[IpAddr::V4(fs_ip(i))]);
    }
    sim
}

/// The invariant, from every live party's own records.
fn check(sim: &Sim<Host>, seed: u64) {
    let mut seen: BTreeMap<Slot, (String, String)> = BTreeMap::new();
    let mut claim = |slot: Slot, file: &str, who: String| {
        if let Some((f, w)) = seen.get(&slot) {
            assert_eq!(f, file, "seed {seed}: slot {slot} carries two files at {:?}: {w} has {f}, {who} has {file}", sim.clock.elapsed());
        } else {
            seen.insert(slot, (file.to_string(), who));
        }
    };
    for node in sim.nodes() {
        match node {
            Host::Neg(h) if !h.dead => h.n.assignments().iter().for_each(|a| claim(a.slot, &a.file, format!("negotiator {}", h.i))),
            Host::Fs(f) if !f.dead => f.reg.groups().iter().for_each(|(slot, g)| claim(*slot, &g.file, format!("file server {}", f.reg.address))),
            _ => {}
        }
    }
}

fn run(seed: u64, s: &Scenario) -> Stats {
    let mut sim = new_sim(seed, s);
    let mut rng = Rng::new(seed ^ 0x00C1_1E27);
    let t0 = sim.now();
    let end = t0 + Duration::from_secs(180);
    let mut clients = Vec::new();
    // (when, client, negotiator)
    let mut asks: BinaryHeap<Reverse<(Instant, usize, usize)>> = BinaryHeap::new();
    for c in 0..s.clients {
        let file = FILES[rng.below(FILES.len() as u64) as usize];
        let n = rng.below(3) as usize;
        clients.push(Client { file, asked: n, tries: 0, done: None });
        // Bursts: a quarter of the clients arrive at the very same instant on all three
        // negotiators, so queries for the same slot cross on the wire.
        let t = if c % 4 == 0 { t0 + Duration::from_secs(5 * (c as u64 / 12)) } else { t0 + Duration::from_millis(rng.below(120_000)) };
        asks.push(Reverse((t, c, n)));
    }
    let mut stats = Stats::default();
    let kill_at = s.kill_primary_at.map(|k| t0 + Duration::from_secs(k));
    let mut killed = false;
    let dead = |sim: &Sim<Host>, n: usize| matches!(sim.node(n), Host::Neg(h) if h.dead);
    loop {
        let next_sim = sim.next_event();
        let next_ask = asks.peek().map(|Reverse((t, _, _))| *t);
        let now = match (next_sim, next_ask) {
            (None, None) => break,
            (s, Some(a)) if s.is_none_or(|s| a <= s) => {
                let Reverse((t, c, n)) = asks.pop().expect("peeked");
                sim.clock.advance_to(t);
                if clients[c].done.is_none() {
                    clients[c].tries += 1;
                    // A client whose negotiator never answered tries another.
                    let n = if dead(&sim, n) && clients[c].tries > 1 { (n + 1) % 3 } else { n };
                    clients[c].asked = n;
                    // PXE clients re-ask on their own timeout; ours does after 10 s.
                    asks.push(Reverse((t + Duration::from_secs(10), c, (n + 1) % 3)));
                    if let Host::Neg(h) = sim.node_mut(n) {
                        if !h.dead {
                            h.n.request(t, c as u64, clients[c].file);
                            h.collect(t);
                        }
                    }
                }
                t
            }
            _ => {
                sim.step();
                sim.now()
            }
        };
        if now >= end {
            break;
        }
        for n in 0..3 {
            let Host::Neg(h) = sim.node_mut(n) else { unreachable!() };
            for e in std::mem::take(&mut h.events) {
                match e {
                    Event::Ready { client, assignment } => {
                        stats.ready += 1;
                        let c = &mut clients[client as usize];
                        assert_eq!(assignment.file, c.file, "seed {seed}: a client got another file's assignment");
                        if c.done.is_none() && c.asked == n {
                            c.done = Some(assignment);
                        }
                    }
                    Event::Wait { .. } => stats.waits += 1,
                    Event::Conflict { .. } => stats.conflicts += 1,
                    Event::Failed { client, .. } => {
                        stats.failed += 1;
                        // The client tries again later, elsewhere.
                        let c = client as usize;
                        if clients[c].done.is_none() && clients[c].asked == n {
                            asks.push(Reverse((now + Duration::from_secs(3), c, (n + 1) % 3)));
                        }
                    }
                    Event::Activated(_) | Event::Released { .. } => {}
                }
            }
        }
        check(&sim, seed);
        if let (Some(k), false) = (kill_at, killed) {
            if now >= k {
                for (node, ip) in [(0, neg_ip(0)), (3, fs_ip(0))] {
                    match sim.node_mut(node) {
                        Host::Neg(h) => h.dead = true,
                        Host::Fs(f) => f.dead = true,
                    }
                    sim.net.set_down(IpAddr::V4(ip), true);
                }
                killed = true;
            }
        }
    }
    stats.datagrams = sim.net.stats().sent;
    let unserved: Vec<_> = clients.iter().enumerate().filter(|(_, c)| c.done.is_none()).map(|(i, c)| (i, c.file, c.tries)).collect();
    assert!(unserved.is_empty(), "seed {seed}: clients never served: {unserved:?} ({stats:?})");
    if killed {
        // Every assignment handed out after the kill (and still held) names the live file server.
        for node in sim.nodes() {
            if let Host::Neg(h) = node {
                if h.i > 0 {
                    for a in h.n.assignments() {
                        assert_ne!(a.file_server, fs_ip(0), "seed {seed}: negotiator {} still uses the dead file server", h.i);
                    }
                }
            }
        }
    }
    stats
}

#[test]
fn clean_network_many_seeds() {
    let s = Scenario { clients: 40, slots: 8, loss: 0, dup: 0, max_delay_ms: 20, kill_primary_at: None, fs_answer: true, query_tries: 3, keyed: false };
    let (seeds, all) = seeds(0..100);
    let conflicts: u64 = seeds.into_iter().map(|seed| run(seed, &s).conflicts).sum();
    // Simultaneous queries for one slot happen and are resolved.
    if all {
        assert!(conflicts > 0, "the scenario never produced a conflict");
    }
}

#[test]
fn lossy_duplicating_network_many_seeds() {
    // With authentication on: duplicates are replays to every receiver, and are dropped.
    let s = Scenario { clients: 40, slots: 8, loss: 100, dup: 50, max_delay_ms: 150, kill_primary_at: None, fs_answer: true, query_tries: 3, keyed: true };
    for seed in seeds(0..150).0 {
        run(seed, &s);
    }
}

#[test]
fn small_pool_forces_conflicts() {
    // Four files from two file servers into five slots: slots collide all the time.
    let s = Scenario { clients: 30, slots: 5, loss: 50, dup: 30, max_delay_ms: 80, kill_primary_at: None, fs_answer: true, query_tries: 3, keyed: false };
    let mut total = Stats::default();
    let (seeds, all) = seeds(1000..1100);
    for seed in seeds {
        let st = run(seed, &s);
        total.conflicts += st.conflicts;
        total.waits += st.waits;
    }
    if all {
        assert!(total.conflicts > 100, "{total:?}");
    }
}

#[test]
fn primary_negotiator_and_file_server_die() {
    let s = Scenario { clients: 40, slots: 8, loss: 50, dup: 30, max_delay_ms: 80, kill_primary_at: Some(50), fs_answer: true, query_tries: 3, keyed: false };
    for seed in seeds(2000..2100).0 {
        run(seed, &s);
    }
}

#[test]
fn heavy_loss_many_seeds() {
    // One datagram in five lost, one in ten duplicated, up to 250 ms late.
    let s = Scenario { clients: 30, slots: 6, loss: 200, dup: 100, max_delay_ms: 250, kill_primary_at: Some(60), fs_answer: true, query_tries: 3, keyed: false };
    for seed in seeds(3000..3200).0 {
        run(seed, &s);
    }
}

#[test]
fn negotiators_alone_without_file_server_answers() {
    // The basic exchange alone: only negotiators answer queries. Silence means "free", so the
    // residual risk is every query or its answer lost, and every announcement missed: about
    // (1 - (1 - loss)^2)^tries per colliding pick. 3 tries hold at 10% loss; at 20% loss one
    // seed in ~100 loses all of them, so that case runs with 5 tries (or with the file
    // servers answering too, as `heavy_loss_many_seeds` does with the defaults).
    for (loss, dup, delay, kill, tries, range) in
        [(100, 50, 150, None, 3, 4000..4150), (100, 50, 150, Some(60), 3, 4500..4600), (200, 100, 250, Some(60), 5, 5000..5100)]
    {
        let s = Scenario { clients: 30, slots: 6, loss, dup, max_delay_ms: delay, kill_primary_at: kill, fs_answer: false, query_tries: tries, keyed: false };
        for seed in seeds(range).0 {
            run(seed, &s);
        }
    }
}

/// A negotiator fed hostile bytes on both of its ports keeps the contract: no panic, what
/// it appends is what its transmits say, no timer at or before `now` after a timeout.
#[test]
fn a_negotiator_keeps_the_contract_under_hostile_bytes() {
    let s = Scenario { clients: 0, slots: 4, loss: 0, dup: 0, max_delay_ms: 1, kill_primary_at: None, fs_answer: true, query_tries: 3, keyed: false };
    let mut sim = new_sim(1, &s);
    let now = sim.now();
    let Host::Neg(h) = sim.node_mut(0) else { unreachable!() };
    h.n.request(now, 1, FILES[0]);
    let mut rng = Rng::new(5);
    let peers: Vec<SocketAddr> = [neg_ip(1), fs_ip(0)].iter().map(|ip| SocketAddr::from((*ip, PEER_PORT))).collect();
    let node = sim.node_mut(0);
    let mut sent = 0;
    for to in [PEER_PORT, NEG_FS_PORT] {
        let c = fleetboot_testkit::conformance::check(node, now, SocketAddr::from((neg_ip(0), to)), &peers, &mut rng, 2000);
        assert_eq!(c.fuzzed, 2000);
        sent += c.datagrams;
    }
    assert!(sent >= 5, "it queried its five peers: {sent}");
}

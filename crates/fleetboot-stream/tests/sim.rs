//! Deterministic simulation: one sender (or several sessions), many receivers, an in-memory
//! network with simulated time, independent loss per receiver and direction, reordering
//! (random delays), duplicates, late joiners and receivers that die. Asserts counts only.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc as Rc;
use std::time::{Duration, Instant};

use fleetboot_stream::{
    BlockSink, BlockSource, Destination, Mode, PeerState, Receiver, ReceiverConfig, ReceiverState,
    Sender, SenderConfig, Sessions,
};

/// splitmix64: small, seeded, deterministic.
#[derive(Clone)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `ppm` parts per million.
    fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.below(1_000_000) < ppm as u64
    }
}

fn image(size: usize, seed: u64) -> Rc<Vec<u8>> {
    let mut r = Rng(seed);
    let mut v = vec![0u8; size];
    for c in v.chunks_mut(8) {
        let x = r.next().to_le_bytes();
        c.copy_from_slice(&x[..c.len()]);
    }
    Rc::new(v)
}

struct MemSource {
    img: Rc<Vec<u8>>,
    bs: usize,
}
impl BlockSource for MemSource {
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let s = index as usize * self.bs;
        buf.copy_from_slice(&self.img[s..s + buf.len()]);
        Ok(())
    }
}

/// Checks every write against the reference image and remembers which blocks were
/// written (compact: one bit per block); reads come back from the reference for written
/// blocks. `full` sinks also keep the bytes for a byte-for-byte comparison at the end.
struct Sink {
    img: Rc<Vec<u8>>,
    bs: usize,
    written: Vec<u64>,
    mismatches: u32,
    writes: u64,
    full: Option<Vec<u8>>,
}
impl Sink {
    fn new(img: Rc<Vec<u8>>, bs: usize, full: bool) -> Self {
        let blocks = img.len().div_ceil(bs);
        Sink {
            full: full.then(|| vec![0u8; img.len()]),
            img,
            bs,
            written: vec![0; blocks.div_ceil(64)],
            mismatches: 0,
            writes: 0,
        }
    }
    fn blocks(&self) -> usize {
        self.img.len().div_ceil(self.bs)
    }
    fn all_written(&self) -> bool {
        (0..self.blocks()).all(|b| self.written[b / 64] & (1 << (b % 64)) != 0)
    }
}
impl BlockSink for Sink {
    fn write_block(&mut self, index: u32, data: &[u8]) -> std::io::Result<()> {
        let s = index as usize * self.bs;
        self.writes += 1;
        if s + data.len() > self.img.len() || self.img[s..s + data.len()] != *data {
            self.mismatches += 1;
        }
        if let Some(f) = &mut self.full {
            f[s..s + data.len()].copy_from_slice(data);
        }
        self.written[index as usize / 64] |= 1 << (index % 64);
        Ok(())
    }
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let s = index as usize * self.bs;
        if self.written[index as usize / 64] & (1 << (index % 64)) == 0 {
            return Err(std::io::Error::other("read of unwritten block"));
        }
        match &self.full {
            Some(f) => buf.copy_from_slice(&f[s..s + buf.len()]),
            None => buf.copy_from_slice(&self.img[s..s + buf.len()]),
        }
        Ok(())
    }
}

const TICK: Duration = Duration::from_micros(100);
const RING: usize = 64;
const SENDER_BASE: u16 = 4000;

fn rx_addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 1, (i >> 8) as u8, i as u8)),
        5000,
    )
}
fn sender_addr(s: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), SENDER_BASE + s as u16)
}

struct NetCfg {
    /// Loss, parts per million, per receiver per packet (both directions).
    loss_ppm: u32,
    dup_ppm: u32,
    /// Delay in ticks: 1 + uniform [0, jitter].
    jitter: u64,
}

struct Node {
    rx: Option<Receiver>,
    cfg: ReceiverConfig,
    sink: Sink,
    join_tick: u64,
    die_tick: Option<u64>,
    drain_per_tick: usize,
    rng: Rng,
    /// Index of the session (sender) it listens to.
    session: usize,
}

struct Delivery {
    to: usize, // usize::MAX - s = sender s
    from: SocketAddr,
    data: Rc<[u8]>,
}

struct Sim {
    base: Instant,
    t: u64,
    senders: Sessions,
    sender_ids: Vec<u32>,
    sources: Vec<MemSource>,
    nodes: Vec<Node>,
    ring: Vec<Vec<Delivery>>,
    in_flight: usize,
    net: NetCfg,
    rng: Rng,
    bytes: HashMap<u32, u64>,
    /// Extra datagrams an attacker injects: (tick, to node, bytes).
    inject: Vec<(u64, usize, Vec<u8>)>,
    inject_sender: Vec<(u64, usize, Vec<u8>)>,
}

impl Sim {
    fn now(&self) -> Instant {
        self.base + TICK * self.t as u32
    }

    fn schedule(&mut self, to: usize, from: SocketAddr, data: Rc<[u8]>, rng_node: Option<usize>) {
        let (lost, delay, dup) = {
            let rng = match rng_node {
                Some(i) => &mut self.nodes[i].rng,
                None => &mut self.rng,
            };
            let lost = rng.chance(self.net.loss_ppm);
            let delay = 1 + rng.below(self.net.jitter + 1);
            let dup = rng.chance(self.net.dup_ppm);
            (lost, delay, dup)
        };
        if lost {
            return;
        }
        let slot = ((self.t + delay) % RING as u64) as usize;
        if dup {
            let slot2 = ((self.t + delay + 1) % RING as u64) as usize;
            self.ring[slot2].push(Delivery {
                to,
                from,
                data: data.clone(),
            });
            self.in_flight += 1;
        }
        self.ring[slot].push(Delivery { to, from, data });
        self.in_flight += 1;
    }

    fn node_active(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        n.rx.is_some() && n.die_tick.is_none_or(|d| self.t < d)
    }

    fn step(&mut self) {
        let now = self.now();
        // Joins.
        for n in &mut self.nodes {
            if n.rx.is_none() && n.join_tick <= self.t {
                n.rx = Some(Receiver::new(now, n.cfg.clone()));
            }
        }
        // Injected attacker traffic.
        let inj: Vec<_> = self
            .inject
            .iter()
            .filter(|x| x.0 == self.t)
            .cloned()
            .collect();
        for (_, i, b) in inj {
            let from = sender_addr(self.nodes[i].session);
            if let Some(rx) = self.nodes[i].rx.as_mut() {
                rx.handle(now, from, &b);
            }
        }
        let inj: Vec<_> = self
            .inject_sender
            .iter()
            .filter(|x| x.0 == self.t)
            .cloned()
            .collect();
        for (_, i, b) in inj {
            self.senders.handle(now, rx_addr(i), &b);
        }
        // Deliveries due now: the sender's first.
        let slot = (self.t % RING as u64) as usize;
        let due = std::mem::take(&mut self.ring[slot]);
        self.in_flight -= due.len();
        for d in &due {
            if d.to >= usize::MAX - 16 {
                self.senders.handle(now, d.from, &d.data);
            }
        }
        // Senders (their datagrams arrive one tick later at the earliest).
        if self.senders.poll_timeout().is_some_and(|t| t <= now) {
            self.senders.handle_timeout(now);
        }
        let mut buf = vec![0u8; 9000];
        for (s, &sid) in self.sender_ids.clone().iter().enumerate() {
            loop {
                let snd = self.senders.get_mut(sid).unwrap();
                let Some(tx) = snd.poll_transmit(now, &mut self.sources[s], &mut buf) else {
                    break;
                };
                *self.bytes.entry(sid).or_default() += tx.len as u64;
                let data: Rc<[u8]> = buf[..tx.len].into();
                match tx.dest {
                    Destination::Multicast => {
                        for i in 0..self.nodes.len() {
                            if self.node_active(i) {
                                self.schedule(i, sender_addr(s), data.clone(), Some(i));
                            }
                        }
                    }
                    Destination::Unicast(a) => {
                        if let IpAddr::V4(v) = a.ip() {
                            let oc = v.octets();
                            let i = ((oc[2] as usize) << 8) | oc[3] as usize;
                            if i < self.nodes.len() && self.node_active(i) {
                                self.schedule(i, sender_addr(s), data, Some(i));
                            }
                        }
                    }
                }
            }
        }
        // Receivers, in two threads (each owns half the nodes; results merged in order).
        let t = self.t;
        let half = self.nodes.len().div_ceil(2);
        let (a, b) = self.nodes.split_at_mut(half);
        let due = &due;
        let work = |nodes: &mut [Node], offset: usize| -> Vec<(usize, Rc<[u8]>)> {
            let mut buf = vec![0u8; 9000];
            let mut out = Vec::new();
            for d in due {
                if d.to >= offset && d.to < offset + nodes.len() {
                    let n = &mut nodes[d.to - offset];
                    if n.die_tick.is_none_or(|x| t < x) {
                        if let Some(rx) = n.rx.as_mut() {
                            rx.handle(now, d.from, &d.data);
                        }
                    }
                }
            }
            for (k, n) in nodes.iter_mut().enumerate() {
                if n.die_tick.is_some_and(|x| t >= x) {
                    continue;
                }
                let Some(rx) = n.rx.as_mut() else { continue };
                rx.drain(now, &mut n.sink, n.drain_per_tick).unwrap();
                if rx.poll_timeout().is_some_and(|x| x <= now) {
                    rx.handle_timeout(now);
                }
                while let Some(tx) = rx.poll_transmit(now, &mut buf) {
                    out.push((offset + k, Rc::<[u8]>::from(&buf[..tx.len])));
                }
            }
            out
        };
        let (oa, ob) = std::thread::scope(|sc| {
            let h = sc.spawn(|| work(b, half));
            let oa = work(a, 0);
            (oa, h.join().unwrap())
        });
        for (i, d) in oa.into_iter().chain(ob) {
            let s = self.nodes[i].session;
            self.schedule(usize::MAX - s, rx_addr(i), d, Some(i));
        }
    }

    /// Runs until every session is finished and the network is empty.
    fn run(&mut self, max_ticks: u64) {
        while self.t < max_ticks {
            self.step();
            let done = self
                .sender_ids
                .iter()
                .all(|&s| self.senders.get(s).unwrap().is_finished());
            if done && self.in_flight == 0 {
                // Let receivers see the closing DONEs.
                return;
            }
            // Idle: jump to the next event.
            if self.in_flight == 0 {
                let mut next = self.senders.poll_timeout();
                for (i, n) in self.nodes.iter().enumerate() {
                    let t = match &n.rx {
                        None => Some(self.base + TICK * n.join_tick as u32),
                        Some(rx) if self.node_active(i) => rx.poll_timeout(),
                        _ => None,
                    };
                    if let Some(t) = t {
                        next = Some(next.map_or(t, |x| x.min(t)));
                    }
                    if !self.nodes[i].sink.all_written() && n.rx.is_some() && self.node_active(i) {
                        next = Some(self.now()); // still draining
                    }
                }
                for x in self.inject.iter().chain(&self.inject_sender) {
                    if x.0 > self.t {
                        let t = self.base + TICK * x.0 as u32;
                        next = Some(next.map_or(t, |y| y.min(t)));
                    }
                }
                if let Some(nx) = next {
                    let ticks = (nx.saturating_duration_since(self.base).as_micros()
                        / TICK.as_micros()) as u64;
                    self.t = ticks.max(self.t + 1);
                    continue;
                }
            }
            self.t += 1;
        }
        panic!("simulation did not finish in {max_ticks} ticks");
    }
}

struct Setup {
    image_size: usize,
    block_size: u16,
    receivers: usize,
    late: Vec<(usize, u64)>,
    dies: Vec<(usize, u64)>,
    net: NetCfg,
    mode: Mode,
    seed: u64,
    rate: u64,
}

fn sender_cfg(sid: u32, img_id: [u8; 16], su: &Setup, order: Vec<u32>) -> SenderConfig {
    let mut c = SenderConfig::new(
        sid,
        img_id,
        su.image_size as u64,
        su.block_size,
        [sid as u8; 16],
    );
    c.order = order;
    c.rate = su.rate;
    c.burst = 16 * 1024;
    c.mode = su.mode;
    c.fec_group = 32768;
    c.solicit.window = Duration::from_millis(20);
    c.solicit.min_receivers = 1;
    c.announce_interval = Duration::from_millis(5);
    c.dead_timeout = Duration::from_millis(300);
    c.status_timeout = Duration::from_millis(15);
    c.laggard_after = Duration::from_millis(100);
    c.requester_timeout = Duration::from_millis(5);
    c
}

fn build(su: &Setup, sessions: usize) -> (Sim, Vec<Rc<Vec<u8>>>) {
    let base = Instant::now();
    let mut senders = Sessions::new();
    let mut sources = Vec::new();
    let mut imgs = Vec::new();
    let mut ids = Vec::new();
    for s in 0..sessions {
        let img = image(su.image_size, su.seed ^ ((s as u64 + 1) * 0x1234_5678));
        let blocks = su.image_size.div_ceil(su.block_size as usize) as u32;
        // A "learned" order: the second half first, then every third block, rest appended.
        let mut order: Vec<u32> = (blocks / 2..blocks).collect();
        order.extend((0..blocks / 2).step_by(3));
        let sid = 0x5E55_0000 + s as u32;
        let img_id = [s as u8 + 1; 16];
        let snd = Sender::new(base, sender_cfg(sid, img_id, su, order)).unwrap();
        senders.insert(snd).unwrap();
        sources.push(MemSource {
            img: img.clone(),
            bs: su.block_size as usize,
        });
        imgs.push(img);
        ids.push(sid);
    }
    let mut nodes = Vec::new();
    for i in 0..su.receivers {
        let s = i % sessions;
        let mut cfg = ReceiverConfig::new([s as u8 + 1; 16], su.seed.wrapping_mul(31) ^ i as u64);
        cfg.cache_slots = 512;
        cfg.ack_interval = Duration::from_millis(10);
        cfg.register_interval = Duration::from_millis(3);
        let join_tick = su.late.iter().find(|(n, _)| *n == i).map_or(0, |(_, t)| *t);
        nodes.push(Node {
            rx: None,
            cfg,
            sink: Sink::new(imgs[s].clone(), su.block_size as usize, i < 3),
            join_tick,
            die_tick: su.dies.iter().find(|(n, _)| *n == i).map(|(_, t)| *t),
            drain_per_tick: usize::MAX,
            rng: Rng(su.seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407)),
            session: s,
        });
    }
    let sim = Sim {
        base,
        t: 0,
        senders,
        sender_ids: ids,
        sources,
        nodes,
        ring: (0..RING).map(|_| Vec::new()).collect(),
        in_flight: 0,
        rng: Rng(su.seed),
        net: NetCfg {
            loss_ppm: su.net.loss_ppm,
            dup_ppm: su.net.dup_ppm,
            jitter: su.net.jitter,
        },
        bytes: HashMap::new(),
        inject: Vec::new(),
        inject_sender: Vec::new(),
    };
    (sim, imgs)
}

/// Every live receiver complete with a byte-identical image; returns (ratio per session).
fn check(sim: &Sim, imgs: &[Rc<Vec<u8>>], su: &Setup) -> Vec<f64> {
    for (i, n) in sim.nodes.iter().enumerate() {
        if su.dies.iter().any(|(d, _)| *d == i) {
            continue;
        }
        let rx = n.rx.as_ref().unwrap();
        assert_eq!(
            rx.state(),
            ReceiverState::Finished,
            "receiver {i}: {:?}",
            rx.stats()
        );
        assert_eq!(n.sink.mismatches, 0, "receiver {i} wrote wrong bytes");
        assert!(n.sink.all_written(), "receiver {i} incomplete");
        if let Some(f) = &n.sink.full {
            assert_eq!(f[..], imgs[n.session][..], "receiver {i} image differs");
        }
    }
    sim.sender_ids
        .iter()
        .map(|s| sim.bytes[s] as f64 / su.image_size as f64)
        .collect()
}

fn report(name: &str, sim: &Sim, ratios: &[f64]) {
    for (k, &sid) in sim.sender_ids.iter().enumerate() {
        let st = sim.senders.get(sid).unwrap().stats();
        eprintln!(
            "{name}: session {sid:#x}: ratio {:.4} bytes {} data {} fec {} repair_mc {} repair_uc {} control {} rounds {} registered {} late {} dead {} laggards {} role_skips {} forged {} absurd {} flood {} ticks {}",
            ratios[k], st.bytes_sent, st.data_sent, st.fec_sent, st.repair_multicast, st.repair_unicast,
            st.control_sent, st.rounds, st.registered, st.late_joined, st.dead, st.laggards,
            st.role_skips, st.forged, st.absurd, st.flood_dropped, sim.t
        );
    }
}

#[test]
fn thousand_receivers_five_percent_loss() {
    let su = Setup {
        image_size: 4 << 20,
        block_size: 1450,
        receivers: 1000,
        late: vec![(10, 201), (200, 203), (400, 205), (600, 206), (800, 208)],
        dies: vec![(500, 400)],
        net: NetCfg {
            loss_ppm: 50_000,
            dup_ppm: 5_000,
            jitter: 3,
        },
        mode: Mode::Stream,
        seed: 0xF1EE7,
        rate: 20_000_000,
    };
    let (mut sim, imgs) = build(&su, 1);
    sim.run(2_000_000);
    let ratios = check(&sim, &imgs, &su);
    report("loss5", &sim, &ratios);
    let s = sim.senders.get(sim.sender_ids[0]).unwrap();
    let st = s.stats();
    assert!(st.late_joined >= 5);
    assert_eq!(st.dead, 1);
    let dead: Vec<_> = s
        .receivers()
        .filter(|r| r.state == PeerState::Dead)
        .collect();
    assert_eq!(dead.len(), 1);
    assert!(st.fec_sent > 0, "FEC used");
    assert!(ratios[0] <= 1.10, "bytes sent ratio {}", ratios[0]);
}

fn small(receivers: usize, loss_ppm: u32, mode: Mode, seed: u64) -> Setup {
    Setup {
        image_size: 256 * 1024 + 100,
        block_size: 1024,
        receivers,
        late: vec![],
        dies: vec![],
        net: NetCfg {
            loss_ppm,
            dup_ppm: 10_000,
            jitter: 3,
        },
        mode,
        seed,
        rate: 20_000_000,
    }
}

#[test]
fn zero_loss_run() {
    let mut su = small(100, 0, Mode::Stream, 7);
    su.image_size = 4 << 20;
    su.block_size = 1450;
    su.net.dup_ppm = 0;
    let (mut sim, imgs) = build(&su, 1);
    sim.run(1_000_000);
    let ratios = check(&sim, &imgs, &su);
    report("loss0", &sim, &ratios);
    let worst = sim
        .nodes
        .iter()
        .map(|n| n.rx.as_ref().unwrap().stats().clone())
        .max_by_key(|s| s.cache_overflow + s.absurd + s.duplicates);
    assert_eq!(worst.unwrap().duplicates, 0);
    let st = sim.senders.get(sim.sender_ids[0]).unwrap().stats();
    assert_eq!(st.fec_sent + st.repair_multicast + st.repair_unicast, 0);
    assert!(ratios[0] <= 1.05, "ratio {}", ratios[0]);
}

#[test]
fn lockstep_requester_dies() {
    let mut su = small(10, 50_000, Mode::LockStep, 11);
    su.image_size = 64 * 1024;
    // Receiver 3 dies mid-stream; the role reaches it again and must pass on.
    su.dies = vec![(3, 300)];
    let (mut sim, imgs) = build(&su, 1);
    sim.run(2_000_000);
    let ratios = check(&sim, &imgs, &su);
    report("lockstep", &sim, &ratios);
    let s = sim.senders.get(sim.sender_ids[0]).unwrap();
    let st = s.stats();
    assert!(st.role_skips >= 1, "the vanished requester was skipped");
    assert_eq!(st.dead, 1);
    assert!(st.data_sent >= 64, "every block driven by a requester");
}

#[test]
fn two_concurrent_sessions() {
    let su = small(40, 20_000, Mode::Stream, 21);
    let (mut sim, imgs) = build(&su, 2);
    sim.run(2_000_000);
    let ratios = check(&sim, &imgs, &su);
    report("two", &sim, &ratios);
    for &sid in &sim.sender_ids {
        assert_eq!(sim.senders.get(sid).unwrap().stats().registered, 20);
    }
    // Each receiver saw the other session's multicast and dropped it.
    assert!(sim
        .nodes
        .iter()
        .all(|n| n.rx.as_ref().unwrap().stats().wrong_session > 0));
}

#[test]
fn forged_replayed_absurd_and_floods_are_dropped() {
    use fleetboot_stream::wire::{Ack, Body, Data, Missing, MissingRange, Packet, Status};
    use fleetboot_stream::MacKey;
    let su = small(20, 20_000, Mode::Stream, 31);
    let (mut sim, imgs) = build(&su, 2);
    // Let the sessions start.
    while sim.t < 300 {
        sim.step();
        sim.t += 1;
    }
    let now = sim.now();
    let sid = sim.sender_ids[0];
    let other = sim.sender_ids[1];
    let key = MacKey::session(&[sid as u8; 16], sid);
    let wrong = MacKey::session(&[0xEE; 16], sid);
    let other_key = MacKey::session(&[other as u8; 16], other);
    let mut buf = vec![0u8; 9000];
    let payload = vec![0xAB; 1024];
    let enc = |p: Packet, k: &MacKey, buf: &mut Vec<u8>| -> Vec<u8> {
        let n = p.encode(k, buf).unwrap();
        buf[..n].to_vec()
    };
    let data = |seq, block| Packet {
        session: sid,
        body: Body::Data(Data {
            seq,
            block,
            payload: &payload,
        }),
    };
    let forged = enc(data(5, 5), &wrong, &mut buf);
    let absurd_seq = enc(data(u32::MAX - 1, 5), &key, &mut buf);
    let absurd_block = enc(data(5, 1 << 30), &key, &mut buf);
    // A genuine DATA of the other session, replayed with this session's id (tag fails)
    // and as is (other session: dropped as wrong session).
    let replay_other = enc(
        Packet {
            session: other,
            body: Body::Data(Data {
                seq: 1,
                block: 1,
                payload: &payload,
            }),
        },
        &other_key,
        &mut buf,
    );
    let mut relabeled = replay_other.clone();
    relabeled[1..5].copy_from_slice(&sid.to_be_bytes());
    let rx0 = 0; // node 0 listens to session 0
    let from = sender_addr(0);
    let before = sim.nodes[rx0].rx.as_ref().unwrap().stats().clone();
    {
        let rx = sim.nodes[rx0].rx.as_mut().unwrap();
        for b in [&forged, &relabeled] {
            rx.handle(now, from, b);
        }
        rx.handle(now, from, &absurd_seq);
        rx.handle(now, from, &absurd_block);
        rx.handle(now, sender_addr(1), &replay_other);
        rx.handle(now, from, &[0x14, 1, 2]);
    }
    let after = sim.nodes[rx0].rx.as_ref().unwrap().stats().clone();
    assert_eq!(after.forged - before.forged, 2);
    assert_eq!(after.absurd - before.absurd, 2);
    assert_eq!(after.wrong_session - before.wrong_session, 1);
    assert_eq!(after.malformed - before.malformed, 1);
    assert_eq!(after.data_accepted, before.data_accepted);

    // Sender side: forged STATUS, absurd ACK and STATUS, and a NAK flood with the real key.
    let rx = sim.nodes[rx0].rx.as_ref().unwrap();
    let id = rx.id().expect("registered");
    let nonce = sim.nodes[rx0].cfg.nonce;
    let rkey = MacKey::receiver(&key, id, nonce);
    let status = |round, missing: Missing| Packet {
        session: sid,
        body: Body::Status(Status {
            receiver: id,
            round,
            free_slots: 10,
            total_missing: 1,
            flags: 0,
            missing,
        }),
    };
    let one = Missing::Ranges(vec![MissingRange { start: 3, len: 1 }]);
    let st0 = sim.senders.get(sid).unwrap().stats().clone();
    let forged_status = enc(status(0, one.clone()), &wrong, &mut buf);
    sim.senders.handle(now, rx_addr(rx0), &forged_status);
    let absurd_ack = enc(
        Packet {
            session: sid,
            body: Body::Ack(Ack {
                receiver: id,
                contig: 0,
                highest: 4_000_000,
                free_slots: 5,
            }),
        },
        &rkey,
        &mut buf,
    );
    sim.senders.handle(now, rx_addr(rx0), &absurd_ack);
    let absurd_status = enc(
        status(
            0,
            Missing::Ranges(vec![MissingRange {
                start: 1_000_000,
                len: 5,
            }]),
        ),
        &rkey,
        &mut buf,
    );
    let flood = enc(status(99, one), &rkey, &mut buf);
    // The right key from the wrong address is refused too.
    sim.senders.handle(now, rx_addr(rx0 + 2), &flood);
    for _ in 0..200 {
        sim.senders.handle(now, rx_addr(rx0), &flood);
    }
    let st1 = sim.senders.get(sid).unwrap().stats().clone();
    assert_eq!(st1.forged - st0.forged, 2);
    assert_eq!(st1.absurd - st0.absurd, 1);
    assert!(st1.flood_dropped - st0.flood_dropped >= 150);
    // The absurd STATUS arrives during repair, when it is checked against the stream.
    sim.inject_sender.push((sim.t + 1, rx0, absurd_status));
    sim.run(2_000_000);
    let ratios = check(&sim, &imgs, &su);
    report("attacks", &sim, &ratios);
}

#[test]
fn slow_receiver_moves_to_unicast() {
    let mut su = small(8, 10_000, Mode::Stream, 41);
    su.rate = 40_000_000;
    let (mut sim, imgs) = build(&su, 1);
    // Receiver 5 consumes one block every tick from a small cache: it cannot keep up.
    sim.nodes[5].drain_per_tick = 1;
    sim.nodes[5].cfg.cache_slots = 8;
    sim.nodes[5].cfg.ack_interval = Duration::from_millis(50);
    sim.run(2_000_000);
    let ratios = check(&sim, &imgs, &su);
    report("laggard", &sim, &ratios);
    let s = sim.senders.get(sim.sender_ids[0]).unwrap();
    let lag: Vec<_> = s
        .receivers()
        .filter(|r| r.state == PeerState::Laggard)
        .collect();
    assert_eq!(lag.len(), 1, "the slow receiver left the window");
    assert!(s.stats().repair_unicast > 0);
}

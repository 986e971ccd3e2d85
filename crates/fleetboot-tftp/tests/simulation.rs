//! Deterministic simulation: a `ReadTransfer` against a `ReadClient` over
//! `fleetboot_testkit`'s in-memory network, which loses, duplicates and reorders datagrams,
//! with simulated time. Seeded; asserts bytes and packet counts, never wall-clock times.

use fleetboot_testkit::{LinkConfig, Network, Node, Rng, Sim, SimClock, Transmit};
use fleetboot_tftp::codec::{self, Packet};
use fleetboot_tftp::{
    ClientState, ReadClient, ReadTransfer, TransferConfig, TransferState, TransferStats,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const CLEAN: LinkConfig = LinkConfig::PERFECT;
/// Duplicates are harmless: a perfect link plus copies must still need no retransmission.
const DUPLICATING: LinkConfig = LinkConfig {
    duplicate_ppm: 30_000,
    ..LinkConfig::PERFECT
};

fn lossy() -> LinkConfig {
    LinkConfig::lossy(50, 20, 20)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The server host: the listener on port 69 starts one transfer on its own port (TID) at
/// the first RRQ. The shell would give a resent RRQ a transfer of its own; here resent
/// RRQs are dropped, so exactly one transfer runs.
struct Server {
    file: Vec<u8>,
    cfg: TransferConfig,
    transfer: Option<ReadTransfer>,
}

const LISTEN: &str = "10.0.0.1:69";
const TID: &str = "10.0.0.1:40000";
const CLIENT: &str = "10.0.0.2:2000";

impl Node for Server {
    fn handle(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        match (&mut self.transfer, to == addr(LISTEN)) {
            (Some(t), false) => t.handle(now, from, bytes),
            (None, true) => {
                if let Ok(Packet::Rrq { options, .. }) = Packet::parse(bytes) {
                    self.transfer = Some(ReadTransfer::new(now, from, &options, self.file.len() as u64, &self.cfg));
                }
            }
            _ => {}
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        if let Some(t) = &mut self.transfer {
            t.handle_timeout(now);
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.transfer.as_ref()?.poll_timeout()
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
        let t = self.transfer.as_mut()?.poll_transmit(now, &mut self.file.as_slice(), buf)?;
        Some((addr(TID), t))
    }
}

struct Client(ReadClient);

impl Node for Client {
    fn handle(&mut self, now: Instant, from: SocketAddr, _to: SocketAddr, bytes: &[u8]) {
        self.0.handle(now, from, bytes)
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.0.handle_timeout(now)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.0.poll_timeout()
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
        self.0.poll_transmit(now, buf).map(|t| (addr(CLIENT), t))
    }
}

enum Host {
    Server(Server),
    Client(Client),
}

impl Node for Host {
    fn handle(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        match self {
            Host::Server(s) => s.handle(now, from, to, bytes),
            Host::Client(c) => c.handle(now, from, to, bytes),
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Host::Server(s) => s.handle_timeout(now),
            Host::Client(c) => c.handle_timeout(now),
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Host::Server(s) => s.poll_timeout(),
            Host::Client(c) => c.poll_timeout(),
        }
    }
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
        match self {
            Host::Server(s) => s.poll_transmit(now, buf),
            Host::Client(c) => c.poll_transmit(now, buf),
        }
    }
}

struct Outcome {
    data: Vec<u8>,
    server: TransferState,
    stats: TransferStats,
    blksize: u16,
}

fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run(
    file: &[u8],
    request: &[(String, String)],
    cfg: &TransferConfig,
    link: LinkConfig,
    seed: u64,
) -> Outcome {
    let clock = SimClock::new(); // an epoch only; time advances by simulation
    let now = clock.now();
    let mut sim = Sim::new(clock, Network::new(Rng::new(seed), link));
    let server = Server { file: file.to_vec(), cfg: cfg.clone(), transfer: None };
    let s = sim.add(Host::Server(server), &[addr(LISTEN).ip()]);
    let client = ReadClient::new("boot.img", request, addr(LISTEN), now);
    let c = sim.add(Host::Client(Client(client)), &[addr(CLIENT).ip()]);
    let finished = |sim: &Sim<Host>| {
        let (Host::Server(s), Host::Client(c)) = (sim.node(s), sim.node(c)) else { unreachable!() };
        let server_done = s.transfer.as_ref().is_some_and(|t| t.is_finished());
        (server_done && c.0.is_done()) || matches!(c.0.state(), ClientState::Failed(_))
    };
    if let Err(e) = sim.run_until(10_000_000, finished) {
        panic!("seed {seed}: {e}");
    }
    let (Host::Server(server), Host::Client(client)) = (sim.node(s), sim.node(c)) else { unreachable!() };
    let server = server.transfer.as_ref().expect("the RRQ never arrived");
    assert!(
        client.0.is_done(),
        "client state {:?}, server {:?}",
        client.0.state(),
        server.state()
    );
    Outcome {
        blksize: server.accepted_options().blksize,
        stats: server.stats(),
        server: server.state().clone(),
        data: client.0.data().to_vec(),
    }
}

fn file_of(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed ^ 0xF11E).bytes(len)
}

fn check(file: &[u8], request: &[(String, String)], link: LinkConfig, seed: u64) {
    let cfg = TransferConfig::default();
    let o = run(file, request, &cfg, link, seed);
    assert!(
        o.data == file,
        "data differs: len {} vs {}, seed {seed}",
        o.data.len(),
        file.len()
    );
    let TransferState::Completed { bytes, retransmits } = o.server else {
        panic!("server {:?}, seed {seed}", o.server)
    };
    assert_eq!(bytes, file.len() as u64);
    assert_eq!(retransmits, o.stats.retransmits);
    if link.loss_ppm == 0 && link.reorder_ppm == 0 {
        let blocks = file.len() as u64 / u64::from(o.blksize) + 1;
        assert_eq!(retransmits, 0, "seed {seed}");
        assert_eq!(o.stats.data_packets, blocks, "seed {seed}");
        assert_eq!(o.stats.timeouts, 0, "seed {seed}");
    }
}

const SIZES: [usize; 8] = [0, 1, 511, 512, 513, 1024, 512 * 37 + 100, 200_000];

fn plain() -> Vec<(String, String)> {
    vec![]
}

fn windowed(ws: u16) -> Vec<(String, String)> {
    opts(&[
        ("blksize", "512"),
        ("tsize", "0"),
        ("windowsize", &ws.to_string()),
    ])
}

#[test]
fn every_size_over_a_clean_link() {
    for (i, &len) in SIZES.iter().enumerate() {
        let file = file_of(len, i as u64);
        for req in [
            plain(),
            windowed(1),
            windowed(16),
            opts(&[("blksize", "1432"), ("windowsize", "4")]),
        ] {
            check(&file, &req, CLEAN, 1);
            check(&file, &req, DUPLICATING, i as u64 + 7);
        }
    }
}

#[test]
fn every_size_over_a_lossy_link_many_seeds() {
    for (i, &len) in SIZES.iter().enumerate() {
        let file = file_of(len, i as u64);
        let seeds = if len > 100_000 { 4 } else { 24 };
        for seed in 0..seeds {
            for req in [
                plain(),
                windowed(16),
                opts(&[("blksize", "1432"), ("windowsize", "7"), ("timeout", "2")]),
            ] {
                check(&file, &req, lossy(), seed * 1000 + i as u64);
            }
        }
    }
}

#[test]
fn rollover_past_65535_blocks() {
    // 65536 full blocks of 512 and a short one: block numbers wrap to 0 and 1.
    let file = file_of(512 * 65536 + 100, 99);
    check(&file, &windowed(16), CLEAN, 1);
    check(&file, &windowed(16), lossy(), 2);
    check(&file, &plain(), CLEAN, 3);
}

#[test]
fn lossy_runs_do_retransmit_and_the_counts_add_up() {
    let file = file_of(100_000, 5);
    let o = run(&file, &windowed(16), &TransferConfig::default(), lossy(), 5);
    assert_eq!(o.data, file);
    assert!(o.stats.retransmits > 0);
    let blocks = file.len() as u64 / 512 + 1;
    // Every DATA packet is a first send or a retransmission (OACK resends count as the latter).
    assert!(o.stats.data_packets >= blocks);
    assert!(o.stats.data_packets <= blocks + o.stats.retransmits);
}

#[test]
fn dead_client_fails_the_transfer() {
    let cfg = TransferConfig {
        max_retries: 3,
        ..TransferConfig::default()
    };
    let t0 = Instant::now();
    let mut t = ReadTransfer::new(t0, addr(CLIENT), &[], 10_000, &cfg);
    let mut out = Vec::new();
    let file = vec![0u8; 10_000];
    let mut now = t0;
    while !t.is_finished() {
        while let Some(tx) = t.poll_transmit(now, &mut file.as_slice(), &mut out) {
            assert_eq!(codec::parse_data(&out[out.len() - tx.size..]).map(|d| d.0), Some(1));
        }
        now = t.poll_timeout().unwrap();
        t.handle_timeout(now);
    }
    assert!(matches!(t.state(), TransferState::Failed { .. }));
    assert_eq!(t.stats().retransmits, 3);
    // 1 + 2 + 4 + 8 simulated seconds of backoff.
    assert_eq!(now - t0, Duration::from_secs(15));
}

//! Deterministic simulation: a `ReadTransfer` against a `ReadClient` over an in-memory
//! network that loses, duplicates and reorders datagrams, with simulated time. Seeded; asserts
//! bytes and packet counts, never wall-clock times.

use fleetboot_tftp::codec::{self, Packet};
use fleetboot_tftp::{
    ClientState, ReadClient, ReadTransfer, TransferConfig, TransferState, TransferStats,
};
use std::time::{Duration, Instant};

/// xorshift64*: enough randomness for a network model, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn per_mille(&mut self, p: u64) -> bool {
        self.next() % 1000 < p
    }
}

#[derive(Clone, Copy)]
struct Link {
    loss: u64,
    dup: u64,
    reorder: u64,
}

const CLEAN: Link = Link {
    loss: 0,
    dup: 0,
    reorder: 0,
};
/// Duplicates are harmless: a perfect link plus copies must still need no retransmission.
const DUPLICATING: Link = Link {
    loss: 0,
    dup: 30,
    reorder: 0,
};
const LOSSY: Link = Link {
    loss: 50,
    dup: 20,
    reorder: 20,
};

#[derive(Clone, Copy, PartialEq)]
enum To {
    Server,
    Client,
}

struct Net {
    rng: Rng,
    link: Link,
    seq: u64,
    in_flight: Vec<(Instant, u64, To, Vec<u8>)>,
}

impl Net {
    fn send(&mut self, now: Instant, to: To, bytes: &[u8]) {
        if self.rng.per_mille(self.link.loss) {
            return;
        }
        let copies = if self.rng.per_mille(self.link.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = Duration::from_micros(500);
            if self.rng.per_mille(self.link.reorder) {
                delay += Duration::from_micros(self.rng.next() % 3000);
            }
            self.seq += 1;
            self.in_flight
                .push((now + delay, self.seq, to, bytes.to_vec()));
        }
    }

    /// The earliest datagram, in send order among equal arrival times.
    fn next_arrival(&self) -> Option<(usize, Instant)> {
        self.in_flight
            .iter()
            .enumerate()
            .min_by_key(|(_, (t, s, ..))| (*t, *s))
            .map(|(i, (t, ..))| (i, *t))
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
    link: Link,
    seed: u64,
) -> Outcome {
    let mut now = Instant::now(); // an epoch only; time advances by simulation
    let mut net = Net {
        rng: Rng::new(seed),
        link,
        seq: 0,
        in_flight: Vec::new(),
    };
    let mut client = ReadClient::new("boot.img", request, now);
    let mut server: Option<ReadTransfer> = None;
    let mut buf = Vec::with_capacity(70_000);
    for _step in 0..10_000_000u64 {
        while client.poll_transmit(now, &mut buf) {
            net.send(now, To::Server, &buf);
        }
        if let Some(s) = server.as_mut() {
            let mut src = file;
            while s.poll_transmit(now, &mut src, &mut buf) {
                net.send(now, To::Client, &buf);
            }
        }
        let server_done = server.as_ref().is_some_and(|s| s.is_finished());
        if (server_done && client.is_done()) || matches!(client.state(), ClientState::Failed(_)) {
            break;
        }
        let arrival = net.next_arrival();
        let next = [
            arrival.map(|a| a.1),
            client.poll_timeout(),
            server.as_ref().and_then(|s| s.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("deadlock: nothing in flight and no timer armed");
        now = now.max(next);
        match arrival {
            Some((i, t)) if t <= now => {
                let (_, _, to, bytes) = net.in_flight.swap_remove(i);
                match (to, server.as_mut()) {
                    (To::Client, _) => client.handle_datagram(now, &bytes),
                    (To::Server, Some(s)) => s.handle_datagram(now, &bytes),
                    // The listener: the first RRQ starts the transfer; the shell would give it a
                    // new TID, so resent RRQs never reach it.
                    (To::Server, None) => {
                        if let Ok(Packet::Rrq { options, .. }) = Packet::parse(&bytes) {
                            server = Some(ReadTransfer::new(now, &options, file.len() as u64, cfg));
                        }
                    }
                }
            }
            _ => {
                client.handle_timeout(now);
                if let Some(s) = server.as_mut() {
                    s.handle_timeout(now);
                }
            }
        }
    }
    let server = server.expect("the RRQ never arrived");
    assert!(
        client.is_done(),
        "client state {:?}, server {:?}",
        client.state(),
        server.state()
    );
    Outcome {
        blksize: server.negotiated().blksize,
        stats: server.stats(),
        server: server.state().clone(),
        data: client.into_data(),
    }
}

fn file_of(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ 0xF11E);
    (0..len).map(|_| rng.next() as u8).collect()
}

fn check(file: &[u8], request: &[(String, String)], link: Link, seed: u64) {
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
    if link.loss == 0 && link.reorder == 0 {
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
                check(&file, &req, LOSSY, seed * 1000 + i as u64);
            }
        }
    }
}

#[test]
fn rollover_past_65535_blocks() {
    // 65536 full blocks of 512 and a short one: block numbers wrap to 0 and 1.
    let file = file_of(512 * 65536 + 100, 99);
    check(&file, &windowed(16), CLEAN, 1);
    check(&file, &windowed(16), LOSSY, 2);
    check(&file, &plain(), CLEAN, 3);
}

#[test]
fn lossy_runs_do_retransmit_and_the_counts_add_up() {
    let file = file_of(100_000, 5);
    let o = run(&file, &windowed(16), &TransferConfig::default(), LOSSY, 5);
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
    let mut t = ReadTransfer::new(t0, &[], 10_000, &cfg);
    let mut out = Vec::new();
    let file = vec![0u8; 10_000];
    let mut now = t0;
    while !t.is_finished() {
        while t.poll_transmit(now, &mut file.as_slice(), &mut out) {
            assert_eq!(codec::parse_data(&out).map(|d| d.0), Some(1));
        }
        now = t.poll_timeout().unwrap();
        t.handle_timeout(now);
    }
    assert!(matches!(t.state(), TransferState::Failed { .. }));
    assert_eq!(t.stats().retransmits, 3);
    // 1 + 2 + 4 + 8 simulated seconds of backoff.
    assert_eq!(now - t0, Duration::from_secs(15));
}

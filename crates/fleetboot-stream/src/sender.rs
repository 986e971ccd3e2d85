//! The sender: one session streaming one image to the receivers that registered.
//!
//! Phases: [`Phase::Soliciting`] (ANNOUNCE, REGISTER/REGISTERED) → [`Phase::Streaming`]
//! (DATA in the image's block order, paced by a token bucket and held inside the slowest
//! live receiver's cache window) or [`Phase::LockStep`] (ROLE / READ-REQUEST / DATA,
//! round-robin requester) → [`Phase::Repairing`] (DONE / STATUS rounds, FEC + multicast +
//! unicast repairs) → [`Phase::Finished`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{key_wrap_pad, xor16, MacKey};
use crate::manifest::{Manifest, SessionManifest};
use crate::util::{recovery_total, Bitset, Groups, TokenBucket};
use crate::wire::{
    Announce, Body, Data, Done, Fec, ManifestChunk, Packet, ReadRequest, Registered, Role,
    Status, FEC_SHARD_PREFIX, GROUP_LIST_FLAG, MANIFEST_CHUNK, MAX_BLOCK_SIZE, MAX_CACHE_SLOTS, MAX_FEC_GROUP, MIN_BLOCK_SIZE,
    SIGNATURE_LEN,
};
use crate::StreamError;
use fleetboot_proto::Transmit;

/// Where the sender reads block bytes from.
pub trait BlockSource {
    /// Fills `buf` (exactly the block's length) with block `index`.
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()>;
}

/// How long the solicitation (invitation) period lasts.
#[derive(Debug, Clone)]
pub struct Solicitation {
    /// Length of the window after the session is created.
    pub window: Duration,
    /// The stream does not start before this many receivers registered (the window is
    /// extended until they have).
    pub min_receivers: u32,
    /// Start as soon as this many registered, even inside the window.
    pub start_at: Option<u32>,
}

/// How data is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Burst streaming at a set rate, then completion and repair rounds.
    Stream,
    /// Lock-step: a designated read requester drives each block, the role passing
    /// round-robin.
    LockStep,
}

/// A session's settings. [`SenderConfig::new`] gives lab defaults.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Session id (random per session, from the shell).
    pub session_id: u32,
    /// Image identity announced to receivers.
    pub image_id: [u8; 16],
    /// The session's multicast group and port: where ANNOUNCE, DATA, FEC, multicast
    /// REPAIR, DONE and ROLE go.
    pub group: SocketAddr,
    /// Image size in bytes.
    pub image_size: u64,
    /// Block size (even, 64..=8192).
    pub block_size: u16,
    /// The block order to stream (the learned sector order); empty = natural order.
    pub order: Vec<u32>,
    /// Append the blocks not in `order` after it (natural order).
    pub append_remaining: bool,
    /// Send rate in bytes per second (datagram bytes).
    pub rate: u64,
    /// Token-bucket burst in bytes.
    pub burst: u64,
    /// Solicitation period.
    pub solicit: Solicitation,
    /// Streaming or lock-step.
    pub mode: Mode,
    /// Random 16-byte session key (from the shell's RNG).
    pub session_key: [u8; 16],
    /// Operator's site secret (the shells never pass all zeros).
    pub site_secret: [u8; 32],
    /// Receivers ACK every this many packets.
    pub ack_every: u16,
    /// Positions per FEC group (larger groups need fewer repair symbols).
    pub fec_group: u32,
    /// Accept registrations after the solicitation window.
    pub allow_late_join: bool,
    /// Most receivers in the session.
    pub max_receivers: u32,
    /// ANNOUNCE period.
    pub announce_interval: Duration,
    /// A receiver silent this long is dead.
    pub dead_timeout: Duration,
    /// How long to wait for STATUS after a DONE before repeating it.
    pub status_timeout: Duration,
    /// DONE repeats per round before planning with the answers at hand.
    pub status_retries: u32,
    /// A receiver holding the window alone this long moves to unicast.
    pub laggard_after: Duration,
    /// Lock-step: how long the requester has to send its READ-REQUEST.
    pub requester_timeout: Duration,
    /// Lock-step: ROLE repeats before the role passes on.
    pub role_retries: u32,
    /// Repair rounds in a row in which a receiver made no progress (answered nothing, or
    /// missed as much as before) before it is given up. A receiver whose small cache or
    /// slow disk takes a few repairs per round is served for as long as it moves on.
    pub max_rounds: u32,
    /// Pause between the last packet of a pass and its DONE, so reordered packets land
    /// before receivers compute their STATUS.
    pub done_delay: Duration,
    /// The image's signed block-hash manifest ([`Manifest::build`], with the sender's
    /// signing key). Required: without it [`Sender::new`] refuses to start, as
    /// receivers accept nothing unsigned.
    pub manifest: Option<Arc<Manifest>>,
}

/// A manifest chunk asked for again is multicast again at most this often: many
/// receivers asking for the same lost chunk (within about a round trip) cost one
/// datagram. Short, as the few that lose the resent copy too need it before its blocks
/// arrive.
pub const MANIFEST_RESEND: Duration = Duration::from_millis(2);

/// Positions ahead of the stream whose manifest chunk is already multicast: the next
/// chunk goes out a chunk's worth of blocks before its first block, twice the
/// [`crate::wire::MANIFEST_LEAD`] receivers count on.
const MANIFEST_LOOKAHEAD: u32 = MANIFEST_CHUNK;
const _: () = assert!(MANIFEST_LOOKAHEAD >= 2 * crate::wire::MANIFEST_LEAD);

/// Most GROUP-HASHES waiting to go out (more requests wait for the receivers' retry).
const MAX_GROUP_LIST_QUEUE: usize = 1024;

/// Bytes a GROUP-HASHES of a whole group takes from the token bucket.
const GROUP_LIST_WIRE: usize =
    crate::manifest::GROUP_POSITIONS as usize * crate::wire::ENTRY_LEN + 5 + crate::wire::DATA_OVERHEAD;

/// Bytes a full MANIFEST chunk takes from the token bucket.
const MANIFEST_WIRE: usize = crate::wire::chunk_group_hashes(MANIFEST_CHUNK) * crate::wire::HASH_LEN
    + crate::wire::SIGNATURE_LEN
    + crate::wire::DATA_OVERHEAD;

impl SenderConfig {
    /// Defaults for a session multicast to `group`.
    pub fn new(
        session_id: u32,
        image_id: [u8; 16],
        image_size: u64,
        block_size: u16,
        session_key: [u8; 16],
        group: SocketAddr,
    ) -> Self {
        SenderConfig {
            session_id,
            image_id,
            group,
            image_size,
            block_size,
            order: Vec::new(),
            append_remaining: true,
            rate: 50_000_000,
            burst: 64 * 1024,
            solicit: Solicitation {
                window: Duration::from_secs(2),
                min_receivers: 1,
                start_at: None,
            },
            mode: Mode::Stream,
            session_key,
            site_secret: [0; 32],
            ack_every: 16,
            fec_group: 4096,
            allow_late_join: true,
            max_receivers: 4096,
            announce_interval: Duration::from_millis(200),
            dead_timeout: Duration::from_secs(3),
            status_timeout: Duration::from_millis(100),
            status_retries: 5,
            laggard_after: Duration::from_millis(500),
            requester_timeout: Duration::from_millis(50),
            role_retries: 2,
            max_rounds: 64,
            done_delay: Duration::from_millis(10),
            manifest: None,
        }
    }
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting registrations.
    Soliciting,
    /// Multicasting the stream.
    Streaming,
    /// Lock-step, driven by read requesters.
    LockStep,
    /// DONE / STATUS / repair rounds.
    Repairing,
    /// Every live receiver is complete (or was given up).
    Finished,
}

/// A receiver's standing with the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// In the multicast window.
    Live,
    /// Fell persistently behind: out of the window, served by unicast.
    Laggard,
    /// Stopped answering.
    Dead,
    /// Sent LEAVE.
    Left,
    /// Still incomplete after the last repair round.
    GivenUp,
}

/// Public view of one receiver.
#[derive(Debug, Clone)]
pub struct ReceiverInfo {
    /// Receiver id.
    pub id: u32,
    /// Address.
    pub addr: SocketAddr,
    /// Standing.
    pub state: PeerState,
    /// Reported complete.
    pub complete: bool,
    /// Stream position when it registered (0 unless a late joiner).
    pub joined_at: u32,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Datagrams sent / bytes sent (multicast counted once).
    pub packets_sent: u64,
    /// Bytes of all datagrams sent.
    pub bytes_sent: u64,
    /// DATA datagrams (first pass).
    pub data_sent: u64,
    /// FEC datagrams (multicast, and unicast to one receiver).
    pub fec_sent: u64,
    /// FEC datagrams sent by unicast to one receiver (included in `fec_sent`).
    pub fec_unicast: u64,
    /// REPAIR datagrams sent by multicast.
    pub repair_multicast: u64,
    /// REPAIR datagrams sent by unicast.
    pub repair_unicast: u64,
    /// Control datagrams (ANNOUNCE, REGISTERED, DONE, ROLE).
    pub control_sent: u64,
    /// Repair rounds run.
    pub rounds: u32,
    /// Receivers registered (including late joiners).
    pub registered: u32,
    /// Receivers that registered after the stream started.
    pub late_joined: u32,
    /// Receivers declared dead.
    pub dead: u32,
    /// Receivers declared dead that were heard again and taken back (a receiver starved
    /// of CPU falls silent for a while; it is not gone).
    pub revived: u32,
    /// Receivers moved to unicast.
    pub laggards: u32,
    /// Receivers given up after the last round.
    pub given_up: u32,
    /// Lock-step role passes because the requester did not answer.
    pub role_skips: u32,
    /// Datagrams that failed to decode.
    pub malformed: u64,
    /// Datagrams with a bad tag (forged) or from an unknown receiver.
    pub forged: u64,
    /// Datagrams for another session.
    pub wrong_session: u64,
    /// Datagrams with absurd values (ACK beyond what was sent, positions out of range).
    pub absurd: u64,
    /// STATUS / READ-REQUEST beyond what one receiver may send (NAK floods).
    pub flood_dropped: u64,
    /// STATUS datagrams merged into the repair rounds' picture (an answer that lists
    /// more than one datagram holds takes several, see [`crate::wire::MAX_STATUS_PARTS`]).
    pub status_parts: u64,
    /// REGISTERs refused: registrations closed, or `max_receivers` live already.
    pub registrations_refused: u64,
    /// Receivers that left, died or were given up, forgotten to keep the list bounded.
    pub peers_forgotten: u64,
    /// MANIFEST chunks multicast (ahead of their first block, and asked for again).
    pub manifest_sent: u64,
    /// MANIFEST-REQUESTs accepted.
    pub manifest_requests: u64,
    /// GROUP-HASHES multicast (a receiver's group failed its check or was raced; their
    /// bytes count in `manifest_bytes`).
    pub group_lists_sent: u64,
    /// GROUP-HASHES asked for and not queued: sent within [`MANIFEST_RESEND`], queued
    /// already, or the queue full (a flood of MANIFEST-REQUESTs for lists).
    pub group_lists_refused: u64,
    /// Bytes of the MANIFEST datagrams (included in `bytes_sent`).
    pub manifest_bytes: u64,
    /// Bytes of the control datagrams (included in `bytes_sent`).
    pub control_bytes: u64,
}

#[derive(Debug)]
struct Peer {
    id: u32,
    addr: SocketAddr,
    nonce: u64,
    key: MacKey,
    state: PeerState,
    /// Positions below this fit in its cache (exclusive).
    limit: u32,
    last_heard: Instant,
    complete: bool,
    joined_at: u32,
    /// Since when it has held the window closed (see `note_blocked`).
    blocking_since: Option<Instant>,
    /// When it was last seen holding the window closed.
    last_blocked: Option<Instant>,
    /// The round its last STATUS answered, which parts of that answer are in (bit
    /// `part`), and how many parts the answer takes.
    status_round: Option<u32>,
    /// Said it heard DONE(FINISHED).
    heard_end: bool,
    status_parts: u32,
    status_expected: u8,
    status_dups: u32,
    free_slots: u32,
    missing: Option<Bitset>,
    missing_total: u32,
    /// `missing_total` at the previous round it answered.
    missing_before: u32,
    /// Rounds in a row without progress.
    idle_rounds: u32,
    individual_pending: u32,
}

impl Peer {
    fn active(&self) -> bool {
        matches!(self.state, PeerState::Live | PeerState::Laggard)
    }
    /// Every part of its answer to DONE(`round`) is in.
    fn answered(&self, round: u32) -> bool {
        let all = (1u64 << self.status_expected.max(1)) - 1;
        self.status_round == Some(round) && self.status_parts as u64 & all == all
    }
    /// STATUS datagrams it may send for one round beyond those merged: the answers to
    /// the repeated DONEs (every part each time), and as many again. More is a flood.
    fn status_allowance(&self, retries: u32) -> u32 {
        2 * (retries + 1) * self.status_expected.max(1) as u32
    }
}

#[derive(Debug)]
enum Out {
    Announce,
    Registered(usize),
    Done { round: u32, finished: bool },
    Role,
}

/// A recovery symbol: its index and bytes.
type Shard = (u16, Box<[u8]>);

#[derive(Debug)]
enum RepairItem {
    Fec {
        group: u32,
        total: u16,
        index: u16,
        shard: Box<[u8]>,
        /// One receiver alone (the others have what they need), or the group.
        to: Option<usize>,
    },
    Raw {
        pos: u32,
        to: Option<usize>,
    },
}

#[derive(Debug)]
enum Stage {
    /// Last packet of the pass sent; DONE goes out at `until` (stragglers land first).
    Settle { until: Instant },
    /// DONE(round) sent at `since`, waiting for STATUS until `deadline`. Once nearly
    /// every receiver answered, `quorum`: the deadline is brought in and planning starts
    /// there with the answers at hand instead of repeating DONE.
    Collect { since: Instant, deadline: Instant, retries: u32, quorum: bool },
    /// Answers in (or retries exhausted): plan at the next poll_transmit.
    Plan,
    /// Sending the round's repair queue.
    Send,
    /// Finished: repeat DONE(FINISHED) a few times.
    Closing { left: u32, next: Instant },
}

#[derive(Debug)]
struct LockStep {
    round: u32,
    requester: Option<usize>,
    deadline: Instant,
    retries: u32,
}

/// One streaming session (sans-I/O).
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    site: MacKey,
    key: MacKey,
    order: Vec<u32>,
    groups: Groups,
    block_count: u32,
    phase: Phase,
    created: Instant,
    solicit_deadline: Instant,
    next_announce: Instant,
    /// Announce period while streaming: starts short (late joiners near the start of the
    /// stream miss little) and doubles up to `announce_interval`.
    announce_every: Duration,
    peers: Vec<Peer>,
    by_id: HashMap<u32, usize>,
    by_addr: HashMap<SocketAddr, usize>,
    next_id: u32,
    bucket: TokenBucket,
    cursor: u32,
    window_min: u32,
    out: VecDeque<(SocketAddr, Out)>,
    /// Data the lock-step requester asked for (multicast) and individual repairs.
    lock_queue: VecDeque<(u32, Option<usize>)>,
    lock: Option<LockStep>,
    round: u32,
    stage: Stage,
    repair: VecDeque<RepairItem>,
    fec_next: Vec<u16>,
    loss_est: f64,
    block_buf: Vec<u8>,
    stats: SenderStats,
    failure: Option<String>,
    manifest: SessionManifest,
    /// Chunks multicast at least once: a block goes out only after its chunk did.
    chunk_pushed: Bitset,
    chunk_queued: Bitset,
    chunk_last_sent: Vec<Option<Instant>>,
    manifest_queue: VecDeque<u32>,
    /// Hash groups whose GROUP-HASHES were asked for, and when each last went out.
    group_list_queue: VecDeque<u32>,
    group_list_sent: HashMap<u32, Instant>,
    /// Chunks below this were multicast ahead of their blocks (or with them).
    manifest_ahead: u32,
    /// The first DATA goes out no earlier (its manifest chunks go first).
    data_not_before: Instant,
}

fn block_len(image_size: u64, bs: u16, block: u32) -> usize {
    let start = block as u64 * bs as u64;
    (image_size - start).min(bs as u64) as usize
}

impl Sender {
    /// Creates the session at `now`; the solicitation window starts.
    pub fn new(now: Instant, cfg: SenderConfig) -> Result<Self, StreamError> {
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&cfg.block_size) || cfg.block_size % 2 != 0 {
            return Err(StreamError::Config("block_size must be even, 64..=8192"));
        }
        if cfg.image_size == 0 {
            return Err(StreamError::Config("image_size must be > 0"));
        }
        let bc = cfg.image_size.div_ceil(cfg.block_size as u64);
        if bc > u32::MAX as u64 - 1 {
            return Err(StreamError::Config("image has too many blocks"));
        }
        let block_count = bc as u32;
        let Some(manifest) = cfg.manifest.clone() else {
            return Err(StreamError::Config("a sender needs its signed manifest"));
        };
        if manifest.image_size() != cfg.image_size || manifest.block_size() != cfg.block_size {
            return Err(StreamError::Config("the manifest is for another image size or block size"));
        }
        if !(1..=MAX_FEC_GROUP).contains(&cfg.fec_group) {
            return Err(StreamError::Config("fec_group must be 1..=32768"));
        }
        if cfg.ack_every == 0 || cfg.rate == 0 {
            return Err(StreamError::Config("ack_every and rate must be > 0"));
        }
        let mut seen = Bitset::new(block_count);
        let mut order = Vec::with_capacity(block_count as usize);
        for &b in &cfg.order {
            if b >= block_count {
                return Err(StreamError::Config("order names a block beyond the image"));
            }
            if !seen.set(b) {
                return Err(StreamError::Config("order names a block twice"));
            }
            order.push(b);
        }
        if cfg.order.is_empty() || cfg.append_remaining {
            for b in 0..block_count {
                if !seen.get(b) {
                    order.push(b);
                }
            }
        }
        let stream_len = order.len() as u32;
        let manifest = SessionManifest::new(manifest, &order);
        let chunks = manifest.chunks();
        let groups = Groups {
            group: cfg.fec_group,
            stream_len,
        };
        let site = MacKey::site(&cfg.site_secret);
        let key = MacKey::session(&cfg.session_key, cfg.session_id);
        let mut s = Sender {
            site,
            key,
            groups,
            block_count,
            phase: Phase::Soliciting,
            created: now,
            solicit_deadline: now + cfg.solicit.window,
            next_announce: now,
            announce_every: cfg.announce_interval,
            peers: Vec::new(),
            by_id: HashMap::new(),
            by_addr: HashMap::new(),
            next_id: 1,
            bucket: TokenBucket::new(now, cfg.rate, cfg.burst),
            cursor: 0,
            window_min: 0,
            out: VecDeque::new(),
            lock_queue: VecDeque::new(),
            lock: None,
            round: 0,
            stage: Stage::Plan,
            repair: VecDeque::new(),
            fec_next: vec![0; groups.count() as usize],
            loss_est: 0.05,
            block_buf: vec![0; cfg.block_size as usize + FEC_SHARD_PREFIX],
            stats: SenderStats::default(),
            failure: None,
            manifest,
            chunk_pushed: Bitset::new(chunks),
            chunk_queued: Bitset::new(chunks),
            chunk_last_sent: vec![None; chunks as usize],
            manifest_queue: VecDeque::new(),
            group_list_queue: VecDeque::new(),
            group_list_sent: HashMap::new(),
            manifest_ahead: 0,
            data_not_before: now,
            order,
            cfg,
        };
        s.out.push_back((s.cfg.group, Out::Announce));
        s.next_announce = now + s.cfg.announce_interval;
        Ok(s)
    }

    /// Session id.
    pub fn session_id(&self) -> u32 {
        self.cfg.session_id
    }
    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// Whether the session is over (and its closing DONEs sent).
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
            && self.out.is_empty()
            && matches!(self.stage, Stage::Closing { left: 0, .. })
    }
    /// Counters.
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }
    /// Number of positions in the stream.
    pub fn stream_len(&self) -> u32 {
        self.groups.stream_len
    }
    /// The next stream position the first pass sends (lock-step: the next one asked
    /// for); `stream_len()` once the pass is over.
    pub fn position(&self) -> u32 {
        self.cursor
    }
    /// The block streamed at each position.
    pub fn order(&self) -> &[u32] {
        &self.order
    }
    /// The receivers.
    pub fn receivers(&self) -> impl Iterator<Item = ReceiverInfo> + '_ {
        self.peers.iter().map(|p| ReceiverInfo {
            id: p.id,
            addr: p.addr,
            state: p.state,
            complete: p.complete,
            joined_at: p.joined_at,
        })
    }

    fn announce(&self, now: Instant) -> Announce {
        let mut flags = 0;
        if self.cfg.mode == Mode::LockStep {
            flags |= Announce::LOCKSTEP;
        }
        if self.cfg.allow_late_join {
            flags |= Announce::LATE_JOIN;
        }
        if self.phase != Phase::Soliciting {
            flags |= Announce::STREAMING;
        }
        let solicit_ms = if self.phase == Phase::Soliciting {
            self.solicit_deadline
                .saturating_duration_since(now)
                .as_millis()
                .min(u32::MAX as u128) as u32
        } else {
            0
        };
        let mut a = Announce {
            image_id: self.cfg.image_id,
            image_size: self.cfg.image_size,
            block_size: self.cfg.block_size,
            block_count: self.block_count,
            stream_len: self.groups.stream_len,
            fec_group: self.cfg.fec_group,
            rate: self.cfg.rate,
            solicit_ms,
            ack_every: self.cfg.ack_every,
            flags,
            manifest_root: [0; 32],
            signature: [0; 64],
        };
        self.manifest.sign_announce(self.cfg.session_id, &mut a);
        a
    }

    fn accepting_registrations(&self) -> bool {
        match self.phase {
            Phase::Soliciting => true,
            Phase::Finished => false,
            _ => self.cfg.allow_late_join,
        }
    }

    /// Feeds one datagram received from `from`.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let pkt = match Packet::decode(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if pkt.session != self.cfg.session_id {
            self.stats.wrong_session += 1;
            return;
        }
        match pkt.body {
            Body::Register(r) => {
                if !self.site.verify(bytes) {
                    self.stats.forged += 1;
                    return;
                }
                self.on_register(now, from, r.nonce, r.cache_slots);
            }
            Body::Ack(a) => {
                let Some(i) = self.authenticate(from, a.receiver, bytes) else {
                    return;
                };
                self.peers[i].last_heard = now;
                if a.highest > self.cursor.max(self.peers[i].joined_at) {
                    // Claims positions that were never sent.
                    self.stats.absurd += 1;
                    return;
                }
                let p = &mut self.peers[i];
                let lim = (a.highest as u64 + a.free_slots as u64).min(u32::MAX as u64) as u32;
                if lim > p.limit {
                    p.limit = lim;
                }
                if a.contig >= self.groups.stream_len && !p.complete {
                    // It holds every position (a receiver ACKs as it completes): no need
                    // to wait for its STATUS in the repair rounds.
                    p.complete = true;
                    p.missing = None;
                    p.missing_total = 0;
                    if self.phase == Phase::Repairing {
                        self.check_answers(now);
                    }
                }
            }
            Body::Status(s) => {
                let Some(i) = self.authenticate(from, s.receiver, bytes) else {
                    return;
                };
                self.peers[i].last_heard = now;
                self.on_status(now, i, s);
            }
            Body::ReadRequest(q) => {
                let Some(i) = self.authenticate(from, q.receiver, bytes) else {
                    return;
                };
                self.peers[i].last_heard = now;
                self.on_read_request(now, i, q);
            }
            Body::ManifestRequest(q) => {
                let Some(i) = self.authenticate(from, q.receiver, bytes) else {
                    return;
                };
                self.peers[i].last_heard = now;
                self.stats.manifest_requests += 1;
                for c in q.chunks {
                    if c & GROUP_LIST_FLAG != 0 {
                        self.queue_group_list(now, c & !GROUP_LIST_FLAG);
                        continue;
                    }
                    if c >= self.manifest.chunks() {
                        self.stats.absurd += 1;
                        continue;
                    }
                    let recent = self.chunk_last_sent[c as usize]
                        .is_some_and(|t| now.saturating_duration_since(t) < MANIFEST_RESEND);
                    if !recent && self.chunk_queued.set(c) {
                        // Only resends count: a receiver asks for a chunk it lost right
                        // after the first copy went out, and must get it again.
                        self.chunk_last_sent[c as usize] = Some(now);
                        self.manifest_queue.push_back(c);
                    }
                }
            }
            Body::Leave(l) => {
                let Some(i) = self.authenticate(from, l.receiver, bytes) else {
                    return;
                };
                if self.phase == Phase::Finished {
                    // It heard DONE(FINISHED) (a receiver answers it with LEAVE); its
                    // standing stays what the session made it. Once every receiver has,
                    // nobody is left to repeat DONE(FINISHED) for.
                    self.peers[i].heard_end = true;
                    if self.peers.iter().all(|p| !p.active() || p.heard_end) {
                        if let Stage::Closing { left, .. } = &mut self.stage {
                            *left = 0;
                        }
                    }
                } else if self.peers[i].active() {
                    self.peers[i].state = PeerState::Left;
                    self.peer_gone(now, i);
                }
            }
            // Sender-originated types arriving here: someone replaying our own traffic.
            _ => self.stats.forged += 1,
        }
    }

    fn authenticate(&mut self, from: SocketAddr, id: u32, bytes: &[u8]) -> Option<usize> {
        let Some(&i) = self.by_id.get(&id) else {
            self.stats.forged += 1;
            return None;
        };
        let p = &self.peers[i];
        if p.addr != from || !p.key.verify(bytes) {
            self.stats.forged += 1;
            return None;
        }
        if p.state == PeerState::Dead && self.phase != Phase::Finished {
            // Declared dead for its silence, yet it speaks: it was only slow (starved of
            // CPU, its answers late or lost). Ending the session without it would leave a
            // live receiver incomplete. Back in the stream it does not hold the window
            // (its limit is stale); in the repair rounds it is asked like everyone else.
            let p = &mut self.peers[i];
            p.state = if self.phase == Phase::Repairing { PeerState::Live } else { PeerState::Laggard };
            p.missing = None;
            p.idle_rounds = 0;
            self.stats.revived += 1;
        }
        if !self.peers[i].active() {
            return None;
        }
        Some(i)
    }

    fn on_register(&mut self, now: Instant, from: SocketAddr, nonce: u64, cache_slots: u32) {
        if let Some(&i) = self.by_addr.get(&from) {
            if self.peers[i].nonce == nonce && self.peers[i].active() {
                // Our REGISTERED was lost: answer again.
                self.peers[i].last_heard = now;
                self.out
                    .push_back((from, Out::Registered(i)));
                return;
            }
            if self.peers[i].active() {
                // Same address, new nonce: the receiver restarted. Retire the old one.
                self.peers[i].state = PeerState::Left;
                self.peer_gone(now, i);
            }
        }
        if self.peers.len() >= self.peer_cap() {
            self.forget_retired();
        }
        if !self.accepting_registrations() || self.live_count() >= self.cfg.max_receivers as usize {
            self.stats.registrations_refused += 1;
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let joined_at = if self.phase == Phase::Soliciting {
            0
        } else {
            self.stats.late_joined += 1;
            self.cursor
        };
        let cache_slots = cache_slots.min(MAX_CACHE_SLOTS);
        let idx = self.peers.len();
        self.peers.push(Peer {
            id,
            addr: from,
            nonce,
            key: MacKey::receiver(&self.key, id, nonce),
            state: PeerState::Live,
            limit: joined_at.saturating_add(cache_slots),
            last_heard: now,
            complete: false,
            joined_at,
            blocking_since: None,
            last_blocked: None,
            status_round: None,
            heard_end: false,
            status_parts: 0,
            status_expected: 1,
            status_dups: 0,
            free_slots: cache_slots,
            missing: None,
            missing_total: 0,
            missing_before: u32::MAX,
            idle_rounds: 0,
            individual_pending: 0,
        });
        self.by_id.insert(id, idx);
        self.by_addr.insert(from, idx);
        self.stats.registered += 1;
        self.out
            .push_back((from, Out::Registered(idx)));
        self.recompute_window();
        if self.phase == Phase::Soliciting {
            let start_at = self.cfg.solicit.start_at.is_some_and(|n| self.live_count() >= n as usize);
            // After the window, the registration that makes enough receivers starts it.
            if start_at || (now >= self.solicit_deadline && self.enough_to_start()) {
                self.start(now);
            }
        }
    }

    /// Receivers remembered at most, live and retired: retired ones are kept (for the
    /// report, and to recognise their stragglers) until there are as many as live ones
    /// may be.
    fn peer_cap(&self) -> usize {
        2 * self.cfg.max_receivers.max(1) as usize
    }

    /// Drops the receivers that left, died or were given up. Whatever refers to a
    /// receiver by its index is renumbered; what was still queued for a forgotten one
    /// (a REGISTERED, a unicast repair) goes with it.
    fn forget_retired(&mut self) {
        let mut map = vec![usize::MAX; self.peers.len()];
        let before = self.peers.len();
        let mut kept = Vec::with_capacity(before);
        for (i, p) in std::mem::take(&mut self.peers).into_iter().enumerate() {
            if p.active() {
                map[i] = kept.len();
                kept.push(p);
            }
        }
        self.peers = kept;
        self.stats.peers_forgotten += (before - self.peers.len()) as u64;
        let renumber = |i: &mut usize| match map[*i] {
            usize::MAX => false,
            n => {
                *i = n;
                true
            }
        };
        self.out.retain_mut(|(_, o)| match o {
            Out::Registered(i) => renumber(i),
            _ => true,
        });
        self.lock_queue.retain_mut(|(_, to)| to.as_mut().is_none_or(&renumber));
        self.repair.retain_mut(|it| match it {
            RepairItem::Raw { to: Some(i), .. } => renumber(i),
            _ => true,
        });
        if let Some(l) = self.lock.as_mut() {
            l.requester = l.requester.filter(|&r| map[r] != usize::MAX).map(|r| map[r]);
        }
        self.by_id = self.peers.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        self.by_addr = self.peers.iter().enumerate().map(|(i, p)| (p.addr, i)).collect();
    }

    fn live_count(&self) -> usize {
        self.peers.iter().filter(|p| p.active()).count()
    }

    /// Takes one STATUS datagram: a part of a receiver's answer to this round's DONE.
    /// The parts of one answer are merged (a union: parts of answers to a repeated DONE
    /// may overlap); the receiver has answered once all of them are in. Per receiver and
    /// round at most [`crate::wire::MAX_STATUS_PARTS`] parts are merged, each bounded by
    /// the codec; repeats count against [`Peer::status_allowance`], beyond which they
    /// are counted as a flood.
    fn on_status(&mut self, now: Instant, i: usize, s: Status) {
        let retries = self.cfg.status_retries;
        if self.phase != Phase::Repairing || s.round != self.round {
            // Stale or premature: harmless, but count floods.
            let p = &mut self.peers[i];
            p.status_dups += 1;
            if p.status_dups > p.status_allowance(retries) {
                self.stats.flood_dropped += 1;
            }
            return;
        }
        let p = &mut self.peers[i];
        let bit = 1u32 << s.part;
        if p.status_round == Some(self.round) && (p.status_parts & bit != 0 || p.complete) {
            // Answers to repeated DONEs are expected; more than that is a flood.
            p.status_dups += 1;
            if p.status_dups > p.status_allowance(retries) {
                self.stats.flood_dropped += 1;
            }
            return;
        }
        let stream_len = self.groups.stream_len;
        let mut beyond = false;
        s.missing.for_each(|pos| beyond |= pos >= stream_len);
        if beyond || s.total_missing > stream_len {
            self.stats.absurd += 1;
            return;
        }
        self.stats.status_parts += 1;
        let p = &mut self.peers[i];
        let first = p.status_round != Some(self.round);
        if first {
            p.status_round = Some(self.round);
            p.status_parts = 0;
        }
        p.status_parts |= bit;
        p.status_expected = s.parts;
        p.free_slots = s.free_slots;
        if s.flags & Status::COMPLETE != 0 {
            p.complete = true;
            p.missing = None;
            p.missing_total = 0;
        } else {
            let mut bits = p.missing.take().unwrap_or_else(|| Bitset::new(stream_len));
            if first {
                bits.clear_all();
            }
            s.missing.for_each(|pos| {
                bits.set(pos);
            });
            p.missing = Some(bits);
            p.missing_total = s.total_missing;
        }
        self.check_answers(now);
    }

    /// During collection: plans once every receiver not known complete answered; once
    /// nearly all did, waits for the rest only as long again as the answers took so far.
    /// The repair symbols cover the silent few as well (they are sized for the worst of
    /// many), and whoever is still incomplete answers the next round's DONE.
    ///
    /// Between a pass (or a round's repairs) and its DONE, a session whose receivers all
    /// said they are complete (their ACK at completion) plans at once, which ends it:
    /// nothing waits for the settle timer.
    fn check_answers(&mut self, now: Instant) {
        if let Stage::Settle { .. } = self.stage {
            if self.peers.iter().all(|p| !p.active() || p.complete) && !self.awaiting_dead(now) {
                self.stage = Stage::Plan;
            }
            return;
        }
        let Stage::Collect { since, deadline, retries, quorum } = self.stage else {
            return;
        };
        let round = self.round;
        let (mut expected, mut answered) = (0usize, 0usize);
        for p in self.peers.iter().filter(|p| p.active() && !p.complete) {
            expected += 1;
            answered += p.answered(round) as usize;
        }
        if answered == expected && (expected > 0 || !self.awaiting_dead(now)) {
            self.stage = Stage::Plan;
        } else if !quorum && expected > 0 && answered * 4 >= expected * 3 {
            // (With none expected, only receivers declared dead are asked: the DONE is
            // repeated at the status timeout, not cut short.)
            let waited = now.saturating_duration_since(since);
            self.stage = Stage::Collect {
                since,
                deadline: deadline.min(now + waited.max(Duration::from_micros(100))),
                retries,
                quorum: true,
            };
        }
    }

    /// Whether a receiver declared dead may still be only late: the session does not end
    /// before each incomplete one has been silent for twice the dead timeout, asked by
    /// DONE all along (an answer takes it back, see `authenticate`).
    fn awaiting_dead(&self, now: Instant) -> bool {
        self.peers.iter().any(|p| {
            p.state == PeerState::Dead && !p.complete && now < p.last_heard + 2 * self.cfg.dead_timeout
        })
    }

    fn on_read_request(&mut self, now: Instant, i: usize, q: ReadRequest) {
        if q.pos >= self.groups.stream_len {
            self.stats.absurd += 1;
            return;
        }
        if q.kind == ReadRequest::INDIVIDUAL {
            if q.pos >= self.cursor.max(1) && self.phase != Phase::Repairing {
                self.stats.absurd += 1;
                return;
            }
            if self.peers[i].individual_pending >= 64 {
                self.stats.flood_dropped += 1;
                return;
            }
            self.peers[i].individual_pending += 1;
            self.lock_queue.push_back((q.pos, Some(i)));
            return;
        }
        let Some(ls) = self.lock.as_mut() else {
            return;
        };
        if self.phase != Phase::LockStep || ls.requester != Some(i) || q.round != ls.round {
            return; // stale or not the requester: ignore
        }
        self.lock_queue.push_back((q.pos, None));
        self.cursor = self.cursor.max(q.pos + 1);
        self.pass_role(now, false);
    }

    /// Gives the requester role to the next live receiver (round-robin).
    fn pass_role(&mut self, now: Instant, skipped: bool) {
        if skipped {
            self.stats.role_skips += 1;
        }
        if self.cursor >= self.groups.stream_len {
            self.lock = None;
            self.begin_repair(now);
            return;
        }
        let n = self.peers.len();
        let start = self
            .lock
            .as_ref()
            .and_then(|l| l.requester)
            .map_or(0, |r| r + 1);
        let next = (0..n)
            .map(|k| (start + k) % n)
            .find(|&k| self.peers[k].state == PeerState::Live);
        let round = self.lock.as_ref().map_or(0, |l| l.round + 1);
        self.lock = Some(LockStep {
            round,
            requester: next,
            deadline: now + self.cfg.requester_timeout,
            retries: 0,
        });
        if next.is_some() {
            self.out.push_back((self.cfg.group, Out::Role));
        } else {
            // Nobody left to drive: go straight to the (empty) repair phase.
            self.lock = None;
            self.begin_repair(now);
        }
    }

    fn start(&mut self, now: Instant) {
        if self.cfg.mode == Mode::LockStep {
            self.phase = Phase::LockStep;
            self.lock = None;
            self.pass_role(now, false);
            if let Some(l) = self.lock.as_mut() {
                l.round = 1;
            }
        } else {
            self.phase = Phase::Streaming;
            // The first chunks of the manifest go out alone, `done_delay` (the allowance
            // for reordering) ahead of the first block: a block that overtakes its chunk
            // could not be verified and would be dropped.
            let ahead = MANIFEST_LOOKAHEAD.min(self.groups.stream_len.saturating_sub(1)) / MANIFEST_CHUNK;
            while self.manifest_ahead <= ahead {
                let c = self.manifest_ahead;
                if self.chunk_pushed.set(c) && self.chunk_queued.set(c) {
                    self.manifest_queue.push_back(c);
                }
                self.manifest_ahead += 1;
            }
            self.data_not_before = now + self.cfg.done_delay;
        }
        self.out.push_back((self.cfg.group, Out::Announce));
        self.announce_every = (self.cfg.announce_interval / 64).max(Duration::from_micros(500));
        self.next_announce = now + self.announce_every;
    }

    fn peer_gone(&mut self, now: Instant, i: usize) {
        // What it was missing is of no use any more (and is stream_len bits).
        self.peers[i].missing = None;
        self.recompute_window();
        if self.phase == Phase::LockStep {
            if let Some(l) = &self.lock {
                if l.requester == Some(i) {
                    self.pass_role(now, true);
                }
            }
        }
        if self.phase == Phase::Repairing {
            self.check_answers(now);
        }
    }

    fn recompute_window(&mut self) {
        self.window_min = self
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Live)
            .map(|p| p.limit)
            .min()
            .unwrap_or(u32::MAX);
    }

    fn begin_repair(&mut self, now: Instant) {
        self.phase = Phase::Repairing;
        self.round = 0;
        self.stage = Stage::Settle {
            until: now + self.cfg.done_delay,
        };
        self.check_answers(now);
    }

    fn send_done(&mut self, now: Instant) {
        for p in &mut self.peers {
            p.status_dups = 0;
        }
        self.stage = Stage::Collect {
            since: now,
            deadline: now + self.cfg.status_timeout,
            retries: 0,
            quorum: false,
        };
        self.check_answers(now);
        if matches!(self.stage, Stage::Plan) {
            return; // every receiver said it is complete: nothing to ask
        }
        self.out.push_back((
            self.cfg.group,
            Out::Done {
                round: self.round,
                finished: false,
            },
        ));
    }

    /// Over: DONE(FINISHED) now and twice more, `status_timeout` apart.
    fn finish(&mut self, now: Instant) {
        self.phase = Phase::Finished;
        self.repair.clear();
        self.out.push_back((self.cfg.group, Out::Done { round: self.round, finished: true }));
        self.stage = Stage::Closing { left: 2, next: now + self.cfg.status_timeout };
    }

    /// Runs timers: solicitation end, announces, dead receivers, laggards, lock-step
    /// requester timeouts, STATUS collection deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_announce
            && (self.phase == Phase::Soliciting
                || (self.cfg.allow_late_join && self.phase != Phase::Finished))
        {
            self.out.push_back((self.cfg.group, Out::Announce));
            self.next_announce = now + self.announce_every;
            self.announce_every = (self.announce_every * 2).min(self.cfg.announce_interval);
        }
        if self.phase == Phase::Soliciting && now >= self.solicit_deadline && self.enough_to_start() {
            self.start(now);
        }
        // Dead receivers.
        let mut gone = Vec::new();
        for (i, p) in self.peers.iter_mut().enumerate() {
            if p.active() && now.saturating_duration_since(p.last_heard) >= self.cfg.dead_timeout {
                if p.complete {
                    // Complete receivers may go quiet; they are done, not dead.
                    continue;
                }
                p.state = PeerState::Dead;
                self.stats.dead += 1;
                gone.push(i);
            }
        }
        for i in gone {
            self.peer_gone(now, i);
        }
        match self.phase {
            Phase::Streaming => self.check_laggards(now),
            Phase::LockStep => {
                if let Some(l) = self.lock.as_mut() {
                    if now >= l.deadline {
                        if l.requester.is_some() && l.retries < self.cfg.role_retries {
                            l.retries += 1;
                            l.deadline = now + self.cfg.requester_timeout;
                            self.out.push_back((self.cfg.group, Out::Role));
                        } else {
                            self.pass_role(now, true);
                        }
                    }
                }
            }
            Phase::Repairing => match self.stage {
                Stage::Settle { until } if now >= until => self.send_done(now),
                Stage::Collect { deadline, retries, quorum, .. } if now >= deadline => {
                    if retries < self.cfg.status_retries && !quorum {
                        self.stage = Stage::Collect {
                            since: now,
                            deadline: now + self.cfg.status_timeout,
                            retries: retries + 1,
                            quorum: false,
                        };
                        self.out.push_back((
                            self.cfg.group,
                            Out::Done {
                                round: self.round,
                                finished: false,
                            },
                        ));
                    } else {
                        self.stage = Stage::Plan;
                    }
                }
                _ => {}
            },
            Phase::Finished => {
                if let Stage::Closing { left, next } = self.stage {
                    if left > 0 && now >= next {
                        self.out.push_back((
                            self.cfg.group,
                            Out::Done {
                                round: self.round,
                                finished: true,
                            },
                        ));
                        self.stage = Stage::Closing {
                            left: left - 1,
                            next: now + self.cfg.status_timeout,
                        };
                    }
                }
            }
            Phase::Soliciting => {}
        }
    }

    fn check_laggards(&mut self, now: Instant) {
        self.recompute_window();
        if self.cursor < self.window_min {
            return;
        }
        self.note_blocked(now);
        let cursor = self.cursor;
        let others_ahead = self
            .peers
            .iter()
            .any(|p| p.state == PeerState::Live && p.limit > cursor);
        if !others_ahead {
            return;
        }
        let mut moved = false;
        for p in &mut self.peers {
            let Some(since) = p.blocking_since.filter(|_| p.state == PeerState::Live && p.limit <= cursor) else {
                continue;
            };
            if now.saturating_duration_since(since) >= self.cfg.laggard_after {
                p.state = PeerState::Laggard;
                self.stats.laggards += 1;
                moved = true;
            }
        }
        if moved {
            self.recompute_window();
        }
    }

    /// The window is closed at the cursor: the receivers holding it start (or keep)
    /// their laggard clocks, the others stop theirs. A clock runs across short openings
    /// (a receiver that frees a few slots now and then still holds the group back) and
    /// restarts only after the stream ran freely past the receiver for `laggard_after`.
    fn note_blocked(&mut self, now: Instant) {
        let cursor = self.cursor;
        let gap = self.cfg.laggard_after;
        for p in &mut self.peers {
            if p.state != PeerState::Live {
                continue;
            }
            if p.limit > cursor {
                p.blocking_since = None;
                continue;
            }
            let resumed = p.last_blocked.is_none_or(|t| now.saturating_duration_since(t) > gap);
            if p.blocking_since.is_none() || resumed {
                p.blocking_since = Some(now);
            }
            p.last_blocked = Some(now);
        }
    }

    fn enough_to_start(&self) -> bool {
        self.live_count() >= self.cfg.solicit.min_receivers.max(1) as usize
    }

    /// When [`Sender::handle_timeout`] or [`Sender::poll_transmit`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| {
            t = Some(t.map_or(x, |y| y.min(x)));
        };
        if !self.out.is_empty()
            || matches!(self.stage, Stage::Plan) && self.phase == Phase::Repairing
        {
            // Control traffic is not paced: due at once.
            return Some(self.created);
        }
        if self.phase == Phase::Soliciting
            || (self.cfg.allow_late_join && self.phase != Phase::Finished)
        {
            at(self.next_announce);
        }
        if self.phase == Phase::Soliciting && self.enough_to_start() {
            // With too few receivers the window is extended: the next REGISTER that
            // makes enough starts the stream, no timer needed.
            at(self.solicit_deadline.max(self.created));
        }
        for p in &self.peers {
            if p.active() && !p.complete {
                at(p.last_heard + self.cfg.dead_timeout);
            }
        }
        // A queued manifest chunk, then a queued group list, goes before any block or
        // symbol (poll_inner's order): the bucket must hold the size of the first in line.
        let queued = if !self.manifest_queue.is_empty() {
            Some(MANIFEST_WIRE as u64)
        } else if !self.group_list_queue.is_empty() {
            Some(GROUP_LIST_WIRE as u64)
        } else {
            None
        };
        let pkt = queued.unwrap_or(self.cfg.block_size as u64 + 32);
        if queued.is_some() && self.phase != Phase::Finished {
            at(self.bucket.ready_at(pkt));
        }
        match self.phase {
            Phase::Streaming => {
                if self.cursor < self.window_min.min(self.groups.stream_len) {
                    at(self.bucket.ready_at(pkt).max(self.data_not_before));
                } else {
                    // The window is closed: an ACK opens it (handle), or a receiver that
                    // holds it alone while others could go on becomes a laggard.
                    let cursor = self.cursor;
                    let others_ahead = self
                        .peers
                        .iter()
                        .any(|p| p.state == PeerState::Live && p.limit > cursor);
                    if others_ahead {
                        for p in &self.peers {
                            if let (PeerState::Live, Some(s), true) = (p.state, p.blocking_since, p.limit <= cursor) {
                                at(s + self.cfg.laggard_after);
                            }
                        }
                    }
                }
            }
            Phase::LockStep => {
                if !self.lock_queue.is_empty() {
                    at(self.bucket.ready_at(pkt));
                }
                if let Some(l) = &self.lock {
                    at(l.deadline);
                }
            }
            Phase::Repairing => {
                if !self.repair.is_empty() || !self.lock_queue.is_empty() {
                    // An FEC symbol is larger than a block: waking for a block's worth of
                    // tokens would find too few for it, with nothing sent.
                    let next = match (queued, self.repair.front()) {
                        (None, Some(RepairItem::Fec { shard, .. })) => pkt.max((shard.len() + crate::wire::FEC_OVERHEAD) as u64),
                        _ => pkt,
                    };
                    at(self.bucket.ready_at(next));
                }
                match self.stage {
                    Stage::Collect { deadline, .. } => at(deadline),
                    Stage::Settle { until } => at(until),
                    _ => {}
                }
            }
            Phase::Finished => {
                if let Stage::Closing { left, next } = self.stage {
                    if left > 0 {
                        at(next);
                    }
                }
            }
            Phase::Soliciting => {}
        }
        t
    }

    /// Appends the next datagram to `buf` and says where it goes, if one is due (control
    /// first, then data paced by the token bucket and the receivers' window). Call until
    /// `None`.
    pub fn poll_transmit<S: BlockSource + ?Sized>(
        &mut self,
        now: Instant,
        source: &mut S,
        buf: &mut Vec<u8>,
    ) -> Option<Transmit> {
        loop {
            match self.poll_inner(now, source, buf) {
                Ok(Some(t)) => {
                    self.stats.packets_sent += 1;
                    self.stats.bytes_sent += t.size as u64;
                    return Some(t);
                }
                Ok(None) => return None,
                Err(StreamError::Internal) => continue,
                Err(e) => {
                    // The image cannot be read (or encoded): nothing sensible can follow.
                    self.abort(now, e.to_string());
                    continue;
                }
            }
        }
    }

    /// Ends the session because its data cannot be produced: receivers are told it is
    /// over (DONE FINISHED), and [`Sender::failure`] says why.
    fn abort(&mut self, now: Instant, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
        self.out.clear();
        self.lock_queue.clear();
        self.finish(now);
    }

    /// Why the session was aborted, if it was (its image could not be read).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    fn emit(&self, body: Body<'_>, key: &MacKey, to: SocketAddr, buf: &mut Vec<u8>) -> Result<Transmit, StreamError> {
        let size = Packet { session: self.cfg.session_id, body }.encode_append(key, buf)?;
        Ok(Transmit::new(to, size))
    }

    fn poll_inner<S: BlockSource + ?Sized>(
        &mut self,
        now: Instant,
        source: &mut S,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Transmit>, StreamError> {
        // Control first, unpaced.
        if let Some((dest, o)) = self.out.pop_front() {
            let body = match o {
                Out::Announce => Body::Announce(self.announce(now)),
                Out::Registered(i) => {
                    let p = &self.peers[i];
                    let pad = key_wrap_pad(&self.site, self.cfg.session_id, p.id, p.nonce);
                    Body::Registered(Registered {
                        receiver: p.id,
                        nonce: p.nonce,
                        wrapped_key: xor16(&self.cfg.session_key, &pad),
                    })
                }
                Out::Done { round, finished } => {
                    let mut d = Done {
                        round,
                        stream_len: self.groups.stream_len,
                        flags: if finished { Done::FINISHED } else { 0 },
                        signature: [0; SIGNATURE_LEN],
                    };
                    self.manifest.sign_done(self.cfg.session_id, &mut d);
                    Body::Done(d)
                }
                Out::Role => {
                    let Some(l) = &self.lock else {
                        return Err(StreamError::Internal);
                    };
                    let Some(r) = l.requester else {
                        return Err(StreamError::Internal);
                    };
                    let mut role = Role {
                        round: l.round,
                        requester: self.peers[r].id,
                        next_pos: self.cursor,
                        signature: [0; SIGNATURE_LEN],
                    };
                    self.manifest.sign_role(self.cfg.session_id, &mut role);
                    Body::Role(role)
                }
            };
            let key = match &body {
                Body::Announce(_) | Body::Registered(_) => &self.site,
                _ => &self.key,
            };
            let t = self.emit(body, key, dest, buf)?;
            self.stats.control_sent += 1;
            self.stats.control_bytes += t.size as u64;
            return Ok(Some(t));
        }
        // Planning a repair round is due at once (see poll_timeout), whatever the token
        // bucket says of the manifest chunks and group lists queued ahead of the repairs.
        if self.phase == Phase::Repairing && matches!(self.stage, Stage::Plan) {
            self.plan(now, source)?;
            return Err(StreamError::Internal); // loop again
        }
        if let (Some(&c), false) = (self.manifest_queue.front(), self.phase == Phase::Finished) {
            if !self.bucket.try_take(now, MANIFEST_WIRE as u64) {
                return Ok(None);
            }
            let Some(chunk) = self.manifest.chunk(c) else {
                self.manifest_queue.pop_front();
                return Err(StreamError::Internal);
            };
            let body = Body::Manifest(ManifestChunk {
                first: chunk.first,
                positions: chunk.positions,
                group_hashes: chunk.group_hashes,
                signature: chunk.signature,
            });
            let size = Packet { session: self.cfg.session_id, body }.encode_append(&self.key, buf)?;
            let t = Transmit::new(self.cfg.group, size);
            self.manifest_queue.pop_front();
            self.chunk_queued.clear(c);
            self.chunk_pushed.set(c);
            self.stats.manifest_sent += 1;
            self.stats.manifest_bytes += t.size as u64;
            return Ok(Some(t));
        }
        if let (Some(&g), false) = (self.group_list_queue.front(), self.phase == Phase::Finished) {
            if !self.bucket.try_take(now, GROUP_LIST_WIRE as u64) {
                return Ok(None);
            }
            self.group_list_queue.pop_front();
            let Some(entries) = self.manifest.group_list(g, &self.order) else {
                return Err(StreamError::Internal);
            };
            let body = Body::GroupHashes(crate::wire::GroupHashes { group: g, entries: &entries });
            let size = Packet { session: self.cfg.session_id, body }.encode_append(&self.key, buf)?;
            let t = Transmit::new(self.cfg.group, size);
            self.stats.group_lists_sent += 1;
            self.stats.manifest_bytes += t.size as u64;
            return Ok(Some(t));
        }
        match self.phase {
            Phase::Soliciting | Phase::Finished => Ok(None),
            Phase::Streaming => {
                if now < self.data_not_before {
                    return Ok(None);
                }
                if self.cursor >= self.groups.stream_len {
                    self.begin_repair(now);
                    return Err(StreamError::Internal); // loop again to emit DONE
                }
                if self.cursor >= self.window_min {
                    self.recompute_window();
                    if self.cursor >= self.window_min {
                        // Closed again: a receiver whose laggard clock ran out while the
                        // window was briefly open leaves it now, not at a timer that is
                        // already past.
                        self.check_laggards(now);
                        if self.cursor >= self.window_min {
                            return Ok(None);
                        }
                        return Err(StreamError::Internal);
                    }
                }
                let pos = self.cursor;
                let Some(size) = self.encode_block(pos, false, now, source, buf)? else {
                    return Ok(None);
                };
                self.cursor += 1;
                self.stats.data_sent += 1;
                Ok(Some(Transmit::new(self.cfg.group, size)))
            }
            Phase::LockStep | Phase::Repairing => {
                if let Some(&(pos, to)) = self.lock_queue.front() {
                    let repair = to.is_some() || self.phase == Phase::Repairing;
                    let Some(size) = self.encode_block(pos, repair, now, source, buf)? else {
                        return Ok(None);
                    };
                    self.lock_queue.pop_front();
                    let dest = match to {
                        Some(i) => {
                            self.peers[i].individual_pending =
                                self.peers[i].individual_pending.saturating_sub(1);
                            self.stats.repair_unicast += 1;
                            self.peers[i].addr
                        }
                        None => {
                            self.stats.data_sent += 1;
                            self.cfg.group
                        }
                    };
                    return Ok(Some(Transmit::new(dest, size)));
                }
                if self.phase == Phase::LockStep {
                    return Ok(None);
                }
                self.poll_repair(now, source, buf)
            }
        }
    }

    /// Queues the GROUP-HASHES of hash group `g`, unless it went out within
    /// [`MANIFEST_RESEND`] or is queued already; the queue and the record are bounded.
    fn queue_group_list(&mut self, now: Instant, g: u32) {
        if g >= crate::manifest::group_count(self.groups.stream_len) {
            self.stats.absurd += 1;
            return;
        }
        let recent = self.group_list_sent.get(&g).is_some_and(|&t| now.saturating_duration_since(t) < MANIFEST_RESEND);
        if recent || self.group_list_queue.contains(&g) || self.group_list_queue.len() >= MAX_GROUP_LIST_QUEUE {
            self.stats.group_lists_refused += 1;
            return;
        }
        if self.group_list_sent.len() >= MAX_GROUP_LIST_QUEUE * 16 {
            self.group_list_sent.retain(|_, &mut t| now.saturating_duration_since(t) < MANIFEST_RESEND);
        }
        self.group_list_sent.insert(g, now);
        self.group_list_queue.push_back(g);
    }

    /// Appends DATA (or REPAIR) for stream position `pos` if the token bucket allows it;
    /// returns its size.
    fn encode_block<S: BlockSource + ?Sized>(
        &mut self,
        pos: u32,
        repair: bool,
        now: Instant,
        source: &mut S,
        buf: &mut Vec<u8>,
    ) -> Result<Option<usize>, StreamError> {
        let block = self.order[pos as usize];
        let chunk = pos / MANIFEST_CHUNK;
        if self.chunk_pushed.set(chunk) {
            // Its hash goes out first, or every receiver would have to drop the block.
            if self.chunk_queued.set(chunk) {
                self.manifest_queue.push_front(chunk);
            }
            return Err(StreamError::Internal);
        }
        if !repair {
            // The chunks ahead go out a little before their blocks: a receiver that lost
            // one notices at the next and asks for it again before those blocks arrive,
            // rather than dropping them as unverifiable.
            let ahead = (pos + MANIFEST_LOOKAHEAD).min(self.groups.stream_len - 1) / MANIFEST_CHUNK;
            while self.manifest_ahead <= ahead {
                let c = self.manifest_ahead;
                if self.chunk_pushed.set(c) && self.chunk_queued.set(c) {
                    self.manifest_queue.push_back(c);
                }
                self.manifest_ahead += 1;
            }
        }
        let blen = block_len(self.cfg.image_size, self.cfg.block_size, block);
        let wire = blen + crate::wire::DATA_OVERHEAD;
        if !self.bucket.try_take(now, wire as u64) {
            return Ok(None);
        }
        source
            .read_block(block, &mut self.block_buf[..blen])
            .map_err(|e| StreamError::Source(e.to_string()))?;
        let d = Data {
            seq: pos,
            block,
            payload: &self.block_buf[..blen],
        };
        let size = Packet {
            session: self.cfg.session_id,
            body: if repair {
                Body::Repair(d)
            } else {
                Body::Data(d)
            },
        }
        .encode_append(&self.key, buf)?;
        Ok(Some(size))
    }

    fn poll_repair<S: BlockSource + ?Sized>(
        &mut self,
        now: Instant,
        source: &mut S,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Transmit>, StreamError> {
        match self.stage {
            Stage::Settle { .. } | Stage::Collect { .. } | Stage::Closing { .. } => {
                return Ok(None)
            }
            Stage::Plan => {
                self.plan(now, source)?;
                return Err(StreamError::Internal); // loop again
            }
            Stage::Send => {}
        }
        let Some(item) = self.repair.front() else {
            // Round done: next round after the settle delay (at once when everyone
            // already said it is complete).
            self.round += 1;
            self.stage = Stage::Settle {
                until: now + self.cfg.done_delay,
            };
            self.check_answers(now);
            if matches!(self.stage, Stage::Plan) {
                return Err(StreamError::Internal);
            }
            return Ok(None);
        };
        let t = match item {
            RepairItem::Fec {
                group,
                total,
                index,
                shard,
                to,
            } => {
                let wire = shard.len() + crate::wire::FEC_OVERHEAD;
                if !self.bucket.try_take(now, wire as u64) {
                    return Ok(None);
                }
                let body = Body::Fec(Fec {
                    group: *group,
                    recovery_total: *total,
                    index: *index,
                    shard,
                });
                let dest = to.map_or(self.cfg.group, |i| self.peers[i].addr);
                let t = self.emit(body, &self.key, dest, buf)?;
                self.stats.fec_sent += 1;
                self.stats.fec_unicast += to.is_some() as u64;
                t
            }
            &RepairItem::Raw { pos, to } => {
                let Some(size) = self.encode_block(pos, true, now, source, buf)? else {
                    return Ok(None);
                };
                match to {
                    Some(i) => {
                        self.stats.repair_unicast += 1;
                        Transmit::new(self.peers[i].addr, size)
                    }
                    None => {
                        self.stats.repair_multicast += 1;
                        Transmit::new(self.cfg.group, size)
                    }
                }
            }
        };
        self.repair.pop_front();
        Ok(Some(t))
    }

    /// Builds the round's ordered repair list from the STATUS answers.
    fn plan<S: BlockSource + ?Sized>(
        &mut self,
        now: Instant,
        source: &mut S,
    ) -> Result<(), StreamError> {
        self.stats.rounds = self.round + 1;
        self.stage = Stage::Send;
        self.repair.clear();
        // Receivers that did not answer this round keep their old picture.
        if self.peers.iter().all(|p| !p.active() || p.complete) {
            if !self.awaiting_dead(now) {
                self.finish(now);
            }
            // Else an empty round: its DONE asks the silent ones again.
            return Ok(());
        }
        let round = self.round;
        for p in &mut self.peers {
            if !p.active() || p.complete {
                continue;
            }
            let answered = p.status_round == Some(round);
            if answered && p.missing_total < p.missing_before {
                p.idle_rounds = 0;
            } else {
                p.idle_rounds += 1;
            }
            if answered {
                p.missing_before = p.missing_total;
            }
            if p.idle_rounds >= self.cfg.max_rounds {
                p.state = PeerState::GivenUp;
                p.missing = None;
                self.stats.given_up += 1;
            }
        }
        if self.peers.iter().all(|p| !p.active() || p.complete) {
            if !self.awaiting_dead(now) {
                self.finish(now);
            }
            return Ok(());
        }
        let needy: Vec<usize> = (0..self.peers.len())
            .filter(|&i| {
                let p = &self.peers[i];
                p.active() && !p.complete && p.missing.is_some()
            })
            .collect();
        if self.round == 0 {
            // Loss estimate for sizing FEC: the median first-pass loss of on-time receivers.
            let mut f: Vec<f64> = needy
                .iter()
                .filter(|&&i| {
                    self.peers[i].joined_at == 0 && self.peers[i].state == PeerState::Live
                })
                .map(|&i| self.peers[i].missing_total as f64 / self.groups.stream_len as f64)
                .collect();
            f.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            self.loss_est = f.get(f.len() / 2).copied().unwrap_or(0.0).clamp(0.002, 0.5);
        }
        let mut budget: Vec<u32> = self.peers.iter().map(|p| p.free_slots).collect();
        let loss = self.loss_est;
        // Symbols are sent with a margin sized for the whole population: enough that a
        // receiver missing `r` gets `r` of them despite the loss, except with a
        // probability small enough that all of them together most likely finish in
        // this round (each further round costs a DONE/STATUS exchange).
        // Every (receiver, group) that needs symbols must get enough of them; a receiver
        // that did not answer most likely needs as many groups as one that did.
        let silent = self
            .peers
            .iter()
            .filter(|p| p.active() && !p.complete && p.missing.is_none())
            .count();
        let mut needs = 0usize;
        let mut groups_per_needy = 1usize;
        for &i in &needy {
            let Some(bits) = self.peers[i].missing.as_ref() else { continue };
            let n = (0..self.groups.count())
                .filter(|&g| {
                    let (gs, ge) = self.groups.range(g);
                    bits.count_range(gs, ge) > 0
                })
                .count();
            needs += n;
            groups_per_needy = groups_per_needy.max(n);
        }
        let population = (needs + silent * groups_per_needy).max(1);
        let z = normal_quantile(0.05 / population as f64);
        let send_for = |r: u32| symbols_for(r, loss, z);
        for g in 0..self.groups.count() {
            let (gs, ge) = self.groups.range(g);
            let k = ge - gs;
            let m: Vec<(usize, u32)> = needy
                .iter()
                .filter_map(|&i| {
                    let c = self.peers[i].missing.as_ref()?.count_range(gs, ge);
                    (c > 0).then_some((i, c))
                })
                .collect();
            if m.is_empty() {
                continue;
            }
            let total = recovery_total(k);
            let fec_left = (total - self.fec_next[g as usize]) as u32;
            // Receivers missing more than the group's symbols left can repair get blocks;
            // so does a receiver alone missing a few blocks of a large group (encoding
            // symbols reads and codes the whole group: blocks cost less).
            let alone = m.len() == 1;
            let (m, m_raw): (Vec<_>, Vec<_>) = m
                .into_iter()
                .partition(|&(_, c)| send_for(c) <= fec_left && !(alone && c * 64 < k));
            let c_max = m.iter().map(|&(_, c)| c).max().unwrap_or(0);
            let extent = send_for(c_max);
            if !m.is_empty() {
                // Multicast the symbols that serve every receiver missing up to `r`,
                // and unicast to each receiver beyond `r` the further symbols it alone
                // needs: `r` minimises the packets sent. With one receiver (or one far
                // behind the rest) that is unicast, sparing the others.
                let mut r_best = 0u32;
                let mut cost_best: u64 = m.iter().map(|&(_, c)| send_for(c) as u64).sum();
                let mut cands: Vec<u32> = m.iter().map(|&(_, c)| c).collect();
                cands.sort_unstable();
                cands.dedup();
                for &r in &cands {
                    let s = send_for(r);
                    let uni: u64 = m.iter().map(|&(_, c)| send_for(c).saturating_sub(s) as u64).sum();
                    let cost = s as u64 + uni;
                    if cost < cost_best {
                        cost_best = cost;
                        r_best = r;
                    }
                }
                let first = self.fec_next[g as usize];
                self.fec_next[g as usize] += extent as u16;
                let shards = self.encode_fec(source, g, total, first, extent as u16)?;
                let multicast = (send_for(r_best) as usize).min(shards.len());
                for (idx, shard) in &shards[..multicast] {
                    self.repair.push_back(RepairItem::Fec {
                        group: g,
                        total,
                        index: *idx,
                        shard: shard.clone(),
                        to: None,
                    });
                }
                for &(i, c) in &m {
                    let want = (send_for(c) as usize).min(shards.len());
                    for (idx, shard) in shards.iter().take(want).skip(multicast) {
                        self.repair.push_back(RepairItem::Fec {
                            group: g,
                            total,
                            index: *idx,
                            shard: shard.clone(),
                            to: Some(i),
                        });
                    }
                }
            }
            if !m_raw.is_empty() {
                // No FEC: a block missed by one receiver goes to it by unicast, sparing
                // the others; a block missed by several goes once by multicast.
                for pos in gs..ge {
                    let mut who = m_raw.iter().filter(|&&(i, _)| {
                        self.peers[i].missing.as_ref().is_some_and(|b| b.get(pos))
                    });
                    let Some(&(first, _)) = who.next() else {
                        continue;
                    };
                    if who.next().is_some() {
                        self.repair.push_back(RepairItem::Raw { pos, to: None });
                    } else if budget[first] > 0 {
                        budget[first] -= 1;
                        self.repair.push_back(RepairItem::Raw {
                            pos,
                            to: Some(first),
                        });
                    }
                }
            }
        }
        if self.repair.is_empty() {
            // Nothing to send (e.g. caches full): next round after the status timeout.
        }
        Ok(())
    }

    fn encode_fec<S: BlockSource + ?Sized>(
        &mut self,
        source: &mut S,
        g: u32,
        total: u16,
        first: u16,
        count: u16,
    ) -> Result<Vec<Shard>, StreamError> {
        let (gs, ge) = self.groups.range(g);
        let shard_bytes = self.cfg.block_size as usize + FEC_SHARD_PREFIX;
        let mut enc = reed_solomon_simd::ReedSolomonEncoder::new(
            (ge - gs) as usize,
            total as usize,
            shard_bytes,
        )
        .map_err(|e| StreamError::Fec(e.to_string()))?;
        let mut shard = vec![0u8; shard_bytes];
        for pos in gs..ge {
            let block = self.order[pos as usize];
            let blen = block_len(self.cfg.image_size, self.cfg.block_size, block);
            shard[4 + blen..].fill(0);
            shard[..4].copy_from_slice(&block.to_be_bytes());
            source
                .read_block(block, &mut shard[4..4 + blen])
                .map_err(|e| StreamError::Source(e.to_string()))?;
            enc.add_original_shard(&shard)
                .map_err(|e| StreamError::Fec(e.to_string()))?;
        }
        let res = enc.encode().map_err(|e| StreamError::Fec(e.to_string()))?;
        Ok((first..first + count)
            .filter_map(|i| res.recovery(i as usize).map(|s| (i, s.into())))
            .collect())
    }
}

/// Symbols to send so that a receiver missing `r` gets at least `r` of them when each is
/// lost with probability `loss`, short by `z` standard deviations (normal approximation
/// of the binomial, plus one symbol for its discreteness).
fn symbols_for(r: u32, loss: f64, z: f64) -> u32 {
    if r == 0 {
        return 0;
    }
    let q = 1.0 - loss;
    // Smallest n with q·n − z·sqrt(n·loss·q) ≥ r: a quadratic in sqrt(n).
    let b = z * (loss * q).sqrt();
    let x = (b + (b * b + 4.0 * q * r as f64).sqrt()) / (2.0 * q);
    (x * x).ceil() as u32 + 1
}

/// `z` with P(N(0,1) > z) = `tail` (Abramowitz and Stegun 26.2.23, error < 4.5e-4),
/// for tails up to one half.
fn normal_quantile(tail: f64) -> f64 {
    let p = tail.clamp(1e-12, 0.5);
    let t = (-2.0 * p.ln()).sqrt();
    t - (2.515517 + 0.802853 * t + 0.010328 * t * t)
        / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
}

//! The receiver: registers with a session, takes the stream into a fixed-size data cache,
//! acknowledges every N packets, answers DONE with STATUS, decodes FEC, and drains the
//! cache into a [`BlockSink`] as fast as its consumer allows.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth::{key_wrap_pad, xor16, MacKey};
use crate::manifest::{self, BlockHash, GROUP_POSITIONS};
use crate::util::{recovery_total, Bitset, Groups};
use crate::wire::{
    Ack, Announce, Body, Leave, ManifestChunk, ManifestRequest, Missing, MissingRange, Packet,
    ReadRequest, Register, Status, ENTRY_LEN, FEC_SHARD_PREFIX, GROUP_LIST_FLAG, HASH_LEN, MANIFEST_CHUNK, MANIFEST_LEAD,
    MAX_BITMAP_BYTES, MAX_MANIFEST_REQUEST, MAX_RANGES, MAX_STATUS_PARTS,
};
use fleetboot_proto::Transmit;

/// Positions this far below the highest one seen that are still missing count as lost;
/// closer ones may still arrive (reordering) and keep a cache slot reserved.
pub const REORDER_WINDOW: u32 = 64;

/// Where a receiver puts the blocks (the local disk, or the agent's block store).
pub trait BlockSink {
    /// Stores block `index` (`data` is the block's full length).
    fn write_block(&mut self, index: u32, data: &[u8]) -> std::io::Result<()>;
    /// Reads back a block written before (FEC decoding needs the group's other blocks).
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()>;
}

/// A receiver's settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The image wanted.
    pub image_id: [u8; 16],
    /// Only this session (else the first announced session for the image).
    pub session: Option<u32>,
    /// Random nonce for REGISTER (from the shell's RNG).
    pub nonce: u64,
    /// Data cache size in blocks.
    pub cache_slots: u32,
    /// Operator's site secret (the shells never pass all zeros).
    pub site_secret: [u8; 32],
    /// ACK at least this often while registered (heartbeat).
    pub ack_interval: Duration,
    /// REGISTER retry period.
    pub register_interval: Duration,
    /// Most bytes of FEC symbols held while waiting to decode.
    pub max_fec_bytes: usize,
    /// Most bytes held for blocks whose hash group is not complete yet (they are checked
    /// only with the whole group), beyond the cache slots: a pending block that reaches
    /// the head of the cache goes there. Once it is half full, the receiver asks for the
    /// per-position lists of the oldest incomplete groups behind the stream, which check
    /// their blocks one by one and free them; when it is full all the same, blocks are
    /// dropped ([`ReceiverStats::pending_overflow`]) and come again with the repairs.
    pub max_pending_bytes: usize,
    /// The image's size when the receiver knows it (the agent learns it from the
    /// server's export): an ANNOUNCE of another size is refused.
    pub image_size: Option<u64>,
    /// The largest image accepted from an ANNOUNCE. What a session makes the receiver
    /// allocate grows with the image (a few bytes per block), so an absurd ANNOUNCE is
    /// refused before anything is allocated for it.
    pub max_image_size: u64,
    /// The sender's ed25519 public key. Only ANNOUNCEs and MANIFEST chunks it signed
    /// are accepted, and only blocks of groups whose hash the manifest lists: without it
    /// the receiver joins nothing (the shells refuse to start without one).
    pub sender_key: Option<[u8; 32]>,
}

/// [`ReceiverConfig::max_pending_bytes`] unless told: 32 MiB, the blocks of about 1,400
/// incomplete groups at 1450-byte blocks (at 1% loss, 15% of the groups miss a block
/// until the repairs: about 140 MB of image streamed before the first repair round).
pub const DEFAULT_MAX_PENDING_BYTES: usize = 32 << 20;

/// [`ReceiverConfig::max_image_size`] unless told: 64 GiB (about 190 MB of per-block
/// bookkeeping at 1450-byte blocks).
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 64 << 30;

impl ReceiverConfig {
    /// Defaults.
    pub fn new(image_id: [u8; 16], nonce: u64) -> Self {
        ReceiverConfig {
            image_id,
            session: None,
            nonce,
            cache_slots: 256,
            site_secret: [0; 32],
            ack_interval: Duration::from_millis(100),
            register_interval: Duration::from_millis(100),
            max_fec_bytes: 16 << 20,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            image_size: None,
            max_image_size: DEFAULT_MAX_IMAGE_SIZE,
            sender_key: None,
        }
    }
}

/// Where the receiver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    /// Waiting for an ANNOUNCE of the image.
    Listening,
    /// REGISTER sent, waiting for REGISTERED.
    Registering,
    /// Taking the stream.
    Receiving,
    /// Every block is in the sink.
    Complete,
    /// Complete and the sender closed the session.
    Finished,
    /// The sender closed the session before this receiver was complete.
    Failed,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// DATA accepted into the cache.
    pub data_accepted: u64,
    /// REPAIR accepted into the cache.
    pub repairs_accepted: u64,
    /// FEC symbols kept.
    pub fec_accepted: u64,
    /// FEC groups decoded.
    pub fec_decodes: u64,
    /// Blocks recovered by FEC.
    pub fec_recovered: u64,
    /// Duplicate or unneeded packets.
    pub duplicates: u64,
    /// Blocks dropped because the cache was full.
    pub cache_overflow: u64,
    /// Bad tag (forged, corrupted, or another session's key).
    pub forged: u64,
    /// Other sessions' packets.
    pub wrong_session: u64,
    /// Absurd values (position or block out of range, wrong lengths).
    pub absurd: u64,
    /// Undecodable datagrams.
    pub malformed: u64,
    /// ACKs sent.
    pub acks_sent: u64,
    /// STATUS sent.
    pub status_sent: u64,
    /// READ-REQUESTs sent.
    pub read_requests_sent: u64,
    /// ANNOUNCE, MANIFEST, DONE or ROLE whose signature is not the sender's (forged by a
    /// host that holds the site and session keys, e.g. another receiver, or a replay of
    /// another image's manifest or another session's DONE).
    pub bad_signature: u64,
    /// Blocks (DATA, REPAIR, FEC-decoded) dropped because their hash group did not match
    /// the signed one: some block of the group was not the one the sender put at its
    /// position (forged, or a genuine block at the wrong position). The group's blocks
    /// never reach the sink and are fetched again.
    pub bad_block: u64,
    /// Hash groups that did not match (their blocks are counted in `bad_block`).
    pub bad_group: u64,
    /// GROUP-HASHES taken (asked for after a group failed or was raced, or for groups
    /// behind the stream missing a position once the pending memory is half full: the
    /// group's blocks are then checked one by one).
    pub group_lists: u64,
    /// Blocks for a position already held pending that differ from the one held there:
    /// one of the two is forged (dropped; if it was the held one, its group fails).
    pub conflicting: u64,
    /// Blocks dropped because the memory for incomplete groups
    /// ([`ReceiverConfig::max_pending_bytes`]) was full (they come again with the
    /// repairs).
    pub pending_overflow: u64,
    /// The most bytes held at once for incomplete groups and checked blocks not yet
    /// written.
    pub pending_peak_bytes: u64,
    /// Blocks dropped because their manifest chunk had not arrived yet and no later
    /// chunk had either (asked for).
    pub unverified: u64,
    /// Blocks kept pending although their manifest chunk had not arrived, because a
    /// later chunk had (theirs was lost on the way): checked when it comes again.
    pub ahead_of_chunk: u64,
    /// MANIFEST chunks accepted.
    pub manifest_chunks: u64,
    /// MANIFEST chunks heard again (another receiver asked for them).
    pub manifest_duplicates: u64,
    /// MANIFEST-REQUESTs sent.
    pub manifest_requests_sent: u64,
    /// Datagrams of this session that arrived before REGISTERED (the key that checks
    /// them) and were kept, then handled once it came: a late joiner's first blocks, or
    /// a group socket read before the unicast one.
    pub early_kept: u64,
    /// Such datagrams dropped because [`MAX_EARLY_BYTES`] were already kept (they come
    /// again with the repairs).
    pub early_dropped: u64,
}

#[derive(Debug)]
enum Out {
    Register,
    Ack,
    Status(u32),
    /// A further part of an answer to DONE, built with its first.
    StatusPart(Status),
    Read { round: u32, pos: u32, kind: u8 },
    Leave,
    ManifestRequest,
}

#[derive(Debug)]
struct Keys {
    id: u32,
    session: MacKey,
    mine: MacKey,
}

/// Where the bytes of a block waiting for its group are.
#[derive(Debug)]
enum PendingAt {
    /// In a cache slot, not drained yet.
    Slot(u32),
    /// Taken out of its slot when the drain reached it, or decoded from FEC.
    Memory(Box<[u8]>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    Data,
    Repair,
    Fec,
}

/// A block present at its position, waiting for the rest of its hash group.
#[derive(Debug)]
struct PendingBlock {
    block: u32,
    hash: BlockHash,
    arrival: Arrival,
    at: PendingAt,
}

/// The present blocks of a hash group not complete yet.
#[derive(Debug)]
struct PendingGroup {
    members: Vec<Option<PendingBlock>>,
    present: u32,
}

/// What one pending group's bookkeeping counts against
/// [`ReceiverConfig::max_pending_bytes`] besides its blocks' bytes.
const PENDING_GROUP_COST: usize = GROUP_POSITIONS as usize * std::mem::size_of::<Option<PendingBlock>>() + 64;

/// What a filled cache slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// A block whose group is not complete yet.
    Pending,
    /// A block of a checked group: the drain writes it.
    Checked,
    /// A block of a group that failed its check: the drain drops it.
    Dropped,
}

#[derive(Debug, Default)]
struct FecHeld {
    shards: Vec<(u16, Box<[u8]>)>,
}

/// One receiver (sans-I/O).
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    site: MacKey,
    state: ReceiverState,
    session: Option<u32>,
    ann: Option<Announce>,
    sender: Option<SocketAddr>,
    keys: Option<Keys>,
    groups: Groups,
    received: Bitset,
    pos_block: Vec<u32>,
    group_have: Vec<u32>,
    have: u32,
    contig: u32,
    highest: u32,
    // The data cache: fixed slots, FIFO of filled slots.
    slots: Vec<u8>,
    slot_meta: Vec<(u32, u32)>,
    slot_state: Vec<SlotState>,
    free: Vec<u32>,
    queue: VecDeque<u32>,
    fec: HashMap<u32, FecHeld>,
    fec_bytes: usize,
    decodable: Vec<u32>,
    since_ack: u32,
    free_at_ack: u32,
    last_ack: Instant,
    next_register: Instant,
    requested_upto: u32,
    out: VecDeque<Out>,
    stats: ReceiverStats,
    sender_key: Option<ed25519_dalek::VerifyingKey>,
    /// Per hash group, its signed hash (valid where `chunk_known` says so).
    group_hashes: Vec<[u8; HASH_LEN]>,
    /// Present blocks of incomplete hash groups (`received` and `have` count them; the
    /// sink and `held` do not).
    pending: BTreeMap<u32, PendingGroup>,
    /// Bytes of `PendingAt::Memory` blocks, `ready` blocks and pending groups' bookkeeping.
    pending_bytes: usize,
    /// Per-position (block, SHA-256) of hash groups that failed their check, got two
    /// different blocks for a position, or held pending memory behind the stream, from
    /// the sender's GROUP-HASHES (checked against the group hash): their blocks are
    /// checked one by one and go to the sink as they come (a listed group has no pending
    /// blocks), so a forged one cannot take a genuine one's place. Dropped once every
    /// position of the group is in; at most [`MAX_GROUP_LISTS`].
    group_lists: HashMap<u32, Vec<(u32, BlockHash)>>,
    /// Hash groups whose list is wanted.
    lists_wanted: BTreeSet<u32>,
    /// Blocks of checked groups taken out of their slots, for the sink.
    ready: VecDeque<(u32, Box<[u8]>)>,
    /// Positions whose group checked out.
    held: u32,
    /// One past the highest position whose group checked out: what ACKs report, as a
    /// pending block may be an insider's for a position the sender has not sent (an ACK
    /// claiming it would be refused, and the sender's window would never open).
    highest_checked: u32,
    chunk_known: Bitset,
    /// One past the highest chunk accepted: the sender sends chunks in order, ahead of
    /// their blocks, so an unknown chunk below it was lost, not yet to come.
    chunks_seen: u32,
    /// Chunks needed for blocks that arrived before them.
    chunks_wanted: BTreeSet<u32>,
    /// Chunks below this one are known or wanted (a late joiner fetches what it missed).
    manifest_scan: u32,
    /// Chunks of the last MANIFEST-REQUEST still to come: the next request goes out when
    /// they are in (or at the retry timer), so requests follow the sender's answers.
    manifest_inflight: u32,
    next_manifest_request: Instant,
    /// Datagrams of the session that came before REGISTERED, and their bytes.
    early: Vec<(SocketAddr, Box<[u8]>)>,
    early_bytes: usize,
}

/// Most chunks a receiver keeps asking for at once.
const MAX_WANTED: usize = 4 * MAX_MANIFEST_REQUEST;

/// Most GROUP-HASHES a receiver holds: groups under attack, and groups behind the stream
/// missing a position while the pending memory fills up ([`Receiver::want_lists_behind`]).
/// A list is 16 × 36 bytes (block index and SHA-256 per position, ~600 bytes with its
/// map entry) and lets the group's present blocks go to the sink: up to 15 blocks (~21
/// KiB at 1450-byte blocks) of pending memory freed for each. It is dropped once every
/// position of its group is in, so only groups still missing a block hold one (4096 of
/// them: ~2.4 MB). With all of them held, groups wait pending as without lists.
const MAX_GROUP_LISTS: usize = 4096;

/// Most bytes of datagrams kept while registering (see [`ReceiverStats::early_kept`]):
/// ~700 blocks of 1450 bytes, a few milliseconds of the stream at a gigabit. Anyone who
/// knows the session number can fill it with datagrams that fail their check later; the
/// genuine ones it then cannot hold are repaired, as without it.
pub const MAX_EARLY_BYTES: usize = 1 << 20;

/// Most lists asked for at once because the pending memory is filling up (half of
/// [`MAX_WANTED`], the rest for groups that failed or were raced).
const MAX_EARLY_LISTS: usize = MAX_WANTED / 2;

fn block_len(a: &Announce, block: u32) -> usize {
    let start = block as u64 * a.block_size as u64;
    (a.image_size - start).min(a.block_size as u64) as usize
}

/// One STATUS part's list: the first positions of `list` (ascending, not empty) as up
/// to [`MAX_RANGES`] ranges or one bitmap of up to [`MAX_BITMAP_BYTES`], whichever covers
/// more of them (the smaller one when both cover the same). Returns it with the number
/// of positions it covers.
fn status_part(list: &[u32]) -> (Missing, usize) {
    let first = list[0];
    let mut ranges: Vec<MissingRange> = Vec::new();
    let mut by_ranges = 0;
    for &p in list {
        let full = ranges.len() == MAX_RANGES;
        match ranges.last_mut() {
            Some(r) if r.start + r.len == p => r.len += 1,
            _ if full => break,
            _ => ranges.push(MissingRange { start: p, len: 1 }),
        }
        by_ranges += 1;
    }
    let span = (MAX_BITMAP_BYTES * 8) as u64;
    let by_bitmap = list.partition_point(|&p| ((p - first) as u64) < span);
    let bitmap_bytes = (list[by_bitmap - 1] - first) as usize / 8 + 1;
    if by_ranges > by_bitmap || (by_ranges == by_bitmap && ranges.len() * 8 <= bitmap_bytes + 6) {
        return (Missing::Ranges(ranges), by_ranges);
    }
    let mut bits = vec![0u8; bitmap_bytes];
    for &p in &list[..by_bitmap] {
        let off = (p - first) as usize;
        bits[off / 8] |= 1 << (off % 8);
    }
    (Missing::Bitmap { start: first, bits }, by_bitmap)
}

impl Receiver {
    /// A receiver that waits for an ANNOUNCE of `cfg.image_id`.
    pub fn new(now: Instant, cfg: ReceiverConfig) -> Self {
        Receiver {
            site: MacKey::site(&cfg.site_secret),
            state: ReceiverState::Listening,
            session: None,
            ann: None,
            sender: None,
            keys: None,
            groups: Groups {
                group: 1,
                stream_len: 0,
            },
            received: Bitset::new(0),
            pos_block: Vec::new(),
            group_have: Vec::new(),
            have: 0,
            contig: 0,
            highest: 0,
            slots: Vec::new(),
            slot_meta: Vec::new(),
            slot_state: Vec::new(),
            free: Vec::new(),
            queue: VecDeque::new(),
            fec: HashMap::new(),
            fec_bytes: 0,
            decodable: Vec::new(),
            since_ack: 0,
            free_at_ack: 0,
            last_ack: now,
            next_register: now,
            requested_upto: 0,
            out: VecDeque::new(),
            stats: ReceiverStats::default(),
            sender_key: cfg
                .sender_key
                .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok()),
            group_hashes: Vec::new(),
            pending: BTreeMap::new(),
            group_lists: HashMap::new(),
            lists_wanted: BTreeSet::new(),
            pending_bytes: 0,
            ready: VecDeque::new(),
            held: 0,
            highest_checked: 0,
            chunk_known: Bitset::new(0),
            chunks_seen: 0,
            chunks_wanted: BTreeSet::new(),
            manifest_scan: 0,
            manifest_inflight: 0,
            next_manifest_request: now,
            early: Vec::new(),
            early_bytes: 0,
            cfg,
        }
    }

    /// State.
    pub fn state(&self) -> ReceiverState {
        self.state
    }
    /// Counters.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }
    /// Our receiver id once registered.
    pub fn id(&self) -> Option<u32> {
        self.keys.as_ref().map(|k| k.id)
    }
    /// The session's ANNOUNCE once heard.
    pub fn announce(&self) -> Option<&Announce> {
        self.ann.as_ref()
    }
    /// Where the sender is (learned from its ANNOUNCE).
    pub fn sender_addr(&self) -> Option<SocketAddr> {
        self.sender
    }
    /// Every block is in the sink.
    /// Why this receiver ended without the image, once it did: the sender closed the
    /// session while positions were still missing here (it took this receiver for gone —
    /// silent past its dead timeout, or no progress for its round limit — or it failed
    /// itself). `None` while receiving and after a complete session.
    pub fn failure(&self) -> Option<String> {
        (self.state == ReceiverState::Failed).then(|| {
            let len = self.groups.stream_len;
            format!(
                "the sender closed the session with {} of {len} positions missing here (it took this receiver for gone, or could not go on)",
                len.saturating_sub(self.have)
            )
        })
    }

    pub fn is_complete(&self) -> bool {
        matches!(
            self.state,
            ReceiverState::Complete | ReceiverState::Finished
        )
    }
    /// Blocks received whose hash group checked out (in the cache or the sink).
    pub fn blocks_received(&self) -> u32 {
        self.held
    }
    /// Bytes held now for incomplete hash groups and checked blocks not yet written
    /// (at most [`ReceiverConfig::max_pending_bytes`]).
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
    /// Free cache slots.
    pub fn free_slots(&self) -> u32 {
        self.free.len() as u32
    }
    /// Leaves the session (sends LEAVE).
    pub fn leave(&mut self) {
        if self.keys.is_some() {
            self.out.push_back(Out::Leave);
        }
    }

    /// Feeds one datagram from `from` (multicast or unicast).
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let pkt = match Packet::decode(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if let Body::Announce(a) = &pkt.body {
            if !self.site.verify(bytes) {
                self.stats.forged += 1;
                return;
            }
            if a.image_id != self.cfg.image_id
                || self.cfg.session.is_some_and(|s| s != pkt.session)
                || self.session.is_some_and(|s| s != pkt.session)
            {
                self.stats.wrong_session += 1;
                return;
            }
            // Every receiver holds the site key: only the sender's signature says the
            // sender announced this session (checked before anything is taken from it).
            let signed = self.sender_key.as_ref().is_some_and(|k| {
                manifest::verify(k, &manifest::announce_message(pkt.session, a), &a.signature)
            });
            if !signed {
                self.stats.bad_signature += 1;
                return;
            }
            if self.state == ReceiverState::Listening {
                if a.image_size > self.cfg.max_image_size
                    || self.cfg.image_size.is_some_and(|n| n != a.image_size)
                {
                    // Nothing is allocated for a session this receiver cannot want.
                    self.stats.absurd += 1;
                    return;
                }
                if a.flags & Announce::STREAMING != 0 && a.flags & Announce::LATE_JOIN == 0 {
                    return; // too late for this session
                }
                self.session = Some(pkt.session);
                self.sender = Some(from);
                self.ann = Some(a.clone());
                self.state = ReceiverState::Registering;
                self.next_register = now;
                self.out.push_back(Out::Register);
                self.next_register = now + self.cfg.register_interval;
            }
            return;
        }
        if self.session != Some(pkt.session) {
            self.stats.wrong_session += 1;
            return;
        }
        if let Body::Registered(r) = &pkt.body {
            if !self.site.verify(bytes) {
                self.stats.forged += 1;
                return;
            }
            if self.state != ReceiverState::Registering || r.nonce != self.cfg.nonce {
                self.stats.duplicates += 1;
                return;
            }
            let pad = key_wrap_pad(&self.site, pkt.session, r.receiver, r.nonce);
            let k = xor16(&r.wrapped_key, &pad);
            let session = MacKey::session(&k, pkt.session);
            let mine = MacKey::receiver(&session, r.receiver, r.nonce);
            self.keys = Some(Keys {
                id: r.receiver,
                session,
                mine,
            });
            self.sender = Some(from);
            self.setup();
            self.state = ReceiverState::Receiving;
            self.queue_ack(now);
            for (from, bytes) in std::mem::take(&mut self.early) {
                self.stats.early_kept += 1;
                self.handle(now, from, &bytes);
            }
            self.early_bytes = 0;
            return;
        }
        let Some(keys) = &self.keys else {
            // Not registered yet: the tag cannot be checked until REGISTERED brings the key.
            if self.early_bytes + bytes.len() <= MAX_EARLY_BYTES {
                self.early_bytes += bytes.len();
                self.early.push((from, bytes.into()));
            } else {
                self.stats.early_dropped += 1;
            }
            return;
        };
        if !keys.session.verify(bytes) {
            self.stats.forged += 1;
            return;
        }
        match pkt.body {
            Body::Data(d) => self.on_block(now, d.seq, d.block, d.payload, false),
            Body::Repair(d) => self.on_block(now, d.seq, d.block, d.payload, true),
            Body::Fec(f) => self.on_fec(f.group, f.recovery_total, f.index, f.shard),
            Body::Manifest(m) => self.on_manifest(now, m),
            Body::GroupHashes(l) => self.on_group_hashes(now, l),
            Body::Done(d) => {
                // One DONE(FINISHED) ends the session for every receiver, and each DONE
                // makes every receiver answer: only the sender's count.
                if !self.signed_by_sender(|root| manifest::done_message(pkt.session, root, &d), &d.signature) {
                    self.stats.bad_signature += 1;
                    return;
                }
                if d.flags & crate::wire::Done::FINISHED != 0 {
                    self.state = if self.is_complete() {
                        ReceiverState::Finished
                    } else {
                        ReceiverState::Failed
                    };
                    self.out.clear();
                    // Says it heard the end: once every receiver has, the sender stops
                    // repeating DONE(FINISHED) and its session ends at once.
                    self.out.push_back(Out::Leave);
                } else if d.stream_len != self.groups.stream_len {
                    self.stats.absurd += 1;
                } else if matches!(
                    self.state,
                    ReceiverState::Receiving | ReceiverState::Complete
                ) {
                    self.out.push_back(Out::Status(d.round));
                    // Repairs are coming: fetch the chunks they will be checked against.
                    self.want_chunks_below(u32::MAX);
                    self.request_chunks(now);
                }
            }
            Body::Role(r) => {
                // The requester's READ-REQUEST moves the lock-step stream on: only the
                // sender says who asks, and from where.
                if !self.signed_by_sender(|root| manifest::role_message(pkt.session, root, &r), &r.signature) {
                    self.stats.bad_signature += 1;
                    return;
                }
                if r.next_pos > self.groups.stream_len {
                    self.stats.absurd += 1;
                } else if Some(r.requester) == self.id() && r.next_pos < self.groups.stream_len {
                    self.out.push_back(Out::Read {
                        round: r.round,
                        pos: r.next_pos,
                        kind: ReadRequest::DRIVE,
                    });
                }
            }
            _ => self.stats.forged += 1, // receiver-originated types never come to us
        }
    }

    /// Whether `signature` is the sender's over `message(root)`, the root being the one
    /// of the session's (signed) ANNOUNCE.
    fn signed_by_sender(
        &self,
        message: impl FnOnce(&[u8; 32]) -> Vec<u8>,
        signature: &[u8; crate::wire::SIGNATURE_LEN],
    ) -> bool {
        match (&self.sender_key, &self.ann) {
            (Some(k), Some(a)) => manifest::verify(k, &message(&a.manifest_root), signature),
            _ => false,
        }
    }

    fn setup(&mut self) {
        let a = self.ann.as_ref().expect("announced");
        self.groups = Groups {
            group: a.fec_group,
            stream_len: a.stream_len,
        };
        self.received = Bitset::new(a.stream_len);
        self.pos_block = vec![u32::MAX; a.stream_len as usize];
        self.group_have = vec![0; self.groups.count() as usize];
        let n = self.cfg.cache_slots.max(1);
        self.slots = vec![0; n as usize * a.block_size as usize];
        self.slot_meta = vec![(0, 0); n as usize];
        self.slot_state = vec![SlotState::Dropped; n as usize];
        self.free = (0..n).rev().collect();
        self.free_at_ack = n;
        self.group_hashes = vec![[0; HASH_LEN]; manifest::group_count(a.stream_len) as usize];
        self.chunk_known = Bitset::new(manifest::chunk_count(a.stream_len));
    }

    fn on_manifest(&mut self, now: Instant, m: ManifestChunk<'_>) {
        let a = self.ann.as_ref().expect("registered");
        let c = m.first / MANIFEST_CHUNK;
        let want = (a.stream_len - m.first.min(a.stream_len)).min(MANIFEST_CHUNK);
        if m.first >= a.stream_len || m.positions as u32 != want {
            self.stats.absurd += 1;
            return;
        }
        if self.chunk_known.get(c) {
            self.stats.manifest_duplicates += 1;
            return;
        }
        let signed = self.sender_key.as_ref().is_some_and(|k| {
            manifest::verify(
                k,
                &manifest::chunk_message(&a.manifest_root, m.first, m.positions, m.group_hashes),
                &m.signature,
            )
        });
        if !signed {
            self.stats.bad_signature += 1;
            return;
        }
        let first_group = (m.first / GROUP_POSITIONS) as usize;
        for (i, h) in m.group_hashes.chunks_exact(HASH_LEN).enumerate() {
            self.group_hashes[first_group + i].copy_from_slice(h);
        }
        self.chunk_known.set(c);
        self.chunks_seen = self.chunks_seen.max(c + 1);
        if self.chunks_wanted.remove(&c) {
            self.manifest_inflight = self.manifest_inflight.saturating_sub(1);
        }
        self.stats.manifest_chunks += 1;
        // Groups that became whole while their chunk was missing are checked now.
        let groups = m.first / GROUP_POSITIONS..(m.first + m.positions as u32).div_ceil(GROUP_POSITIONS);
        for hg in groups {
            let whole = self.pending.get(&hg).is_some_and(|g| g.present as usize == g.members.len());
            if whole {
                self.check_group(now, hg);
            }
        }
        self.want_chunks_below(c);
        self.request_chunks(now);
    }

    /// Wants every unknown chunk below `end` (as far as the wanted set has room).
    fn want_chunks_below(&mut self, end: u32) {
        let end = end.min(self.chunk_known.len());
        while self.manifest_scan < end && self.chunks_wanted.len() < MAX_WANTED {
            if !self.chunk_known.get(self.manifest_scan) {
                self.chunks_wanted.insert(self.manifest_scan);
            }
            self.manifest_scan += 1;
        }
    }

    /// Wants every unknown chunk the sender has sent by now: those of positions up to
    /// [`MANIFEST_LEAD`] past the highest one seen.
    fn want_chunks_ahead(&mut self, now: Instant) {
        if self.highest == 0 {
            return;
        }
        let end = ((self.highest - 1).saturating_add(MANIFEST_LEAD) / MANIFEST_CHUNK + 1).min(self.chunk_known.len());
        if self.manifest_scan < end {
            self.want_chunks_below(end);
            self.request_chunks(now);
        }
    }

    /// Queues a MANIFEST-REQUEST if chunks are wanted and none is outstanding.
    fn request_chunks(&mut self, now: Instant) {
        if self.state == ReceiverState::Receiving
            && !(self.chunks_wanted.is_empty() && self.lists_wanted.is_empty())
            && (self.manifest_inflight == 0 || now >= self.next_manifest_request)
            && !self.out.iter().any(|o| matches!(o, Out::ManifestRequest))
        {
            self.out.push_back(Out::ManifestRequest);
            self.next_manifest_request = now + self.cfg.register_interval;
        }
    }

    /// Whether a block at position `pos` may be kept pending: its group's signed hash is
    /// known, or its chunk was lost while a later one arrived (the chunk is asked for and
    /// the group checked once it comes: a receiver whose socket backlog is longer than
    /// the chunks' lead would otherwise drop a whole chunk's blocks). A block beyond the
    /// chunks the sender has sent is refused (it could be an insider's from far ahead)
    /// and its chunk asked for.
    fn chunk_ready(&mut self, now: Instant, pos: u32) -> bool {
        let c = pos / MANIFEST_CHUNK;
        if self.chunk_known.get(c) {
            return true;
        }
        let lost = c < self.chunks_seen;
        if lost {
            self.stats.ahead_of_chunk += 1;
        } else {
            self.stats.unverified += 1;
        }
        if self.chunks_wanted.len() < MAX_WANTED {
            self.chunks_wanted.insert(c);
        }
        self.want_chunks_below(c);
        self.request_chunks(now);
        lost
    }

    /// Makes room in the pending memory for `extra` bytes of a block at `pos` (and, if
    /// `group`, its group's bookkeeping when the group is new: not for a block its
    /// group's list checked, which goes to the sink). When it is full, the groups furthest
    /// behind in the stream give up the blocks they hold in it: their missing block was
    /// lost, not late, and they wait for the repairs anyway, while the group at `pos`,
    /// where the stream is, most likely completes. False if there is no room even so.
    fn pending_room(&mut self, pos: u32, extra: usize, group: bool) -> bool {
        let hg = pos / GROUP_POSITIONS;
        let need = extra + if !group || self.pending.contains_key(&hg) { 0 } else { PENDING_GROUP_COST };
        let mut next = 0;
        while self.pending_bytes + need > self.cfg.max_pending_bytes {
            let Some(victim) = self.pending.range(next..).map(|(&g, _)| g).find(|&g| g != hg) else {
                return false;
            };
            self.give_up_group(victim);
            next = victim + 1;
        }
        true
    }

    /// Drops what group `hg` holds outside the cache (its blocks still in cache slots
    /// stay, and the group too if it has any): those positions are missing again.
    fn give_up_group(&mut self, hg: u32) {
        let Some(mut group) = self.pending.remove(&hg) else { return };
        let start = hg * GROUP_POSITIONS;
        for i in 0..group.members.len() {
            if matches!(group.members[i], Some(PendingBlock { at: PendingAt::Memory(_), .. })) {
                if let Some(PendingBlock { at: PendingAt::Memory(data), .. }) = group.members[i].take() {
                    self.pending_bytes -= data.len();
                }
                group.present -= 1;
                self.stats.pending_overflow += 1;
                self.unmark(start + i as u32);
            }
        }
        if group.present > 0 {
            self.pending.insert(hg, group);
        } else {
            self.pending_bytes -= PENDING_GROUP_COST;
        }
    }

    fn add_pending_bytes(&mut self, n: usize) {
        self.pending_bytes += n;
        self.stats.pending_peak_bytes = self.stats.pending_peak_bytes.max(self.pending_bytes as u64);
    }

    /// Position `pos` now has a block (not checked yet): it counts as received for the
    /// stream (ACK, STATUS, FEC), not for the sink; once its group is whole the group is
    /// checked.
    fn take_pending(&mut self, now: Instant, pos: u32, block: u32, hash: BlockHash, arrival: Arrival, at: PendingAt) {
        self.mark(pos, block);
        let hg = pos / GROUP_POSITIONS;
        let (start, end) = manifest::group_range(hg, self.groups.stream_len);
        if !self.pending.contains_key(&hg) {
            self.add_pending_bytes(PENDING_GROUP_COST);
        }
        let group = self.pending.entry(hg).or_insert_with(|| PendingGroup {
            members: (start..end).map(|_| None).collect(),
            present: 0,
        });
        group.members[(pos - start) as usize] = Some(PendingBlock { block, hash, arrival, at });
        group.present += 1;
        if group.present == end - start && self.chunk_known.get(pos / MANIFEST_CHUNK) {
            self.check_group(now, hg);
        }
    }

    /// Position `pos` now has block `block`: it counts as received for the stream (ACK,
    /// STATUS, FEC).
    fn mark(&mut self, pos: u32, block: u32) {
        self.received.set(pos);
        self.pos_block[pos as usize] = block;
        self.have += 1;
        let g = self.groups.of(pos);
        self.group_have[g as usize] += 1;
        self.check_decodable(g);
        if pos == self.contig {
            self.contig = self.received.next_clear(pos);
        }
    }

    /// Takes the block at `pos`, checked (its group checked out, or its group's list
    /// names it), for the sink: a cache slot's is written when the drain reaches it, one
    /// in memory at the next drain (its bytes stay counted until then).
    fn commit(&mut self, pos: u32, block: u32, arrival: Arrival, at: PendingAt) {
        match at {
            PendingAt::Slot(slot) => self.slot_state[slot as usize] = SlotState::Checked,
            PendingAt::Memory(data) => self.ready.push_back((block, data)),
        }
        self.held += 1;
        self.highest_checked = self.highest_checked.max(pos + 1);
        match arrival {
            Arrival::Data => self.stats.data_accepted += 1,
            Arrival::Repair => self.stats.repairs_accepted += 1,
            Arrival::Fec => self.stats.fec_recovered += 1,
        }
    }

    /// Takes a block that its group's list names at `pos` (the group has no pending
    /// blocks then: every block of a listed group is checked as it comes). Once every
    /// position of the group is in, its list is no longer needed.
    fn commit_listed(&mut self, pos: u32, block: u32, arrival: Arrival, at: PendingAt) {
        self.mark(pos, block);
        self.commit(pos, block, arrival, at);
        let hg = pos / GROUP_POSITIONS;
        let (start, end) = manifest::group_range(hg, self.groups.stream_len);
        if self.received.count_range(start, end) == end - start {
            self.group_lists.remove(&hg);
        }
        let lockstep = self.ann.as_ref().is_some_and(|a| a.flags & Announce::LOCKSTEP != 0);
        if lockstep && arrival == Arrival::Data {
            self.request_gaps(pos);
        }
    }

    /// Lock-step gap: asks for what is missing below `pos`, whose group checked out (a
    /// block not checked yet could be an insider's, far ahead, making every receiver ask
    /// for what the sender has not sent), answered to us alone by unicast.
    fn request_gaps(&mut self, pos: u32) {
        if pos <= self.contig {
            return;
        }
        let from = self.contig.max(self.requested_upto);
        let mut n = 0;
        for p in from..pos {
            if !self.received.get(p) && n < 16 {
                self.out.push_back(Out::Read {
                    round: 0,
                    pos: p,
                    kind: ReadRequest::INDIVIDUAL,
                });
                n += 1;
            }
        }
        self.requested_upto = self.requested_upto.max(pos);
    }

    /// Undoes [`Receiver::take_pending`] for `pos` (its block is gone).
    fn unmark(&mut self, pos: u32) {
        self.received.clear(pos);
        self.pos_block[pos as usize] = u32::MAX;
        self.have -= 1;
        let g = self.groups.of(pos);
        self.group_have[g as usize] -= 1;
        self.contig = self.contig.min(pos);
    }

    /// Checks a whole hash group against its signed hash: every block is taken for the
    /// sink, or every block is dropped and fetched again.
    fn check_group(&mut self, now: Instant, hg: u32) {
        let Some(group) = self.pending.remove(&hg) else { return };
        self.pending_bytes -= PENDING_GROUP_COST;
        let (start, _) = manifest::group_range(hg, self.groups.stream_len);
        let got = manifest::group_hash(group.members.iter().flatten().map(|m| (m.block, &m.hash)));
        let good = got == self.group_hashes[hg as usize];
        if !good {
            self.stats.bad_group += 1;
        }
        let lockstep = self.ann.as_ref().is_some_and(|a| a.flags & Announce::LOCKSTEP != 0);
        let mut driven = None;
        for (i, m) in group.members.into_iter().enumerate() {
            let Some(m) = m else { continue };
            let pos = start + i as u32;
            if good {
                if m.arrival == Arrival::Data {
                    driven = Some(pos);
                }
                self.commit(pos, m.block, m.arrival, m.at);
            } else {
                match m.at {
                    PendingAt::Slot(slot) => self.slot_state[slot as usize] = SlotState::Dropped,
                    PendingAt::Memory(data) => self.pending_bytes -= data.len(),
                }
                self.stats.bad_block += 1;
                self.unmark(pos);
            }
        }
        if good {
            self.group_lists.remove(&hg);
            if self.lists_wanted.remove(&hg) {
                self.manifest_inflight = self.manifest_inflight.saturating_sub(1);
            }
        } else {
            // Asked for again at the next repair round (STATUS lists them missing), and
            // in lock-step as gaps once a later group checks out; from now on its blocks
            // are checked one by one, so that a forger racing the sender cannot make
            // it fail again.
            self.requested_upto = self.requested_upto.min(start);
            self.want_list(now, hg);
            self.queue_ack(now);
        }
        if let (true, Some(pos)) = (lockstep, driven) {
            self.request_gaps(pos);
        }
    }

    /// Once the pending memory is half full, asks for the GROUP-HASHES of the oldest
    /// incomplete groups behind the stream (their missing positions ended more than
    /// [`REORDER_WINDOW`] below the highest one seen: lost, not late), oldest first, at
    /// most [`MAX_EARLY_LISTS`] at a time: a list checks the blocks it names one by one,
    /// so they go to the sink and free their memory long before the repairs complete
    /// their groups. Giving groups up ([`Receiver::pending_room`]) stays the last resort,
    /// for when the lists do not come in time or [`MAX_GROUP_LISTS`] are held.
    fn want_lists_behind(&mut self, now: Instant) {
        if self.pending_bytes <= self.cfg.max_pending_bytes / 2
            || self.state != ReceiverState::Receiving
            || self.lists_wanted.len() >= MAX_EARLY_LISTS
        {
            return;
        }
        let mut room = MAX_EARLY_LISTS - self.lists_wanted.len();
        let mut picked = Vec::new();
        for (&hg, g) in &self.pending {
            let (start, end) = manifest::group_range(hg, self.groups.stream_len);
            if room == 0 || end.saturating_add(REORDER_WINDOW) > self.highest {
                break;
            }
            if g.present < end - start && self.chunk_known.get(start / MANIFEST_CHUNK) && !self.lists_wanted.contains(&hg) {
                picked.push(hg);
                room -= 1;
            }
        }
        for hg in picked {
            self.want_list(now, hg);
        }
    }

    /// Asks for the GROUP-HASHES of hash group `hg`.
    fn want_list(&mut self, now: Instant, hg: u32) {
        if !self.group_lists.contains_key(&hg) && self.lists_wanted.len() < MAX_WANTED && self.group_lists.len() < MAX_GROUP_LISTS {
            self.lists_wanted.insert(hg);
            self.request_chunks(now);
        }
    }

    /// What the per-position list of the group of `pos` says of `block` (with SHA-256
    /// `hash`) there: `None` without a list, `Some(true)` if it names that block (it is
    /// checked: taken for the sink at once), `Some(false)` if it names another block or
    /// hash (refused at once).
    fn listed(&self, pos: u32, block: u32, hash: &BlockHash) -> Option<bool> {
        let hg = pos / GROUP_POSITIONS;
        self.group_lists
            .get(&hg)
            .and_then(|l| l.get((pos - hg * GROUP_POSITIONS) as usize))
            .map(|(b, h)| *b == block && h == hash)
    }

    fn on_group_hashes(&mut self, now: Instant, l: crate::wire::GroupHashes<'_>) {
        let stream_len = self.groups.stream_len;
        let hg = l.group;
        let (start, end) = manifest::group_range(hg, stream_len);
        if hg >= manifest::group_count(stream_len) || l.entries.len() != (end - start) as usize * ENTRY_LEN {
            self.stats.absurd += 1;
            return;
        }
        if !self.lists_wanted.contains(&hg) {
            self.stats.manifest_duplicates += 1; // another receiver's
            return;
        }
        if !self.chunk_known.get(start / MANIFEST_CHUNK) {
            return;
        }
        let list: Vec<(u32, BlockHash)> = l
            .entries
            .chunks_exact(ENTRY_LEN)
            .map(|e| (u32::from_be_bytes([e[0], e[1], e[2], e[3]]), e[4..].try_into().expect("32 bytes")))
            .collect();
        if manifest::group_hash(list.iter().map(|(b, h)| (*b, h))) != self.group_hashes[hg as usize] {
            self.stats.bad_signature += 1;
            return;
        }
        self.lists_wanted.remove(&hg);
        self.manifest_inflight = self.manifest_inflight.saturating_sub(1);
        self.stats.group_lists += 1;
        // The pending blocks that are not the listed ones go.
        let mut pending = self.pending.remove(&hg);
        if let Some(group) = &mut pending {
            for (i, (b, h)) in list.iter().enumerate() {
                let wrong = group.members[i].as_ref().is_some_and(|m| m.block != *b || m.hash != *h);
                if wrong {
                    match group.members[i].take().map(|m| m.at) {
                        Some(PendingAt::Slot(slot)) => self.slot_state[slot as usize] = SlotState::Dropped,
                        Some(PendingAt::Memory(data)) => self.pending_bytes -= data.len(),
                        None => {}
                    }
                    group.present -= 1;
                    self.stats.bad_block += 1;
                    self.unmark(start + i as u32);
                }
            }
        }
        // The rest are the listed blocks: checked, they go to the sink now instead of
        // waiting in the pending memory for the group's missing positions, and the list
        // checks those as they come. Unless the list cannot be kept while positions are
        // missing ([`MAX_GROUP_LISTS`]): then they stay pending, for the whole group's
        // check.
        let whole = self.received.count_range(start, end) == end - start;
        if whole || self.group_lists.len() < MAX_GROUP_LISTS {
            if let Some(group) = pending {
                self.pending_bytes -= PENDING_GROUP_COST;
                let mut driven = None;
                for (i, m) in group.members.into_iter().enumerate() {
                    let Some(m) = m else { continue };
                    let pos = start + i as u32;
                    if m.arrival == Arrival::Data {
                        driven = Some(pos);
                    }
                    self.commit(pos, m.block, m.arrival, m.at);
                }
                let lockstep = self.ann.as_ref().is_some_and(|a| a.flags & Announce::LOCKSTEP != 0);
                if let (true, Some(pos)) = (lockstep, driven) {
                    self.request_gaps(pos);
                }
            }
            if !whole {
                self.group_lists.insert(hg, list);
            }
        } else if let Some(group) = pending {
            if group.present > 0 {
                self.pending.insert(hg, group);
            } else {
                self.pending_bytes -= PENDING_GROUP_COST;
            }
        }
        self.request_chunks(now);
    }

    /// A block for a position that already has one: a duplicate, or, if the position's
    /// group is still pending and the block differs, one of the two is forged.
    fn on_again(&mut self, now: Instant, pos: u32, block: u32, payload: &[u8]) {
        let hg = pos / GROUP_POSITIONS;
        let start = hg * GROUP_POSITIONS;
        let held = self
            .pending
            .get(&hg)
            .and_then(|g| g.members.get((pos - start) as usize))
            .and_then(|m| m.as_ref());
        match held {
            Some(m) if m.block != block || manifest::block_hash(payload) != m.hash => {
                self.stats.conflicting += 1;
                // One of the two is forged: the group's list tells which.
                self.want_list(now, hg);
            }
            _ => self.stats.duplicates += 1,
        }
    }

    fn queue_ack(&mut self, now: Instant) {
        if !self.out.iter().any(|o| matches!(o, Out::Ack)) {
            self.out.push_back(Out::Ack);
        }
        self.since_ack = 0;
        self.last_ack = now;
        self.free_at_ack = self.free.len() as u32;
    }

    fn group_need(&self, g: u32) -> u32 {
        let (s, e) = self.groups.range(g);
        let held = self.fec.get(&g).map_or(0, |h| h.shards.len() as u32);
        (e - s).saturating_sub(self.group_have[g as usize] + held)
    }

    fn on_block(&mut self, now: Instant, seq: u32, block: u32, payload: &[u8], repair: bool) {
        let a = self.ann.as_ref().expect("registered");
        if seq >= a.stream_len || block >= a.block_count || payload.len() != block_len(a, block) {
            self.stats.absurd += 1;
            return;
        }
        let bs = a.block_size as usize;
        if self.received.get(seq) {
            self.on_again(now, seq, block, payload);
            return;
        }
        if self.group_need(self.groups.of(seq)) == 0 {
            self.stats.duplicates += 1;
            return;
        }
        if self.free.is_empty() {
            self.stats.cache_overflow += 1;
            return;
        }
        if !self.chunk_ready(now, seq) {
            return;
        }
        let hash = manifest::block_hash(payload);
        let listed = self.listed(seq, block, &hash);
        if listed == Some(false) {
            self.stats.bad_block += 1;
            return;
        }
        if listed.is_none() && !self.pending_room(seq, 0, true) {
            self.stats.pending_overflow += 1;
            return;
        }
        let Some(slot) = self.free.pop() else {
            self.stats.cache_overflow += 1;
            return;
        };
        self.slots[slot as usize * bs..slot as usize * bs + payload.len()].copy_from_slice(payload);
        self.slot_meta[slot as usize] = (seq, block);
        self.slot_state[slot as usize] = SlotState::Pending;
        self.queue.push_back(slot);
        self.highest = self.highest.max(seq + 1);
        self.want_chunks_ahead(now);
        let arrival = if repair { Arrival::Repair } else { Arrival::Data };
        if listed == Some(true) {
            self.commit_listed(seq, block, arrival, PendingAt::Slot(slot));
        } else {
            self.take_pending(now, seq, block, hash, arrival, PendingAt::Slot(slot));
        }
        self.since_ack += 1;
        let every = self.ann.as_ref().map_or(16, |a| a.ack_every as u32);
        if self.since_ack >= every {
            self.queue_ack(now);
        }
    }

    fn check_decodable(&mut self, g: u32) {
        if let Some(h) = self.fec.get(&g) {
            let (s, e) = self.groups.range(g);
            if !h.shards.is_empty()
                && self.group_have[g as usize] < e - s
                && self.group_have[g as usize] + h.shards.len() as u32 >= e - s
                && !self.decodable.contains(&g)
            {
                self.decodable.push(g);
            }
        }
    }

    fn on_fec(&mut self, group: u32, total: u16, index: u16, shard: &[u8]) {
        let a = self.ann.as_ref().expect("registered");
        if group >= self.groups.count() {
            self.stats.absurd += 1;
            return;
        }
        let (s, e) = self.groups.range(group);
        if total != recovery_total(e - s) || shard.len() != a.block_size as usize + FEC_SHARD_PREFIX
        {
            self.stats.absurd += 1;
            return;
        }
        if self.group_need(group) == 0 {
            self.stats.duplicates += 1;
            return;
        }
        if self.fec_bytes + shard.len() > self.cfg.max_fec_bytes {
            self.stats.cache_overflow += 1;
            return;
        }
        let h = self.fec.entry(group).or_default();
        if h.shards.iter().any(|(i, _)| *i == index) {
            self.stats.duplicates += 1;
            return;
        }
        h.shards.push((index, shard.into()));
        self.fec_bytes += shard.len();
        self.stats.fec_accepted += 1;
        self.check_decodable(group);
    }

    /// Empties up to `max` cache slots (the consumer's pace): a block of a checked hash
    /// group goes into `sink`, one whose group is not complete yet moves to the pending
    /// memory. Then decodes any FEC group that became decodable. Blocks of groups
    /// checked after they left the cache (or decoded) are written at once, beyond `max`.
    /// Returns the blocks written.
    pub fn drain<K: BlockSink + ?Sized>(
        &mut self,
        now: Instant,
        sink: &mut K,
        max: usize,
    ) -> std::io::Result<usize> {
        let Some(a) = self.ann.clone() else {
            return Ok(0);
        };
        let bs = a.block_size as usize;
        let mut n = 0;
        // Blocks of groups that completed after they left the cache, and decoded ones,
        // are written at once (they no longer hold a slot the sender is waiting for).
        n += self.write_ready(sink, usize::MAX)?;
        // Slots emptied, at the consumer's pace (moving a block aside costs a copy).
        let mut taken = 0;
        while let Some(&slot) = self.queue.front() {
            let (pos, block) = self.slot_meta[slot as usize];
            let len = block_len(&a, block);
            let bytes = slot as usize * bs..slot as usize * bs + len;
            match self.slot_state[slot as usize] {
                SlotState::Checked | SlotState::Pending if taken >= max => break,
                SlotState::Checked => {
                    sink.write_block(block, &self.slots[bytes])?;
                    n += 1;
                    taken += 1;
                }
                SlotState::Dropped => {}
                SlotState::Pending => {
                    taken += 1;
                    // Its group is not whole yet: the block waits outside the cache, so
                    // that the cache keeps pace with the stream.
                    let hg = pos / GROUP_POSITIONS;
                    let start = hg * GROUP_POSITIONS;
                    if self.pending_room(pos, len, true) {
                        let data: Box<[u8]> = self.slots[bytes.clone()].into();
                        if let Some(Some(m)) = self.pending.get_mut(&hg).and_then(|g| g.members.get_mut((pos - start) as usize)) {
                            m.at = PendingAt::Memory(data);
                            self.add_pending_bytes(len);
                        }
                    } else {
                        self.stats.pending_overflow += 1;
                        if let Some(g) = self.pending.get_mut(&hg) {
                            g.members[(pos - start) as usize] = None;
                            g.present -= 1;
                            if g.present == 0 {
                                self.pending.remove(&hg);
                                self.pending_bytes -= PENDING_GROUP_COST;
                            }
                        }
                        self.unmark(pos);
                    }
                }
            }
            self.queue.pop_front();
            self.free.push(slot);
        }
        self.want_lists_behind(now);
        if self.queue.is_empty() && self.ready.is_empty() && !self.decodable.is_empty() {
            let groups = std::mem::take(&mut self.decodable);
            for g in groups {
                self.decode(now, g, sink)?;
            }
            // Decoded blocks of groups that checked out, at once (as decoding always did).
            n += self.write_ready(sink, usize::MAX)?;
        }
        let every = self.ann.as_ref().map_or(16, |a| a.ack_every as u32);
        if self.keys.is_some()
            && self.state == ReceiverState::Receiving
            && self.free.len() as u32 >= self.free_at_ack + every
        {
            self.queue_ack(now);
        }
        if self.state == ReceiverState::Receiving
            && self.held == self.groups.stream_len
            && self.queue.is_empty()
            && self.ready.is_empty()
        {
            self.state = ReceiverState::Complete;
            self.fec.clear();
            self.fec_bytes = 0;
            // Tells the sender at once (contig = stream length), so the repair rounds
            // need not wait for this receiver's STATUS.
            self.queue_ack(now);
        }
        Ok(n)
    }

    /// Writes up to `max` blocks of checked groups that waited outside the cache.
    fn write_ready<K: BlockSink + ?Sized>(&mut self, sink: &mut K, max: usize) -> std::io::Result<usize> {
        let mut n = 0;
        while n < max {
            let Some((block, data)) = self.ready.pop_front() else { break };
            if let Err(e) = sink.write_block(block, &data) {
                self.ready.push_front((block, data));
                return Err(e);
            }
            self.pending_bytes -= data.len();
            n += 1;
        }
        Ok(n)
    }

    /// The bytes of a block present at a position whose group is still pending.
    fn pending_data(&self, pos: u32) -> Option<&[u8]> {
        let hg = pos / GROUP_POSITIONS;
        let m = self.pending.get(&hg)?.members.get((pos - hg * GROUP_POSITIONS) as usize)?.as_ref()?;
        let bs = self.ann.as_ref()?.block_size as usize;
        Some(match &m.at {
            PendingAt::Memory(d) => &d[..],
            PendingAt::Slot(slot) => {
                let len = block_len(self.ann.as_ref()?, m.block);
                &self.slots[*slot as usize * bs..*slot as usize * bs + len]
            }
        })
    }

    fn decode<K: BlockSink + ?Sized>(
        &mut self,
        now: Instant,
        g: u32,
        sink: &mut K,
    ) -> std::io::Result<usize> {
        let Some(held) = self.fec.remove(&g) else {
            return Ok(0);
        };
        {
            // A group that failed its hash check since may lack originals now: the
            // symbols wait for the repairs.
            let (s, e) = self.groups.range(g);
            if self.group_have[g as usize] + (held.shards.len() as u32) < e - s {
                self.fec.insert(g, held);
                return Ok(0);
            }
        }
        self.fec_bytes -= held.shards.iter().map(|(_, s)| s.len()).sum::<usize>();
        let a = self.ann.as_ref().expect("registered").clone();
        let (s, e) = self.groups.range(g);
        let k = (e - s) as usize;
        let shard_bytes = a.block_size as usize + FEC_SHARD_PREFIX;
        let total = recovery_total(e - s) as usize;
        let Ok(mut dec) = reed_solomon_simd::ReedSolomonDecoder::new(k, total, shard_bytes) else {
            self.stats.absurd += 1;
            return Ok(0);
        };
        let mut shard = vec![0u8; shard_bytes];
        for pos in s..e {
            if !self.received.get(pos) {
                continue;
            }
            let block = self.pos_block[pos as usize];
            let len = block_len(&a, block);
            shard[4 + len..].fill(0);
            shard[..4].copy_from_slice(&block.to_be_bytes());
            match self.pending_data(pos) {
                Some(data) => shard[4..4 + len].copy_from_slice(data),
                None => sink.read_block(block, &mut shard[4..4 + len])?,
            }
            if dec.add_original_shard((pos - s) as usize, &shard).is_err() {
                self.stats.absurd += 1;
                return Ok(0);
            }
        }
        for (i, sh) in &held.shards {
            if dec.add_recovery_shard(*i as usize, sh).is_err() {
                self.stats.absurd += 1;
                return Ok(0);
            }
        }
        let Ok(res) = dec.decode() else {
            self.stats.absurd += 1;
            return Ok(0);
        };
        let mut n = 0;
        let restored: Vec<(usize, Vec<u8>)> = res
            .restored_original_iter()
            .map(|(i, d)| (i, d.to_vec()))
            .collect();
        drop(res);
        self.stats.fec_decodes += 1;
        for (i, data) in restored {
            let pos = s + i as u32;
            let block = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            if block >= a.block_count || self.received.get(pos) {
                self.stats.absurd += 1;
                continue;
            }
            let len = block_len(&a, block);
            if !self.chunk_ready(now, pos) {
                continue;
            }
            let hash = manifest::block_hash(&data[4..4 + len]);
            let listed = self.listed(pos, block, &hash);
            if listed == Some(false) {
                self.stats.bad_block += 1;
                continue;
            }
            if !self.pending_room(pos, len, listed.is_none()) {
                self.stats.pending_overflow += 1;
                continue;
            }
            let block_data: Box<[u8]> = data[4..4 + len].into();
            self.add_pending_bytes(len);
            if listed == Some(true) {
                self.commit_listed(pos, block, Arrival::Fec, PendingAt::Memory(block_data));
            } else {
                self.take_pending(now, pos, block, hash, Arrival::Fec, PendingAt::Memory(block_data));
            }
            n += 1;
        }
        self.contig = self.received.next_clear(self.contig);
        Ok(n)
    }

    /// Free slots not reserved for packets still on their way: positions missing just
    /// below the highest one seen may be reordered rather than lost ([`REORDER_WINDOW`]).
    fn window_slots(&self) -> u32 {
        let hi = self.highest.max(self.contig);
        let lo = self.contig.max(hi.saturating_sub(REORDER_WINDOW));
        let expected = (hi - lo) - self.received.count_range(lo, hi);
        (self.free.len() as u32).saturating_sub(expected)
    }

    /// The answer to DONE(`round`): one STATUS when complete or when what is missing fits
    /// one datagram, else as many parts as it takes (at most [`MAX_STATUS_PARTS`]), each
    /// listing the next positions as ranges or as a bitmap, whichever covers more of
    /// them. The sender merges the parts and plans the round from all of them: a loss
    /// spread over the whole image is repaired in one round, not one datagram's worth
    /// (~8,192 positions past the first gap) per round. `TRUNCATED` only when even the
    /// last part could not list everything.
    fn status(&self, round: u32) -> Vec<Status> {
        let receiver = self.id().unwrap_or(0);
        let free_slots = self.free.len() as u32;
        if self.have == self.groups.stream_len {
            return vec![Status {
                receiver,
                round,
                free_slots,
                total_missing: 0,
                flags: Status::COMPLETE,
                part: 0,
                parts: 1,
                missing: Missing::None,
            }];
        }
        // Per group, list only as many missing positions as the group still needs after
        // the FEC symbols already held: any block or new symbol then counts.
        let mut list = Vec::new();
        for g in 0..self.groups.count() {
            let need = self.group_need(g);
            if need == 0 {
                continue;
            }
            let (s, e) = self.groups.range(g);
            let mut p = self.received.next_clear(s);
            let mut n = 0;
            while p < e && n < need {
                list.push(p);
                n += 1;
                p = self.received.next_clear(p + 1);
            }
        }
        let total_missing = list.len() as u32;
        let mut missing = Vec::new();
        let mut at = 0;
        while at < list.len() && missing.len() < MAX_STATUS_PARTS as usize {
            let (m, n) = status_part(&list[at..]);
            missing.push(m);
            at += n;
        }
        if missing.is_empty() {
            // Every group has what it needs (FEC symbols held, not decoded yet).
            missing.push(Missing::None);
        }
        let flags = if at < list.len() { Status::TRUNCATED } else { 0 };
        let parts = missing.len() as u8;
        missing
            .into_iter()
            .enumerate()
            .map(|(part, missing)| Status {
                receiver,
                round,
                free_slots,
                total_missing,
                flags,
                part: part as u8,
                parts,
                missing,
            })
            .collect()
    }

    /// Runs timers: REGISTER retries and the ACK heartbeat.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            ReceiverState::Registering if now >= self.next_register => {
                self.out.push_back(Out::Register);
                self.next_register = now + self.cfg.register_interval;
            }
            ReceiverState::Receiving | ReceiverState::Complete
                if now >= self.last_ack + self.cfg.ack_interval =>
            {
                self.queue_ack(now);
            }
            _ => {}
        }
        if now >= self.next_manifest_request {
            self.want_chunks_ahead(now);
            self.manifest_inflight = 0; // what did not come by now is asked for again
            self.request_chunks(now);
        }
    }

    /// When [`Receiver::handle_timeout`] next has work (or now, if datagrams are queued).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.out.is_empty() {
            return Some(self.last_ack.min(self.next_register));
        }
        match self.state {
            ReceiverState::Registering => Some(self.next_register),
            ReceiverState::Receiving if !(self.chunks_wanted.is_empty() && self.lists_wanted.is_empty()) => Some(
                (self.last_ack + self.cfg.ack_interval).min(self.next_manifest_request),
            ),
            ReceiverState::Receiving | ReceiverState::Complete => {
                Some(self.last_ack + self.cfg.ack_interval)
            }
            _ => None,
        }
    }

    /// Appends the next datagram for the sender to `buf` (REGISTER, ACK, STATUS,
    /// READ-REQUEST, LEAVE). Call until `None`.
    pub fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let sender = self.sender?;
        let session = self.session?;
        while let Some(o) = self.out.pop_front() {
            let (body, key) = match o {
                Out::Register => (
                    Body::Register(Register {
                        nonce: self.cfg.nonce,
                        cache_slots: self.cfg.cache_slots.max(1),
                    }),
                    &self.site,
                ),
                other => {
                    let Some(k) = &self.keys else { continue };
                    let body = match other {
                        Out::Ack => {
                            self.stats.acks_sent += 1;
                            Body::Ack(Ack {
                                receiver: k.id,
                                contig: self.contig.min(self.highest_checked),
                                highest: self.highest_checked,
                                free_slots: self.window_slots(),
                            })
                        }
                        Out::Status(round) => {
                            let mut parts = self.status(round).into_iter();
                            let Some(first) = parts.next() else { continue };
                            for (k, p) in parts.enumerate() {
                                self.out.insert(k, Out::StatusPart(p));
                            }
                            self.stats.status_sent += 1;
                            Body::Status(first)
                        }
                        Out::StatusPart(p) => {
                            self.stats.status_sent += 1;
                            Body::Status(p)
                        }
                        Out::Read { round, pos, kind } => {
                            self.stats.read_requests_sent += 1;
                            Body::ReadRequest(ReadRequest {
                                receiver: k.id,
                                round,
                                pos,
                                kind,
                            })
                        }
                        Out::Leave => Body::Leave(Leave { receiver: k.id }),
                        Out::ManifestRequest => {
                            let chunks: Vec<u32> = self
                                .chunks_wanted
                                .iter()
                                .copied()
                                .chain(self.lists_wanted.iter().map(|g| g | GROUP_LIST_FLAG))
                                .take(MAX_MANIFEST_REQUEST)
                                .collect();
                            if chunks.is_empty() {
                                continue;
                            }
                            self.manifest_inflight = chunks.len() as u32;
                            self.stats.manifest_requests_sent += 1;
                            Body::ManifestRequest(ManifestRequest { receiver: k.id, chunks })
                        }
                        Out::Register => unreachable!("handled above"),
                    };
                    (body, &k.mine)
                }
            };
            if let Ok(size) = (Packet { session, body }).encode_append(key, buf) {
                return Some(Transmit::new(sender, size));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Manifest, SessionManifest};
    use crate::sender::BlockSource;
    use crate::wire::{Done, Registered, Role, SIGNATURE_LEN};
    use ed25519_dalek::{Signer, SigningKey};
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    const SITE: [u8; 32] = [7; 32];
    const SESSION: u32 = 0x5e55;
    const SESSION_KEY: [u8; 16] = [9; 16];
    const IMAGE: [u8; 16] = [1; 16];
    const NONCE: u64 = 77;
    const ID: u32 = 3;
    const BLOCK: u16 = 256;
    const BLOCKS: u32 = 100;

    struct Image;
    impl BlockSource for Image {
        fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
            buf.iter_mut().enumerate().for_each(|(i, b)| *b = (index as usize * 3 + i) as u8);
            Ok(())
        }
    }

    fn sender_addr() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 9000)
    }

    /// The sender's manifest of a 100-block stream, and a lock-step receiver registered
    /// with its session (ANNOUNCE and REGISTERED as the sender sends them).
    fn registered(now: Instant) -> (SessionManifest, Receiver) {
        registered_with(now, Announce::LOCKSTEP, DEFAULT_MAX_PENDING_BYTES)
    }

    /// [`registered`] with the ANNOUNCE's `flags` and the receiver's pending memory.
    fn registered_with(now: Instant, flags: u8, max_pending_bytes: usize) -> (SessionManifest, Receiver) {
        registered_blocks(now, BLOCKS, flags, max_pending_bytes)
    }

    /// [`registered_with`] for a stream of `blocks` blocks.
    fn registered_blocks(now: Instant, blocks: u32, flags: u8, max_pending_bytes: usize) -> (SessionManifest, Receiver) {
        let (sm, mut rx) = announced_blocks(now, blocks, flags, max_pending_bytes);
        register(&mut rx, now);
        (sm, rx)
    }

    /// A receiver that heard the ANNOUNCE and waits for its REGISTERED.
    fn announced_blocks(now: Instant, blocks: u32, flags: u8, max_pending_bytes: usize) -> (SessionManifest, Receiver) {
        let key = SigningKey::from_bytes(&[5; 32]);
        let m = Manifest::build(&mut Image, BLOCK as u64 * blocks as u64, BLOCK, key).unwrap();
        let order: Vec<u32> = (0..blocks).collect();
        let sm = SessionManifest::new(m.clone(), &order);
        let mut cfg = ReceiverConfig::new(IMAGE, NONCE);
        cfg.site_secret = SITE;
        cfg.sender_key = Some(m.public_key());
        cfg.max_pending_bytes = max_pending_bytes;
        let mut rx = Receiver::new(now, cfg);
        let mut a = Announce {
            image_id: IMAGE,
            image_size: BLOCK as u64 * blocks as u64,
            block_size: BLOCK,
            block_count: blocks,
            stream_len: blocks,
            fec_group: 16,
            rate: 1 << 20,
            solicit_ms: 100,
            ack_every: 16,
            flags,
            manifest_root: [0; 32],
            signature: [0; SIGNATURE_LEN],
        };
        sm.sign_announce(SESSION, &mut a);
        let site = MacKey::site(&SITE);
        rx.handle(now, sender_addr(), &encode(Body::Announce(a), &site));
        assert_eq!(rx.state(), ReceiverState::Registering);
        (sm, rx)
    }

    /// The sender's REGISTERED for [`announced_blocks`]' receiver.
    fn register(rx: &mut Receiver, now: Instant) {
        let site = MacKey::site(&SITE);
        let pad = key_wrap_pad(&site, SESSION, ID, NONCE);
        let reg = Registered { receiver: ID, nonce: NONCE, wrapped_key: xor16(&SESSION_KEY, &pad) };
        rx.handle(now, sender_addr(), &encode(Body::Registered(reg), &site));
        assert_eq!(rx.state(), ReceiverState::Receiving);
        drain_out(rx, now);
    }

    fn session_key() -> MacKey {
        MacKey::session(&SESSION_KEY, SESSION)
    }

    fn encode(body: Body<'_>, key: &MacKey) -> Vec<u8> {
        let mut b = Vec::new();
        Packet { session: SESSION, body }.encode_append(key, &mut b).unwrap();
        b
    }

    /// Everything the receiver has queued for the sender, decoded.
    fn drain_out(rx: &mut Receiver, now: Instant) -> Vec<Body<'static>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = rx.poll_transmit(now, &mut buf) {
            let p = Packet::decode(&buf[buf.len() - t.size..]).unwrap();
            out.push(match p.body {
                Body::Register(r) => Body::Register(r),
                Body::ReadRequest(q) => Body::ReadRequest(q),
                Body::Status(s) => Body::Status(s),
                Body::Ack(a) => Body::Ack(a),
                Body::ManifestRequest(q) => Body::ManifestRequest(q),
                other => panic!("unexpected {other:?}"),
            });
        }
        out
    }

    fn reads_and_status(out: &[Body<'_>]) -> usize {
        out.iter().filter(|b| matches!(b, Body::ReadRequest(_) | Body::Status(_))).count()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// A fellow receiver holds the session key and can tag anything, but a DONE or ROLE
        /// it signs with its own key, or a signed one with a field changed, changes
        /// nothing: no early end of the session, no READ-REQUEST, no STATUS. The same
        /// packets signed by the sender do act (the check is not refusing everything).
        #[test]
        fn done_and_role_act_only_when_the_sender_signed_them(
            round in 0u32..1000,
            next_pos in 0u32..BLOCKS,
            finished in any::<bool>(),
            flip in 0usize..SIGNATURE_LEN * 8,
            forger_seed in any::<[u8; 32]>(),
        ) {
            let now = Instant::now();
            let (sm, mut rx) = registered(now);
            let forger = SigningKey::from_bytes(&forger_seed);
            let key = session_key();
            let flags = if finished { Done::FINISHED } else { 0 };
            let done = Done { round, stream_len: BLOCKS, flags, signature: [0; SIGNATURE_LEN] };
            let role = Role { round, requester: ID, next_pos, signature: [0; SIGNATURE_LEN] };

            let mut forged = Vec::new();
            let mut own = done.clone();
            own.signature = forger.sign(&manifest::done_message(SESSION, &sm.root(), &own)).to_bytes();
            forged.push(Body::Done(own));
            let mut flipped = done.clone();
            sm.sign_done(SESSION, &mut flipped);
            flipped.signature[flip / 8] ^= 1 << (flip % 8);
            forged.push(Body::Done(flipped));
            let mut changed = done.clone();
            sm.sign_done(SESSION, &mut changed);
            changed.flags ^= Done::FINISHED; // a DONE(round) made into a DONE(FINISHED) or back
            forged.push(Body::Done(changed));
            let mut own = role.clone();
            own.signature = forger.sign(&manifest::role_message(SESSION, &sm.root(), &own)).to_bytes();
            forged.push(Body::Role(own));
            let mut moved = role.clone();
            sm.sign_role(SESSION, &mut moved);
            moved.next_pos = (next_pos + 1) % BLOCKS; // the real role, sent somewhere else
            forged.push(Body::Role(moved));
            let mut other_session = role.clone();
            other_session.signature = sm_sign_role_for(&sm, SESSION ^ 1, &role);
            forged.push(Body::Role(other_session));

            let n = forged.len() as u64;
            for body in forged {
                rx.handle(now, sender_addr(), &encode(body, &key));
            }
            prop_assert_eq!(rx.stats().bad_signature, n);
            prop_assert_eq!(rx.state(), ReceiverState::Receiving);
            prop_assert_eq!(reads_and_status(&drain_out(&mut rx, now)), 0);

            // The sender's own ROLE makes us drive, its DONE ends or answers.
            let mut real = role.clone();
            sm.sign_role(SESSION, &mut real);
            rx.handle(now, sender_addr(), &encode(Body::Role(real), &key));
            let out = drain_out(&mut rx, now);
            prop_assert!(out.iter().any(|b| matches!(b, Body::ReadRequest(q) if q.pos == next_pos && q.round == round)));
            let mut real = done.clone();
            sm.sign_done(SESSION, &mut real);
            rx.handle(now, sender_addr(), &encode(Body::Done(real), &key));
            if finished {
                prop_assert_eq!(rx.state(), ReceiverState::Failed);
            } else {
                prop_assert!(drain_out(&mut rx, now).iter().any(|b| matches!(b, Body::Status(s) if s.round == round)));
            }
            prop_assert_eq!(rx.stats().bad_signature, n);
        }
    }

    /// Block `b` of the test image.
    fn block(b: u32) -> Vec<u8> {
        let mut v = vec![0; BLOCK as usize];
        Image.read_block(b, &mut v).unwrap();
        v
    }

    /// A sink that holds what was written and checks it is the image.
    #[derive(Default)]
    struct Disk(HashMap<u32, Vec<u8>>);
    impl BlockSink for Disk {
        fn write_block(&mut self, index: u32, data: &[u8]) -> std::io::Result<()> {
            assert_eq!(data, &block(index)[..], "block {index} written with bytes that are not the image's");
            self.0.insert(index, data.to_vec());
            Ok(())
        }
        fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
            buf.copy_from_slice(self.0.get(&index).ok_or_else(|| std::io::Error::other("not written"))?);
            Ok(())
        }
    }

    fn send_chunk(rx: &mut Receiver, sm: &mut SessionManifest, now: Instant) {
        send_chunk_n(rx, sm, now, 0);
        assert_eq!(rx.stats().manifest_chunks, 1);
    }

    fn send_chunk_n(rx: &mut Receiver, sm: &mut SessionManifest, now: Instant, n: u32) {
        let c = sm.chunk(n).unwrap();
        let body = Body::Manifest(ManifestChunk { first: c.first, positions: c.positions, group_hashes: c.group_hashes, signature: c.signature });
        rx.handle(now, sender_addr(), &encode(body, &session_key()));
    }

    /// A receiver that lost a MANIFEST chunk while the next one arrived keeps the lost
    /// chunk's blocks pending, asks for the chunk, and checks their groups when it comes:
    /// nothing is dropped or needs a repair. Blocks beyond every chunk the sender has
    /// sent are still refused.
    #[test]
    fn blocks_behind_a_lost_chunk_wait_for_it() {
        let now = Instant::now();
        let blocks = 3 * MANIFEST_CHUNK;
        let (mut sm, mut rx) = registered_blocks(now, blocks, 0, DEFAULT_MAX_PENDING_BYTES);
        let mut disk = Disk::default();
        send_chunk_n(&mut rx, &mut sm, now, 0);
        for pos in 0..MANIFEST_CHUNK {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
            rx.drain(now, &mut disk, usize::MAX).unwrap();
        }
        // Chunk 1 is lost, chunk 2 arrives (the sender sends chunks ahead of their blocks).
        send_chunk_n(&mut rx, &mut sm, now, 2);
        for pos in MANIFEST_CHUNK..2 * MANIFEST_CHUNK {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
            rx.drain(now, &mut disk, usize::MAX).unwrap();
        }
        let x = rx.stats().clone();
        assert_eq!((x.ahead_of_chunk, x.unverified), (MANIFEST_CHUNK as u64, 0), "{x:?}");
        assert_eq!(rx.blocks_received(), MANIFEST_CHUNK, "the lost chunk's blocks wait unchecked");
        assert!(drain_out(&mut rx, now).iter().any(|b| matches!(b, Body::ManifestRequest(_))), "the lost chunk is asked for");
        send_chunk_n(&mut rx, &mut sm, now, 1);
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!(rx.blocks_received(), 2 * MANIFEST_CHUNK);
        assert_eq!(disk.0.len() as u32, 2 * MANIFEST_CHUNK);
        assert_eq!(rx.pending_bytes(), 0);
        let x = rx.stats().clone();
        assert_eq!((x.bad_group, x.pending_overflow), (0, 0), "{x:?}");
    }

    /// The manifest and blocks that arrive before REGISTERED (a late joiner's first, or
    /// the group socket's read before the unicast one's) cannot be checked yet: they are
    /// kept and checked once the key comes, so none of them has to be repaired.
    #[test]
    fn datagrams_before_registered_are_checked_once_the_key_comes() {
        let now = Instant::now();
        let (mut sm, mut rx) = announced_blocks(now, BLOCKS, 0, DEFAULT_MAX_PENDING_BYTES);
        send_chunk_n(&mut rx, &mut sm, now, 0);
        for pos in 0..32 {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
        }
        assert_eq!((rx.stats().manifest_chunks, rx.blocks_received()), (0, 0), "nothing taken before the key");
        register(&mut rx, now);
        let mut disk = Disk::default();
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        let x = rx.stats().clone();
        assert_eq!((x.early_kept, x.early_dropped, x.manifest_chunks, x.forged), (33, 0, 1, 0), "{x:?}");
        assert_eq!(rx.blocks_received(), 32);
        assert_eq!(disk.0.len(), 32);
        for pos in 0..32 {
            assert_eq!(disk.0[&pos], block(pos));
        }
    }

    /// What is kept before REGISTERED is bounded: past [`MAX_EARLY_BYTES`] datagrams are
    /// dropped, and those kept are still checked, so datagrams made without the session
    /// key (anyone can send them with the session's number) are refused as forged.
    #[test]
    fn datagrams_before_registered_are_bounded_and_still_checked() {
        let now = Instant::now();
        let (mut sm, mut rx) = announced_blocks(now, BLOCKS, 0, DEFAULT_MAX_PENDING_BYTES);
        let junk = encode(Body::Data(crate::wire::Data { seq: 0, block: 0, payload: &block(0) }), &MacKey::session(&[1; 16], SESSION));
        let fits = MAX_EARLY_BYTES / junk.len();
        for _ in 0..fits {
            rx.handle(now, sender_addr(), &junk);
        }
        send_block(&mut rx, now, 0, 0, &block(0), false);
        assert_eq!(rx.stats().early_dropped, 1, "the genuine block came when the memory was full");
        register(&mut rx, now);
        let x = rx.stats().clone();
        assert_eq!((x.early_kept, x.forged, rx.blocks_received()), (fits as u64, fits as u64, 0), "{x:?}");
        // It comes again, and now it is taken.
        send_chunk(&mut rx, &mut sm, now);
        for pos in 0..16 {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
        }
        assert_eq!(rx.blocks_received(), 16);
    }

    /// Without a later chunk, a block ahead of its chunk cannot be told from an
    /// insider's from far ahead: it is refused and its chunk asked for.
    #[test]
    fn a_block_beyond_every_chunk_sent_is_refused() {
        let now = Instant::now();
        let blocks = 3 * MANIFEST_CHUNK;
        let (mut sm, mut rx) = registered_blocks(now, blocks, 0, DEFAULT_MAX_PENDING_BYTES);
        send_chunk_n(&mut rx, &mut sm, now, 0);
        let far = 2 * MANIFEST_CHUNK + 7;
        send_block(&mut rx, now, far, far, &block(far), false);
        let x = rx.stats().clone();
        assert_eq!((x.ahead_of_chunk, x.unverified), (0, 1), "{x:?}");
        assert_eq!(rx.blocks_received(), 0);
    }

    fn send_block(rx: &mut Receiver, now: Instant, pos: u32, b: u32, payload: &[u8], repair: bool) {
        let d = crate::wire::Data { seq: pos, block: b, payload };
        let body = if repair { Body::Repair(d) } else { Body::Data(d) };
        rx.handle(now, sender_addr(), &encode(body, &session_key()));
    }

    /// An insider holds the session key, so its DATA carries a valid tag and the right
    /// block index, only other bytes (or a genuine block at another position). The
    /// receiver takes it in pending, finds its group's hash wrong once the group is
    /// whole, and drops the whole group: nothing of it reaches the sink or counts as
    /// received, STATUS lists it missing, and the sender's blocks sent again complete
    /// the image byte for byte.
    #[test]
    fn a_forged_block_fails_its_group_which_is_fetched_again() {
        let now = Instant::now();
        let (mut sm, mut rx) = registered_with(now, 0, DEFAULT_MAX_PENDING_BYTES);
        send_chunk(&mut rx, &mut sm, now);
        let mut disk = Disk::default();
        for pos in 0..32 {
            match pos {
                5 => send_block(&mut rx, now, pos, pos, &[0x66; BLOCK as usize], false),
                20 => send_block(&mut rx, now, pos, 21, &block(21), false),
                _ => send_block(&mut rx, now, pos, pos, &block(pos), false),
            }
            rx.drain(now, &mut disk, usize::MAX).unwrap();
            // The sender's own block 5 after the forged one: one of the two is forged.
            if pos == 9 {
                send_block(&mut rx, now, 5, 5, &block(5), false);
            }
        }
        let x = rx.stats().clone();
        assert_eq!((x.bad_group, x.bad_block, x.conflicting, x.data_accepted), (2, 32, 1, 0), "{x:?}");
        assert_eq!(rx.blocks_received(), 0);
        assert!(disk.0.is_empty());
        assert_eq!(rx.pending_bytes(), 0, "the dropped groups' blocks are let go");
        // The rest of the stream checks out group by group.
        for pos in 32..BLOCKS {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
        }
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!(rx.blocks_received(), BLOCKS - 32);
        assert_eq!(disk.0.len() as u32, BLOCKS - 32);
        // The repair round: both groups are asked for again, whole.
        let mut done = Done { round: 0, stream_len: BLOCKS, flags: 0, signature: [0; SIGNATURE_LEN] };
        sm.sign_done(SESSION, &mut done);
        rx.handle(now, sender_addr(), &encode(Body::Done(done), &session_key()));
        let status = drain_out(&mut rx, now).into_iter().find_map(|b| match b {
            Body::Status(s) => Some(s),
            _ => None,
        });
        let status = status.expect("a STATUS");
        assert_eq!(status.total_missing, 32, "{status:?}");
        // Both groups' lists were asked for; a list that is not the signed group's is
        // refused, the sender's is taken, and from then on a forged block is refused at
        // once while the sender's own is taken.
        let order: Vec<u32> = (0..BLOCKS).collect();
        let mut wrong = sm.group_list(0, &order).unwrap();
        wrong[5 * ENTRY_LEN + 4] ^= 1;
        rx.handle(now, sender_addr(), &encode(Body::GroupHashes(crate::wire::GroupHashes { group: 0, entries: &wrong }), &session_key()));
        assert_eq!((rx.stats().group_lists, rx.stats().bad_signature), (0, 1));
        for g in 0..2 {
            let list = sm.group_list(g, &order).unwrap();
            rx.handle(now, sender_addr(), &encode(Body::GroupHashes(crate::wire::GroupHashes { group: g, entries: &list }), &session_key()));
        }
        assert_eq!(rx.stats().group_lists, 2);
        send_block(&mut rx, now, 5, 5, &[0x66; BLOCK as usize], true);
        send_block(&mut rx, now, 20, 21, &block(21), true);
        assert_eq!((rx.stats().bad_block, rx.stats().bad_group), (34, 2), "{:?}", rx.stats());
        for pos in 0..32 {
            send_block(&mut rx, now, pos, pos, &block(pos), true);
        }
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!(rx.state(), ReceiverState::Complete);
        assert_eq!(rx.stats().repairs_accepted, 32);
        assert_eq!(disk.0.len() as u32, BLOCKS);
        assert_eq!(rx.stats().bad_group, 2);
    }

    /// Blocks of groups that cannot complete (a position of each lost) leave the cache
    /// for the pending memory, which stays within its limit: what does not fit is
    /// dropped and counted, never a panic, and comes again with the repairs.
    #[test]
    fn pending_memory_is_bounded() {
        let now = Instant::now();
        let limit = 4 * BLOCK as usize + PENDING_GROUP_COST * 2;
        let (mut sm, mut rx) = registered_with(now, 0, limit);
        send_chunk(&mut rx, &mut sm, now);
        let mut disk = Disk::default();
        for pos in (0..BLOCKS).filter(|p| p % GROUP_POSITIONS != 0) {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
            rx.drain(now, &mut disk, usize::MAX).unwrap();
            assert!(rx.pending_bytes() <= limit, "{} bytes pending", rx.pending_bytes());
        }
        let x = rx.stats().clone();
        assert!(x.pending_overflow > 0 && x.pending_peak_bytes as usize <= limit, "{x:?}");
        assert_eq!(rx.blocks_received(), 0);
        assert!(disk.0.is_empty());
        // Group by group, the sender's repairs complete the image.
        for g in 0..manifest::group_count(BLOCKS) {
            let (start, end) = manifest::group_range(g, BLOCKS);
            for pos in start..end {
                send_block(&mut rx, now, pos, pos, &block(pos), true);
            }
            rx.drain(now, &mut disk, usize::MAX).unwrap();
        }
        assert_eq!(rx.state(), ReceiverState::Complete, "{:?}", rx.stats());
        assert_eq!(disk.0.len() as u32, BLOCKS);
    }

    /// The receiver's ACK now: (contig, highest).
    fn last_ack(rx: &mut Receiver, now: Instant) -> (u32, u32) {
        rx.queue_ack(now);
        drain_out(rx, now)
            .into_iter()
            .rev()
            .find_map(|b| match b {
                Body::Ack(a) => Some((a.contig, a.highest)),
                _ => None,
            })
            .expect("an ACK")
    }

    /// Once the pending memory is half full (it holds two incomplete groups, and each
    /// group passes through it while it streams), the receiver asks for the list of its
    /// oldest incomplete group behind the stream (not of one the stream is still in).
    /// The list checks the blocks waiting for their group: they go to the sink at once,
    /// the pending memory drops to what the other incomplete group holds, the ACK counts
    /// them, and the group's missing block is then checked by the list alone as it comes
    /// (a forged one is refused and never reaches the sink), after which the list goes.
    #[test]
    fn a_list_checks_the_blocks_waiting_for_their_group() {
        let now = Instant::now();
        let limit = 3 * (16 * BLOCK as usize + PENDING_GROUP_COST);
        let (mut sm, mut rx) = registered_with(now, 0, limit);
        send_chunk(&mut rx, &mut sm, now);
        let mut disk = Disk::default();
        // Positions 0 and 17 are lost: groups 0 and 1 wait; groups 2 to 4 check out.
        for pos in (1..80).filter(|&p| p != 17) {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
            rx.drain(now, &mut disk, usize::MAX).unwrap();
        }
        let group_cost = 15 * BLOCK as usize + PENDING_GROUP_COST;
        assert_eq!(rx.pending_bytes(), 2 * group_cost);
        assert_eq!(rx.blocks_received(), 48);
        let asked: Vec<u32> = drain_out(&mut rx, now)
            .into_iter()
            .filter_map(|b| match b {
                Body::ManifestRequest(q) => Some(q.chunks),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(asked, vec![GROUP_LIST_FLAG], "group 0's list, not group 1's (the stream is still near it)");
        assert_eq!(last_ack(&mut rx, now), (0, 80));
        let order: Vec<u32> = (0..BLOCKS).collect();
        let list = sm.group_list(0, &order).unwrap();
        rx.handle(now, sender_addr(), &encode(Body::GroupHashes(crate::wire::GroupHashes { group: 0, entries: &list }), &session_key()));
        assert_eq!(rx.stats().group_lists, 1);
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!(rx.blocks_received(), 63);
        assert_eq!(disk.0.len(), 63);
        assert_eq!(rx.pending_bytes(), group_cost, "only group 1 waits");
        assert_eq!(rx.group_lists.len(), 1);
        assert!(!rx.pending.contains_key(&0));
        // A forged block 0 is refused by the list; the sender's is checked at once.
        send_block(&mut rx, now, 0, 0, &[0x66; BLOCK as usize], true);
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!((rx.stats().bad_block, rx.stats().bad_group), (1, 0));
        assert!(!disk.0.contains_key(&0));
        send_block(&mut rx, now, 0, 0, &block(0), true);
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!(rx.blocks_received(), 64);
        assert!(rx.group_lists.is_empty(), "group 0 is whole: its list goes");
        assert_eq!(last_ack(&mut rx, now), (17, 80));
        // Group 1 completes as before.
        send_block(&mut rx, now, 17, 17, &block(17), true);
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!(rx.pending_bytes(), 0);
        assert_eq!(rx.blocks_received(), 80);
        assert_eq!(disk.0.len(), 80);
        let x = rx.stats().clone();
        assert_eq!((x.data_accepted, x.repairs_accepted, x.pending_overflow), (78, 2, 0), "{x:?}");
        assert!(x.pending_peak_bytes as usize <= limit, "{x:?}");
    }

    /// With [`MAX_GROUP_LISTS`] lists held, a list that comes for a group still missing a
    /// position cannot be kept: its blocks stay pending (the group is checked whole, as
    /// without lists), never taken for the sink by a list that is then forgotten.
    #[test]
    fn with_every_list_held_a_group_waits_pending_as_before() {
        let now = Instant::now();
        let (mut sm, mut rx) = registered_with(now, 0, DEFAULT_MAX_PENDING_BYTES);
        send_chunk(&mut rx, &mut sm, now);
        let mut disk = Disk::default();
        for pos in 1..16 {
            send_block(&mut rx, now, pos, pos, &block(pos), false);
            rx.drain(now, &mut disk, usize::MAX).unwrap();
        }
        let pending = rx.pending_bytes();
        assert_eq!(pending, 15 * BLOCK as usize + PENDING_GROUP_COST);
        // Lists of other groups (as far as this test is concerned) fill the bound.
        for g in 0..MAX_GROUP_LISTS as u32 {
            rx.group_lists.insert(1000 + g, Vec::new());
        }
        rx.lists_wanted.insert(0);
        let order: Vec<u32> = (0..BLOCKS).collect();
        let list = sm.group_list(0, &order).unwrap();
        rx.handle(now, sender_addr(), &encode(Body::GroupHashes(crate::wire::GroupHashes { group: 0, entries: &list }), &session_key()));
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!(rx.stats().group_lists, 1);
        assert_eq!((rx.blocks_received(), rx.pending_bytes()), (0, pending));
        assert_eq!(rx.group_lists.len(), MAX_GROUP_LISTS);
        assert!(disk.0.is_empty());
        send_block(&mut rx, now, 0, 0, &block(0), true);
        rx.drain(now, &mut disk, usize::MAX).unwrap();
        assert_eq!((rx.blocks_received(), rx.pending_bytes(), disk.0.len()), (16, 0, 16));
    }

    fn sm_sign_role_for(sm: &SessionManifest, session: u32, r: &Role) -> [u8; SIGNATURE_LEN] {
        let mut r = r.clone();
        sm.sign_role(session, &mut r);
        r.signature
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The parts of a STATUS answer, taken one after the other, list every missing
        /// position exactly once and in order, each part fits the codec, and a part never
        /// covers fewer positions than what either encoding alone could hold.
        #[test]
        fn status_parts_list_every_position_once(
            gaps in proptest::collection::vec((1u32..200, 1u32..40), 1..3000),
        ) {
            let mut list = Vec::new();
            let mut p = 0u32;
            for (gap, run) in gaps {
                p += gap;
                list.extend(p..p + run);
                p += run;
            }
            let mut at = 0;
            let mut parts = 0;
            while at < list.len() {
                let (m, n) = status_part(&list[at..]);
                prop_assert!(n >= 1);
                let mut listed = Vec::new();
                m.for_each(|pos| listed.push(pos));
                prop_assert_eq!(&listed[..], &list[at..at + n]);
                let s = Status { receiver: 1, round: 0, free_slots: 0, total_missing: list.len() as u32, flags: 0, part: 0, parts: 1, missing: m.clone() };
                let mut buf = Vec::new();
                let encoded = Packet { session: 1, body: Body::Status(s) }.encode_append(&MacKey::from_bytes([1; 32]), &mut buf);
                prop_assert!(encoded.is_ok());
                // As many as 256 ranges would hold, and as a bitmap from the first one.
                let rest = &list[at..];
                let (mut runs, mut ranges_hold) = (0, 0);
                for (k, &q) in rest.iter().enumerate() {
                    if k == 0 || q != rest[k - 1] + 1 {
                        if runs == MAX_RANGES {
                            break;
                        }
                        runs += 1;
                    }
                    ranges_hold += 1;
                }
                let bitmap_holds = rest.iter().take_while(|&&q| q - rest[0] < (MAX_BITMAP_BYTES * 8) as u32).count();
                prop_assert_eq!(n, ranges_hold.max(bitmap_holds));
                at += n;
                parts += 1;
            }
            prop_assert!(parts >= 1);
        }
    }

    /// A receiver missing positions spread over far more than one datagram's worth
    /// answers DONE with several STATUS parts, numbered, that together list them all.
    #[test]
    fn a_long_missing_list_goes_out_in_parts() {
        let now = Instant::now();
        let (_, mut rx) = registered(now);
        // Pretend a stream of `len` positions in groups of 32,768, every 7th received.
        let every_7th = |rx: &mut Receiver, len: u32| {
            rx.groups = Groups { group: 32_768, stream_len: len };
            rx.received = Bitset::new(len);
            rx.group_have = vec![0; rx.groups.count() as usize];
            rx.have = 0;
            for p in (0..len).step_by(7) {
                rx.received.set(p);
                rx.group_have[rx.groups.of(p) as usize] += 1;
                rx.have += 1;
            }
        };
        every_7th(&mut rx, 200_000);
        let parts = rx.status(4);
        let want: Vec<u32> = (0..200_000).filter(|p| p % 7 != 0).collect();
        // Bitmaps of 8,192 positions: 200,000 / 8,192 → 25 parts.
        assert_eq!(parts.len(), 25);
        let mut listed = Vec::new();
        for (k, s) in parts.iter().enumerate() {
            assert_eq!((s.part as usize, s.parts as usize, s.round, s.flags), (k, 25, 4, 0));
            assert_eq!(s.total_missing as usize, want.len());
            s.missing.for_each(|p| listed.push(p));
        }
        assert_eq!(listed, want);
        // More than MAX_STATUS_PARTS parts' worth: the answer stops there, marked.
        every_7th(&mut rx, 400_000);
        let parts = rx.status(5);
        assert_eq!(parts.len(), MAX_STATUS_PARTS as usize);
        assert!(parts.iter().all(|s| s.flags == Status::TRUNCATED && s.parts == MAX_STATUS_PARTS));
        // Each bitmap starts at the next missing position: about 32 × 8,192 positions.
        assert!((32 * 8192..33 * 8192).contains(&parts.last().unwrap().missing.end()));
    }
}

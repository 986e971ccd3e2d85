//! Synchronized multicast disk streaming (`docs/protocols.md`), sans-I/O: no
//! sockets, no clock, no async runtime. Time comes in as [`std::time::Instant`]; block
//! bytes come from a [`BlockSource`] (sender) and go to a [`BlockSink`] (receiver).
//!
//! # Map
//!
//! - [`wire`]: the packet codec ([`Packet`], [`Body`]); every length validated, lists
//!   bounded, never panics. Round-trip and never-panics property tests beside it.
//! - [`auth`]: keyed BLAKE3 tags (8 bytes) on every datagram; the site key, the session
//!   key (delivered wrapped in the unicast REGISTERED) and per-receiver keys.
//! - [`manifest`]: the sender's ed25519-signed manifest (one hash per group of 16 stream
//!   positions over the block index and SHA-256 of each), signed ANNOUNCE, DONE and
//!   ROLE: what receivers check every block and every session decision against, so one
//!   receiver cannot feed or steer the others.
//! - [`sender`]: [`Sender`], one session per image: solicitation window, ordered burst
//!   streaming under a token bucket and the slowest live receiver's cache window, dead
//!   and laggard receivers, DONE/STATUS repair rounds with Reed-Solomon FEC, multicast
//!   and unicast repairs, lock-step read-requester mode.
//! - [`receiver`]: [`Receiver`], registration, tag checks, the fixed-size data cache,
//!   ACK every N packets, STATUS, FEC decoding, lock-step requests.
//! - [`Sessions`]: several senders at once, datagrams routed by session id.
//!
//! # Protocol
//!
//! ```text
//!  sender                                              receivers (multicast group)
//!  ── solicitation window ──────────────────────────────────────────────────────────
//!  ANNOUNCE (session, image, sizes, rate, window) ──▶  all          (every 200 ms)
//!                                               ◀──  REGISTER (nonce, cache slots)
//!  REGISTERED (id, nonce, wrapped key) ──unicast──▶  one
//!  ── streaming ───────────────────────────────────────────────────────────────────
//!  DATA (seq = position, block, payload) ─────────▶  all          (token bucket)
//!                                               ◀──  ACK (contig, highest, free slots)
//!      sender keeps seq < min over live receivers of (highest + free slots)
//!      silent receivers → dead; one holding the window alone too long → laggard
//!      (out of the window, served by unicast); late joiners take the stream from
//!      where it is (ANNOUNCE keeps going, REGISTER still accepted)
//!  ── completion and repair, round r = 0, 1, … ────────────────────────────────────
//!  DONE (round) ──────────────────────────────────▶  all
//!                                               ◀──  STATUS (complete | missing ranges
//!                                                     or bitmap, free slots), in as many
//!                                                     parts (≤ 32) as the list takes; a
//!                                                     receiver that completes ACKs at once
//!  (no DONE at all once every live receiver said it is complete)
//!  plan once all answered (every part), or 3/4 did and as long again passed;
//!  per FEC group: symbols with a margin for the loss so that every receiver most
//!  likely finishes this round; multicast up to the level r minimising packets:
//!  FEC (group, index) ────────────────────────────▶  all  (one symbol fixes a different
//!                                                          loss at each receiver)
//!  FEC (unicast) ─────────────────────────────────▶  one receiver beyond r
//!  REPAIR (unicast) ──────────────────────────────▶  the one receiver that needs it
//!  REPAIR (multicast) ────────────────────────────▶  all  (block missed by several)
//!  … until every live receiver answers complete, then DONE (FINISHED), repeated
//!  twice unless every receiver answers it first:
//!                                               ◀──  LEAVE
//!  ── lock-step instead of streaming ──────────────────────────────────────────────
//!  ROLE (round, requester id, next pos) ──────────▶  all
//!                                               ◀──  READ-REQUEST (drive, pos) from
//!                                                     the requester only
//!  DATA (pos) ────────────────────────────────────▶  all; the role passes round-robin;
//!      a requester that does not answer (after ROLE retries) is skipped;
//!      a receiver that sees a gap sends READ-REQUEST (individual) → REPAIR unicast
//! ```
//!
//! Positions index the stream (the image's block order: the learned sequence, then the
//! remaining blocks if configured); DATA carries both its position and its block index.
//! FEC groups cover `fec_group` consecutive positions; a shard is the block index (4
//! bytes) followed by the zero-padded block, so a decoded position knows its block.
//!
//! # Packet layout
//!
//! Every datagram: `[ver<<4 | type : u8][session : u32] body [tag : 8]`, big-endian.
//!
//! | type | name | body | tag key |
//! |---|---|---|---|
//! | 1 | ANNOUNCE | image_id `[u8; 16]`, image_size u64, block_size u16, block_count u32, stream_len u32, fec_group u32, rate u64 (B/s), solicit_ms u32, ack_every u16, flags u8 (lockstep, late-join, streaming), manifest_root `[u8; 32]`, signature `[u8; 64]` | site |
//! | 2 | REGISTER | nonce u64, cache_slots u32 | site |
//! | 3 | REGISTERED | receiver u32, nonce u64, wrapped_key `[u8; 16]` | site |
//! | 4 | DATA | seq u32 (= stream position), block u32, payload (block length) | session |
//! | 5 | REPAIR | as DATA (unicast or multicast retransmission) | session |
//! | 6 | FEC | group u32, recovery_total u16, index u16, shard (block_size + 4); to the group or one receiver | session |
//! | 7 | ACK | receiver u32, contig u32, highest u32, free_slots u32 | receiver |
//! | 8 | DONE | round u32, stream_len u32, flags u8 (finished), signature `[u8; 64]` | session |
//! | 9 | STATUS | receiver u32, round u32, free_slots u32, total_missing u32, flags u8 (complete, truncated), part u8, parts u8 (1..=32; 1 when complete), enc u8: 0 none / 1 ranges (n u16 ≤ 256 × (start u32, len u32)) / 2 bitmap (start u32, n u16 ≤ 1024, bits) | receiver |
//! | 10 | READ-REQUEST | receiver u32, round u32, pos u32, kind u8 (drive, individual) | receiver |
//! | 11 | ROLE | round u32, requester u32, next_pos u32, signature `[u8; 64]` | session |
//! | 12 | LEAVE | receiver u32 | receiver |
//! | 13 | MANIFEST | first u32 (a multiple of 512), positions u16 ≤ 512, ⌈positions/16⌉ × group hash `[u8; 32]`, signature `[u8; 64]` | session |
//! | 14 | MANIFEST-REQUEST | receiver u32, n u16 ≤ 64, n × chunk u32 (top bit set: the GROUP-HASHES of that hash group) | receiver |
//! | 15 | GROUP-HASHES | group u32, n u8 ≤ 16, n × (block u32, sha256 `[u8; 32]`); not signed, taken only if its hash is the signed group hash | session |
//!
//! Tags keep out hosts without the site secret; receivers hold every tag key, so the
//! sender also signs (ed25519, [`manifest`]) what receivers act on: ANNOUNCE, the
//! MANIFEST chunks, DONE (which can end a receiver's session) and ROLE (which says who
//! drives the lock-step stream and from where). A receiver caches a block only once its
//! whole group of 16 positions is present and the group's hash over (block index,
//! SHA-256) of each matches the signed one; a group that does not is dropped whole and
//! repaired. FEC symbols are not signed: a block decoded from them is checked like any
//! other, so a forged symbol costs a repair, never a wrong byte.
//!
//! DATA/REPAIR overhead is 21 bytes; a 1450-byte block fills a 1500-byte MTU.
//!
//! # Driving it (the shell's job)
//!
//! Both machines keep the state-machine contract of `docs/ARCHITECTURE.md`
//! (`fleetboot_proto`): `handle(now, from, bytes)`, `handle_timeout(now)`,
//! `poll_timeout()`, and `poll_transmit`, which **appends** one datagram to the caller's
//! buffer and returns a [`Transmit`] with a concrete destination (the session's group,
//! configured in [`SenderConfig::group`], or one receiver; a receiver only ever sends to
//! its sender). The sender reads block bytes, so its `poll_transmit(now, source, buf)`
//! takes the [`BlockSource`] as the one extra argument; a shell gathers a burst into one
//! buffer and sends it with one `sendmmsg` (`fleetboot_net::Outbox`). Stop at
//! [`Sender::is_finished`]. A receiver also has [`Receiver::drain`], called whenever the
//! consumer (the disk) has room: it moves cached blocks into a [`BlockSink`] and may
//! queue an ACK, so drain `poll_transmit` after it. [`Sessions`] runs several senders
//! with their sources as one machine of the plain shape.

// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#![allow(clippy::manual_is_multiple_of)]

pub mod auth;
pub mod manifest;
pub mod receiver;
pub mod sender;
mod util;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

pub use fleetboot_proto::Transmit;

pub use auth::{MacKey, TAG_LEN};
pub use ed25519_dalek::{self, SigningKey, VerifyingKey};
pub use manifest::Manifest;
pub use receiver::{BlockSink, Receiver, ReceiverConfig, ReceiverState, ReceiverStats};
pub use sender::{
    BlockSource, Mode, PeerState, Phase, ReceiverInfo, Sender, SenderConfig, SenderStats,
    Solicitation,
};
pub use wire::{Body, Packet, PacketType, WireError};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// Encoding failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The block source failed.
    #[error("block source: {0}")]
    Source(String),
    /// Reed-Solomon coding failed.
    #[error("fec: {0}")]
    Fec(String),
    /// Internal state transition (never surfaces).
    #[error("internal")]
    Internal,
    /// A session with this id exists already.
    #[error("session {0} exists")]
    DuplicateSession(u32),
}

/// Several sessions at once (one [`Sender`] per image, each with its [`BlockSource`]),
/// datagrams routed by session id: one machine with the contract's plain shape.
/// `poll_transmit` takes turns between the sessions so that one busy session does not
/// starve the others' control traffic.
#[derive(Debug)]
pub struct Sessions<S> {
    senders: BTreeMap<u32, (Sender, S)>,
    /// The session `poll_transmit` asks first next time.
    turn: u32,
    /// Datagrams for no known session.
    pub unknown: u64,
}

impl<S> Default for Sessions<S> {
    fn default() -> Self {
        Sessions { senders: BTreeMap::new(), turn: 0, unknown: 0 }
    }
}

impl<S: BlockSource> Sessions<S> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a session with the source of its blocks.
    pub fn insert(&mut self, s: Sender, source: S) -> Result<(), StreamError> {
        let id = s.session_id();
        if self.senders.contains_key(&id) {
            return Err(StreamError::DuplicateSession(id));
        }
        self.senders.insert(id, (s, source));
        Ok(())
    }
    /// A session.
    pub fn get(&self, id: u32) -> Option<&Sender> {
        self.senders.get(&id).map(|(s, _)| s)
    }
    /// A session, mutably.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Sender> {
        self.senders.get_mut(&id).map(|(s, _)| s)
    }
    /// Removes finished sessions, returning them with their sources.
    pub fn reap(&mut self) -> Vec<(Sender, S)> {
        let done: Vec<u32> = self
            .senders
            .iter()
            .filter(|(_, (s, _))| s.is_finished())
            .map(|(k, _)| *k)
            .collect();
        done.into_iter()
            .filter_map(|k| self.senders.remove(&k))
            .collect()
    }
    /// Session ids, ascending.
    pub fn ids(&self) -> Vec<u32> {
        self.senders.keys().copied().collect()
    }
    /// Routes a datagram to its session.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match wire::peek(bytes).and_then(|(_, s)| self.senders.get_mut(&s)) {
            Some((s, _)) => s.handle(now, from, bytes),
            None => self.unknown += 1,
        }
    }
    /// Runs every session's timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (s, _) in self.senders.values_mut() {
            s.handle_timeout(now);
        }
    }
    /// The earliest deadline over all sessions.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.senders.values().filter_map(|(s, _)| s.poll_timeout()).min()
    }
    /// Appends the next datagram of some session to `buf`: sessions take turns, one
    /// datagram each, starting after the one that sent last.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let turn = self.turn;
        let order = self.senders.range(turn..).chain(self.senders.range(..turn)).map(|(k, _)| *k).collect::<Vec<_>>();
        for id in order {
            let (s, src) = self.senders.get_mut(&id).expect("listed");
            if let Some(t) = s.poll_transmit(now, src, buf) {
                self.turn = id.wrapping_add(1);
                return Some(t);
            }
        }
        None
    }
}

//! Message authentication between negotiators and file servers: every conflict packet and
//! every negotiator <-> file server message carries a trailer with a sender id, a sequence
//! number and an HMAC-SHA256 tag under a key the operator shares among them.
//!
//! ```text
//! the message itself (its own length field covers only itself)
//! offset size field (after the message)
//!  0     4    "FBN1"
//!  4     4    sender id      the sender's configured IPv4 address
//!  8     8    sequence       microseconds since the Unix epoch when sent, strictly
//!                            increasing per sender (big endian)
//! 16    16    tag            HMAC-SHA256(key, "fleetboot-negotiate v1" || message ||
//!                            "FBN1" || sender id || sequence), first 16 bytes
//! ```
//!
//! A receiver drops (and counts, by [`Refusal`]) a datagram without a trailer, with a tag
//! that does not verify, from a sender outside its configured peers (when it has a list),
//! whose sequence is further than [`MAX_SKEW`] from its own clock, or whose sequence it has
//! seen from that sender already (a replay). Sequences are checked per sender id, in a
//! bounded set of the ones seen within the skew window, so datagrams reordered by the
//! network still pass once each.
//!
//! Sans-I/O: the wall clock is an anchor the shell takes once ([`PeerAuth::new`]); the
//! machines pass their `now` and the time since the anchor is added to it.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Bytes a trailer adds to every message.
pub const TRAILER_LEN: usize = 4 + 4 + 8 + TAG_LEN;
const TAG_LEN: usize = 16;
const MAGIC: &[u8; 4] = b"FBN1";
const CONTEXT: &[u8] = b"fleetboot-negotiate v1";

/// How far a sender's clock may be from a receiver's (keep the servers on NTP).
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// Senders whose sequences are remembered; the one heard from longest ago makes room.
pub const MAX_SENDERS: usize = 256;
/// Sequences remembered per sender (within the skew window); past this, only sequences
/// above the oldest one forgotten pass.
pub const MAX_SEEN_PER_SENDER: usize = 4096;

/// The key negotiators and file servers share: 32 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerKey([u8; 32]);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("want 64 hex digits (32 bytes)")]
    Malformed,
    #[error("an all-zero key protects nothing")]
    AllZero,
}

impl PeerKey {
    pub fn from_bytes(k: [u8; 32]) -> Result<PeerKey, KeyError> {
        if k == [0; 32] {
            return Err(KeyError::AllZero);
        }
        Ok(PeerKey(k))
    }

    /// A key as written in a key file: 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<PeerKey, KeyError> {
        let t = text.trim().as_bytes();
        if t.len() != 64 {
            return Err(KeyError::Malformed);
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8).ok_or(KeyError::Malformed);
        let mut k = [0u8; 32];
        for (i, pair) in t.chunks(2).enumerate() {
            k[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        PeerKey::from_bytes(k)
    }

    fn tag(&self, message: &[u8], sender: Ipv4Addr, seq: u64) -> [u8; TAG_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(CONTEXT);
        mac.update(message);
        mac.update(MAGIC);
        mac.update(&sender.octets());
        mac.update(&seq.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }
}

/// Why an authenticated datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// No trailer: sent by something that does not hold a key.
    Unsigned,
    /// The sender is not one of the configured peers.
    UnknownPeer,
    /// The tag does not verify: another key, or altered on the way.
    BadTag,
    /// The sequence is further than [`MAX_SKEW`] from this clock.
    Stale,
    /// This sender's sequence was seen already.
    Replayed,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [Refusal::Unsigned, Refusal::UnknownPeer, Refusal::BadTag, Refusal::Stale, Refusal::Replayed];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::UnknownPeer => "unknown_peer",
            Refusal::BadTag => "bad_tag",
            Refusal::Stale => "stale",
            Refusal::Replayed => "replayed",
        }
    }
}

/// Datagrams refused so far, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusals {
    pub counts: BTreeMap<Refusal, u64>,
    /// The last one: who sent it, and why it was dropped.
    pub last: Option<(Ipv4Addr, Refusal)>,
}

impl Refusals {
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn get(&self, r: Refusal) -> u64 {
        self.counts.get(&r).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Default)]
struct Seen {
    seqs: BTreeSet<u64>,
    /// Sequences at or below this were forgotten (the set was full): refused.
    floor: u64,
    last_heard: u64,
}

/// One side's authentication state: its key, its identity, its clock anchor, the next
/// sequence it sends and what it has seen from each sender.
#[derive(Debug, Clone)]
pub struct PeerAuth {
    key: PeerKey,
    me: Ipv4Addr,
    anchor: Instant,
    anchor_unix_us: u64,
    /// When set, only these senders are accepted (besides the key).
    allowed: Option<BTreeSet<Ipv4Addr>>,
    last_sent: u64,
    seen: BTreeMap<Ipv4Addr, Seen>,
    refusals: Refusals,
}

impl PeerAuth {
    /// `me` is this server's address (what it signs as); `anchor`/`anchor_unix_us` one
    /// reading of the monotonic and the wall clock, taken together by the shell.
    pub fn new(key: PeerKey, me: Ipv4Addr, anchor: Instant, anchor_unix_us: u64) -> PeerAuth {
        PeerAuth { key, me, anchor, anchor_unix_us, allowed: None, last_sent: 0, seen: BTreeMap::new(), refusals: Refusals::default() }
    }

    /// Accepts only these senders (and only with the key).
    pub fn only_from(mut self, peers: impl IntoIterator<Item = Ipv4Addr>) -> PeerAuth {
        self.allowed = Some(peers.into_iter().collect());
        self
    }

    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    fn unix_us(&self, now: Instant) -> u64 {
        self.anchor_unix_us.saturating_add(now.saturating_duration_since(self.anchor).as_micros() as u64)
    }

    /// `message` with its trailer.
    pub fn seal(&mut self, now: Instant, mut message: Vec<u8>) -> Vec<u8> {
        let seq = self.unix_us(now).max(self.last_sent + 1);
        self.last_sent = seq;
        let tag = self.key.tag(&message, self.me, seq);
        message.extend_from_slice(MAGIC);
        message.extend_from_slice(&self.me.octets());
        message.extend_from_slice(&seq.to_be_bytes());
        message.extend_from_slice(&tag);
        message
    }

    /// The message inside `datagram` from `source` (the address it came from), if it is
    /// authentic, fresh and from an accepted sender; else counted and `None`.
    pub fn open<'a>(&mut self, now: Instant, source: Ipv4Addr, datagram: &'a [u8]) -> Option<&'a [u8]> {
        match self.check(now, source, datagram) {
            Ok(m) => Some(m),
            Err(r) => {
                *self.refusals.counts.entry(r).or_default() += 1;
                self.refusals.last = Some((source, r));
                None
            }
        }
    }

    fn check<'a>(&mut self, now: Instant, source: Ipv4Addr, datagram: &'a [u8]) -> Result<&'a [u8], Refusal> {
        let Some(split) = datagram.len().checked_sub(TRAILER_LEN) else { return Err(Refusal::Unsigned) };
        let (message, trailer) = datagram.split_at(split);
        if &trailer[..4] != MAGIC {
            return Err(Refusal::Unsigned);
        }
        let sender = Ipv4Addr::new(trailer[4], trailer[5], trailer[6], trailer[7]);
        if self.allowed.as_ref().is_some_and(|a| !a.contains(&source) || !a.contains(&sender)) {
            return Err(Refusal::UnknownPeer);
        }
        let seq = u64::from_be_bytes(trailer[8..16].try_into().expect("8 bytes"));
        let expected = self.key.tag(message, sender, seq);
        // Constant time: a forger learns nothing from how soon a wrong tag is refused.
        let diff = expected.iter().zip(&trailer[16..]).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(Refusal::BadTag);
        }
        let clock = self.unix_us(now);
        let skew = MAX_SKEW.as_micros() as u64;
        if seq.abs_diff(clock) > skew {
            return Err(Refusal::Stale);
        }
        if !self.seen.contains_key(&sender) && self.seen.len() >= MAX_SENDERS {
            let quietest = self.seen.iter().min_by_key(|(_, s)| s.last_heard).map(|(a, _)| *a);
            if let Some(a) = quietest {
                self.seen.remove(&a);
            }
        }
        let seen = self.seen.entry(sender).or_default();
        // Sequences older than the window need no memory: the skew check refuses them.
        let horizon = clock.saturating_sub(skew);
        while seen.seqs.first().is_some_and(|&s| s < horizon) {
            seen.seqs.pop_first();
        }
        if seq <= seen.floor || !seen.seqs.insert(seq) {
            return Err(Refusal::Replayed);
        }
        if seen.seqs.len() > MAX_SEEN_PER_SENDER {
            if let Some(oldest) = seen.seqs.pop_first() {
                seen.floor = seen.floor.max(oldest);
            }
        }
        seen.last_heard = clock;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const EVE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 66);
    const T0_US: u64 = 1_800_000_000_000_000;

    fn key(b: u8) -> PeerKey {
        PeerKey::from_bytes([b; 32]).unwrap()
    }

    #[test]
    fn keys_parse_from_hex_and_zero_is_refused() {
        let hex = "ab".repeat(32);
        assert_eq!(PeerKey::from_hex(&format!(" {hex}\n")).unwrap(), PeerKey::from_bytes([0xab; 32]).unwrap());
        assert_eq!(PeerKey::from_hex("abc"), Err(KeyError::Malformed));
        assert_eq!(PeerKey::from_hex(&"zz".repeat(32)), Err(KeyError::Malformed));
        assert_eq!(PeerKey::from_hex(&"00".repeat(32)), Err(KeyError::AllZero));
    }

    #[test]
    fn sealed_messages_open_once_and_forgeries_are_counted() {
        let t0 = Instant::now();
        let mut a = PeerAuth::new(key(1), A, t0, T0_US);
        let mut b = PeerAuth::new(key(1), B, t0, T0_US).only_from([A, B]);
        let sealed = a.seal(t0, b"hello".to_vec());
        assert_eq!(sealed.len(), 5 + TRAILER_LEN);
        assert_eq!(b.open(t0, A, &sealed), Some(&b"hello"[..]));
        // The same datagram again, from anywhere: a replay.
        assert_eq!(b.open(t0, A, &sealed), None);
        // Unsigned, from an unknown host, with another key, altered.
        assert_eq!(b.open(t0, A, b"hello"), None);
        assert_eq!(b.open(t0, EVE, &sealed), None);
        let mut eve = PeerAuth::new(key(2), A, t0, T0_US);
        assert_eq!(b.open(t0, A, &eve.seal(t0, b"hello".to_vec())), None);
        let mut altered = a.seal(t0, b"hello".to_vec());
        altered[0] ^= 1;
        assert_eq!(b.open(t0, A, &altered), None);
        let r = b.refusals();
        assert_eq!(
            [Refusal::Replayed, Refusal::Unsigned, Refusal::UnknownPeer, Refusal::BadTag].map(|x| r.get(x)),
            [1, 1, 1, 2]
        );
        assert_eq!(r.last, Some((A, Refusal::BadTag)));
    }

    #[test]
    fn reordered_datagrams_pass_once_each_and_old_ones_are_stale() {
        let t0 = Instant::now();
        let mut a = PeerAuth::new(key(1), A, t0, T0_US);
        let mut b = PeerAuth::new(key(1), B, t0, T0_US);
        let first = a.seal(t0, b"1".to_vec());
        let second = a.seal(t0, b"2".to_vec());
        assert!(b.open(t0, A, &second).is_some());
        assert!(b.open(t0, A, &first).is_some(), "reordered, not replayed");
        assert!(b.open(t0, A, &first).is_none());
        // A sender whose clock is two minutes off, or a datagram kept that long.
        let later = t0 + Duration::from_secs(120);
        let old = a.seal(t0, b"3".to_vec());
        assert!(b.open(later, A, &old).is_none());
        assert_eq!(b.refusals().get(Refusal::Stale), 1);
        // A restarted sender (a new anchor, the same clock) is not taken for a replay.
        let mut restarted = PeerAuth::new(key(1), A, later, T0_US + 120_000_000);
        assert!(b.open(later, A, &restarted.seal(later, b"4".to_vec())).is_some());
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut a = PeerAuth::new(key(1), A, t0, T0_US);
        let mut b = PeerAuth::new(key(1), B, t0, T0_US);
        let all: Vec<_> = (0..MAX_SEEN_PER_SENDER + 10).map(|_| a.seal(t0, b"x".to_vec())).collect();
        for d in &all {
            assert!(b.open(t0, A, d).is_some());
        }
        assert!(b.seen[&A].seqs.len() <= MAX_SEEN_PER_SENDER);
        // The forgotten ones are still refused.
        assert!(b.open(t0, A, &all[0]).is_none());
        for i in 0..(MAX_SENDERS + 5) as u32 {
            let mut s = PeerAuth::new(key(1), Ipv4Addr::from(0x0a01_0000 + i), t0, T0_US);
            assert!(b.open(t0, A, &s.seal(t0, b"y".to_vec())).is_some());
        }
        assert!(b.seen.len() <= MAX_SENDERS);
    }
}

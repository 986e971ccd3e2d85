//! The file server's side of the negotiator <-> file server protocol: which slot carries
//! which file, and which negotiators asked for it.
//!
//! - PREPARE(file, slot, ports) -> ACK when the slot is free or already set up with the same
//!   file (another negotiator asked first); NAK `Busy` when the slot carries another file,
//!   NAK `NoSuchFile` when the file server does not have the file.
//! - Each slot keeps the list of negotiators that asked for it (by IPv4 address). DELETE
//!   takes one off; the slot is released only when the list is empty.
//! - A PREPARE is also the renewal: each negotiator's place on a list expires `registration_ttl`
//!   after its last PREPARE, so the slots of a negotiator that died are released in time.
//! - A file server also answers conflict queries for the slots it carries (like an owning
//!   negotiator would): it is the ground truth of what is multicast where, and it keeps
//!   protecting a slot whose negotiator died until the registration expires.
//!
//! A machine of the `fleetboot_proto` contract, reached on two sockets: [`FileRegistry::handle`]
//! for the control port, [`FileRegistry::handle_peer`] for the peer port. Every transmit
//! answers the datagram just handled and goes back to its source: the shell sends it from
//! the socket that datagram came to.

use crate::auth::{PeerAuth, Refusals};
use crate::wire::{ConflictOp, ConflictPacket, FsMessage, FsOp, NakReason, Slot};
use fleetboot_proto::Transmit;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Replies and events waiting, at most each (a shell drains after every datagram).
const MAX_QUEUED: usize = 1024;

/// One slot in use on this file server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub file: String,
    pub server_port: u16,
    /// Negotiators that asked, and when each one's registration expires.
    pub negotiators: BTreeMap<Ipv4Addr, Instant>,
}

/// Something the shell may want to log or act on (bind sockets, stop a transfer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    Configured {
        slot: Slot,
        file: String,
        server_port: u16,
    },
    Released {
        slot: Slot,
        file: String,
    },
}

/// Whether this file server can serve a file (the shell looks under its root).
pub type HasFile = Box<dyn Fn(&str) -> bool + Send>;

/// Slots a file server carries at once by default; a PREPARE for another is refused
/// (`Busy`) until one is released.
pub const DEFAULT_MAX_GROUPS: usize = 256;

pub struct FileRegistry {
    /// This file server's address, as negotiators put it in conflict queries.
    pub address: Ipv4Addr,
    pub registration_ttl: Duration,
    groups: BTreeMap<Slot, Group>,
    events: VecDeque<RegistryEvent>,
    replies: VecDeque<(SocketAddr, Vec<u8>)>,
    has_file: HasFile,
    max_groups: usize,
    refused_full: u64,
    refused_unicast: u64,
    auth: Option<PeerAuth>,
}

impl std::fmt::Debug for FileRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRegistry").field("address", &self.address).field("groups", &self.groups).finish_non_exhaustive()
    }
}

impl FileRegistry {
    /// A file server at `address` whose files `has_file` knows.
    pub fn new(address: Ipv4Addr, registration_ttl: Duration, has_file: impl Fn(&str) -> bool + Send + 'static) -> FileRegistry {
        FileRegistry {
            address,
            registration_ttl,
            groups: BTreeMap::new(),
            events: VecDeque::new(),
            replies: VecDeque::new(),
            has_file: Box::new(has_file),
            max_groups: DEFAULT_MAX_GROUPS,
            refused_full: 0,
            refused_unicast: 0,
            auth: None,
        }
    }

    /// Accepts only messages that authenticate under `auth`, and signs every reply. The
    /// shells always set it; without it (simulations) nothing is checked.
    pub fn with_auth(mut self, auth: PeerAuth) -> FileRegistry {
        self.auth = Some(auth);
        self
    }

    /// Datagrams dropped because they did not authenticate (`None` without authentication).
    pub fn refusals(&self) -> Option<&Refusals> {
        self.auth.as_ref().map(PeerAuth::refusals)
    }

    /// PREPAREs refused because their "group" was not a multicast address: a file server
    /// never sends a file to one host because it was told that host is a group.
    pub fn refused_unicast(&self) -> u64 {
        self.refused_unicast
    }

    fn open<'a>(&mut self, now: Instant, from: Ipv4Addr, bytes: &'a [u8]) -> Option<&'a [u8]> {
        match &mut self.auth {
            Some(a) => a.open(now, from, bytes),
            None => Some(bytes),
        }
    }

    /// At most `n` slots at once (each costs the shell a socket and an open file).
    pub fn with_max_groups(mut self, n: usize) -> FileRegistry {
        self.max_groups = n.max(1);
        self
    }

    /// PREPAREs refused because `max_groups` slots were in use.
    pub fn refused_full(&self) -> u64 {
        self.refused_full
    }

    pub fn groups(&self) -> &BTreeMap<Slot, Group> {
        &self.groups
    }

    /// The slot currently carrying `file`, if any (an RRQ names the file, not the slot).
    pub fn slot_for(&self, file: &str, server_port: u16) -> Option<Slot> {
        self.groups
            .iter()
            .find(|(_, g)| g.file == file && g.server_port == server_port)
            .map(|(s, _)| *s)
    }

    /// What the shell acts on (bind a transfer socket, stop one) and records.
    pub fn poll_event(&mut self) -> Option<RegistryEvent> {
        self.events.pop_front()
    }

    /// Appends the next reply to `buf`: it goes back to the source of the datagram that
    /// asked, from the socket that datagram came to.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let (to, bytes) = self.replies.pop_front()?;
        let bytes = match &mut self.auth {
            Some(a) => a.seal(now, bytes),
            None => bytes,
        };
        Some(fleetboot_proto::append(buf, to, |b| b.extend_from_slice(&bytes)))
    }

    fn reply(&mut self, to: SocketAddr, msg: Result<Vec<u8>, crate::WireError>) {
        if let (Ok(bytes), true) = (msg, self.replies.len() < MAX_QUEUED) {
            self.replies.push_back((to, bytes));
        }
    }

    fn event(&mut self, e: RegistryEvent) {
        if self.events.len() < MAX_QUEUED {
            self.events.push_back(e);
        }
    }

    /// One datagram from a negotiator on the control port: PREPARE is answered with ACK or
    /// NAK, DELETE with DELETED.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.expire(now);
        let SocketAddr::V4(v4) = from else { return };
        let Some(bytes) = self.open(now, *v4.ip(), bytes) else { return };
        let Ok(msg) = FsMessage::parse(bytes) else { return };
        let reply = match msg.op {
            FsOp::Prepare => self.prepare(now, *v4.ip(), &msg),
            FsOp::Delete => {
                self.delete(*v4.ip(), msg.slot);
                msg.reply(FsOp::Deleted, None)
            }
            FsOp::Ack | FsOp::Nak | FsOp::Deleted => return,
        };
        self.reply(from, reply.encode());
    }

    fn prepare(&mut self, now: Instant, from: Ipv4Addr, msg: &FsMessage) -> FsMessage {
        let until = now + self.registration_ttl;
        if !msg.slot.group.is_multicast() {
            self.refused_unicast += 1;
            return msg.reply(FsOp::Nak, Some(NakReason::Busy));
        }
        if let Some(g) = self.groups.get_mut(&msg.slot) {
            if g.file != msg.boot_file || g.server_port != msg.server_port {
                return msg.reply(FsOp::Nak, Some(NakReason::Busy));
            }
            g.negotiators.insert(from, until);
            return msg.reply(FsOp::Ack, None);
        }
        if !(self.has_file)(&msg.boot_file) {
            return msg.reply(FsOp::Nak, Some(NakReason::NoSuchFile));
        }
        if self.groups.len() >= self.max_groups {
            self.refused_full += 1;
            return msg.reply(FsOp::Nak, Some(NakReason::Busy));
        }
        self.groups.insert(
            msg.slot,
            Group {
                file: msg.boot_file.clone(),
                server_port: msg.server_port,
                negotiators: BTreeMap::from([(from, until)]),
            },
        );
        self.event(RegistryEvent::Configured {
            slot: msg.slot,
            file: msg.boot_file.clone(),
            server_port: msg.server_port,
        });
        msg.reply(FsOp::Ack, None)
    }

    fn delete(&mut self, from: Ipv4Addr, slot: Slot) {
        if let Some(g) = self.groups.get_mut(&slot) {
            g.negotiators.remove(&from);
            if g.negotiators.is_empty() {
                self.release(slot);
            }
        }
    }

    fn release(&mut self, slot: Slot) {
        if let Some(g) = self.groups.remove(&slot) {
            self.event(RegistryEvent::Released { slot, file: g.file });
        }
    }

    /// Drops registrations that were not renewed ([`expire`](Self::expire)).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
    }

    /// Drops registrations that were not renewed; releases slots whose list became empty.
    pub fn expire(&mut self, now: Instant) {
        let mut empty = Vec::new();
        for (slot, g) in self.groups.iter_mut() {
            g.negotiators.retain(|_, until| *until > now);
            if g.negotiators.is_empty() {
                empty.push(*slot);
            }
        }
        for slot in empty {
            self.release(slot);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.groups
            .values()
            .flat_map(|g| g.negotiators.values())
            .min()
            .copied()
    }

    /// A datagram heard on the negotiators' port. A conflict query is answered (the query
    /// echoed with opcode 1) when this file server carries the slot and the querier's plan
    /// would conflict with it: another file, or the same file from another file server.
    /// Returns the query when it was one (authenticated, when this registry has a key), for
    /// the shell to check against what else it multicasts ([`answer`](Self::answer)).
    pub fn handle_peer(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) -> Option<ConflictPacket> {
        self.expire(now);
        let SocketAddr::V4(v4) = from else { return None };
        let bytes = self.open(now, *v4.ip(), bytes)?;
        let q = ConflictPacket::parse(bytes).ok()?;
        if q.op != ConflictOp::Query {
            return None;
        }
        if let Some(g) = self.groups.get(&q.slot()) {
            if g.file != q.boot_file || q.file_server != self.address {
                self.answer(from, &q);
            }
        }
        Some(q)
    }

    /// Answers `query` from `to`: its slot is in use here (signed like every reply).
    pub fn answer(&mut self, to: SocketAddr, query: &ConflictPacket) {
        self.reply(to, query.with_op(ConflictOp::Response).encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn prep(op: FsOp, xid: u32, file: &str, group: u8) -> Vec<u8> {
        FsMessage {
            op,
            xid,
            slot: Slot {
                group: Ipv4Addr::new(239, 0, 0, group),
                port: 1758,
            },
            server_port: 1759,
            reason: None,
            boot_file: file.into(),
        }
        .encode()
        .unwrap()
    }

    fn from(last: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 40000))
    }

    /// Every reply queued, with where it goes.
    fn replies(reg: &mut FileRegistry) -> Vec<(SocketAddr, Vec<u8>)> {
        let now = Instant::now();
        fleetboot_testkit::conformance::drain_checked(100, |b| reg.poll_transmit(now, b).map(|t| ((), t)))
            .into_iter()
            .map(|(_, t, bytes)| (t.destination, bytes))
            .collect()
    }

    /// Handles one control datagram and returns its one reply (to the sender).
    fn ask(reg: &mut FileRegistry, now: Instant, who: u8, bytes: &[u8]) -> (FsOp, Option<NakReason>, u32) {
        reg.handle(now, from(who), bytes);
        let r = replies(reg);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, from(who), "the reply goes back to its sender");
        let m = FsMessage::parse(&r[0].1).unwrap();
        (m.op, m.reason, m.xid)
    }

    fn registry(ttl: Duration) -> FileRegistry {
        FileRegistry::new(Ipv4Addr::new(10, 0, 0, 9), ttl, |f: &str| f != "missing")
    }

    #[test]
    fn prepare_ack_nak_delete_release() {
        let t0 = Instant::now();
        let mut reg = registry(Duration::from_secs(30));
        let ack = (FsOp::Ack, None, 7);
        assert_eq!(ask(&mut reg, t0, 1, &prep(FsOp::Prepare, 7, "a", 1)), ack);
        // Another negotiator, same slot and file: ACK, and it joins the list.
        assert_eq!(ask(&mut reg, t0, 2, &prep(FsOp::Prepare, 7, "a", 1)), ack);
        // Same slot, another file: busy.
        assert_eq!(ask(&mut reg, t0, 3, &prep(FsOp::Prepare, 8, "b", 1)), (FsOp::Nak, Some(NakReason::Busy), 8));
        assert_eq!(ask(&mut reg, t0, 3, &prep(FsOp::Prepare, 9, "missing", 2)), (FsOp::Nak, Some(NakReason::NoSuchFile), 9));
        let slot = reg.slot_for("a", 1759).unwrap();
        assert_eq!(reg.groups()[&slot].negotiators.len(), 2);
        // DELETE from one: still held for the other.
        assert_eq!(ask(&mut reg, t0, 1, &prep(FsOp::Delete, 10, "a", 1)).0, FsOp::Deleted);
        assert!(reg.groups().contains_key(&slot));
        // Duplicate DELETE is harmless.
        ask(&mut reg, t0, 1, &prep(FsOp::Delete, 10, "a", 1));
        assert!(reg.groups().contains_key(&slot));
        ask(&mut reg, t0, 2, &prep(FsOp::Delete, 11, "a", 1));
        assert!(reg.groups().is_empty());
        let ev: Vec<RegistryEvent> = std::iter::from_fn(|| reg.poll_event()).collect();
        assert!(matches!(ev.first(), Some(RegistryEvent::Configured { .. })));
        assert!(matches!(ev.last(), Some(RegistryEvent::Released { .. })));
        // Now the slot is free for another file.
        assert_eq!(ask(&mut reg, t0, 3, &prep(FsOp::Prepare, 12, "b", 1)).0, FsOp::Ack);
        // Replies from a file server are not answered.
        reg.handle(t0, from(3), &prep(FsOp::Ack, 13, "b", 1));
        assert!(replies(&mut reg).is_empty());
    }

    /// With a key: a DELETE or PREPARE without it — from an unknown host or from the
    /// address of the negotiator that registered — is dropped and counted; a unicast
    /// "group" is refused even with the key.
    #[test]
    fn with_a_key_spoofed_delete_and_prepare_are_ignored_and_counted() {
        use crate::auth::{PeerAuth, PeerKey, Refusal, TRAILER_LEN};
        let t0 = Instant::now();
        let key = PeerKey::from_bytes([3; 32]).unwrap();
        let unix = 1_800_000_000_000_000;
        let mut reg = registry(Duration::from_secs(30)).with_auth(PeerAuth::new(key.clone(), Ipv4Addr::new(10, 0, 0, 9), t0, unix));
        let mut neg1 = PeerAuth::new(key.clone(), Ipv4Addr::new(10, 0, 0, 1), t0, unix);
        let mut eve = PeerAuth::new(PeerKey::from_bytes([4; 32]).unwrap(), Ipv4Addr::new(10, 0, 0, 1), t0, unix);
        let mut checker = PeerAuth::new(key.clone(), Ipv4Addr::new(10, 0, 0, 1), t0, unix);
        let mut check_reply = |reg: &mut FileRegistry, op: FsOp| {
            let r = replies(reg);
            assert_eq!(r.len(), 1, "{r:?}");
            let (msg, trailer) = r[0].1.split_at(r[0].1.len() - TRAILER_LEN);
            assert_eq!(&trailer[..4], b"FBN1", "replies are signed");
            assert!(checker.open(t0, Ipv4Addr::new(10, 0, 0, 9), &r[0].1).is_some(), "the negotiator can check the reply");
            assert_eq!(FsMessage::parse(msg).unwrap().op, op);
        };
        reg.handle(t0, from(1), &neg1.seal(t0, prep(FsOp::Prepare, 1, "a", 1)));
        check_reply(&mut reg, FsOp::Ack);
        let slot = reg.slot_for("a", 1759).unwrap();
        // Spoofed DELETEs: unsigned from the negotiator's address, and with another key.
        reg.handle(t0, from(1), &prep(FsOp::Delete, 2, "a", 1));
        reg.handle(t0, from(1), &eve.seal(t0, prep(FsOp::Delete, 2, "a", 1)));
        // Spoofed PREPAREs claiming other slots, from an unknown host.
        for g in 2..6 {
            reg.handle(t0, from(66), &prep(FsOp::Prepare, g.into(), "a", g));
        }
        assert!(replies(&mut reg).is_empty(), "nothing answered");
        assert_eq!(reg.groups().keys().copied().collect::<Vec<_>>(), vec![slot]);
        let r = reg.refusals().unwrap();
        assert_eq!((r.get(Refusal::Unsigned), r.get(Refusal::BadTag)), (5, 1));
        // A genuine PREPARE whose "group" is one host: refused, counted, nothing set up.
        let mut unicast = FsMessage::parse(&prep(FsOp::Prepare, 9, "a", 1)).unwrap();
        unicast.slot.group = Ipv4Addr::new(10, 0, 0, 66);
        reg.handle(t0, from(1), &neg1.seal(t0, unicast.encode().unwrap()));
        check_reply(&mut reg, FsOp::Nak);
        assert_eq!((reg.groups().len(), reg.refused_unicast()), (1, 1));
        // The real DELETE works.
        reg.handle(t0, from(1), &neg1.seal(t0, prep(FsOp::Delete, 10, "a", 1)));
        check_reply(&mut reg, FsOp::Deleted);
        assert!(reg.groups().is_empty());
    }

    #[test]
    fn registrations_expire_unless_renewed() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut reg = registry(ttl);
        ask(&mut reg, t0, 1, &prep(FsOp::Prepare, 1, "a", 1));
        ask(&mut reg, t0 + ttl / 2, 1, &prep(FsOp::Prepare, 2, "a", 1));
        assert_eq!(reg.poll_timeout(), Some(t0 + ttl / 2 + ttl));
        reg.handle_timeout(t0 + ttl + Duration::from_secs(1));
        assert_eq!(reg.groups().len(), 1, "renewed");
        reg.handle_timeout(t0 + ttl * 2);
        assert!(reg.groups().is_empty(), "expired");
        assert_eq!(reg.poll_timeout(), None);
    }

    #[test]
    fn answers_conflict_queries_for_slots_it_carries() {
        let t0 = Instant::now();
        let me = Ipv4Addr::new(10, 0, 0, 9);
        let mut reg = registry(Duration::from_secs(10));
        ask(&mut reg, t0, 1, &prep(FsOp::Prepare, 1, "a", 1));
        let q = |file: &str, fs: Ipv4Addr, group: u8| {
            ConflictPacket {
                op: ConflictOp::Query,
                file_server: fs,
                negotiator_type: 0x8000,
                layer: 0,
                group: Ipv4Addr::new(239, 0, 0, group),
                port: 1758,
                boot_file: file.into(),
            }
            .encode()
            .unwrap()
        };
        let mut query = |bytes: &[u8]| {
            reg.handle_peer(t0, from(5), bytes);
            replies(&mut reg)
        };
        assert!(query(&q("a", me, 1)).is_empty(), "same file, same server");
        let other = Ipv4Addr::new(10, 0, 0, 8);
        let r = query(&q("a", other, 1));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, from(5));
        assert_eq!(r[0].1[0], 1);
        assert_eq!(r[0].1[1..], q("a", other, 1)[1..]);
        assert_eq!(query(&q("b", me, 1)).len(), 1);
        assert!(query(&q("b", me, 2)).is_empty(), "slot not used");
    }

    /// Hostile bytes on either port never make it panic, and it keeps the contract.
    #[test]
    fn keeps_the_contract_under_hostile_bytes() {
        struct Both(FileRegistry);
        impl fleetboot_testkit::Node for Both {
            fn handle(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
                if to.port() == 4012 {
                    self.0.handle_peer(now, from, bytes);
                } else {
                    self.0.handle(now, from, bytes)
                }
            }
            fn handle_timeout(&mut self, now: Instant) {
                self.0.handle_timeout(now)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                self.0.poll_timeout()
            }
            fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
                self.0.poll_transmit(now, buf).map(|t| ("10.0.0.9:4013".parse().unwrap(), t))
            }
        }
        let t0 = Instant::now();
        let mut node = Both(registry(Duration::from_secs(10)));
        node.0.handle(t0, from(1), &prep(FsOp::Prepare, 1, "a", 1));
        let mut rng = fleetboot_testkit::Rng::new(11);
        for to in ["10.0.0.9:4013", "10.0.0.9:4012"] {
            let c = fleetboot_testkit::conformance::check(&mut node, t0, to.parse().unwrap(), &[from(1)], &mut rng, 500);
            assert_eq!(c.fuzzed, 500);
        }
    }

    #[test]
    fn slots_beyond_max_groups_are_refused_until_one_is_released() {
        let t0 = Instant::now();
        let mut reg = registry(Duration::from_secs(30)).with_max_groups(2);
        for g in 1..=2u8 {
            assert_eq!(ask(&mut reg, t0, 1, &prep(FsOp::Prepare, g.into(), "f", g)).0, FsOp::Ack);
        }
        assert_eq!(ask(&mut reg, t0, 1, &prep(FsOp::Prepare, 3, "f", 3)), (FsOp::Nak, Some(NakReason::Busy), 3));
        // A renewal of a slot already carried is not a new slot.
        assert_eq!(ask(&mut reg, t0, 1, &prep(FsOp::Prepare, 4, "f", 1)).0, FsOp::Ack);
        ask(&mut reg, t0, 1, &prep(FsOp::Delete, 5, "f", 1));
        assert_eq!(ask(&mut reg, t0, 1, &prep(FsOp::Prepare, 6, "f", 3)).0, FsOp::Ack);
        assert_eq!((reg.groups().len(), reg.refused_full()), (2, 1));
    }
}

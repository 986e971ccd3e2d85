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

use crate::wire::{ConflictOp, ConflictPacket, FsMessage, FsOp, NakReason, Slot};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

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

/// Slots a file server carries at once by default; a PREPARE for another is refused
/// (`Busy`) until one is released.
pub const DEFAULT_MAX_GROUPS: usize = 256;

#[derive(Debug)]
pub struct FileRegistry {
    /// This file server's address, as negotiators put it in conflict queries.
    pub address: Ipv4Addr,
    pub registration_ttl: Duration,
    groups: BTreeMap<Slot, Group>,
    events: Vec<RegistryEvent>,
    max_groups: usize,
    refused_full: u64,
}

impl FileRegistry {
    pub fn new(address: Ipv4Addr, registration_ttl: Duration) -> FileRegistry {
        FileRegistry {
            address,
            registration_ttl,
            groups: BTreeMap::new(),
            events: Vec::new(),
            max_groups: DEFAULT_MAX_GROUPS,
            refused_full: 0,
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

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<RegistryEvent> {
        std::mem::take(&mut self.events)
    }

    /// One datagram from a negotiator. Returns the reply to send back to its source.
    /// `has_file` says whether this file server can serve the named file.
    pub fn handle(
        &mut self,
        now: Instant,
        from: Ipv4Addr,
        bytes: &[u8],
        has_file: &dyn Fn(&str) -> bool,
    ) -> Option<Vec<u8>> {
        self.expire(now);
        let msg = FsMessage::parse(bytes).ok()?;
        let reply = match msg.op {
            FsOp::Prepare => self.prepare(now, from, &msg, has_file),
            FsOp::Delete => {
                self.delete(from, msg.slot);
                msg.reply(FsOp::Deleted, None)
            }
            FsOp::Ack | FsOp::Nak | FsOp::Deleted => return None,
        };
        reply.encode().ok()
    }

    fn prepare(
        &mut self,
        now: Instant,
        from: Ipv4Addr,
        msg: &FsMessage,
        has_file: &dyn Fn(&str) -> bool,
    ) -> FsMessage {
        let until = now + self.registration_ttl;
        if let Some(g) = self.groups.get_mut(&msg.slot) {
            if g.file != msg.boot_file || g.server_port != msg.server_port {
                return msg.reply(FsOp::Nak, Some(NakReason::Busy));
            }
            g.negotiators.insert(from, until);
            return msg.reply(FsOp::Ack, None);
        }
        if !has_file(&msg.boot_file) {
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
        self.events.push(RegistryEvent::Configured {
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
            self.events
                .push(RegistryEvent::Released { slot, file: g.file });
        }
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

    /// When [`expire`](Self::expire) next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.groups
            .values()
            .flat_map(|g| g.negotiators.values())
            .min()
            .copied()
    }

    /// A conflict query heard on the negotiators' port. Returns the response (the query
    /// echoed with opcode 1) when this file server carries the slot and the querier's plan
    /// would conflict with it: another file, or the same file from another file server.
    pub fn handle_query(&mut self, now: Instant, bytes: &[u8]) -> Option<Vec<u8>> {
        self.expire(now);
        let q = ConflictPacket::parse(bytes).ok()?;
        if q.op != ConflictOp::Query {
            return None;
        }
        let g = self.groups.get(&q.slot())?;
        if g.file == q.boot_file && q.file_server == self.address {
            return None;
        }
        q.with_op(ConflictOp::Response).encode().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn reply(r: Option<Vec<u8>>) -> (FsOp, Option<NakReason>, u32) {
        let m = FsMessage::parse(&r.unwrap()).unwrap();
        (m.op, m.reason, m.xid)
    }

    #[test]
    fn prepare_ack_nak_delete_release() {
        let t0 = Instant::now();
        let has = |f: &str| f != "missing";
        let mut reg = FileRegistry::new(Ipv4Addr::new(10, 0, 0, 9), Duration::from_secs(30));
        let (n1, n2, n3) = (
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
        );
        let ack = (FsOp::Ack, None, 7);
        assert_eq!(
            reply(reg.handle(t0, n1, &prep(FsOp::Prepare, 7, "a", 1), &has)),
            ack
        );
        // Another negotiator, same slot and file: ACK, and it joins the list.
        assert_eq!(
            reply(reg.handle(t0, n2, &prep(FsOp::Prepare, 7, "a", 1), &has)),
            ack
        );
        // Same slot, another file: busy.
        assert_eq!(
            reply(reg.handle(t0, n3, &prep(FsOp::Prepare, 8, "b", 1), &has)),
            (FsOp::Nak, Some(NakReason::Busy), 8)
        );
        assert_eq!(
            reply(reg.handle(t0, n3, &prep(FsOp::Prepare, 9, "missing", 2), &has)),
            (FsOp::Nak, Some(NakReason::NoSuchFile), 9)
        );
        let slot = reg.slot_for("a", 1759).unwrap();
        assert_eq!(reg.groups()[&slot].negotiators.len(), 2);
        // DELETE from one: still held for the other.
        let (op, _, _) = reply(reg.handle(t0, n1, &prep(FsOp::Delete, 10, "a", 1), &has));
        assert_eq!(op, FsOp::Deleted);
        assert!(reg.groups().contains_key(&slot));
        // Duplicate DELETE is harmless.
        reg.handle(t0, n1, &prep(FsOp::Delete, 10, "a", 1), &has);
        assert!(reg.groups().contains_key(&slot));
        reg.handle(t0, n2, &prep(FsOp::Delete, 11, "a", 1), &has);
        assert!(reg.groups().is_empty());
        let ev = reg.take_events();
        assert!(matches!(ev.last(), Some(RegistryEvent::Released { .. })));
        // Now the slot is free for another file.
        assert_eq!(
            reply(reg.handle(t0, n3, &prep(FsOp::Prepare, 12, "b", 1), &has)).0,
            FsOp::Ack
        );
    }

    #[test]
    fn registrations_expire_unless_renewed() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut reg = FileRegistry::new(Ipv4Addr::new(10, 0, 0, 9), ttl);
        let has = |_: &str| true;
        let n1 = Ipv4Addr::new(10, 0, 0, 1);
        reg.handle(t0, n1, &prep(FsOp::Prepare, 1, "a", 1), &has);
        reg.handle(t0 + ttl / 2, n1, &prep(FsOp::Prepare, 2, "a", 1), &has);
        reg.expire(t0 + ttl + Duration::from_secs(1));
        assert_eq!(reg.groups().len(), 1, "renewed");
        reg.expire(t0 + ttl * 2);
        assert!(reg.groups().is_empty(), "expired");
    }

    #[test]
    fn answers_conflict_queries_for_slots_it_carries() {
        let t0 = Instant::now();
        let me = Ipv4Addr::new(10, 0, 0, 9);
        let mut reg = FileRegistry::new(me, Duration::from_secs(10));
        reg.handle(
            t0,
            Ipv4Addr::new(10, 0, 0, 1),
            &prep(FsOp::Prepare, 1, "a", 1),
            &|_| true,
        );
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
        assert_eq!(
            reg.handle_query(t0, &q("a", me, 1)),
            None,
            "same file, same server"
        );
        let other = Ipv4Addr::new(10, 0, 0, 8);
        let r = reg.handle_query(t0, &q("a", other, 1)).unwrap();
        assert_eq!(r[0], 1);
        assert_eq!(r[1..], q("a", other, 1)[1..]);
        assert!(reg.handle_query(t0, &q("b", me, 1)).is_some());
        assert_eq!(reg.handle_query(t0, &q("b", me, 2)), None, "slot not used");
    }

    #[test]
    fn slots_beyond_max_groups_are_refused_until_one_is_released() {
        let mut r = FileRegistry::new(Ipv4Addr::new(10, 0, 0, 9), Duration::from_secs(30)).with_max_groups(2);
        let now = Instant::now();
        let neg = Ipv4Addr::new(10, 0, 0, 1);
        let has = |_: &str| true;
        let op = |b: Vec<u8>| FsMessage::parse(&b).unwrap();
        for g in 1..=2 {
            assert_eq!(op(r.handle(now, neg, &prep(FsOp::Prepare, g.into(), "f", g), &has).unwrap()).op, FsOp::Ack);
        }
        let refused = op(r.handle(now, neg, &prep(FsOp::Prepare, 3, "f", 3), &has).unwrap());
        assert_eq!((refused.op, refused.reason), (FsOp::Nak, Some(NakReason::Busy)));
        // A renewal of a slot already carried is not a new slot.
        assert_eq!(op(r.handle(now, neg, &prep(FsOp::Prepare, 4, "f", 1), &has).unwrap()).op, FsOp::Ack);
        r.handle(now, neg, &prep(FsOp::Delete, 5, "f", 1), &has);
        assert_eq!(op(r.handle(now, neg, &prep(FsOp::Prepare, 6, "f", 3), &has).unwrap()).op, FsOp::Ack);
        assert_eq!((r.groups().len(), r.refused_full()), (2, 1));
    }
}

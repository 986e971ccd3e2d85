//! Which read requests get a transfer: at most `max_transfers` at once, at most
//! `max_per_client` from one client address. When every place is taken, the oldest
//! transfer whose client never answered gives its place to the new request: a flood of
//! spoofed requests (whose "clients" never acknowledge anything) then only ever displaces
//! itself, and a real client, which answers within a round trip, keeps its transfer.
//!
//! Sans-I/O like the rest of the crate: the shell asks [`Admission::admit`] per request,
//! reports [`Admission::answered`] and [`Admission::finished`], and owns the threads or
//! tasks. A displaced transfer keeps its place until its shell reports it finished, so the
//! shell can hand the place (its thread, its socket budget) straight to the newcomer: the
//! number of transfers never exceeds `max_transfers`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// A transfer's number, unique per [`Admission`].
pub type TransferId = u64;

/// The caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_transfers: usize,
    pub max_per_client: usize,
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A free place: start transfer `id`.
    Start(TransferId),
    /// No free place: stop `evict` (its client never answered) and run `id` in its place
    /// once it has stopped.
    Replace { id: TransferId, evict: TransferId },
    /// Refused; the request is dropped (its client may ask again).
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This client address already has `max_per_client` transfers.
    ClientBusy,
    /// Every place is held by a transfer whose client answers.
    Full,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    client: IpAddr,
    answered: bool,
    /// Displaced: it still holds its place until finished, but no longer counts for its
    /// client and cannot be displaced again.
    evicted: bool,
}

/// The transfers in progress, by id (ids grow, so the first unanswered one is the oldest).
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    live: BTreeMap<TransferId, Entry>,
    per_client: HashMap<IpAddr, usize>,
    next_id: TransferId,
    refused_busy: u64,
    refused_full: u64,
    evictions: u64,
}

/// Counts, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Places held (displaced transfers still stopping included).
    pub live: usize,
    /// Distinct client addresses with a transfer.
    pub clients: usize,
    pub refused_client_busy: u64,
    pub refused_full: u64,
    pub evictions: u64,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        let limits = Limits { max_transfers: limits.max_transfers.max(1), max_per_client: limits.max_per_client.max(1) };
        Admission {
            limits,
            live: BTreeMap::new(),
            per_client: HashMap::new(),
            next_id: 1,
            refused_busy: 0,
            refused_full: 0,
            evictions: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A read request from `client`.
    pub fn admit(&mut self, client: IpAddr) -> Admit {
        if self.per_client.get(&client).copied().unwrap_or(0) >= self.limits.max_per_client {
            self.refused_busy += 1;
            return Admit::Refused(Refusal::ClientBusy);
        }
        if self.live.len() < self.limits.max_transfers {
            let id = self.insert(client);
            return Admit::Start(id);
        }
        let victim = self.live.iter().find(|(_, e)| !e.answered && !e.evicted).map(|(&id, _)| id);
        let Some(evict) = victim else {
            self.refused_full += 1;
            return Admit::Refused(Refusal::Full);
        };
        self.evictions += 1;
        let e = self.live.get_mut(&evict).expect("found above");
        e.evicted = true;
        let old = e.client;
        self.release_client(old);
        // The newcomer's place is the victim's: it is counted when the victim finishes.
        let id = self.next_id;
        self.next_id += 1;
        self.pending_client(client);
        Admit::Replace { id, evict }
    }

    /// The victim of a [`Admit::Replace`] stopped and `id` now runs in its place.
    pub fn replaced(&mut self, evicted: TransferId, id: TransferId, client: IpAddr) {
        if self.live.remove(&evicted).is_some() {
            self.live.insert(id, Entry { client, answered: false, evicted: false });
        } else {
            // Unknown victim: the newcomer cannot run; undo its client count.
            self.release_client(client);
        }
    }

    /// The victim of a [`Admit::Replace`] stopped, and its replacement was itself
    /// displaced before it could start: the place is simply free.
    pub fn abandoned(&mut self, evicted: TransferId, client: IpAddr) {
        self.live.remove(&evicted);
        self.release_client(client);
    }

    /// The client of `id` acknowledged something: it is real and keeps its place.
    pub fn answered(&mut self, id: TransferId) {
        if let Some(e) = self.live.get_mut(&id) {
            e.answered = true;
        }
    }

    /// Transfer `id` ended; its place is free.
    pub fn finished(&mut self, id: TransferId) {
        if let Some(e) = self.live.remove(&id) {
            if !e.evicted {
                self.release_client(e.client);
            }
        }
    }

    pub fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            live: self.live.len(),
            clients: self.per_client.len(),
            refused_client_busy: self.refused_busy,
            refused_full: self.refused_full,
            evictions: self.evictions,
        }
    }

    fn insert(&mut self, client: IpAddr) -> TransferId {
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(id, Entry { client, answered: false, evicted: false });
        self.pending_client(client);
        id
    }

    fn pending_client(&mut self, client: IpAddr) {
        *self.per_client.entry(client).or_insert(0) += 1;
    }

    fn release_client(&mut self, client: IpAddr) {
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn caps_per_client_and_overall() {
        let mut a = Admission::new(Limits { max_transfers: 3, max_per_client: 2 });
        let t1 = a.admit(ip(1));
        let t2 = a.admit(ip(1));
        assert!(matches!((t1, t2), (Admit::Start(_), Admit::Start(_))));
        assert_eq!(a.admit(ip(1)), Admit::Refused(Refusal::ClientBusy));
        let Admit::Start(t3) = a.admit(ip(2)) else { panic!() };
        // Full: the oldest unanswered transfer (t1) gives way.
        let Admit::Start(t1) = t1 else { panic!() };
        let Admit::Start(t2) = t2 else { panic!() };
        a.answered(t2);
        let Admit::Replace { id: t4, evict } = a.admit(ip(3)) else { panic!() };
        assert_eq!(evict, t1);
        assert_eq!(a.stats().live, 3, "the victim keeps its place until it stops");
        // ip(1) has one transfer left counted, so it may ask again.
        assert_eq!(a.per_client[&ip(1)], 1);
        a.replaced(evict, t4, ip(3));
        assert_eq!(a.stats().live, 3);
        // t3 is next; then t4; t2 answered and is never displaced.
        a.answered(t3);
        a.answered(t4);
        assert_eq!(a.admit(ip(4)), Admit::Refused(Refusal::Full));
        for id in [t2, t3, t4] {
            a.finished(id);
        }
        assert_eq!(a.stats(), AdmissionStats { live: 0, clients: 0, refused_client_busy: 1, refused_full: 1, evictions: 1 });
    }

    #[test]
    fn a_displaced_transfer_is_not_displaced_twice() {
        let mut a = Admission::new(Limits { max_transfers: 1, max_per_client: 8 });
        let Admit::Start(t1) = a.admit(ip(1)) else { panic!() };
        let Admit::Replace { id: t2, evict } = a.admit(ip(2)) else { panic!() };
        assert_eq!(evict, t1);
        // While t1 stops, nothing else can be displaced.
        assert_eq!(a.admit(ip(3)), Admit::Refused(Refusal::Full));
        a.abandoned(evict, ip(2));
        assert_eq!(a.stats().live, 0);
        assert_eq!(a.stats().clients, 0);
        let _ = t2;
    }

    #[test]
    fn a_flood_never_holds_more_than_the_cap() {
        let mut a = Admission::new(Limits { max_transfers: 16, max_per_client: 2 });
        let mut running = Vec::new();
        for i in 0..10_000u32 {
            let client = IpAddr::from((0x0a00_0000 + i % 5000).to_be_bytes());
            match a.admit(client) {
                Admit::Start(id) => running.push((id, client)),
                Admit::Replace { id, evict } => {
                    a.replaced(evict, id, client);
                    running.retain(|(r, _)| *r != evict);
                    running.push((id, client));
                }
                Admit::Refused(_) => {}
            }
            assert!(a.stats().live <= 16);
            if i % 100 == 0 {
                // A real client among them answers and keeps its place.
                let Admit::Replace { id, evict } = a.admit(ip(200)) else { continue };
                a.replaced(evict, id, ip(200));
                a.answered(id);
            }
        }
        assert!(a.stats().live <= 16);
    }
}

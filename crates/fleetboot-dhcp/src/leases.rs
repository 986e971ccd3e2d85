//! The in-memory lease table and address allocation.
//!
//! The table is keyed by address, so one address has at most one lease record; every
//! path that binds an address goes through [`LeaseTable::bind`], which refuses an
//! address that is live for anyone else. That is where "never one address to two
//! clients" is enforced — the allocation policy above it only chooses.

use crate::config::{Reservation, Subnet};
use fleetboot_boot::MacAddr;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

mod share;
pub use share::Share;

/// The two clocks the table keeps time with. Offers live in memory only and expire on the
/// monotonic clock (`at`). Leases and declines are persisted and must mean the same after a
/// restart or on another host, so their expiry is wall-clock Unix seconds (`unix`): the one
/// place fleetboot's protocol machines take wall-clock time, and they take it explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    /// Unix seconds.
    pub unix: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    Bound,
    /// The client found the address in use (DHCPDECLINE); quarantined until `expires_at`.
    Declined,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub client_id: Option<Vec<u8>>,
    /// Unix seconds.
    pub expires_at: u64,
    pub hostname: Option<String>,
    pub state: LeaseState,
}

impl Lease {
    pub fn is_live(&self, now: u64) -> bool {
        self.expires_at > now
    }

    /// A bound lease (live or expired) held by this client. Declined records belong to nobody.
    pub fn belongs_to(&self, client: ClientKey<'_>) -> bool {
        self.state == LeaseState::Bound && client.is(self.mac, self.client_id.as_deref())
    }
}

/// How a client is recognised: by client identifier when it sends one, else by MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientKey<'a> {
    pub mac: MacAddr,
    pub client_id: Option<&'a [u8]>,
}

impl ClientKey<'_> {
    /// RFC 2131 §4.2: the client identifier, when both sides have one, decides; otherwise
    /// the hardware address does.
    pub fn is(&self, mac: MacAddr, client_id: Option<&[u8]>) -> bool {
        match (self.client_id, client_id) {
            (Some(a), Some(b)) => a == b,
            _ => self.mac == mac,
        }
    }

    pub fn matches_reservation(&self, r: &Reservation) -> bool {
        let by_id =
            matches!((self.client_id, &r.client_id), (Some(a), Some(b)) if a == b.as_slice());
        by_id || r.mac == Some(self.mac)
    }
}

#[derive(Debug, Clone)]
struct Offer {
    mac: MacAddr,
    client_id: Option<Vec<u8>>,
    expires_at: Instant,
}

/// Why [`LeaseTable::bind`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// Live lease, pending offer or reservation of another client, or a quarantined address.
    InUse,
    /// Neither in the subnet's dynamic range nor reserved for this client.
    NotAllowed,
}

/// Result of a successful bind: the new lease, and the client's other leases it replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub lease: Lease,
    pub replaced: Vec<Ipv4Addr>,
}

/// Addresses per client, by MAC and by client identifier. A record that belongs to a
/// client shares its client identifier or its MAC (see [`ClientKey::is`]), so the union
/// of the two entries holds every candidate: lookups cost the client's own records, not
/// the whole table, which is what keeps a DISCOVER cheap with tens of thousands of leases.
#[derive(Debug, Clone, Default)]
struct ClientIndex {
    by_mac: HashMap<MacAddr, BTreeSet<Ipv4Addr>>,
    by_client_id: HashMap<Vec<u8>, BTreeSet<Ipv4Addr>>,
}

impl ClientIndex {
    fn insert(&mut self, ip: Ipv4Addr, mac: MacAddr, client_id: Option<&[u8]>) {
        self.by_mac.entry(mac).or_default().insert(ip);
        if let Some(id) = client_id {
            self.by_client_id.entry(id.to_vec()).or_default().insert(ip);
        }
    }

    fn remove(&mut self, ip: Ipv4Addr, mac: MacAddr, client_id: Option<&[u8]>) {
        if let Some(set) = self.by_mac.get_mut(&mac) {
            set.remove(&ip);
            if set.is_empty() {
                self.by_mac.remove(&mac);
            }
        }
        if let Some(id) = client_id {
            if let Some(set) = self.by_client_id.get_mut(id) {
                set.remove(&ip);
                if set.is_empty() {
                    self.by_client_id.remove(id);
                }
            }
        }
    }

    fn candidates(&self, client: ClientKey<'_>) -> BTreeSet<Ipv4Addr> {
        let mut out = self.by_mac.get(&client.mac).cloned().unwrap_or_default();
        if let Some(set) = client.client_id.and_then(|id| self.by_client_id.get(id)) {
            out.extend(set);
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct LeaseTable {
    leases: BTreeMap<Ipv4Addr, Lease>,
    lease_index: ClientIndex,
    /// Offers live only here: losing them on restart costs a client one retry, while
    /// persisting them would cost a disk write per DISCOVER.
    offers: BTreeMap<Ipv4Addr, Offer>,
    offer_index: ClientIndex,
    /// When expired offers were last swept out.
    offers_swept_at: Option<Instant>,
    /// Per range start: every address from the range start up to this one has a lease
    /// record or an offer, so the search for a never-used address starts here instead of
    /// at the bottom of the pool (in a boot storm thousands of offers are pending at once).
    /// Lowered whenever a lease record or an offer is removed.
    fresh_from: Cell<Option<(u32, u32)>>,
    /// Several servers on one pool: this one's share, searched first (`share.rs`), and
    /// where its search starts, as `fresh_from`.
    share: Option<Share>,
    share_from: Cell<Option<(u32, u32)>>,
    offer_hold_secs: u64,
    decline_hold_secs: u64,
}

/// How often expired offers are swept out.
const OFFER_SWEEP: Duration = Duration::from_secs(1);

fn reserved_for_other(reservations: &[Reservation], ip: Ipv4Addr, client: ClientKey<'_>) -> bool {
    reservations
        .iter()
        .any(|r| r.ip == ip && !client.matches_reservation(r))
}

impl LeaseTable {
    pub fn new(offer_hold_secs: u64, decline_hold_secs: u64) -> LeaseTable {
        LeaseTable {
            leases: BTreeMap::new(),
            lease_index: ClientIndex::default(),
            offers: BTreeMap::new(),
            offer_index: ClientIndex::default(),
            offers_swept_at: None,
            fresh_from: Cell::new(None),
            share: None,
            share_from: Cell::new(None),
            offer_hold_secs,
            decline_hold_secs,
        }
    }

    /// Restores a lease from storage. A later record for the same address replaces an earlier one.
    pub fn load(&mut self, lease: Lease) {
        self.put_lease(lease);
    }

    /// Drops the record of `ip` (another server removed it from a shared store); `false`
    /// when the table had none.
    pub fn forget(&mut self, ip: Ipv4Addr) -> bool {
        self.drop_lease(ip).is_some()
    }

    /// The one way a lease record enters the table, so the client index stays true.
    fn put_lease(&mut self, lease: Lease) {
        self.drop_lease(lease.ip);
        self.lease_index.insert(lease.ip, lease.mac, lease.client_id.as_deref());
        self.leases.insert(lease.ip, lease);
    }

    /// The one way a lease record leaves the table.
    fn drop_lease(&mut self, ip: Ipv4Addr) -> Option<Lease> {
        let old = self.leases.remove(&ip)?;
        self.lease_index.remove(ip, old.mac, old.client_id.as_deref());
        self.lower_fresh_from(ip);
        Some(old)
    }

    /// `ip` may be free again: the never-used search must look at it.
    fn lower_fresh_from(&self, ip: Ipv4Addr) {
        self.lower_share_from(ip);
        if let Some((start, from)) = self.fresh_from.get() {
            if u32::from(ip) < from {
                self.fresh_from.set(Some((start, u32::from(ip).max(start))));
            }
        }
    }

    fn put_offer(&mut self, ip: Ipv4Addr, offer: Offer) {
        self.drop_offer(ip);
        self.offer_index.insert(ip, offer.mac, offer.client_id.as_deref());
        self.offers.insert(ip, offer);
    }

    fn drop_offer(&mut self, ip: Ipv4Addr) {
        if let Some(old) = self.offers.remove(&ip) {
            self.offer_index.remove(ip, old.mac, old.client_id.as_deref());
            self.lower_fresh_from(ip);
        }
    }

    /// The client's bound lease records, live or expired.
    fn leases_of(&self, client: ClientKey<'_>) -> Vec<&Lease> {
        self.lease_index
            .candidates(client)
            .into_iter()
            .filter_map(|ip| self.leases.get(&ip))
            .filter(|l| l.belongs_to(client))
            .collect()
    }

    /// The lowest address in `start..=end` with no lease record that `usable` accepts.
    fn never_used(&self, start: u32, end: u32, usable: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
        let mut from = match self.fresh_from.get() {
            Some((s, from)) if s == start => from,
            _ => start,
        };
        // Skip the prefix of leased and offered addresses for good: it only shrinks when a
        // record is dropped. (An offer that expired stays in the prefix until the sweep
        // drops it, within a second.)
        let taken = |a: u32| {
            let ip = Ipv4Addr::from(a);
            self.leases.contains_key(&ip) || self.offers.contains_key(&ip)
        };
        while from <= end && taken(from) {
            from += 1;
        }
        self.fresh_from.set(Some((start, from)));
        let free = |ip: &Ipv4Addr| !self.leases.contains_key(ip) && usable(*ip);
        // Nothing above: an offer in the prefix may have expired unswept (the sweep runs
        // when an offer is made, which an exhausted pool never gets to). Look below too.
        (from..=end)
            .map(Ipv4Addr::from)
            .find(free)
            .or_else(|| (start..from.min(end.saturating_add(1))).map(Ipv4Addr::from).find(free))
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.leases.get(&ip)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The client's most recent bound lease, expired or not.
    pub fn lease_of(&self, client: ClientKey<'_>) -> Option<&Lease> {
        self.leases_of(client).into_iter().max_by_key(|l| l.expires_at)
    }

    /// Can `ip` go to `client` now? Not if another client holds it live, has a pending
    /// offer for it, or has it reserved, and not while it is quarantined.
    pub fn is_free_for(
        &self,
        now: Now,
        ip: Ipv4Addr,
        client: ClientKey<'_>,
        reservations: &[Reservation],
    ) -> bool {
        if let Some(l) = self.leases.get(&ip) {
            if l.is_live(now.unix) && !l.belongs_to(client) {
                return false;
            }
        }
        if let Some(o) = self.offers.get(&ip) {
            if o.expires_at > now.at && !client.is(o.mac, o.client_id.as_deref()) {
                return false;
            }
        }
        !reserved_for_other(reservations, ip, client)
    }

    fn usable(
        &self,
        now: Now,
        ip: Ipv4Addr,
        client: ClientKey<'_>,
        subnet: &Subnet,
        reservations: &[Reservation],
    ) -> bool {
        let reserved_here = reservations
            .iter()
            .any(|r| r.ip == ip && client.matches_reservation(r));
        subnet.contains(ip)
            && (subnet.in_range(ip) || reserved_here)
            && self.is_free_for(now, ip, client, reservations)
    }

    /// Chooses an address for `client` in `subnet`, in this order: its reservation, the
    /// address already offered to it, its current or previous lease, the address it asked
    /// for, the lowest never-used free address, the address that expired longest ago.
    /// Chooses only: [`offer`](Self::offer) or [`bind`](Self::bind) commit.
    pub fn choose(
        &self,
        now: Now,
        client: ClientKey<'_>,
        requested: Option<Ipv4Addr>,
        subnet: &Subnet,
        reservations: &[Reservation],
    ) -> Option<Ipv4Addr> {
        let usable = |ip| self.usable(now, ip, client, subnet, reservations);
        if let Some(r) = reservations
            .iter()
            .find(|r| client.matches_reservation(r) && subnet.contains(r.ip))
        {
            if usable(r.ip) {
                return Some(r.ip);
            }
        }
        let offered = self.offer_index.candidates(client).into_iter().find(|ip| {
            self.offers
                .get(ip)
                .is_some_and(|o| o.expires_at > now.at && client.is(o.mac, o.client_id.as_deref()))
        });
        if let Some(ip) = offered {
            if usable(ip) {
                return Some(ip);
            }
        }
        let mut previous = self.leases_of(client);
        previous.sort_by_key(|l| std::cmp::Reverse(l.expires_at));
        if let Some(l) = previous.into_iter().find(|l| usable(l.ip)) {
            return Some(l.ip);
        }
        if let Some(ip) = requested.filter(|&ip| subnet.in_range(ip) && usable(ip)) {
            return Some(ip);
        }
        let (start, end) = (u32::from(subnet.range_start), u32::from(subnet.range_end));
        let never_used =
            self.never_used_in_share(start, end, usable).or_else(|| self.never_used(start, end, usable));
        if never_used.is_some() {
            return never_used;
        }
        self.leases
            .range(subnet.range_start..=subnet.range_end)
            .filter(|(&ip, _)| usable(ip))
            .min_by_key(|(_, l)| l.expires_at)
            .map(|(&ip, _)| ip)
    }

    /// Sets `ip` aside for `client` for `offer_hold_secs`, dropping its other offers.
    pub fn offer(&mut self, now: Instant, client: ClientKey<'_>, ip: Ipv4Addr) {
        self.forget_offers(client);
        self.sweep_offers(now);
        self.put_offer(
            ip,
            Offer {
                mac: client.mac,
                client_id: client.client_id.map(<[u8]>::to_vec),
                expires_at: now + Duration::from_secs(self.offer_hold_secs),
            },
        );
    }

    /// Drops expired offers, at most once a second: they block nothing (every check
    /// compares expiry), so sweeping only keeps the table small.
    pub fn sweep_offers(&mut self, now: Instant) {
        if self.offers_swept_at.is_some_and(|t| now < t + OFFER_SWEEP) {
            return;
        }
        let expired: Vec<Ipv4Addr> = self.offers.iter().filter(|(_, o)| o.expires_at <= now).map(|(&ip, _)| ip).collect();
        for ip in expired {
            self.drop_offer(ip);
        }
        self.offers_swept_at = Some(now);
    }

    /// When [`sweep_offers`](Self::sweep_offers) next has work: a second after the last
    /// sweep, while offers are pending.
    pub fn next_sweep(&self) -> Option<Instant> {
        if self.offers.is_empty() {
            return None;
        }
        Some(self.offers_swept_at.map_or_else(|| self.offers.values().map(|o| o.expires_at).min().expect("not empty"), |t| t + OFFER_SWEEP))
    }

    /// Offers pending (expired ones included until the next sweep).
    pub fn offers(&self) -> usize {
        self.offers.len()
    }

    /// Drops the client's pending offers (it chose another server).
    pub fn forget_offers(&mut self, client: ClientKey<'_>) {
        let mine: Vec<Ipv4Addr> = self
            .offer_index
            .candidates(client)
            .into_iter()
            .filter(|ip| self.offers.get(ip).is_some_and(|o| client.is(o.mac, o.client_id.as_deref())))
            .collect();
        for ip in mine {
            self.drop_offer(ip);
        }
    }

    /// Binds (or extends) `ip` for `client` until `now + lease_secs`. The client's other
    /// bound leases are removed: a client holds one address.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &mut self,
        now: Now,
        client: ClientKey<'_>,
        ip: Ipv4Addr,
        lease_secs: u32,
        hostname: Option<String>,
        subnet: &Subnet,
        reservations: &[Reservation],
    ) -> Result<Bound, BindError> {
        let reserved_here = reservations
            .iter()
            .any(|r| r.ip == ip && client.matches_reservation(r));
        if !subnet.contains(ip) || !(subnet.in_range(ip) || reserved_here) {
            return Err(BindError::NotAllowed);
        }
        if !self.is_free_for(now, ip, client, reservations) {
            return Err(BindError::InUse);
        }
        // Renewals often omit option 12; keep the name the client gave before.
        let hostname = hostname.or_else(|| {
            self.leases
                .get(&ip)
                .filter(|l| l.belongs_to(client))
                .and_then(|l| l.hostname.clone())
        });
        self.forget_offers(client);
        self.drop_offer(ip);
        let replaced: Vec<Ipv4Addr> =
            self.leases_of(client).into_iter().map(|l| l.ip).filter(|&old| old != ip).collect();
        for old in &replaced {
            self.drop_lease(*old);
        }
        let lease = Lease {
            ip,
            mac: client.mac,
            client_id: client.client_id.map(<[u8]>::to_vec),
            expires_at: now.unix.saturating_add(lease_secs as u64),
            hostname,
            state: LeaseState::Bound,
        };
        self.put_lease(lease.clone());
        Ok(Bound { lease, replaced })
    }

    /// DHCPRELEASE: removes the lease if it is the client's.
    pub fn release(&mut self, client: ClientKey<'_>, ip: Ipv4Addr) -> bool {
        if self.leases.get(&ip).is_some_and(|l| l.belongs_to(client)) {
            self.drop_lease(ip);
            true
        } else {
            false
        }
    }

    /// DHCPDECLINE: quarantines the address, if the client held or was offered it —
    /// a stray DECLINE must not take an address from the client that holds it.
    pub fn decline(&mut self, now: Now, client: ClientKey<'_>, ip: Ipv4Addr) -> Option<Lease> {
        let held = self.leases.get(&ip).is_some_and(|l| l.belongs_to(client));
        let offered = self
            .offers
            .get(&ip)
            .is_some_and(|o| client.is(o.mac, o.client_id.as_deref()));
        let free = self.leases.get(&ip).is_none_or(|l| !l.is_live(now.unix));
        if !(held || (offered && free)) {
            return None;
        }
        self.drop_offer(ip);
        let lease = Lease {
            ip,
            mac: client.mac,
            client_id: client.client_id.map(<[u8]>::to_vec),
            expires_at: now.unix.saturating_add(self.decline_hold_secs),
            hostname: None,
            state: LeaseState::Declined,
        };
        self.put_lease(lease.clone());
        Some(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// `s` seconds into a test: both clocks move together.
    fn at(s: u64) -> Now {
        static BASE: OnceLock<Instant> = OnceLock::new();
        Now { at: *BASE.get_or_init(Instant::now) + Duration::from_secs(s), unix: s }
    }

    fn subnet() -> Subnet {
        Subnet {
            network: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
            range_start: Ipv4Addr::new(10, 0, 0, 100),
            range_end: Ipv4Addr::new(10, 0, 0, 102),
            router: None,
            dns: vec![],
            domain: None,
            lease_time: 100,
        }
    }

    fn key(n: u8) -> ClientKey<'static> {
        ClientKey {
            mac: MacAddr([2, 0, 0, 0, 0, n]),
            client_id: None,
        }
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    #[test]
    fn lowest_free_then_sticky() {
        let s = subnet();
        let mut t = LeaseTable::new(30, 600);
        assert_eq!(t.choose(at(0), key(1), None, &s, &[]), Some(ip(100)));
        t.offer(at(0).at, key(1), ip(100));
        assert_eq!(t.choose(at(0), key(2), Some(ip(100)), &s, &[]), Some(ip(101)));
        assert_eq!(t.choose(at(0), key(1), Some(ip(102)), &s, &[]), Some(ip(100)));
        t.bind(at(0), key(1), ip(100), 100, None, &s, &[]).unwrap();
        // Expired, but nobody else took it: the client gets it back.
        assert_eq!(t.choose(at(500), key(1), None, &s, &[]), Some(ip(100)));
        assert_eq!(
            t.bind(at(50), key(2), ip(100), 100, None, &s, &[]),
            Err(BindError::InUse)
        );
    }

    #[test]
    fn offers_expire_and_pool_exhausts() {
        let s = subnet();
        let mut t = LeaseTable::new(30, 600);
        for n in 1..=3 {
            let a = t.choose(at(0), key(n), None, &s, &[]).unwrap();
            t.offer(at(0).at, key(n), a);
        }
        assert_eq!(t.choose(at(10), key(4), None, &s, &[]), None);
        assert_eq!(t.choose(at(31), key(4), None, &s, &[]), Some(ip(100)));
    }

    #[test]
    fn pending_offers_are_skipped_and_a_dropped_one_is_reused_first() {
        let s = subnet();
        let mut t = LeaseTable::new(30, 600);
        for n in 1..=2 {
            let a = t.choose(at(0), key(n), None, &s, &[]).unwrap();
            t.offer(at(0).at, key(n), a);
        }
        assert_eq!(t.choose(at(0), key(3), None, &s, &[]), Some(ip(102)));
        // Client 1 took another server's offer: its address is the lowest free again.
        t.forget_offers(key(1));
        assert_eq!(t.choose(at(0), key(3), None, &s, &[]), Some(ip(100)));
    }

    #[test]
    fn reservations_win_and_are_kept_from_others() {
        let s = subnet();
        let res = [Reservation {
            mac: Some(key(9).mac),
            client_id: None,
            ip: ip(50),
        }];
        let mut t = LeaseTable::new(30, 600);
        assert_eq!(t.choose(at(0), key(9), Some(ip(101)), &s, &res), Some(ip(50)));
        assert_eq!(
            t.bind(at(0), key(1), ip(50), 100, None, &s, &res),
            Err(BindError::NotAllowed)
        );
        let res2 = [Reservation {
            mac: Some(key(9).mac),
            client_id: None,
            ip: ip(100),
        }];
        assert_eq!(t.choose(at(0), key(1), None, &s, &res2), Some(ip(101)));
    }

    #[test]
    fn decline_quarantines() {
        let s = subnet();
        let mut t = LeaseTable::new(30, 600);
        t.bind(at(0), key(1), ip(100), 100, None, &s, &[]).unwrap();
        assert!(t.decline(at(5), key(2), ip(100)).is_none());
        let d = t.decline(at(5), key(1), ip(100)).unwrap();
        assert_eq!(d.state, LeaseState::Declined);
        assert_eq!(t.choose(at(10), key(1), None, &s, &[]), Some(ip(101)));
        assert_eq!(t.choose(at(606), key(3), None, &s, &[]), Some(ip(101)));
        t.bind(at(606), key(3), ip(101), 100, None, &s, &[]).unwrap();
        assert_eq!(t.choose(at(606), key(4), None, &s, &[]), Some(ip(102)));
        t.bind(at(606), key(4), ip(102), 100, None, &s, &[]).unwrap();
        assert_eq!(t.choose(at(606), key(5), None, &s, &[]), Some(ip(100)));
    }

    #[test]
    fn renewal_keeps_hostname() {
        let s = subnet();
        let mut t = LeaseTable::new(30, 600);
        t.bind(at(0), key(1), ip(100), 100, Some("node1".into()), &s, &[])
            .unwrap();
        let b = t.bind(at(50), key(1), ip(100), 100, None, &s, &[]).unwrap();
        assert_eq!(b.lease.hostname.as_deref(), Some("node1"));
        assert_eq!(b.lease.expires_at, 150);
    }

    #[test]
    fn client_id_distinguishes_clients_on_one_mac() {
        let s = subnet();
        let mut t = LeaseTable::new(30, 600);
        let a = ClientKey {
            mac: key(1).mac,
            client_id: Some(b"a"),
        };
        let b = ClientKey {
            mac: key(1).mac,
            client_id: Some(b"b"),
        };
        t.bind(at(0), a, ip(100), 100, None, &s, &[]).unwrap();
        assert_eq!(t.choose(at(0), b, None, &s, &[]), Some(ip(101)));
        let bound = t.bind(at(0), a, ip(102), 100, None, &s, &[]).unwrap();
        assert_eq!(bound.replaced, [ip(100)]);
    }
}

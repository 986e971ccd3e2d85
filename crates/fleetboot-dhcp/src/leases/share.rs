//! Several servers allocating from one pool (a shared store decides who wins an address):
//! each takes new addresses from its own share of every range first, so two servers do
//! not race for the same never-used address. The share is a residue class — addresses
//! `start + slot, start + slot + of, ...` — so every server's share spans the whole range
//! and a server whose share is used up (or whose peers are gone) falls back to any free
//! address. A share only orders the search; whether an address may be bound is decided
//! as without one (and, among servers, by the store).

use super::LeaseTable;
use std::net::Ipv4Addr;

/// This server's share: slot `slot` of `of` (the server's index among the live servers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub slot: u32,
    pub of: u32,
}

impl Share {
    /// `None` for a server alone (its share is everything).
    pub fn new(slot: u32, of: u32) -> Option<Share> {
        (of > 1 && slot < of).then_some(Share { slot, of })
    }
}

impl LeaseTable {
    /// Sets (or clears) this server's share of the pool.
    pub fn set_share(&mut self, share: Option<Share>) {
        if self.share != share {
            self.share = share;
            self.share_from.set(None);
        }
    }

    pub fn share(&self) -> Option<Share> {
        self.share
    }

    /// `ip` may be free again: the search of the share must look at it.
    pub(super) fn lower_share_from(&self, ip: Ipv4Addr) {
        if let Some((start, from)) = self.share_from.get() {
            if u32::from(ip) < from {
                self.share_from.set(Some((start, u32::from(ip).max(start))));
            }
        }
    }

    /// The lowest address of this server's share in `start..=end` with no lease record
    /// that `usable` accepts; `None` without a share or when the share is used up. Like
    /// the search of the whole range it skips, for good, the prefix of the share that is
    /// leased or offered (lowered when a record or an offer is dropped).
    pub(super) fn never_used_in_share(&self, start: u32, end: u32, usable: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
        let share = self.share?;
        let first_of_share = |from: u32| -> u64 {
            // The first address >= from whose offset from start is ≡ slot (mod of).
            let off = from.saturating_sub(start) as u64;
            let (of, slot) = (share.of as u64, share.slot as u64);
            let base = off - off % of + slot;
            start as u64 + if base >= off { base } else { base + of }
        };
        let mut from = match self.share_from.get() {
            Some((s, from)) if s == start => first_of_share(from),
            _ => first_of_share(start),
        };
        let taken = |a: u64| {
            let ip = Ipv4Addr::from(a as u32);
            self.leases.contains_key(&ip) || self.offers.contains_key(&ip)
        };
        while from <= end as u64 && taken(from) {
            from += share.of as u64;
        }
        self.share_from.set(Some((start, from.min(u32::MAX as u64) as u32)));
        let free = |a: u64| {
            let ip = Ipv4Addr::from(a as u32);
            !self.leases.contains_key(&ip) && usable(ip)
        };
        let mut a = from;
        while a <= end as u64 {
            if free(a) {
                return Some(Ipv4Addr::from(a as u32));
            }
            a += share.of as u64;
        }
        // An offer in the skipped prefix may have expired unswept: look below too.
        let mut a = first_of_share(start);
        while a < from.min(end as u64 + 1) {
            if free(a) {
                return Some(Ipv4Addr::from(a as u32));
            }
            a += share.of as u64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Subnet;
    use crate::leases::{ClientKey, Now};
    use fleetboot_boot::MacAddr;
    use std::sync::OnceLock;
    use std::time::Instant;

    fn now() -> Now {
        static BASE: OnceLock<Instant> = OnceLock::new();
        Now { at: *BASE.get_or_init(Instant::now), unix: 0 }
    }

    fn subnet() -> Subnet {
        Subnet {
            network: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
            range_start: Ipv4Addr::new(10, 0, 0, 100),
            range_end: Ipv4Addr::new(10, 0, 0, 109),
            router: None,
            dns: vec![],
            domain: None,
            lease_time: 100,
        }
    }

    fn key(n: u8) -> ClientKey<'static> {
        ClientKey { mac: MacAddr([2, 0, 0, 0, 1, n]), client_id: None }
    }

    #[test]
    fn two_servers_take_disjoint_addresses_until_one_share_runs_out() {
        let s = subnet();
        let mut a = LeaseTable::new(30, 600);
        let mut b = LeaseTable::new(30, 600);
        a.set_share(Share::new(0, 2));
        b.set_share(Share::new(1, 2));
        let mut got_a = Vec::new();
        let mut got_b = Vec::new();
        for n in 0..5 {
            let ip = a.choose(now(), key(n), None, &s, &[]).unwrap();
            a.offer(now().at, key(n), ip);
            got_a.push(ip.octets()[3]);
            let ip = b.choose(now(), key(100 + n), None, &s, &[]).unwrap();
            b.offer(now().at, key(100 + n), ip);
            got_b.push(ip.octets()[3]);
        }
        assert_eq!(got_a, [100, 102, 104, 106, 108]);
        assert_eq!(got_b, [101, 103, 105, 107, 109]);
        // A's share is used up: it takes what is free elsewhere (B's addresses it knows
        // nothing of here), the store deciding between them.
        assert_eq!(a.choose(now(), key(50), None, &s, &[]), Some(Ipv4Addr::new(10, 0, 0, 101)));
        // A dropped offer is found again in the share.
        a.forget_offers(key(1));
        assert_eq!(a.choose(now(), key(51), None, &s, &[]), Some(Ipv4Addr::new(10, 0, 0, 102)));
        // Alone again: the whole range, lowest first.
        a.set_share(Share::new(0, 1));
        assert_eq!(a.share(), None);
        assert_eq!(a.choose(now(), key(52), None, &s, &[]), Some(Ipv4Addr::new(10, 0, 0, 101)));
    }

    #[test]
    fn the_share_of_a_range_not_starting_at_zero_offset_is_aligned_to_the_range() {
        let mut t = LeaseTable::new(30, 600);
        t.set_share(Share::new(2, 3));
        let s = subnet();
        assert_eq!(t.choose(now(), key(1), None, &s, &[]), Some(Ipv4Addr::new(10, 0, 0, 102)));
        t.offer(now().at, key(1), Ipv4Addr::new(10, 0, 0, 102));
        assert_eq!(t.choose(now(), key(2), None, &s, &[]), Some(Ipv4Addr::new(10, 0, 0, 105)));
    }
}

use crate::Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How a link treats datagrams. Probabilities in parts per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Datagrams that vanish.
    pub loss_ppm: u32,
    /// Datagrams that arrive twice (each copy with its own delay).
    pub duplicate_ppm: u32,
    /// Every datagram's base one-way delay.
    pub delay: Duration,
    /// Uniform extra delay in `[0, jitter]` on every datagram (reorders close sends).
    pub jitter: Duration,
    /// Datagrams held back by an extra uniform `[0, reorder_delay]`.
    pub reorder_ppm: u32,
    pub reorder_delay: Duration,
}

impl LinkConfig {
    /// No loss, no duplicates, no reordering, 500 µs one way.
    pub const PERFECT: LinkConfig = LinkConfig {
        loss_ppm: 0,
        duplicate_ppm: 0,
        delay: Duration::from_micros(500),
        jitter: Duration::ZERO,
        reorder_ppm: 0,
        reorder_delay: Duration::ZERO,
    };

    /// 500 µs one way with the given loss, duplication and reordering (held back by up to
    /// 3 ms), in per mille: what the TFTP and negotiation simulations call a lossy link.
    pub fn lossy(loss_per_mille: u32, duplicate_per_mille: u32, reorder_per_mille: u32) -> LinkConfig {
        LinkConfig {
            loss_ppm: loss_per_mille * 1000,
            duplicate_ppm: duplicate_per_mille * 1000,
            reorder_ppm: reorder_per_mille * 1000,
            reorder_delay: Duration::from_millis(3),
            ..LinkConfig::PERFECT
        }
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig::PERFECT
    }
}

/// A datagram in flight or delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// When it arrives.
    pub at: Instant,
    pub from: SocketAddr,
    /// The address it was sent to (a group's address for a group member's copy).
    pub to: SocketAddr,
    /// The host that receives it: `to`'s address, or the group member.
    pub host: IpAddr,
    pub bytes: Vec<u8>,
}

/// Counts for assertions (never times).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// `send` calls.
    pub sent: u64,
    /// Copies put in flight (a group send makes one per member, duplicates add one).
    pub in_flight_total: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Copies dropped because their source or destination host was down.
    pub dropped_down: u64,
    /// Copies handed out by [`Network::pop_due`].
    pub delivered: u64,
}

/// An in-memory network with seeded loss, duplication, delay and reordering.
///
/// A destination with members ([`Network::join`]) is a group: every member other than
/// the sender gets its own copy, lost or delayed independently (multicast, or a broadcast
/// address with the hosts of a link as members). Anything else is unicast to `to`'s host.
/// Copies arrive in order of arrival time, and in send order among equal times.
#[derive(Debug)]
pub struct Network {
    rng: Rng,
    link: LinkConfig,
    per_host: HashMap<IpAddr, LinkConfig>,
    groups: BTreeMap<SocketAddr, BTreeSet<IpAddr>>,
    down: BTreeSet<IpAddr>,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    flying: HashMap<u64, Datagram>,
    stats: NetStats,
}

impl Network {
    pub fn new(rng: Rng, link: LinkConfig) -> Network {
        Network {
            rng,
            link,
            per_host: HashMap::new(),
            groups: BTreeMap::new(),
            down: BTreeSet::new(),
            seq: 0,
            queue: BinaryHeap::new(),
            flying: HashMap::new(),
            stats: NetStats::default(),
        }
    }

    /// The link settings for everything sent to `host` (both directions keep their own
    /// settings: set the sender's host for the way back).
    pub fn set_link(&mut self, host: IpAddr, link: LinkConfig) {
        self.per_host.insert(host, link);
    }

    /// The default link settings.
    pub fn set_default_link(&mut self, link: LinkConfig) {
        self.link = link;
    }

    /// `member` hears what is sent to `group` from now on.
    pub fn join(&mut self, group: SocketAddr, member: IpAddr) {
        self.groups.entry(group).or_default().insert(member);
    }

    pub fn leave(&mut self, group: SocketAddr, member: IpAddr) {
        if let Some(m) = self.groups.get_mut(&group) {
            m.remove(&member);
        }
    }

    /// A host that is down neither sends nor receives (what is in flight to it is
    /// dropped on arrival) until it is up again.
    pub fn set_down(&mut self, host: IpAddr, down: bool) {
        if down {
            self.down.insert(host);
        } else {
            self.down.remove(&host);
        }
    }

    pub fn is_down(&self, host: IpAddr) -> bool {
        self.down.contains(&host)
    }

    /// Sends `bytes` from `from` to `to` at `now`.
    pub fn send(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        self.stats.sent += 1;
        if self.down.contains(&from.ip()) {
            self.stats.dropped_down += 1;
            return;
        }
        let hosts: Vec<IpAddr> = match self.groups.get(&to) {
            Some(members) => members.iter().copied().filter(|m| *m != from.ip()).collect(),
            None => vec![to.ip()],
        };
        for host in hosts {
            let link = self.per_host.get(&host).copied().unwrap_or(self.link);
            if self.rng.chance_ppm(link.loss_ppm) {
                self.stats.lost += 1;
                continue;
            }
            let copies = if self.rng.chance_ppm(link.duplicate_ppm) {
                self.stats.duplicated += 1;
                2
            } else {
                1
            };
            for _ in 0..copies {
                let mut delay = link.delay + self.rng.duration_up_to(link.jitter);
                if self.rng.chance_ppm(link.reorder_ppm) {
                    delay += self.rng.duration_up_to(link.reorder_delay);
                }
                self.seq += 1;
                let at = now + delay;
                self.queue.push(Reverse((at, self.seq)));
                self.flying.insert(self.seq, Datagram { at, from, to, host, bytes: bytes.to_vec() });
                self.stats.in_flight_total += 1;
            }
        }
    }

    /// When the next copy arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((t, _))| *t)
    }

    /// The next copy due at or before `now`, if any (copies for hosts that are down are
    /// dropped on the way).
    pub fn pop_due(&mut self, now: Instant) -> Option<Datagram> {
        while let Some(&Reverse((t, seq))) = self.queue.peek() {
            if t > now {
                return None;
            }
            self.queue.pop();
            let d = self.flying.remove(&seq).expect("queued datagrams are flying");
            if self.down.contains(&d.host) {
                self.stats.dropped_down += 1;
                continue;
            }
            self.stats.delivered += 1;
            return Some(d);
        }
        None
    }

    /// Copies in flight.
    pub fn in_flight(&self) -> usize {
        self.flying.len()
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn perfect_link_delivers_in_send_order_after_the_delay() {
        let t0 = Instant::now();
        let mut n = Network::new(Rng::new(1), LinkConfig::PERFECT);
        for i in 0..5u8 {
            n.send(t0, a("10.0.0.1:1"), a("10.0.0.2:2"), &[i]);
        }
        assert_eq!(n.next_arrival(), Some(t0 + Duration::from_micros(500)));
        assert!(n.pop_due(t0).is_none());
        let got: Vec<u8> = std::iter::from_fn(|| n.pop_due(t0 + Duration::from_millis(1))).map(|d| d.bytes[0]).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(n.stats().delivered, 5);
    }

    #[test]
    fn loss_and_duplicates_follow_the_seed() {
        let t0 = Instant::now();
        let run = |seed| {
            let mut n = Network::new(Rng::new(seed), LinkConfig::lossy(100, 100, 100));
            for i in 0..10_000u32 {
                n.send(t0, a("10.0.0.1:1"), a("10.0.0.2:2"), &i.to_be_bytes());
            }
            let order: Vec<Vec<u8>> = std::iter::from_fn(|| n.pop_due(t0 + Duration::from_secs(1))).map(|d| d.bytes).collect();
            (n.stats(), order)
        };
        let (s, order) = run(5);
        assert_eq!(run(5).1, order, "same seed, same run");
        assert!((800..1200).contains(&s.lost), "{s:?}");
        assert!((700..1100).contains(&s.duplicated), "{s:?}");
        assert_eq!(s.delivered, s.in_flight_total);
        assert_eq!(s.in_flight_total, 10_000 - s.lost + s.duplicated);
        let sorted = {
            let mut o = order.clone();
            o.sort();
            o
        };
        assert_ne!(order, sorted, "some datagrams were reordered");
    }

    #[test]
    fn groups_fan_out_per_member_and_down_hosts_hear_nothing() {
        let t0 = Instant::now();
        let mut n = Network::new(Rng::new(1), LinkConfig::PERFECT);
        let g = a("239.1.1.1:1758");
        for m in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            n.join(g, m.parse().unwrap());
        }
        n.set_down("10.0.0.3".parse().unwrap(), true);
        n.set_link("10.0.0.2".parse().unwrap(), LinkConfig { loss_ppm: 1_000_000, ..LinkConfig::PERFECT });
        n.send(t0, a("10.0.0.1:5"), g, b"x");
        let later = t0 + Duration::from_secs(1);
        let hosts: Vec<IpAddr> = std::iter::from_fn(|| n.pop_due(later)).map(|d| d.host).collect();
        assert!(hosts.is_empty(), "the sender hears nothing, .2 lost it, .3 is down: {hosts:?}");
        assert_eq!((n.stats().lost, n.stats().dropped_down), (1, 1));
        n.set_down("10.0.0.3".parse().unwrap(), false);
        n.leave(g, "10.0.0.2".parse().unwrap());
        n.send(t0, a("10.0.0.1:5"), g, b"y");
        let d = n.pop_due(later).unwrap();
        assert_eq!((d.host, d.to), ("10.0.0.3".parse().unwrap(), g));
    }
}

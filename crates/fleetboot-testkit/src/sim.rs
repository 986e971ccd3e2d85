use crate::{Network, SimClock};
use fleetboot_proto::Transmit;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A participant of a simulation: one or more machines behind the sockets of one host.
/// The adapter a test writes around its machines.
pub trait Node {
    /// A datagram arrived for `to` (one of this node's hosts, or a group it joined).
    fn handle(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, bytes: &[u8]);
    /// The time from [`Node::poll_timeout`] was reached (called with `now` ≥ it).
    fn handle_timeout(&mut self, now: Instant);
    /// When the node next needs [`Node::handle_timeout`].
    fn poll_timeout(&self) -> Option<Instant>;
    /// The next datagram, appended to `buf`, and the local socket address it leaves from.
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)>;
}

/// What one [`Sim::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A datagram was handed to this node.
    Delivered(usize),
    /// A datagram arrived for a host no node has (or a node that is gone).
    Unroutable,
    /// This node's timer fired.
    Timer(usize),
    /// Nothing in flight and no timer armed.
    Idle,
}

/// Why a run stopped before its condition held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    /// Nothing in flight, no timer armed, and the condition still false.
    Idle { steps: u64, at: Duration },
    /// The step budget ran out (a livelock, or a budget too small).
    StepLimit { steps: u64, at: Duration },
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimError::Idle { steps, at } => write!(f, "simulation went idle after {steps} steps at {at:?}"),
            SimError::StepLimit { steps, at } => write!(f, "simulation hit its step limit ({steps}) at {at:?}"),
        }
    }
}

impl std::error::Error for SimError {}

/// Runs nodes over a [`Network`] in simulated time: after every delivery or timer, the
/// nodes it touched are drained of their transmits, then time jumps to the next arrival
/// or timer. Arrivals come before timers due at the same instant.
pub struct Sim<N> {
    pub clock: SimClock,
    pub net: Network,
    nodes: Vec<N>,
    hosts: HashMap<IpAddr, usize>,
    /// (deadline, node) for each node's armed timer; stale entries are skipped.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    armed: Vec<Option<Instant>>,
    dirty: Vec<usize>,
    is_dirty: Vec<bool>,
    buf: Vec<u8>,
    steps: u64,
    /// Datagrams each node sent.
    pub sent_by: Vec<u64>,
}

impl<N: Node> Sim<N> {
    pub fn new(clock: SimClock, net: Network) -> Sim<N> {
        Sim {
            clock,
            net,
            nodes: Vec::new(),
            hosts: HashMap::new(),
            timers: BinaryHeap::new(),
            armed: Vec::new(),
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            buf: Vec::with_capacity(70_000),
            steps: 0,
            sent_by: Vec::new(),
        }
    }

    /// Adds a node that receives what is sent to any of `hosts` (and to the groups the
    /// network has those hosts join). Returns its index.
    pub fn add(&mut self, node: N, hosts: &[IpAddr]) -> usize {
        let i = self.nodes.len();
        self.nodes.push(node);
        self.armed.push(None);
        self.is_dirty.push(false);
        self.sent_by.push(0);
        for h in hosts {
            self.hosts.insert(*h, i);
        }
        self.touch(i);
        i
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    pub fn node(&self, i: usize) -> &N {
        &self.nodes[i]
    }

    /// The node, to poke it (a client that starts a request, say); it is drained of its
    /// transmits and its timer re-read at the next step.
    pub fn node_mut(&mut self, i: usize) -> &mut N {
        self.touch(i);
        &mut self.nodes[i]
    }

    pub fn nodes(&self) -> &[N] {
        &self.nodes
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn touch(&mut self, i: usize) {
        if !self.is_dirty[i] {
            self.is_dirty[i] = true;
            self.dirty.push(i);
        }
    }

    /// Drains every touched node's transmits into the network and re-arms its timer.
    fn flush(&mut self) {
        let now = self.clock.now();
        while let Some(i) = self.dirty.pop() {
            self.is_dirty[i] = false;
            loop {
                self.buf.clear();
                let Some((from, t)) = self.nodes[i].poll_transmit(now, &mut self.buf) else { break };
                let start = self.buf.len() - t.size.min(self.buf.len());
                self.sent_by[i] += 1;
                self.net.send(now, from, t.destination, &self.buf[start..]);
            }
            let t = self.nodes[i].poll_timeout();
            if t != self.armed[i] {
                self.armed[i] = t;
                if let Some(t) = t {
                    self.timers.push(Reverse((t, i)));
                }
            }
        }
    }

    fn next_timer(&mut self) -> Option<(Instant, usize)> {
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if self.armed[i] == Some(t) {
                return Some((t, i));
            }
            self.timers.pop();
        }
        None
    }

    /// When the next event happens, if any.
    pub fn next_event(&mut self) -> Option<Instant> {
        self.flush();
        let timer = self.next_timer().map(|(t, _)| t);
        match (self.net.next_arrival(), timer) {
            (Some(a), Some(t)) => Some(a.min(t)),
            (a, t) => a.or(t),
        }
    }

    /// Handles the next event (a delivery or a timer), moving the clock to it.
    pub fn step(&mut self) -> Step {
        self.flush();
        let arrival = self.net.next_arrival();
        let timer = self.next_timer();
        let take_arrival = match (arrival, timer) {
            (None, None) => return Step::Idle,
            (Some(a), Some((t, _))) => a <= t,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        self.steps += 1;
        if take_arrival {
            self.clock.advance_to(arrival.expect("checked"));
            let now = self.clock.now();
            let Some(d) = self.net.pop_due(now) else { return Step::Unroutable };
            let Some(&i) = self.hosts.get(&d.host) else { return Step::Unroutable };
            self.nodes[i].handle(now, d.from, d.to, &d.bytes);
            self.touch(i);
            Step::Delivered(i)
        } else {
            let (t, i) = timer.expect("checked");
            self.timers.pop();
            self.armed[i] = None;
            self.clock.advance_to(t);
            let now = self.clock.now();
            self.nodes[i].handle_timeout(now);
            self.touch(i);
            Step::Timer(i)
        }
    }

    /// Steps until `done` holds (checked before every step), at most `max_steps` steps.
    pub fn run_until(&mut self, max_steps: u64, mut done: impl FnMut(&Sim<N>) -> bool) -> Result<u64, SimError> {
        let start = self.steps;
        loop {
            self.flush();
            if done(self) {
                return Ok(self.steps - start);
            }
            if self.steps - start >= max_steps {
                return Err(SimError::StepLimit { steps: self.steps - start, at: self.clock.elapsed() });
            }
            if self.step() == Step::Idle {
                return Err(SimError::Idle { steps: self.steps - start, at: self.clock.elapsed() });
            }
        }
    }

    /// Handles every event up to `now + d`, then leaves the clock there.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.clock.now() + d;
        while self.next_event().is_some_and(|t| t <= end) {
            self.step();
        }
        self.clock.advance_to(end);
    }

    /// Jumps the clock forward by `d` without handling anything on the way: timers and
    /// arrivals that fell due are handled late, at the new time (a suspended host, a
    /// stalled process).
    pub fn jump(&mut self, d: Duration) {
        self.flush();
        self.clock.advance(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LinkConfig, Rng};

    /// Sends `count` numbered pings to its peer, one per `every`, and counts echoes; the
    /// echo side answers each ping once.
    struct Pinger {
        me: SocketAddr,
        peer: SocketAddr,
        every: Duration,
        next: Option<Instant>,
        due: bool,
        left: u32,
        echoes: u32,
        pending_echo: Vec<(SocketAddr, Vec<u8>)>,
    }

    impl Node for Pinger {
        fn handle(&mut self, _now: Instant, from: SocketAddr, _to: SocketAddr, bytes: &[u8]) {
            if bytes.first() == Some(&b'p') {
                let mut e = bytes.to_vec();
                e[0] = b'e';
                self.pending_echo.push((from, e));
            } else {
                self.echoes += 1;
            }
        }
        fn handle_timeout(&mut self, now: Instant) {
            if self.next.is_some_and(|t| t <= now) {
                self.due = true;
                self.left -= 1;
                self.next = (self.left > 0).then(|| now + self.every);
            }
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.next
        }
        fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
            if let Some((to, e)) = self.pending_echo.pop() {
                return Some((self.me, fleetboot_proto::append(buf, to, |b| b.extend_from_slice(&e))));
            }
            if std::mem::take(&mut self.due) {
                let n = self.left;
                return Some((self.me, fleetboot_proto::append(buf, self.peer, |b| {
                    b.push(b'p');
                    b.extend_from_slice(&n.to_be_bytes())
                })));
            }
            None
        }
    }

    fn pinger(me: &str, peer: &str, start: Option<Instant>, left: u32) -> Pinger {
        Pinger {
            me: me.parse().unwrap(),
            peer: peer.parse().unwrap(),
            every: Duration::from_secs(1),
            next: start,
            due: false,
            left,
            echoes: 0,
            pending_echo: Vec::new(),
        }
    }

    #[test]
    fn time_jumps_to_events_and_counts_add_up() {
        let clock = SimClock::new();
        let t0 = clock.now();
        let mut sim = Sim::new(clock, Network::new(Rng::new(1), LinkConfig::PERFECT));
        let a = sim.add(pinger("10.0.0.1:7", "10.0.0.2:7", Some(t0), 10), &["10.0.0.1".parse().unwrap()]);
        let b = sim.add(pinger("10.0.0.2:7", "10.0.0.1:7", None, 0), &["10.0.0.2".parse().unwrap()]);
        let steps = sim.run_until(1_000, |s| s.node(a).echoes == 10).unwrap();
        // 10 timers + 10 pings delivered + 10 echoes delivered.
        assert_eq!(steps, 30);
        assert_eq!(sim.sent_by, vec![10, 10]);
        // Nine seconds between the first and the last ping, then one round trip.
        assert_eq!(sim.clock.elapsed(), Duration::from_secs(9) + Duration::from_millis(1));
        assert_eq!(sim.node(b).echoes, 0);
        assert_eq!(sim.run_until(10, |_| false), Err(SimError::Idle { steps: 0, at: sim.clock.elapsed() }));
    }

    #[test]
    fn a_jump_fires_overdue_timers_late_and_lossy_runs_replay() {
        let run = |seed| {
            let clock = SimClock::new();
            let t0 = clock.now();
            let mut sim = Sim::new(clock, Network::new(Rng::new(seed), LinkConfig::lossy(200, 50, 50)));
            let a = sim.add(pinger("10.0.0.1:7", "10.0.0.2:7", Some(t0), 100), &["10.0.0.1".parse().unwrap()]);
            sim.add(pinger("10.0.0.2:7", "10.0.0.1:7", None, 0), &["10.0.0.2".parse().unwrap()]);
            sim.run_for(Duration::from_millis(4500));
            let before = sim.node(a).left;
            sim.jump(Duration::from_secs(30));
            sim.step();
            assert_eq!(sim.node(a).left, before - 1, "one overdue timer, handled once, late");
            let _ = sim.run_until(100_000, |s| s.node(a).left == 0 && s.net.in_flight() == 0);
            (sim.node(a).echoes, sim.net.stats())
        };
        let (echoes, stats) = run(3);
        assert_eq!(run(3), (echoes, stats));
        assert!(echoes < 100 && stats.lost > 0);
    }
}

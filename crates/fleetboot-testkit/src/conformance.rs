//! Checks that a machine keeps the `fleetboot_proto` contract, for a machine's own tests:
//!
//! - `poll_transmit` appends exactly `size` bytes and never touches what was already in
//!   the buffer ([`drain_checked`]);
//! - after `handle_timeout(now)` and draining, the machine does not ask for a timer at or
//!   before `now` (a shell would spin);
//! - arbitrary bytes, and truncated copies of what it sends itself, never make it panic.
//!
//! [`check`] runs all three on a [`Node`].

use crate::{Node, Rng};
use fleetboot_proto::Transmit;
use std::net::SocketAddr;
use std::time::Instant;

/// Bytes put in the buffer before each call, to catch a machine that clears or rewrites.
const SENTINEL: &[u8] = b"\xA5fleetboot-sentinel\x5A";

/// Calls `poll` until it returns `None` (at most `max` times, then panics: a machine that
/// never stops transmitting), checking each call against the contract. Returns the
/// datagrams with their bytes.
pub fn drain_checked<T>(max: usize, mut poll: impl FnMut(&mut Vec<u8>) -> Option<(T, Transmit)>) -> Vec<(T, Transmit, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        buf.extend_from_slice(SENTINEL);
        let Some((extra, t)) = poll(&mut buf) else {
            assert!(buf.starts_with(SENTINEL) && buf.len() == SENTINEL.len(), "poll_transmit returned None but changed the buffer");
            return out;
        };
        assert!(buf.starts_with(SENTINEL), "poll_transmit changed bytes that were already in the buffer");
        assert_eq!(buf.len() - SENTINEL.len(), t.size, "poll_transmit appended {} bytes but its Transmit says {}", buf.len() - SENTINEL.len(), t.size);
        out.push((extra, t, buf[SENTINEL.len()..].to_vec()));
        assert!(out.len() <= max, "poll_transmit did not stop after {max} datagrams");
    }
}

/// What [`check`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checked {
    pub datagrams: usize,
    pub timeouts: usize,
    pub fuzzed: usize,
}

/// Runs the contract checks on `node` at `now`: drains it, fires its timer if due, then
/// feeds it `rounds` hostile datagrams for `to` (random bytes, and truncated or bit-flipped
/// copies of what it sent), half of them from one of `peers` (the addresses it talks to,
/// so they get past its source checks) and half from strangers, draining after each.
pub fn check<N: Node>(node: &mut N, now: Instant, to: SocketAddr, peers: &[SocketAddr], rng: &mut Rng, rounds: usize) -> Checked {
    let mut c = Checked::default();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let drain = |node: &mut N, seen: &mut Vec<Vec<u8>>, c: &mut Checked| {
        for (_, _, bytes) in drain_checked(100_000, |b| node.poll_transmit(now, b)) {
            c.datagrams += 1;
            if seen.len() < 64 {
                seen.push(bytes);
            }
        }
    };
    drain(node, &mut seen, &mut c);
    if node.poll_timeout().is_some_and(|t| t <= now) {
        node.handle_timeout(now);
        c.timeouts += 1;
        drain(node, &mut seen, &mut c);
        if let Some(t) = node.poll_timeout() {
            assert!(t > now, "after handle_timeout({now:?}) the machine still asks for a timer at {t:?}");
        }
    }
    for _ in 0..rounds {
        let mut bytes = match (rng.below(3), seen.is_empty()) {
            (0, false) | (1, false) => seen[rng.below(seen.len() as u64) as usize].clone(),
            _ => {
                let n = rng.below(600) as usize;
                rng.bytes(n)
            }
        };
        if !bytes.is_empty() {
            match rng.below(3) {
                0 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                1 => {
                    let i = rng.below(bytes.len() as u64) as usize;
                    bytes[i] ^= 1 << rng.below(8);
                }
                _ => {}
            }
        }
        let from = if !peers.is_empty() && rng.below(2) == 0 {
            peers[rng.below(peers.len() as u64) as usize]
        } else {
            SocketAddr::from(([10, rng.below(4) as u8, 0, 1 + rng.below(4) as u8], 1000 + rng.below(4) as u16))
        };
        node.handle(now, from, to, &bytes);
        c.fuzzed += 1;
        drain(node, &mut seen, &mut c);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Echo {
        me: SocketAddr,
        queue: Vec<(SocketAddr, Vec<u8>)>,
        timer: Option<Instant>,
        clears: bool,
    }

    impl Node for Echo {
        fn handle(&mut self, _: Instant, from: SocketAddr, _: SocketAddr, bytes: &[u8]) {
            self.queue.push((from, bytes.to_vec()));
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.timer = Some(now + Duration::from_secs(1));
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.timer
        }
        fn poll_transmit(&mut self, _: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
            let (to, b) = self.queue.pop()?;
            if self.clears {
                buf.clear();
            }
            Some((self.me, fleetboot_proto::append(buf, to, |x| x.extend_from_slice(&b))))
        }
    }

    #[test]
    fn a_conforming_machine_passes() {
        let now = Instant::now();
        let me: SocketAddr = "10.9.0.1:69".parse().unwrap();
        let mut e = Echo { me, queue: vec![(me, b"hi".to_vec())], timer: Some(now), clears: false };
        let c = check(&mut e, now, me, &[me], &mut Rng::new(1), 50);
        assert_eq!(c, Checked { datagrams: 51, timeouts: 1, fuzzed: 50 });
    }

    #[test]
    #[should_panic(expected = "already in the buffer")]
    fn a_machine_that_clears_the_buffer_fails() {
        let now = Instant::now();
        let me: SocketAddr = "10.9.0.1:69".parse().unwrap();
        let mut e = Echo { me, queue: vec![(me, b"hi".to_vec())], timer: None, clears: true };
        check(&mut e, now, me, &[], &mut Rng::new(1), 0);
    }
}

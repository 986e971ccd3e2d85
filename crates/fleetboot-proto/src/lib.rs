//! The one contract between fleetboot's sans-I/O protocol machines and the shells that give
//! them sockets and a clock (the full text is in `docs/ARCHITECTURE.md`, "The state-machine
//! contract"; this crate holds the one type it needs and two helpers).
//!
//! A machine has, with these exact shapes:
//!
//! ```text
//! fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]);
//! fn handle_timeout(&mut self, now: Instant);
//! fn poll_timeout(&self) -> Option<Instant>;
//! fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit>;
//! fn poll_event(&mut self) -> Option<Event>;          // when it has anything to report
//! ```
//!
//! `poll_transmit` **appends** one datagram to `buf` and says where it goes; it never
//! clears or rewrites what is already there. A shell can therefore gather a whole window
//! into one buffer and hand it to one `sendmmsg(2)` (`fleetboot_net::Outbox` does exactly
//! that). A machine that reads file data takes its data source as one extra argument,
//! `poll_transmit(now, source, buf)`; that is the only allowed variation.
//!
//! There is deliberately no trait: the data source, the event type and the machines' own
//! accessors differ, and a shell always knows the concrete machine it drives. Simulations
//! drive machines through `fleetboot_testkit::Node`, a small adapter each test writes.
//!
//! ```
//! use fleetboot_proto::{append, datagrams, Transmit};
//! use std::net::SocketAddr;
//!
//! let to: SocketAddr = "192.0.2.7:69".parse().unwrap();
//! let mut buf = Vec::new();
//! let mut sent = Vec::new();
//! for word in ["one", "two"] {
//!     sent.push(append(&mut buf, to, |b| b.extend_from_slice(word.as_bytes())));
//! }
//! let got: Vec<(&Transmit, &[u8])> = datagrams(&buf, &sent).collect();
//! assert_eq!(got[1].1, b"two");
//! assert_eq!(got[1].0.destination, to);
//! ```

use std::net::{IpAddr, SocketAddr};

/// One datagram a machine wants sent: the last `size` bytes it appended to the caller's
/// buffer go to `destination`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transmit {
    /// Where the datagram goes: a unicast peer, a broadcast address or a multicast group.
    pub destination: SocketAddr,
    /// The local address to send it from, when it matters (reply-from: a host with several
    /// addresses answers from the one it was asked on). `None` leaves it to the socket's
    /// binding and routing.
    pub source: Option<IpAddr>,
    /// Bytes appended to the buffer for this datagram.
    pub size: usize,
}

impl Transmit {
    /// A datagram of `size` bytes to `destination`, source left to the socket.
    pub fn new(destination: SocketAddr, size: usize) -> Transmit {
        Transmit { destination, source: None, size }
    }

    /// The same datagram, sent from `source`.
    pub fn from_source(self, source: Option<IpAddr>) -> Transmit {
        Transmit { source, ..self }
    }
}

/// Appends one datagram written by `encode` to `buf` and describes it: the usual last
/// line of a `poll_transmit`.
pub fn append(buf: &mut Vec<u8>, destination: SocketAddr, encode: impl FnOnce(&mut Vec<u8>)) -> Transmit {
    let start = buf.len();
    encode(buf);
    Transmit::new(destination, buf.len() - start)
}

/// Walks a buffer filled by successive `poll_transmit` calls, pairing each [`Transmit`]
/// with its bytes. Stops early (without panicking) if the sizes claim more bytes than the
/// buffer holds.
pub fn datagrams<'a>(buf: &'a [u8], transmits: &'a [Transmit]) -> impl Iterator<Item = (&'a Transmit, &'a [u8])> + 'a {
    let mut offset = 0usize;
    transmits.iter().map_while(move |t| {
        let end = offset.checked_add(t.size).filter(|&e| e <= buf.len())?;
        let bytes = &buf[offset..end];
        offset = end;
        Some((t, bytes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_describes_only_the_new_bytes() {
        let to: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mut buf = b"earlier".to_vec();
        let t = append(&mut buf, to, |b| b.extend_from_slice(b"abc"));
        assert_eq!(t, Transmit::new(to, 3));
        assert_eq!(&buf[..7], b"earlier");
        let from: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(t.from_source(Some(from)).source, Some(from));
    }

    #[test]
    fn datagrams_split_a_shared_buffer_and_stop_at_a_lie() {
        let to: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let buf = b"aabbbc".to_vec();
        let ts = [Transmit::new(to, 2), Transmit::new(to, 3), Transmit::new(to, 1), Transmit::new(to, 5)];
        let parts: Vec<&[u8]> = datagrams(&buf, &ts).map(|(_, b)| b).collect();
        assert_eq!(parts, vec![&b"aa"[..], b"bbb", b"c"]);
        let empty: [Transmit; 1] = [Transmit::new(to, 0)];
        assert_eq!(datagrams(&[], &empty).count(), 1);
    }
}

//! Datagrams with their local address (IP_PKTINFO), reply-from, and batches.

use crate::sys::{self, Outgoing, Received, MMSG_BATCH};
use fleetboot_proto::Transmit;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

/// What arrived with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes of the datagram (in the buffer it was received into).
    pub len: usize,
    /// Who sent it.
    pub source: SocketAddr,
    /// The address it was sent to, as the IP header says (a local unicast address, a
    /// broadcast or a multicast group), when the socket asked for pktinfo.
    pub destination: Option<IpAddr>,
    /// The interface it arrived on, when the socket asked for pktinfo.
    pub interface: Option<u32>,
    /// It was larger than the buffer and was cut (drop it).
    pub truncated: bool,
}

impl RecvMeta {
    /// The local address to answer from so the peer sees a reply from the address it
    /// asked: the destination when it is a unicast address of this host; `None` for a
    /// broadcast, multicast or unknown destination, and for an IPv6 link-local one (which
    /// needs its interface), where routing chooses.
    pub fn reply_source(&self) -> Option<IpAddr> {
        match self.destination? {
            IpAddr::V4(a) if a.is_broadcast() || a.is_multicast() || a.is_unspecified() => None,
            IpAddr::V6(a) if a.is_multicast() || a.is_unspecified() || a.is_unicast_link_local() => None,
            a => Some(a),
        }
    }

    fn from_received(r: Received) -> io::Result<RecvMeta> {
        let source = r.source.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without an IP source address"))?;
        Ok(RecvMeta { len: r.len, source, destination: r.info.destination, interface: r.info.interface, truncated: r.truncated })
    }
}

/// Receives one datagram into `buf` with its sender and, on a socket built with
/// `pktinfo(true)`, the local address it was sent to.
pub fn recv_from_to(sock: &impl AsFd, buf: &mut [u8]) -> io::Result<RecvMeta> {
    RecvMeta::from_received(sys::recvmsg(sock.as_fd(), buf)?)
}

/// [`recv_from_to`] on a tokio socket, waiting until a datagram is there.
#[cfg(feature = "tokio")]
pub async fn recv_from_to_async(sock: &tokio::net::UdpSocket, buf: &mut [u8]) -> io::Result<RecvMeta> {
    sock.async_io(tokio::io::Interest::READABLE, || recv_from_to(sock, buf)).await
}

/// Sends one datagram to `to` (`None`: the connected peer) from the local address
/// `source` (`None`: the socket's binding and routing decide).
pub fn send_from(sock: &impl AsFd, bytes: &[u8], to: Option<SocketAddr>, source: Option<IpAddr>) -> io::Result<usize> {
    sys::sendmsg(sock.as_fd(), bytes, to, source)
}

/// [`send_from`] on a tokio socket, waiting while it is full.
#[cfg(feature = "tokio")]
pub async fn send_from_async(sock: &tokio::net::UdpSocket, bytes: &[u8], to: SocketAddr, source: Option<IpAddr>) -> io::Result<usize> {
    sock.async_io(tokio::io::Interest::WRITABLE, || send_from(sock, bytes, Some(to), source)).await
}

/// How an [`Outbox::send`] went. UDP is best effort: a datagram the kernel refused (a
/// destination with a pending ICMP error, say) is counted and skipped, the rest still go.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Datagrams refused and dropped.
    pub failed: usize,
    /// System calls made (`sendmmsg`, or `sendmsg` for a lone datagram).
    pub calls: usize,
    /// The last refusal's error.
    pub last_error: Option<io::Error>,
}

/// Datagrams gathered from `poll_transmit` into one buffer, sent with as few
/// `sendmmsg(2)` calls as the batch allows (32 per call).
///
/// ```no_run
/// # use fleetboot_net::Outbox;
/// # fn poll_transmit(_: &mut Vec<u8>) -> Option<fleetboot_net::Transmit> { None }
/// # let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
/// let mut out = Outbox::new(64);
/// while let Some(t) = poll_transmit(out.buffer()) {
///     out.push(t);
///     if out.is_full() {
///         out.send(&sock)?;
///     }
/// }
/// out.send(&sock)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct Outbox {
    buf: Vec<u8>,
    transmits: Vec<Transmit>,
    /// Bytes of `buf` described by `transmits`.
    end: usize,
    capacity: usize,
}

impl Outbox {
    /// An outbox that reports full at `capacity` datagrams (at least 1).
    pub fn new(capacity: usize) -> Outbox {
        Outbox { buf: Vec::new(), transmits: Vec::with_capacity(capacity.max(1)), end: 0, capacity: capacity.max(1) }
    }

    /// The buffer the next `poll_transmit` appends to.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Records the datagram the last `poll_transmit` appended. A `Transmit` whose size
    /// does not match what was appended breaks the contract: its bytes are dropped (and a
    /// debug build panics).
    pub fn push(&mut self, t: Transmit) {
        if self.end + t.size != self.buf.len() {
            debug_assert!(false, "poll_transmit appended {} bytes but its Transmit says {}", self.buf.len() - self.end, t.size);
            tracing::error!(appended = self.buf.len() - self.end, claimed = t.size, "a machine's Transmit does not match its bytes; dropped");
            self.buf.truncate(self.end);
            return;
        }
        self.end += t.size;
        self.transmits.push(t);
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.transmits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.transmits.is_empty()
    }

    /// Whether it holds `capacity` datagrams (time to send).
    pub fn is_full(&self) -> bool {
        self.transmits.len() >= self.capacity
    }

    /// The datagrams waiting, with their bytes.
    pub fn datagrams(&self) -> impl Iterator<Item = (&Transmit, &[u8])> {
        fleetboot_proto::datagrams(&self.buf, &self.transmits)
    }

    /// Drops everything waiting.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.transmits.clear();
        self.end = 0;
    }

    /// Sends every datagram to its destination (from its source, when it names one). A
    /// refusal (other than a full socket) is counted in the report and skipped. A full
    /// nonblocking socket stops the sending: the datagrams not yet sent stay for the next
    /// call (`is_empty()` says whether any did), and `Err(WouldBlock)` means none went.
    pub fn send(&mut self, sock: &impl AsFd) -> io::Result<SendReport> {
        self.send_inner(sock, None)
    }

    /// [`Outbox::send`] on a socket connected to `peer`: datagrams for `peer` leave
    /// without an address, so the kernel uses the connected route (no route lookup per
    /// datagram); any other destination is still addressed.
    pub fn send_connected(&mut self, sock: &impl AsFd, peer: SocketAddr) -> io::Result<SendReport> {
        self.send_inner(sock, Some(peer))
    }

    /// [`Outbox::send`] on a tokio socket: waits while the socket is full, returns once
    /// every datagram was sent or refused.
    #[cfg(feature = "tokio")]
    pub async fn send_async(&mut self, sock: &tokio::net::UdpSocket) -> io::Result<SendReport> {
        let mut total = SendReport::default();
        while !self.is_empty() {
            let r = sock.async_io(tokio::io::Interest::WRITABLE, || self.send(sock)).await?;
            total.sent += r.sent;
            total.failed += r.failed;
            total.calls += r.calls;
            total.last_error = r.last_error.or(total.last_error);
        }
        Ok(total)
    }

    fn send_inner(&mut self, sock: &impl AsFd, connected: Option<SocketAddr>) -> io::Result<SendReport> {
        let mut report = SendReport::default();
        let mut done = 0usize; // datagrams dealt with
        let mut offset = 0usize; // their bytes
        let result = loop {
            if done == self.transmits.len() {
                break Ok(());
            }
            // On the stack: sending a window costs no allocation.
            let mut batch = [Outgoing { bytes: &[], to: None, source: None }; MMSG_BATCH];
            let mut n = 0;
            let mut o = offset;
            for t in self.transmits[done..].iter().take(MMSG_BATCH) {
                let to = (connected != Some(t.destination)).then_some(t.destination);
                batch[n] = Outgoing { bytes: &self.buf[o..o + t.size], to, source: t.source };
                n += 1;
                o += t.size;
            }
            report.calls += 1;
            // One datagram (a lock-step transfer's every block) takes the plain sendmsg(2).
            let result = if n == 1 {
                let d = batch[0];
                sys::sendmsg(sock.as_fd(), d.bytes, d.to, d.source).map(|_| 1)
            } else {
                sys::sendmmsg(sock.as_fd(), &batch[..n])
            };
            let advanced = match result {
                Ok(sent) if sent > 0 => sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Err(e),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                refused => {
                    // The first datagram of the batch was refused: drop it, go on.
                    report.failed += 1;
                    report.last_error = Some(refused.err().unwrap_or_else(|| io::Error::other("the kernel took no datagram")));
                    let t = self.transmits[done];
                    done += 1;
                    offset += t.size;
                    continue;
                }
            };
            report.sent += advanced;
            for t in &self.transmits[done..done + advanced] {
                offset += t.size;
            }
            done += advanced;
        };
        // Keep what was not sent (only after WouldBlock).
        self.transmits.drain(..done);
        self.buf.drain(..offset);
        self.end -= offset;
        match result {
            Ok(()) => Ok(report),
            Err(_) if report.sent > 0 || report.failed > 0 => Ok(report),
            Err(e) => Err(e),
        }
    }
}

/// Room for a batch of received datagrams, filled by one `recvmmsg(2)`.
#[derive(Debug)]
pub struct Inbox {
    data: Vec<u8>,
    slot: usize,
    slots: usize,
    metas: Vec<RecvMeta>,
}

impl Inbox {
    /// Room for `datagrams` (1 to 32) of up to `max_size` bytes each.
    pub fn new(datagrams: usize, max_size: usize) -> Inbox {
        let slots = datagrams.clamp(1, MMSG_BATCH);
        Inbox { data: vec![0; slots * max_size.max(1)], slot: max_size.max(1), slots, metas: Vec::with_capacity(slots) }
    }

    /// Receives what is queued (at least one datagram; a blocking socket waits for it,
    /// a nonblocking one gives `WouldBlock` when there is none). Returns how many.
    /// Datagrams without an IP source are skipped.
    pub fn recv(&mut self, sock: &impl AsFd) -> io::Result<usize> {
        self.metas.clear();
        let mut received = Vec::with_capacity(self.slots);
        let mut slots: Vec<&mut [u8]> = self.data.chunks_mut(self.slot).take(self.slots).collect();
        sys::recvmmsg(sock.as_fd(), &mut slots, &mut received)?;
        for r in received {
            // Keep slot positions aligned with metas: a datagram without a source is
            // recorded as empty and truncated so iteration skips it.
            let meta = RecvMeta::from_received(r).unwrap_or(RecvMeta {
                len: 0,
                source: SocketAddr::from(([0, 0, 0, 0], 0)),
                destination: None,
                interface: None,
                truncated: true,
            });
            self.metas.push(meta);
        }
        Ok(self.metas.len())
    }

    /// [`Inbox::recv`] on a tokio socket, waiting until something is there.
    #[cfg(feature = "tokio")]
    pub async fn recv_async(&mut self, sock: &tokio::net::UdpSocket) -> io::Result<usize> {
        sock.async_io(tokio::io::Interest::READABLE, || self.recv(sock)).await
    }

    /// The datagrams of the last receive, truncated ones left out.
    pub fn iter(&self) -> impl Iterator<Item = (&RecvMeta, &[u8])> {
        self.metas
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.truncated)
            .map(|(i, m)| (m, &self.data[i * self.slot..i * self.slot + m.len]))
    }

    /// Datagrams of the last receive that were cut or had no source (dropped).
    pub fn dropped(&self) -> usize {
        self.metas.iter().filter(|m| m.truncated).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UdpBuilder;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn any_v4() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    }

    #[test]
    fn pktinfo_tells_the_local_address_and_reply_from_uses_it() {
        // Loopback owns all of 127/8: a socket on 0.0.0.0 hears datagrams for 127.0.0.5.
        let server = UdpBuilder::new(any_v4()).pktinfo(true).bind().unwrap();
        server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let asked: IpAddr = "127.0.0.5".parse().unwrap();
        client.send_to(b"hello", (asked, port)).unwrap();
        let mut buf = [0u8; 64];
        let meta = recv_from_to(&server, &mut buf).unwrap();
        assert_eq!(&buf[..meta.len], b"hello");
        assert_eq!(meta.source, client.local_addr().unwrap());
        assert_eq!(meta.destination, Some(asked));
        assert_eq!(meta.reply_source(), Some(asked));
        assert_eq!(meta.interface, Some(crate::interface_index("lo").unwrap()));
        assert!(!meta.truncated);
        // Reply from the address asked, not the one routing would pick (127.0.0.1).
        send_from(&server, b"back", Some(meta.source), meta.reply_source()).unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back");
        assert_eq!(from, SocketAddr::new(asked, port));
    }

    #[test]
    fn reply_source_leaves_broadcast_and_multicast_to_routing() {
        let meta = |d: &str| RecvMeta {
            len: 0,
            source: "10.0.0.2:68".parse().unwrap(),
            destination: Some(d.parse().unwrap()),
            interface: None,
            truncated: false,
        };
        assert_eq!(meta("255.255.255.255").reply_source(), None);
        assert_eq!(meta("239.1.1.1").reply_source(), None);
        assert_eq!(meta("fe80::1").reply_source(), None);
        assert_eq!(meta("10.0.0.1").reply_source(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(meta("2001:db8::1").reply_source(), Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn truncation_is_reported() {
        let rx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        let tx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        tx.send_to(&[7u8; 100], rx.local_addr().unwrap()).unwrap();
        let mut small = [0u8; 10];
        let meta = recv_from_to(&rx, &mut small).unwrap();
        assert!(meta.truncated);
    }

    fn wait_readable_for_test(sock: &std::net::UdpSocket) -> bool {
        crate::wait_readable(sock, Duration::from_secs(2)).unwrap()
    }

    fn transmit_all(out: &mut Outbox, to: SocketAddr, n: u8) {
        for i in 0..n {
            let t = fleetboot_proto::append(out.buffer(), to, |b| b.extend_from_slice(&[i; 5]));
            out.push(t);
        }
    }

    #[test]
    fn forty_datagrams_leave_in_two_sendmmsg_calls_and_arrive_in_three_recvmmsg() {
        let rx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).nonblocking(true).bind().unwrap();
        let tx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        let to = rx.local_addr().unwrap();
        let mut out = Outbox::new(64);
        transmit_all(&mut out, to, 40);
        assert_eq!(out.len(), 40);
        assert!(!out.is_full());
        let r = out.send(&tx).unwrap();
        assert_eq!((r.sent, r.failed, r.calls), (40, 0, 2), "32 per sendmmsg");
        assert!(out.is_empty());
        let mut inbox = Inbox::new(16, 64);
        let mut got = Vec::new();
        let mut calls = 0;
        loop {
            match inbox.recv(&rx) {
                Ok(n) => {
                    calls += 1;
                    assert!(n <= 16);
                    for (m, b) in inbox.iter() {
                        assert_eq!(m.source, tx.local_addr().unwrap());
                        got.push(b.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(calls, 3, "16 + 16 + 8");
        assert_eq!(got, (0..40u8).map(|i| vec![i; 5]).collect::<Vec<_>>());
        // A lone datagram (a lock-step block) is one plain sendmsg.
        transmit_all(&mut out, to, 1);
        let r = out.send(&tx).unwrap();
        assert_eq!((r.sent, r.failed, r.calls), (1, 0, 1));
        assert!(wait_readable_for_test(&rx));
        assert_eq!(inbox.recv(&rx).unwrap(), 1);
    }

    #[test]
    fn connected_batches_and_sources_per_datagram() {
        let rx = UdpBuilder::new(any_v4()).bind().unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = rx.local_addr().unwrap().port();
        let to: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
        // Connected: datagrams for the peer leave without an address, others with theirs.
        let tx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).connect(to).bind().unwrap();
        let other = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        other.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = Outbox::new(8);
        transmit_all(&mut out, to, 3);
        let t = fleetboot_proto::append(out.buffer(), other.local_addr().unwrap(), |b| b.push(9));
        out.push(t);
        let r = out.send_connected(&tx, to).unwrap();
        assert_eq!((r.sent, r.calls), (4, 1));
        let mut buf = [0u8; 16];
        for i in 0..3u8 {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 5]);
        }
        assert_eq!(other.recv(&mut buf).unwrap(), 1);
        // Unconnected, each datagram from its own source address.
        let tx = UdpBuilder::new(any_v4()).bind().unwrap();
        for (i, src) in ["127.0.0.7", "127.0.0.8"].iter().enumerate() {
            let src: IpAddr = src.parse().unwrap();
            let t = fleetboot_proto::append(out.buffer(), to, |b| b.push(i as u8)).from_source(Some(src));
            out.push(t);
        }
        assert_eq!(out.send(&tx).unwrap().sent, 2);
        for src in ["127.0.0.7", "127.0.0.8"] {
            let (_, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(from.ip(), src.parse::<IpAddr>().unwrap());
        }
    }

    #[test]
    fn a_refused_datagram_is_skipped_and_the_rest_still_go() {
        let rx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind().unwrap();
        let mut out = Outbox::new(8);
        // A v6 destination on a v4 socket is refused (EAFNOSUPPORT).
        let t = fleetboot_proto::append(out.buffer(), "[::1]:9".parse().unwrap(), |b| b.push(0));
        out.push(t);
        transmit_all(&mut out, rx.local_addr().unwrap(), 2);
        let r = out.send(&tx).unwrap();
        assert_eq!((r.sent, r.failed), (2, 1));
        assert!(r.last_error.is_some());
        let mut buf = [0u8; 16];
        assert_eq!(rx.recv(&mut buf).unwrap(), 5);
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "appended"))]
    fn a_lying_transmit_is_dropped() {
        let mut out = Outbox::new(4);
        out.buffer().extend_from_slice(b"abc");
        out.push(Transmit::new("127.0.0.1:9".parse().unwrap(), 2));
        assert!(out.is_empty());
        assert!(out.buffer().is_empty());
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn tokio_flavours_move_the_same_datagrams() {
        let rx = UdpBuilder::new(any_v4()).pktinfo(true).bind_tokio().unwrap();
        let to: SocketAddr = (Ipv4Addr::LOCALHOST, rx.local_addr().unwrap().port()).into();
        let tx = UdpBuilder::new("127.0.0.1:0".parse().unwrap()).bind_tokio().unwrap();
        let mut out = Outbox::new(8);
        transmit_all(&mut out, to, 3);
        let r = out.send_async(&tx).await.unwrap();
        assert_eq!((r.sent, r.calls), (3, 1));
        let mut buf = [0u8; 16];
        let m = recv_from_to_async(&rx, &mut buf).await.unwrap();
        assert_eq!((&buf[..m.len], m.destination), (&[0u8; 5][..], Some(IpAddr::V4(Ipv4Addr::LOCALHOST))));
        let mut inbox = Inbox::new(8, 16);
        let mut n = 0;
        while n < 2 {
            n += inbox.recv_async(&rx).await.unwrap();
        }
        assert_eq!(inbox.iter().last().unwrap().1, &[2u8; 5]);
    }
}

//! What every HTTP listener of fleetboot accepts, whatever serves behind it: the boot
//! network's (`http.listen`) and the operators' (`admin.listen`, TLS or not).
//!
//! - [`Bounded`]: at most [`ConnectionLimits::max`] connections open at once and
//!   [`ConnectionLimits::per_client`] from one address. At the overall cap the listener stops
//!   accepting until a connection ends (new ones wait in the kernel's backlog, then are
//!   refused by it); a connection beyond its address's share is closed as soon as it is
//!   accepted, so one host cannot take the slots everyone else boots with. Both are counted
//!   in `fleetboot_connections_refused_total{listener, reason}` and logged at most every 30 s;
//!   `fleetboot_connections{listener}` is the number open.
//! - [`ConnectionTimeouts`]: a connection must send its request's header (up to the blank
//!   line) within `header` of its first byte — of the connection's opening for the first
//!   request — and may stay silent (nothing read, nothing written) for `idle` between
//!   requests or in the middle of one. A connection past either is closed, counted in
//!   `fleetboot_connections_timed_out_total{listener, phase}` and logged at most every 30 s:
//!   a host that opens connections and sends nothing, or dribbles a header a byte at a
//!   time, does not keep its slots.
//! - [`Accepting`]: a TCP listener whose accept errors (out of descriptors, say) are counted
//!   in `fleetboot_accept_errors_total{listener, reason}` and logged at most every 30 s with
//!   the open file limit; it waits a moment and keeps accepting. The service never ends
//!   because one accept failed.

use crate::limits::{Throttle, LOG_EVERY};
use axum::serve::Listener;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections open at once on one listener: overall and from one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max: usize,
    pub per_client: usize,
}

impl ConnectionLimits {
    /// The boot network's HTTP listener (`http.max_connections`,
    /// `http.max_connections_per_client`): a rack booting at once fetches its kernels and
    /// images over a few connections per machine.
    pub const HTTP: ConnectionLimits = ConnectionLimits { max: 1024, per_client: 16 };
    /// The operators' listener: a few people, their dashboards and scripts.
    pub const ADMIN: ConnectionLimits = ConnectionLimits { max: 256, per_client: 64 };
}

/// How long a connection may take over a request's header, and how long it may stay
/// silent (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    pub header: Duration,
    pub idle: Duration,
}

impl ConnectionTimeouts {
    /// `*.header_timeout_secs` = 10, `*.idle_timeout_secs` = 60: a browser or a firmware
    /// sends a header at once, and a keep-alive connection nobody reuses for a minute is
    /// better given back.
    pub const DEFAULT: ConnectionTimeouts = ConnectionTimeouts { header: Duration::from_secs(10), idle: Duration::from_secs(60) };
}

/// Addresses with connections open and how many each has. Its size is bounded by
/// `limits.max`: an address is in it only while it holds a slot.
type OpenPerClient = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A listener with [`ConnectionLimits`] (see the module documentation).
pub struct Bounded<L> {
    inner: L,
    listener: &'static str,
    limits: ConnectionLimits,
    timeouts: ConnectionTimeouts,
    slots: Arc<Semaphore>,
    open: OpenPerClient,
    full: Throttle,
    client_full: Throttle,
}

impl<L> Bounded<L> {
    /// `listener` names it in the metrics and the log ("http", "admin").
    pub fn new(inner: L, listener: &'static str, limits: ConnectionLimits) -> Bounded<L> {
        let limits = ConnectionLimits { max: limits.max.max(1), per_client: limits.per_client.max(1) };
        Bounded {
            inner,
            listener,
            limits,
            timeouts: ConnectionTimeouts::DEFAULT,
            slots: Arc::new(Semaphore::new(limits.max)),
            open: Arc::default(),
            full: Throttle::new(LOG_EVERY),
            client_full: Throttle::new(LOG_EVERY),
        }
    }

    /// Connections that take longer than `timeouts` are closed.
    pub fn with_timeouts(mut self, timeouts: ConnectionTimeouts) -> Bounded<L> {
        self.timeouts = timeouts;
        self
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max - self.slots.available_permits()
    }
}

/// An IPv4 client reaching a dual-stack socket is still that IPv4 address.
fn client_of(addr: &SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl<L> Listener for Bounded<L>
where
    L: Listener<Addr = SocketAddr>,
{
    type Io = Held<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Held<L::Io>, SocketAddr) {
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    metrics::counter!("fleetboot_connections_refused_total", "listener" => self.listener, "reason" => "overall").increment(1);
                    if let Some(skipped) = self.full.ready() {
                        tracing::warn!(listener = self.listener, max = self.limits.max, skipped,
                            "connections at their cap; new ones wait until one ends");
                    }
                    // The semaphore is never closed.
                    let Ok(slot) = self.slots.clone().acquire_owned().await else { continue };
                    slot
                }
            };
            let (io, addr) = self.inner.accept().await;
            let client = client_of(&addr);
            {
                let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                let n = open.entry(client).or_default();
                if *n >= self.limits.per_client {
                    drop(open);
                    metrics::counter!("fleetboot_connections_refused_total", "listener" => self.listener, "reason" => "per_client").increment(1);
                    if let Some(skipped) = self.client_full.ready() {
                        tracing::warn!(listener = self.listener, %client, per_client = self.limits.per_client, skipped,
                            "a client has as many connections open as it may; closing its new one");
                    }
                    // Dropping `io` closes it; the slot goes back with `slot`.
                    continue;
                }
                *n += 1;
            }
            metrics::gauge!("fleetboot_connections", "listener" => self.listener).increment(1.0);
            let slot = Slot { _slot: slot, client, open: self.open.clone(), listener: self.listener };
            return (Held { io, _slot: slot, clock: Clock::new(self.timeouts, self.listener) }, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection's place under the limits, given back when the connection is dropped.
struct Slot {
    _slot: OwnedSemaphorePermit,
    client: IpAddr,
    open: OpenPerClient,
    listener: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
        metrics::gauge!("fleetboot_connections", "listener" => self.listener).decrement(1.0);
    }
}

/// A connection accepted by [`Bounded`]: reads and writes go to the connection, until
/// its [`Clock`] runs out.
pub struct Held<Io> {
    io: Io,
    _slot: Slot,
    clock: Clock,
}

impl Held<TcpStream> {
    /// The connection's socket, for socket options (`TCP_CORK`).
    pub fn tcp(&self) -> &TcpStream {
        &self.io
    }

    /// Sends up to `count` bytes of `file` from `*offset` straight to the connection with
    /// sendfile(2): the kernel moves page-cache pages to the socket, nothing is copied
    /// through this process. Advances `*offset`; `Ok(0)` means the file ended before
    /// `count`. Under the same [`ConnectionTimeouts`] as a write.
    pub fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: &mut u64,
        count: usize,
    ) -> Poll<io::Result<usize>> {
        use std::os::fd::AsRawFd;
        loop {
            match self.io.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return match self.clock.check(cx) {
                        Ok(()) => Poll::Pending,
                        Err(e) => Poll::Ready(Err(e)),
                    }
                }
            }
            let socket = self.io.as_raw_fd();
            let sent = self.io.try_io(tokio::io::Interest::WRITABLE, || {
                let Ok(mut off) = libc::off_t::try_from(*offset) else {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"));
                };
                // SAFETY: both descriptors are open for the duration of the call (borrowed
                // from `self` and `file`), and `off` is a valid, exclusive pointer.
                let n = unsafe { libc::sendfile(socket, file.as_raw_fd(), &mut off, count) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(n as usize)
            });
            match sent {
                Ok(n) => {
                    *offset += n as u64;
                    self.clock.wrote(n);
                    return Poll::Ready(Ok(n));
                }
                // Readiness was stale: poll_write_ready registers for the next wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

static HEADER_TIMED_OUT: Throttle = Throttle::new(LOG_EVERY);
static IDLE_TIMED_OUT: Throttle = Throttle::new(LOG_EVERY);

/// Where a connection is in its request, for [`ConnectionTimeouts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a header: the deadline does not move with the bytes that arrive.
    Header,
    /// The header is in; `responded` once the server has written something, after which
    /// the next byte read starts the next request.
    Request { responded: bool },
}

/// The deadlines of one connection.
struct Clock {
    timeouts: ConnectionTimeouts,
    listener: &'static str,
    deadline: Pin<Box<tokio::time::Sleep>>,
    phase: Phase,
    /// How much of the header's closing "\r\n\r\n" the last bytes read were.
    matched: u8,
}

impl Clock {
    fn new(timeouts: ConnectionTimeouts, listener: &'static str) -> Clock {
        Clock {
            timeouts,
            listener,
            deadline: Box::pin(tokio::time::sleep(timeouts.header)),
            phase: Phase::Header,
            matched: 0,
        }
    }

    fn push_back(&mut self, by: Duration) {
        self.deadline.as_mut().reset(tokio::time::Instant::now() + by);
    }

    /// An error once the deadline has passed (and registers the wake-up until then).
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        let (phase, throttle, what) = match self.phase {
            Phase::Header => ("header", &HEADER_TIMED_OUT, "a request header took longer than its timeout; connection closed"),
            Phase::Request { .. } => ("idle", &IDLE_TIMED_OUT, "a connection was silent longer than its idle timeout; connection closed"),
        };
        metrics::counter!("fleetboot_connections_timed_out_total", "listener" => self.listener, "phase" => phase).increment(1);
        if let Some(skipped) = throttle.ready() {
            tracing::warn!(listener = self.listener, header_timeout_secs = self.timeouts.header.as_secs(),
                idle_timeout_secs = self.timeouts.idle.as_secs(), skipped, "{what}");
        }
        // Re-armed far away: the connection is being closed, its error is reported once.
        self.push_back(Duration::from_secs(86_400));
        Err(io::Error::new(io::ErrorKind::TimedOut, format!("{phase} timeout")))
    }

    fn read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.phase == (Phase::Request { responded: true }) {
            self.phase = Phase::Header;
            self.matched = 0;
            self.push_back(self.timeouts.header);
        }
        match self.phase {
            Phase::Header => {
                for &b in bytes {
                    self.matched = match (self.matched, b) {
                        (0 | 2, b'\r') | (1 | 3, b'\n') => self.matched + 1,
                        (_, b'\r') => 1,
                        _ => 0,
                    };
                    if self.matched == 4 {
                        self.phase = Phase::Request { responded: false };
                        self.push_back(self.timeouts.idle);
                        break;
                    }
                }
            }
            Phase::Request { .. } => self.push_back(self.timeouts.idle),
        }
    }

    fn wrote(&mut self, n: usize) {
        if n > 0 {
            // The server answers: whatever it was reading was a complete header.
            self.phase = Phase::Request { responded: true };
            self.push_back(self.timeouts.idle);
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Held<Io> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.clock.read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.clock.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Held<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.clock.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match this.clock.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => match this.clock.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.clock.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match this.clock.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

static ACCEPT_FAILED: Throttle = Throttle::new(LOG_EVERY);

/// A TCP listener that survives accept errors (see the module documentation).
pub struct Accepting {
    tcp: TcpListener,
    listener: &'static str,
}

impl Accepting {
    pub fn new(tcp: TcpListener, listener: &'static str) -> Accepting {
        Accepting { tcp, listener }
    }
}

/// Errors about one connection that went away before it was accepted: nothing to wait for.
fn about_one_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

impl Listener for Accepting {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.tcp.accept().await {
                Ok(accepted) => return accepted,
                Err(e) if about_one_connection(&e) => {}
                Err(e) => {
                    let out_of_fds = crate::limits::is_out_of_fds(&e);
                    let reason = if out_of_fds { "no_file_descriptors" } else { "other" };
                    metrics::counter!("fleetboot_accept_errors_total", "listener" => self.listener, "reason" => reason).increment(1);
                    if let Some(skipped) = ACCEPT_FAILED.ready() {
                        let fd_limit = crate::limits::fd_limit().map_or(0, |l| l.soft);
                        tracing::error!(listener = self.listener, error = %e, fd_limit, skipped, out_of_fds,
                            "cannot accept a connection; retrying (connections wait in the backlog)");
                    }
                    // The backlog holds the connection; descriptors free up as others end.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Accepts in the background and echoes one byte per connection, so a client can
    /// tell a served connection (its byte comes back) from a refused one (EOF).
    async fn echo(limits: ConnectionLimits) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let mut l = Bounded::new(Accepting::new(tcp, "test"), "test", limits);
        tokio::spawn(async move {
            loop {
                let (mut io, _) = l.accept().await;
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    while io.read_exact(&mut b).await.is_ok() {
                        if io.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Whether the connection is served: its byte comes back (a refused one reads EOF or
    /// a reset).
    async fn served(c: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        c.write_all(b"x").await.is_ok() && c.read_exact(&mut b).await.is_ok()
    }

    #[tokio::test]
    async fn one_client_gets_its_share_and_the_rest_of_its_connections_are_closed() {
        let (addr, _) = echo(ConnectionLimits { max: 64, per_client: 4 }).await;
        let mut conns = Vec::new();
        for _ in 0..20 {
            conns.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut served_count = 0;
        for c in &mut conns {
            served_count += served(c).await as usize;
        }
        assert_eq!(served_count, 4, "a client is served on at most per_client connections at once");
        // Its slots come back as its connections end (once the server has seen them end).
        conns.clear();
        let mut again = Vec::new();
        for _ in 0..200 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            if served(&mut c).await {
                again.push(c);
                if again.len() == 4 {
                    break;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(again.len(), 4, "a client whose connections ended gets its share again");
    }

    #[tokio::test]
    async fn beyond_the_overall_cap_connections_wait_for_a_slot() {
        // Many loopback addresses are distinct clients, each under its own share.
        let (addr, accepted) = echo(ConnectionLimits { max: 8, per_client: 8 }).await;
        let mut first = Vec::new();
        for i in 0..8u8 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from(([127, 0, 1, i + 1], 0))).unwrap();
            first.push(sock.connect(addr).await.unwrap());
        }
        for c in &mut first {
            assert!(served(c).await);
        }
        // Flood: 100 more connections (under the listen backlog), from 50 other addresses;
        // the kernel completes their handshakes into the backlog, the listener takes none
        // while all slots are held.
        let mut flood = Vec::new();
        for i in 0..100u32 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from(([127, 0, 2, (i % 50) as u8 + 1], 0))).unwrap();
            flood.push(sock.connect(addr).await.unwrap());
        }
        // A served connection still answers while the flood waits.
        assert!(served(&mut first[0]).await);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 8, "nothing beyond the cap was taken");
        // One slot freed: exactly one more connection is taken.
        first.pop();
        let mut next = flood.remove(0);
        assert!(served(&mut next).await, "the oldest waiting connection gets the freed slot");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 9);
    }
}

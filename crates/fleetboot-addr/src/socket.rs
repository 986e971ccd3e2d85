//! Sockets bound to an [`OwnedAddr`]: each holds its lease, and fails with
//! [`LeaseLost`](crate::LeaseLost) once the lease is gone. A pending call is woken by the
//! lease itself (async UDP and listeners wait on it beside the call) or by shutdown(2)
//! (TCP streams and the blocking sockets, whose calls cannot wait on two things); the
//! wrappers turn what the call returns into that error.
//!
//! Async (tokio): [`LeasedUdpSocket`], [`LeasedTcpStream`] (`AsyncRead` + `AsyncWrite`),
//! [`LeasedTcpListener`]. Blocking: [`LeasedStdUdp`], [`LeasedStdTcp`] (`Read` + `Write`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::lease::{lost_error, HasFd, OwnedAddr};
use crate::sys;

/// After a call returned `r`, the lease's error if it was lost meanwhile (a shut-down
/// socket returns EOF or an odd errno, which would hide the reason).
fn after<T>(addr: &OwnedAddr, r: io::Result<T>) -> io::Result<T> {
    match addr.lost() {
        Some(l) => Err(lost_error(l)),
        None => r,
    }
}

fn register<T: HasFd + 'static>(addr: &OwnedAddr, s: &Arc<T>) {
    let weak: std::sync::Weak<dyn HasFd> = Arc::downgrade(s) as std::sync::Weak<dyn HasFd>;
    addr.shared().register(weak);
}

/// A UDP socket bound to a leased address.
#[derive(Debug)]
pub struct LeasedUdpSocket {
    inner: Arc<tokio::net::UdpSocket>,
    addr: OwnedAddr,
}

impl LeasedUdpSocket {
    pub(crate) fn bind(addr: OwnedAddr, port: u16) -> io::Result<LeasedUdpSocket> {
        let std = sys::udp_bound(addr.ip(), port)?;
        // Not registered for shutdown: a shut-down UDP socket polls readable forever while
        // a non-blocking recv keeps saying EAGAIN, which would spin tokio's readiness loop.
        // Every call here waits on the lease instead (`guarded`).
        let inner = Arc::new(tokio::net::UdpSocket::from_std(std)?);
        Ok(LeasedUdpSocket { inner, addr })
    }

    /// The socket's own address: the leased one, and its port.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn lease(&self) -> &OwnedAddr {
        &self.addr
    }

    /// Runs `op` unless the lease is lost, and gives up on it when the lease is lost.
    async fn guarded<T>(&self, op: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
        self.addr.check()?;
        tokio::select! {
            r = op => after(&self.addr, r),
            l = self.addr.lost_wait() => Err(lost_error(l)),
        }
    }

    pub async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.guarded(self.inner.send_to(buf, target)).await
    }

    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.guarded(self.inner.recv_from(buf)).await
    }

    pub async fn connect(&self, peer: SocketAddr) -> io::Result<()> {
        self.guarded(self.inner.connect(peer)).await
    }

    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.guarded(self.inner.send(buf)).await
    }

    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.guarded(self.inner.recv(buf)).await
    }

    pub fn set_broadcast(&self, on: bool) -> io::Result<()> {
        self.inner.set_broadcast(on)
    }
}

/// A TCP connection from a leased address.
#[derive(Debug)]
pub struct LeasedTcpStream {
    inner: Arc<tokio::net::TcpStream>,
    addr: OwnedAddr,
}

impl LeasedTcpStream {
    pub(crate) async fn connect(addr: OwnedAddr, peer: SocketAddr) -> io::Result<LeasedTcpStream> {
        let socket = sys::tcp_bound(addr.ip())?;
        let connected = tokio::select! {
            r = socket.connect(peer) => after(&addr, r)?,
            l = addr.lost_wait() => return Err(lost_error(l)),
        };
        Ok(Self::wrap(addr, connected))
    }

    fn wrap(addr: OwnedAddr, s: tokio::net::TcpStream) -> LeasedTcpStream {
        let inner = Arc::new(s);
        register(&addr, &inner);
        LeasedTcpStream { inner, addr }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    pub fn lease(&self) -> &OwnedAddr {
        &self.addr
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.set_nodelay(on)
    }
}

impl AsyncRead for LeasedTcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            self.addr.check()?;
            ready!(self.inner.poll_read_ready(cx))?;
            match self.inner.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    // EOF on a lost lease is the shutdown, not the peer.
                    self.addr.check()?;
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(after(&self.addr, Err(e))),
            }
        }
    }
}

impl AsyncWrite for LeasedTcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            self.addr.check()?;
            ready!(self.inner.poll_write_ready(cx))?;
            match self.inner.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(after(&self.addr, r)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.addr.check())
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = socket2::SockRef::from(&*self.inner).shutdown(std::net::Shutdown::Write);
        Poll::Ready(after(&self.addr, r))
    }
}

/// A TCP listener on a leased address; accepted connections hold the lease too.
#[derive(Debug)]
pub struct LeasedTcpListener {
    inner: Arc<tokio::net::TcpListener>,
    addr: OwnedAddr,
}

impl LeasedTcpListener {
    pub(crate) fn bind(addr: OwnedAddr, port: u16) -> io::Result<LeasedTcpListener> {
        let std = sys::tcp_listener(addr.ip(), port, 1024)?;
        // Like the UDP socket, woken by the lease rather than by shutdown(2).
        let inner = Arc::new(tokio::net::TcpListener::from_std(std)?);
        Ok(LeasedTcpListener { inner, addr })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub async fn accept(&self) -> io::Result<(LeasedTcpStream, SocketAddr)> {
        self.addr.check()?;
        let (s, peer) = tokio::select! {
            r = self.inner.accept() => after(&self.addr, r)?,
            l = self.addr.lost_wait() => return Err(lost_error(l)),
        };
        Ok((LeasedTcpStream::wrap(self.addr.clone(), s), peer))
    }
}

/// A blocking UDP socket bound to a leased address.
#[derive(Debug)]
pub struct LeasedStdUdp {
    inner: Arc<std::net::UdpSocket>,
    addr: OwnedAddr,
}

impl LeasedStdUdp {
    pub(crate) fn bind(addr: OwnedAddr, port: u16) -> io::Result<LeasedStdUdp> {
        let s = sys::udp_bound(addr.ip(), port)?;
        s.set_nonblocking(false)?;
        let inner = Arc::new(s);
        register(&addr, &inner);
        Ok(LeasedStdUdp { inner, addr })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn lease(&self) -> &OwnedAddr {
        &self.addr
    }

    /// The socket itself, for options (timeouts, broadcast); reads and writes go through
    /// the methods here so a lost lease shows as such.
    pub fn socket(&self) -> &std::net::UdpSocket {
        &self.inner
    }

    pub fn send_to(&self, buf: &[u8], target: SocketAddrV4) -> io::Result<usize> {
        self.addr.check()?;
        after(&self.addr, self.inner.send_to(buf, target))
    }

    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.addr.check()?;
        after(&self.addr, self.inner.recv_from(buf))
    }
}

/// A blocking TCP connection from a leased address.
#[derive(Debug)]
pub struct LeasedStdTcp {
    inner: Arc<std::net::TcpStream>,
    addr: OwnedAddr,
}

impl LeasedStdTcp {
    pub(crate) fn connect(
        addr: OwnedAddr,
        peer: SocketAddr,
        timeout: std::time::Duration,
    ) -> io::Result<LeasedStdTcp> {
        let s = sys::tcp_connect_blocking(addr.ip(), peer, timeout)?;
        let inner = Arc::new(s);
        register(&addr, &inner);
        Ok(LeasedStdTcp { inner, addr })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn lease(&self) -> &OwnedAddr {
        &self.addr
    }

    pub fn socket(&self) -> &std::net::TcpStream {
        &self.inner
    }
}

impl Read for LeasedStdTcp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.addr.check()?;
        after(&self.addr, (&*self.inner).read(buf))
    }
}

impl Write for LeasedStdTcp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.addr.check()?;
        after(&self.addr, (&*self.inner).write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.addr.check()
    }
}

#[cfg(test)]
mod tests {
    //! What a lost lease does to the sockets on it, on loopback (no interface is touched:
    //! the lease is made by hand, as a pool's task would).
    use super::*;
    use crate::lease::{LeaseLost, LeaseShared, Origin};
    use std::net::Ipv4Addr;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn loopback_lease() -> (OwnedAddr, Arc<LeaseShared>, tokio::sync::oneshot::Receiver<()>) {
        let shared = LeaseShared::new(Ipv4Addr::LOCALHOST, 8, Origin::Static);
        let (tx, rx) = tokio::sync::oneshot::channel();
        (OwnedAddr::new(shared.clone(), tx), shared, rx)
    }

    fn lost_of(e: &io::Error) -> Option<LeaseLost> {
        e.get_ref()?.downcast_ref::<LeaseLost>().cloned()
    }

    #[tokio::test]
    async fn a_lost_lease_wakes_and_fails_every_socket_on_it() {
        let (addr, shared, _release) = loopback_lease();
        let udp = addr.udp(0).unwrap();
        assert_eq!(udp.local_addr().unwrap().ip(), Ipv4Addr::LOCALHOST);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut tcp = addr.tcp_connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut far, _) = listener.accept().await.unwrap();
        tcp.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        far.read_exact(&mut b).await.unwrap();
        let std_udp = addr.std_udp(0).unwrap();
        let mut std_tcp = addr.std_tcp_connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().await.unwrap();

        // Calls that would wait forever: nothing is ever sent to these sockets.
        let udp_wait = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            udp.recv_from(&mut buf).await
        });
        let tcp_wait = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            tcp.read(&mut buf).await
        });
        let blocking_udp = tokio::task::spawn_blocking(move || std_udp.recv_from(&mut [0u8; 8]));
        let blocking_tcp = tokio::task::spawn_blocking(move || std_tcp.read(&mut [0u8; 8]));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!udp_wait.is_finished() && !tcp_wait.is_finished());

        shared.lose("DHCPNAK while renewing: address taken".into());
        let limit = Duration::from_secs(5);
        let errors = [
            tokio::time::timeout(limit, udp_wait).await.unwrap().unwrap().unwrap_err(),
            tokio::time::timeout(limit, tcp_wait).await.unwrap().unwrap().unwrap_err(),
            tokio::time::timeout(limit, blocking_udp).await.unwrap().unwrap().unwrap_err(),
            tokio::time::timeout(limit, blocking_tcp).await.unwrap().unwrap().unwrap_err(),
        ];
        for e in &errors {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
            assert_eq!(
                e.to_string(),
                "the lease on 127.0.0.1 was lost: DHCPNAK while renewing: address taken"
            );
            assert_eq!(lost_of(e).map(|l| l.ip), Some(Ipv4Addr::LOCALHOST));
        }
        // No new socket on a lost lease.
        assert!(lost_of(&addr.udp(0).unwrap_err()).is_some());
        assert_eq!(addr.lost().unwrap().why, "DHCPNAK while renewing: address taken");
    }

    #[tokio::test]
    async fn the_last_user_releases() {
        let (addr, _shared, mut release) = loopback_lease();
        let udp = addr.udp(0).unwrap();
        let clone = addr.clone();
        drop(addr);
        drop(clone);
        assert!(release.try_recv().is_err(), "the socket still holds the lease");
        drop(udp);
        assert_eq!(release.try_recv(), Ok(()), "dropping the last user asks for the release");
    }
}

//! TCP listeners (HTTP, NBD) on an address and, optionally, one interface; and outgoing
//! connections from a chosen local address.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener};

/// Builds a TCP listener: `SO_REUSEADDR` on (a restarted server rebinds at once), an
/// optional `SO_BINDTODEVICE`, a backlog of 1024 unless told otherwise.
#[derive(Debug, Clone)]
#[must_use]
pub struct TcpListenerBuilder {
    addr: SocketAddr,
    device: Option<String>,
    reuse_address: bool,
    backlog: i32,
    nonblocking: bool,
    transparent: bool,
}

impl TcpListenerBuilder {
    pub fn new(addr: SocketAddr) -> TcpListenerBuilder {
        TcpListenerBuilder { addr, device: None, reuse_address: true, backlog: 1024, nonblocking: false, transparent: false }
    }

    /// `SO_BINDTODEVICE`: accept connections arriving on this interface only.
    pub fn device(mut self, name: Option<&str>) -> Self {
        self.device = name.map(str::to_string);
        self
    }

    pub fn reuse_address(mut self, on: bool) -> Self {
        self.reuse_address = on;
        self
    }

    pub fn backlog(mut self, n: i32) -> Self {
        self.backlog = n;
        self
    }

    pub fn nonblocking(mut self, on: bool) -> Self {
        self.nonblocking = on;
        self
    }

    /// `IP_TRANSPARENT` (needs `CAP_NET_ADMIN`): accept connections a TPROXY rule diverts
    /// to this listener whatever address they were sent to; an accepted socket's local
    /// address is the one the client asked for (an edge cache answering for its origin).
    pub fn transparent(mut self, on: bool) -> Self {
        self.transparent = on;
        self
    }

    fn build(&self, nonblocking: bool) -> io::Result<Socket> {
        let ctx = |what: &'static str| {
            let addr = self.addr;
            move |e: io::Error| io::Error::new(e.kind(), format!("TCP {addr}: {what}: {e}"))
        };
        let domain = if self.addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(ctx("socket"))?;
        s.set_reuse_address(self.reuse_address).map_err(ctx("SO_REUSEADDR"))?;
        if let Some(dev) = &self.device {
            s.bind_device(Some(dev.as_bytes())).map_err(ctx("SO_BINDTODEVICE"))?;
        }
        if self.transparent {
            match self.addr {
                SocketAddr::V4(_) => s.set_ip_transparent_v4(true),
                SocketAddr::V6(_) => s.set_ip_transparent_v6(true),
            }
            .map_err(ctx("IP_TRANSPARENT"))?;
        }
        s.set_nonblocking(nonblocking).map_err(ctx("O_NONBLOCK"))?;
        s.bind(&self.addr.into()).map_err(ctx("bind"))?;
        s.listen(self.backlog).map_err(ctx("listen"))?;
        Ok(s)
    }

    pub fn bind(&self) -> io::Result<TcpListener> {
        Ok(self.build(self.nonblocking)?.into())
    }

    /// [`TcpListenerBuilder::bind`] as a tokio listener (needs a runtime).
    #[cfg(feature = "tokio")]
    pub fn bind_tokio(&self) -> io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::from_std(self.build(true)?.into())
    }
}

/// Connects to `peer` from `local` (any port; `None`: routing chooses the address), as a
/// tokio stream. A client with several addresses on one host (the emulator's clients, each
/// its own machine) makes every connection from its own.
#[cfg(feature = "tokio")]
pub async fn connect_tokio(local: Option<std::net::IpAddr>, peer: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let sock = if peer.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(|e| io::Error::new(e.kind(), format!("TCP to {peer}: socket: {e}")))?;
    if let Some(ip) = local {
        sock.bind(SocketAddr::new(ip, 0)).map_err(|e| io::Error::new(e.kind(), format!("TCP to {peer}: binding {ip}: {e}")))?;
    }
    sock.connect(peer).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn listens_and_accepts() {
        let l = TcpListenerBuilder::new("127.0.0.1:0".parse().unwrap()).backlog(8).bind().unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"hi").unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn connects_from_the_address_asked() {
        let l = TcpListenerBuilder::new("127.0.0.1:0".parse().unwrap()).bind_tokio().unwrap();
        let peer = l.local_addr().unwrap();
        let local: std::net::IpAddr = "127.0.0.9".parse().unwrap();
        let c = connect_tokio(Some(local), peer).await.unwrap();
        let (_, from) = l.accept().await.unwrap();
        assert_eq!((from.ip(), c.local_addr().unwrap().ip()), (local, local));
        let e = connect_tokio(Some("192.0.2.1".parse().unwrap()), peer).await.unwrap_err();
        assert!(e.to_string().contains("binding 192.0.2.1"), "{e}");
    }

    #[test]
    fn transparent_listeners_need_the_capability_and_say_so() {
        let b = TcpListenerBuilder::new("127.0.0.1:0".parse().unwrap()).transparent(true);
        match b.bind() {
            // As root (CAP_NET_ADMIN) the option is set and reads back.
            Ok(l) => assert!(socket2::SockRef::from(&l).ip_transparent_v4().unwrap()),
            Err(e) => assert!(e.to_string().contains("IP_TRANSPARENT"), "{e}"),
        }
    }
}

//! The UDP socket builder and buffer sizing.

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;

/// An error of one step of making a socket, said with the socket's purpose and the step.
/// The OS error stays reachable as its source: a caller can still tell EMFILE (out of
/// descriptors, which a service survives by dropping one request) from the rest.
#[derive(Debug)]
struct WithContext {
    message: String,
    os: io::Error,
}

impl std::fmt::Display for WithContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WithContext {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.os)
    }
}

/// Which interface multicast leaves through (`IP_MULTICAST_IF`) or a group is joined on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MulticastInterface {
    /// The interface that has this IPv4 address.
    Address(Ipv4Addr),
    /// The interface with this index (IPv4 `ip_mreqn`, IPv6 scope).
    Index(u32),
    /// This index, with this address as the source of multicast sent through it: explicit
    /// even when several interfaces share an address.
    IndexAndAddress(u32, Ipv4Addr),
}

/// A socket buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// `SO_RCVBUF`: how large a burst can queue before datagrams are dropped.
    Receive,
    /// `SO_SNDBUF`.
    Send,
}

/// Asks for a `want`-byte buffer (with the root-only `SO_*BUFFORCE` first, so `rmem_max`
/// and `wmem_max` do not cap a server started as root), reads back what the kernel granted
/// and logs a warning naming `what` when that is less. Returns the usable size granted
/// (Linux reports twice it, for bookkeeping).
pub fn force_buffer(sock: &impl AsFd, which: Buffer, want: usize, what: &str) -> usize {
    let (force, plain) = match which {
        Buffer::Receive => (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        Buffer::Send => (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    };
    let fd = sock.as_fd();
    let v = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
    if crate::sys::setsockopt(fd, libc::SOL_SOCKET, force, &v).is_err() {
        let _ = crate::sys::setsockopt(fd, libc::SOL_SOCKET, plain, &v);
    }
    let granted = crate::sys::getsockopt_int(fd, libc::SOL_SOCKET, plain).map_or(0, |g| g.max(0) as usize / 2);
    if granted < want {
        tracing::warn!(
            what,
            buffer = ?which,
            wanted = want,
            granted,
            "the kernel capped this socket buffer (raise net.core.rmem_max / wmem_max); bursts may be dropped"
        );
    }
    granted
}

/// Ends reception on `sock` (`shutdown(SHUT_RD)`): a thread blocked in `recv` on it
/// returns at once (with 0 bytes on Linux, also for UDP), and so does every later `recv`.
/// How a shell stops a blocking transfer thread from outside.
pub fn stop_receiving(sock: &impl AsFd) -> io::Result<()> {
    match socket2::SockRef::from(sock).shutdown(std::net::Shutdown::Read) {
        // Linux shuts an unconnected datagram socket down too, and reports ENOTCONN.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        other => other,
    }
}

/// Builds a UDP socket with every option fleetboot's shells set, in the order the kernel
/// needs them (options, then bind, then joins, then connect). Nothing is done until
/// [`UdpBuilder::bind`] (or `bind_tokio`).
///
/// Defaults: blocking, no reuse, no broadcast, `IP_MULTICAST_ALL` **off** (a socket bound
/// to a port receives only the groups it joined itself, not every group any socket of the
/// host joined on that port), no pktinfo, kernel buffer sizes.
///
/// ```no_run
/// use fleetboot_net::{Buffer, UdpBuilder};
/// let sock = UdpBuilder::new("0.0.0.0:69".parse().unwrap())
///     .device(Some("eth0"))
///     .buffer(Buffer::Receive, 4 << 20)
///     .pktinfo(true)
///     .purpose("TFTP requests")
///     .bind()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct UdpBuilder {
    bind: SocketAddr,
    device: Option<String>,
    reuse_address: bool,
    reuse_port: bool,
    broadcast: bool,
    ttl: Option<u32>,
    multicast_ttl: Option<u32>,
    multicast_loop: Option<bool>,
    multicast_all: bool,
    multicast_if: Option<MulticastInterface>,
    joins: Vec<(IpAddr, MulticastInterface)>,
    recv_buffer: Option<usize>,
    send_buffer: Option<usize>,
    pktinfo: bool,
    nonblocking: bool,
    only_v6: Option<bool>,
    connect: Option<SocketAddr>,
    purpose: String,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl UdpBuilder {
    /// A socket to be bound to `bind` (port 0: any free port).
    pub fn new(bind: SocketAddr) -> UdpBuilder {
        UdpBuilder {
            bind,
            device: None,
            reuse_address: false,
            reuse_port: false,
            broadcast: false,
            ttl: None,
            multicast_ttl: None,
            multicast_loop: None,
            multicast_all: false,
            multicast_if: None,
            joins: Vec::new(),
            recv_buffer: None,
            send_buffer: None,
            pktinfo: false,
            nonblocking: false,
            only_v6: None,
            connect: None,
            purpose: String::new(),
        }
    }

    /// `SO_BINDTODEVICE`: send and receive on this interface only (`None`: any).
    pub fn device(mut self, name: Option<&str>) -> Self {
        self.device = name.map(str::to_string);
        self
    }

    /// `SO_REUSEADDR`.
    pub fn reuse_address(mut self, on: bool) -> Self {
        self.reuse_address = on;
        self
    }

    /// `SO_REUSEPORT` (another process, such as a second DHCP server, may bind the port).
    pub fn reuse_port(mut self, on: bool) -> Self {
        self.reuse_port = on;
        self
    }

    /// `SO_BROADCAST`.
    pub fn broadcast(mut self, on: bool) -> Self {
        self.broadcast = on;
        self
    }

    /// Unicast TTL / hop limit.
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Multicast TTL / hop limit.
    pub fn multicast_ttl(mut self, ttl: u32) -> Self {
        self.multicast_ttl = Some(ttl);
        self
    }

    /// Whether this host's own sockets hear what this socket sends to a group.
    pub fn multicast_loop(mut self, on: bool) -> Self {
        self.multicast_loop = Some(on);
        self
    }

    /// `IP_MULTICAST_ALL` (IPv4; off unless asked).
    pub fn multicast_all(mut self, on: bool) -> Self {
        self.multicast_all = on;
        self
    }

    /// `IP_MULTICAST_IF` / `IPV6_MULTICAST_IF`: the interface multicast leaves through.
    pub fn multicast_interface(mut self, via: MulticastInterface) -> Self {
        self.multicast_if = Some(via);
        self
    }

    /// Joins `group` on `on` once bound (may be called for several groups).
    pub fn join(mut self, group: IpAddr, on: MulticastInterface) -> Self {
        self.joins.push((group, on));
        self
    }

    /// Forces a buffer size (see [`force_buffer`]; the grant is logged when smaller).
    pub fn buffer(mut self, which: Buffer, bytes: usize) -> Self {
        match which {
            Buffer::Receive => self.recv_buffer = Some(bytes),
            Buffer::Send => self.send_buffer = Some(bytes),
        }
        self
    }

    /// Report the local address each datagram was sent to (`IP_PKTINFO` /
    /// `IPV6_RECVPKTINFO`), read by [`crate::recv_from_to`] and [`crate::Inbox`].
    pub fn pktinfo(mut self, on: bool) -> Self {
        self.pktinfo = on;
        self
    }

    /// `O_NONBLOCK` (tokio sockets are always nonblocking).
    pub fn nonblocking(mut self, on: bool) -> Self {
        self.nonblocking = on;
        self
    }

    /// `IPV6_V6ONLY` for an IPv6 socket.
    pub fn only_v6(mut self, on: bool) -> Self {
        self.only_v6 = Some(on);
        self
    }

    /// `connect(2)` after binding: only `peer` reaches the socket, and sends without an
    /// address go there.
    pub fn connect(mut self, peer: SocketAddr) -> Self {
        self.connect = Some(peer);
        self
    }

    /// What the socket is for, named in errors and in buffer warnings.
    pub fn purpose(mut self, what: &str) -> Self {
        self.purpose = what.to_string();
        self
    }

    fn label(&self) -> String {
        if self.purpose.is_empty() {
            format!("UDP {}", self.bind)
        } else {
            format!("{} (UDP {})", self.purpose, self.bind)
        }
    }

    fn ctx(&self, what: &str) -> impl Fn(io::Error) -> io::Error + '_ {
        let what = what.to_string();
        move |e| io::Error::new(e.kind(), WithContext { message: format!("{}: {what}: {e}", self.label()), os: e })
    }

    fn build(&self, nonblocking: bool) -> io::Result<Socket> {
        let v4 = self.bind.is_ipv4();
        let domain = if v4 { Domain::IPV4 } else { Domain::IPV6 };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(self.ctx("socket"))?;
        if let (Some(only), false) = (self.only_v6, v4) {
            s.set_only_v6(only).map_err(self.ctx("IPV6_V6ONLY"))?;
        }
        if self.reuse_address {
            s.set_reuse_address(true).map_err(self.ctx("SO_REUSEADDR"))?;
        }
        if self.reuse_port {
            s.set_reuse_port(true).map_err(self.ctx("SO_REUSEPORT"))?;
        }
        if self.broadcast {
            s.set_broadcast(true).map_err(self.ctx("SO_BROADCAST"))?;
        }
        if let Some(dev) = &self.device {
            s.bind_device(Some(dev.as_bytes())).map_err(self.ctx(&format!("binding to interface {dev:?}")))?;
        }
        if v4 {
            s.set_multicast_all_v4(self.multicast_all).map_err(self.ctx("IP_MULTICAST_ALL"))?;
        }
        if let Some(ttl) = self.ttl {
            if v4 { s.set_ttl_v4(ttl) } else { s.set_unicast_hops_v6(ttl) }.map_err(self.ctx("TTL"))?;
        }
        if let Some(ttl) = self.multicast_ttl {
            if v4 { s.set_multicast_ttl_v4(ttl) } else { s.set_multicast_hops_v6(ttl) }.map_err(self.ctx("multicast TTL"))?;
        }
        if let Some(on) = self.multicast_loop {
            if v4 { s.set_multicast_loop_v4(on) } else { s.set_multicast_loop_v6(on) }.map_err(self.ctx("multicast loop"))?;
        }
        if let Some(via) = self.multicast_if {
            set_multicast_if(&s, v4, via).map_err(self.ctx("IP_MULTICAST_IF"))?;
        }
        if let Some(n) = self.recv_buffer {
            force_buffer(&s, Buffer::Receive, n, &self.label());
        }
        if let Some(n) = self.send_buffer {
            force_buffer(&s, Buffer::Send, n, &self.label());
        }
        if self.pktinfo {
            crate::sys::enable_pktinfo(s.as_fd(), v4).map_err(self.ctx("IP_PKTINFO"))?;
        }
        s.set_nonblocking(nonblocking).map_err(self.ctx("O_NONBLOCK"))?;
        s.bind(&self.bind.into()).map_err(self.ctx("bind"))?;
        for (group, on) in &self.joins {
            join(&s, *group, *on).map_err(self.ctx(&format!("joining {group}")))?;
        }
        if let Some(peer) = self.connect {
            s.connect(&peer.into()).map_err(self.ctx(&format!("connecting to {peer}")))?;
        }
        Ok(s)
    }

    /// Creates, configures and binds the socket.
    pub fn bind(&self) -> io::Result<UdpSocket> {
        Ok(self.build(self.nonblocking)?.into())
    }

    /// [`UdpBuilder::bind`] as a tokio socket (nonblocking; needs a runtime).
    #[cfg(feature = "tokio")]
    pub fn bind_tokio(&self) -> io::Result<tokio::net::UdpSocket> {
        let s: UdpSocket = self.build(true)?.into();
        tokio::net::UdpSocket::from_std(s)
    }
}

fn set_multicast_if(s: &Socket, v4: bool, via: MulticastInterface) -> io::Result<()> {
    match (v4, via) {
        (true, MulticastInterface::Address(a)) => s.set_multicast_if_v4(&a),
        (true, MulticastInterface::Index(i)) => crate::sys::set_multicast_if_v4(s.as_fd(), i, Ipv4Addr::UNSPECIFIED),
        (true, MulticastInterface::IndexAndAddress(i, a)) => crate::sys::set_multicast_if_v4(s.as_fd(), i, a),
        (false, MulticastInterface::Index(i) | MulticastInterface::IndexAndAddress(i, _)) => s.set_multicast_if_v6(i),
        (false, MulticastInterface::Address(a)) => Err(invalid(format!("an IPv6 socket names its multicast interface by index, not {a}"))),
    }
}

fn join(s: &Socket, group: IpAddr, on: MulticastInterface) -> io::Result<()> {
    if !group.is_multicast() {
        return Err(invalid(format!("{group} is not a multicast address")));
    }
    match (group, on) {
        (IpAddr::V4(g), MulticastInterface::Address(a)) => s.join_multicast_v4_n(&g, &InterfaceIndexOrAddress::Address(a)),
        (IpAddr::V4(g), MulticastInterface::Index(i) | MulticastInterface::IndexAndAddress(i, _)) => {
            s.join_multicast_v4_n(&g, &InterfaceIndexOrAddress::Index(i))
        }
        (IpAddr::V6(g), MulticastInterface::Index(i) | MulticastInterface::IndexAndAddress(i, _)) => s.join_multicast_v6(&g, i),
        (IpAddr::V6(_), MulticastInterface::Address(a)) => Err(invalid(format!("an IPv6 group is joined by interface index, not {a}"))),
    }
}

/// Joins `group` on `on` for an existing socket (a group chosen after the socket exists).
pub fn join_group(sock: &impl AsFd, group: IpAddr, on: MulticastInterface) -> io::Result<()> {
    join(&socket2::SockRef::from(sock), group, on)
}

/// Leaves `group` on `on`.
pub fn leave_group(sock: &impl AsFd, group: IpAddr, on: MulticastInterface) -> io::Result<()> {
    let s = socket2::SockRef::from(sock);
    match (group, on) {
        (IpAddr::V4(g), MulticastInterface::Address(a)) => s.leave_multicast_v4_n(&g, &InterfaceIndexOrAddress::Address(a)),
        (IpAddr::V4(g), MulticastInterface::Index(i) | MulticastInterface::IndexAndAddress(i, _)) => {
            s.leave_multicast_v4_n(&g, &InterfaceIndexOrAddress::Index(i))
        }
        (IpAddr::V6(g), MulticastInterface::Index(i) | MulticastInterface::IndexAndAddress(i, _)) => s.leave_multicast_v6(&g, i),
        (IpAddr::V6(_), MulticastInterface::Address(a)) => Err(invalid(format!("an IPv6 group is left by interface index, not {a}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lo0() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn a_failed_step_names_itself_and_keeps_the_os_error() {
        // Port 1 of an address this host does not have: bind(2) fails with an OS error.
        let e = UdpBuilder::new("192.0.2.1:1".parse().unwrap()).purpose("a test").bind().unwrap_err();
        assert!(e.to_string().contains("bind"), "{e}");
        let os = e.get_ref().and_then(|c| c.source()).and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(os.and_then(io::Error::raw_os_error), Some(libc::EADDRNOTAVAIL), "{e:?}");
    }

    #[test]
    fn options_are_applied_and_read_back() {
        let sock = UdpBuilder::new(lo0())
            .reuse_address(true)
            .reuse_port(true)
            .broadcast(true)
            .multicast_ttl(3)
            .multicast_loop(false)
            .multicast_interface(MulticastInterface::Address(Ipv4Addr::LOCALHOST))
            .nonblocking(true)
            .bind()
            .unwrap();
        let s = socket2::SockRef::from(&sock);
        assert!(s.reuse_address().unwrap());
        assert!(s.reuse_port().unwrap());
        assert!(s.broadcast().unwrap());
        assert_eq!(s.multicast_ttl_v4().unwrap(), 3);
        assert!(!s.multicast_loop_v4().unwrap());
        assert!(!s.multicast_all_v4().unwrap(), "IP_MULTICAST_ALL is off by default");
        assert_eq!(s.multicast_if_v4().unwrap(), Ipv4Addr::LOCALHOST);
        let mut b = [0u8; 4];
        assert_eq!(sock.recv(&mut b).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn buffers_report_what_was_granted() {
        let sock = UdpBuilder::new(lo0()).bind().unwrap();
        let got = force_buffer(&sock, Buffer::Receive, 1 << 20, "test");
        // As root the force succeeds exactly; otherwise rmem_max caps it (and a warning says so).
        assert!(got > 0);
        let reported = socket2::SockRef::from(&sock).recv_buffer_size().unwrap();
        assert_eq!(got, reported / 2);
        if is_root() {
            assert_eq!(got, 1 << 20);
        }
        assert!(force_buffer(&sock, Buffer::Send, 256 << 10, "test") > 0);
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
            .unwrap_or(false)
    }

    #[test]
    fn stop_receiving_wakes_a_blocked_receiver() {
        let peer = UdpBuilder::new(lo0()).bind().unwrap();
        let sock = std::sync::Arc::new(UdpBuilder::new(lo0()).connect(peer.local_addr().unwrap()).bind().unwrap());
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let blocked = {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 8];
                let t0 = std::time::Instant::now();
                (sock.recv(&mut b), t0.elapsed())
            })
        };
        // The receiver is in recv() (or about to be): shutting down wakes it either way.
        std::thread::sleep(Duration::from_millis(50));
        stop_receiving(&*sock).unwrap();
        let (got, waited) = blocked.join().unwrap();
        assert_eq!(got.unwrap(), 0);
        assert!(waited < Duration::from_secs(30));
        // Unconnected sockets too.
        stop_receiving(&UdpBuilder::new(lo0()).bind().unwrap()).unwrap();
    }

    #[test]
    fn connect_limits_the_socket_to_its_peer() {
        let a = UdpBuilder::new(lo0()).bind().unwrap();
        let stranger = UdpBuilder::new(lo0()).bind().unwrap();
        let b = UdpBuilder::new(lo0()).connect(a.local_addr().unwrap()).bind().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        stranger.send_to(b"no", b.local_addr().unwrap()).unwrap();
        a.send_to(b"yes", b.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 8];
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"yes");
    }

    #[test]
    fn multicast_on_loopback_reaches_a_joined_socket_only() {
        // Two sockets share the port; only the one that joined hears the group, because
        // IP_MULTICAST_ALL is off (with it on, both would).
        let lo = crate::interface("lo").unwrap();
        let group: Ipv4Addr = "239.255.77.1".parse().unwrap();
        let rx = UdpBuilder::new(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
            .reuse_address(true)
            .join(IpAddr::V4(group), MulticastInterface::Index(lo.index))
            .bind()
            .unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let port = rx.local_addr().unwrap().port();
        let bystander = UdpBuilder::new(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            .reuse_address(true)
            .nonblocking(true)
            .bind()
            .unwrap();
        let tx = UdpBuilder::new(lo0())
            .multicast_interface(MulticastInterface::IndexAndAddress(lo.index, Ipv4Addr::LOCALHOST))
            .multicast_loop(true)
            .multicast_ttl(0)
            .bind()
            .unwrap();
        tx.send_to(b"group", (group, port)).unwrap();
        let mut buf = [0u8; 8];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"group");
        assert_eq!(bystander.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        leave_group(&rx, IpAddr::V4(group), MulticastInterface::Index(lo.index)).unwrap();
        assert!(join_group(&rx, "10.0.0.1".parse().unwrap(), MulticastInterface::Index(lo.index)).is_err());
    }

    #[test]
    fn errors_name_the_socket() {
        let taken = UdpBuilder::new(lo0()).bind().unwrap();
        let e = UdpBuilder::new(taken.local_addr().unwrap()).purpose("TFTP requests").bind().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("TFTP requests"), "{e}");
        let e = UdpBuilder::new(lo0()).device(Some("no-such-if0")).bind().unwrap_err();
        assert!(e.to_string().contains("no-such-if0"), "{e}");
    }
}

//! Every socket this crate opens, and the few raw calls made on them, in one place: the
//! UDP and TCP sockets bound to a leased address, the shared DHCP socket, the ARP packet
//! socket and the netlink socket. Swapping in another socket layer means changing this
//! module only.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Receive buffer asked for on the shared DHCP socket: a thousand leases' replies arrive
/// in bursts.
const DHCP_RCVBUF: usize = 4 << 20;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The index of interface `name` in this thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { zeroed() };
    let b = name.as_bytes();
    if b.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

/// The hardware address of interface `name` (SIOCGIFHWADDR: asks the namespace the calling
/// thread is in, unlike `/sys/class/net`, which shows the one sysfs was mounted in).
pub fn hardware_address(name: &str) -> io::Result<[u8; 6]> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR fills the ifreq passed by pointer.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
    // SAFETY: the ioctl set the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// A UDP socket bound to `ip:port` (port 0: an ephemeral one), non-blocking.
pub fn udp_bound(ip: Ipv4Addr, port: u16) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((ip, port)).into())?;
    Ok(s.into())
}

/// A TCP socket bound to `ip` (ephemeral port), ready to connect, non-blocking.
pub fn tcp_bound(ip: Ipv4Addr) -> io::Result<tokio::net::TcpSocket> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((ip, 0)))?;
    Ok(s)
}

/// A blocking TCP connection from `ip` (ephemeral port) to `peer`.
pub fn tcp_connect_blocking(
    ip: Ipv4Addr,
    peer: SocketAddr,
    timeout: Duration,
) -> io::Result<std::net::TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::from((ip, 0)).into())?;
    s.connect_timeout(&peer.into(), timeout)?;
    Ok(s.into())
}

/// A TCP listener on `ip:port`, non-blocking.
pub fn tcp_listener(ip: Ipv4Addr, port: u16, backlog: u32) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((ip, port)).into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Shuts a socket down both ways, waking whoever waits on it. An unconnected UDP socket
/// reports ENOTCONN but is woken all the same (Linux's `inet_shutdown`).
pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor the caller keeps open for the call.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// UDP 0.0.0.0:68 on `interface` only, broadcast allowed, non-blocking: the one socket a
/// pool's DHCP clients share (replies are told apart by transaction id). Bound without
/// SO_REUSEADDR: a second DHCP client on the interface would get the unicast renewal
/// replies meant for this one, so it is refused (EADDRINUSE) instead.
pub fn dhcp_socket(interface: &str) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes()))?;
    let size = DHCP_RCVBUF as libc::c_int;
    // SAFETY: setsockopt with a valid fd and a c_int of the given length. As root,
    // SO_RCVBUFFORCE passes net.core.rmem_max; otherwise the polite request below.
    let forced = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = s.set_recv_buffer_size(DHCP_RCVBUF);
    }
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())?;
    Ok(s.into())
}

/// Sends `bytes` to `dest` out of interface `ifindex`, from `source` when given (a RENEW
/// or RELEASE must come from the leased address the server knows; the shared socket is
/// bound to 0.0.0.0). IP_PKTINFO's `ipi_spec_dst` picks the source address.
pub fn send_from(
    fd: RawFd,
    bytes: &[u8],
    source: Option<Ipv4Addr>,
    dest: SocketAddrV4,
    ifindex: u32,
) -> io::Result<usize> {
    // SAFETY: all structures are plain old data, sized as the kernel expects, and live
    // until sendmsg returns.
    unsafe {
        let mut to: libc::sockaddr_in = zeroed();
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_port = dest.port().to_be();
        to.sin_addr.s_addr = u32::from(*dest.ip()).to_be();
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut to as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // Room for one cmsg carrying an in_pktinfo, u64-aligned.
        let mut cbuf = [0u64; 8];
        let space = libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize;
        debug_assert!(space <= size_of::<[u64; 8]>());
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
        let info = libc::in_pktinfo {
            ipi_ifindex: ifindex as libc::c_int,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(source.unwrap_or(Ipv4Addr::UNSPECIFIED)).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::in_pktinfo, info);
        let n = libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

const ETH_P_ARP: u16 = 0x0806;

/// An AF_PACKET socket receiving and sending ARP on interface `ifindex` (link-layer header
/// left to the kernel: SOCK_DGRAM), non-blocking. Needs CAP_NET_RAW.
pub fn arp_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor we own, or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sll = link_addr(ifindex, None);
    // SAFETY: bind with a sockaddr_ll of the length given.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

fn link_addr(ifindex: u32, dest: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = ifindex as i32;
    if let Some(mac) = dest {
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&mac);
    }
    sll
}

/// Broadcasts one ARP packet (the 28-byte payload) on `ifindex`.
pub fn arp_send(fd: RawFd, ifindex: u32, payload: &[u8]) -> io::Result<()> {
    let sll = link_addr(ifindex, Some([0xff; 6]));
    // SAFETY: sendto with a buffer and a sockaddr_ll that outlive the call.
    cvt(unsafe {
        libc::sendto(
            fd,
            payload.as_ptr() as *const libc::c_void,
            payload.len(),
            0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) as libc::c_int
    })?;
    Ok(())
}

/// Receives one ARP payload; `Ok(None)` for a packet this host sent itself.
pub fn arp_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: recvfrom into a buffer and a sockaddr_ll of the lengths given.
    unsafe {
        let mut sll: libc::sockaddr_ll = zeroed();
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let n = libc::recvfrom(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
            &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
            &mut len,
        );
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((sll.sll_pkttype != libc::PACKET_OUTGOING).then_some(n as usize))
    }
}

/// A NETLINK_ROUTE socket, blocking, with a receive timeout so a lost answer cannot hang
/// its caller.
pub fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor we own, or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: fd was just returned by socket(2).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain old data; pid 0 lets the kernel assign one.
    let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: bind with a sockaddr_nl of the length given.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    SockRef::from(&fd).set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(fd)
}

/// Sends one netlink message to the kernel.
pub fn netlink_send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain old data; pid 0 is the kernel.
    let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sendto with a buffer and a sockaddr_nl that outlive the call.
    cvt(unsafe {
        libc::sendto(
            fd,
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) as libc::c_int
    })?;
    Ok(())
}

/// Receives one netlink datagram (possibly several messages).
pub fn netlink_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv into a buffer of the length given.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads `/proc/sys/net/ipv4/conf/IFACE/KEY` (the calling thread's namespace at the time
/// `/proc` resolves it: the process's, for a process started in the namespace).
pub fn ipv4_conf(interface: &str, key: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{interface}/{key}"))
        .map(|s| s.trim().to_string())
}

/// Writes `/proc/sys/net/ipv4/conf/IFACE/KEY`.
pub fn set_ipv4_conf(interface: &str, key: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{interface}/{key}"), value)
}

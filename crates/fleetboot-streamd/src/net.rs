//! Sockets for multicast streaming: interface resolution, the sender's and the receiver's
//! UDP sockets (socket2), buffer sizes checked against what the kernel granted, and a
//! nanosecond `ppoll` wait.

use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};

/// A local IPv4 interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its index.
    pub index: u32,
    /// Its (first) IPv4 address.
    pub addr: Ipv4Addr,
}

/// Every (interface name, index, IPv4 address) of this namespace.
pub fn interfaces() -> io::Result<Vec<Iface>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr of family sa_family.
        let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        if fam != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET addresses are sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        // SAFETY: ifa_name is a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_name is a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        if !out.iter().any(|i: &Iface| i.name == name) {
            out.push(Iface { name, index, addr });
        }
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Resolves an interface given by name (`eth0`) or by one of its IPv4 addresses.
pub fn resolve_iface(spec: &str) -> io::Result<Iface> {
    let all = interfaces()?;
    let found = match spec.parse::<Ipv4Addr>() {
        Ok(a) => all.into_iter().find(|i| i.addr == a),
        Err(_) => all.into_iter().find(|i| i.name == spec),
    };
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {spec:?} with an IPv4 address"),
        )
    })
}

/// The multicast group for an image when the operator names none: `239.192.X.Y` from the
/// first two bytes of its SHA-256 (administratively scoped, RFC 2365 organisation-local).
pub fn default_group(image_id: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(239, 192, image_id[0], image_id[1])
}

/// The default streaming port.
pub const DEFAULT_PORT: u16 = 10900;

/// Which buffer.
#[derive(Debug, Clone, Copy)]
pub enum Buf {
    Recv,
    Send,
}

/// Asks for a socket buffer of `want` bytes (with the root-only `*BUFFORCE` first, so the
/// lab is not capped by `rmem_max`), then reads back what the kernel granted. Linux
/// reports double the requested size; a grant below `want` is logged as a warning.
pub fn set_buffer(sock: &Socket, which: Buf, want: usize) -> usize {
    let (force, plain) = match which {
        Buf::Recv => (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        Buf::Send => (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    };
    let v: libc::c_int = want.min(i32::MAX as usize) as libc::c_int;
    let set = |opt| {
        // SAFETY: setsockopt with an int option value of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &v as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(force) != 0 {
        let _ = set(plain);
    }
    let got = match which {
        Buf::Recv => sock.recv_buffer_size(),
        Buf::Send => sock.send_buffer_size(),
    }
    .unwrap_or(0);
    // The kernel doubles the value for bookkeeping overhead.
    if got / 2 < want {
        tracing::warn!(
            buffer = ?which,
            wanted = want,
            granted = got / 2,
            "socket buffer capped by the kernel (raise net.core.rmem_max / wmem_max)"
        );
    }
    got / 2
}

/// `IP_MULTICAST_IF` by interface index (`ip_mreqn`), so the interface is explicit even
/// when several share an address.
fn set_multicast_if_index(sock: &Socket, iface: &Iface) -> io::Result<()> {
    let mreqn = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr { s_addr: 0 },
        imr_address: libc::in_addr {
            s_addr: u32::from(iface.addr).to_be(),
        },
        imr_ifindex: iface.index as libc::c_int,
    };
    // SAFETY: setsockopt with an ip_mreqn of the right size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            &mreqn as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::ip_mreqn>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Buffer sizes and TTL of a sender socket.
#[derive(Debug, Clone)]
pub struct SenderSocketOptions {
    pub ttl: u32,
    pub send_buffer: usize,
    pub recv_buffer: usize,
    /// Local port (0: any).
    pub port: u16,
}

/// The sender's socket: bound to the interface's address (receivers answer the ANNOUNCE's
/// source), multicast out of that interface only, loopback off, nonblocking.
pub fn sender_socket(iface: &Iface, o: &SenderSocketOptions) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(iface.name.as_bytes()))?;
    s.set_multicast_all_v4(false)?;
    set_multicast_if_index(&s, iface)?;
    s.set_multicast_ttl_v4(o.ttl)?;
    s.set_multicast_loop_v4(false)?;
    set_buffer(&s, Buf::Send, o.send_buffer);
    set_buffer(&s, Buf::Recv, o.recv_buffer);
    s.bind(&SocketAddr::V4(SocketAddrV4::new(iface.addr, o.port)).into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The receiver's socket: bound to the group's port on the wildcard address (the sender's
/// unicast REGISTERED and REPAIR arrive on it too), the group joined on `iface` only,
/// `IP_MULTICAST_ALL` off (no other group's traffic for this port), nonblocking.
pub fn receiver_socket(
    iface: &Iface,
    group: SocketAddrV4,
    recv_buffer: usize,
) -> io::Result<UdpSocket> {
    if !group.ip().is_multicast() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a multicast address", group.ip()),
        ));
    }
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(iface.name.as_bytes()))?;
    s.set_multicast_all_v4(false)?;
    set_multicast_if_index(&s, iface)?;
    set_buffer(&s, Buf::Recv, recv_buffer);
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())).into())?;
    s.join_multicast_v4_n(group.ip(), &InterfaceIndexOrAddress::Index(iface.index))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Waits until `sock` is readable or `timeout` passes (nanosecond resolution: the sender's
/// pacing waits are often well under a millisecond). Returns whether it is readable.
pub fn wait_readable(sock: &UdpSocket, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolves_by_name_and_address() {
        let lo = resolve_iface("lo").unwrap();
        assert_eq!(lo.addr, Ipv4Addr::LOCALHOST);
        assert_eq!(resolve_iface("127.0.0.1").unwrap().name, "lo");
        assert!(resolve_iface("no-such-if0").is_err());
    }

    #[test]
    fn default_group_is_org_local() {
        let g = default_group(&[0xab, 0xcd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(g, Ipv4Addr::new(239, 192, 0xab, 0xcd));
        assert!(g.is_multicast());
    }

    #[test]
    fn random_differs() {
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }
}

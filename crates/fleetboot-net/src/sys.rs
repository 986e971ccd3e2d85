//! The system calls, and every `unsafe` block of the crate: socket options socket2 does
//! not cover, `recvmsg`/`sendmsg` with IP_PKTINFO control messages, `sendmmsg`/`recvmmsg`,
//! `ppoll`. Each block says why it is sound.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// C structs for which all-zero bytes are a valid value (plain integers and pointers,
/// null allowed).
trait ZeroValid {}
impl ZeroValid for libc::iovec {}
impl ZeroValid for libc::msghdr {}
impl ZeroValid for libc::mmsghdr {}
impl ZeroValid for libc::sockaddr_in6 {}
impl<T: ZeroValid, const N: usize> ZeroValid for [T; N] {}

fn zeroed<T: ZeroValid>() -> T {
    // SAFETY: ZeroValid is implemented only for C structs (and arrays of them) whose
    // fields are integers or raw pointers, for which all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Datagrams per `sendmmsg`/`recvmmsg` call; larger batches take several calls.
pub(crate) const MMSG_BATCH: usize = 32;

/// Control-message space for one datagram: one `in6_pktinfo` (the larger of the two)
/// needs 40 bytes; 128 leaves room and keeps `cmsghdr` alignment (u64).
pub(crate) type Control = [u64; 16];
const CONTROL_LEN: usize = size_of::<Control>();

pub(crate) fn setsockopt<T>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, value as *const T as *const libc::c_void, size_of::<T>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

pub(crate) fn getsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live and `len` holds the size of `v`.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, &mut v as *mut libc::c_int as *mut libc::c_void, &mut len) };
    if rc == 0 { Ok(v) } else { Err(io::Error::last_os_error()) }
}

/// IP_PKTINFO (IPv4) or IPV6_RECVPKTINFO (IPv6; IPv4-mapped traffic on a dual-stack
/// socket reports IP_PKTINFO too, which is asked for as well when the kernel allows it).
pub(crate) fn enable_pktinfo(fd: BorrowedFd<'_>, v4: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    if v4 {
        setsockopt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, &on)
    } else {
        setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, &on)?;
        let _ = setsockopt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, &on);
        Ok(())
    }
}

/// `IP_MULTICAST_IF` with an `ip_mreqn`: by index, with `addr` as the multicast source.
pub(crate) fn set_multicast_if_v4(fd: BorrowedFd<'_>, index: u32, addr: Ipv4Addr) -> io::Result<()> {
    let mreqn = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr { s_addr: 0 },
        imr_address: libc::in_addr { s_addr: u32::from(addr).to_be() },
        imr_ifindex: index as libc::c_int,
    };
    setsockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &mreqn)
}

/// Room for an IPv4 or IPv6 socket address (`sockaddr_in6` is the larger).
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct RawAddr {
    addr: libc::sockaddr_in6,
}

impl RawAddr {
    pub(crate) fn empty() -> RawAddr {
        RawAddr { addr: zeroed() }
    }

    pub(crate) fn new(a: SocketAddr) -> (RawAddr, libc::socklen_t) {
        let mut r = RawAddr::empty();
        let len = match a {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in (16 bytes, align 4) fits in sockaddr_in6 (28, align 4).
                unsafe { std::ptr::write(&mut r.addr as *mut libc::sockaddr_in6 as *mut libc::sockaddr_in, sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                r.addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                r.addr.sin6_port = a.port().to_be();
                r.addr.sin6_flowinfo = a.flowinfo();
                r.addr.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
                r.addr.sin6_scope_id = a.scope_id();
                size_of::<libc::sockaddr_in6>()
            }
        };
        (r, len as libc::socklen_t)
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        &mut self.addr as *mut libc::sockaddr_in6 as *mut libc::c_void
    }

    pub(crate) fn capacity() -> libc::socklen_t {
        size_of::<libc::sockaddr_in6>() as libc::socklen_t
    }

    /// The address the kernel wrote (`len` bytes of it).
    pub(crate) fn get(&self, len: libc::socklen_t) -> Option<SocketAddr> {
        match i32::from(self.addr.sin6_family) {
            libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in for AF_INET; read unaligned-safe.
                let sin = unsafe { std::ptr::read(&self.addr as *const libc::sockaddr_in6 as *const libc::sockaddr_in) };
                Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(self.addr.sin6_addr.s6_addr),
                u16::from_be(self.addr.sin6_port),
                self.addr.sin6_flowinfo,
                self.addr.sin6_scope_id,
            ))),
            _ => None,
        }
    }
}

/// What IP_PKTINFO / IPV6_PKTINFO said about a received datagram.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PktInfo {
    pub destination: Option<IpAddr>,
    pub interface: Option<u32>,
}

/// Reads the pktinfo control message recvmsg wrote into `msg`'s control buffer.
fn read_pktinfo(msg: &libc::msghdr) -> PktInfo {
    let mut info = PktInfo::default();
    // SAFETY: `msg` was filled by recvmsg/recvmmsg: msg_control points to a buffer of
    // msg_controllen bytes that the CMSG_* macros walk within; the payloads are read
    // unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let p = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                    info.destination = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr))));
                    info.interface = u32::try_from(p.ipi_ifindex).ok();
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let p = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                    let a = Ipv6Addr::from(p.ipi6_addr.s6_addr);
                    info.destination = Some(a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4));
                    info.interface = Some(p.ipi6_ifindex);
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    info
}

/// Writes a pktinfo control message choosing `source` as the datagram's local address
/// into `control` and points `msg` at it.
fn write_source(msg: &mut libc::msghdr, control: &mut Control, source: IpAddr) {
    // SAFETY: `control` is CONTROL_LEN bytes, aligned for cmsghdr, and large enough for
    // CMSG_SPACE of either pktinfo; CMSG_FIRSTHDR on a msghdr whose msg_control and
    // msg_controllen describe it returns a pointer inside it.
    unsafe {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        let (level, kind, len) = match source {
            IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, size_of::<libc::in_pktinfo>()),
            IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, size_of::<libc::in6_pktinfo>()),
        };
        msg.msg_controllen = libc::CMSG_SPACE(len as u32) as _;
        let c = libc::CMSG_FIRSTHDR(msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
        match source {
            IpAddr::V4(a) => {
                let p = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from(a).to_be() },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in_pktinfo, p);
            }
            IpAddr::V6(a) => {
                let p = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: a.octets() }, ipi6_ifindex: 0 };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, p);
            }
        }
    }
}

/// One received datagram's facts.
pub(crate) struct Received {
    pub len: usize,
    pub source: Option<SocketAddr>,
    pub info: PktInfo,
    pub truncated: bool,
}

/// recvmsg(2) with room for a pktinfo control message.
pub(crate) fn recvmsg(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut name = RawAddr::empty();
    let mut control: Control = [0; 16];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut msg: libc::msghdr = zeroed();
    msg.msg_name = name.as_mut_ptr();
    msg.msg_namelen = RawAddr::capacity();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = CONTROL_LEN as _;
    // SAFETY: msg points at name, iov (over `buf`) and control, all live for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Received {
        len: n as usize,
        source: name.get(msg.msg_namelen),
        info: read_pktinfo(&msg),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

/// One datagram, to `to` (or the connected peer) from `source` (or the socket's choice):
/// sendto(2) when no source is chosen (the cheapest call: a lock-step transfer makes one
/// per block), sendmsg(2) with a pktinfo control message otherwise.
pub(crate) fn sendmsg(fd: BorrowedFd<'_>, bytes: &[u8], to: Option<SocketAddr>, source: Option<IpAddr>) -> io::Result<usize> {
    if source.is_none() {
        let mut name = to.map(RawAddr::new);
        let (ptr, len) = match name.as_mut() {
            Some((raw, len)) => (raw.as_mut_ptr() as *const libc::sockaddr, *len),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `bytes` is live and only read; `ptr` is null (len 0) or points at a
        // sockaddr of `len` bytes that lives for the call.
        let n = unsafe { libc::sendto(fd.as_raw_fd(), bytes.as_ptr() as *const libc::c_void, bytes.len(), 0, ptr, len) };
        return if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
    }
    let mut control: Control = [0; 16];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let mut msg: libc::msghdr = zeroed();
    let mut name = to.map(RawAddr::new);
    if let Some((raw, len)) = name.as_mut() {
        msg.msg_name = raw.as_mut_ptr();
        msg.msg_namelen = *len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(src) = source {
        write_source(&mut msg, &mut control, src);
    }
    // SAFETY: msg points at name, iov (over `bytes`, only read) and control, live for the call.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// One datagram of a sendmmsg batch.
#[derive(Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    pub bytes: &'a [u8],
    pub to: Option<SocketAddr>,
    pub source: Option<IpAddr>,
}

/// sendmmsg(2) of up to [`MMSG_BATCH`] datagrams (the rest are ignored). Returns how many
/// the kernel took, from the first; an error only when it took none.
pub(crate) fn sendmmsg(fd: BorrowedFd<'_>, batch: &[Outgoing<'_>]) -> io::Result<usize> {
    let n = batch.len().min(MMSG_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iov: [libc::iovec; MMSG_BATCH] = zeroed();
    let mut msgs: [libc::mmsghdr; MMSG_BATCH] = zeroed();
    let mut names = [RawAddr::empty(); MMSG_BATCH];
    let any_source = batch[..n].iter().any(|d| d.source.is_some());
    let mut controls: Vec<Control> = if any_source { vec![[0; 16]; n] } else { Vec::new() };
    for i in 0..n {
        let d = &batch[i];
        iov[i] = libc::iovec { iov_base: d.bytes.as_ptr() as *mut libc::c_void, iov_len: d.bytes.len() };
        let h = &mut msgs[i].msg_hdr;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
        if let Some(to) = d.to {
            let (raw, len) = RawAddr::new(to);
            names[i] = raw;
            h.msg_name = names[i].as_mut_ptr();
            h.msg_namelen = len;
        }
        if let Some(src) = d.source {
            write_source(h, &mut controls[i], src);
        }
    }
    // SAFETY: msgs[..n] point at iovecs (over the callers' byte slices, only read), names
    // and controls that all live until this function returns.
    let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
}

/// recvmmsg(2) into `slots` (at most [`MMSG_BATCH`]), waiting for the first datagram only
/// (`MSG_WAITFORONE`; a nonblocking socket with nothing queued gives `WouldBlock`).
pub(crate) fn recvmmsg(fd: BorrowedFd<'_>, slots: &mut [&mut [u8]], out: &mut Vec<Received>) -> io::Result<usize> {
    let n = slots.len().min(MMSG_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iov: [libc::iovec; MMSG_BATCH] = zeroed();
    let mut msgs: [libc::mmsghdr; MMSG_BATCH] = zeroed();
    let mut names = [RawAddr::empty(); MMSG_BATCH];
    let mut controls: [Control; MMSG_BATCH] = [[0; 16]; MMSG_BATCH];
    for i in 0..n {
        iov[i] = libc::iovec { iov_base: slots[i].as_mut_ptr() as *mut libc::c_void, iov_len: slots[i].len() };
        let h = &mut msgs[i].msg_hdr;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
        h.msg_name = names[i].as_mut_ptr();
        h.msg_namelen = RawAddr::capacity();
        h.msg_control = controls[i].as_mut_ptr() as *mut libc::c_void;
        h.msg_controllen = CONTROL_LEN as _;
    }
    // SAFETY: msgs[..n] point at iovecs over the exclusively borrowed slots, names and
    // controls, all live for the call; no timeout.
    let r = unsafe {
        libc::recvmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_WAITFORONE, std::ptr::null_mut())
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = r as usize;
    for i in 0..got {
        let h = &msgs[i].msg_hdr;
        out.push(Received {
            len: msgs[i].msg_len as usize,
            source: names[i].get(h.msg_namelen),
            info: read_pktinfo(h),
            truncated: h.msg_flags & libc::MSG_TRUNC != 0,
        });
    }
    Ok(got)
}

/// ppoll(2) for readability of `fds` (their `revents` are filled in), waiting at most
/// `timeout` (`None`: until one is ready). Returns how many are ready; an interrupted
/// wait returns 0.
pub(crate) fn ppoll(fds: &mut [libc::pollfd], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is an exclusively borrowed array of fds.len() pollfds, `tsp` null or
    // pointing at a live timespec; no signal mask.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, tsp, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

//! Adding and removing IPv4 addresses over rtnetlink, with the kernel's lifetimes.
//!
//! [`AddressTable`] is what the pools need: add an address with a valid and preferred
//! lifetime (the kernel deletes it by itself when the valid one runs out, so an address
//! outlives no lease even when the process holding it is killed), extend those lifetimes
//! at each renewal, remove it, list what is on an interface. [`Netlink`] implements it
//! with three message types built here by hand (RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR):
//! synchronous calls of a few microseconds, usable from async tasks and plain threads
//! alike, with no runtime or connection task of their own.
//!
//! Why not the `rtnetlink` crate: it is async-only (a connection future must be spawned on
//! a tokio runtime before any request), and setting an address's lifetimes there means
//! building `netlink-packet-route` attributes whose types were renamed in each of its last
//! releases. Three fixed message layouts from `linux/if_addr.h` are less to keep working
//! than that; the trait keeps the choice reversible.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::sys;

/// An address's kernel lifetimes in seconds; `None` is forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub valid: Option<u32>,
    pub preferred: Option<u32>,
}

impl Lifetime {
    /// Valid and preferred for `secs` (at least 1: 0 would delete at once).
    pub fn secs(secs: u32) -> Lifetime {
        Lifetime {
            valid: Some(secs.max(1)),
            preferred: Some(secs.max(1)),
        }
    }

    pub const FOREVER: Lifetime = Lifetime {
        valid: None,
        preferred: None,
    };
}

/// One IPv4 address on an interface, as the kernel lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstalledAddr {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// Seconds left; `None` for forever.
    pub valid_left: Option<u32>,
}

/// The interface's address table, as the pools use it.
pub trait AddressTable: Send + Sync + 'static {
    /// Adds `ip/prefix_len` (with its broadcast address) to interface `ifindex`. Fails
    /// with `AlreadyExists` when the interface already has it.
    fn add(&self, ifindex: u32, ip: Ipv4Addr, prefix_len: u8, life: Lifetime) -> io::Result<()>;
    /// Sets new lifetimes on an address already there.
    fn refresh(&self, ifindex: u32, ip: Ipv4Addr, prefix_len: u8, life: Lifetime)
        -> io::Result<()>;
    /// Removes it; `Ok(false)` when it was not there (its lifetime ended, or the interface
    /// went away).
    fn remove(&self, ifindex: u32, ip: Ipv4Addr, prefix_len: u8) -> io::Result<bool>;
    /// The IPv4 addresses on interface `ifindex`.
    fn list(&self, ifindex: u32) -> io::Result<Vec<InstalledAddr>>;
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_ROOT: u16 = 0x100;
const NLM_F_MATCH: u16 = 0x200;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_CACHEINFO: u16 = 6;
const INFINITY_LIFE_TIME: u32 = u32::MAX;
const NLMSG_HDRLEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;

/// The kernel's address table over a NETLINK_ROUTE socket (see the module documentation).
pub struct Netlink {
    fd: Mutex<OwnedFd>,
    seq: AtomicU32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align4(buf.len()), 0);
}

/// The header and `ifaddrmsg` of an address request; the length is patched at the end.
fn address_message(kind: u16, flags: u16, seq: u32, ifindex: u32, prefix_len: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // ifaddrmsg: family, prefixlen, flags, scope (universe), index
    b.extend_from_slice(&[libc::AF_INET as u8, prefix_len, 0, 0]);
    b.extend_from_slice(&ifindex.to_ne_bytes());
    b
}

fn finish(mut b: Vec<u8>) -> Vec<u8> {
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_ne_bytes());
    b
}

fn broadcast_of(ip: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    (prefix_len < 31).then(|| Ipv4Addr::from(u32::from(ip) | (u32::MAX >> prefix_len)))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One message of a netlink datagram: (type, seq, payload after the header).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u32_at(buf, at)? as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return None;
        }
        let kind = u16_at(buf, at + 4)?;
        let seq = u32_at(buf, at + 8)?;
        let payload = &buf[at + NLMSG_HDRLEN..at + len];
        at += align4(len);
        Some((kind, seq, payload))
    })
}

/// The address in an RTM_NEWADDR payload (`ifaddrmsg` + attributes), if IPv4.
fn parse_address(payload: &[u8]) -> Option<(u32, InstalledAddr)> {
    if payload.len() < IFADDRMSG_LEN || payload[0] != libc::AF_INET as u8 {
        return None;
    }
    let prefix_len = payload[1];
    let index = u32_at(payload, 4)?;
    let (mut local, mut address, mut valid_left) = (None, None, None);
    let mut at = IFADDRMSG_LEN;
    while at + 4 <= payload.len() {
        let len = u16_at(payload, at)? as usize;
        let kind = u16_at(payload, at + 2)?;
        if len < 4 || at + len > payload.len() {
            break;
        }
        let data = &payload[at + 4..at + len];
        let ip = || <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from);
        match kind {
            IFA_LOCAL => local = ip(),
            IFA_ADDRESS => address = ip(),
            IFA_CACHEINFO => {
                valid_left = u32_at(data, 4).filter(|&v| v != INFINITY_LIFE_TIME);
            }
            _ => {}
        }
        at += align4(len);
    }
    Some((
        index,
        InstalledAddr {
            ip: local.or(address)?,
            prefix_len,
            valid_left,
        },
    ))
}

impl Netlink {
    pub fn new() -> io::Result<Netlink> {
        Ok(Netlink {
            fd: Mutex::new(sys::netlink_socket()?),
            seq: AtomicU32::new(1),
        })
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a request with NLM_F_ACK and waits for its acknowledgement.
    fn request(&self, msg: Vec<u8>, seq: u32) -> io::Result<()> {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        sys::netlink_send(fd.as_raw_fd(), &msg)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = sys::netlink_recv(fd.as_raw_fd(), &mut buf)?;
            for (kind, got, payload) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR && got == seq {
                    let errno = i32::from_ne_bytes(
                        payload.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]),
                    );
                    return match errno {
                        0 => Ok(()),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
            }
        }
    }

    fn set(
        &self,
        flags: u16,
        ifindex: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
        life: Lifetime,
    ) -> io::Result<()> {
        let seq = self.next_seq();
        let mut b = address_message(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            ifindex,
            prefix_len,
        );
        push_attr(&mut b, IFA_LOCAL, &ip.octets());
        push_attr(&mut b, IFA_ADDRESS, &ip.octets());
        if let Some(brd) = broadcast_of(ip, prefix_len) {
            push_attr(&mut b, IFA_BROADCAST, &brd.octets());
        }
        let valid = life.valid.unwrap_or(INFINITY_LIFE_TIME);
        let preferred = life.preferred.unwrap_or(INFINITY_LIFE_TIME).min(valid);
        let mut cache = Vec::with_capacity(16);
        for v in [preferred, valid, 0, 0] {
            cache.extend_from_slice(&v.to_ne_bytes());
        }
        push_attr(&mut b, IFA_CACHEINFO, &cache);
        self.request(finish(b), seq)
    }
}

impl AddressTable for Netlink {
    fn add(&self, ifindex: u32, ip: Ipv4Addr, prefix_len: u8, life: Lifetime) -> io::Result<()> {
        self.set(NLM_F_CREATE | NLM_F_EXCL, ifindex, ip, prefix_len, life)
    }

    fn refresh(
        &self,
        ifindex: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
        life: Lifetime,
    ) -> io::Result<()> {
        self.set(NLM_F_REPLACE, ifindex, ip, prefix_len, life)
    }

    fn remove(&self, ifindex: u32, ip: Ipv4Addr, prefix_len: u8) -> io::Result<bool> {
        let seq = self.next_seq();
        let mut b = address_message(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            ifindex,
            prefix_len,
        );
        push_attr(&mut b, IFA_LOCAL, &ip.octets());
        match self.request(finish(b), seq) {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ENODEV)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn list(&self, ifindex: u32) -> io::Result<Vec<InstalledAddr>> {
        let seq = self.next_seq();
        let b = address_message(
            RTM_GETADDR,
            NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH,
            seq,
            0,
            0,
        );
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        sys::netlink_send(fd.as_raw_fd(), &finish(b))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        loop {
            let n = sys::netlink_recv(fd.as_raw_fd(), &mut buf)?;
            for (kind, got, payload) in messages(&buf[..n]) {
                if got != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = u32_at(payload, 0).unwrap_or(0) as i32;
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    RTM_NEWADDR => {
                        if let Some((index, a)) = parse_address(payload) {
                            if index == ifindex {
                                out.push(a);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_address_message_layout() {
        let mut b = address_message(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK, 7, 3, 20);
        push_attr(&mut b, IFA_LOCAL, &[10, 78, 1, 2]);
        let b = finish(b);
        assert_eq!(b.len(), 16 + 8 + 8);
        assert_eq!(u32_at(&b, 0), Some(32));
        assert_eq!(u16_at(&b, 4), Some(RTM_NEWADDR));
        assert_eq!(u32_at(&b, 8), Some(7));
        assert_eq!(&b[16..20], &[libc::AF_INET as u8, 20, 0, 0]);
        assert_eq!(u32_at(&b, 20), Some(3));
        assert_eq!(u16_at(&b, 24), Some(8));
        assert_eq!(u16_at(&b, 26), Some(IFA_LOCAL));
        assert_eq!(&b[28..32], &[10, 78, 1, 2]);
    }

    #[test]
    fn broadcast_addresses() {
        let ip = Ipv4Addr::new(10, 78, 3, 4);
        assert_eq!(broadcast_of(ip, 20), Some(Ipv4Addr::new(10, 78, 15, 255)));
        assert_eq!(broadcast_of(ip, 24), Some(Ipv4Addr::new(10, 78, 3, 255)));
        assert_eq!(broadcast_of(ip, 31), None);
        assert_eq!(broadcast_of(ip, 32), None);
    }

    #[test]
    fn parses_what_it_builds_and_never_panics_on_garbage() {
        let mut b = address_message(RTM_NEWADDR, 0, 1, 9, 24);
        push_attr(&mut b, IFA_ADDRESS, &[10, 0, 0, 1]);
        push_attr(&mut b, IFA_LOCAL, &[10, 0, 0, 2]);
        let mut cache = Vec::new();
        for v in [30u32, 60, 0, 0] {
            cache.extend_from_slice(&v.to_ne_bytes());
        }
        push_attr(&mut b, IFA_CACHEINFO, &cache);
        let b = finish(b);
        let all: Vec<_> = messages(&b).collect();
        assert_eq!(all.len(), 1);
        let (index, a) = parse_address(all[0].2).unwrap();
        assert_eq!(index, 9);
        assert_eq!(
            a,
            InstalledAddr {
                ip: Ipv4Addr::new(10, 0, 0, 2),
                prefix_len: 24,
                valid_left: Some(60)
            }
        );
        // Every truncation and a few corruptions: no panic.
        for cut in 0..b.len() {
            for (_, _, p) in messages(&b[..cut]) {
                let _ = parse_address(p);
            }
            let _ = parse_address(&b[16..cut.max(16)]);
        }
        let mut bad = b.clone();
        bad[24] = 0xff; // attribute length past the end
        for (_, _, p) in messages(&bad) {
            let _ = parse_address(p);
        }
    }
}

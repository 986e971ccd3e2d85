//! A raw ICMPv6 socket on one interface (router advertisements).

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

/// A raw ICMPv6 socket bound to one interface: NDP messages (router solicitations and
/// advertisements) are sent to and heard from that link only. The kernel fills in the
/// ICMPv6 checksum.
#[derive(Debug)]
pub struct Icmpv6Socket {
    sock: Socket,
    index: u32,
}

impl Icmpv6Socket {
    /// Opens the socket on interface `device` with unicast and multicast hop limit
    /// `hop_limit` (NDP requires 255: receivers drop anything else).
    pub fn open(device: &str, hop_limit: u32) -> io::Result<Icmpv6Socket> {
        let index = crate::interface_index(device)?;
        let ctx = |what: &str| {
            let what = format!("ICMPv6 on {device}: {what}");
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(ctx("socket"))?;
        sock.bind_device(Some(device.as_bytes())).map_err(ctx("SO_BINDTODEVICE"))?;
        sock.set_multicast_hops_v6(hop_limit).map_err(ctx("multicast hops"))?;
        sock.set_unicast_hops_v6(hop_limit).map_err(ctx("unicast hops"))?;
        sock.set_multicast_if_v6(index).map_err(ctx("IPV6_MULTICAST_IF"))?;
        Ok(Icmpv6Socket { sock, index })
    }

    /// The interface's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Joins a link-local group (such as ff02::2, all routers) on the interface.
    pub fn join(&self, group: Ipv6Addr) -> io::Result<()> {
        self.sock.join_multicast_v6(&group, self.index)
    }

    /// How long [`Icmpv6Socket::recv`] waits (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }

    /// One ICMPv6 message (type, code, checksum, body), without the IPv6 header.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.sock).read(buf)
    }

    /// Sends an ICMPv6 message to `dest` on this interface.
    pub fn send_to(&self, message: &[u8], dest: Ipv6Addr) -> io::Result<usize> {
        self.sock.send_to(message, &SockAddr::from(SocketAddrV6::new(dest, 0, 0, self.index)))
    }
}

impl AsFd for Icmpv6Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_interface_is_named() {
        let e = Icmpv6Socket::open("no-such-if0", 255).unwrap_err();
        assert!(e.to_string().contains("no-such-if0"), "{e}");
    }
}

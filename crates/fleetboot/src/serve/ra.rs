//! IPv6 router advertisements on the server's interface.
//!
//! iPXE configures IPv6 alongside DHCPv4 and waits ~13 s for a router advertisement
//! before booting over IPv4. On a lab or boot network without an IPv6 router, answering
//! its router solicitation with an advertisement that offers no route and no prefix
//! (router lifetime 0, no M/O flags) ends that wait without changing anyone's routing.

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const UNSOLICITED_EVERY: Duration = Duration::from_secs(60);

/// An RA that says "I am not a default router; no prefixes; no DHCPv6".
pub fn advertisement() -> [u8; 16] {
    let mut ra = [0u8; 16];
    ra[0] = ROUTER_ADVERTISEMENT;
    // code 0; checksum (bytes 2..4) is filled in by the kernel for ICMPv6 raw sockets
    ra[4] = 64; // current hop limit
                // flags 0, router lifetime 0, reachable time 0, retrans timer 0
    ra
}

pub fn run(interface: &str) -> Result<()> {
    let ifindex = nix_ifindex(interface)?;
    let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).context("raw ICMPv6 socket")?;
    sock.bind_device(Some(interface.as_bytes())).with_context(|| format!("binding to {interface}"))?;
    // NDP messages must arrive with hop limit 255 or receivers drop them (RFC 4861 §6.1.2).
    sock.set_multicast_hops_v6(255)?;
    sock.set_unicast_hops_v6(255)?;
    sock.set_multicast_if_v6(ifindex)?;
    sock.join_multicast_v6(&ALL_ROUTERS, ifindex).context("joining ff02::2")?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let dest = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, ifindex));
    let ra = advertisement();
    let mut last_sent = None::<Instant>;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    tracing::info!(interface, "sending IPv6 router advertisements (no prefix, lifetime 0)");
    loop {
        let solicited = match sock.recv(&mut buf) {
            // SAFETY: recv initialised the first n bytes.
            Ok(n) if n > 0 => (unsafe { buf[0].assume_init() }) == ROUTER_SOLICITATION,
            _ => false,
        };
        if solicited || last_sent.is_none_or(|t| t.elapsed() >= UNSOLICITED_EVERY) {
            if let Err(e) = sock.send_to(&ra, &dest) {
                tracing::warn!(error = %e, "sending a router advertisement failed");
            }
            last_sent = Some(Instant::now());
        }
    }
}

fn nix_ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        anyhow::bail!("server.interface: no interface named {name:?}");
    }
    Ok(idx)
}

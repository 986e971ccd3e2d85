//! IPv6 router advertisements on the server's interface.
//!
//! iPXE configures IPv6 alongside DHCPv4 and waits ~13 s for a router advertisement
//! before booting over IPv4. On a lab or boot network without an IPv6 router, answering
//! its router solicitation with an advertisement that offers no route and no prefix
//! (router lifetime 0, no M/O flags) ends that wait without changing anyone's routing.

use anyhow::{Context, Result};
use fleetboot_net::Icmpv6Socket;
use std::net::Ipv6Addr;
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
    // NDP messages must arrive with hop limit 255 or receivers drop them (RFC 4861 §6.1.2).
    let sock = Icmpv6Socket::open(interface, 255).with_context(|| format!("server.interface {interface:?}"))?;
    sock.join(ALL_ROUTERS).context("joining ff02::2")?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let ra = advertisement();
    let mut last_sent = None::<Instant>;
    let mut buf = [0u8; 1500];
    tracing::info!(interface, "sending IPv6 router advertisements (no prefix, lifetime 0)");
    loop {
        let solicited = matches!(sock.recv(&mut buf), Ok(n) if n > 0 && buf[0] == ROUTER_SOLICITATION);
        if solicited || last_sent.is_none_or(|t| t.elapsed() >= UNSOLICITED_EVERY) {
            if let Err(e) = sock.send_to(&ra, ALL_NODES) {
                tracing::warn!(error = %e, "sending a router advertisement failed");
            }
            last_sent = Some(Instant::now());
        }
    }
}

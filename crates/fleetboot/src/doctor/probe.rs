//! Is there another DHCP server on the segment? One DHCPDISCOVER, sent the way a PXE ROM
//! sends it (broadcast, vendor class `PXEClient`, a random locally administered MAC), and
//! every OFFER heard within the wait. No REQUEST follows, so no server commits a lease: an
//! offer is only held for its client for a while (fleetboot: `dhcp.offer_hold`).

use fleetboot_boot::MacAddr;
use fleetboot_dhcp::codec::{opt, BOOTREPLY, FLAG_BROADCAST};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

/// An OFFER heard in answer to the probe.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Offer {
    /// Where the datagram came from.
    pub from: SocketAddr,
    /// Option 54, the server identifier.
    pub server_id: Option<Ipv4Addr>,
    /// The address offered; unspecified in a ProxyDHCP offer.
    pub address: Option<Ipv4Addr>,
    /// Vendor class `PXEClient` in the answer: a PXE (or ProxyDHCP) server.
    pub pxe: bool,
    /// The boot file it names, if any.
    pub boot_file: Option<String>,
}

/// The probe's DISCOVER: a BIOS PXE ROM (architecture 0, UNDI 2.1) with `mac`, asking for
/// a broadcast answer (it has no address to be unicast to).
pub fn discover(mac: MacAddr, xid: u32) -> DhcpMessage {
    let mut m = DhcpMessage { xid, flags: FLAG_BROADCAST, ..DhcpMessage::default() };
    m.set_mac(mac);
    m.set_option(opt::MESSAGE_TYPE, vec![MessageType::Discover as u8]);
    m.set_option(opt::VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001".to_vec());
    m.set_option(opt::CLIENT_ARCH, vec![0, 0]);
    m.set_option(opt::CLIENT_NII, vec![1, 2, 1]);
    let mut uuid = vec![0u8];
    uuid.extend_from_slice(&[0u8; 10]);
    uuid.extend_from_slice(&mac.0);
    m.set_option(opt::CLIENT_UUID, uuid);
    m.set_option(opt::PARAMETER_LIST, vec![1, 3, 6, 43, 54, 60, 66, 67, 97]);
    m
}

/// The OFFER in `bytes` if it answers the DISCOVER `(mac, xid)`; anything else (other
/// clients' traffic, malformed datagrams) is `None`.
pub fn offer_for(bytes: &[u8], from: SocketAddr, mac: MacAddr, xid: u32) -> Option<Offer> {
    let m = DhcpMessage::parse(bytes).ok()?;
    if m.op != BOOTREPLY || m.xid != xid || m.mac() != mac || m.message_type() != Some(MessageType::Offer) {
        return None;
    }
    let file = m
        .option(opt::BOOTFILE)
        .map(<[u8]>::to_vec)
        .or_else(|| (!m.file.is_empty()).then(|| m.file.clone()))
        .map(|f| String::from_utf8_lossy(&f).trim_end_matches('\0').to_string());
    Some(Offer {
        from,
        server_id: m.server_id(),
        address: (!m.yiaddr.is_unspecified()).then_some(m.yiaddr),
        pxe: m.vendor_class().is_some_and(|v| v.starts_with("PXEClient")),
        boot_file: file,
    })
}

/// A MAC no real machine has: random, locally administered, unicast.
pub fn random_mac() -> (MacAddr, u32) {
    let mut b = [0u8; 10];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if filled.is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b.copy_from_slice(&t.as_nanos().to_le_bytes()[..10]);
    }
    b[0] = (b[0] & 0xfc) | 0x02;
    let mac = MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]);
    (mac, u32::from_le_bytes([b[6], b[7], b[8], b[9]]))
}

/// Sends the probe on `interface` from port `client_port` (68) to `server_port` (67) and
/// collects the OFFERs heard within `wait`.
pub fn run(interface: &str, server_port: u16, client_port: u16, wait: Duration) -> std::io::Result<(MacAddr, Vec<Offer>)> {
    let (mac, xid) = random_mac();
    let sock: UdpSocket = fleetboot_net::UdpBuilder::new(SocketAddr::from((Ipv4Addr::UNSPECIFIED, client_port)))
        .device(Some(interface))
        .reuse_address(true)
        .broadcast(true)
        .purpose("DHCP probe")
        .bind()?;
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, server_port);
    sock.send_to(&discover(mac, xid).encode(), to)?;
    let deadline = Instant::now() + wait;
    let mut offers = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if let Some(o) = offer_for(&buf[..n], from, mac, xid) {
                    if !offers.contains(&o) {
                        offers.push(o);
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((mac, offers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(mac: MacAddr, xid: u32, yiaddr: Ipv4Addr, pxe: bool) -> Vec<u8> {
        let mut m = DhcpMessage { op: BOOTREPLY, xid, yiaddr, ..DhcpMessage::default() };
        m.set_mac(mac);
        m.set_option(opt::MESSAGE_TYPE, vec![MessageType::Offer as u8]);
        m.set_option(opt::SERVER_ID, vec![10, 0, 0, 2]);
        if pxe {
            m.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
            m.file = b"pxelinux.0".to_vec();
        }
        m.encode()
    }

    #[test]
    fn the_discover_looks_like_a_pxe_rom_asking_for_a_broadcast_answer() {
        let (mac, xid) = random_mac();
        assert_eq!(mac.0[0] & 0x03, 0x02, "locally administered, unicast: {mac}");
        let m = DhcpMessage::parse(&discover(mac, xid).encode()).unwrap();
        assert_eq!(m.message_type(), Some(MessageType::Discover));
        assert_eq!((m.xid, m.mac(), m.flags & FLAG_BROADCAST), (xid, mac, FLAG_BROADCAST));
        assert!(m.vendor_class().unwrap().starts_with("PXEClient:Arch:00000"));
        assert_eq!(m.client_arch(), Some(0));
    }

    #[test]
    fn only_offers_for_our_discover_count() {
        let (mac, xid) = random_mac();
        let from: SocketAddr = "10.0.0.2:67".parse().unwrap();
        let o = offer_for(&offer(mac, xid, Ipv4Addr::new(10, 0, 0, 9), false), from, mac, xid).unwrap();
        assert_eq!((o.address, o.server_id, o.pxe), (Some(Ipv4Addr::new(10, 0, 0, 9)), Some(Ipv4Addr::new(10, 0, 0, 2)), false));
        let p = offer_for(&offer(mac, xid, Ipv4Addr::UNSPECIFIED, true), from, mac, xid).unwrap();
        assert_eq!((p.address, p.pxe, p.boot_file.as_deref()), (None, true, Some("pxelinux.0")));
        assert!(offer_for(&offer(mac, xid ^ 1, Ipv4Addr::new(10, 0, 0, 9), false), from, mac, xid).is_none());
        let other = MacAddr([2, 0, 0, 0, 0, 1]);
        assert!(offer_for(&offer(other, xid, Ipv4Addr::new(10, 0, 0, 9), false), from, mac, xid).is_none());
        assert!(offer_for(b"\x02garbage", from, mac, xid).is_none());
        assert!(offer_for(&discover(mac, xid).encode(), from, mac, xid).is_none(), "our own DISCOVER looped back");
    }
}

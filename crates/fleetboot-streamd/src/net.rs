//! What is particular to streaming about sockets: the interface a session runs on, its
//! default group and port, and the two sockets, all built with `fleetboot_net` (the
//! only crate that makes socket calls). Random ids, keys and nonces come from the OS.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use fleetboot_net::{Buffer, MulticastInterface, UdpBuilder};

/// The local interface a session runs on, with the IPv4 address it sends from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its index.
    pub index: u32,
    /// Its (first) IPv4 address.
    pub addr: Ipv4Addr,
}

/// Resolves an interface given by name (`eth0`) or by one of its IPv4 addresses; it
/// must have an IPv4 address (the sender binds to it, receivers answer it).
pub fn resolve_iface(spec: &str) -> io::Result<Iface> {
    let i = fleetboot_net::interface(spec)?;
    let addr = match spec.parse::<Ipv4Addr>() {
        Ok(a) => a,
        Err(_) => i.first_ipv4().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("interface {spec:?} has no IPv4 address"))
        })?,
    };
    Ok(Iface { name: i.name, index: i.index, addr })
}

/// The multicast group for an image when the operator names none: `239.192.X.Y` from the
/// first two bytes of its SHA-256 (administratively scoped, RFC 2365 organisation-local).
pub fn default_group(image_id: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(239, 192, image_id[0], image_id[1])
}

/// The default streaming port.
pub const DEFAULT_PORT: u16 = 10900;

/// Buffer sizes and TTL of a sender socket.
#[derive(Debug, Clone)]
pub struct SenderSocketOptions {
    pub ttl: u32,
    pub send_buffer: usize,
    pub recv_buffer: usize,
    /// Local port (0: any).
    pub port: u16,
}

fn multicast_if(iface: &Iface) -> MulticastInterface {
    // By index, with the address as the source: explicit even when several interfaces
    // share an address.
    MulticastInterface::IndexAndAddress(iface.index, iface.addr)
}

/// The sender's socket: bound to the interface's address (receivers answer the ANNOUNCE's
/// source) and to the interface itself, multicast out of that interface only, loopback
/// off, nonblocking.
pub fn sender_socket(iface: &Iface, o: &SenderSocketOptions) -> io::Result<UdpSocket> {
    UdpBuilder::new(SocketAddr::V4(SocketAddrV4::new(iface.addr, o.port)))
        .reuse_address(true)
        .device(Some(&iface.name))
        .multicast_interface(multicast_if(iface))
        .multicast_ttl(o.ttl)
        .multicast_loop(false)
        .buffer(Buffer::Send, o.send_buffer)
        .buffer(Buffer::Receive, o.recv_buffer)
        .nonblocking(true)
        .purpose("stream sender")
        .bind()
}

/// The receiver's socket: bound to the group's port on the wildcard address (the sender's
/// unicast REGISTERED and REPAIR arrive on it too) and to the interface, the group joined
/// there only, `IP_MULTICAST_ALL` off (no other group's traffic for this port),
/// nonblocking.
pub fn receiver_socket(iface: &Iface, group: SocketAddrV4, recv_buffer: usize) -> io::Result<UdpSocket> {
    UdpBuilder::new(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())))
        .reuse_address(true)
        .device(Some(&iface.name))
        .multicast_interface(multicast_if(iface))
        .buffer(Buffer::Receive, recv_buffer)
        .join(IpAddr::V4(*group.ip()), MulticastInterface::Index(iface.index))
        .nonblocking(true)
        .purpose("stream receiver")
        .bind()
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
    fn a_receiver_refuses_a_unicast_group() {
        let lo = resolve_iface("lo").unwrap();
        let e = receiver_socket(&lo, "10.0.0.1:10900".parse().unwrap(), 1 << 16).unwrap_err();
        assert!(e.to_string().contains("not a multicast address"), "{e}");
    }

    #[test]
    fn random_differs() {
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }
}

//! An address per socket: each lease is an IPv4 address of its own on one shared
//! interface, taken from a static range or leased from a DHCP server, and the UDP/TCP
//! sockets made from it leave from that address.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fleetboot_addr::{AddrPool, PoolConfig};
//! use tokio::io::AsyncWriteExt;
//!
//! let pool = AddrPool::start(PoolConfig::dhcp("eth1"))?;
//! let addr = pool.lease().await?;               // DORA, ARP probe, on the interface
//! let mut tcp = addr.tcp_connect("10.78.0.1:80".parse()?).await?;
//! assert_eq!(tcp.local_addr()?.ip(), addr.ip()); // the socket's own address
//! tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
//! let udp = addr.udp(0)?;                        // another socket, same address
//! drop((tcp, udp, addr));                        // last user gone: DHCPRELEASE, removed
//! # Ok(()) }
//! ```
//!
//! # The life of a lease
//!
//! [`AddrPool::lease`] gets an address (or [`AddrPool::lease_as`], with a DHCP client
//! identity of the caller's — an emulated iPXE client, say — whose ACK's boot file is in
//! [`OwnedAddr::origin`]) (DHCP: DISCOVER, OFFER, REQUEST, ACK with the
//! project's sans-I/O [`fleetboot_dhcp::DhcpClient`], a client id — and by default a MAC —
//! of its own per lease), probes it with ARP (RFC 5227; a conflict is declined with
//! DHCPDECLINE and another address asked for), adds it to the interface over netlink with
//! the kernel's `valid_lft`/`preferred_lft` set to the time left on the lease — so the
//! kernel removes it by itself if the process dies — and announces it. While an
//! [`OwnedAddr`] or a socket made from it is alive, the lease is renewed at T1 (rebound at
//! T2) and each renewal extends the kernel's lifetime. When the last one is dropped, a
//! DHCPRELEASE leaves from the address and the address is removed. A lease lost while held
//! (a NAK, expiry, the interface gone, [`AddrPool::shutdown`]) is removed from the
//! interface and its sockets fail with [`LeaseLost`]. A static range's addresses get a
//! lifetime of the pool's ([`Source::Static`], 60 s by default) refreshed every third of it
//! while held; a DHCP lease without a lease time (infinite) is installed without one.
//!
//! The release runs on the pool's runtime: a program should drop its addresses and await
//! [`AddrPool::idle`] (or call [`AddrPool::shutdown`]) before its runtime stops, or the
//! releases are never sent — the addresses then go when their kernel lifetime ends and the
//! leases when the server expires them, as after a crash.
//!
//! # Interface settings
//!
//! - `net.ipv4.conf.IFACE.promote_secondaries = 1`: every address after the first one of a
//!   subnet is a "secondary" of it, and without this setting the kernel removes all of them
//!   when the first is removed or expires. The pool sets it when
//!   [`PoolConfig::configure_interface`] is on (the default) and warns otherwise.
//! - `rp_filter` 0 or 2 (loose) on the interface and `all`: DHCP replies come from a server
//!   whose subnet may have no address on the interface yet (the first lease), and strict
//!   reverse-path filtering drops them. The pool warns when it finds 1.
//! - `arp_ignore = 1` and `arp_announce = 2` when the host has other interfaces on the same
//!   segment: otherwise another interface may answer ARP for a leased address (and ARP
//!   requests may carry a sender address of another interface), so peers send a lease's
//!   traffic to the wrong port. With one interface on the segment the defaults are fine.
//! - With [`Chaddr::PerAddress`] the DHCP server sees a MAC per lease that the interface
//!   does not answer to at the link layer: the broadcast flag is set so OFFER and ACK come
//!   broadcast; renewals and everything after use the address, which ARP resolves to the
//!   interface's real MAC. Switch ports that limit learned MACs see only the interface's.
//! - `net.core.rmem_max` (or root, which forces it): the shared DHCP socket asks for 4 MiB of
//!   receive buffer; a thousand leases' replies come in bursts.
//!
//! The DHCP socket is UDP 0.0.0.0:68 bound to the interface (`SO_BINDTODEVICE`): no other
//! DHCP client may run on that interface. Address installation and ARP need
//! `CAP_NET_ADMIN` and `CAP_NET_RAW`.
//!
//! # Modules
//!
//! - [`pool`]: [`AddrPool`], [`PoolConfig`], the lease tasks;
//! - [`lease`]: [`OwnedAddr`], [`LeaseLost`];
//! - [`socket`]: the sockets bound to a lease, async (tokio) and blocking;
//! - [`netlink`]: the [`AddressTable`] trait and its raw rtnetlink implementation;
//! - [`arp`]: the ARP codec and duplicate address detection;
//! - `sys`: every socket the crate opens (one place to swap the socket layer).

pub mod arp;
pub mod lease;
pub mod netlink;
pub mod pool;
pub mod socket;
mod sys;

pub use arp::DadConfig;
pub use fleetboot_dhcp::{Binding, ClientConfig, ClientEvent, ClientTransmit, DhcpClient};
pub use lease::{LeaseLost, Origin, OwnedAddr};
pub use netlink::{AddressTable, InstalledAddr, Lifetime, Netlink};
pub use pool::{AddrError, AddrPool, Chaddr, DhcpObserver, DhcpSource, DhcpStep, PoolConfig, PoolStats, Source};
pub use socket::{LeasedStdTcp, LeasedStdUdp, LeasedTcpListener, LeasedTcpStream, LeasedUdpSocket};

//! The address service: DHCPv4 server, ProxyDHCP and PXE boot server discovery, sans-I/O.
//!
//! - [`codec`]: the DHCP wire format — [`DhcpMessage::parse`] (never panics, validates every
//!   length, joins split options per RFC 3396, honours option 52 overload) and
//!   [`DhcpMessage::encode`], with typed accessors for the options PXE clients send.
//! - [`pxe`]: the PXE sub-options of option 43 ([`PxeOptions`]) and iPXE's option 175.
//! - [`identify()`]: a request's [`ClientIdentity`](fleetboot_boot::ClientIdentity), what
//!   boot profiles match on.
//! - [`config`]: [`EngineConfig`] — mode, subnets, reservations — and the `[dhcp]` and
//!   `[pxe]` sections of the config file ([`DhcpConfig`], [`PxeConfig`]).
//! - [`leases`]: the in-memory [`LeaseTable`] and the allocation policy. It is the single
//!   place that binds addresses and refuses an address live for another client.
//! - [`client`]: [`DhcpClient`], the client side as iPXE firmware does it (DISCOVER, first
//!   OFFER, REQUEST, ACK; NAK restarts; RELEASE), for the boot-storm emulator and tests; or
//!   as a plain host keeping its lease (T1 renew, T2 rebind, expiry, DECLINE), for
//!   `fleetboot-addr`'s address pools.
//! - [`engine`]: [`Engine`], port 67: server mode (RFC 2131) and ProxyDHCP mode (PXE spec
//!   2.1). Datagrams in; replies, lease changes to persist and trace lines out.
//! - [`boot_server`]: [`BootServer`], port 4011: the ProxyDHCP REQUEST, PXE boot server
//!   discovery, and multicast files whose (group, port) a
//!   [`Negotiator`](fleetboot_negotiate::Negotiator) clears with its peers (wait packets
//!   meanwhile, then the MTFTP parameters).
//! - [`discovery`]: [`PxeDiscovery`], the client side of port 4011 (what a PXE ROM does
//!   after DHCP), for the emulator and the negotiator tests.
//!
//! # Sans-I/O
//!
//! Nothing here opens a socket, spawns a task or reads a clock. Every machine follows the
//! contract of `fleetboot_proto` (`docs/ARCHITECTURE.md`): `handle(now, from, bytes)`,
//! `handle_timeout`, `poll_timeout`, `poll_transmit(now, buf)` appending one datagram,
//! `poll_event`. The boot decision ([`BootAdvisor`]) is the caller's, given to the engine
//! and the boot server when they are made.
//!
//! # Persist before send
//!
//! A reply that depends on a lease change is held inside the [`Engine`] until the caller
//! reports the change durable ([`Engine::committed`] with the ticket of its
//! [`engine::Event::Persist`]). Otherwise a crash between the two could leave a client
//! holding an ACKed address the store does not know, and after the restart
//! ([`Engine::load_lease`] for every stored lease) the engine could hand that address to
//! another client. Offers are never persisted: losing one costs the client a retry, not an
//! address conflict, because a REQUEST is only ACKed after the bind is checked again.

pub mod boot_server;
pub mod client;
pub mod codec;
pub mod config;
pub mod discovery;
pub mod engine;
pub mod identify;
pub mod leases;
pub mod pxe;
mod reply;

pub use boot_server::{BootEvent, BootServer, BootServerConfig, MulticastConfig};
pub use client::{
    Binding, ClientConfig, ClientError, ClientEvent, ClientState, ClientTransmit, DhcpClient,
    LeaseTimes, RenewalPhase,
};
pub use codec::{DecodeError, DhcpMessage, MessageType};
pub use config::{ConfigError, DhcpConfig, DhcpMode, EngineConfig, Mode, PxeConfig, Reservation, Subnet, Transport};
pub use discovery::{DiscoveryConfig, DiscoveryEvent, MulticastAnswer, PxeDiscovery};
pub use engine::{Engine, Event, LeaseChange, Ticket};
pub use fleetboot_proto::Transmit;
pub use identify::identify;
pub use leases::{Lease, LeaseState, LeaseTable, Now};
pub use pxe::{IpxeOptions, PxeOptions};
pub use reply::{BootAdvisor, BootOffer, NoBootFiles, Trace, BOOT_SERVER_TYPE};

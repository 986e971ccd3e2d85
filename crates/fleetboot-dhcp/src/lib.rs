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
//! - [`engine`]: [`Engine::handle`] turns one received datagram into an [`Output`]: datagrams
//!   to send, lease changes to store, events to log, or the reason it was dropped. Server
//!   mode (RFC 2131), ProxyDHCP mode (PXE spec 2.1) and port 4011 boot server requests.
//!
//! # Sans-I/O
//!
//! Nothing here opens a socket, spawns a task or reads a clock: the caller passes `now` (unix
//! seconds) and the boot decision ([`BootAdvisor`]) in, and does the sending and storing.
//!
//! # Persist before send
//!
//! The caller MUST apply [`Output::lease_changes`] to durable storage, and wait for that to
//! complete, BEFORE sending any of [`Output::transmits`]. Otherwise a crash between the two
//! leaves a client holding an ACKed address the store does not know, and after the restart
//! ([`Engine::load_lease`] for every stored lease) the engine could hand that address to
//! another client. Offers are never persisted: losing one costs the client a retry, not an
//! address conflict, because a REQUEST is only ACKed after the bind is checked again.

pub mod client;
pub mod codec;
pub mod config;
pub mod engine;
pub mod identify;
pub mod leases;
pub mod pxe;

pub use client::{
    Binding, ClientConfig, ClientError, ClientEvent, ClientState, ClientTransmit, DhcpClient,
    LeaseTimes, RenewalPhase,
};
pub use codec::{DecodeError, DhcpMessage, MessageType};
pub use config::{ConfigError, DhcpConfig, DhcpMode, EngineConfig, Mode, PxeConfig, Reservation, Subnet, Transport};
pub use engine::{BootAdvisor, BootOffer, Engine, Event, Incoming, LeaseChange, Output, Transmit};
pub use identify::identify;
pub use leases::{Lease, LeaseState, LeaseTable};
pub use pxe::{IpxeOptions, PxeOptions};

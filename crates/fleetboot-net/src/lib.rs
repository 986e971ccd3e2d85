//! Sockets for fleetboot's shells: the one crate that makes socket system calls (what
//! `quinn-udp` is to `quinn`). Protocol crates never see a socket; shells get every socket
//! from here and move bytes between it and a sans-I/O machine (the contract is in
//! `fleetboot_proto` and `docs/ARCHITECTURE.md`).
//!
//! - [`UdpBuilder`]: bind address, `SO_BINDTODEVICE`, reuse, broadcast, multicast (join,
//!   TTL, loop, `IP_MULTICAST_IF`, `IP_MULTICAST_ALL` off by default), forced buffer sizes
//!   read back ([`force_buffer`]), IP_PKTINFO, connect, blocking or not; std or tokio;
//!   [`stop_receiving`] wakes a thread blocked in `recv`.
//! - [`recv_from_to`] / [`send_from`]: one datagram with the local address it was sent to
//!   ([`RecvMeta`]), and one sent from a chosen local address (reply-from).
//! - [`Outbox`] / [`Inbox`]: batches through one `sendmmsg(2)` / `recvmmsg(2)`. An
//!   [`Outbox`] is filled straight from `poll_transmit` (one buffer, a [`Transmit`] per
//!   datagram).
//! - [`Poller`] / [`wait_readable`]: `ppoll(2)` over several sockets with a deadline, at
//!   nanosecond resolution.
//! - [`interfaces`] / [`interface`] / [`interface_index`]: names, indexes and addresses.
//! - [`Icmpv6Socket`]: the raw ICMPv6 socket router advertisements need.
//! - [`TcpListenerBuilder`]: a listener on an address and, optionally, one interface;
//!   `connect_tokio`: a connection from a chosen local address.
//!
//! With the `tokio` feature, builders also return tokio sockets and the receive/send
//! helpers have `_async` forms.
//!
//! Linux only (`SO_BINDTODEVICE`, `IP_MULTICAST_ALL`, `sendmmsg`): fleetboot's servers
//! and its lab run there.

mod iface;
mod msg;
mod poll;
mod icmpv6;
mod sys;
mod tcp;
mod udp;

pub use fleetboot_proto::Transmit;
pub use iface::{interface, interface_index, interfaces, Interface};
pub use msg::{recv_from_to, send_from, Inbox, Outbox, RecvMeta, SendReport};
pub use poll::{wait_readable, Poller};
pub use icmpv6::Icmpv6Socket;
pub use tcp::TcpListenerBuilder;
#[cfg(feature = "tokio")]
pub use tcp::connect_tokio;
pub use udp::{force_buffer, join_group, leave_group, stop_receiving, Buffer, MulticastInterface, UdpBuilder};

#[cfg(feature = "tokio")]
pub use msg::{recv_from_to_async, send_from_async};

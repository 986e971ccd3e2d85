//! What fleetboot's deterministic simulations share (a dev-dependency, never linked into
//! the binary):
//!
//! - [`Rng`]: a small seeded generator, the same sequence on every machine;
//! - [`SimClock`]: simulated time, a base [`Instant`](std::time::Instant) plus an offset,
//!   with jumps, and a wall clock that can be stepped on its own (for persisted
//!   wall-clock times such as DHCP lease expiry);
//! - [`Network`]: an in-memory network that loses, duplicates, delays and reorders
//!   datagrams from the [`Rng`], with groups (multicast or broadcast fan-out) and
//!   per-host link settings;
//! - [`Sim`]: a driver that runs several [`Node`]s over a [`Network`], honouring their
//!   `poll_timeout`s and jumping time straight to the next event;
//! - [`conformance`]: checks that a machine keeps the `fleetboot_proto` contract.
//!
//! A test wraps each machine in a [`Node`] (a few lines: which socket a datagram is for,
//! which data source a `poll_transmit` reads), adds the nodes to a [`Sim`] and asserts
//! counts and bytes at the end, never wall-clock times.

pub mod conformance;
mod clock;
mod net;
mod rng;
mod sim;

pub use clock::SimClock;
pub use fleetboot_proto::Transmit;
pub use net::{Datagram, LinkConfig, NetStats, Network};
pub use rng::Rng;
pub use sim::{Node, Sim, SimError, Step};

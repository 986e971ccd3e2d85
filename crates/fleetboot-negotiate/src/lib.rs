//! Boot negotiation between several negotiators and file servers (`docs/protocols.md`),
//! sans-I/O.
//!
//! - [`wire`]: the conflict-clearing packet
//!   ([`ConflictPacket`]: opcode, length, file server IPv4, negotiator type, layer, multicast
//!   address, port, boot file name length, name; a response is the query echoed with
//!   opcode 1) and the negotiator <-> file server messages ([`FsMessage`]: PREPARE, ACK,
//!   NAK, DELETE, DELETED).
//! - [`negotiator`]: [`Negotiator`], which clears a (group, port) [`Slot`] with the other
//!   negotiators before handing it out, answers their queries, breaks ties between
//!   simultaneous queries (lower address wins), renews and announces what it holds, and
//!   drives a file server (primary, then secondary).
//! - [`files`]: [`FileRegistry`], the file server's side: per slot, the file and the list of
//!   negotiators that asked; DELETE and expiry take them off; a slot is released only when
//!   its list is empty.
//!
//! - [`auth`]: [`PeerAuth`], the HMAC-SHA256 trailer every one of these messages carries
//!   between servers that share a [`PeerKey`], with a per-sender replay window. A machine
//!   given one drops, and counts, whatever does not verify.
//! - [`config`]: the `[negotiate]` and `[files]` sections of the config file.
//!
//! Nothing here opens a socket or reads a clock: the caller passes `now`, feeds datagrams
//! in and sends what the machines hand back. `tests/sim.rs` runs three negotiators and two
//! file servers over a lossy, duplicating, delaying network for many seeds and checks that
//! no slot ever carries two files.

pub mod auth;
pub mod config;
pub mod files;
pub mod negotiator;
pub mod wire;

pub use auth::{PeerAuth, PeerKey, Refusal, Refusals};
pub use files::{FileRegistry, Group, RegistryEvent};
pub use fleetboot_proto::Transmit;
pub use negotiator::{Assignment, ClientToken, Event, Negotiator, NegotiatorConfig};
pub use wire::{ConflictOp, ConflictPacket, FsMessage, FsOp, NakReason, Slot, WireError};

//! TFTP for network boot, sans-I/O: no sockets, no clock, no async runtime. Time comes in
//! as an [`Instant`](std::time::Instant), file bytes through a [`BlockSource`].
//!
//! - [`codec`]: the wire format ([`Packet`], [`ErrorCode`]), parsed with every length
//!   checked and option floods refused.
//! - [`options`]: which of blksize, tsize, timeout and windowsize (RFC 2347/2348/2349/7440)
//!   a read request gets, and the OACK that acknowledges them ([`accept`]).
//! - [`server`]: [`ReadTransfer`], one read transfer: OACK, windowed go-back-N sending,
//!   block number rollover, adaptive retransmission (RFC 6298 with Karn's rule).
//! - [`client`]: [`ReadClient`], the other side of a read, for the emulator and tests.
//! - [`config`]: the `[tftp]` section of the config file ([`config::TftpConfig`]).
//! - [`source`]: block sources a shell wraps around a file: [`source::ReadAhead`] (reads in
//!   growing chunks) and [`source::Netascii`] (converted block by block).
//! - [`admission`]: which requests get a transfer — caps overall and per client address;
//!   when full, the oldest transfer whose client never answered gives way.
//! - [`path`]: [`resolve`] confines a requested name to the served root (the one place that
//!   touches the filesystem).
//!
//! Every machine here follows the `fleetboot_proto` contract (`docs/ARCHITECTURE.md`):
//! `handle(now, from, bytes)`, `handle_timeout(now)`, `poll_timeout()`, and
//! `poll_transmit(now, [source,] buf) -> Option<Transmit>`, which appends one datagram to
//! `buf` and says where it goes. The servers read file data, so their `poll_transmit` takes
//! the [`BlockSource`] too.
//!
//! # Driving a transfer (the shell's job)
//!
//! 1. Receive an RRQ on port 69; [`Packet::parse`] it. Refuse anything but an octet RRQ with
//!    an ERROR, [`resolve`] the file name (on error, answer with
//!    [`PathError::error_code`]) and open the file.
//! 2. Bind a new UDP socket (the transfer's TID), create
//!    `ReadTransfer::new(now, client, &options, file_len, &config)`.
//! 3. Loop: gather `poll_transmit(now, &mut file, buf)` into one buffer and send it
//!    (`fleetboot_net::Outbox`: one `sendmmsg` per window); wait for a datagram or
//!    `poll_timeout()`; feed every datagram to `handle(now, from, bytes)` (one from a
//!    stranger is answered with ERROR 5 by the transfer itself), call `handle_timeout(now)`
//!    when the deadline passes.
//! 4. Stop when `is_finished()`; `state()` says `Completed` or `Failed` and why.
//!
//! The simulation test (`tests/simulation.rs`) drives a server and a [`ReadClient`] this way
//! over `fleetboot_testkit`'s lossy, duplicating, reordering in-memory network.

pub mod admission;
pub mod client;
pub mod codec;
pub mod config;
pub mod mtftp;
pub mod options;
pub mod path;
pub mod rfc2090;
pub mod server;
pub mod source;

pub use client::{ClientConfig, ClientError, ClientState, ReadClient};
pub use codec::{ErrorCode, Mode, Packet, ParseError};
pub use options::{accept, AcceptedOptions};
pub use path::{resolve, PathError};
pub use server::{
    BlockSource, FailReason, ReadTransfer, TransferConfig, TransferState, TransferStats,
};

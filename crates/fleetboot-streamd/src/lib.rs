//! The I/O side of fleetboot's synchronized multicast streaming (`docs/protocols.md`): thin
//! shells around the sans-I/O machines of `fleetboot-stream`, on std threads and
//! `fleetboot-net` sockets (no async runtime: one session or one receiver is one loop
//! that waits with `ppoll` until its machine's next deadline or a datagram, takes what
//! arrived in `recvmmsg` batches and sends bursts with `sendmmsg`).
//!
//! # Map
//!
//! - [`net`]: the interface a session runs on (by name or address), its default group
//!   and port, the sender's socket (bound to the interface address, explicit
//!   `IP_MULTICAST_IF` by index, TTL, loopback off) and the receiver's (group joined on
//!   one interface, `IP_MULTICAST_ALL` off), built with `fleetboot_net::UdpBuilder`;
//!   random ids, keys and nonces from the OS.
//! - [`sender`]: [`sender::run_session`], one session for a catalog image: blocks read
//!   in the session's order (the learned sequence first; a read-ahead of large `pread`s
//!   while the order runs on); several sessions at once with
//!   [`sender::serve_sessions`].
//! - [`hashes`]: every image's block hashes (what the signed manifest lists), kept
//!   across sessions in memory and in the sender's cache directory, for the file they
//!   were computed from as long as it is unchanged.
//! - [`receiver`]: [`receiver::run_receiver`]: joins, learns the sender from ANNOUNCE,
//!   writes blocks into a [`cache::Cache`], synced as they arrive
//!   ([`receiver::Writeback`]) and, for the lab tool, hashed in order as they complete
//!   the image's prefix ([`receiver::ImageHasher`]).
//! - [`cache`]: the received image: a `fleetboot_nbd::blockfile::BlockFile` (sparse file
//!   plus lock-free block bitmap, blocks of zeros kept as holes) shared with readers.
//! - [`sequence`]: learned block sequences stored with the image version
//!   (`images/sequences/<sha256>.seq`).
//! - [`nbd_client`]: a small blocking NBD client (fixed newstyle, `OPT_GO`, simple
//!   replies) over `fleetboot-nbd`'s codec: the agent's unicast path to the server.
//! - [`agent`]: `fleetboot agent stream`: the receiver plus a local NBD disk
//!   ([`agent::AgentDisk`]: a `fleetboot-nbd` overlay over [`agent::RemoteImage`], whose
//!   reads come from the cache and fall back to the server at once for blocks not yet
//!   received), served by `fleetboot-nbd`'s handshake and transmission machines.
//! - [`config`]: the `[stream]` section of the config file (`fleetboot stream serve`):
//!   validated without I/O, then resolved against the catalog, the interface and the
//!   site secret.
//! - [`secret`]: the site secret, from a 0600 file or the environment (never argv, never
//!   all zeros), created in the data directory on a sender's first run.

// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#![allow(clippy::manual_is_multiple_of)]

pub mod agent;
pub mod cache;
pub mod config;
pub mod hashes;
pub mod nbd_client;
pub mod net;
pub mod receiver;
pub mod secret;
pub mod sender;
pub mod sequence;

use std::path::Path;

/// Errors of the streaming shells.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamdError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket: {0}")]
    Socket(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Catalog(#[from] fleetboot_images::Error),
    #[error("NBD: {0}")]
    Nbd(String),
    #[error("the session ended incomplete: {0}")]
    Incomplete(String),
    #[error("stopped")]
    Stopped,
}

impl StreamdError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StreamdError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

//! fleetboot's NBD server: catalog images as network disks, each client with its own
//! copy-on-write overlay — and the NBD machinery the streaming agent's local disk reuses.
//!
//! Map of the crate:
//! - [`proto`]: the fixed-newstyle wire format (greeting, options, option replies, requests,
//!   simple and structured replies, error chunks), no I/O, every length checked before use.
//! - [`handshake`]: the server's side of the handshake (option haggling) as a state machine (bytes in → bytes out and a
//!   [`handshake::Status`]); exports are resolved through [`handshake::ExportLookup`].
//! - [`transmission`]: the transmission phase as a state machine (request bytes → checked
//!   commands, WRITE payloads in bounded pieces, reply encoders) and the
//!   [`transmission::Responder`] that carries commands out on a [`BlockDevice`].
//! - [`device`]: [`BlockDevice`], what an export is (read, write, zeroes, trim, flush,
//!   cache, block status); [`device::ImageFile`] (an image, read-only),
//!   [`device::MemoryDisk`] (tests, fuzzing); NBD error values of I/O errors.
//! - [`blockfile`]: [`blockfile::BlockFile`], a sparse file with a lock-free bitmap of the
//!   blocks it holds: the overlay's map and the agent's cache.
//! - [`overlay`]: a copy-on-write overlay over any [`BlockDevice`] (standard or private,
//!   the private map journaled for crash safety). Plain file I/O.
//! - [`export`]: export names (`IMAGE[:VERSION][@MAC]`) → catalog image + overlay;
//!   [`export::Exports`] shares one overlay between the connections of one client.
//! - [`access`]: who may open what: an [`access::AllowList`] for catalog images and the
//!   export list, a [`access::ClientAuthority`] for clients' overlays.
//! - [`limits`]: connection caps, idle connections giving way, stall timeouts.
//! - [`pool`]: the threads every disk operation of the server runs on.
//! - [`tls`]: `NBD_OPT_STARTTLS` with rustls (x509).
//! - [`server`]: the tokio shell: [`server::serve`].
//! - [`config`]: the `[nbd]` section of the config file ([`config::NbdConfig`]).

// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#![allow(clippy::manual_is_multiple_of)]

pub mod access;
pub mod config;
pub mod blockfile;
pub mod blocking;
pub mod device;
pub mod export;
pub mod handshake;
pub mod limits;
pub mod overlay;
pub mod pool;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmission;

pub use device::{BlockDevice, Extents, ZeroMode};
pub use export::{ExportName, Exports, ExportsConfig, ReadRecorder};
pub use overlay::OverlayMode;
pub use access::{Access, AllowList, ClientAuthority, Decision};
pub use limits::Limits;
pub use server::{serve, serve_until, ServerOptions};

//! Edge boot caches, sans-I/O: the logic a cache near the clients and its origin (the boot
//! server) share, with no sockets, files or clocks (`now` comes in as Unix milliseconds).
//!
//! A cache keeps copies of boot files and images as they pass from the origin to its
//! site's clients and serves later requests itself, so the WAN between carries each object
//! once per cache, not once per boot. Nothing is served before it is verified:
//!
//! - [`manifest`]: the origin signs (ed25519) a manifest per object version — name,
//!   version, size, SHA-256, and a BLAKE3 per fixed-size chunk;
//! - [`fill`]: one fill per object however many clients want it (single flight), chunk by
//!   chunk, each checked on arrival; requests start where a waiting reader is and resume
//!   after a broken link; unchanged chunks of an updated object are copied locally;
//! - [`index`]: the cache's verification table and its disk limit (LRU eviction of
//!   unpinned objects);
//! - [`table`]: the states (pending / verified / stale / evicted) and the origin's table
//!   over all caches, which decides the version a client is handed (a new one only once
//!   its cache holds it verified) and which caches to push a new version to;
//! - [`map`]: the image map at a cache (which client boots what), so boots go on while the
//!   origin is unreachable, and a clear [`map::Refusal`] when they cannot;
//! - [`messages`] and [`auth`]: what the two sides say (JSON) and how each message is
//!   signed; [`keys`]: key formats;
//! - [`name`]: object names (`files/PATH`, `images/NAME`), normalised like the origin's
//!   root confinement; [`hash`]: digests; [`config`]: the `[cache]` and `[origin]`
//!   sections.
//!
//! The shells are `crates/fleetboot/src/cache/` (`fleetboot cache`) and
//! `crates/fleetboot/src/origin/` (inside `fleetboot serve`).

pub mod auth;
pub mod config;
pub mod fill;
pub mod hash;
pub mod index;
pub mod keys;
pub mod manifest;
pub mod map;
pub mod messages;
pub mod name;
pub mod table;

pub use fill::{Fill, Receipt};
pub use hash::Digest;
pub use index::Index;
pub use manifest::Manifest;
pub use map::ImageMap;
pub use table::{Holding, OriginTable, State};

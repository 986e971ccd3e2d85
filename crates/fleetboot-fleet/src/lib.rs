//! The provisioning master and the node agent.
//!
//! A master keeps a **node database** (per node: identity, type, location, class,
//! features, preferred versions, test mode; and, as last reported, what it has installed
//! and how its last verification went) and a **package database** (boot images per node
//! type and software packages, every version kept until an operator prunes it, files by
//! SHA-256 in a content-addressed blob directory). Nodes boot from it:
//!
//! 1. a pristine node asks for its boot image and packages (by its type/location, or by a
//!    list of features), downloads them, checks every hash and stores them with their
//!    versions on its local disk, then reboots into the stored image;
//! 2. at every boot it asks the master to verify what it has: on a match it runs from its
//!    local disk without downloading anything; on a mismatch it gets only what differs.
//!
//! Modules:
//! - [`version`]: versions and constraints; [`model`]: nodes, classes, packages and the
//!   in-memory [`model::FleetDb`]; [`select`]: boot image and package selection with
//!   dependency resolution;
//! - [`bundle`]: the composite bundle an operator installs (tar + `manifest.toml`,
//!   optionally signed), built and checked; [`blobs`]: the content-addressed directory;
//! - [`protocol`]: the master ↔ agent messages and their signatures; [`master`] and
//!   [`agent`]: the two sides as sans-I/O state machines (no sockets, no clock; time comes
//!   in as an argument), so one process can run hundreds of agents.
//!
//! [`bundle`] and [`blobs`] read and write files; everything else does no I/O.

pub mod agent;
pub mod blobs;
pub mod bundle;
pub mod config;
pub mod master;
pub mod model;
pub mod protocol;
pub mod select;
#[cfg(test)]
mod sim;
pub mod version;

pub use model::{Change, Class, FleetDb, Kind, Node, Package, Pin, Sha256};
pub use version::{Constraint, Version};

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod testdb;

//! The provisioning master and node agent in the binary: `fleetboot master`, `fleetboot
//! node|class|package|bundle|fleet ...` and `fleetboot agent node` (logic in
//! `fleetboot-fleet`; see `docs/fleet.md`).

pub mod agent;
pub mod cli;
pub mod db;
pub mod emulate;
pub mod replica;
pub mod service;

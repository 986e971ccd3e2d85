//! Several negotiators and file servers on one network (`docs/protocols.md`), as processes:
//! thin shells over the sans-I/O machines of `fleetboot-negotiate` and `fleetboot-tftp`.
//!
//! - [`files::run`] (`fleetboot files --config FILE`): the multicast TFTP file server (PXE
//!   MTFTP and RFC 2090) and the negotiator <-> file server protocol listener.
//! - [`boot::run`] (`fleetboot negotiate --config FILE`): the PXE boot server on UDP 4011
//!   (`fleetboot_dhcp::BootServer`) that clears multicast (group, port)s with its peers and
//!   prepares them at a file server; [`boot::serve`] is the same shell inside `fleetboot
//!   serve`.
//! - the `[negotiate]` and `[files]` sections: `fleetboot_negotiate::config`.
//! - [`key`]: the key every message between negotiators and file servers is signed with
//!   (`peer_key_file`, else `data_dir/negotiate.key`), and the report of what was refused.
//!
//! Both write JSON-line records (`records = PATH`) of every assignment, answer and group,
//! which is what the namespace tests check the invariant against.

pub mod boot;
pub mod files;
pub mod key;
pub mod net;

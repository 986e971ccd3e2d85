//! Who may open what.
//!
//! Two rules, checked on every `NBD_OPT_LIST`, `INFO`, `GO` and `EXPORT_NAME`:
//! - **Catalog images and the export list** (`IMAGE`, `IMAGE:VERSION`, read-only) are for
//!   peers inside the [`AllowList`] (CIDRs). The list names catalog images only, never a
//!   client's overlay.
//! - **A client's overlay** (`IMAGE@MAC`) is for whoever the [`ClientAuthority`] says may
//!   act as that client: in fleetboot, the address that holds the client's DHCP lease or
//!   reservation, or (where fleetboot hands out no addresses) a holder of a capability for
//!   that MAC carried in the export name (`IMAGE@MAC~CAPABILITY`). A client refused here
//!   gets no overlay at all: nothing is created on disk for a name nobody may use.
//!
//! Once a client's overlay is open, further connections to it must come from the same
//! address ([`crate::Exports::open`]): another host cannot join a live overlay, even one
//! the authority would let it open later.

use fleetboot_boot::MacAddr;
use std::net::IpAddr;
use std::sync::Arc;

/// CIDR blocks; a bare address is one host: the allow lists of every fleetboot service.
pub use fleetboot_auth::AllowList;

/// `127.0.0.0/8` and `::1`.
pub fn loopback() -> AllowList {
    AllowList::new(vec!["127.0.0.0/8".parse().expect("cidr"), "::1/128".parse().expect("cidr")])
}

/// Every address (for tests and closed labs).
pub fn everyone() -> AllowList {
    AllowList::new(vec!["0.0.0.0/0".parse().expect("cidr"), "::/0".parse().expect("cidr")])
}

/// The answer of a [`ClientAuthority`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `reason` is a short label (for a metric); `detail` says why, for the log.
    Refuse { reason: &'static str, detail: String },
}

impl Decision {
    pub fn refuse(reason: &'static str, detail: impl Into<String>) -> Decision {
        Decision::Refuse { reason, detail: detail.into() }
    }
}

/// Decides who may act as a client, for that client's overlay export. Called for every
/// connection that names `IMAGE@MAC` (on the server's disk-I/O threads, so it may read a
/// database).
pub trait ClientAuthority: Send + Sync + std::fmt::Debug {
    /// May `peer` open client `mac`'s overlay, presenting `capability` (from the export
    /// name, if it carried one)?
    fn may_open(&self, peer: IpAddr, mac: MacAddr, capability: Option<&str>) -> Decision;
}

/// Lets anyone act as any client: for tests, and for a server only its own host reaches.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyPeerIsAnyClient;

impl ClientAuthority for AnyPeerIsAnyClient {
    fn may_open(&self, _: IpAddr, _: MacAddr, _: Option<&str>) -> Decision {
        Decision::Allow
    }
}

/// Lets nobody open a client's overlay (catalog images only).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoClientOverlays;

impl ClientAuthority for NoClientOverlays {
    fn may_open(&self, _: IpAddr, _: MacAddr, _: Option<&str>) -> Decision {
        Decision::refuse("no_authority", "this server opens no client overlays")
    }
}

/// What the server checks before it hands out an export.
#[derive(Debug, Clone)]
pub struct Access {
    /// Who may read catalog images and list them.
    pub allow: AllowList,
    /// Who may use a client's overlay.
    pub clients: Arc<dyn ClientAuthority>,
}

impl Access {
    /// Loopback only, no client overlays.
    pub fn loopback_only() -> Access {
        Access { allow: loopback(), clients: Arc::new(NoClientOverlays) }
    }

    /// Everything for everyone: tests on loopback.
    pub fn open_to_all() -> Access {
        Access { allow: everyone(), clients: Arc::new(AnyPeerIsAnyClient) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_everyone() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(loopback().allows(ip("127.0.0.1")) && loopback().allows(ip("::1")) && loopback().allows(ip("::ffff:127.0.0.2")));
        assert!(!loopback().allows(ip("10.77.0.1")));
        assert!(everyone().allows(ip("10.77.0.1")) && everyone().allows(ip("fd00::1")));
        assert!(!Access::loopback_only().allow.allows(ip("10.77.0.1")));
        let mac = "52:54:00:00:00:01".parse().unwrap();
        assert!(matches!(Access::loopback_only().clients.may_open(ip("127.0.0.1"), mac, None), Decision::Refuse { .. }));
    }
}

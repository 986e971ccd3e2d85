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
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::Arc;

/// CIDR blocks; a bare address is one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    pub fn new(nets: Vec<IpNet>) -> AllowList {
        AllowList(nets)
    }

    /// `127.0.0.0/8` and `::1`.
    pub fn loopback() -> AllowList {
        AllowList(vec!["127.0.0.0/8".parse().expect("cidr"), "::1/128".parse().expect("cidr")])
    }

    /// Every address (for tests and closed labs).
    pub fn everyone() -> AllowList {
        AllowList(vec!["0.0.0.0/0".parse().expect("cidr"), "::/0".parse().expect("cidr")])
    }

    /// Parses `["10.77.0.0/24", "192.0.2.7", "fd00::/8"]`; the error names the bad entry.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<AllowList, String> {
        let mut nets = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let s = item.as_ref().trim();
            let net = match s.parse::<IpNet>() {
                Ok(n) => n.trunc(),
                Err(_) => match s.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => return Err(format!("[{i}]: {s:?} is neither an address nor a CIDR block")),
                },
            };
            nets.push(net);
        }
        Ok(AllowList(nets))
    }

    pub fn push(&mut self, net: IpNet) {
        if !self.0.contains(&net) {
            self.0.push(net);
        }
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address counts as its IPv4 address) is inside.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }
}

impl std::fmt::Display for AllowList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v: Vec<String> = self.0.iter().map(|n| n.to_string()).collect();
        write!(f, "[{}]", v.join(", "))
    }
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
        Access { allow: AllowList::loopback(), clients: Arc::new(NoClientOverlays) }
    }

    /// Everything for everyone: tests on loopback.
    pub fn open_to_all() -> Access {
        Access { allow: AllowList::everyone(), clients: Arc::new(AnyPeerIsAnyClient) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists() {
        let a = AllowList::parse(&["10.77.0.0/24", "192.0.2.7", "172.16.5.5/12", "fd00::/8"]).unwrap();
        assert!(a.allows("10.77.0.200".parse().unwrap()));
        assert!(!a.allows("10.78.0.1".parse().unwrap()));
        assert!(a.allows("192.0.2.7".parse().unwrap()));
        assert!(!a.allows("192.0.2.8".parse().unwrap()));
        assert!(a.allows("172.20.0.1".parse().unwrap()), "host bits are dropped: 172.16.0.0/12");
        assert!(a.allows("fd12::1".parse().unwrap()));
        assert!(a.allows("::ffff:10.77.0.5".parse().unwrap()), "IPv4-mapped");
        assert!(!AllowList::default().allows("127.0.0.1".parse().unwrap()));
        assert!(AllowList::loopback().allows("127.0.0.1".parse().unwrap()));
        let e = AllowList::parse(&["10.0.0.0/8", "ten"]).unwrap_err();
        assert!(e.starts_with("[1]"), "{e}");
        assert!(AllowList::parse(&["10.0.0.0/33"]).is_err());
    }
}

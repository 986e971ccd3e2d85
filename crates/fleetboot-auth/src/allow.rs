//! CIDR allow lists: `["10.77.0.0/24", "192.0.2.7"]` (a bare address is one host).

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// Addresses allowed to do something; empty allows nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNet>);

/// Why one entry of a list is not a network: its index and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[{index}]: {problem}")]
pub struct BadEntry {
    pub index: usize,
    pub problem: String,
}

impl AllowList {
    pub fn new(nets: Vec<IpNet>) -> AllowList {
        AllowList(nets)
    }

    /// Parses CIDRs or single addresses. A network with host bits set (`10.0.0.1/24`) is
    /// refused rather than guessed at.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<AllowList, BadEntry> {
        let mut nets = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let s = item.as_ref().trim();
            let bad = |problem: String| BadEntry { index, problem };
            let net = match s.parse::<IpNet>() {
                Ok(n) if n.trunc() != n => {
                    return Err(bad(format!("{s:?} has host bits set; did you mean \"{}\"?", n.trunc())))
                }
                Ok(n) => n,
                Err(_) => match s.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => return Err(bad(format!("{s:?} is not an address or a network (10.77.0.0/24)"))),
                },
            };
            nets.push(net);
        }
        Ok(AllowList(nets))
    }

    /// Whether `ip` is in one of the networks. An IPv4 address seen as IPv4-mapped IPv6
    /// (a dual-stack socket) counts as the IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(|n| n.to_string()).collect();
        write!(f, "[{}]", items.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_hosts_and_mapped_addresses() {
        let l = AllowList::parse(&["10.77.0.0/24", "192.0.2.7", "fd00::/8"]).unwrap();
        let yes = |s: &str| l.allows(s.parse().unwrap());
        assert!(yes("10.77.0.1") && yes("10.77.0.255") && yes("192.0.2.7") && yes("fd00::1"));
        assert!(yes("::ffff:10.77.0.9"));
        assert!(!yes("10.77.1.1") && !yes("192.0.2.8") && !yes("127.0.0.1"));
        assert!(!AllowList::default().allows("10.77.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_named() {
        let e = AllowList::parse(&["10.0.0.0/8", "10.77.0.1/24"]).unwrap_err();
        assert_eq!(e.index, 1);
        assert!(e.problem.contains("10.77.0.0/24"), "{e}");
        assert_eq!(AllowList::parse(&["nope"]).unwrap_err().index, 0);
    }
}

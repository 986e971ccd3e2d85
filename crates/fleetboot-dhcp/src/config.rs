//! What the engine serves: mode, subnets, reservations. Validated once, in [`EngineConfig::validate`].

use fleetboot_boot::MacAddr;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Full DHCP server, or ProxyDHCP next to someone else's DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Server,
    Proxy,
}

/// One IPv4 subnet and its dynamic range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub range_start: Ipv4Addr,
    pub range_end: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Seconds.
    pub lease_time: u32,
}

impl Subnet {
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len.min(32) as u32)
        };
        Ipv4Addr::from(bits)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let m = u32::from(self.mask());
        u32::from(ip) & m == u32::from(self.network) & m
    }

    /// Inside the dynamic range.
    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.range_start..=self.range_end).contains(&ip)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }
}

/// A fixed address for one client, matched by MAC or by client identifier (option 61).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub mac: Option<MacAddr>,
    pub client_id: Option<Vec<u8>>,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub mode: Mode,
    /// Our address: option 54, and the subnet of clients that are not relayed.
    pub server_ip: Ipv4Addr,
    pub subnets: Vec<Subnet>,
    pub reservations: Vec<Reservation>,
    /// NAK requests for addresses we know are wrong (RFC 2131 §4.3.2); otherwise stay silent
    /// so another server on the link can answer.
    pub authoritative: bool,
    /// How long an offered address stays set aside for the client it was offered to.
    pub offer_hold_secs: u64,
    /// How long a declined address stays out of the pool.
    pub decline_hold_secs: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: Mode::Server,
            server_ip: Ipv4Addr::UNSPECIFIED,
            subnets: Vec::new(),
            reservations: Vec::new(),
            authoritative: true,
            offer_hold_secs: 30,
            decline_hold_secs: 600,
        }
    }
}

/// A configuration the engine refuses, naming the offending item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("subnets[{index}]: {reason}")]
    Subnet { index: usize, reason: String },
    #[error("reservations[{index}]: {reason}")]
    Reservation { index: usize, reason: String },
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (index, s) in self.subnets.iter().enumerate() {
            let err = |reason: &str| {
                Err(ConfigError::Subnet {
                    index,
                    reason: reason.into(),
                })
            };
            if s.prefix_len > 32 {
                return err("prefix_len must be at most 32");
            }
            if s.range_start > s.range_end {
                return err("range_start is after range_end");
            }
            if !s.contains(s.range_start) || !s.contains(s.range_end) {
                return err("range is not inside the subnet");
            }
            if s.lease_time == 0 {
                return err("lease_time must be positive");
            }
        }
        for (index, r) in self.reservations.iter().enumerate() {
            let err = |reason: &str| {
                Err(ConfigError::Reservation {
                    index,
                    reason: reason.into(),
                })
            };
            if r.mac.is_none() && r.client_id.is_none() {
                return err("needs a mac or a client_id");
            }
            if !self.subnets.iter().any(|s| s.contains(r.ip)) {
                return err("address is in no configured subnet");
            }
            if self.reservations[..index].iter().any(|o| o.ip == r.ip) {
                return err("address is reserved twice");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        Subnet {
            network: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
            range_start: Ipv4Addr::new(10, 0, 0, 100),
            range_end: Ipv4Addr::new(10, 0, 0, 200),
            router: None,
            dns: vec![],
            domain: None,
            lease_time: 3600,
        }
    }

    #[test]
    fn subnet_math() {
        let s = subnet();
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 0, 0, 255));
        assert!(s.contains(Ipv4Addr::new(10, 0, 0, 7)) && !s.contains(Ipv4Addr::new(10, 0, 1, 7)));
        assert!(
            s.in_range(Ipv4Addr::new(10, 0, 0, 150)) && !s.in_range(Ipv4Addr::new(10, 0, 0, 7))
        );
    }

    #[test]
    fn validation_names_the_item() {
        let ok = EngineConfig {
            subnets: vec![subnet()],
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let mut bad = ok.clone();
        bad.subnets[0].range_end = Ipv4Addr::new(10, 0, 1, 5);
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Subnet { index: 0, .. })
        ));
        let mut bad = ok.clone();
        let r = Reservation {
            mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
            client_id: None,
            ip: Ipv4Addr::new(10, 0, 0, 5),
        };
        bad.reservations = vec![
            r.clone(),
            Reservation {
                mac: Some(MacAddr([2, 0, 0, 0, 0, 2])),
                ..r
            },
        ];
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Reservation { index: 1, .. })
        ));
    }
}

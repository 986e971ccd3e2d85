//! The `[tftp]` section of fleetboot's config file: raw serde type ([`RawTftp`],
//! `deny_unknown_fields`) validated into [`TftpConfig`], errors naming the key as written in
//! the section (`max_blksize`). The limits are the ones [`options::accept`] enforces.
//!
//! [`options::accept`]: crate::options::accept

use crate::options::{MAX_BLKSIZE, MIN_BLKSIZE};
use serde::Deserialize;
use std::net::SocketAddr;

/// A key of the section that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn refuse<T>(key: impl Into<String>, problem: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { key: key.into(), problem: problem.into() })
}

/// The `[tftp]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTftp {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
    max_blksize: Option<u16>,
    max_windowsize: Option<u16>,
    /// MAC prefixes of firmware that chokes on TFTP options: served plain RFC 1350.
    #[serde(default)]
    no_options_for: Vec<String>,
    max_transfers: Option<usize>,
    max_transfers_per_client: Option<usize>,
    idle_timeout_secs: Option<u64>,
    netascii_max_bytes: Option<u64>,
}

/// Transfers at once, by default: each holds a thread, a socket and an open file.
pub const DEFAULT_MAX_TRANSFERS: usize = 512;
/// Transfers at once from one client address, by default: a booting machine fetches one
/// file at a time (two while UEFI firmware probes a size).
pub const DEFAULT_MAX_TRANSFERS_PER_CLIENT: usize = 8;
/// A transfer whose client acknowledges nothing new for this long fails, by default.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 15;
/// Largest file served in netascii mode, by default (converting means reading it twice).
pub const DEFAULT_NETASCII_MAX_BYTES: u64 = 64 << 20;

/// The TFTP service, when enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpConfig {
    /// Where requests arrive (port 69; port 0 takes any free port).
    pub listen: SocketAddr,
    /// Largest blksize granted (RFC 2348).
    pub max_blksize: u16,
    /// Largest windowsize granted (RFC 7440).
    pub max_windowsize: u16,
    /// Lowercase MAC addresses, or prefixes ending in `*`, served without options.
    pub no_options_for: Vec<String>,
    /// Transfers at once (each one thread, one socket, one open file).
    pub max_transfers: usize,
    /// Transfers at once from one client address.
    pub max_transfers_per_client: usize,
    /// A transfer whose client acknowledges nothing new for this long fails.
    pub idle_timeout: std::time::Duration,
    /// Largest file served in netascii mode.
    pub netascii_max_bytes: u64,
}

impl RawTftp {
    /// `None` when `enabled = false`. The other keys are checked either way.
    pub fn validate(self) -> Result<Option<TftpConfig>, ConfigError> {
        let max_blksize = self.max_blksize.unwrap_or(1468);
        if !(MIN_BLKSIZE..=MAX_BLKSIZE).contains(&max_blksize) {
            return refuse(
                "max_blksize",
                format!("{max_blksize} is outside {MIN_BLKSIZE}..={MAX_BLKSIZE} (RFC 2348)"),
            );
        }
        let max_windowsize = self.max_windowsize.unwrap_or(64);
        if max_windowsize == 0 {
            return refuse("max_windowsize", "must be at least 1");
        }
        let mut no_options_for = Vec::new();
        for (i, m) in self.no_options_for.iter().enumerate() {
            let m = m.to_ascii_lowercase();
            if !mac_or_prefix(&m) {
                return refuse(
                    format!("no_options_for[{i}]"),
                    format!("{m:?} is not a MAC address (52:54:00:77:00:10) or a prefix ending in '*' (52:54:00:*)"),
                );
            }
            no_options_for.push(m);
        }
        let max_transfers = self.max_transfers.unwrap_or(DEFAULT_MAX_TRANSFERS);
        if !(1..=65536).contains(&max_transfers) {
            return refuse("max_transfers", format!("{max_transfers} is outside 1..=65536"));
        }
        let max_transfers_per_client = self.max_transfers_per_client.unwrap_or(DEFAULT_MAX_TRANSFERS_PER_CLIENT);
        if max_transfers_per_client == 0 || max_transfers_per_client > max_transfers {
            return refuse(
                "max_transfers_per_client",
                format!("{max_transfers_per_client} must be at least 1 and at most max_transfers ({max_transfers})"),
            );
        }
        let idle = self.idle_timeout_secs.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS);
        if !(2..=3600).contains(&idle) {
            return refuse("idle_timeout_secs", format!("{idle} is outside 2..=3600"));
        }
        let netascii_max_bytes = self.netascii_max_bytes.unwrap_or(DEFAULT_NETASCII_MAX_BYTES);
        if !self.enabled.unwrap_or(true) {
            return Ok(None);
        }
        Ok(Some(TftpConfig {
            listen: self.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 69))),
            max_blksize,
            max_windowsize,
            no_options_for,
            max_transfers,
            max_transfers_per_client,
            idle_timeout: std::time::Duration::from_secs(idle),
            netascii_max_bytes,
        }))
    }
}

/// `52:54:00:77:00:10`, or one to five octets followed by `*` (`52:54:00:*`).
fn mac_or_prefix(m: &str) -> bool {
    let (octets, whole) = match m.strip_suffix('*') {
        Some(p) => (p.strip_suffix(':').unwrap_or(p), false),
        None => (m, true),
    };
    let parts: Vec<&str> = octets.split(':').collect();
    let hex = parts.iter().all(|o| (1..=2).contains(&o.len()) && o.chars().all(|c| c.is_ascii_hexdigit()));
    hex && if whole { parts.len() == 6 } else { (1..6).contains(&parts.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> Result<Option<TftpConfig>, ConfigError> {
        toml::from_str::<RawTftp>(text).unwrap().validate()
    }

    #[test]
    fn defaults_and_disabled() {
        let c = section("").unwrap().unwrap();
        assert_eq!(c.listen, "0.0.0.0:69".parse().unwrap());
        assert_eq!((c.max_blksize, c.max_windowsize), (1468, 64));
        assert_eq!((c.max_transfers, c.max_transfers_per_client), (512, 8));
        assert_eq!(c.idle_timeout, std::time::Duration::from_secs(15));
        assert_eq!(c.netascii_max_bytes, 64 << 20);
        assert!(section("enabled = false").unwrap().is_none());
        let c = section("no_options_for = [\"52:54:00:AA:*\", \"52:54:00:77:00:10\"]").unwrap().unwrap();
        assert_eq!(c.no_options_for, ["52:54:00:aa:*", "52:54:00:77:00:10"]);
    }

    #[test]
    fn errors_name_the_key() {
        let key = |text: &str| section(text).unwrap_err().key;
        assert_eq!(key("max_blksize = 7"), "max_blksize");
        assert_eq!(key("max_blksize = 65465"), "max_blksize");
        assert_eq!(key("max_windowsize = 0"), "max_windowsize");
        // Checked even when the service is off: a wrong value is wrong either way.
        assert_eq!(key("enabled = false\nmax_windowsize = 0"), "max_windowsize");
        assert_eq!(key("no_options_for = [\"52-54-00-*\"]"), "no_options_for[0]");
        assert_eq!(key("no_options_for = [\"*\"]"), "no_options_for[0]");
        assert_eq!(key("no_options_for = [\"52:54:00\"]"), "no_options_for[0]");
        assert!(toml::from_str::<RawTftp>("blksize = 9").is_err());
        assert_eq!(key("max_transfers = 0"), "max_transfers");
        assert_eq!(key("max_transfers = 4\nmax_transfers_per_client = 5"), "max_transfers_per_client");
        assert_eq!(key("max_transfers_per_client = 0"), "max_transfers_per_client");
        assert_eq!(key("idle_timeout_secs = 1"), "idle_timeout_secs");
    }
}

//! The `[fleet]` config section: the provisioning master. Raw serde (unknown keys are
//! errors) → validated [`FleetConfig`], errors naming the key.

use crate::master::{Enroll, Policy};
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
    enroll: Option<String>,
    register_unknown: Option<bool>,
    default_class: Option<String>,
    #[serde(default)]
    trusted_bundle_keys: Vec<String>,
    heartbeat_s: Option<u64>,
    max_clock_skew_s: Option<u64>,
    max_nodes: Option<usize>,
    keep_verifications: Option<u64>,
    name: Option<String>,
    url: Option<String>,
    lease_ttl_ms: Option<u64>,
    #[serde(default)]
    backup_order: Vec<String>,
    key_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `fleetboot serve` runs the master on its HTTP service.
    pub enabled: bool,
    /// `fleetboot master` listens here (default: the HTTP service's address).
    pub listen: Option<SocketAddr>,
    pub policy: Policy,
    pub trusted_bundle_keys: Vec<String>,
    /// Verification records kept in the store (the newest).
    pub keep_verifications: u64,
    /// This master's name among the fleet's masters (default: the host's name).
    pub name: Option<String>,
    /// Where agents and the other masters reach this one (default: from the listen address).
    pub url: Option<String>,
    /// How long the master lease lasts without renewal; the holder renews it every third.
    pub lease_ttl_ms: u64,
    /// The operator's order of succession: the master at rank k waits k steps of
    /// `lease_ttl_ms / 4` after the lease expires before claiming it; masters not listed
    /// wait one more step than the last listed.
    pub backup_order: Vec<String>,
    /// The masters' shared signing key (every master of one fleet answers agents with the
    /// same key). Default: `data_dir/fleet/master.key`, made at first start.
    pub key_file: Option<std::path::PathBuf>,
}

impl FleetConfig {
    /// How long this master waits after the lease expired before it claims it.
    pub fn takeover_wait_ms(&self, name: &str) -> u64 {
        let rank = self.backup_order.iter().position(|n| n == name).unwrap_or(self.backup_order.len());
        rank as u64 * (self.lease_ttl_ms / 4)
    }
}

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        RawFleet::default().validate().expect("the defaults are valid")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fleet.{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl RawFleet {
    pub fn validate(self) -> Result<FleetConfig, ConfigError> {
        let err = |key: &str, problem: String| ConfigError { key: key.into(), problem };
        let enroll = match self.enroll.as_deref().unwrap_or("trust-first-use") {
            "trust-first-use" => Enroll::TrustFirstUse,
            "approve" => Enroll::Approve,
            other => return Err(err("enroll", format!("{other:?} is not \"trust-first-use\" or \"approve\""))),
        };
        if let Some(c) = &self.default_class {
            crate::model::validate_name("default_class", c).map_err(|e| err("default_class", e.problem))?;
        }
        if self.default_class.is_some() && !self.register_unknown.unwrap_or(false) {
            return Err(err("default_class", "only used with register_unknown = true".into()));
        }
        for (i, k) in self.trusted_bundle_keys.iter().enumerate() {
            if crate::unhex::<32>(k).is_none() {
                return Err(err(&format!("trusted_bundle_keys[{i}]"), format!("{k:?} is not an ed25519 public key (64 hex digits)")));
            }
        }
        let heartbeat_s = self.heartbeat_s.unwrap_or(10);
        if !(1..=3600).contains(&heartbeat_s) {
            return Err(err("heartbeat_s", format!("{heartbeat_s} is outside 1..=3600")));
        }
        let skew = self.max_clock_skew_s.unwrap_or(300);
        if !(1..=86_400).contains(&skew) {
            return Err(err("max_clock_skew_s", format!("{skew} is outside 1..=86400")));
        }
        let max_nodes = self.max_nodes.unwrap_or(10_000);
        if max_nodes == 0 {
            return Err(err("max_nodes", "must be at least 1".into()));
        }
        if let Some(n) = &self.name {
            crate::model::validate_name("name", n).map_err(|e| err("name", e.problem))?;
        }
        if let Some(u) = &self.url {
            let ok = (u.starts_with("http://") || u.starts_with("https://")) && !u.contains(char::is_whitespace) && !u.contains(',');
            if !ok {
                return Err(err("url", format!("{u:?} is not an http:// or https:// URL")));
            }
        }
        let lease_ttl_ms = self.lease_ttl_ms.unwrap_or(6000);
        if !(1000..=600_000).contains(&lease_ttl_ms) {
            return Err(err("lease_ttl_ms", format!("{lease_ttl_ms} is outside 1000..=600000")));
        }
        for (i, n) in self.backup_order.iter().enumerate() {
            crate::model::validate_name("backup_order", n).map_err(|e| err(&format!("backup_order[{i}]"), e.problem))?;
            if self.backup_order[..i].contains(n) {
                return Err(err(&format!("backup_order[{i}]"), format!("{n:?} is listed twice")));
            }
        }
        Ok(FleetConfig {
            enabled: self.enabled.unwrap_or(false),
            listen: self.listen,
            policy: Policy {
                enroll,
                register_unknown: self.register_unknown.unwrap_or(false).then(|| self.default_class.unwrap_or_default()),
                max_clock_skew_ms: skew * 1000,
                heartbeat_ms: heartbeat_s * 1000,
                max_nodes,
            },
            trusted_bundle_keys: self.trusted_bundle_keys.iter().map(|k| k.to_ascii_lowercase()).collect(),
            keep_verifications: self.keep_verifications.unwrap_or(100_000).max(1),
            name: self.name,
            url: self.url.map(|u| u.trim_end_matches('/').to_string()),
            lease_ttl_ms,
            backup_order: self.backup_order,
            key_file: self.key_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<FleetConfig, String> {
        let raw: RawFleet = toml::from_str(s).map_err(|e| e.to_string())?;
        raw.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = parse("").unwrap();
        assert!(!c.enabled && c.policy.enroll == Enroll::TrustFirstUse && c.policy.register_unknown.is_none());
        let c = parse("enabled = true\nenroll = \"approve\"\nregister_unknown = true\ndefault_class = \"lab\"").unwrap();
        assert_eq!(c.policy.register_unknown.as_deref(), Some("lab"));
        assert!(parse("enroll = \"tofu\"").unwrap_err().starts_with("fleet.enroll:"));
        assert!(parse("trusted_bundle_keys = [\"xyz\"]").unwrap_err().starts_with("fleet.trusted_bundle_keys[0]:"));
        assert!(parse("heartbeat_s = 0").unwrap_err().starts_with("fleet.heartbeat_s:"));
        assert!(parse("default_class = \"x\"").unwrap_err().starts_with("fleet.default_class:"));
        assert!(parse("colour = 1").unwrap_err().contains("unknown field `colour`"));
        assert!(parse("lease_ttl_ms = 10").unwrap_err().starts_with("fleet.lease_ttl_ms:"));
        assert!(parse("url = \"ftp://x\"").unwrap_err().starts_with("fleet.url:"));
        assert!(parse("backup_order = [\"m1\", \"m1\"]").unwrap_err().starts_with("fleet.backup_order[1]:"));
    }

    #[test]
    fn the_designated_order_decides_how_long_each_master_waits() {
        let c = parse("lease_ttl_ms = 8000\nbackup_order = [\"m1\", \"m2\", \"m3\"]").unwrap();
        let waits: Vec<u64> = ["m1", "m2", "m3", "other"].iter().map(|n| c.takeover_wait_ms(n)).collect();
        assert_eq!(waits, [0, 2000, 4000, 6000]);
        assert_eq!(parse("").unwrap().takeover_wait_ms("any"), 0, "with no order, whoever comes first");
    }
}

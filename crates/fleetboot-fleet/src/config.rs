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
    }
}

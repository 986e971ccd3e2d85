//! The `[nbd]` section of fleetboot's config file: raw serde type ([`RawNbd`],
//! `deny_unknown_fields`) validated into [`NbdConfig`], errors naming the key as written in
//! the section (`overlay_per_image."deb"`).

use crate::export::ExportsConfig;
use crate::overlay::{self, OverlayMode};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;

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

/// The `[nbd]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNbd {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
    overlay: Option<String>,
    #[serde(default)]
    overlay_per_image: BTreeMap<String, String>,
    block_size: Option<u32>,
}

/// The NBD service: catalog images as network disks with per-client overlays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// Whether `fleetboot serve` runs it (`fleetboot nbd` runs it regardless).
    pub enabled: bool,
    /// Port 10809; port 0 takes any free port.
    pub listen: SocketAddr,
    pub overlay: OverlayMode,
    /// Per image name (every version of it).
    pub overlay_per_image: HashMap<String, OverlayMode>,
    pub block_size: u32,
}

impl RawNbd {
    pub fn validate(self) -> Result<NbdConfig, ConfigError> {
        let mode = |key: &str, v: &str| match v.parse::<OverlayMode>() {
            Ok(m) => Ok(m),
            Err(e) => refuse(key, e.to_string()),
        };
        let overlay = mode("overlay", self.overlay.as_deref().unwrap_or("standard"))?;
        let mut overlay_per_image = HashMap::new();
        for (name, v) in &self.overlay_per_image {
            let key = format!("overlay_per_image.{name:?}");
            if name.contains(':') {
                return refuse(key, "the mode applies to every version of an image; use the name without \":VERSION\"");
            }
            if let Err(e) = fleetboot_images::validate_name(name) {
                return refuse(key, e.to_string());
            }
            overlay_per_image.insert(name.clone(), mode(&key, v)?);
        }
        let block_size = self.block_size.unwrap_or(overlay::DEFAULT_BLOCK_SIZE);
        if !overlay::block_size_ok(block_size) {
            return refuse("block_size", format!("{block_size} is not a power of two from 512 to 4194304 (4 MiB)"));
        }
        Ok(NbdConfig {
            enabled: self.enabled.unwrap_or(false),
            listen: self.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 10809))),
            overlay,
            overlay_per_image,
            block_size,
        })
    }
}

impl NbdConfig {
    /// How [`Exports`](crate::Exports) makes overlays under `data_dir/overlays`.
    pub fn exports(&self, data_dir: &Path) -> ExportsConfig {
        let mut c = ExportsConfig::new(data_dir);
        c.default_mode = self.overlay;
        c.modes = self.overlay_per_image.clone();
        c.block_size = self.block_size;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn section(text: &str) -> Result<NbdConfig, ConfigError> {
        toml::from_str::<RawNbd>(text).unwrap().validate()
    }

    #[test]
    fn defaults_and_overrides() {
        let c = section("").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.listen, "0.0.0.0:10809".parse().unwrap());
        assert_eq!(c.overlay, OverlayMode::Standard);
        assert_eq!(c.block_size, 64 << 10);
        let c = section(
            "enabled = true\nlisten = \"10.77.0.1:10900\"\noverlay = \"private\"\nblock_size = 4096\n\
             overlay_per_image = { kiosk = \"standard\" }\n",
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(c.listen.port(), 10900);
        let e = c.exports(Path::new("/state"));
        assert_eq!(e.default_mode, OverlayMode::Private);
        assert_eq!(e.modes.get("kiosk"), Some(&OverlayMode::Standard));
        assert_eq!(e.block_size, 4096);
        assert_eq!(e.data_dir, PathBuf::from("/state"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str| section(text).unwrap_err().to_string();
        assert!(err("overlay = \"persistent\"").starts_with("overlay: unknown overlay mode"));
        assert!(err("overlay_per_image = { deb = \"keep\" }").starts_with("overlay_per_image.\"deb\""));
        assert!(err("overlay_per_image = { \"deb:2\" = \"private\" }").starts_with("overlay_per_image.\"deb:2\""));
        assert!(err("overlay_per_image = { \"-x\" = \"private\" }").starts_with("overlay_per_image.\"-x\""));
        assert!(err("block_size = 1000").starts_with("block_size"));
        assert!(err("block_size = 8388608").starts_with("block_size"));
        assert!(toml::from_str::<RawNbd>("listen = \"nowhere\"").is_err());
        assert!(toml::from_str::<RawNbd>("size = 1").is_err());
    }
}

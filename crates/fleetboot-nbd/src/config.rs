//! The `[nbd]` section of fleetboot's config file: raw serde type ([`RawNbd`],
//! `deny_unknown_fields`) validated into [`NbdConfig`], errors naming the key as written in
//! the section (`overlay_per_image."deb"`). Validated without touching the disk: TLS files
//! are read when the service starts ([`crate::tls::Tls::load`]).

use crate::access::AllowList;
use crate::export::ExportsConfig;
use crate::limits::Limits;
use crate::overlay::{self, OverlayMode};
use crate::tls::TlsSettings;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    allow: Option<Vec<String>>,
    overlay_quota_mib: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    idle_timeout: Option<u64>,
    request_timeout: Option<u64>,
    io_threads: Option<usize>,
    capability_lifetime: Option<u64>,
    tls: Option<RawTls>,
}

/// `[nbd.tls]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
    /// `"require"` (default) or `"optional"`.
    mode: Option<String>,
    client_ca: Option<PathBuf>,
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
    /// Who may read catalog images and list them; `None`: the binary's default (loopback
    /// and the networks it serves DHCP on).
    pub allow: Option<AllowList>,
    /// Bytes of blocks one client may write into one overlay; `None`: the image's size.
    pub overlay_quota: Option<u64>,
    pub limits: Limits,
    /// How long the disk capability in a ProxyDHCP client's boot script
    /// (`IMAGE@MAC~CAPABILITY`) opens its overlay: the client's NBD client must be able to
    /// reconnect with it for as long as the machine runs on that disk.
    pub capability_lifetime: Duration,
    pub tls: Option<TlsSettings>,
}

/// The default [`NbdConfig::capability_lifetime`]: a day.
pub const DEFAULT_CAPABILITY_LIFETIME: Duration = Duration::from_secs(86_400);
/// The range `capability_lifetime` may be set in: a minute to 30 days.
pub const CAPABILITY_LIFETIME_RANGE: (u64, u64) = (60, 86_400 * 30);

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
        let allow = match &self.allow {
            Some(items) => {
                let list = AllowList::parse(items)
                    .map_err(|e| ConfigError { key: format!("allow[{}]", e.index), problem: e.problem })?;
                Some(list)
            }
            None => None,
        };
        let overlay_quota = match self.overlay_quota_mib {
            Some(0) => return refuse("overlay_quota_mib", "0 would refuse every write; leave it out for no quota"),
            Some(mib) => Some(mib.checked_mul(1 << 20).ok_or_else(|| ConfigError { key: "overlay_quota_mib".into(), problem: "too large".into() })?),
            None => None,
        };
        let d = Limits::default();
        let count = |key: &str, v: Option<usize>, default: usize, max: usize| match v {
            None => Ok(default),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => refuse(key, format!("{n} is not from 1 to {max}")),
        };
        let max_connections = count("max_connections", self.max_connections, d.max_connections, 1 << 20)?;
        let max_connections_per_client =
            count("max_connections_per_client", self.max_connections_per_client, d.max_connections_per_client, max_connections)?;
        let io_threads = count("io_threads", self.io_threads, d.io_threads, 256)?;
        let secs = |key: &str, v: Option<u64>, default: Duration| match v {
            None => Ok(default),
            Some(s) if (1..=86_400 * 7).contains(&s) => Ok(Duration::from_secs(s)),
            Some(s) => refuse(key, format!("{s} s is not from 1 s to a week")),
        };
        let limits = Limits {
            max_connections,
            max_connections_per_client,
            handshake_timeout: d.handshake_timeout,
            request_timeout: secs("request_timeout", self.request_timeout, d.request_timeout)?,
            idle_timeout: secs("idle_timeout", self.idle_timeout, d.idle_timeout)?,
            io_threads,
        };
        let capability_lifetime = match self.capability_lifetime {
            None => DEFAULT_CAPABILITY_LIFETIME,
            Some(s) if (CAPABILITY_LIFETIME_RANGE.0..=CAPABILITY_LIFETIME_RANGE.1).contains(&s) => Duration::from_secs(s),
            Some(s) => return refuse("capability_lifetime", format!("{s} s is not from 60 s to 30 days")),
        };
        let tls = match self.tls {
            None => None,
            Some(t) => {
                let path = |key: &str, p: Option<PathBuf>| match p {
                    Some(p) if p.is_absolute() => Ok(p),
                    Some(p) => refuse(format!("tls.{key}"), format!("{} is not an absolute path", p.display())),
                    None => refuse(format!("tls.{key}"), "missing (a PEM file)"),
                };
                let required = match t.mode.as_deref().unwrap_or("require") {
                    "require" => true,
                    "optional" => false,
                    other => return refuse("tls.mode", format!("{other:?} is not \"require\" or \"optional\"")),
                };
                Some(TlsSettings {
                    certificate: path("certificate", t.certificate)?,
                    key: path("key", t.key)?,
                    required,
                    client_ca: match t.client_ca {
                        Some(p) => Some(path("client_ca", Some(p))?),
                        None => None,
                    },
                })
            }
        };
        Ok(NbdConfig {
            enabled: self.enabled.unwrap_or(false),
            listen: self.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 10809))),
            overlay,
            overlay_per_image,
            block_size,
            allow,
            overlay_quota,
            limits,
            capability_lifetime,
            tls,
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
        c.overlay_quota = self.overlay_quota;
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
        assert!(err("allow = [\"10.0.0.0/8\", \"nowhere\"]").starts_with("allow[1]"));
        assert!(err("overlay_quota_mib = 0").starts_with("overlay_quota_mib"));
        assert!(err("max_connections = 0").starts_with("max_connections"));
        assert!(err("max_connections = 4\nmax_connections_per_client = 5").starts_with("max_connections_per_client"));
        assert!(err("idle_timeout = 0").starts_with("idle_timeout"));
        assert!(err("io_threads = 1000").starts_with("io_threads"));
        assert!(err("[tls]\ncertificate = \"/c.pem\"").starts_with("tls.key: missing"));
        assert!(err("[tls]\ncertificate = \"c.pem\"\nkey = \"/k.pem\"").starts_with("tls.certificate"));
        assert!(err("[tls]\ncertificate = \"/c.pem\"\nkey = \"/k.pem\"\nmode = \"maybe\"").starts_with("tls.mode"));
        assert!(toml::from_str::<RawNbd>("[tls]\npsk = \"x\"").is_err());
        assert!(err("capability_lifetime = 59").starts_with("capability_lifetime"));
        assert!(err("capability_lifetime = 2592001").starts_with("capability_lifetime"));
    }

    #[test]
    fn disk_capabilities_last_a_day_unless_said_otherwise() {
        assert_eq!(section("").unwrap().capability_lifetime, Duration::from_secs(86_400));
        assert_eq!(section("capability_lifetime = 3600").unwrap().capability_lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn access_limits_and_tls() {
        let c = section("").unwrap();
        assert_eq!(c.allow, None);
        assert_eq!(c.overlay_quota, None);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.tls, None);
        let c = section(
            "allow = [\"10.77.0.0/24\", \"192.0.2.9\"]\noverlay_quota_mib = 512\nmax_connections = 100\n\
             max_connections_per_client = 4\nidle_timeout = 60\nrequest_timeout = 30\nio_threads = 2\n\
             [tls]\ncertificate = \"/etc/fb/nbd.crt\"\nkey = \"/etc/fb/nbd.key\"\nmode = \"optional\"\nclient_ca = \"/etc/fb/ca.pem\"\n",
        )
        .unwrap();
        let allow = c.allow.clone().unwrap();
        assert!(allow.allows("10.77.0.9".parse().unwrap()) && allow.allows("192.0.2.9".parse().unwrap()));
        assert!(!allow.allows("192.0.2.10".parse().unwrap()));
        assert_eq!(c.overlay_quota, Some(512 << 20));
        assert_eq!(c.exports(Path::new("/d")).overlay_quota, Some(512 << 20));
        assert_eq!((c.limits.max_connections, c.limits.max_connections_per_client, c.limits.io_threads), (100, 4, 2));
        assert_eq!((c.limits.idle_timeout, c.limits.request_timeout), (Duration::from_secs(60), Duration::from_secs(30)));
        let tls = c.tls.unwrap();
        assert!(!tls.required);
        assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/fb/ca.pem")));
        let c = section("[tls]\ncertificate = \"/c\"\nkey = \"/k\"\n").unwrap();
        assert!(c.tls.unwrap().required, "TLS is required unless said otherwise");
    }
}

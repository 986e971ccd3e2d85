//! The config of `fleetboot stream serve`: a TOML file with the catalog, the interface and
//! one `[[session]]` per image to stream. Raw serde types (`deny_unknown_fields`) become
//! validated [`SessionSpec`]s; errors name the key.
//!
//! ```toml
//! data_dir = "/var/lib/fleetboot"   # the catalog is data_dir/images
//! interface = "eth0"                # name or IPv4 address
//! site_secret_file = "/etc/fleetboot/stream.secret"  # 64 hex digits, mode 0600; receivers
//!                                   # need the same. Default: data_dir/stream/site.secret,
//!                                   # created on first run (or FLEETBOOT_STREAM_SECRET)
//! repeat = true                     # open a new session when one ends
//!
//! [[session]]
//! image = "debian"                  # NAME or NAME:VERSION
//! group = "239.192.10.1:10900"      # default: derived from the image digest
//! rate = 50000000                   # bytes per second
//! solicit_secs = 5.0
//! min_receivers = 1
//! start_at = 3                      # start as soon as 3 registered
//! ttl = 1
//! lockstep = false
//! append_remaining = true           # after the learned sequence, the rest
//! ```

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::net;
use crate::sender::SessionSpec;
use crate::StreamdError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: PathBuf,
    interface: String,
    #[serde(default)]
    site_secret: Option<String>,
    #[serde(default)]
    site_secret_file: Option<PathBuf>,
    #[serde(default)]
    repeat: bool,
    #[serde(default)]
    session: Vec<RawSession>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    image: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    rate: Option<u64>,
    #[serde(default)]
    solicit_secs: Option<f64>,
    #[serde(default)]
    min_receivers: Option<u32>,
    #[serde(default)]
    start_at: Option<u32>,
    #[serde(default)]
    ttl: Option<u32>,
    #[serde(default)]
    lockstep: bool,
    #[serde(default)]
    append_remaining: Option<bool>,
    #[serde(default)]
    block_size: Option<u16>,
}

/// A validated `fleetboot stream serve` config.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub data_dir: PathBuf,
    pub repeat: bool,
    pub sessions: Vec<SessionSpec>,
}

/// Parses a 64-hex-digit site secret (all zeros refused).
pub fn parse_secret(s: &str) -> Result<[u8; 32], String> {
    crate::secret::parse(s)
}

impl StreamConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<StreamConfig, StreamdError> {
        let text = std::fs::read_to_string(path).map_err(|e| StreamdError::io(path, e))?;
        Self::parse(&text)
    }

    /// Validates a config text (resolving images in the catalog and the interface).
    pub fn parse(text: &str) -> Result<StreamConfig, StreamdError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| StreamdError::Config(e.to_string()))?;
        let cfg_err = |k: &str, m: String| StreamdError::Config(format!("{k}: {m}"));
        let secret = match (&raw.site_secret, &raw.site_secret_file) {
            (Some(_), Some(_)) => {
                return Err(cfg_err("site_secret", "give site_secret or site_secret_file, not both".into()))
            }
            (Some(s), None) => parse_secret(s).map_err(|m| cfg_err("site_secret", m))?,
            (None, Some(f)) => crate::secret::load(f).map_err(|e| cfg_err("site_secret_file", e.to_string()))?,
            (None, None) => crate::secret::resolve(None, Some(&crate::secret::default_path(&raw.data_dir)))?,
        };
        let iface =
            net::resolve_iface(&raw.interface).map_err(|e| cfg_err("interface", e.to_string()))?;
        if raw.session.is_empty() {
            return Err(cfg_err(
                "session",
                "at least one [[session]] is needed".into(),
            ));
        }
        let catalog = fleetboot_images::Catalog::open_dir(&raw.data_dir)?;
        let mut sessions = Vec::new();
        for (i, s) in raw.session.iter().enumerate() {
            let k = |f: &str| format!("session[{i}].{f}");
            let group = match &s.group {
                Some(g) => {
                    let a: SocketAddrV4 = g
                        .parse()
                        .map_err(|_| cfg_err(&k("group"), format!("{g:?} is not ADDR:PORT")))?;
                    if !a.ip().is_multicast() {
                        return Err(cfg_err(&k("group"), format!("{} is not multicast", a.ip())));
                    }
                    Some(a)
                }
                None => None,
            };
            let mut spec = SessionSpec::for_image(&catalog, &s.image, iface.clone(), group)
                .map_err(|e| cfg_err(&k("image"), e.to_string()))?;
            if let Some(bs) = s.block_size {
                if !(64..=8192).contains(&bs) || bs % 2 != 0 {
                    return Err(cfg_err(&k("block_size"), "must be even, 64..=8192".into()));
                }
                if bs != spec.block_size {
                    // The learned order was converted for the default block size.
                    let seq = crate::sequence::load(catalog.root(), &spec.sha256)?;
                    spec.order = seq
                        .map(|q| q.to_order(bs as u32, spec.size.div_ceil(bs as u64) as u32))
                        .unwrap_or_default();
                    spec.block_size = bs;
                }
            }
            if let Some(r) = s.rate {
                if r < 10_000 {
                    return Err(cfg_err(&k("rate"), "at least 10000 bytes/s".into()));
                }
                spec.rate = r;
            }
            if let Some(w) = s.solicit_secs {
                if !(0.0..=3600.0).contains(&w) {
                    return Err(cfg_err(&k("solicit_secs"), "0..=3600".into()));
                }
                spec.solicit = Duration::from_secs_f64(w);
            }
            if let Some(m) = s.min_receivers {
                spec.min_receivers = m;
            }
            spec.start_at = s.start_at;
            if let Some(t) = s.ttl {
                if !(1..=255).contains(&t) {
                    return Err(cfg_err(&k("ttl"), "1..=255".into()));
                }
                spec.ttl = t;
            }
            spec.lockstep = s.lockstep;
            if let Some(a) = s.append_remaining {
                spec.append_remaining = a;
            }
            spec.site_secret = secret;
            sessions.push(spec);
        }
        for (i, a) in sessions.iter().enumerate() {
            if sessions[..i].iter().any(|b| b.group == a.group) {
                return Err(cfg_err(
                    &format!("session[{i}].group"),
                    format!("{} is used by another session", a.group),
                ));
            }
        }
        Ok(StreamConfig {
            data_dir: raw.data_dir,
            repeat: raw.repeat,
            sessions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog_with_image() -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a.raw");
        std::fs::write(&src, vec![7u8; 100_000]).unwrap();
        let c = fleetboot_images::Catalog::open_dir(d.path()).unwrap();
        c.import(
            &src,
            &fleetboot_images::ImportOptions {
                name: Some("a".into()),
                format: Some("raw".into()),
            },
            &mut |_| {},
        )
        .unwrap();
        let dd = d.path().display().to_string();
        (d, dd)
    }

    #[test]
    fn parses_and_names_bad_keys() {
        let (_d, dd) = catalog_with_image();
        let ok = format!(
            "data_dir = \"{dd}\"\ninterface = \"lo\"\n[[session]]\nimage = \"a\"\nrate = 1000000\nstart_at = 2\n"
        );
        let c = StreamConfig::parse(&ok).unwrap();
        assert_eq!(c.sessions.len(), 1);
        // No secret configured: one was created in data_dir, private, and is reused.
        let created = crate::secret::load(&crate::secret::default_path(std::path::Path::new(&dd))).unwrap();
        assert_eq!(c.sessions[0].site_secret, created);
        assert_eq!(StreamConfig::parse(&ok).unwrap().sessions[0].site_secret, created);
        assert_eq!(c.sessions[0].rate, 1_000_000);
        assert_eq!(c.sessions[0].start_at, Some(2));
        assert!(c.sessions[0].group.ip().is_multicast());
        for (bad, key) in [
            (format!("{ok}bogus = 1\n"), "bogus"),
            (format!("{ok}group = \"10.0.0.1:5\"\n"), "session[0].group"),
            (format!("{ok}ttl = 0\n"), "session[0].ttl"),
            (
                ok.replace("image = \"a\"", "image = \"nope\""),
                "session[0].image",
            ),
            (ok.replace("\"lo\"", "\"nope0\""), "interface"),
            (format!("site_secret = \"xyz\"\n{ok}"), "site_secret"),
            (format!("site_secret = \"{}\"\n{ok}", "0".repeat(64)), "site_secret"),
            (format!("site_secret_file = \"{dd}/nope\"\n{ok}"), "site_secret_file"),
        ] {
            let e = StreamConfig::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
    }
}

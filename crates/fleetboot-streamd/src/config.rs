//! The `[stream]` section of fleetboot's config file, read by `fleetboot stream serve`: one
//! `[[stream.session]]` per catalog image to stream. The raw serde type ([`RawStream`],
//! `deny_unknown_fields`) is validated into a [`StreamConfig`] without touching the disk
//! (so `fleetboot check-config` can run anywhere); [`StreamConfig::resolve`] then finds the
//! images in the catalog and builds the [`SessionSpec`]s. Errors name the key as written in
//! the section (`session[0].group`).
//!
//! ```toml
//! data_dir = "/var/lib/fleetboot"   # the catalog is data_dir/images
//! [server]
//! interface = "eth0"                # sessions send here unless stream.interface says
//!
//! [stream]
//! interface = "eth0"                # optional: name or IPv4 address
//! site_secret_file = "/etc/fleetboot/stream.secret"  # 64 hex digits, mode 0600; receivers
//!                                   # need the same. Else FLEETBOOT_STREAM_SECRET, else
//!                                   # data_dir/stream/site.secret, created on first run
//! signing_key_file = "/etc/fleetboot/stream.key"  # the sender's ed25519 key, mode 0600;
//!                                   # default data_dir/stream/sender.key, created on first
//!                                   # run; receivers get its public half (sender.pub)
//! repeat = true                     # open a new session when one ends
//!
//! [[stream.session]]
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

use crate::net::Iface;
use crate::sender::SessionSpec;

/// A key of the section that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn refuse<T>(key: impl Into<String>, problem: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        key: key.into(),
        problem: problem.into(),
    })
}

/// The `[stream]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    site_secret: Option<String>,
    #[serde(default)]
    site_secret_file: Option<PathBuf>,
    #[serde(default)]
    signing_key_file: Option<PathBuf>,
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

/// One validated `[[stream.session]]`; `None` keeps [`SessionSpec::for_image`]'s default.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    pub image: String,
    pub group: Option<SocketAddrV4>,
    pub rate: Option<u64>,
    pub solicit: Option<Duration>,
    pub min_receivers: Option<u32>,
    pub start_at: Option<u32>,
    pub ttl: Option<u32>,
    pub lockstep: bool,
    pub append_remaining: Option<bool>,
    pub block_size: Option<u16>,
}

/// The validated `[stream]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    /// Where sessions send (name or IPv4 address); `None`: the server's interface.
    pub interface: Option<String>,
    /// The site secret's file; `None`: `FLEETBOOT_STREAM_SECRET`, else
    /// `data_dir/stream/site.secret` (created on first run). Read by [`StreamConfig::resolve`].
    pub site_secret_file: Option<PathBuf>,
    /// The sender's ed25519 signing key file; `None`: `data_dir/stream/sender.key`,
    /// created on first run. Read by [`StreamConfig::resolve`].
    pub signing_key_file: Option<PathBuf>,
    pub repeat: bool,
    pub sessions: Vec<SessionConfig>,
}

/// What `fleetboot stream serve` runs: the sessions resolved against the catalog.
#[derive(Debug, Clone)]
pub struct StreamSessions {
    pub repeat: bool,
    pub sessions: Vec<SessionSpec>,
}

/// Parses a 64-hex-digit site secret (all zeros refused).
pub fn parse_secret(s: &str) -> Result<[u8; 32], String> {
    crate::secret::parse(s)
}

impl RawStream {
    pub fn validate(self) -> Result<StreamConfig, ConfigError> {
        if self.site_secret.is_some() {
            // A config file is read by every role and its mode is nobody's business: the
            // secret lives in a file of its own that only the service may read.
            return refuse(
                "site_secret",
                "a secret written in the config is readable by whoever reads the config; \
                 put the 64 hex digits in a 0600 file and name it with site_secret_file \
                 (or set FLEETBOOT_STREAM_SECRET)",
            );
        }
        if self.site_secret_file.as_ref().is_some_and(|f| !f.is_absolute()) {
            return refuse("site_secret_file", "must be an absolute path");
        }
        if self.signing_key_file.as_ref().is_some_and(|f| !f.is_absolute()) {
            return refuse("signing_key_file", "must be an absolute path");
        }
        if self.session.is_empty() {
            return refuse("session", "at least one [[stream.session]] is needed");
        }
        let mut sessions = Vec::new();
        for (i, s) in self.session.into_iter().enumerate() {
            let k = |f: &str| format!("session[{i}].{f}");
            let group = match &s.group {
                Some(g) => {
                    let Ok(a) = g.parse::<SocketAddrV4>() else {
                        return refuse(k("group"), format!("{g:?} is not ADDR:PORT"));
                    };
                    if !a.ip().is_multicast() {
                        return refuse(k("group"), format!("{} is not multicast", a.ip()));
                    }
                    if let Some(j) = sessions.iter().position(|o: &SessionConfig| o.group == Some(a)) {
                        return refuse(k("group"), format!("{a} is used by session[{j}]"));
                    }
                    Some(a)
                }
                None => None,
            };
            if let Some(bs) = s.block_size {
                if !(64..=8192).contains(&bs) || bs % 2 != 0 {
                    return refuse(k("block_size"), "must be even, 64..=8192");
                }
            }
            if s.rate.is_some_and(|r| r < 10_000) {
                return refuse(k("rate"), "at least 10000 bytes/s");
            }
            if s.solicit_secs.is_some_and(|w| !(0.0..=3600.0).contains(&w)) {
                return refuse(k("solicit_secs"), "0..=3600");
            }
            if s.ttl.is_some_and(|t| !(1..=255).contains(&t)) {
                return refuse(k("ttl"), "1..=255");
            }
            sessions.push(SessionConfig {
                image: s.image,
                group,
                rate: s.rate,
                solicit: s.solicit_secs.map(Duration::from_secs_f64),
                min_receivers: s.min_receivers,
                start_at: s.start_at,
                ttl: s.ttl,
                lockstep: s.lockstep,
                append_remaining: s.append_remaining,
                block_size: s.block_size,
            });
        }
        Ok(StreamConfig {
            interface: self.interface,
            site_secret_file: self.site_secret_file,
            signing_key_file: self.signing_key_file,
            repeat: self.repeat,
            sessions,
        })
    }
}

impl StreamConfig {
    /// The site secret: from `site_secret_file` (0600, refused otherwise), else
    /// `FLEETBOOT_STREAM_SECRET`, else `data_dir/stream/site.secret`, created (0600,
    /// random) when it does not exist yet. Never all zeros.
    pub fn site_secret(&self, data_dir: &Path) -> Result<[u8; 32], ConfigError> {
        let default = crate::secret::default_path(data_dir);
        crate::secret::resolve(self.site_secret_file.as_deref(), Some(&default)).or_else(|e| {
            let key = if self.site_secret_file.is_some() { "site_secret_file" } else { "site_secret" };
            refuse(key, e.to_string())
        })
    }

    /// The sender's signing key: from `signing_key_file` (0600, refused otherwise; never
    /// created), else `data_dir/stream/sender.key`, created (0600, random) on first run.
    /// Its public half is kept beside it (`sender.pub`) for the receivers.
    pub fn signing_key(&self, data_dir: &Path) -> Result<fleetboot_stream::SigningKey, ConfigError> {
        match &self.signing_key_file {
            Some(f) => crate::secret::load_signing_key(f, false)
                .or_else(|e| refuse("signing_key_file", e.to_string())),
            None => crate::secret::load_signing_key(&crate::secret::signing_key_path(data_dir), true)
                .or_else(|e| refuse("signing_key", e.to_string())),
        }
    }

    /// Finds each session's image in `catalog` and builds what the sender runs, sending on
    /// `iface`, with the site secret of [`StreamConfig::site_secret`]. Two sessions may not
    /// end up on one group (an explicit group and another image's derived one included).
    pub fn resolve(
        &self,
        catalog: &fleetboot_images::Catalog,
        iface: &Iface,
        data_dir: &Path,
    ) -> Result<StreamSessions, ConfigError> {
        let site_secret = self.site_secret(data_dir)?;
        let signing_key = self.signing_key(data_dir)?;
        let mut sessions: Vec<SessionSpec> = Vec::new();
        for (i, s) in self.sessions.iter().enumerate() {
            let k = |f: &str| format!("session[{i}].{f}");
            let mut spec = SessionSpec::for_image(catalog, &s.image, iface.clone(), s.group)
                .or_else(|e| refuse(k("image"), e.to_string()))?;
            if let Some(bs) = s.block_size.filter(|bs| *bs != spec.block_size) {
                // The learned order was converted for the default block size.
                let seq = crate::sequence::load(catalog.root(), &spec.sha256)
                    .or_else(|e| refuse(k("block_size"), e.to_string()))?;
                spec.order = seq
                    .map(|q| q.to_order(bs as u32, spec.size.div_ceil(bs as u64) as u32))
                    .unwrap_or_default();
                spec.block_size = bs;
            }
            if let Some(r) = s.rate {
                spec.rate = r;
            }
            if let Some(w) = s.solicit {
                spec.solicit = w;
            }
            if let Some(m) = s.min_receivers {
                spec.min_receivers = m;
            }
            spec.start_at = s.start_at;
            if let Some(t) = s.ttl {
                spec.ttl = t;
            }
            spec.lockstep = s.lockstep;
            if let Some(a) = s.append_remaining {
                spec.append_remaining = a;
            }
            spec.site_secret = site_secret;
            spec.signing_key = Some(signing_key.clone());
            spec.hash_cache = Some(data_dir.join("stream").join("block-hashes"));
            if let Some(j) = sessions.iter().position(|o| o.group == spec.group) {
                return refuse(k("group"), format!("{} is used by session[{j}]", spec.group));
            }
            sessions.push(spec);
        }
        Ok(StreamSessions {
            repeat: self.repeat,
            sessions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog_with_image() -> (tempfile::TempDir, fleetboot_images::Catalog) {
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
        (d, c)
    }

    fn section(text: &str) -> Result<StreamConfig, ConfigError> {
        toml::from_str::<RawStream>(text)
            .map_err(|e| ConfigError {
                key: "(toml)".into(),
                problem: e.to_string(),
            })?
            .validate()
    }

    #[test]
    fn parses_resolves_and_names_bad_keys() {
        // The environment would take precedence over the created file.
        std::env::remove_var(crate::secret::ENV);
        let (d, catalog) = catalog_with_image();
        let lo = crate::net::resolve_iface("lo").unwrap();
        let ok = "[[session]]\nimage = \"a\"\nrate = 1000000\nstart_at = 2\n";
        let secret_path = crate::secret::default_path(d.path());
        assert!(!secret_path.exists());
        let config = section(ok).unwrap();
        assert!(!secret_path.exists(), "validating touches no file");
        let c = config.resolve(&catalog, &lo, d.path()).unwrap();
        assert_eq!(c.sessions.len(), 1);
        // No secret configured: one was created in data_dir, private, and is reused.
        let created = crate::secret::load(&secret_path).unwrap();
        assert_ne!(created, [0; 32]);
        assert_eq!(c.sessions[0].site_secret, created);
        let again = section(ok).unwrap().resolve(&catalog, &lo, d.path()).unwrap();
        assert_eq!(again.sessions[0].site_secret, created);
        // A named file is used as it is; one that others may read, or all zeros, is not.
        let own = d.path().join("own.secret");
        std::fs::write(&own, "02".repeat(32)).unwrap();
        let named = |f: &std::path::Path| {
            section(&format!("site_secret_file = \"{}\"\n{ok}", f.display()))
                .unwrap()
                .resolve(&catalog, &lo, d.path())
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(named(&own).unwrap_err().key, "site_secret_file");
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(named(&own).unwrap().sessions[0].site_secret, [2; 32]);
        std::fs::write(&own, "0".repeat(64)).unwrap();
        assert_eq!(named(&own).unwrap_err().key, "site_secret_file");
        assert_eq!(named(&d.path().join("nope")).unwrap_err().key, "site_secret_file");
        assert_eq!(c.sessions[0].rate, 1_000_000);
        assert_eq!(c.sessions[0].start_at, Some(2));
        assert!(c.sessions[0].group.ip().is_multicast());
        for (bad, key) in [
            (format!("{ok}bogus = 1\n"), "(toml)"),
            (format!("{ok}group = \"10.0.0.1:5\"\n"), "session[0].group"),
            (format!("{ok}ttl = 0\n"), "session[0].ttl"),
            (format!("{ok}block_size = 63\n"), "session[0].block_size"),
            (ok.replace("rate = 1000000", "rate = 9999"), "session[0].rate"),
            (format!("site_secret = \"xyz\"\n{ok}"), "site_secret"),
            (format!("site_secret = \"{}\"\n{ok}", "01".repeat(32)), "site_secret"),
            (format!("site_secret_file = \"relative\"\n{ok}"), "site_secret_file"),
            ("repeat = true\n".to_string(), "session"),
        ] {
            let e = section(&bad).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let missing = section(&ok.replace("image = \"a\"", "image = \"nope\"")).unwrap();
        assert_eq!(missing.resolve(&catalog, &lo, d.path()).unwrap_err().key, "session[0].image");
        // The second session of one image lands on the group the first derived.
        let twice = section(&format!("{ok}{ok}")).unwrap();
        assert_eq!(twice.resolve(&catalog, &lo, d.path()).unwrap_err().key, "session[1].group");
    }
}

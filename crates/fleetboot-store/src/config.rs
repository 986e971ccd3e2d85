//! The `[store]` config section: where fleetboot keeps its state. Raw serde (unknown keys
//! are errors) → validated [`StoreConfig`], errors naming the key. Validation does no I/O:
//! the password is read when the store is opened, not when a config is checked.
//!
//! ```toml
//! [store]
//! # Absent: the embedded SQLite file data_dir/fleetboot.db (one server, zero setup).
//! url = "postgresql://fleetboot@db.example.net/fleetboot?sslmode=require"
//! password_file = "/etc/fleetboot/db-password"  # else $FLEETBOOT_STORE_PASSWORD, $PGPASSWORD
//! ca_file = "/etc/fleetboot/db-ca.pem"           # else the system's roots
//! pool_size = 16
//! migrate = "auto"                               # or "manual": `fleetboot store migrate`
//! name = "boot-a"                                # this server among those sharing the store
//! heartbeat_ms = 1000                            # DHCP membership: how often it says it lives
//! peer_timeout_ms = 3000                         # and when a silent server counts as dead
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    url: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
    connect_timeout_s: Option<u64>,
    migrate: Option<String>,
    name: Option<String>,
    heartbeat_ms: Option<u64>,
    peer_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store.{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

/// Whether opening the store applies pending schema migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrate {
    /// Every server applies what is pending when it opens the store (under a lock, so
    /// servers starting together migrate once).
    Auto,
    /// Opening a store whose schema is behind is an error; `fleetboot store migrate` applies it.
    Manual,
}

/// A PostgreSQL store.
#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// As written, without a password (refused in the URL).
    pub url: String,
    pub password_file: Option<PathBuf>,
    /// Certificate authorities to trust for the server's TLS certificate (PEM); without
    /// it, the system's roots.
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig").field("url", &self.url).field("pool_size", &self.pool_size).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `data_dir/fleetboot.db`.
    Sqlite,
    Postgres(PgConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub backend: Backend,
    pub migrate: Migrate,
    /// This server's name among the servers sharing the store (`None`: the user of the
    /// config picks one, such as the server's address).
    pub name: Option<String>,
    pub liveness: Liveness,
}

/// How the DHCP servers sharing a store know who is alive: each writes a heartbeat every
/// `heartbeat`; one not heard from for `peer_timeout` is dead and its clients move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness { heartbeat: Duration::from_millis(1000), peer_timeout: Duration::from_millis(3000) }
    }
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        RawStore::default().validate(Path::new("/")).expect("the defaults are valid")
    }
}

impl StoreConfig {
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }
}

impl RawStore {
    /// `base`: the config file's directory (relative paths are taken from there).
    pub fn validate(self, base: &Path) -> Result<StoreConfig, ConfigError> {
        let err = |key: &str, problem: String| ConfigError { key: key.into(), problem };
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let migrate = match self.migrate.as_deref().unwrap_or("auto") {
            "auto" => Migrate::Auto,
            "manual" => Migrate::Manual,
            other => return Err(err("migrate", format!("{other:?} is not \"auto\" or \"manual\""))),
        };
        let backend = match self.url {
            None => {
                for (key, set) in [
                    ("password_file", self.password_file.is_some()),
                    ("ca_file", self.ca_file.is_some()),
                    ("pool_size", self.pool_size.is_some()),
                    ("connect_timeout_s", self.connect_timeout_s.is_some()),
                    ("name", self.name.is_some()),
                    ("heartbeat_ms", self.heartbeat_ms.is_some()),
                    ("peer_timeout_ms", self.peer_timeout_ms.is_some()),
                ] {
                    if set {
                        return Err(err(key, "only used with store.url (a PostgreSQL store)".into()));
                    }
                }
                Backend::Sqlite
            }
            Some(url) => {
                if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
                    return Err(err("url", format!("{url:?} is not a postgresql:// URL")));
                }
                let parsed: tokio_postgres::Config = url.parse().map_err(|e| err("url", format!("{e}")))?;
                if parsed.get_password().is_some() {
                    return Err(err(
                        "url",
                        "holds a password; put it in store.password_file or the FLEETBOOT_STORE_PASSWORD environment variable".into(),
                    ));
                }
                if parsed.get_user().is_none() {
                    return Err(err("url", "names no user (postgresql://USER@HOST/DB)".into()));
                }
                if parsed.get_dbname().is_none() {
                    return Err(err("url", "names no database (postgresql://USER@HOST/DB)".into()));
                }
                let pool_size = self.pool_size.unwrap_or(16);
                if !(2..=256).contains(&pool_size) {
                    return Err(err("pool_size", format!("{pool_size} is outside 2..=256")));
                }
                let connect = self.connect_timeout_s.unwrap_or(5);
                if !(1..=120).contains(&connect) {
                    return Err(err("connect_timeout_s", format!("{connect} is outside 1..=120")));
                }
                Backend::Postgres(PgConfig {
                    url,
                    password_file: self.password_file.map(abs),
                    ca_file: self.ca_file.map(abs),
                    pool_size,
                    connect_timeout: Duration::from_secs(connect),
                })
            }
        };
        if let Some(name) = &self.name {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
            if !ok {
                return Err(err("name", format!("{name:?}: 1 to 64 letters, digits, '-', '_', '.' or ':'")));
            }
        }
        let defaults = Liveness::default();
        let heartbeat = self.heartbeat_ms.map_or(defaults.heartbeat, Duration::from_millis);
        if !(Duration::from_millis(100)..=Duration::from_secs(10)).contains(&heartbeat) {
            return Err(err("heartbeat_ms", format!("{} is outside 100..=10000", heartbeat.as_millis())));
        }
        let peer_timeout = self.peer_timeout_ms.map_or(defaults.peer_timeout.max(heartbeat * 3), Duration::from_millis);
        if peer_timeout < heartbeat * 2 || peer_timeout > Duration::from_secs(60) {
            return Err(err(
                "peer_timeout_ms",
                format!("{} must be at least twice heartbeat_ms and at most 60000", peer_timeout.as_millis()),
            ));
        }
        Ok(StoreConfig { backend, migrate, name: self.name, liveness: Liveness { heartbeat, peer_timeout } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<StoreConfig, String> {
        let raw: RawStore = toml::from_str(s).map_err(|e| e.to_string())?;
        raw.validate(Path::new("/etc/fleetboot")).map_err(|e| e.to_string())
    }

    #[test]
    fn sqlite_by_default_and_postgres_by_url() {
        let c = parse("").unwrap();
        assert_eq!((c.backend, c.migrate), (Backend::Sqlite, Migrate::Auto));
        let c = parse("url = \"postgresql://fb@db/fleet?sslmode=require\"\npassword_file = \"pw\"").unwrap();
        let Backend::Postgres(pg) = c.backend else { panic!() };
        assert_eq!(pg.password_file.as_deref(), Some(Path::new("/etc/fleetboot/pw")));
        assert_eq!(pg.pool_size, 16);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(parse("url = \"postgresql://fb:secret@db/fleet\"").unwrap_err().starts_with("store.url: holds a password"));
        assert!(parse("url = \"mysql://fb@db/fleet\"").unwrap_err().starts_with("store.url:"));
        assert!(parse("url = \"postgresql://db/fleet\"").unwrap_err().starts_with("store.url: names no user"));
        assert!(parse("url = \"postgresql://fb@db\"").unwrap_err().starts_with("store.url: names no database"));
        assert!(parse("pool_size = 4").unwrap_err().starts_with("store.pool_size: only used with store.url"));
        assert!(parse("url = \"postgresql://fb@db/f\"\npool_size = 1").unwrap_err().starts_with("store.pool_size:"));
        assert!(parse("migrate = \"later\"").unwrap_err().starts_with("store.migrate:"));
        assert!(parse("name = \"a\"").unwrap_err().starts_with("store.name: only used with store.url"));
        let pg = "url = \"postgresql://fb@db/f\"\n";
        assert!(parse(&format!("{pg}name = \"a b\"")).unwrap_err().starts_with("store.name:"));
        assert!(parse(&format!("{pg}heartbeat_ms = 50")).unwrap_err().starts_with("store.heartbeat_ms:"));
        assert!(parse(&format!("{pg}heartbeat_ms = 1000\npeer_timeout_ms = 1500")).unwrap_err().starts_with("store.peer_timeout_ms:"));
        let c = parse(&format!("{pg}name = \"boot-a\"\nheartbeat_ms = 200\npeer_timeout_ms = 1000")).unwrap();
        assert_eq!(c.name.as_deref(), Some("boot-a"));
        assert_eq!(c.liveness, Liveness { heartbeat: Duration::from_millis(200), peer_timeout: Duration::from_secs(1) });
        assert_eq!(parse(pg).unwrap().liveness, Liveness::default());
        assert!(parse("colour = 1").unwrap_err().contains("unknown field `colour`"));
    }
}

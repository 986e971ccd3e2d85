//! The `[cache]` section (a cache: `fleetboot cache --config F`) and the `[origin]` section
//! (a boot server that caches fill from: `fleetboot serve`). Raw serde types with
//! `deny_unknown_fields`, validated without touching the disk into [`CacheConfig`] and
//! [`OriginConfig`]; an error names the key inside its section (`origin_key`,
//! `cache[1].key`).
//!
//! Secure by default: a cache needs its origin's public key (it serves nothing the key
//! did not sign), and an origin answers only the caches it lists, each with its key.

use crate::auth::valid_peer_name;
use crate::keys::{parse_public, VerifyingKey};
use crate::manifest::{MAX_CHUNK, MIN_CHUNK};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn refuse<T>(key: impl Into<String>, problem: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError { key: key.into(), problem: problem.into() })
}

/// A size: bytes, or a string with a binary suffix (`"64K"`, `"256M"`, `"20G"`, `"1T"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

impl RawSize {
    fn bytes(&self, key: &str) -> Result<u64, ConfigError> {
        match self {
            RawSize::Bytes(n) => Ok(*n),
            RawSize::Text(s) => {
                let t = s.trim();
                let (num, mult) = match t.char_indices().last() {
                    Some((i, c)) if c.is_ascii_alphabetic() => {
                        let m: u64 = match c.to_ascii_uppercase() {
                            'K' => 1 << 10,
                            'M' => 1 << 20,
                            'G' => 1 << 30,
                            'T' => 1 << 40,
                            _ => return refuse(key, format!("{s:?}: the suffix must be K, M, G or T")),
                        };
                        (&t[..i], m)
                    }
                    _ => (t, 1),
                };
                let n: u64 = num.trim().parse().map_err(|_| ConfigError { key: key.into(), problem: format!("{s:?} is not a size") })?;
                n.checked_mul(mult).ok_or_else(|| ConfigError { key: key.into(), problem: format!("{s:?} is too large") })
            }
        }
    }
}

/// `http://HOST:PORT` of an origin's cache listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginUrl {
    pub host: String,
    pub port: u16,
}

impl OriginUrl {
    pub fn parse(s: &str) -> Result<OriginUrl, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| format!("{s:?}: want http://HOST:PORT"))?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.is_empty() {
            return Err(format!("{s:?}: want http://HOST:PORT, without a path"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h.to_string(), p.parse::<u16>().map_err(|_| format!("{s:?}: bad port"))?)
            }
            _ => (rest.to_string(), 80),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(OriginUrl { host, port })
    }

    /// `HOST:PORT`, for connecting.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for OriginUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

/// The `[cache]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    name: Option<String>,
    origin: Option<String>,
    origin_key: Option<String>,
    key_file: Option<PathBuf>,
    max_size: Option<RawSize>,
    memory: Option<RawSize>,
    transparent_listen: Option<SocketAddr>,
    api_listen: Option<SocketAddr>,
    origin_timeout_ms: Option<u64>,
    max_clients: Option<usize>,
    scrub_interval_s: Option<u64>,
    fetch_run: Option<RawSize>,
    nbd_listen: Option<SocketAddr>,
    nbd_max_connections: Option<usize>,
    nbd_max_connections_per_client: Option<usize>,
}

/// A cache's settings. The clients' HTTP and TFTP listeners are the config's `[http]` and
/// `[tftp]` sections; `server.address` is how the site's clients reach the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The name the origin knows this cache by (`[[origin.cache]] name`).
    pub name: String,
    pub origin: OriginUrl,
    /// Signs every manifest, plan and directive this cache accepts.
    pub origin_key: VerifyingKey,
    /// This cache's secret key; default `data_dir/cache/cache.key` (created at first start).
    pub key_file: Option<PathBuf>,
    /// Disk the objects may take.
    pub max_bytes: u64,
    /// Memory for verified chunks that clients are reading.
    pub memory_bytes: u64,
    /// Where the gateway's TPROXY rule delivers connections addressed to the origin.
    pub transparent_listen: Option<SocketAddr>,
    /// The status API (`fleetboot cache status`); loopback by default.
    pub api_listen: SocketAddr,
    /// How long a request to the origin may take before the cache decides it is down.
    pub origin_timeout_ms: u64,
    /// Clients kept in the image map.
    pub max_clients: usize,
    /// Every object re-checked from disk this often (0: never; reads are checked anyway).
    pub scrub_interval_s: u64,
    /// Most bytes asked for in one request to the origin.
    pub fetch_run: u64,
    /// Where the site's clients read catalog images over NBD (read-only exports `IMAGE` or
    /// `IMAGE:VERSION`); off unless set. Per-client overlays stay at the origin.
    pub nbd_listen: Option<SocketAddr>,
    /// NBD connections served at once; more are closed at once (counted, logged) unless
    /// an idle one gives way.
    pub nbd_max_connections: usize,
    /// NBD connections served at once to one address (16 unless set), so that one host
    /// cannot take every slot.
    pub nbd_max_connections_per_client: usize,
}

impl RawCache {
    pub fn validate(self) -> Result<CacheConfig, ConfigError> {
        let name = self.name.ok_or_else(|| ConfigError { key: "name".into(), problem: "required: the name the origin lists this cache under".into() })?;
        if !valid_peer_name(&name) {
            return refuse("name", format!("{name:?}: 1 to 64 of a-z 0-9 . _ -"));
        }
        let origin = self.origin.ok_or_else(|| ConfigError { key: "origin".into(), problem: "required: http://HOST:PORT of the origin's [origin] listener".into() })?;
        let origin = OriginUrl::parse(&origin).map_err(|p| ConfigError { key: "origin".into(), problem: p })?;
        let origin_key = match self.origin_key {
            None => return refuse("origin_key", "required: the origin's public key (`fleetboot cache origin-key --config ORIGIN.toml` prints it); without it nothing could be verified"),
            Some(k) => parse_public(&k).map_err(|e| ConfigError { key: "origin_key".into(), problem: e.to_string() })?,
        };
        let max_bytes = self.max_size.map(|s| s.bytes("max_size")).transpose()?.unwrap_or(20 << 30);
        if max_bytes < 1 << 20 {
            return refuse("max_size", "at least 1M");
        }
        let memory_bytes = self.memory.map(|s| s.bytes("memory")).transpose()?.unwrap_or(128 << 20);
        if memory_bytes < 4 << 20 {
            return refuse("memory", "at least 4M");
        }
        let origin_timeout_ms = self.origin_timeout_ms.unwrap_or(3000);
        if !(100..=120_000).contains(&origin_timeout_ms) {
            return refuse("origin_timeout_ms", "within 100..=120000");
        }
        let max_clients = self.max_clients.unwrap_or(100_000);
        if max_clients == 0 {
            return refuse("max_clients", "at least 1");
        }
        let fetch_run = self.fetch_run.map(|s| s.bytes("fetch_run")).transpose()?.unwrap_or(64 << 20);
        if fetch_run < u64::from(MIN_CHUNK) {
            return refuse("fetch_run", format!("at least {MIN_CHUNK}"));
        }
        let nbd_max_connections = self.nbd_max_connections.unwrap_or(256);
        if !(1..=10_000).contains(&nbd_max_connections) {
            return refuse("nbd_max_connections", "within 1..=10000");
        }
        let nbd_max_connections_per_client = self.nbd_max_connections_per_client.unwrap_or(16);
        if !(1..=nbd_max_connections).contains(&nbd_max_connections_per_client) {
            return refuse("nbd_max_connections_per_client", format!("within 1..={nbd_max_connections} (nbd_max_connections)"));
        }
        Ok(CacheConfig {
            name,
            origin,
            origin_key,
            key_file: self.key_file,
            max_bytes,
            memory_bytes,
            transparent_listen: self.transparent_listen,
            api_listen: self.api_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8091))),
            origin_timeout_ms,
            max_clients,
            scrub_interval_s: self.scrub_interval_s.unwrap_or(86_400),
            fetch_run,
            nbd_listen: self.nbd_listen,
            nbd_max_connections,
            nbd_max_connections_per_client,
        })
    }
}

/// One `[[origin.cache]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOriginCache {
    name: Option<String>,
    key: Option<String>,
    url: Option<String>,
    nbd: Option<String>,
    #[serde(default)]
    prestage: Vec<String>,
}

/// A cache an origin answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginCache {
    pub name: String,
    pub key: VerifyingKey,
    /// Explicit mode: the base URL the site's clients reach the cache at
    /// (`http://10.1.0.1:8080`); scripts the origin renders for them name it. Without it
    /// (transparent mode) scripts name the origin, and the site's gateway hands the
    /// connections to the cache.
    pub url: Option<String>,
    /// `HOST:PORT` the site's clients reach the cache's NBD listener at (`cache.nbd_listen`):
    /// a plan's shared, read-only disk (`overlay = "shared"`) is named there, and its image
    /// is one of the plan's cached objects. A client's own overlay stays at the origin.
    pub nbd: Option<String>,
    /// Objects (`files/...`, `images/...`, or a path under `server.root`) the cache
    /// fetches ahead of time and holds pinned.
    pub prestage: Vec<String>,
}

/// The `[origin]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrigin {
    listen: Option<SocketAddr>,
    key_file: Option<PathBuf>,
    chunk_size: Option<RawSize>,
    rescan_interval_s: Option<u64>,
    max_rows_per_cache: Option<usize>,
    #[serde(default)]
    cache: Vec<RawOriginCache>,
}

/// An origin's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginConfig {
    /// The listener caches talk to (never the operator API's).
    pub listen: SocketAddr,
    /// The origin's secret key; default `data_dir/origin/origin.key` (created at first start).
    pub key_file: Option<PathBuf>,
    pub chunk_size: u32,
    /// How often the files caches hold are checked for a new version.
    pub rescan_interval_s: u64,
    pub max_rows_per_cache: usize,
    pub caches: Vec<OriginCache>,
}

impl RawOrigin {
    pub fn validate(self) -> Result<OriginConfig, ConfigError> {
        let chunk = self.chunk_size.map(|s| s.bytes("chunk_size")).transpose()?.unwrap_or(256 << 10);
        if !(u64::from(MIN_CHUNK)..=u64::from(MAX_CHUNK)).contains(&chunk) {
            return refuse("chunk_size", format!("{chunk} is outside {MIN_CHUNK}..={MAX_CHUNK}"));
        }
        let rescan_interval_s = self.rescan_interval_s.unwrap_or(30);
        if rescan_interval_s == 0 {
            return refuse("rescan_interval_s", "at least 1");
        }
        let mut caches: Vec<OriginCache> = Vec::new();
        for (i, c) in self.cache.into_iter().enumerate() {
            let key = |k: &str| format!("cache[{i}].{k}");
            let name = c.name.ok_or_else(|| ConfigError { key: key("name"), problem: "required".into() })?;
            if !valid_peer_name(&name) {
                return refuse(key("name"), format!("{name:?}: 1 to 64 of a-z 0-9 . _ -"));
            }
            if caches.iter().any(|o| o.name == name) {
                return refuse(key("name"), format!("{name:?} is listed twice"));
            }
            let pk = c.key.ok_or_else(|| ConfigError { key: key("key"), problem: "required: the cache's public key (`fleetboot cache key --config CACHE.toml` prints it)".into() })?;
            let pk = parse_public(&pk).map_err(|e| ConfigError { key: key("key"), problem: e.to_string() })?;
            if let Some(u) = &c.url {
                if !u.starts_with("http://") || u.trim_end_matches('/').len() <= "http://".len() {
                    return refuse(key("url"), format!("{u:?}: want http://HOST[:PORT]"));
                }
            }
            if let Some(n) = &c.nbd {
                let ok = n.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    return refuse(key("nbd"), format!("{n:?}: want HOST:PORT"));
                }
            }
            for (j, p) in c.prestage.iter().enumerate() {
                if prestage_object(p).is_err() {
                    return refuse(key(&format!("prestage[{j}]")), format!("{p:?} is not a file path or an object name"));
                }
            }
            caches.push(OriginCache { name, key: pk, url: c.url.map(|u| u.trim_end_matches('/').to_string()), nbd: c.nbd, prestage: c.prestage });
        }
        Ok(OriginConfig {
            listen: self.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8090))),
            key_file: self.key_file,
            chunk_size: chunk as u32,
            rescan_interval_s,
            max_rows_per_cache: self.max_rows_per_cache.unwrap_or(100_000).max(1),
            caches,
        })
    }
}

/// The object a prestage entry names: `images/NAME`, `files/PATH`, or a bare path under
/// `server.root`.
pub fn prestage_object(entry: &str) -> Result<String, crate::name::NameError> {
    if let Some(image) = entry.strip_prefix("images/") {
        return crate::name::image_object(image);
    }
    crate::name::file_object(entry.strip_prefix("files/").unwrap_or(entry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{from_seed, public_hex};

    fn cache(text: &str) -> Result<CacheConfig, ConfigError> {
        toml::from_str::<RawCache>(text).unwrap().validate()
    }

    fn origin(text: &str) -> Result<OriginConfig, ConfigError> {
        toml::from_str::<RawOrigin>(text).unwrap().validate()
    }

    fn key() -> String {
        public_hex(&from_seed([1; 32]).verifying_key())
    }

    #[test]
    fn a_cache_needs_a_name_an_origin_and_its_key() {
        let k = key();
        let c = cache(&format!("name = \"branch1\"\norigin = \"http://192.0.2.1:8090\"\norigin_key = \"{k}\"\nmax_size = \"2G\"")).unwrap();
        assert_eq!(c.origin, OriginUrl { host: "192.0.2.1".into(), port: 8090 });
        assert_eq!(c.max_bytes, 2 << 30);
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:8091");
        assert_eq!(cache("origin = \"http://a:1\"").unwrap_err().key, "name");
        assert_eq!(cache("name = \"b\"").unwrap_err().key, "origin");
        assert_eq!(cache("name = \"b\"\norigin = \"http://a:1\"").unwrap_err().key, "origin_key");
        assert_eq!(cache("name = \"b\"\norigin = \"http://a:1\"\norigin_key = \"xyz\"").unwrap_err().key, "origin_key");
        assert_eq!(cache(&format!("name = \"B!\"\norigin = \"http://a:1\"\norigin_key = \"{k}\"")).unwrap_err().key, "name");
        assert_eq!(cache(&format!("name = \"b\"\norigin = \"ftp://a\"\norigin_key = \"{k}\"")).unwrap_err().key, "origin");
        assert_eq!(cache(&format!("name = \"b\"\norigin = \"http://a:1\"\norigin_key = \"{k}\"\nmax_size = \"1X\"")).unwrap_err().key, "max_size");
        assert_eq!(cache(&format!("name = \"b\"\norigin = \"http://a:1\"\norigin_key = \"{k}\"\nmax_size = 1000")).unwrap_err().key, "max_size");
    }

    #[test]
    fn an_origin_lists_its_caches_with_their_keys() {
        let k = key();
        let o = origin(&format!(
            "chunk_size = \"64K\"\n[[cache]]\nname = \"branch1\"\nkey = \"{k}\"\nurl = \"http://10.1.0.1:8080/\"\nprestage = [\"vmlinuz\", \"images/debian\"]"
        ))
        .unwrap();
        assert_eq!(o.chunk_size, 64 << 10);
        assert_eq!(o.caches[0].url.as_deref(), Some("http://10.1.0.1:8080"));
        assert_eq!(origin("chunk_size = 100").unwrap_err().key, "chunk_size");
        assert_eq!(origin("[[cache]]\nname = \"b\"").unwrap_err().key, "cache[0].key");
        assert_eq!(origin(&format!("[[cache]]\nname = \"b\"\nkey = \"{k}\"\n[[cache]]\nname = \"b\"\nkey = \"{k}\"")).unwrap_err().key, "cache[1].name");
        assert_eq!(origin(&format!("[[cache]]\nname = \"b\"\nkey = \"{k}\"\nprestage = [\"../x\"]")).unwrap_err().key, "cache[0].prestage[0]");
        assert_eq!(origin(&format!("[[cache]]\nname = \"b\"\nkey = \"{k}\"\nurl = \"10.1.0.1\"")).unwrap_err().key, "cache[0].url");
        assert_eq!(origin(&format!("[[cache]]\nname = \"b\"\nkey = \"{k}\"\nnbd = \"10.1.0.1\"")).unwrap_err().key, "cache[0].nbd");
        let o = origin(&format!("[[cache]]\nname = \"b\"\nkey = \"{k}\"\nnbd = \"10.1.0.1:10809\"")).unwrap();
        assert_eq!(o.caches[0].nbd.as_deref(), Some("10.1.0.1:10809"));
    }

    #[test]
    fn urls_and_prestage_names() {
        assert_eq!(OriginUrl::parse("http://origin.example").unwrap().port, 80);
        assert!(OriginUrl::parse("http://a:1/x").is_err());
        assert_eq!(prestage_object("vmlinuz").unwrap(), "files/vmlinuz");
        assert_eq!(prestage_object("files/a/b").unwrap(), "files/a/b");
        assert_eq!(prestage_object("images/deb").unwrap(), "images/deb");
    }
}

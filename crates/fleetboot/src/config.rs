//! The TOML configuration: one file, composed of sections that each crate owns.
//!
//! | section | owner | validated type |
//! |---|---|---|
//! | `data_dir`, `[server]`, `[http]`, `[admin]`, `[router_advertisement]` | this crate | [`Config`] fields |
//! | `[dhcp]`, `[pxe]` | `fleetboot_dhcp::config` | [`DhcpConfig`], [`PxeConfig`] |
//! | `[tftp]` | `fleetboot_tftp::config` | [`TftpConfig`] |
//! | `[nbd]` | `fleetboot_nbd::config` | [`NbdConfig`] |
//! | `[negotiate]`, `[files]` | `fleetboot_negotiate::config` | [`NegotiateConfig`], [`FilesConfig`] |
//! | `[stream]` | `fleetboot_streamd::config` | [`StreamConfig`] |
//! | `[trace]` | `fleetboot_store::trace_config` | [`TraceLimits`] |
//! | `[[profile]]`, `[[client]]` | `fleetboot_boot::config` | `profiles`, `groups` |
//! | `[store]` | `fleetboot_store::config` | [`StoreConfig`] |
//!
//! Each owner has a raw serde type (`deny_unknown_fields`, so a misspelt key is an error)
//! and a `validate` that names the key inside its section; this module prefixes the
//! section, so every error reads `dhcp.subnet[0].lease_time: ...`. A key has one rule, in
//! its owner. What this module adds are the rules that span sections (a profile with a
//! disk needs `[nbd]`, `pxe.transport` needs its service).

use fleetboot_auth::AllowList;
use fleetboot_boot::{BootPlan, MacAddr, Profile};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use fleetboot_dhcp::config::{DhcpConfig, DhcpMode, PxeConfig, Transport};
pub use fleetboot_nbd::config::NbdConfig;
pub use fleetboot_negotiate::config::{FilesConfig, NegotiateConfig};
pub use fleetboot_streamd::config::StreamConfig;
pub use fleetboot_store::config::StoreConfig;
pub use fleetboot_store::trace_config::TraceLimits;
pub use fleetboot_tftp::config::TftpConfig;
pub use fleetboot_cache::config::{CacheConfig, OriginConfig};
pub use crate::serve::accept::{ConnectionLimits, ConnectionTimeouts};

/// A config that cannot be used: the file could not be read, or a key is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// `key` is the full path as written in the file (`dhcp.subnet[0].lease_time`).
    #[error("{}{key}: {problem}", file.as_ref().map(|f| format!("config {}: ", f.display())).unwrap_or_default())]
    Invalid { file: Option<PathBuf>, key: String, problem: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { file: None, key: key.into(), problem: problem.into() }
    }

    /// The full key path of an invalid config.
    #[cfg(test)]
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } => None,
        }
    }
}

/// The error of a section's owner: a key inside the section and what is wrong with it.
trait SectionError {
    fn into_parts(self) -> (String, String);
}

macro_rules! section_errors {
    ($($t:ty),*) => {$(
        impl SectionError for $t {
            fn into_parts(self) -> (String, String) {
                (self.key, self.problem)
            }
        }
    )*};
}

section_errors!(
    fleetboot_dhcp::ConfigError,
    fleetboot_tftp::config::ConfigError,
    fleetboot_nbd::config::ConfigError,
    fleetboot_negotiate::config::ConfigError,
    fleetboot_streamd::config::ConfigError,
    fleetboot_boot::config::ConfigError,
    fleetboot_cache::config::ConfigError,
    fleetboot_store::trace_config::ConfigError,
    fleetboot_fleet::config::ConfigError,
    fleetboot_store::config::ConfigError
);

/// An owner's error under the section's name: `subnet[0].lease_time` in `[dhcp]` is
/// `dhcp.subnet[0].lease_time`.
fn in_section(section: &str, e: impl SectionError) -> ConfigError {
    let (key, problem) = e.into_parts();
    ConfigError::invalid(format!("{section}.{key}"), problem)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    server: RawServer,
    #[serde(default)]
    dhcp: fleetboot_dhcp::config::RawDhcp,
    #[serde(default)]
    pxe: fleetboot_dhcp::config::RawPxe,
    #[serde(default)]
    tftp: fleetboot_tftp::config::RawTftp,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    router_advertisement: RawRa,
    #[serde(default)]
    nbd: fleetboot_nbd::config::RawNbd,
    negotiate: Option<fleetboot_negotiate::config::RawNegotiate>,
    files: Option<fleetboot_negotiate::config::RawFiles>,
    stream: Option<fleetboot_streamd::config::RawStream>,
    cache: Option<fleetboot_cache::config::RawCache>,
    origin: Option<fleetboot_cache::config::RawOrigin>,
    fleet: Option<fleetboot_fleet::config::RawFleet>,
    #[serde(default)]
    store: fleetboot_store::config::RawStore,
    #[serde(default)]
    trace: fleetboot_store::trace_config::RawTrace,
    #[serde(default)]
    client: Vec<fleetboot_boot::config::RawClient>,
    #[serde(default)]
    profile: Vec<Profile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    address: Ipv4Addr,
    interface: Option<String>,
    root: Option<PathBuf>,
    max_clients: Option<usize>,
    #[serde(default)]
    bind_to_address: bool,
}

/// Clients remembered by default (`server.max_clients`): identities from DHCP and
/// address-to-MAC bindings, each.
pub const DEFAULT_MAX_CLIENTS: usize = 32_768;
/// `http.concurrent_transfers` by default: enough to fill a 10–25 Gbit/s server link with
/// 1–2 Gbit/s clients, few enough that in a storm machines finish one after another.
pub const DEFAULT_CONCURRENT_TRANSFERS: usize = 16;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    concurrent_transfers: Option<usize>,
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    image_clients: Option<Vec<String>>,
    capability_lifetime: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    bootstrap_token: Option<bool>,
    dashboard_max_clients: Option<usize>,
    dashboard_stuck_after: Option<u64>,
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
}

/// `[admin]`: the operators' listener (the JSON API and `/metrics`), apart from the
/// boot network's file service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// `admin.listen`, 127.0.0.1:8081 by default: reachable from this host only.
    pub listen: SocketAddr,
    /// `admin.tls_cert` and `admin.tls_key`: serve HTTPS with this certificate.
    pub tls: Option<TlsFiles>,
    /// `admin.bootstrap_token`: while the store holds no token at all, `fleetboot serve`
    /// makes an admin token and writes it to `data_dir/admin.token` (mode 0600).
    pub bootstrap_token: bool,
    /// `admin.header_timeout_secs`, `admin.idle_timeout_secs`.
    pub timeouts: ConnectionTimeouts,
}

/// `SECTION.header_timeout_secs` (1..=3600) and `SECTION.idle_timeout_secs` (1..=86400),
/// the defaults where unset.
fn connection_timeouts(section: &str, header: Option<u64>, idle: Option<u64>) -> Result<ConnectionTimeouts, ConfigError> {
    let d = ConnectionTimeouts::DEFAULT;
    let header = header.unwrap_or(d.header.as_secs());
    if !(1..=3600).contains(&header) {
        return Err(ConfigError::invalid(format!("{section}.header_timeout_secs"), format!("{header} is outside 1..=3600")));
    }
    let idle = idle.unwrap_or(d.idle.as_secs());
    if !(1..=86_400).contains(&idle) {
        return Err(ConfigError::invalid(format!("{section}.idle_timeout_secs"), format!("{idle} is outside 1..=86400")));
    }
    Ok(ConnectionTimeouts { header: Duration::from_secs(header), idle: Duration::from_secs(idle) })
}

/// `admin.dashboard_max_clients` (10,000: the rows kept; the client quiet the longest
/// makes room) and `admin.dashboard_stuck_after` (120 s: a client quiet this long in the
/// middle of a step is flagged stuck).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DashboardConfig {
    pub max_clients: usize,
    pub stuck_after: u64,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The shortest and longest `http.capability_lifetime`, seconds.
const CAPABILITY_LIFETIME: (u64, u64) = (30, 7 * 24 * 3600);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRa {
    enabled: Option<bool>,
}

/// A validated config: what every subcommand and service reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// State: `fleetboot.db`, the image catalog, overlays.
    pub data_dir: PathBuf,
    /// `server.address`: how clients reach this server (next-server, URLs, identifier).
    pub address: Ipv4Addr,
    /// `server.interface`: the interface DHCP and router advertisements are bound to.
    pub interface: Option<String>,
    /// `server.bind_to_address` (default false): the PXE boot server (port 4011, in
    /// `fleetboot negotiate` and `serve`) and `fleetboot files` bind their sockets to
    /// `server.address` instead of 0.0.0.0, and a peer group gets a socket of its own bound
    /// to the group. Several negotiators and file servers can then run on one host and one
    /// interface, each on an address of its own (from `fleetboot-addr`, say), talking to
    /// each other as separate machines would. Broadcasts to those ports are no longer
    /// heard: clients reach them by unicast (a ProxyDHCP offer's boot servers, the
    /// negotiator's answer).
    pub bind_to_address: bool,
    /// `server.root`: the files TFTP and HTTP serve.
    pub root: PathBuf,
    /// `server.max_clients`: how many clients the services remember (the identity each
    /// gave in DHCP, which address is whose); the entry written longest ago goes first.
    pub max_clients: usize,
    pub dhcp: DhcpConfig,
    pub pxe: PxeConfig,
    pub tftp: Option<TftpConfig>,
    /// `http.listen`, when the HTTP service is enabled (port 0: any free port): the boot
    /// network's file service (`/files`, `/boot`, `/images`).
    pub http: Option<SocketAddr>,
    /// `http.max_connections`, `http.max_connections_per_client`: connections the HTTP
    /// service holds open at once, overall and from one address.
    pub http_connections: ConnectionLimits,
    /// `http.concurrent_transfers` (16; 0: no limit): files of 1 MiB and more sent at once
    /// over plain HTTP; the others wait their turn, machines that asked first going first
    /// (see `serve::transfer_gate`).
    pub http_concurrent_transfers: usize,
    /// `http.header_timeout_secs`, `http.idle_timeout_secs`: how long a connection may
    /// take to send a request's header, and stay silent between requests.
    pub http_timeouts: ConnectionTimeouts,
    /// `http.image_clients`: who may read catalog images at `/images/...`. Default: the
    /// networks of `[[dhcp.subnet]]`.
    pub image_clients: AllowList,
    /// `http.capability_lifetime`: seconds a client capability handed out in a boot plan
    /// stays valid (600).
    pub capability_lifetime: u64,
    /// `[admin]`, unless `admin.enabled = false`.
    pub admin: Option<AdminConfig>,
    /// `admin.dashboard_*`: what the operators' dashboard keeps.
    pub dashboard: DashboardConfig,
    pub router_advertisement: bool,
    pub nbd: NbdConfig,
    pub negotiate: Option<NegotiateConfig>,
    pub files: Option<FilesConfig>,
    /// `[stream]`, with `interface` filled in from `server.interface` when not given.
    pub stream: Option<StreamConfig>,
    /// `[cache]`: what `fleetboot cache` runs (an edge boot cache near the clients).
    pub cache: Option<CacheConfig>,
    /// `[origin]`: `fleetboot serve` answers edge caches (manifests, plans, directives).
    pub origin: Option<OriginConfig>,
    /// `[fleet]`: the provisioning master (`fleetboot master`, or in `fleetboot serve`).
    pub fleet: Option<fleetboot_fleet::config::FleetConfig>,
    /// `[store]`: SQLite in `data_dir` (the default), or a PostgreSQL several servers share.
    pub store: StoreConfig,
    /// `[trace]`: how much of the boot trace is queued and kept.
    pub trace: TraceLimits,
    /// Operator-assigned client groups (`[[client]]`), for `match.group`.
    pub groups: Vec<(MacAddr, String)>,
    pub profiles: Vec<Profile>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(|e| match e {
            ConfigError::Invalid { key, problem, .. } => {
                ConfigError::Invalid { file: Some(path.to_path_buf()), key, problem }
            }
            other => other,
        })
    }

    /// Relative paths in the file are taken relative to `base` (the config's directory).
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw = deserialize(text)?;
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let dhcp = raw.dhcp.validate().map_err(|e| in_section("dhcp", e))?;
        let pxe = raw.pxe.validate().map_err(|e| in_section("pxe", e))?;
        let tftp = raw.tftp.validate().map_err(|e| in_section("tftp", e))?;
        let nbd = raw.nbd.validate().map_err(|e| in_section("nbd", e))?;
        let negotiate = raw.negotiate.map(|r| r.validate()).transpose().map_err(|e| in_section("negotiate", e))?;
        let files = raw.files.map(|r| r.validate()).transpose().map_err(|e| in_section("files", e))?;
        let mut stream = raw.stream.map(|r| r.validate()).transpose().map_err(|e| in_section("stream", e))?;
        let cache = raw.cache.map(|r| r.validate()).transpose().map_err(|e| in_section("cache", e))?;
        let origin = raw.origin.map(|r| r.validate()).transpose().map_err(|e| in_section("origin", e))?;
        let fleet = raw.fleet.map(|r| r.validate()).transpose().map_err(|e| in_section("fleet", e))?;
        let store = raw.store.validate(base).map_err(|e| in_section("store", e))?;
        let trace = raw.trace.validate().map_err(|e| in_section("trace", e))?;
        let max_clients = raw.server.max_clients.unwrap_or(DEFAULT_MAX_CLIENTS);
        if !(16..=16_777_216).contains(&max_clients) {
            return Err(ConfigError::invalid("server.max_clients", format!("{max_clients} is outside 16..=16777216")));
        }
        // `[[profile]]` and `[[client]]` are top-level arrays: their keys need no prefix.
        let profiles = fleetboot_boot::config::validate(raw.client, raw.profile).map_err(|e| {
            let (key, problem) = e.into_parts();
            ConfigError::invalid(key, problem)
        })?;
        let http = match raw.http.enabled.unwrap_or(true) {
            true => Some(raw.http.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)))),
            false => None,
        };
        let http_connections = {
            let d = ConnectionLimits::HTTP;
            let max = raw.http.max_connections.unwrap_or(d.max);
            if !(1..=1_048_576).contains(&max) {
                return Err(ConfigError::invalid("http.max_connections", format!("{max} is outside 1..=1048576")));
            }
            let per_client = raw.http.max_connections_per_client.unwrap_or(d.per_client.min(max));
            if per_client == 0 || per_client > max {
                return Err(ConfigError::invalid(
                    "http.max_connections_per_client",
                    format!("{per_client} must be at least 1 and at most http.max_connections ({max})"),
                ));
            }
            ConnectionLimits { max, per_client }
        };
        let http_concurrent_transfers = raw.http.concurrent_transfers.unwrap_or(DEFAULT_CONCURRENT_TRANSFERS);
        if http_concurrent_transfers > 1_048_576 {
            return Err(ConfigError::invalid(
                "http.concurrent_transfers",
                format!("{http_concurrent_transfers} is outside 0..=1048576"),
            ));
        }
        let http_timeouts = connection_timeouts("http", raw.http.header_timeout_secs, raw.http.idle_timeout_secs)?;
        let router_advertisement = raw.router_advertisement.enabled.unwrap_or(false);
        let image_clients = match &raw.http.image_clients {
            Some(list) => AllowList::parse(list)
                .map_err(|e| ConfigError::invalid(format!("http.image_clients[{}]", e.index), e.problem))?,
            None => AllowList::new(
                dhcp.subnets
                    .iter()
                    .filter_map(|s| ipnet::Ipv4Net::new(s.network, s.prefix_len).ok().map(Into::into))
                    .collect(),
            ),
        };
        let capability_lifetime = raw.http.capability_lifetime.unwrap_or(600);
        if !(CAPABILITY_LIFETIME.0..=CAPABILITY_LIFETIME.1).contains(&capability_lifetime) {
            return Err(ConfigError::invalid(
                "http.capability_lifetime",
                format!("{capability_lifetime} s is outside {}..={} s", CAPABILITY_LIFETIME.0, CAPABILITY_LIFETIME.1),
            ));
        }
        let dashboard = DashboardConfig {
            max_clients: raw.admin.dashboard_max_clients.unwrap_or(10_000),
            stuck_after: raw.admin.dashboard_stuck_after.unwrap_or(120),
        };
        if dashboard.max_clients == 0 || dashboard.max_clients > 1_000_000 {
            return Err(ConfigError::invalid("admin.dashboard_max_clients", format!("{} is outside 1..=1000000", dashboard.max_clients)));
        }
        if dashboard.stuck_after == 0 {
            return Err(ConfigError::invalid("admin.dashboard_stuck_after", "0 s would flag every client"));
        }
        let admin = match raw.admin.enabled.unwrap_or(true) {
            false => None,
            true => {
                let listen = raw.admin.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8081)));
                let tls = match (raw.admin.tls_cert, raw.admin.tls_key) {
                    (Some(cert), Some(key)) => Some(TlsFiles { cert: abs(cert), key: abs(key) }),
                    (None, None) => None,
                    (Some(_), None) => return Err(ConfigError::invalid("admin.tls_key", "admin.tls_cert needs its private key")),
                    (None, Some(_)) => return Err(ConfigError::invalid("admin.tls_cert", "admin.tls_key needs its certificate")),
                };
                let timeouts = connection_timeouts("admin", raw.admin.header_timeout_secs, raw.admin.idle_timeout_secs)?;
                Some(AdminConfig { listen, tls, bootstrap_token: raw.admin.bootstrap_token.unwrap_or(true), timeouts })
            }
        };

        // Rules across sections.
        if matches!(store.backend, fleetboot_store::config::Backend::Postgres(_)) {
            for (key, set) in [("origin", origin.is_some()), ("cache", cache.is_some())] {
                if set {
                    return Err(ConfigError::invalid(
                        key,
                        "edge caches and their origin keep their tables in SQLite: run this role with the default store (no [store] url)",
                    ));
                }
            }
        }
        // Only an address service tells clients where their scripts are; a host running
        // just a negotiator or a file server has no use for pxe.transport.
        if dhcp.mode != DhcpMode::Off {
            match pxe.transport {
                Transport::Http if http.is_none() => {
                    return Err(ConfigError::invalid("pxe.transport", "\"http\" needs the HTTP service (http.enabled = true)"))
                }
                Transport::Tftp if tftp.is_none() => {
                    return Err(ConfigError::invalid("pxe.transport", "\"tftp\" needs the TFTP service (tftp.enabled = true)"))
                }
                _ => {}
            }
        }
        for (i, p) in profiles.profiles.iter().enumerate() {
            let key = |field: &str| fleetboot_boot::config::profile_key(i, p, field);
            match &p.boot {
                BootPlan::Linux { disk: Some(_), .. } if !nbd.enabled => {
                    return Err(ConfigError::invalid(key("boot.disk"), "needs the NBD service (nbd.enabled = true)"))
                }
                BootPlan::Sanboot { .. } if http.is_none() => {
                    return Err(ConfigError::invalid(key("boot.kind"), "\"sanboot\" needs the HTTP service (http.enabled = true)"))
                }
                _ => {}
            }
        }
        if let (Some(a), Some(h)) = (&admin, http) {
            let overlap = a.listen.ip() == h.ip() || a.listen.ip().is_unspecified() || h.ip().is_unspecified();
            if a.listen.port() == h.port() && a.listen.port() != 0 && overlap {
                return Err(ConfigError::invalid(
                    "admin.listen",
                    format!("{} overlaps http.listen {h}: the API has its own listener, give it another port", a.listen),
                ));
            }
        }
        if router_advertisement && raw.server.interface.is_none() {
            return Err(ConfigError::invalid(
                "router_advertisement.enabled",
                "needs server.interface (advertisements go out on one interface only)",
            ));
        }
        if let Some(s) = stream.as_mut() {
            s.interface = s.interface.take().or_else(|| raw.server.interface.clone());
            if s.interface.is_none() {
                return Err(ConfigError::invalid("stream.interface", "no interface to stream on (set it, or server.interface)"));
            }
        }

        Ok(Config {
            data_dir: abs(raw.data_dir.unwrap_or_else(|| PathBuf::from("/var/lib/fleetboot"))),
            address: raw.server.address,
            interface: raw.server.interface,
            bind_to_address: raw.server.bind_to_address,
            root: abs(raw.server.root.unwrap_or_else(|| PathBuf::from("/srv/fleetboot"))),
            max_clients,
            http_connections,
            http_concurrent_transfers,
            http_timeouts,
            dhcp,
            pxe,
            tftp,
            http,
            image_clients,
            capability_lifetime,
            admin,
            dashboard,
            router_advertisement,
            nbd,
            negotiate,
            files,
            stream,
            cache,
            origin,
            fleet,
            store,
            trace,
            groups: profiles.groups,
            profiles: profiles.profiles,
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("fleetboot.db")
    }

    /// Opens the store `[store]` names (SQLite at [`Config::db_path`] by default).
    pub fn open_store(&self) -> Result<fleetboot_store::Store, fleetboot_store::StoreError> {
        fleetboot_store::Store::open_configured(&self.store, &self.db_path(), self.trace.clone())
    }

    /// This server's name among the servers sharing a store: `store.name`, else its
    /// address (`server.address`), which the servers on one network do not share.
    pub fn server_name(&self) -> String {
        self.store.name.clone().unwrap_or_else(|| self.address.to_string())
    }

    /// The key client capabilities are made with (`data_dir/capability.key`, 0600).
    pub fn capability_key_path(&self) -> PathBuf {
        self.data_dir.join("capability.key")
    }

    /// Where `fleetboot serve` writes the first admin token (`admin.bootstrap_token`).
    pub fn bootstrap_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }
}

/// TOML → [`RawConfig`], a syntax or type error named by its key path
/// (`tftp.blksize` for a key `[tftp]` does not have) and line.
fn deserialize(text: &str) -> Result<RawConfig, ConfigError> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| format!(" (line {})", text[..s.start.min(text.len())].matches('\n').count() + 1)).unwrap_or_default()
    };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ConfigError::invalid("config", format!("{}{}", e.message(), line_of(e.span()))))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = match e.path().to_string() {
            p if p == "." => "config".to_string(),
            p => p,
        };
        let inner = e.into_inner();
        ConfigError::invalid(key, format!("{}{}", inner.message(), line_of(inner.span())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        data_dir = "state"
        [server]
        address = "10.77.0.1"
        [[dhcp.subnet]]
        network = "10.77.0.0/24"
        range = ["10.77.0.100", "10.77.0.199"]
    "#;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("/etc/fleetboot")).unwrap_err().to_string()
    }

    fn key(text: &str) -> String {
        Config::parse(text, Path::new("/etc/fleetboot")).unwrap_err().key().unwrap().to_string()
    }

    #[test]
    fn servers_bind_to_their_address_only_when_asked() {
        let c = Config::parse(MINIMAL, Path::new("/etc/fleetboot")).unwrap();
        assert!(!c.bind_to_address);
        let own = MINIMAL.replace("address = \"10.77.0.1\"", "address = \"10.77.0.1\"\nbind_to_address = true");
        assert!(Config::parse(&own, Path::new("/etc/fleetboot")).unwrap().bind_to_address);
    }

    #[test]
    fn every_shipped_example_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 5, "examples/ holds {seen} configs");
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fleetboot.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.profiles.len(), 2);
        assert_eq!(c.dhcp.reservations.len(), 1);
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(MINIMAL, Path::new("/etc/fleetboot")).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/fleetboot/state"));
        assert_eq!(c.dhcp.mode, DhcpMode::Server);
        assert_eq!(c.dhcp.subnets[0].lease_time, 3600);
        assert_eq!(c.http, Some("0.0.0.0:8080".parse().unwrap()));
        // The API is on its own listener, reachable from this host only, with a first
        // token made at start; base images are for the served subnets.
        let admin = c.admin.clone().unwrap();
        assert_eq!(admin.listen, "127.0.0.1:8081".parse().unwrap());
        assert!(admin.tls.is_none() && admin.bootstrap_token);
        assert_eq!(c.image_clients.to_string(), "[10.77.0.0/24]");
        assert_eq!(c.capability_lifetime, 600);
        assert_eq!(c.tftp.unwrap().listen, "0.0.0.0:69".parse().unwrap());
        assert!(!c.nbd.enabled);
        assert!(c.stream.is_none());
    }

    /// Every section's errors come back under the section's name, with the owner's key.
    #[test]
    fn errors_name_the_full_key() {
        assert_eq!(key(&format!("{MINIMAL}\n[tftp]\nblksize = 9")), "tftp.blksize");
        assert!(err(&format!("{MINIMAL}\n[tftp]\nblksize = 9")).contains("unknown field `blksize`"));
        assert_eq!(key(&format!("{MINIMAL}\n[tftp]\nmax_windowsize = 0")), "tftp.max_windowsize");
        assert_eq!(key(&MINIMAL.replace("10.77.0.199", "10.78.0.199")), "dhcp.subnet[0].range[1]");
        assert_eq!(key(&MINIMAL.replace("10.77.0.0/24", "10.77.0.1/24")), "dhcp.subnet[0].network");
        assert_eq!(key(&MINIMAL.replace("range = [", "lease_time = 30\nrange = [")), "dhcp.subnet[0].lease_time");
        assert_eq!(key(&MINIMAL.replace("range = [", "lease_time = \"1h\"\nrange = [")), "dhcp.subnet[0].lease_time");
        assert_eq!(key(&format!("{MINIMAL}\n[dhcp]\nmode = \"relay\"")), "dhcp.mode");
        assert_eq!(key(&format!("{MINIMAL}\n[pxe]\ntransport = \"nfs\"")), "pxe.transport");
        assert_eq!(key(&format!("{MINIMAL}\n[nbd]\nblock_size = 1000")), "nbd.block_size");
        assert_eq!(key(&format!("bogus = 1\n{MINIMAL}")), "bogus");
        assert_eq!(key(&format!("{MINIMAL}\nbogus = 1")), "dhcp.subnet[0].bogus");
        assert_eq!(key("[server]\naddress = \"10.0.0.1\"\n[dhcp]\nmode = \"off\"\n[[dhcp.subnet]]\nnetwork = 7"), "dhcp.subnet[0].network");
        assert!(err("data_dir = \"x\"").starts_with("config: missing field `server`"));
        assert!(err("[server\n").starts_with("config: "));
        let bad_profile = format!(
            "{MINIMAL}\n[[profile]]\nname = \"p\"\nmatch = {{ arch = [\"sparc\"] }}\nboot = {{ kind = \"boot_file\", path = \"x\" }}"
        );
        assert_eq!(key(&bad_profile), "profile[0] (p).match.arch[0]");
        let bad_reservation = format!("{MINIMAL}\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.9.0.1\"");
        assert_eq!(key(&bad_reservation), "dhcp.reservation[0].ip");
        let negotiate = "[negotiate]\nboot_files = [\"a\"]\nfile_servers = [\"x\"]\npeers = [\"10.0.0.2\"]\ngroups = [\"239.0.0.1\", \"239.0.0.2\"]";
        assert_eq!(key(&format!("{MINIMAL}\n{negotiate}")), "negotiate.file_servers[0]");
        assert_eq!(key(&format!("{MINIMAL}\n[files]\nmulticast_ttl = 0")), "files.multicast_ttl");
        assert_eq!(key(&format!("{MINIMAL}\n[trace]\nmax_rows = 5")), "trace.max_rows");
        assert_eq!(key(&MINIMAL.replace("address = ", "max_clients = 1\naddress = ")), "server.max_clients");
        assert_eq!(key(&format!("{MINIMAL}\n[http]\nmax_connections = 0\n")), "http.max_connections");
        assert_eq!(key(&format!("{MINIMAL}\n[http]\nheader_timeout_secs = 0\n")), "http.header_timeout_secs");
        assert_eq!(key(&format!("{MINIMAL}\n[http]\nidle_timeout_secs = 86401\n")), "http.idle_timeout_secs");
        assert_eq!(key(&format!("{MINIMAL}\n[admin]\nheader_timeout_secs = 3601\n")), "admin.header_timeout_secs");
        assert_eq!(key(&format!("{MINIMAL}\n[admin]\nidle_timeout_secs = 0\n")), "admin.idle_timeout_secs");
        let c = Config::parse(&format!("{MINIMAL}\n[http]\nheader_timeout_secs = 4\n[admin]\nidle_timeout_secs = 9\n"), Path::new("/")).unwrap();
        assert_eq!(c.http_timeouts, ConnectionTimeouts { header: Duration::from_secs(4), idle: Duration::from_secs(60) });
        assert_eq!(c.admin.unwrap().timeouts, ConnectionTimeouts { header: Duration::from_secs(10), idle: Duration::from_secs(9) });
        assert_eq!(
            key(&format!("{MINIMAL}\n[http]\nmax_connections = 4\nmax_connections_per_client = 5\n")),
            "http.max_connections_per_client"
        );
        let c = Config::parse(&format!("{MINIMAL}\n[http]\nmax_connections = 4\n"), Path::new("/")).unwrap();
        assert_eq!(c.http_connections, ConnectionLimits { max: 4, per_client: 4 });
        assert_eq!(Config::parse(MINIMAL, Path::new("/")).unwrap().http_connections, ConnectionLimits::HTTP);
        assert_eq!(key(&format!("{MINIMAL}\n[tftp]\nmax_transfers = 0")), "tftp.max_transfers");
        assert_eq!(key(&format!("{MINIMAL}\n[stream]\nrepeat = true")), "stream.session");
        assert_eq!(
            key(&format!("{MINIMAL}\n[[stream.session]]\nimage = \"a\"\nttl = 0")),
            "stream.session[0].ttl"
        );
    }

    #[test]
    fn dashboard_keys() {
        let c = Config::parse(&format!("{MINIMAL}\n[admin]\ndashboard_max_clients = 50\ndashboard_stuck_after = 9\n"), Path::new("/")).unwrap();
        assert_eq!(c.dashboard, DashboardConfig { max_clients: 50, stuck_after: 9 });
        let c = Config::parse(MINIMAL, Path::new("/")).unwrap();
        assert_eq!(c.dashboard, DashboardConfig { max_clients: 10_000, stuck_after: 120 });
        for (key, bad) in [("dashboard_max_clients", 0), ("dashboard_stuck_after", 0)] {
            let e = Config::parse(&format!("{MINIMAL}\n[admin]\n{key} = {bad}\n"), Path::new("/")).unwrap_err();
            assert!(e.to_string().contains(&format!("admin.{key}")), "{e}");
        }
    }

    #[test]
    fn admin_and_access_keys() {
        let c = Config::parse(
            &format!(
                "{MINIMAL}\n[http]\nimage_clients = [\"10.9.0.0/16\", \"192.0.2.7\"]\ncapability_lifetime = 60\n\
                 [admin]\nlisten = \"10.77.0.1:9443\"\ntls_cert = \"tls/a.crt\"\ntls_key = \"tls/a.key\"\nbootstrap_token = false\n"
            ),
            Path::new("/etc/fleetboot"),
        )
        .unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(admin.listen, "10.77.0.1:9443".parse().unwrap());
        assert_eq!(admin.tls.unwrap().key, PathBuf::from("/etc/fleetboot/tls/a.key"));
        assert!(!admin.bootstrap_token);
        assert!(c.image_clients.allows("192.0.2.7".parse().unwrap()));
        assert!(!c.image_clients.allows("10.77.0.5".parse().unwrap()), "an explicit list replaces the subnets");
        assert!(Config::parse(&format!("{MINIMAL}\n[admin]\nenabled = false"), Path::new("/")).unwrap().admin.is_none());
        // No subnets (ProxyDHCP): nobody reads images until the operator says who.
        let proxy = "[server]\naddress = \"10.0.0.1\"\n[dhcp]\nmode = \"proxy\"\n";
        assert!(Config::parse(proxy, Path::new("/")).unwrap().image_clients.is_empty());

        assert_eq!(key(&format!("{MINIMAL}\n[http]\nimage_clients = [\"10.0.0.0/8\", \"10.77.0.1/24\"]")), "http.image_clients[1]");
        assert_eq!(key(&format!("{MINIMAL}\n[http]\ncapability_lifetime = 5")), "http.capability_lifetime");
        assert_eq!(key(&format!("{MINIMAL}\n[admin]\ntls_cert = \"a.crt\"")), "admin.tls_key");
        assert_eq!(key(&format!("{MINIMAL}\n[admin]\ntls_key = \"a.key\"")), "admin.tls_cert");
        assert_eq!(key(&format!("{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:8080\"")), "admin.listen");
        assert_eq!(key(&format!("{MINIMAL}\n[admin]\ntoken = \"x\"")), "admin.token");
        // Port 0 twice is two free ports, and different ports never clash.
        let zero = format!("{MINIMAL}\n[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"");
        assert!(Config::parse(&zero, Path::new("/")).is_ok());
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("fleetboot-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, format!("{MINIMAL}\n[tftp]\nmax_blksize = 7\n")).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.starts_with(&format!("config {}: tftp.max_blksize: 7 is outside", path.display())), "{e}");
    }

    #[test]
    fn rules_across_sections() {
        // A profile with a disk needs the NBD service; sanboot needs HTTP.
        let disk = "[[profile]]\nname = \"d\"\nboot = { kind = \"linux\", kernel = \"k\", disk = { image = \"deb\" } }";
        assert_eq!(key(&format!("{MINIMAL}\n{disk}")), "profile[0] (d).boot.disk");
        assert!(Config::parse(&format!("{MINIMAL}\n[nbd]\nenabled = true\n{disk}"), Path::new("/")).is_ok());
        let bad = disk.replace("\"deb\"", "\"deb:0\"");
        assert_eq!(key(&format!("{MINIMAL}\n[nbd]\nenabled = true\n{bad}")), "profile[0] (d).boot.disk.image");
        let san = "[[profile]]\nname = \"w\"\nboot = { kind = \"sanboot\", image = \"win\" }";
        assert_eq!(
            key(&format!("{MINIMAL}\n[http]\nenabled = false\n[pxe]\ntransport = \"tftp\"\n{san}")),
            "profile[0] (w).boot.kind"
        );
        assert_eq!(key(&format!("{MINIMAL}\n[http]\nenabled = false")), "pxe.transport");
        assert_eq!(key(&format!("{MINIMAL}\n[tftp]\nenabled = false\n[pxe]\ntransport = \"tftp\"")), "pxe.transport");
        // Without an address service nobody is told about scripts: transport is moot.
        let off = "[server]\naddress = \"10.0.0.1\"\n[dhcp]\nmode = \"off\"\n[http]\nenabled = false\n";
        assert!(Config::parse(off, Path::new("/")).is_ok());
        assert_eq!(key(&format!("{MINIMAL}\n[router_advertisement]\nenabled = true")), "router_advertisement.enabled");
        let stream = "[[stream.session]]\nimage = \"a\"\n";
        assert_eq!(key(&format!("{MINIMAL}\n{stream}")), "stream.interface");
        let with_iface = MINIMAL.replace("address = \"10.77.0.1\"", "address = \"10.77.0.1\"\ninterface = \"eth0\"");
        let c = Config::parse(&format!("{with_iface}\n{stream}"), Path::new("/")).unwrap();
        assert_eq!(c.stream.unwrap().interface.as_deref(), Some("eth0"));
    }

    #[test]
    fn every_section_is_in_one_config() {
        let text = format!(
            "{MINIMAL}\n[nbd]\nenabled = true\nlisten = \"10.77.0.1:10900\"\n\
             [negotiate]\nboot_files = [\"a\"]\nfile_servers = [\"10.77.0.21\"]\ngroups = [\"239.255.1.1\", \"239.255.1.8\"]\npeer_group = \"239.255.77.1\"\n\
             [files]\nrfc2090_port = 6969\n\
             [stream]\ninterface = \"eth1\"\n[[stream.session]]\nimage = \"deb\"\n\
             [[client]]\nmac = \"52:54:00:77:00:10\"\ngroup = \"lab\"\n"
        );
        let c = Config::parse(&text, Path::new("/")).unwrap();
        assert_eq!(c.nbd.listen.port(), 10900);
        assert_eq!(c.negotiate.unwrap().groups.len(), 8);
        assert_eq!(c.files.unwrap().rfc2090_port, 6969);
        assert_eq!(c.stream.unwrap().interface.as_deref(), Some("eth1"));
        assert_eq!(c.groups.len(), 1);
    }
}

//! The `[negotiate]` (a boot negotiator on UDP 4011) and `[files]` (a multicast file server)
//! sections of fleetboot's config file: raw serde types ([`RawNegotiate`], [`RawFiles`],
//! `deny_unknown_fields`) validated into [`NegotiateConfig`] and [`FilesConfig`], errors
//! naming the key as written in the section (`file_servers[0]`).

use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
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

/// The file servers' control port (PREPARE, ACK/NAK, DELETE).
pub const CONTROL_PORT: u16 = 4013;
/// Where conflict queries and responses travel between negotiators and file servers.
pub const PEER_PORT: u16 = 4012;
/// PXE MTFTP: the port clients listen on, and the file server's request port.
pub const MTFTP_CLIENT_PORT: u16 = 1758;
pub const MTFTP_SERVER_PORT: u16 = 1759;

/// Where conflict queries go: a multicast group on `port`, and/or a list of peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    pub port: u16,
    pub group: Option<Ipv4Addr>,
    pub list: Vec<Ipv4Addr>,
}

/// The `[negotiate]` section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNegotiate {
    /// Boot files; the client's boot item type 0x8000 + i (option 43 sub-option 71) asks
    /// for `boot_files[i]`.
    boot_files: Vec<String>,
    /// File servers' control addresses ("IP" or "IP:PORT"), primary first.
    file_servers: Vec<String>,
    /// The (group) pool: `[first, last]`, inclusive.
    groups: [Ipv4Addr; 2],
    client_port: Option<u16>,
    server_port: Option<u16>,
    control_port: Option<u16>,
    listen_port: Option<u16>,
    peer_port: Option<u16>,
    peer_group: Option<Ipv4Addr>,
    #[serde(default)]
    peers: Vec<Ipv4Addr>,
    mtftp_timeout: Option<u8>,
    mtftp_delay: Option<u8>,
    wait_period_ms: Option<u64>,
    used_ttl_secs: Option<u64>,
    hold_secs: Option<u64>,
    confirm_within_ms: Option<u64>,
    multicast_ttl: Option<u32>,
    records: Option<PathBuf>,
    peer_key_file: Option<PathBuf>,
}

/// A boot negotiator.
#[derive(Debug, Clone)]
pub struct NegotiateConfig {
    pub boot_files: Vec<String>,
    pub file_servers: Vec<SocketAddrV4>,
    pub groups: Vec<Ipv4Addr>,
    pub client_port: u16,
    pub server_port: u16,
    /// Port 4011 unless testing.
    pub listen_port: u16,
    pub peers: Peers,
    pub mtftp_timeout: u8,
    pub mtftp_delay: u8,
    pub wait_period: Duration,
    pub used_ttl: Duration,
    pub hold: Duration,
    /// Answer from an assignment at once only if its file server confirmed it this recently.
    pub confirm_within: Duration,
    pub multicast_ttl: u32,
    /// JSON lines: every assignment activated/released, every client answered.
    pub records: Option<PathBuf>,
    /// The key shared with the other negotiators and the file servers (64 hex digits,
    /// mode 0600); the shell's default is `data_dir/negotiate.key`.
    pub peer_key_file: Option<PathBuf>,
}

/// The `[files]` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawFiles {
    control_port: Option<u16>,
    peer_port: Option<u16>,
    peer_group: Option<Ipv4Addr>,
    mtftp_port: Option<u16>,
    rfc2090_port: Option<u16>,
    /// Groups for RFC 2090 transfers, one per file: `[first, last]`, inclusive.
    rfc2090_groups: Option<[Ipv4Addr; 2]>,
    rfc2090_client_port: Option<u16>,
    registration_ttl_secs: Option<u64>,
    multicast_ttl: Option<u32>,
    records: Option<PathBuf>,
    max_groups: Option<usize>,
    peer_key_file: Option<PathBuf>,
}

/// A multicast file server.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    pub control_port: u16,
    pub peer_port: u16,
    pub peer_group: Option<Ipv4Addr>,
    pub mtftp_port: u16,
    pub rfc2090_port: u16,
    pub rfc2090_groups: Vec<Ipv4Addr>,
    pub rfc2090_client_port: u16,
    pub registration_ttl: Duration,
    pub multicast_ttl: u32,
    pub records: Option<PathBuf>,
    /// Slots (group, port) carried at once; each holds a socket and an open file.
    pub max_groups: usize,
    /// The key shared with the negotiators (as [`NegotiateConfig::peer_key_file`]).
    pub peer_key_file: Option<PathBuf>,
}

fn range(key: &str, [a, b]: [Ipv4Addr; 2]) -> Result<Vec<Ipv4Addr>, ConfigError> {
    let (a, b) = (u32::from(a), u32::from(b));
    if !Ipv4Addr::from(a).is_multicast() || !Ipv4Addr::from(b).is_multicast() {
        return refuse(key, "both ends must be multicast addresses (224.0.0.0/4)");
    }
    if a > b || b - a >= 4096 {
        return refuse(key, "[first, last] with first <= last and at most 4096 groups");
    }
    Ok((a..=b).map(Ipv4Addr::from).collect())
}

fn ttl(key: &str, v: Option<u32>) -> Result<u32, ConfigError> {
    match v.unwrap_or(1) {
        t @ 1..=255 => Ok(t),
        t => refuse(key, format!("{t} is not within 1..=255")),
    }
}

fn nonzero(key: &str, v: Option<u16>, default: u16) -> Result<u16, ConfigError> {
    match v.unwrap_or(default) {
        0 => refuse(key, "port 0"),
        p => Ok(p),
    }
}

fn multicast(key: &str, g: Option<Ipv4Addr>) -> Result<Option<Ipv4Addr>, ConfigError> {
    match g {
        Some(g) if !g.is_multicast() => refuse(key, format!("{g} is not a multicast address")),
        g => Ok(g),
    }
}

impl NegotiateConfig {
    /// The (group, client port) slots this negotiator hands out.
    pub fn slots(&self) -> Vec<crate::Slot> {
        self.groups.iter().map(|&group| crate::Slot { group, port: self.client_port }).collect()
    }

    /// Where a message for all peers goes: the peer group and each listed peer, on the
    /// peer port.
    pub fn peer_destinations(&self) -> Vec<SocketAddrV4> {
        let port = self.peers.port;
        self.peers.group.iter().chain(&self.peers.list).map(|&ip| SocketAddrV4::new(ip, port)).collect()
    }

    /// Whether other negotiators may talk to this one (at `me`): a peer group, or a listed
    /// peer that is neither this host nor one of its file servers.
    pub fn has_other_negotiators(&self, me: Ipv4Addr) -> bool {
        self.peers.group.is_some() || self.peers.list.iter().any(|p| *p != me && !self.file_servers.iter().any(|f| f.ip() == p))
    }

    /// Who may send to this negotiator (at `me`): with only a peer list, the listed peers
    /// and the file servers; with a peer group, anyone holding the key (`None`).
    pub fn accepted_senders(&self, me: Ipv4Addr) -> Option<Vec<Ipv4Addr>> {
        if self.peers.group.is_some() {
            return None;
        }
        Some(self.peers.list.iter().copied().chain(self.file_servers.iter().map(|f| *f.ip())).chain([me]).collect())
    }

    /// The negotiator of this section, for the host whose address is `id`.
    pub fn negotiator_config(&self, id: Ipv4Addr) -> crate::NegotiatorConfig {
        let mut nc = crate::NegotiatorConfig::new(id, self.slots(), self.server_port, self.file_servers.clone(), self.peer_destinations());
        nc.wait_period = self.wait_period;
        nc.used_ttl = self.used_ttl;
        nc.hold = self.hold;
        nc.confirm_within = self.confirm_within;
        nc
    }
}

impl RawNegotiate {
    pub fn validate(self) -> Result<NegotiateConfig, ConfigError> {
        if self.boot_files.is_empty() {
            return refuse("boot_files", "at least one boot file");
        }
        let control = nonzero("control_port", self.control_port, CONTROL_PORT)?;
        let mut file_servers = Vec::new();
        for (i, s) in self.file_servers.iter().enumerate() {
            let a = s
                .parse::<SocketAddrV4>()
                .or_else(|_| s.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, control)));
            match a {
                Ok(a) => file_servers.push(a),
                Err(_) => return refuse(format!("file_servers[{i}]"), format!("{s:?} is not IP or IP:PORT")),
            }
        }
        if file_servers.is_empty() {
            return refuse("file_servers", "at least one file server (primary first)");
        }
        if self.peer_group.is_none() && self.peers.is_empty() {
            return refuse("peers", "give peers (the other negotiators and the file servers) or negotiate.peer_group");
        }
        Ok(NegotiateConfig {
            boot_files: self.boot_files,
            file_servers,
            groups: range("groups", self.groups)?,
            client_port: nonzero("client_port", self.client_port, MTFTP_CLIENT_PORT)?,
            server_port: nonzero("server_port", self.server_port, MTFTP_SERVER_PORT)?,
            listen_port: nonzero("listen_port", self.listen_port, 4011)?,
            peers: Peers {
                port: nonzero("peer_port", self.peer_port, PEER_PORT)?,
                group: multicast("peer_group", self.peer_group)?,
                list: self.peers,
            },
            mtftp_timeout: self.mtftp_timeout.unwrap_or(2),
            mtftp_delay: self.mtftp_delay.unwrap_or(2),
            wait_period: Duration::from_millis(self.wait_period_ms.unwrap_or(1000).clamp(50, 60_000)),
            used_ttl: Duration::from_secs(self.used_ttl_secs.unwrap_or(60)),
            hold: Duration::from_secs(self.hold_secs.unwrap_or(120)),
            confirm_within: Duration::from_millis(self.confirm_within_ms.unwrap_or(1000)),
            multicast_ttl: ttl("multicast_ttl", self.multicast_ttl)?,
            records: self.records,
            peer_key_file: self.peer_key_file,
        })
    }
}

impl RawFiles {
    pub fn validate(self) -> Result<FilesConfig, ConfigError> {
        let default_groups = [Ipv4Addr::new(239, 255, 209, 1), Ipv4Addr::new(239, 255, 209, 254)];
        Ok(FilesConfig {
            control_port: nonzero("control_port", self.control_port, CONTROL_PORT)?,
            peer_port: nonzero("peer_port", self.peer_port, PEER_PORT)?,
            peer_group: multicast("peer_group", self.peer_group)?,
            mtftp_port: nonzero("mtftp_port", self.mtftp_port, MTFTP_SERVER_PORT)?,
            rfc2090_port: nonzero("rfc2090_port", self.rfc2090_port, 69)?,
            rfc2090_groups: range("rfc2090_groups", self.rfc2090_groups.unwrap_or(default_groups))?,
            rfc2090_client_port: nonzero("rfc2090_client_port", self.rfc2090_client_port, 1760)?,
            registration_ttl: Duration::from_secs(self.registration_ttl_secs.unwrap_or(30).max(1)),
            multicast_ttl: ttl("multicast_ttl", self.multicast_ttl)?,
            records: self.records,
            max_groups: match self.max_groups.unwrap_or(crate::files::DEFAULT_MAX_GROUPS) {
                n @ 1..=65536 => n,
                n => return refuse("max_groups", format!("{n} is outside 1..=65536")),
            },
            peer_key_file: self.peer_key_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiate(text: &str) -> Result<NegotiateConfig, ConfigError> {
        toml::from_str::<RawNegotiate>(text).map_err(|e| ConfigError { key: "(toml)".into(), problem: e.to_string() })?.validate()
    }
    fn files(text: &str) -> Result<FilesConfig, ConfigError> {
        toml::from_str::<RawFiles>(text).map_err(|e| ConfigError { key: "(toml)".into(), problem: e.to_string() })?.validate()
    }

    #[test]
    fn negotiate_and_files_sections() {
        let n = negotiate(
            "boot_files = [\"a\", \"b\"]\nfile_servers = [\"10.77.0.21\", \"10.77.0.22:5000\"]\n\
             groups = [\"239.255.1.1\", \"239.255.1.8\"]\npeer_group = \"239.255.77.1\"\n",
        )
        .unwrap();
        assert_eq!(n.groups.len(), 8);
        assert_eq!(n.file_servers[0].port(), CONTROL_PORT);
        assert_eq!(n.file_servers[1].port(), 5000);
        assert_eq!(n.listen_port, 4011);
        let f = files("rfc2090_port = 6969").unwrap();
        assert_eq!(f.rfc2090_port, 6969);
        assert_eq!(f.mtftp_port, MTFTP_SERVER_PORT);
        assert_eq!(f.rfc2090_groups.len(), 254);
        assert_eq!(f.max_groups, 256);
        assert_eq!(files("max_groups = 0").unwrap_err().key, "max_groups");
    }

    #[test]
    fn errors_name_the_key() {
        let ok = "boot_files = [\"a\"]\nfile_servers = [\"10.77.0.21\"]\npeers = [\"10.77.0.12\"]\n";
        let key = |r: Result<NegotiateConfig, ConfigError>| r.unwrap_err().key;
        assert_eq!(key(negotiate(&format!("{ok}groups = [\"10.0.0.1\", \"239.0.0.2\"]"))), "groups");
        assert_eq!(key(negotiate(&format!("{ok}groups = [\"239.0.0.9\", \"239.0.0.2\"]"))), "groups");
        assert!(negotiate(&format!("{ok}groups = [\"239.0.0.1\", \"239.0.0.2\"]\nbogus = 1"))
            .unwrap_err()
            .problem
            .contains("bogus"));
        let groups = "groups = [\"239.0.0.1\", \"239.0.0.2\"]";
        assert_eq!(key(negotiate(&format!("boot_files = [\"a\"]\nfile_servers = [\"x\"]\npeers = []\n{groups}"))), "file_servers[0]");
        assert_eq!(key(negotiate(&format!("boot_files = [\"a\"]\nfile_servers = [\"10.0.0.1\"]\n{groups}"))), "peers");
        assert_eq!(key(negotiate(&format!("{ok}{groups}\npeer_group = \"10.0.0.1\""))), "peer_group");
        assert_eq!(files("multicast_ttl = 0").unwrap_err().key, "multicast_ttl");
        assert_eq!(files("rfc2090_groups = [\"10.0.0.1\", \"10.0.0.2\"]").unwrap_err().key, "rfc2090_groups");
        assert_eq!(files("peer_group = \"10.0.0.1\"").unwrap_err().key, "peer_group");
        assert!(files("typo = 1").unwrap_err().problem.contains("typo"));
    }
}

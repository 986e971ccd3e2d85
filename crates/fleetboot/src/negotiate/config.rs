//! The `[negotiate]` and `[files]` sections: raw serde types (`deny_unknown_fields`)
//! validated into [`NegotiateConfig`] / [`FilesConfig`] with errors that name the key.

use anyhow::{bail, Result};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

/// Where conflict queries go: a multicast group on `peer_port`, and/or a list of peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    pub port: u16,
    pub group: Option<Ipv4Addr>,
    pub list: Vec<Ipv4Addr>,
}

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
}

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
}

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
}

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
}

pub const CONTROL_PORT: u16 = 4013;
pub const PEER_PORT: u16 = 4012;
pub const MTFTP_CLIENT_PORT: u16 = 1758;
pub const MTFTP_SERVER_PORT: u16 = 1759;

fn range(key: &str, [a, b]: [Ipv4Addr; 2]) -> Result<Vec<Ipv4Addr>> {
    let (a, b) = (u32::from(a), u32::from(b));
    if !Ipv4Addr::from(a).is_multicast() || !Ipv4Addr::from(b).is_multicast() {
        bail!("{key}: both ends must be multicast addresses (224.0.0.0/4)");
    }
    if a > b || b - a >= 4096 {
        bail!("{key}: [first, last] with first <= last and at most 4096 groups");
    }
    Ok((a..=b).map(Ipv4Addr::from).collect())
}

fn ttl(key: &str, v: Option<u32>) -> Result<u32> {
    match v.unwrap_or(1) {
        t @ 1..=255 => Ok(t),
        t => bail!("{key}: {t} is not within 1..=255"),
    }
}

fn nonzero(key: &str, v: Option<u16>, default: u16) -> Result<u16> {
    match v.unwrap_or(default) {
        0 => bail!("{key}: port 0"),
        p => Ok(p),
    }
}

impl RawNegotiate {
    pub fn validate(self) -> Result<NegotiateConfig> {
        if self.boot_files.is_empty() {
            bail!("negotiate.boot_files: at least one boot file");
        }
        let control = nonzero("negotiate.control_port", self.control_port, CONTROL_PORT)?;
        let mut file_servers = Vec::new();
        for (i, s) in self.file_servers.iter().enumerate() {
            let a = s
                .parse::<SocketAddrV4>()
                .or_else(|_| {
                    s.parse::<Ipv4Addr>()
                        .map(|ip| SocketAddrV4::new(ip, control))
                })
                .map_err(|_| {
                    anyhow::anyhow!("negotiate.file_servers[{i}]: {s:?} is not IP or IP:PORT")
                })?;
            file_servers.push(a);
        }
        if file_servers.is_empty() {
            bail!("negotiate.file_servers: at least one file server (primary first)");
        }
        if self.peer_group.is_none() && self.peers.is_empty() {
            bail!("negotiate.peers: give peers (the other negotiators and the file servers) or negotiate.peer_group");
        }
        if let Some(g) = self.peer_group.filter(|g| !g.is_multicast()) {
            bail!("negotiate.peer_group: {g} is not a multicast address");
        }
        Ok(NegotiateConfig {
            boot_files: self.boot_files,
            file_servers,
            groups: range("negotiate.groups", self.groups)?,
            client_port: nonzero("negotiate.client_port", self.client_port, MTFTP_CLIENT_PORT)?,
            server_port: nonzero("negotiate.server_port", self.server_port, MTFTP_SERVER_PORT)?,
            listen_port: nonzero("negotiate.listen_port", self.listen_port, 4011)?,
            peers: Peers {
                port: nonzero("negotiate.peer_port", self.peer_port, PEER_PORT)?,
                group: self.peer_group,
                list: self.peers,
            },
            mtftp_timeout: self.mtftp_timeout.unwrap_or(2),
            mtftp_delay: self.mtftp_delay.unwrap_or(2),
            wait_period: Duration::from_millis(
                self.wait_period_ms.unwrap_or(1000).clamp(50, 60_000),
            ),
            used_ttl: Duration::from_secs(self.used_ttl_secs.unwrap_or(60)),
            hold: Duration::from_secs(self.hold_secs.unwrap_or(120)),
            confirm_within: Duration::from_millis(self.confirm_within_ms.unwrap_or(1000)),
            multicast_ttl: ttl("negotiate.multicast_ttl", self.multicast_ttl)?,
            records: self.records,
        })
    }
}

impl RawFiles {
    pub fn validate(self) -> Result<FilesConfig> {
        if let Some(g) = self.peer_group.filter(|g| !g.is_multicast()) {
            bail!("files.peer_group: {g} is not a multicast address");
        }
        let rfc2090_groups = match self.rfc2090_groups {
            Some(r) => range("files.rfc2090_groups", r)?,
            None => range(
                "files.rfc2090_groups",
                [
                    Ipv4Addr::new(239, 255, 209, 1),
                    Ipv4Addr::new(239, 255, 209, 254),
                ],
            )?,
        };
        Ok(FilesConfig {
            control_port: nonzero("files.control_port", self.control_port, CONTROL_PORT)?,
            peer_port: nonzero("files.peer_port", self.peer_port, PEER_PORT)?,
            peer_group: self.peer_group,
            mtftp_port: nonzero("files.mtftp_port", self.mtftp_port, MTFTP_SERVER_PORT)?,
            rfc2090_port: nonzero("files.rfc2090_port", self.rfc2090_port, 69)?,
            rfc2090_groups,
            rfc2090_client_port: nonzero(
                "files.rfc2090_client_port",
                self.rfc2090_client_port,
                1760,
            )?,
            registration_ttl: Duration::from_secs(self.registration_ttl_secs.unwrap_or(30).max(1)),
            multicast_ttl: ttl("files.multicast_ttl", self.multicast_ttl)?,
            records: self.records,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const BASE: &str =
        "[server]\naddress = \"10.77.0.11\"\ninterface = \"eth0\"\n[dhcp]\nmode = \"off\"\n";

    fn parse(extra: &str) -> anyhow::Result<Config> {
        Config::parse(&format!("{BASE}{extra}"), Path::new("/etc/fleetboot"))
    }
    fn err(extra: &str) -> String {
        format!("{:#}", parse(extra).unwrap_err())
    }

    #[test]
    fn negotiate_and_files_sections() {
        let c = parse(
            r#"
            [negotiate]
            boot_files = ["a", "b"]
            file_servers = ["10.77.0.21", "10.77.0.22:5000"]
            groups = ["239.255.1.1", "239.255.1.8"]
            peer_group = "239.255.77.1"
            [files]
            rfc2090_port = 6969
            "#,
        )
        .unwrap();
        let n = c.negotiate.unwrap();
        assert_eq!(n.groups.len(), 8);
        assert_eq!(n.file_servers[0].port(), super::CONTROL_PORT);
        assert_eq!(n.file_servers[1].port(), 5000);
        assert_eq!(n.listen_port, 4011);
        let f = c.files.unwrap();
        assert_eq!(f.rfc2090_port, 6969);
        assert_eq!(f.mtftp_port, super::MTFTP_SERVER_PORT);
        assert!(parse("").unwrap().negotiate.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let ok =
            "boot_files = [\"a\"]\nfile_servers = [\"10.77.0.21\"]\npeers = [\"10.77.0.12\"]\n";
        assert!(err(&format!(
            "[negotiate]\n{ok}groups = [\"10.0.0.1\", \"239.0.0.2\"]"
        ))
        .contains("negotiate.groups"));
        assert!(err(&format!(
            "[negotiate]\n{ok}groups = [\"239.0.0.9\", \"239.0.0.2\"]"
        ))
        .contains("negotiate.groups"));
        assert!(err(&format!(
            "[negotiate]\n{ok}groups = [\"239.0.0.1\", \"239.0.0.2\"]\nbogus = 1"
        ))
        .contains("bogus"));
        assert!(err("[negotiate]\nboot_files = [\"a\"]\nfile_servers = [\"x\"]\npeers = []\ngroups = [\"239.0.0.1\", \"239.0.0.2\"]")
            .contains("negotiate.file_servers[0]"));
        assert!(err("[negotiate]\nboot_files = [\"a\"]\nfile_servers = [\"10.0.0.1\"]\ngroups = [\"239.0.0.1\", \"239.0.0.2\"]")
            .contains("negotiate.peers"));
        assert!(err("[files]\nmulticast_ttl = 0").contains("files.multicast_ttl"));
        assert!(
            err("[files]\nrfc2090_groups = [\"10.0.0.1\", \"10.0.0.2\"]")
                .contains("files.rfc2090_groups")
        );
        assert!(err("[files]\ntypo = 1").contains("typo"));
    }
}

//! What the engine serves (mode, subnets, reservations), and the `[dhcp]` and `[pxe]`
//! sections of fleetboot's config file that say so.
//!
//! Raw serde types ([`RawDhcp`], [`RawPxe`]: `deny_unknown_fields`) are validated into
//! [`DhcpConfig`] and [`PxeConfig`]. Subnets and reservations follow one set of rules
//! wherever they come from: the file's section and [`EngineConfig::validate`] both run it,
//! and a [`ConfigError`] names the key the operator wrote (`subnet[0].lease_time`).

use fleetboot_boot::MacAddr;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Full DHCP server, or ProxyDHCP next to someone else's DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Server,
    Proxy,
}

/// One IPv4 subnet and its dynamic range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub range_start: Ipv4Addr,
    pub range_end: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Seconds.
    pub lease_time: u32,
}

impl Subnet {
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len.min(32) as u32)
        };
        Ipv4Addr::from(bits)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let m = u32::from(self.mask());
        u32::from(ip) & m == u32::from(self.network) & m
    }

    /// Inside the dynamic range.
    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.range_start..=self.range_end).contains(&ip)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }
}

/// A fixed address for one client, matched by MAC or by client identifier (option 61).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub mac: Option<MacAddr>,
    pub client_id: Option<Vec<u8>>,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub mode: Mode,
    /// Our address: option 54, and the subnet of clients that are not relayed.
    pub server_ip: Ipv4Addr,
    pub subnets: Vec<Subnet>,
    pub reservations: Vec<Reservation>,
    /// NAK requests for addresses we know are wrong (RFC 2131 §4.3.2); otherwise stay silent
    /// so another server on the link can answer.
    pub authoritative: bool,
    /// How long an offered address stays set aside for the client it was offered to.
    pub offer_hold_secs: u64,
    /// How long a declined address stays out of the pool.
    pub decline_hold_secs: u64,
    /// The UDP port replies to clients go to (68; a test client on loopback listens
    /// elsewhere). Relayed replies go to the relay's port 67.
    #[serde(default = "client_port")]
    pub client_port: u16,
}

fn client_port() -> u16 {
    crate::engine::CLIENT_PORT
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: Mode::Server,
            server_ip: Ipv4Addr::UNSPECIFIED,
            subnets: Vec::new(),
            reservations: Vec::new(),
            authoritative: true,
            offer_hold_secs: 30,
            decline_hold_secs: 600,
            client_port: crate::engine::CLIENT_PORT,
        }
    }
}

/// A configuration refused, naming the key as the operator writes it inside the `[dhcp]`
/// (or `[pxe]`) section, e.g. `subnet[0].lease_time`. Whoever composes the sections into
/// one file prefixes the section: `dhcp.subnet[0].lease_time: ...`.
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

/// Shorter leases than this only multiply renewals: a client renews at half its lease.
pub const MIN_LEASE_TIME: u32 = 60;

impl EngineConfig {
    /// The one set of rules for subnets and reservations, whether they come from a config
    /// file ([`RawDhcp::validate`]) or are built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(Some(self.mode), &self.subnets, &self.reservations)
    }
}

/// `mode`: `None` when the address service is off (its subnets are still checked).
fn check(mode: Option<Mode>, subnets: &[Subnet], reservations: &[Reservation]) -> Result<(), ConfigError> {
    if mode == Some(Mode::Server) && subnets.is_empty() {
        return refuse(
            "subnet",
            "mode is \"server\" but no subnet is configured (add [[dhcp.subnet]] or set dhcp.mode = \"proxy\" or \"off\")",
        );
    }
    for (i, s) in subnets.iter().enumerate() {
        let key = |k: &str| format!("subnet[{i}].{k}");
        if s.prefix_len > 32 {
            return refuse(key("network"), format!("bad prefix length {}", s.prefix_len));
        }
        if u32::from(s.network) & !u32::from(s.mask()) != 0 {
            return refuse(key("network"), format!("{} has host bits set for /{}", s.network, s.prefix_len));
        }
        for (end, ip) in [s.range_start, s.range_end].into_iter().enumerate() {
            if !s.contains(ip) {
                return refuse(key(&format!("range[{end}]")), format!("{ip} is outside {}/{}", s.network, s.prefix_len));
            }
        }
        if s.range_start > s.range_end {
            return refuse(key("range"), format!("{} comes after {}", s.range_start, s.range_end));
        }
        if s.lease_time < MIN_LEASE_TIME {
            return refuse(key("lease_time"), format!("{} s is too short (at least {MIN_LEASE_TIME})", s.lease_time));
        }
    }
    for (i, r) in reservations.iter().enumerate() {
        if r.mac.is_none() && r.client_id.is_none() {
            return refuse(format!("reservation[{i}]"), "needs mac or client_id");
        }
        let key = format!("reservation[{i}].ip");
        if !subnets.iter().any(|s| s.contains(r.ip)) {
            return refuse(key, format!("{} is in no configured subnet", r.ip));
        }
        if let Some(dup) = reservations[..i].iter().position(|o| o.ip == r.ip) {
            return refuse(key, format!("{} is already reserved by reservation[{dup}]", r.ip));
        }
    }
    Ok(())
}

/// `dhcp.mode`: the engine's [`Mode`], or no address service at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpMode {
    Server,
    Proxy,
    Off,
}

impl DhcpMode {
    pub fn engine_mode(self) -> Option<Mode> {
        match self {
            DhcpMode::Server => Some(Mode::Server),
            DhcpMode::Proxy => Some(Mode::Proxy),
            DhcpMode::Off => None,
        }
    }
}

/// The `[dhcp]` section as written. `deny_unknown_fields`: a misspelt key is an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDhcp {
    mode: Option<String>,
    authoritative: Option<bool>,
    #[serde(default)]
    subnet: Vec<RawSubnet>,
    #[serde(default)]
    reservation: Vec<RawReservation>,
    offer_hold: Option<u64>,
    decline_hold: Option<u64>,
    port: Option<u16>,
    client_port: Option<u16>,
    pxe_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubnet {
    network: String,
    range: [Ipv4Addr; 2],
    router: Option<Ipv4Addr>,
    #[serde(default)]
    dns: Vec<Ipv4Addr>,
    domain: Option<String>,
    lease_time: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReservation {
    mac: Option<MacAddr>,
    client_id: Option<String>,
    ip: Ipv4Addr,
}

/// The validated `[dhcp]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    pub authoritative: bool,
    pub subnets: Vec<Subnet>,
    pub reservations: Vec<Reservation>,
    pub offer_hold_secs: u64,
    pub decline_hold_secs: u64,
    /// UDP port requests arrive on (67). Another port is for tests and for sharing a host
    /// with a DHCP server that owns 67; 0 takes any free port.
    pub port: u16,
    /// UDP port replies to clients go to (68); a test client on loopback listens elsewhere.
    pub client_port: u16,
    /// UDP port of PXE boot server requests (4011) when the engine answers them (0: any
    /// free port); with a `[negotiate]` section the negotiator owns that port instead
    /// (`negotiate.listen_port`).
    pub pxe_port: u16,
}

impl DhcpConfig {
    /// What the engine runs with; `None` when `mode = "off"`.
    pub fn engine_config(&self, server_ip: Ipv4Addr) -> Option<EngineConfig> {
        Some(EngineConfig {
            mode: self.mode.engine_mode()?,
            server_ip,
            subnets: self.subnets.clone(),
            reservations: self.reservations.clone(),
            authoritative: self.authoritative,
            offer_hold_secs: self.offer_hold_secs,
            decline_hold_secs: self.decline_hold_secs,
            client_port: self.client_port,
        })
    }
}

impl RawDhcp {
    pub fn validate(self) -> Result<DhcpConfig, ConfigError> {
        let mode = match self.mode.as_deref().unwrap_or("server") {
            "server" => DhcpMode::Server,
            "proxy" => DhcpMode::Proxy,
            "off" => DhcpMode::Off,
            other => return refuse("mode", format!("{other:?} is not one of \"server\", \"proxy\", \"off\"")),
        };
        let mut subnets = Vec::new();
        for (i, s) in self.subnet.into_iter().enumerate() {
            let (network, prefix_len) = parse_cidr(&s.network).map_err(|problem| ConfigError {
                key: format!("subnet[{i}].network"),
                problem,
            })?;
            subnets.push(Subnet {
                network,
                prefix_len,
                range_start: s.range[0],
                range_end: s.range[1],
                router: s.router,
                dns: s.dns,
                domain: s.domain,
                lease_time: s.lease_time.unwrap_or(3600),
            });
        }
        let mut reservations = Vec::new();
        for (i, r) in self.reservation.into_iter().enumerate() {
            let client_id = match &r.client_id {
                Some(hex) => Some(parse_hex(hex).map_err(|problem| ConfigError {
                    key: format!("reservation[{i}].client_id"),
                    problem,
                })?),
                None => None,
            };
            reservations.push(Reservation {
                mac: r.mac,
                client_id,
                ip: r.ip,
            });
        }
        check(mode.engine_mode(), &subnets, &reservations)?;
        let port = |key: &str, v: Option<u16>, default: u16| match v {
            Some(0) if key == "client_port" => refuse(key, "port 0"),
            v => Ok(v.unwrap_or(default)),
        };
        Ok(DhcpConfig {
            mode,
            authoritative: self.authoritative.unwrap_or(true),
            subnets,
            reservations,
            offer_hold_secs: self.offer_hold.unwrap_or(30),
            decline_hold_secs: self.decline_hold.unwrap_or(600),
            port: port("port", self.port, crate::engine::SERVER_PORT)?,
            client_port: port("client_port", self.client_port, crate::engine::CLIENT_PORT)?,
            pxe_port: port("pxe_port", self.pxe_port, crate::engine::PXE_PORT)?,
        })
    }
}

/// `10.77.0.0/24` → (network, prefix length).
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (net, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: want ADDRESS/PREFIX, e.g. 10.77.0.0/24"))?;
    let network = net
        .parse()
        .map_err(|_| format!("{net:?} is not an IPv4 address"))?;
    let prefix_len = len
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("bad prefix length {len:?}"))?;
    Ok((network, prefix_len))
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    s.split([':', '-'])
        .map(|p| u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not hex octets like 01:52:54:00:77:00:10")))
        .collect()
}

/// `pxe.transport`: how iPXE fetches its script and the files of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Tftp,
}

/// Boot files for PXE firmware that is not iPXE yet, per architecture: they chainload iPXE,
/// which asks again. Paths under the served root; `uefi_http` becomes an `http://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirmwareFiles {
    pub bios: Option<String>,
    pub uefi_x64: Option<String>,
    pub uefi_ia32: Option<String>,
    pub arm64: Option<String>,
    pub uefi_http: Option<String>,
}

/// The `[pxe]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPxe {
    transport: Option<String>,
    bios: Option<String>,
    uefi_x64: Option<String>,
    uefi_ia32: Option<String>,
    arm64: Option<String>,
    uefi_http: Option<String>,
}

/// The validated `[pxe]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeConfig {
    pub transport: Transport,
    pub firmware: FirmwareFiles,
}

impl RawPxe {
    pub fn validate(self) -> Result<PxeConfig, ConfigError> {
        let transport = match self.transport.as_deref().unwrap_or("http") {
            "http" => Transport::Http,
            "tftp" => Transport::Tftp,
            other => return refuse("transport", format!("{other:?} is not \"http\" or \"tftp\"")),
        };
        Ok(PxeConfig {
            transport,
            firmware: FirmwareFiles {
                bios: self.bios,
                uefi_x64: self.uefi_x64,
                uefi_ia32: self.uefi_ia32,
                arm64: self.arm64,
                uefi_http: self.uefi_http,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet() -> Subnet {
        Subnet {
            network: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
            range_start: Ipv4Addr::new(10, 0, 0, 100),
            range_end: Ipv4Addr::new(10, 0, 0, 200),
            router: None,
            dns: vec![],
            domain: None,
            lease_time: 3600,
        }
    }

    #[test]
    fn subnet_math() {
        let s = subnet();
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 0, 0, 255));
        assert!(s.contains(Ipv4Addr::new(10, 0, 0, 7)) && !s.contains(Ipv4Addr::new(10, 0, 1, 7)));
        assert!(
            s.in_range(Ipv4Addr::new(10, 0, 0, 150)) && !s.in_range(Ipv4Addr::new(10, 0, 0, 7))
        );
    }

    #[test]
    fn validation_names_the_item() {
        let ok = EngineConfig {
            subnets: vec![subnet()],
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let mut bad = ok.clone();
        bad.subnets[0].range_end = Ipv4Addr::new(10, 0, 1, 5);
        assert_eq!(bad.validate().unwrap_err().key, "subnet[0].range[1]");
        let mut bad = ok.clone();
        let r = Reservation {
            mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
            client_id: None,
            ip: Ipv4Addr::new(10, 0, 0, 5),
        };
        bad.reservations = vec![
            r.clone(),
            Reservation {
                mac: Some(MacAddr([2, 0, 0, 0, 0, 2])),
                ..r
            },
        ];
        assert_eq!(bad.validate().unwrap_err().key, "reservation[1].ip");
    }

    fn section(text: &str) -> Result<DhcpConfig, ConfigError> {
        toml::from_str::<RawDhcp>(text).unwrap().validate()
    }

    const ONE_SUBNET: &str = "[[subnet]]\nnetwork = \"10.77.0.0/24\"\nrange = [\"10.77.0.100\", \"10.77.0.199\"]\n";

    #[test]
    fn section_defaults() {
        let c = section(ONE_SUBNET).unwrap();
        assert_eq!(c.mode, DhcpMode::Server);
        assert_eq!((c.port, c.client_port, c.pxe_port), (67, 68, 4011));
        assert_eq!(c.subnets[0].lease_time, 3600);
        assert_eq!(c.subnets[0].prefix_len, 24);
        let e = c.engine_config(Ipv4Addr::new(10, 77, 0, 1)).unwrap();
        assert!(e.validate().is_ok());
        assert!(section("mode = \"off\"").unwrap().engine_config(Ipv4Addr::LOCALHOST).is_none());
    }

    /// The file and code that builds an `EngineConfig` meet the same rule for a key.
    #[test]
    fn one_rule_for_lease_time_and_host_bits() {
        let short = format!("{ONE_SUBNET}lease_time = 59\n");
        assert_eq!(section(&short).unwrap_err().key, "subnet[0].lease_time");
        assert!(section(&format!("{ONE_SUBNET}lease_time = 60\n")).is_ok());
        let mut c = EngineConfig {
            subnets: vec![subnet()],
            ..Default::default()
        };
        c.subnets[0].lease_time = 59;
        assert_eq!(c.validate().unwrap_err().key, "subnet[0].lease_time");
        c.subnets[0].lease_time = 60;
        assert!(c.validate().is_ok());
        c.subnets[0].network = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(c.validate().unwrap_err().key, "subnet[0].network");
        let host_bits = ONE_SUBNET.replace("10.77.0.0/24", "10.77.0.1/24");
        assert!(section(&host_bits).unwrap_err().problem.contains("host bits"));
    }

    #[test]
    fn section_errors_name_the_key() {
        let key = |text: &str| section(text).unwrap_err().key;
        assert_eq!(key("mode = \"relay\""), "mode");
        assert_eq!(key(""), "subnet");
        assert_eq!(key(&ONE_SUBNET.replace("10.77.0.199", "10.78.0.199")), "subnet[0].range[1]");
        assert_eq!(key(&ONE_SUBNET.replace("/24", "/33")), "subnet[0].network");
        assert_eq!(key(&ONE_SUBNET.replace("10.77.0.100\", \"10.77.0.199", "10.77.0.199\", \"10.77.0.100")), "subnet[0].range");
        let reservation = |body: &str| format!("{ONE_SUBNET}[[reservation]]\n{body}\n");
        assert_eq!(key(&reservation("ip = \"10.77.0.5\"")), "reservation[0]");
        assert_eq!(key(&reservation("mac = \"52:54:00:00:00:01\"\nip = \"10.9.0.1\"")), "reservation[0].ip");
        assert_eq!(key(&reservation("client_id = \"zz\"\nip = \"10.77.0.5\"")), "reservation[0].client_id");
        assert_eq!(key(&format!("client_port = 0\n{ONE_SUBNET}")), "client_port");
        assert!(toml::from_str::<RawDhcp>("subnets = []").is_err());
        assert_eq!(
            toml::from_str::<RawPxe>("transport = \"ftp\"").unwrap().validate().unwrap_err().key,
            "transport"
        );
    }
}

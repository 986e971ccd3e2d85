//! The TOML configuration: raw serde types (`deny_unknown_fields`, so a typo is an error
//! naming the key) converted into validated types with errors that name the key too.

use anyhow::{bail, Context, Result};
use fleetboot_boot::{MacAddr, Profile};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    server: RawServer,
    #[serde(default)]
    dhcp: RawDhcp,
    #[serde(default)]
    pxe: RawPxe,
    #[serde(default)]
    tftp: RawTftp,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    router_advertisement: RawRa,
    #[serde(default)]
    nbd: RawNbd,
    negotiate: Option<crate::negotiate::config::RawNegotiate>,
    files: Option<crate::negotiate::config::RawFiles>,
    fleet: Option<fleetboot_fleet::config::RawFleet>,
    #[serde(default)]
    client: Vec<RawClient>,
    #[serde(default)]
    profile: Vec<Profile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    address: Ipv4Addr,
    interface: Option<String>,
    root: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDhcp {
    mode: Option<String>,
    authoritative: Option<bool>,
    #[serde(default)]
    subnet: Vec<RawSubnet>,
    #[serde(default)]
    reservation: Vec<RawReservation>,
    offer_hold: Option<u64>,
    decline_hold: Option<u64>,
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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPxe {
    transport: Option<String>,
    bios: Option<String>,
    uefi_x64: Option<String>,
    uefi_ia32: Option<String>,
    arm64: Option<String>,
    uefi_http: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTftp {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
    max_blksize: Option<u16>,
    max_windowsize: Option<u16>,
    /// MAC prefixes of firmware that chokes on TFTP options: served plain RFC 1350.
    #[serde(default)]
    no_options_for: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRa {
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNbd {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
    overlay: Option<String>,
    #[serde(default)]
    overlay_per_image: std::collections::BTreeMap<String, String>,
    block_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    mac: MacAddr,
    group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpMode {
    Server,
    Proxy,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Tftp,
}

#[derive(Debug, Clone)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub range: (Ipv4Addr, Ipv4Addr),
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_time: u32,
}

#[derive(Debug, Clone)]
pub struct Reservation {
    pub mac: Option<MacAddr>,
    pub client_id: Option<Vec<u8>>,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, Default)]
pub struct FirmwareFiles {
    pub bios: Option<String>,
    pub uefi_x64: Option<String>,
    pub uefi_ia32: Option<String>,
    pub arm64: Option<String>,
    pub uefi_http: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub address: Ipv4Addr,
    pub interface: Option<String>,
    pub root: PathBuf,
    pub dhcp_mode: DhcpMode,
    pub authoritative: bool,
    pub subnets: Vec<Subnet>,
    pub reservations: Vec<Reservation>,
    pub offer_hold: u64,
    pub decline_hold: u64,
    pub transport: Transport,
    pub firmware: FirmwareFiles,
    pub tftp: Option<TftpConfig>,
    pub http: Option<SocketAddr>,
    pub router_advertisement: bool,
    pub nbd: NbdConfig,
    /// `[negotiate]`: `fleetboot negotiate` (PXE boot server with conflict clearing).
    pub negotiate: Option<crate::negotiate::config::NegotiateConfig>,
    /// `[files]`: `fleetboot files` (multicast TFTP file server).
    pub files: Option<crate::negotiate::config::FilesConfig>,
    /// `[fleet]`: the provisioning master (`fleetboot master`, or in `fleetboot serve`).
    pub fleet: Option<fleetboot_fleet::config::FleetConfig>,
    pub groups: Vec<(MacAddr, String)>,
    pub profiles: Vec<Profile>,
}

/// The `[nbd]` section: catalog images as NBD exports (`fleetboot serve` runs the service
/// when `enabled`; `fleetboot nbd` runs it regardless).
#[derive(Debug, Clone)]
pub struct NbdConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Overlay mode of per-client exports (`IMAGE@MAC`) of images not in `overlay_per_image`.
    pub overlay: fleetboot_nbd::OverlayMode,
    pub overlay_per_image: std::collections::HashMap<String, fleetboot_nbd::OverlayMode>,
    pub block_size: u32,
}

impl NbdConfig {
    /// The settings of the NBD server's exports, overlays under `data_dir/overlays`.
    pub fn exports(&self, data_dir: &Path) -> fleetboot_nbd::ExportsConfig {
        let mut c = fleetboot_nbd::ExportsConfig::new(data_dir);
        c.default_mode = self.overlay;
        c.modes = self.overlay_per_image.clone();
        c.block_size = self.block_size;
        c
    }
}

#[derive(Debug, Clone)]
pub struct TftpConfig {
    pub listen: SocketAddr,
    pub max_blksize: u16,
    pub max_windowsize: u16,
    pub no_options_for: Vec<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Config::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("config {}", path.display()))
    }

    /// Relative paths in the file are taken relative to `base` (the config's directory).
    pub fn parse(text: &str, base: &Path) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let dhcp_mode = match raw.dhcp.mode.as_deref().unwrap_or("server") {
            "server" => DhcpMode::Server,
            "proxy" => DhcpMode::Proxy,
            "off" => DhcpMode::Off,
            other => bail!("dhcp.mode: {other:?} is not one of \"server\", \"proxy\", \"off\""),
        };
        let mut subnets = Vec::new();
        for (i, s) in raw.dhcp.subnet.iter().enumerate() {
            subnets.push(subnet(s).with_context(|| format!("dhcp.subnet[{i}]"))?);
        }
        if dhcp_mode == DhcpMode::Server && subnets.is_empty() {
            bail!("dhcp.subnet: dhcp.mode is \"server\" but no subnet is configured (add [[dhcp.subnet]] or set dhcp.mode = \"proxy\" or \"off\")");
        }
        let mut reservations = Vec::new();
        for (i, r) in raw.dhcp.reservation.iter().enumerate() {
            let key = format!("dhcp.reservation[{i}]");
            if r.mac.is_none() && r.client_id.is_none() {
                bail!("{key}: needs mac or client_id");
            }
            let client_id = match &r.client_id {
                Some(s) => Some(parse_hex(s).with_context(|| format!("{key}.client_id"))?),
                None => None,
            };
            if !subnets.iter().any(|s| contains(s, r.ip)) {
                bail!("{key}.ip: {} is in no configured subnet", r.ip);
            }
            if let Some(dup) = reservations.iter().position(|x: &Reservation| x.ip == r.ip) {
                bail!("{key}.ip: {} is already reserved by dhcp.reservation[{dup}]", r.ip);
            }
            reservations.push(Reservation { mac: r.mac, client_id, ip: r.ip });
        }
        let transport = match raw.pxe.transport.as_deref().unwrap_or("http") {
            "http" => Transport::Http,
            "tftp" => Transport::Tftp,
            other => bail!("pxe.transport: {other:?} is not \"http\" or \"tftp\""),
        };
        let http = match raw.http.enabled.unwrap_or(true) {
            true => Some(raw.http.listen.unwrap_or_else(|| "0.0.0.0:8080".parse().unwrap())),
            false => None,
        };
        // Only an address service tells clients where their scripts are; a host running
        // just a negotiator or a file server has no use for pxe.transport.
        let hands_out_scripts = dhcp_mode != DhcpMode::Off;
        if hands_out_scripts && transport == Transport::Http && http.is_none() {
            bail!("pxe.transport: \"http\" needs the HTTP service (http.enabled = true)");
        }
        let tftp = match raw.tftp.enabled.unwrap_or(true) {
            true => {
                let max_blksize = raw.tftp.max_blksize.unwrap_or(1468);
                if !(8..=65464).contains(&max_blksize) {
                    bail!("tftp.max_blksize: {max_blksize} is outside 8..=65464 (RFC 2348)");
                }
                let max_windowsize = raw.tftp.max_windowsize.unwrap_or(64);
                if max_windowsize == 0 {
                    bail!("tftp.max_windowsize: must be at least 1");
                }
                Some(TftpConfig {
                    listen: raw.tftp.listen.unwrap_or_else(|| "0.0.0.0:69".parse().unwrap()),
                    max_blksize,
                    max_windowsize,
                    no_options_for: raw.tftp.no_options_for.iter().map(|m| m.to_ascii_lowercase()).collect(),
                })
            }
            false => None,
        };
        if hands_out_scripts && transport == Transport::Tftp && tftp.is_none() {
            bail!("pxe.transport: \"tftp\" needs the TFTP service (tftp.enabled = true)");
        }
        let nbd = nbd(&raw.nbd)?;
        let mut names = std::collections::HashSet::new();
        for (i, p) in raw.profile.iter().enumerate() {
            p.validate().map_err(|e| anyhow::anyhow!("profile[{i}] ({}).{}: {}", p.name, e.field, e.problem))?;
            match &p.boot {
                fleetboot_boot::BootPlan::Linux { disk: Some(_), .. } if !nbd.enabled => {
                    bail!("profile[{i}] ({}).boot.disk: needs the NBD service (nbd.enabled = true)", p.name)
                }
                fleetboot_boot::BootPlan::Sanboot { .. } if http.is_none() => {
                    bail!("profile[{i}] ({}).boot.kind: \"sanboot\" needs the HTTP service (http.enabled = true)", p.name)
                }
                _ => {}
            }
            if !names.insert(p.name.clone()) {
                bail!("profile[{i}].name: {:?} is defined twice", p.name);
            }
        }
        let root = abs(raw.server.root.unwrap_or_else(|| PathBuf::from("/srv/fleetboot")));
        Ok(Config {
            data_dir: abs(raw.data_dir.unwrap_or_else(|| PathBuf::from("/var/lib/fleetboot"))),
            address: raw.server.address,
            interface: raw.server.interface,
            root,
            dhcp_mode,
            authoritative: raw.dhcp.authoritative.unwrap_or(true),
            subnets,
            reservations,
            offer_hold: raw.dhcp.offer_hold.unwrap_or(30),
            decline_hold: raw.dhcp.decline_hold.unwrap_or(600),
            transport,
            firmware: FirmwareFiles {
                bios: raw.pxe.bios,
                uefi_x64: raw.pxe.uefi_x64,
                uefi_ia32: raw.pxe.uefi_ia32,
                arm64: raw.pxe.arm64,
                uefi_http: raw.pxe.uefi_http,
            },
            tftp,
            http,
            router_advertisement: raw.router_advertisement.enabled.unwrap_or(false),
            nbd,
            negotiate: raw.negotiate.map(|r| r.validate()).transpose()?,
            files: raw.files.map(|r| r.validate()).transpose()?,
            fleet: raw.fleet.map(|r| r.validate()).transpose()?,
            groups: raw.client.into_iter().filter_map(|c| Some((c.mac, c.group?))).collect(),
            profiles: raw.profile,
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("fleetboot.db")
    }
}

fn nbd(raw: &RawNbd) -> Result<NbdConfig> {
    let mode = |key: &str, v: &str| v.parse::<fleetboot_nbd::OverlayMode>().map_err(|e| anyhow::anyhow!("{key}: {e}"));
    let overlay = mode("nbd.overlay", raw.overlay.as_deref().unwrap_or("standard"))?;
    let mut overlay_per_image = std::collections::HashMap::new();
    for (name, v) in &raw.overlay_per_image {
        let key = format!("nbd.overlay_per_image.{name:?}");
        if name.contains(':') {
            bail!("{key}: the mode applies to every version of an image; use the name without \":VERSION\"");
        }
        fleetboot_images::validate_name(name).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        overlay_per_image.insert(name.clone(), mode(&key, v)?);
    }
    let block_size = raw.block_size.unwrap_or(fleetboot_nbd::overlay::DEFAULT_BLOCK_SIZE);
    if !block_size.is_power_of_two() || !(512..=4 << 20).contains(&block_size) {
        bail!("nbd.block_size: {block_size} is not a power of two from 512 to 4194304 (4 MiB)");
    }
    Ok(NbdConfig {
        enabled: raw.enabled.unwrap_or(false),
        listen: raw.listen.unwrap_or_else(|| "0.0.0.0:10809".parse().unwrap()),
        overlay,
        overlay_per_image,
        block_size,
    })
}

fn subnet(s: &RawSubnet) -> Result<Subnet> {
    let (net, len) = s.network.split_once('/').context("network: want ADDRESS/PREFIX, e.g. 10.77.0.0/24")?;
    let network: Ipv4Addr = net.parse().with_context(|| format!("network: {net:?} is not an IPv4 address"))?;
    let prefix_len: u8 = len.parse().ok().filter(|l| *l <= 32).with_context(|| format!("network: bad prefix length {len:?}"))?;
    let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len) };
    if u32::from(network) & !mask != 0 {
        bail!("network: {} has host bits set for /{prefix_len}", network);
    }
    let sub = Subnet {
        network,
        prefix_len,
        range: (s.range[0], s.range[1]),
        router: s.router,
        dns: s.dns.clone(),
        domain: s.domain.clone(),
        lease_time: s.lease_time.unwrap_or(3600),
    };
    for (i, ip) in s.range.iter().enumerate() {
        if !contains(&sub, *ip) {
            bail!("range[{i}]: {ip} is outside {}/{prefix_len}", network);
        }
    }
    if u32::from(s.range[0]) > u32::from(s.range[1]) {
        bail!("range: {} comes after {}", s.range[0], s.range[1]);
    }
    if sub.lease_time < 60 {
        bail!("lease_time: {} s is too short (at least 60)", sub.lease_time);
    }
    Ok(sub)
}

pub fn contains(s: &Subnet, ip: Ipv4Addr) -> bool {
    let mask = if s.prefix_len == 0 { 0 } else { u32::MAX << (32 - s.prefix_len) };
    u32::from(ip) & mask == u32::from(s.network)
}

fn parse_hex(s: &str) -> Result<Vec<u8>> {
    s.split([':', '-'])
        .map(|p| u8::from_str_radix(p, 16).map_err(|_| anyhow::anyhow!("{s:?} is not hex octets like 01:52:54:00:77:00:10")))
        .collect()
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
        format!("{:#}", Config::parse(text, Path::new("/etc/fleetboot")).unwrap_err())
    }

    #[test]
    fn every_shipped_example_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3, "examples/ holds {seen} configs");
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fleetboot.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.profiles.len(), 2);
        assert_eq!(c.reservations.len(), 1);
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(MINIMAL, Path::new("/etc/fleetboot")).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/fleetboot/state"));
        assert_eq!(c.dhcp_mode, DhcpMode::Server);
        assert_eq!(c.subnets[0].lease_time, 3600);
        assert_eq!(c.http, Some("0.0.0.0:8080".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&format!("{MINIMAL}\n[tftp]\nblksize = 9")).contains("unknown field `blksize`"));
        assert!(err(&MINIMAL.replace("10.77.0.199", "10.78.0.199")).contains("dhcp.subnet[0]: range[1]"));
        assert!(err(&MINIMAL.replace("10.77.0.0/24", "10.77.0.1/24")).contains("host bits"));
        assert!(err(&format!("{MINIMAL}\n[dhcp]\nmode = \"relay\"")).contains("dhcp.mode"));
        let bad_profile = format!(
            "{MINIMAL}\n[[profile]]\nname = \"p\"\nmatch = {{ arch = [\"sparc\"] }}\nboot = {{ kind = \"boot_file\", path = \"x\" }}"
        );
        assert!(err(&bad_profile).contains("profile[0] (p).match.arch[0]"));
        let bad_reservation = format!("{MINIMAL}\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.9.0.1\"");
        assert!(err(&bad_reservation).contains("dhcp.reservation[0].ip"));
    }

    #[test]
    fn nbd_defaults_and_overrides() {
        use fleetboot_nbd::OverlayMode;
        let c = Config::parse(MINIMAL, Path::new("/etc/fleetboot")).unwrap();
        assert!(!c.nbd.enabled);
        assert_eq!(c.nbd.listen, "0.0.0.0:10809".parse().unwrap());
        assert_eq!(c.nbd.overlay, OverlayMode::Standard);
        assert_eq!(c.nbd.block_size, 64 << 10);
        let text = format!(
            "{MINIMAL}\n[nbd]\nenabled = true\nlisten = \"10.77.0.1:10900\"\noverlay = \"private\"\nblock_size = 4096\n\
             overlay_per_image = {{ kiosk = \"standard\" }}\n"
        );
        let c = Config::parse(&text, Path::new("/etc/fleetboot")).unwrap();
        assert!(c.nbd.enabled);
        assert_eq!(c.nbd.listen.port(), 10900);
        let e = c.nbd.exports(&c.data_dir);
        assert_eq!(e.default_mode, OverlayMode::Private);
        assert_eq!(e.modes.get("kiosk"), Some(&OverlayMode::Standard));
        assert_eq!(e.block_size, 4096);
        assert_eq!(e.data_dir, PathBuf::from("/etc/fleetboot/state"));
    }

    #[test]
    fn nbd_errors_name_the_key() {
        let nbd = |body: &str| err(&format!("{MINIMAL}\n[nbd]\n{body}\n"));
        assert!(nbd("overlay = \"persistent\"").contains("nbd.overlay: unknown overlay mode"));
        assert!(nbd("overlay_per_image = { deb = \"keep\" }").contains("nbd.overlay_per_image.\"deb\""));
        assert!(nbd("overlay_per_image = { \"deb:2\" = \"private\" }").contains("nbd.overlay_per_image.\"deb:2\""));
        assert!(nbd("overlay_per_image = { \"-x\" = \"private\" }").contains("nbd.overlay_per_image.\"-x\""));
        assert!(nbd("block_size = 1000").contains("nbd.block_size"));
        assert!(nbd("block_size = 8388608").contains("nbd.block_size"));
        assert!(nbd("listen = \"nowhere\"").contains("listen"));
        assert!(nbd("size = 1").contains("unknown field `size`"));
        // A profile with a disk needs the NBD service; sanboot needs HTTP.
        let disk = "[[profile]]\nname = \"d\"\nboot = { kind = \"linux\", kernel = \"k\", disk = { image = \"deb\" } }";
        assert!(err(&format!("{MINIMAL}\n{disk}")).contains("profile[0] (d).boot.disk: needs the NBD service"));
        assert!(Config::parse(&format!("{MINIMAL}\n[nbd]\nenabled = true\n{disk}"), Path::new("/")).is_ok());
        let bad = disk.replace("\"deb\"", "\"deb:0\"");
        assert!(err(&format!("{MINIMAL}\n[nbd]\nenabled = true\n{bad}")).contains("profile[0] (d).boot.disk.image"));
        let san = "[[profile]]\nname = \"w\"\nboot = { kind = \"sanboot\", image = \"win\" }";
        assert!(err(&format!("{MINIMAL}\n[http]\nenabled = false\n[pxe]\ntransport = \"tftp\"\n{san}"))
            .contains("profile[0] (w).boot.kind: \"sanboot\" needs the HTTP service"));
    }
}

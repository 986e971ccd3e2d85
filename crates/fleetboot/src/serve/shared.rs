//! State every service of a running server shares: config, store, profiles, the clients
//! seen so far, where each service listens, the boot decision that DHCP, TFTP and
//! HTTP all make the same way, and who may read a client's own data.
//!
//! # A client's own data
//!
//! A client's script (with its kernel command line) and its trace are served only to that
//! client ([`Shared::authorize_client`]): to the address that holds its lease in the
//! store, or its reservation in `[dhcp]`, or to whoever presents the capability the boot
//! plan handed it ([`Shared::client_capability`], scope [`HTTP_SCOPE`]). Capabilities are
//! handed out when fleetboot gives out no addresses (ProxyDHCP), where an address proves
//! nothing. A refused request never ties the caller's address to the client's trace.

use crate::config::{Config, DhcpMode, Transport};
use fleetboot_auth::{CapabilityError, CapabilityKey};
use fleetboot_boot::ipxe::{render, FileBase, RenderContext};
use fleetboot_boot::{select, Arch, BootPlan, ClientIdentity, ConfigRequest, MacAddr, Profile};
use super::bounded::BoundedMap;
use fleetboot_store::{Store, TraceEvent};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The capability scope of a client's data served by the boot network's HTTP and TFTP
/// services (scripts, trace). Another service (NBD exports) uses its own scope.
pub const HTTP_SCOPE: &str = "http";

/// The capability scope of a client's own disk (its NBD overlay export): handed out inside
/// the client's script, so seeing a ProxyDHCP broadcast (whose `http` capability is
/// public to the segment) does not open the disk by itself.
pub const NBD_SCOPE: &str = "nbd";

/// A service whose listening address others need: the boot decision names the HTTP and
/// NBD ports it got, [`Server::local_addrs`](super::Server::local_addrs) reports them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Dhcp,
    Pxe,
    Tftp,
    Http,
    Nbd,
    /// The operators' listener: the JSON API and `/metrics`.
    Admin,
}

pub struct Shared {
    pub config: Config,
    pub store: Store,
    /// Where lease changes are made durable before the replies that depend on them leave.
    pub lease_store: Arc<dyn super::LeaseStore>,
    /// Replies waiting for their lease commit: a stopping server lets them finish.
    pub replies: tokio_util::task::TaskTracker,
    listening: tokio::sync::watch::Sender<HashMap<Service, SocketAddr>>,
    pub profiles: RwLock<Vec<Profile>>,
    /// `[[client]]` groups: from the config, replaced when it is reloaded.
    groups: RwLock<HashMap<MacAddr, String>>,
    /// The identity each client gave in its last DHCP request: scripts are rendered from it.
    /// At most `server.max_clients`, like `ip_to_mac`: anyone can make up MACs.
    clients: Mutex<BoundedMap<MacAddr, ClientIdentity>>,
    /// Which client holds an address, so TFTP and HTTP events land in the right trace.
    ip_to_mac: Mutex<BoundedMap<Ipv4Addr, MacAddr>>,
    /// Makes and checks client capabilities (`data_dir/capability.key` once the server has
    /// loaded it; a key of this process only until then).
    capability_key: CapabilityKey,
    refusals_logged: LogLimit,
    /// What the operators' dashboard shows: every client's latest step.
    pub board: super::dashboard::Board,
    /// With a shared store: the DHCP servers on it and the leases they decide together
    /// (also [`Shared::lease_store`]).
    pub cluster: std::sync::OnceLock<Arc<super::cluster::SharedLeases>>,
}

static CLIENTS_FULL: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::LOG_EVERY);

/// Inserts into one of the bounded client maps, with its gauge and a log line when full.
fn remember_in<K: Eq + std::hash::Hash + Clone, V>(map: &Mutex<BoundedMap<K, V>>, which: &'static str, key: K, value: V) {
    let mut m = lock(map);
    if m.insert(key, value) {
        metrics::counter!("fleetboot_clients_forgotten_total", "map" => which).increment(1);
        if let Some(skipped) = CLIENTS_FULL.ready() {
            tracing::warn!(map = which, max_clients = m.capacity(), skipped,
                "more clients than server.max_clients: the one heard from longest ago is forgotten");
        }
    }
    metrics::gauge!("fleetboot_clients_remembered", "map" => which).set(m.len() as f64);
}

/// Why a client's data was not served to a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{peer} holds no lease or reservation of {mac}")]
    NotHolder { mac: MacAddr, peer: IpAddr },
    #[error("capability for {mac}: {error}")]
    Capability { mac: MacAddr, error: CapabilityError },
    #[error("cannot tell who holds the lease: {0}")]
    Store(String),
}

impl Refusal {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NotHolder { .. } => "not_holder",
            Refusal::Capability { error, .. } => error.label(),
            Refusal::Store(_) => "store",
        }
    }
}

/// How a caller proved it is the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Lease,
    Reservation,
    Capability,
}

/// A request for a client's script: `boot/<mac>.ipxe`, or `boot/<capability>/<mac>.ipxe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRequest {
    pub mac: MacAddr,
    pub capability: Option<String>,
}

impl ScriptRequest {
    /// Parses a script path (TFTP file name, or HTTP path without the leading `/`).
    pub fn parse(path: &str) -> Option<ScriptRequest> {
        let rest = path.strip_prefix("boot/")?;
        let (capability, file) = match rest.split_once('/') {
            Some((cap, file)) if !cap.is_empty() && !file.contains('/') => (Some(cap.to_string()), file),
            Some(_) => return None,
            None => (None, rest),
        };
        let mac = file.strip_suffix(".ipxe")?.parse().ok()?;
        Some(ScriptRequest { mac, capability })
    }
}

/// At most one log line per period; counts what it held back.
pub struct LogLimit {
    period: Duration,
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl LogLimit {
    pub fn new(period: Duration) -> LogLimit {
        LogLimit { period, last: Mutex::new(None), held_back: AtomicU64::new(0) }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = lock(&self.last);
        if last.is_some_and(|t| now.duration_since(t) < self.period) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(config: Config, store: Store, lease_store: Arc<dyn super::LeaseStore>, profiles: Vec<Profile>) -> Shared {
        let config_dashboard = (config.dashboard.max_clients, Duration::from_secs(config.dashboard.stuck_after));
        let groups = RwLock::new(config.groups.iter().cloned().collect());
        Shared {
            store,
            lease_store,
            replies: tokio_util::task::TaskTracker::new(),
            listening: tokio::sync::watch::Sender::new(HashMap::new()),
            profiles: RwLock::new(profiles),
            groups,
            clients: Mutex::new(BoundedMap::new(config.max_clients)),
            ip_to_mac: Mutex::new(BoundedMap::new(config.max_clients)),
            capability_key: CapabilityKey::ephemeral().expect("the OS random source"),
            refusals_logged: LogLimit::new(Duration::from_secs(10)),
            board: super::dashboard::Board::new(config_dashboard.0, config_dashboard.1),
            cluster: std::sync::OnceLock::new(),
            config,
        }
    }

    /// Makes and checks client capabilities with `key` (the server's persistent one).
    pub fn with_capability_key(mut self, key: CapabilityKey) -> Shared {
        self.capability_key = key;
        self
    }

    /// A capability for `mac`'s own data, valid for `http.capability_lifetime`. The expiry
    /// is rounded up to a whole minute, so the same client gets the same URL for a while.
    pub fn client_capability(&self, mac: MacAddr) -> String {
        let expires = (now_ms() / 1000 + self.config.capability_lifetime).div_ceil(60) * 60;
        self.capability_key.issue(HTTP_SCOPE, &mac.0, expires)
    }

    /// A capability for `mac`'s own disk (its NBD overlay exports), valid for
    /// `nbd.capability_lifetime`, rounded up to a whole minute like
    /// [`Shared::client_capability`].
    pub fn disk_capability(&self, mac: MacAddr) -> String {
        let expires = (now_ms() / 1000 + self.config.nbd.capability_lifetime.as_secs()).div_ceil(60) * 60;
        self.capability_key.issue(NBD_SCOPE, &mac.0, expires)
    }

    /// [`Shared::authorize_client`] for `mac`'s own disk: the same lease and reservation
    /// rule, but a capability must be one for its disk (scope [`NBD_SCOPE`]); the
    /// capability that fetches its script opens no disk.
    pub fn authorize_disk(&self, mac: MacAddr, peer: IpAddr, capability: Option<&str>) -> Result<Grant, Refusal> {
        self.authorize_in(NBD_SCOPE, mac, peer, capability)
    }

    /// Whether `peer` may read `mac`'s own data: it holds the client's lease (bound, not
    /// expired) or reservation, or presents a capability this server issued for it.
    pub fn authorize_client(&self, mac: MacAddr, peer: IpAddr, capability: Option<&str>) -> Result<Grant, Refusal> {
        self.authorize_in(HTTP_SCOPE, mac, peer, capability)
    }

    fn authorize_in(&self, scope: &str, mac: MacAddr, peer: IpAddr, capability: Option<&str>) -> Result<Grant, Refusal> {
        if let Some(cap) = capability {
            return match self.capability_key.verify(scope, &mac.0, cap, now_ms() / 1000) {
                Ok(_) => Ok(Grant::Capability),
                Err(error) => Err(Refusal::Capability { mac, error }),
            };
        }
        let ip = match peer {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        let Some(ip) = ip else { return Err(Refusal::NotHolder { mac, peer }) };
        if self.config.dhcp.reservations.iter().any(|r| r.mac == Some(mac) && r.ip == ip) {
            return Ok(Grant::Reservation);
        }
        match self.store.lease(ip) {
            Ok(Some(l)) if l.state == "bound" && l.expires_at > now_ms() / 1000 && l.mac.parse::<MacAddr>().ok() == Some(mac) => {
                Ok(Grant::Lease)
            }
            Ok(_) => Err(Refusal::NotHolder { mac, peer }),
            Err(e) => Err(Refusal::Store(e.to_string())),
        }
    }

    /// Counts a refused request for a client's data (`what`: script, trace...) and logs
    /// it, at most once per 10 s. Nothing lands in the client's trace: a caller cannot
    /// fill another client's trace by asking.
    pub fn refused(&self, service: &'static str, what: &'static str, refusal: &Refusal) {
        metrics::counter!("fleetboot_client_data_refused_total", "service" => service, "what" => what, "reason" => refusal.label())
            .increment(1);
        if let Some(held_back) = self.refusals_logged.allow() {
            tracing::warn!(service, what, %refusal, held_back, "a client's data refused");
        }
    }

    /// A service says where it listens, once its socket is bound.
    pub fn listening_on(&self, service: Service, addr: SocketAddr) {
        tracing::debug!(?service, %addr, "listening");
        self.listening.send_modify(|m| {
            m.insert(service, addr);
        });
    }

    /// Where the services listen so far, and word of each change.
    pub fn listening(&self) -> tokio::sync::watch::Receiver<HashMap<Service, SocketAddr>> {
        self.listening.subscribe()
    }

    /// The port `service` listens on: the bound one, else the configured one.
    fn port_of(&self, service: Service, configured: u16) -> u16 {
        self.listening.borrow().get(&service).map_or(configured, |a| a.port())
    }

    /// Records one event in a client's boot trace (queued, or counted as a repeat or as
    /// overflow; never blocks the caller, never touches a lease commit).
    pub fn trace(&self, mac: MacAddr, kind: &str, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::debug!(%mac, kind, %detail, "trace");
        self.board.observe(mac, self.group_of(mac).as_deref(), kind, &detail, now_ms());
        self.store.record_trace(TraceEvent { ts_ms: now_ms(), mac: mac.to_string(), kind: kind.to_string(), detail });
    }

    pub fn bind_ip(&self, ip: Ipv4Addr, mac: MacAddr) {
        remember_in(&self.ip_to_mac, "ip_to_mac", ip, mac);
    }

    pub fn unbind_ip(&self, ip: Ipv4Addr) {
        lock(&self.ip_to_mac).remove(&ip);
    }

    pub fn mac_of(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        lock(&self.ip_to_mac).get(&ip).copied()
    }

    /// The group the operator assigned to `mac` (`[[client]]`), as of the last reload.
    pub fn group_of(&self, mac: MacAddr) -> Option<String> {
        self.groups.read().unwrap_or_else(|e| e.into_inner()).get(&mac).cloned()
    }

    /// The client's identity with its operator-assigned group filled in.
    pub fn with_group(&self, mut c: ClientIdentity) -> ClientIdentity {
        c.group = self.group_of(c.mac);
        c
    }

    /// A reloaded config's profiles and groups, for every request from now on.
    pub fn replace_profiles_and_groups(&self, profiles: Vec<Profile>, groups: &[(MacAddr, String)]) {
        *self.profiles.write().unwrap_or_else(|e| e.into_inner()) = profiles;
        *self.groups.write().unwrap_or_else(|e| e.into_inner()) = groups.iter().cloned().collect();
    }

    pub fn remember(&self, c: &ClientIdentity) {
        remember_in(&self.clients, "clients", c.mac, c.clone());
    }

    /// What we know of a client: from its DHCP request, or just its MAC.
    pub fn identity(&self, mac: MacAddr) -> ClientIdentity {
        // The group is looked up now, not when the client asked for its lease: a reload
        // that moves it to another group changes its next script.
        let known = lock(&self.clients).get(&mac).cloned();
        self.with_group(known.unwrap_or_else(|| ClientIdentity { mac, is_ipxe: true, ..Default::default() }))
    }

    pub fn plan_for(&self, c: &ClientIdentity) -> Option<(String, BootPlan)> {
        let profiles = self.profiles.read().unwrap_or_else(|e| e.into_inner());
        select(&profiles, c).map(|p| (p.name.clone(), p.boot.clone()))
    }

    fn http_base(&self) -> Option<String> {
        let l = self.config.http?;
        Some(format!("http://{}:{}", self.config.address, self.port_of(Service::Http, l.port())))
    }

    /// Where iPXE fetches the files of a plan from.
    pub fn file_base(&self) -> FileBase {
        match (self.config.pxe.transport, self.http_base()) {
            (Transport::Http, Some(base)) => FileBase { url: format!("{base}/files") },
            _ => FileBase { url: format!("tftp://{}", self.config.address) },
        }
    }

    /// `ADDR:PORT` clients reach the NBD service at, when it runs: the listen address, or
    /// `server.address` when listening on every address.
    pub fn nbd_addr(&self) -> Option<String> {
        let nbd = &self.config.nbd;
        nbd.enabled.then(|| {
            let ip = if nbd.listen.ip().is_unspecified() { self.config.address.into() } else { nbd.listen.ip() };
            SocketAddr::new(ip, self.port_of(Service::Nbd, nbd.listen.port())).to_string()
        })
    }

    /// What a script is rendered with: file locations and the disk services.
    pub fn render_context(&self) -> RenderContext {
        RenderContext {
            files: self.file_base(),
            http_url: self.http_base(),
            nbd_addr: self.nbd_addr(),
            tftp_url: self.config.tftp.as_ref().map(|_| format!("tftp://{}", self.config.address)),
            disk_capability: None,
        }
    }

    /// May `peer` have the boot loader configuration `req` (GRUB's `grub/<mac>.cfg`,
    /// PXELINUX's `pxelinux.cfg/01-<mac>`)? A per-client configuration carries the plan's
    /// kernel command line, so it goes to that client only, like its iPXE script, and only
    /// then is `peer` tied to the MAC's trace. The generic `grub/grub.cfg` names no client.
    /// In ProxyDHCP mode fleetboot knows no leases and GRUB and PXELINUX choose their own
    /// file names, so no capability can ride along: the configuration is served, but the
    /// caller is not tied to the trace (docs/security.md says so).
    pub fn authorize_loader_config(&self, req: &ConfigRequest, peer: IpAddr, service: &'static str) -> Result<(), Refusal> {
        let Some(mac) = req.mac() else { return Ok(()) };
        match self.authorize_client(mac, peer, None) {
            Ok(_) => {
                if let IpAddr::V4(ip) = peer {
                    self.bind_ip(ip, mac);
                }
                Ok(())
            }
            Err(_) if self.config.dhcp.mode == DhcpMode::Proxy => Ok(()),
            Err(refusal) => {
                self.refused(service, "loader-config", &refusal);
                Err(refusal)
            }
        }
    }

    /// Where a client finds its script, relative to the HTTP base or the TFTP root:
    /// `boot/<mac>.ipxe` where fleetboot hands out the addresses (the lease proves who
    /// asks), `boot/<capability>/<mac>.ipxe` in ProxyDHCP mode.
    pub fn script_path(&self, mac: MacAddr) -> String {
        match self.config.dhcp.mode {
            DhcpMode::Proxy => format!("boot/{}/{}.ipxe", self.client_capability(mac), mac.hyphenated()),
            _ => format!("boot/{}.ipxe", mac.hyphenated()),
        }
    }

    /// The iPXE script for a client, rendered from its profile. Only that client (or an
    /// operator) is ever handed it, so in ProxyDHCP mode, where its address proves nothing
    /// to the NBD service, its disk URL carries a capability for its disk
    /// ([`Shared::disk_capability`]).
    pub fn script_for(&self, mac: MacAddr) -> String {
        let c = self.identity(mac);
        let plan = self.plan_for(&c);
        let mut ctx = self.render_context();
        if self.config.dhcp.mode == DhcpMode::Proxy {
            ctx.disk_capability = Some(self.disk_capability(mac));
        }
        render(plan.as_ref().map(|(_, p)| p), &c, &ctx)
    }

    /// The configuration a boot loader asks for by this file name (GRUB's `grub/grub.cfg`
    /// and `grub/<mac>.cfg`, PXELINUX's `pxelinux.cfg/01-<mac>`), rendered from the
    /// client's profile; `None` for any other name, and when the served tree holds a real
    /// file by that name (an operator's hand-written menu wins).
    pub fn loader_config(&self, path: &str) -> Option<(ConfigRequest, String)> {
        let req = ConfigRequest::parse(path)?;
        if fleetboot_tftp::path::resolve(&self.config.root, path).is_ok() {
            return None;
        }
        let c = req.mac().map(|m| self.identity(m)).unwrap_or_default();
        let plan = self.plan_for(&c);
        Some((req, req.render(plan.as_ref().map(|(_, p)| p), &c, &self.render_context())))
    }

    /// The boot file a client's firmware should load, or `None` when no profile matches
    /// (the client then gets an address but no boot information, and moves on).
    pub fn boot_file_for(&self, c: &ClientIdentity) -> Option<String> {
        let (_, plan) = self.plan_for(c)?;
        if let BootPlan::Linux { loader: Some(loader), .. } = &plan {
            // The plan's own first boot file (shim, GRUB, PXELINUX), which then asks for
            // its configuration; an iPXE ROM runs it too. A UEFI HTTP Boot client needs it
            // as a URL.
            if fleetboot_dhcp::identify::is_http_client(c) {
                return Some(if loader.contains("://") { loader.clone() } else { format!("{}/files/{loader}", self.http_base()?) });
            }
            return Some(loader.clone());
        }
        if c.is_ipxe {
            let script = self.script_path(c.mac);
            return Some(match (self.config.pxe.transport, self.http_base()) {
                (Transport::Http, Some(base)) => format!("{base}/{script}"),
                _ => script,
            });
        }
        if let BootPlan::BootFile { path } = &plan {
            return Some(path.clone());
        }
        // Firmware that is not iPXE yet is chainloaded into iPXE, which asks again.
        let fw = &self.config.pxe.firmware;
        match c.arch.unwrap_or(Arch::Bios) {
            Arch::Bios => fw.bios.clone(),
            Arch::UefiX64 => fw.uefi_x64.clone(),
            Arch::UefiIa32 => fw.uefi_ia32.clone(),
            Arch::Arm64 => fw.arm64.clone(),
            Arch::UefiHttpX64 | Arch::UefiHttpArm64 => {
                let base = self.http_base()?;
                fw.uefi_http.as_ref().map(|f| format!("{base}/files/{f}"))
            }
            Arch::Other(_) => None,
        }
    }
}

impl fleetboot_dhcp::BootAdvisor for Shared {
    fn boot_for(&self, client: &ClientIdentity) -> Option<fleetboot_dhcp::BootOffer> {
        let c = self.with_group(client.clone());
        self.remember(&c);
        let file = self.boot_file_for(&c)?;
        Some(fleetboot_dhcp::BootOffer { file, next_server: self.config.address })
    }

    /// A boot file the `[negotiate]` section lists is multicast: the client is sent to
    /// boot server discovery for item `0x8000 + i`, answered by the negotiator on 4011.
    fn discovery_type(&self, _client: &ClientIdentity, offer: &fleetboot_dhcp::BootOffer) -> Option<u16> {
        let n = self.config.negotiate.as_ref()?;
        let i = n.boot_files.iter().position(|f| *f == offer.file)?;
        crate::negotiate::boot::BOOT_TYPE_BASE.checked_add(u16::try_from(i).ok()?)
    }
}

//! State every service of a running server shares: config, store, profiles, the clients
//! seen so far, where each service listens, and the boot decision that DHCP, TFTP and
//! HTTP all make the same way.

use crate::config::{Config, Transport};
use fleetboot_boot::ipxe::{render, FileBase, RenderContext};
use fleetboot_boot::{select, Arch, BootPlan, ClientIdentity, ConfigRequest, MacAddr, Profile};
use super::bounded::BoundedMap;
use fleetboot_store::{Store, TraceEvent};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// A service whose listening address others need: the boot decision names the HTTP and
/// NBD ports it got, [`Server::local_addrs`](super::Server::local_addrs) reports them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Dhcp,
    Pxe,
    Tftp,
    Http,
    Nbd,
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
    /// The identity each client gave in its last DHCP request: scripts are rendered from it.
    /// At most `server.max_clients`, like `ip_to_mac`: anyone can make up MACs.
    clients: Mutex<BoundedMap<MacAddr, ClientIdentity>>,
    /// Which client holds an address, so TFTP and HTTP events land in the right trace.
    ip_to_mac: Mutex<BoundedMap<Ipv4Addr, MacAddr>>,
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

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(config: Config, store: Store, lease_store: Arc<dyn super::LeaseStore>, profiles: Vec<Profile>) -> Shared {
        Shared {
            store,
            lease_store,
            replies: tokio_util::task::TaskTracker::new(),
            listening: tokio::sync::watch::Sender::new(HashMap::new()),
            profiles: RwLock::new(profiles),
            clients: Mutex::new(BoundedMap::new(config.max_clients)),
            ip_to_mac: Mutex::new(BoundedMap::new(config.max_clients)),
            config,
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

    /// The client's identity with its operator-assigned group filled in.
    pub fn with_group(&self, mut c: ClientIdentity) -> ClientIdentity {
        c.group = self.config.groups.iter().find(|(m, _)| *m == c.mac).map(|(_, g)| g.clone());
        c
    }

    pub fn remember(&self, c: &ClientIdentity) {
        remember_in(&self.clients, "clients", c.mac, c.clone());
    }

    /// What we know of a client: from its DHCP request, or just its MAC.
    pub fn identity(&self, mac: MacAddr) -> ClientIdentity {
        lock(&self.clients)
            .get(&mac)
            .cloned()
            .unwrap_or_else(|| self.with_group(ClientIdentity { mac, is_ipxe: true, ..Default::default() }))
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
        }
    }

    /// The iPXE script for a client, rendered from its profile.
    pub fn script_for(&self, mac: MacAddr) -> String {
        let c = self.identity(mac);
        let plan = self.plan_for(&c);
        render(plan.as_ref().map(|(_, p)| p), &c, &self.render_context())
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
            let script = format!("boot/{}.ipxe", c.mac.hyphenated());
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

//! [`AddrPool`]: hands out [`OwnedAddr`] leases on one interface, from a static range or
//! from DHCP, and keeps each one for as long as it is held.
//!
//! One task per lease does everything for it: the DHCP exchange (the project's sans-I/O
//! [`DhcpClient`], fed by the pool's one shared socket on port 68, replies routed by
//! transaction id), the ARP probe, the netlink install with the lease's lifetime, the
//! renewals (each extends the kernel's lifetime), and at the end the RELEASE and the
//! removal. A static lease is the same without DHCP: the pool gives it a lifetime of its
//! own ([`Source::Static::lifetime`]) and refreshes it every third of that while held, so a
//! killed process's static addresses also vanish by themselves.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fleetboot_boot::MacAddr;
use fleetboot_dhcp::codec::{DhcpMessage, BOOTREPLY};
use fleetboot_dhcp::{Binding, ClientConfig, ClientError, ClientEvent, ClientTransmit, DhcpClient};
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::arp::{ArpWatch, DadConfig};
use crate::lease::{LeaseShared, OwnedAddr, Origin};
use crate::netlink::{AddressTable, InstalledAddr, Lifetime, Netlink};
use crate::sys;

/// What the client hardware address of each DHCP lease is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chaddr {
    /// A locally administered MAC of its own per lease (`02:..`), client id `01:MAC`: the
    /// server sees distinct machines. Replies must then be broadcast (the interface drops
    /// frames to a MAC it does not have), so the broadcast flag is set.
    PerAddress,
    /// The interface's MAC for every lease, told apart by client id only (RFC 4361 form:
    /// `ff`, an IAID, a DUID-LL of the interface's MAC). For servers that refuse unknown
    /// MACs, or switches that limit MACs per port.
    Interface,
}

/// How a DHCP pool's clients behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSource {
    pub chaddr: Chaddr,
    /// First retransmission timeout (RFC 2131: doubling up to `max_timeout`).
    pub initial_timeout: Duration,
    pub max_timeout: Duration,
    /// DISCOVERs without an OFFER before a lease fails ([`AddrError::Dhcp`]).
    pub discover_attempts: u32,
    /// REQUESTs without an answer before a lease starts over.
    pub request_attempts: u32,
    /// NAKs or unanswered REQUEST rounds before a lease fails.
    pub max_restarts: u32,
    /// Addresses declined (found in use) before a lease fails ([`AddrError::Conflicts`]).
    pub max_declines: u32,
}

impl Default for DhcpSource {
    fn default() -> DhcpSource {
        DhcpSource {
            chaddr: Chaddr::PerAddress,
            initial_timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(8),
            discover_attempts: 5,
            request_attempts: 4,
            max_restarts: 3,
            max_declines: 3,
        }
    }
}

/// Where addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `first..=last`, installed with `prefix_len`, each held with a kernel lifetime of
    /// `lifetime` refreshed while in use.
    Static {
        first: Ipv4Addr,
        last: Ipv4Addr,
        prefix_len: u8,
        lifetime: Duration,
    },
    /// Leased from whichever DHCP server answers on the interface.
    Dhcp(DhcpSource),
}

/// A pool's configuration; see [`PoolConfig::dhcp`] and [`PoolConfig::static_range`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub interface: String,
    pub source: Source,
    /// Duplicate address detection before use; `None` skips it.
    pub dad: Option<DadConfig>,
    /// Addresses held at once; the next [`AddrPool::lease`] fails with
    /// [`AddrError::LimitReached`].
    pub max_leases: usize,
    /// Acquisitions in flight at once (DHCP exchanges, probes); more wait their turn.
    pub max_pending: usize,
    /// Set `promote_secondaries` on the interface (see the crate documentation: without
    /// it, the kernel removes every address of a subnet with the first one).
    pub configure_interface: bool,
    /// DHCPRELEASEs sent per second at most, across the pool; 0 sends them unpaced. A
    /// RELEASE has no answer and is never resent, so one a server drops leaves the lease
    /// bound until it expires: dropping a thousand addresses at once sends a thousand
    /// RELEASEs in a few milliseconds, more than a single-threaded server's socket buffer
    /// holds (dnsmasq kept 808 of 1000 leases after such a burst).
    pub release_rate: u32,
    /// Send a DHCPRELEASE when an address is dropped or the pool shuts down (the
    /// default). Off, the address still leaves the interface but the lease stays bound on
    /// the server until it expires — what a machine that is switched off leaves behind
    /// (the boot-storm emulator's default, so the server's lease table shows the storm).
    pub send_release: bool,
}

impl PoolConfig {
    /// DHCP on `interface` with the defaults: a MAC per lease, RFC 5227 probes.
    pub fn dhcp(interface: &str) -> PoolConfig {
        PoolConfig {
            interface: interface.into(),
            source: Source::Dhcp(DhcpSource::default()),
            dad: Some(DadConfig::rfc5227()),
            max_leases: 4096,
            max_pending: 256,
            configure_interface: true,
            release_rate: 1000,
            send_release: true,
        }
    }

    /// The static range `first..=last` on `interface`, installed as `/prefix_len`, with a
    /// 60-second kernel lifetime refreshed while held.
    pub fn static_range(interface: &str, first: Ipv4Addr, last: Ipv4Addr, prefix_len: u8) -> PoolConfig {
        PoolConfig {
            source: Source::Static {
                first,
                last,
                prefix_len,
                lifetime: Duration::from_secs(60),
            },
            ..PoolConfig::dhcp(interface)
        }
    }
}

/// What a lease's DHCP client just did, told to the observer given to
/// [`AddrPool::lease_observed`] together with the client itself (its
/// [`stats`](DhcpClient::stats), [`binding`](DhcpClient::binding), state).
#[derive(Debug)]
#[non_exhaustive]
pub enum DhcpStep<'a> {
    /// A datagram was handed to the socket (DISCOVER, REQUEST, DECLINE, RELEASE...).
    Sent(&'a ClientTransmit),
    /// The client reported an event (offered, bound or renewed, NAK, failed...).
    Event(&'a ClientEvent),
    /// A reply for this lease arrived and the client took it in: one that moved the
    /// exchange on, or the first ProxyDHCP offer (on [`DhcpClient::proxy_offer`], and on
    /// [`DhcpClient::binding`] when it came after the ACK).
    Received,
}

/// Called for every [`DhcpStep`] of a lease, from the pool's task for it: keep it short
/// and never block (record a time, copy a count).
pub type DhcpObserver = Arc<dyn Fn(&DhcpClient, DhcpStep<'_>) + Send + Sync>;

/// Why a lease could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    #[error("interface {interface}: {source}")]
    Interface { interface: String, source: io::Error },
    #[error("interface {interface} disappeared")]
    InterfaceGone { interface: String },
    #[error("the static range {first}-{last} is exhausted")]
    Exhausted { first: Ipv4Addr, last: Ipv4Addr },
    #[error("{limit} addresses are held already (the pool's max_leases)")]
    LimitReached { limit: usize },
    #[error("{0}{hint}", hint = dhcp_hint(.0))]
    Dhcp(ClientError),
    #[error("every address offered was in use by another host: {declined:?}")]
    Conflicts { declined: Vec<Ipv4Addr> },
    #[error("installing {ip}/{prefix_len} on {interface}: {source}")]
    Install {
        interface: String,
        ip: Ipv4Addr,
        prefix_len: u8,
        source: io::Error,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("the pool was shut down")]
    Shutdown,
    #[error("no tokio runtime to run the pool on (call from inside one, or use AddrPool::start_on)")]
    NoRuntime,
}

fn dhcp_hint(e: &ClientError) -> &'static str {
    match e {
        ClientError::NoOffer { .. } => " (no DHCP server answers, or its pool is exhausted)",
        ClientError::TooManyRestarts { .. } => " (the server keeps refusing the address)",
        _ => "",
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENXIO))
}

/// Counts since the pool started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Leases handed out.
    pub leased: u64,
    /// Leases that could not be had.
    pub failed: u64,
    /// Addresses found in use (ARP) or already on the interface, and declined.
    pub conflicts: u64,
    /// Leases renewed (DHCP ACKs after the first) or refreshed (static).
    pub renewed: u64,
    /// Leases released by their users.
    pub released: u64,
    /// Leases lost while held (NAK, expiry, interface gone, shutdown).
    pub lost: u64,
    /// DHCP replies no lease was waiting for, or dropped because its queue was full.
    pub dhcp_unrouted: u64,
    /// Addresses held now.
    pub held: usize,
}

#[derive(Default)]
struct Counters {
    leased: AtomicU64,
    failed: AtomicU64,
    conflicts: AtomicU64,
    renewed: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
    held: AtomicUsize,
    /// Last "limit reached" log line, ms since the pool started (rate limit).
    limit_logged_ms: AtomicU64,
}

/// Replies waiting for their lease task, by transaction id.
type Routes = Mutex<HashMap<u32, mpsc::Sender<DhcpMessage>>>;

struct DhcpIo {
    sock: tokio::net::UdpSocket,
    routes: Routes,
    unrouted: AtomicU64,
}

/// Which addresses of a static range are taken.
struct StaticState {
    in_use: HashSet<Ipv4Addr>,
    conflicted: HashSet<Ipv4Addr>,
    cursor: u32,
}

struct PoolInner {
    cfg: PoolConfig,
    ifindex: u32,
    mac: [u8; 6],
    table: Arc<dyn AddressTable>,
    arp: Option<Arc<ArpWatch>>,
    dhcp: Option<Arc<DhcpIo>>,
    /// The reply router: cancelled with the pool; it holds the socket, so port 68 is free
    /// again once the runtime has dropped it (its next turn, not the instant of the drop).
    receiver: Mutex<Option<tokio::task::AbortHandle>>,
    statics: Mutex<StaticState>,
    held: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    tasks: AtomicUsize,
    idle: Notify,
    /// `Some(why)` ends every lease: shutdown, or the interface went away.
    stop: watch::Sender<Option<String>>,
    seed: u64,
    next_identity: AtomicU64,
    counters: Counters,
    started: Instant,
    /// When the next paced RELEASE may leave.
    next_release: Mutex<tokio::time::Instant>,
    warnings: Vec<String>,
    runtime: tokio::runtime::Handle,
}

/// A pool of addresses on one interface; cheap to clone, shareable across tasks and
/// threads. See the crate documentation.
#[derive(Clone)]
pub struct AddrPool {
    inner: Arc<PoolInner>,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The client hardware address and client id of the pool's `n`th lease. Per-address MACs
/// are unique within the pool (the low 24 bits count) and random across pools.
pub(crate) fn identity(seed: u64, n: u64, mode: Chaddr, if_mac: [u8; 6]) -> ([u8; 6], Vec<u8>) {
    let s = seed.to_be_bytes();
    match mode {
        Chaddr::PerAddress => {
            let mac = [0x02, s[0], s[1], s[2] ^ (n >> 16) as u8, (n >> 8) as u8, n as u8];
            let mut id = vec![1];
            id.extend_from_slice(&mac);
            (mac, id)
        }
        Chaddr::Interface => {
            // RFC 4361: type 255, IAID, DUID-LL (type 3, hardware type 1, MAC).
            let iaid = (splitmix(seed) as u32 & 0xff00_0000) | (n as u32 & 0x00ff_ffff);
            let mut id = vec![0xff];
            id.extend_from_slice(&iaid.to_be_bytes());
            id.extend_from_slice(&[0, 3, 0, 1]);
            id.extend_from_slice(&if_mac);
            (if_mac, id)
        }
    }
}

impl AddrPool {
    /// Starts a pool on the current tokio runtime.
    pub fn start(cfg: PoolConfig) -> Result<AddrPool, AddrError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| AddrError::NoRuntime)?;
        AddrPool::start_on(cfg, handle)
    }

    /// Starts a pool whose tasks run on `runtime` (a multi-thread runtime, or one driven by
    /// another thread, if [`lease_blocking`](Self::lease_blocking) is to be used).
    pub fn start_on(cfg: PoolConfig, runtime: tokio::runtime::Handle) -> Result<AddrPool, AddrError> {
        let _enter = runtime.enter();
        let interface = cfg.interface.clone();
        let iface_err = |source| AddrError::Interface {
            interface: interface.clone(),
            source,
        };
        let ifindex = sys::ifindex(&cfg.interface).map_err(iface_err)?;
        let mac = sys::hardware_address(&cfg.interface).map_err(iface_err)?;
        let warnings = check_interface(&cfg);
        for w in &warnings {
            tracing::warn!(interface = %cfg.interface, "{w}");
        }
        let io_err = |context: &str| {
            let context = context.to_string();
            move |source| AddrError::Io { context, source }
        };
        let table: Arc<dyn AddressTable> = Arc::new(Netlink::new().map_err(io_err("opening a netlink socket"))?);
        let arp = match cfg.dad {
            Some(_) => Some(ArpWatch::start(ifindex, mac).map_err(io_err("opening the ARP packet socket (needs CAP_NET_RAW)"))?),
            None => None,
        };
        let dhcp = match cfg.source {
            Source::Dhcp(_) => {
                let std = sys::dhcp_socket(&cfg.interface).map_err(io_err(
                    "binding UDP port 68 on the interface (is a DHCP client running there?)",
                ))?;
                Some(Arc::new(DhcpIo {
                    sock: tokio::net::UdpSocket::from_std(std).map_err(io_err("registering the DHCP socket"))?,
                    routes: Mutex::new(HashMap::new()),
                    unrouted: AtomicU64::new(0),
                }))
            }
            Source::Static { .. } => None,
        };
        let seed = splitmix(
            u64::from(std::process::id())
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
                ^ (u64::from(ifindex) << 48),
        );
        let inner = Arc::new(PoolInner {
            held: Arc::new(Semaphore::new(cfg.max_leases)),
            pending: Arc::new(Semaphore::new(cfg.max_pending.max(1))),
            cfg,
            ifindex,
            mac,
            table,
            arp,
            dhcp,
            receiver: Mutex::new(None),
            statics: Mutex::new(StaticState {
                in_use: HashSet::new(),
                conflicted: HashSet::new(),
                cursor: 0,
            }),
            tasks: AtomicUsize::new(0),
            idle: Notify::new(),
            stop: watch::channel(None).0,
            seed,
            next_identity: AtomicU64::new(0),
            counters: Counters::default(),
            started: Instant::now(),
            next_release: Mutex::new(tokio::time::Instant::now()),
            warnings,
            runtime: runtime.clone(),
        });
        if let Some(io) = &inner.dhcp {
            let task = runtime.spawn(dhcp_receiver(io.clone()));
            *inner.receiver.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        }
        runtime.spawn(interface_monitor(Arc::downgrade(&inner)));
        Ok(AddrPool { inner })
    }

    /// A new address: leased (DHCP) or taken from the range (static), probed, installed on
    /// the interface with its lifetime. Held until the returned [`OwnedAddr`] and every
    /// clone and socket of it are dropped.
    pub async fn lease(&self) -> Result<OwnedAddr, AddrError> {
        self.acquire(None, None).await
    }

    /// [`lease`](Self::lease) with a DHCP client of the caller's: its MAC as `chaddr`, its
    /// client id, options and timers (an emulated PXE or iPXE client, say:
    /// [`ClientConfig::ipxe`]); `renew` is forced on, since the pool keeps the lease. The
    /// ACK's boot file, next server and any ProxyDHCP offer are in [`OwnedAddr::origin`].
    /// On a static pool the configuration is not used.
    pub async fn lease_as(&self, client: ClientConfig) -> Result<OwnedAddr, AddrError> {
        self.acquire(Some(client), None).await
    }

    /// [`lease_as`](Self::lease_as), telling `observer` every step of the DHCP client
    /// while the lease is taken and held (see [`DhcpStep`]): for callers that keep a
    /// timeline per client, as the boot-storm emulator does. On a static pool it is never
    /// called.
    pub async fn lease_observed(&self, client: ClientConfig, observer: DhcpObserver) -> Result<OwnedAddr, AddrError> {
        self.acquire(Some(client), Some(observer)).await
    }

    async fn acquire(&self, client: Option<ClientConfig>, observer: Option<DhcpObserver>) -> Result<OwnedAddr, AddrError> {
        let inner = &self.inner;
        if let Some(why) = inner.stop.borrow().clone() {
            return Err(inner.stop_error(&why));
        }
        let held = inner.held.clone().try_acquire_owned().map_err(|_| {
            inner.log_limit();
            AddrError::LimitReached {
                limit: inner.cfg.max_leases,
            }
        })?;
        let pending = inner
            .pending
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AddrError::Shutdown)?;
        let (tx, rx) = oneshot::channel();
        inner.runtime.spawn(lease_task(inner.clone(), held, pending, client, observer, tx));
        rx.await.unwrap_or(Err(AddrError::Shutdown))
    }

    /// [`lease`](Self::lease) for code without a runtime of its own. Must not be called
    /// from inside an async task (it blocks the thread); the pool's runtime must be
    /// running on other threads.
    pub fn lease_blocking(&self) -> Result<OwnedAddr, AddrError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let pool = self.clone();
        self.inner.runtime.spawn(async move {
            let _ = tx.send(pool.lease().await);
        });
        rx.recv().unwrap_or(Err(AddrError::Shutdown))
    }

    pub fn interface(&self) -> &str {
        &self.inner.cfg.interface
    }

    pub fn ifindex(&self) -> u32 {
        self.inner.ifindex
    }

    /// The interface's hardware address.
    pub fn interface_mac(&self) -> [u8; 6] {
        self.inner.mac
    }

    /// What [`PoolConfig::configure_interface`] could not fix and the pool found wrong with
    /// the interface's settings (also logged at start).
    pub fn interface_warnings(&self) -> &[String] {
        &self.inner.warnings
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            leased: c.leased.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
            renewed: c.renewed.load(Ordering::Relaxed),
            released: c.released.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            dhcp_unrouted: self.inner.dhcp.as_ref().map_or(0, |d| d.unrouted.load(Ordering::Relaxed)),
            held: c.held.load(Ordering::Relaxed),
        }
    }

    /// The IPv4 addresses on the pool's interface now (the pool's and any others).
    pub fn installed(&self) -> io::Result<Vec<InstalledAddr>> {
        self.inner.table.list(self.inner.ifindex)
    }

    /// Resolves once no lease task is running: every address released or lost and taken
    /// off the interface.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends every lease (released to the server, taken off the interface; their sockets
    /// fail with "the pool was shut down") and waits for it. Later leases fail with
    /// [`AddrError::Shutdown`].
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(Some(SHUTDOWN.into()));
        self.inner.pending.close();
        self.idle().await;
    }
}

const SHUTDOWN: &str = "the pool was shut down";

impl PoolInner {
    fn stop_error(&self, why: &str) -> AddrError {
        if why == SHUTDOWN {
            AddrError::Shutdown
        } else {
            AddrError::InterfaceGone {
                interface: self.cfg.interface.clone(),
            }
        }
    }

    fn log_limit(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.counters.limit_logged_ms.load(Ordering::Relaxed);
        metrics::counter!("fleetboot_addr_limit_reached_total").increment(1);
        if (last == 0 || now >= last + 1000)
            && self
                .counters
                .limit_logged_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                limit = self.cfg.max_leases,
                interface = %self.cfg.interface,
                "address pool full: max_leases addresses are held; refusing more"
            );
        }
    }

    fn gone(&self, e: &io::Error) -> Option<AddrError> {
        is_gone(e).then(|| AddrError::InterfaceGone {
            interface: self.cfg.interface.clone(),
        })
    }

    async fn send(&self, t: &ClientTransmit) -> io::Result<()> {
        let io = self.dhcp.as_ref().expect("DHCP pool");
        let fd = io.sock.as_raw_fd();
        io.sock
            .async_io(Interest::WRITABLE, || {
                sys::send_from(fd, &t.bytes, t.source, t.dest, self.ifindex)
            })
            .await
            .map(drop)
    }

    /// Waits for this RELEASE's turn under [`PoolConfig::release_rate`].
    async fn release_turn(&self) {
        if self.cfg.release_rate == 0 {
            return;
        }
        let gap = Duration::from_secs(1) / self.cfg.release_rate;
        let at = {
            let mut next = self.next_release.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + gap;
            at
        };
        tokio::time::sleep_until(at).await;
    }

    fn held_changed(&self, delta: isize) {
        let now = if delta > 0 {
            self.counters.held.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.counters.held.fetch_sub(1, Ordering::Relaxed) - 1
        };
        metrics::gauge!("fleetboot_addr_held").set(now as f64);
    }
}

/// Reads the interface settings the crate documentation explains; fixes
/// `promote_secondaries` when allowed, and returns what is still wrong.
fn check_interface(cfg: &PoolConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let iface = cfg.interface.as_str();
    if !sys::ipv4_conf(iface, "promote_secondaries").is_ok_and(|v| v == "1") {
        let fixed = cfg.configure_interface
            && sys::set_ipv4_conf(iface, "promote_secondaries", "1").is_ok();
        if !fixed {
            warnings.push(format!(
                "net.ipv4.conf.{iface}.promote_secondaries is not 1: when the first address \
                 of a subnet goes, the kernel removes all the others with it"
            ));
        }
    }
    if matches!(cfg.source, Source::Dhcp(_)) {
        let strict = |i: &str| sys::ipv4_conf(i, "rp_filter").is_ok_and(|v| v == "1");
        if strict(iface) || strict("all") {
            warnings.push(format!(
                "rp_filter is strict (1) on {iface} or all: DHCP replies from a server whose \
                 subnet has no address on {iface} yet may be dropped; use 0 or 2"
            ));
        }
    }
    warnings
}

/// Routes DHCP replies from the shared socket to the lease waiting for their xid.
async fn dhcp_receiver(io: Arc<DhcpIo>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let n = match io.sock.recv_from(&mut buf).await {
            Err(e) => {
                tracing::debug!(error = %e, "receiving on the DHCP socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok((n, _)) => n,
        };
        let Ok(msg) = DhcpMessage::parse(&buf[..n]) else {
            tracing::debug!(len = n, "malformed DHCP datagram dropped");
            continue;
        };
        if msg.op != BOOTREPLY {
            continue;
        }
        let route = io
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&msg.xid)
            .cloned();
        let delivered = route.is_some_and(|tx| tx.try_send(msg).is_ok());
        if !delivered {
            io.unrouted.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("fleetboot_addr_dhcp_unrouted_total").increment(1);
        }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        if let Some(task) = self.receiver.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// Ends every lease when the interface disappears (or is replaced by another of the same
/// name): its addresses went with it.
async fn interface_monitor(pool: Weak<PoolInner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(inner) = pool.upgrade() else { return };
        if inner.stop.borrow().is_some() {
            return;
        }
        if sys::ifindex(&inner.cfg.interface).ok() != Some(inner.ifindex) {
            tracing::warn!(interface = %inner.cfg.interface, "interface disappeared; its leases are lost");
            inner.stop.send_replace(Some(format!(
                "interface {} disappeared",
                inner.cfg.interface
            )));
            return;
        }
    }
}

/// Counts a lease task, and wakes [`AddrPool::idle`] when the last one ends.
struct TaskGuard(Arc<PoolInner>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

async fn lease_task(
    inner: Arc<PoolInner>,
    held: OwnedSemaphorePermit,
    pending: OwnedSemaphorePermit,
    client: Option<ClientConfig>,
    observer: Option<DhcpObserver>,
    ready: oneshot::Sender<Result<OwnedAddr, AddrError>>,
) {
    inner.tasks.fetch_add(1, Ordering::AcqRel);
    let _guard = TaskGuard(inner.clone());
    let result = match inner.cfg.source.clone() {
        Source::Static {
            first,
            last,
            prefix_len,
            lifetime,
        } => static_lease(&inner, first, last, prefix_len, lifetime, pending, ready).await,
        Source::Dhcp(d) => dhcp_lease(&inner, &d, client, observer, pending, ready).await,
    };
    if let Err(e) = result {
        inner.counters.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fleetboot_addr_leases_total", "result" => "failed").increment(1);
        tracing::debug!(error = %e, "lease failed");
    }
    drop(held);
}

/// Hands the address to the caller. The caller may have given up waiting: then the
/// address comes back and is dropped at once, which releases it.
fn deliver(
    inner: &PoolInner,
    shared: Arc<LeaseShared>,
    ready: oneshot::Sender<Result<OwnedAddr, AddrError>>,
) -> oneshot::Receiver<()> {
    let (release_tx, release_rx) = oneshot::channel();
    let addr = OwnedAddr::new(shared, release_tx);
    inner.counters.leased.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("fleetboot_addr_leases_total", "result" => "ok").increment(1);
    inner.held_changed(1);
    let _ = ready.send(Ok(addr));
    release_rx
}

/// How a held lease ended.
enum End {
    Released,
    Lost(String),
}

fn end_lease(inner: &PoolInner, shared: &LeaseShared, end: End) {
    match end {
        End::Released => {
            inner.counters.released.fetch_add(1, Ordering::Relaxed);
        }
        End::Lost(why) => {
            inner.counters.lost.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("fleetboot_addr_lost_total").increment(1);
            tracing::info!(ip = %shared.ip, %why, "lease lost");
            shared.lose(why);
        }
    }
    if let Err(e) = inner.table.remove(inner.ifindex, shared.ip, shared.prefix_len) {
        tracing::warn!(ip = %shared.ip, error = %e, "removing the address; its kernel lifetime will");
    }
    inner.held_changed(-1);
}

async fn probe(inner: &PoolInner, ip: Ipv4Addr) -> Result<bool, AddrError> {
    match (&inner.arp, &inner.cfg.dad) {
        (Some(arp), Some(dad)) => arp.probe(ip, dad).await.map_err(|e| {
            inner.gone(&e).unwrap_or(AddrError::Io {
                context: format!("probing {ip} with ARP"),
                source: e,
            })
        }),
        _ => Ok(false),
    }
}

async fn announce(inner: &Arc<PoolInner>, ip: Ipv4Addr) {
    if let (Some(arp), Some(dad)) = (inner.arp.clone(), inner.cfg.dad) {
        // The first right away, the rest in the background.
        let first = DadConfig {
            announcements: dad.announcements.min(1),
            ..dad
        };
        let _ = arp.announce(ip, &first).await;
        if dad.announcements > 1 {
            let rest = DadConfig {
                announcements: dad.announcements - 1,
                ..dad
            };
            tokio::spawn(async move {
                tokio::time::sleep(dad.announce_interval).await;
                let _ = arp.announce(ip, &rest).await;
            });
        }
    }
}

fn conflict(inner: &PoolInner, ip: Ipv4Addr, how: &str) {
    inner.counters.conflicts.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("fleetboot_addr_conflicts_total").increment(1);
    tracing::warn!(%ip, interface = %inner.cfg.interface, "{ip} {how}; not using it");
}

async fn static_lease(
    inner: &Arc<PoolInner>,
    first: Ipv4Addr,
    last: Ipv4Addr,
    prefix_len: u8,
    lifetime: Duration,
    pending: OwnedSemaphorePermit,
    ready: oneshot::Sender<Result<OwnedAddr, AddrError>>,
) -> Result<(), String> {
    let fail = |e: AddrError, ready: oneshot::Sender<Result<OwnedAddr, AddrError>>| {
        let s = e.to_string();
        let _ = ready.send(Err(e));
        Err(s)
    };
    let secs = lifetime.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
    let ip = loop {
        let Some(ip) = take_static(inner, first, last) else {
            return fail(AddrError::Exhausted { first, last }, ready);
        };
        let taken = match probe(inner, ip).await {
            Ok(true) => {
                conflict(inner, ip, "answers ARP");
                true
            }
            Ok(false) => match inner.table.add(inner.ifindex, ip, prefix_len, Lifetime::secs(secs)) {
                Ok(()) => false,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    conflict(inner, ip, "is already on the interface");
                    true
                }
                Err(e) => {
                    give_back_static(inner, ip, false);
                    let err = inner.gone(&e).unwrap_or(AddrError::Install {
                        interface: inner.cfg.interface.clone(),
                        ip,
                        prefix_len,
                        source: e,
                    });
                    return fail(err, ready);
                }
            },
            Err(e) => {
                give_back_static(inner, ip, false);
                return fail(e, ready);
            }
        };
        if taken {
            give_back_static(inner, ip, true);
            continue;
        }
        break ip;
    };
    drop(pending);
    announce(inner, ip).await;
    let shared = LeaseShared::new(ip, prefix_len, Origin::Static);
    let mut release = deliver(inner, shared.clone(), ready);
    let mut stop = inner.stop.subscribe();
    let refresh_every = (lifetime / 3).max(Duration::from_millis(500));
    let end = loop {
        tokio::select! {
            _ = &mut release => break End::Released,
            _ = stop.changed() => break End::Lost(stop.borrow().clone().unwrap_or_default()),
            _ = tokio::time::sleep(refresh_every) => {
                match inner.table.refresh(inner.ifindex, ip, prefix_len, Lifetime::secs(secs)) {
                    Ok(()) => { inner.counters.renewed.fetch_add(1, Ordering::Relaxed); }
                    Err(e) => break End::Lost(format!("refreshing its lifetime on {}: {e}", inner.cfg.interface)),
                }
            }
        }
    };
    end_lease(inner, &shared, end);
    give_back_static(inner, ip, false);
    Ok(())
}

fn take_static(inner: &PoolInner, first: Ipv4Addr, last: Ipv4Addr) -> Option<Ipv4Addr> {
    let (lo, hi) = (u32::from(first), u32::from(last));
    if hi < lo {
        return None;
    }
    let size = hi - lo + 1;
    let mut st = inner.statics.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..size {
        let off = (st.cursor.wrapping_add(i)) % size;
        let ip = Ipv4Addr::from(lo + off);
        if !st.in_use.contains(&ip) && !st.conflicted.contains(&ip) {
            st.in_use.insert(ip);
            st.cursor = (off + 1) % size;
            return Some(ip);
        }
    }
    None
}

fn give_back_static(inner: &PoolInner, ip: Ipv4Addr, conflicted: bool) {
    let mut st = inner.statics.lock().unwrap_or_else(|e| e.into_inner());
    st.in_use.remove(&ip);
    if conflicted {
        st.conflicted.insert(ip);
    }
}

/// One lease's entry in the reply routes, removed when dropped.
struct Route<'a> {
    routes: &'a Routes,
    xid: Option<u32>,
    tx: mpsc::Sender<DhcpMessage>,
}

impl Route<'_> {
    fn follow(&mut self, xid: u32) {
        if self.xid == Some(xid) {
            return;
        }
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = self.xid.take() {
            routes.remove(&old);
        }
        routes.insert(xid, self.tx.clone());
        self.xid = Some(xid);
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        if let Some(xid) = self.xid {
            self.routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&xid);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// One DHCP client of the pool, with its reply queue.
struct Exchange<'a> {
    inner: &'a PoolInner,
    client: DhcpClient,
    route: Route<'a>,
    rx: mpsc::Receiver<DhcpMessage>,
    observer: Option<DhcpObserver>,
}

impl Exchange<'_> {
    fn tell(&self, step: DhcpStep<'_>) {
        if let Some(o) = &self.observer {
            o(&self.client, step);
        }
    }

    /// The client's next event, shown to the observer first.
    fn next_event(&mut self) -> Option<ClientEvent> {
        let ev = self.client.poll_event()?;
        self.tell(DhcpStep::Event(&ev));
        Some(ev)
    }

    /// Sends what the client has queued; errors only when the interface is gone.
    async fn flush(&mut self) -> Result<(), AddrError> {
        self.route.follow(self.client.xid());
        while let Some(t) = self.client.poll_datagram(Instant::now()) {
            if let Err(e) = self.inner.send(&t).await {
                if let Some(gone) = self.inner.gone(&e) {
                    return Err(gone);
                }
                // A lost datagram: the client's timers resend it.
                tracing::debug!(error = %e, kind = t.message_type.name(), "sending a DHCP message");
            }
            self.tell(DhcpStep::Sent(&t));
        }
        self.route.follow(self.client.xid());
        Ok(())
    }

    /// Waits for a reply or the client's next timer, whichever first, and hands it over.
    async fn step(&mut self, stop: &mut watch::Receiver<Option<String>>) -> Result<(), String> {
        let deadline = self.client.poll_timeout();
        tokio::select! {
            msg = self.rx.recv() => {
                if let Some(msg) = msg {
                    // A ProxyDHCP offer never moves the exchange on (the client answers it
                    // with `Ignored`), but the first one is news: heard after the ACK it
                    // only shows on the binding, and an observer waiting for it (a PXE
                    // ROM) must be told.
                    let had_proxy = self.client.proxy_offer().is_some();
                    let took = self.client.handle_message(Instant::now(), &msg).is_ok();
                    if took || (!had_proxy && self.client.proxy_offer().is_some()) {
                        self.tell(DhcpStep::Received);
                    }
                }
            }
            _ = sleep_until(deadline) => self.client.handle_timeout(Instant::now()),
            _ = stop.changed() => {
                return Err(stop.borrow().clone().unwrap_or_default());
            }
        }
        Ok(())
    }

    /// Runs the exchange until bound (or failed).
    async fn bind(&mut self, stop: &mut watch::Receiver<Option<String>>) -> Result<Binding, AddrError> {
        loop {
            self.flush().await?;
            while let Some(ev) = self.next_event() {
                match ev {
                    ClientEvent::Bound(b) => return Ok(b),
                    ClientEvent::Failed(e) => return Err(AddrError::Dhcp(e)),
                    _ => {}
                }
            }
            if let Err(why) = self.step(stop).await {
                return Err(self.inner.stop_error(&why));
            }
        }
    }
}

async fn dhcp_lease(
    inner: &Arc<PoolInner>,
    d: &DhcpSource,
    client: Option<ClientConfig>,
    observer: Option<DhcpObserver>,
    pending: OwnedSemaphorePermit,
    ready: oneshot::Sender<Result<OwnedAddr, AddrError>>,
) -> Result<(), String> {
    let fail = |e: AddrError, ready: oneshot::Sender<Result<OwnedAddr, AddrError>>| {
        let s = e.to_string();
        let _ = ready.send(Err(e));
        Err(s)
    };
    let io = inner.dhcp.as_ref().expect("DHCP pool");
    let n = inner.next_identity.fetch_add(1, Ordering::Relaxed);
    let config = match client {
        Some(mut c) => {
            c.renew = true;
            c
        }
        None => {
            let (chaddr, client_id) = identity(inner.seed, n, d.chaddr, inner.mac);
            ClientConfig {
                initial_timeout: d.initial_timeout,
                max_timeout: d.max_timeout,
                discover_attempts: d.discover_attempts,
                request_attempts: d.request_attempts,
                max_restarts: d.max_restarts,
                ..ClientConfig::host(MacAddr(chaddr), client_id)
            }
        }
    };
    let (chaddr, client_id) = (config.mac.0, config.client_id.clone());
    let (tx, rx) = mpsc::channel(16);
    let mut x = Exchange {
        inner,
        client: DhcpClient::new(config.clone(), splitmix(inner.seed ^ n) as u32, Instant::now()),
        route: Route {
            routes: &io.routes,
            xid: None,
            tx,
        },
        rx,
        observer,
    };
    let mut stop = inner.stop.subscribe();
    let mut declined = Vec::new();
    let binding = loop {
        let b = match x.bind(&mut stop).await {
            Ok(b) => b,
            Err(e) => return fail(e, ready),
        };
        let in_use = match probe(inner, b.ip).await {
            Ok(true) => {
                conflict(inner, b.ip, "answers ARP");
                true
            }
            Ok(false) => {
                let left = x
                    .client
                    .lease_times()
                    .map(|l| l.expires_at.saturating_duration_since(Instant::now()).as_secs() as u32);
                let life = left.map(Lifetime::secs).unwrap_or(Lifetime::FOREVER);
                match inner.table.add(inner.ifindex, b.ip, b.prefix_len, life) {
                    Ok(()) => false,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        conflict(inner, b.ip, "is already on the interface");
                        true
                    }
                    Err(e) => {
                        x.client.release();
                        let _ = x.flush().await;
                        let err = inner.gone(&e).unwrap_or(AddrError::Install {
                            interface: inner.cfg.interface.clone(),
                            ip: b.ip,
                            prefix_len: b.prefix_len,
                            source: e,
                        });
                        return fail(err, ready);
                    }
                }
            }
            Err(e) => {
                x.client.release();
                let _ = x.flush().await;
                return fail(e, ready);
            }
        };
        if !in_use {
            break b;
        }
        x.client.decline();
        if let Err(e) = x.flush().await {
            return fail(e, ready);
        }
        declined.push(b.ip);
        if declined.len() as u32 > d.max_declines {
            return fail(AddrError::Conflicts { declined }, ready);
        }
        // The same identity starts over; the server has set the address aside.
        let xid = splitmix(inner.seed ^ n ^ (declined.len() as u64) << 32) as u32;
        x.client = DhcpClient::new(config.clone(), xid, Instant::now());
    };
    drop(pending);
    announce(inner, binding.ip).await;
    let shared = LeaseShared::new(
        binding.ip,
        binding.prefix_len,
        Origin::Dhcp {
            binding: Box::new(binding.clone()),
            client_id,
            chaddr,
        },
    );
    let mut release = deliver(inner, shared.clone(), ready);
    let end = loop {
        if x.flush().await.is_err() {
            break End::Lost(format!("interface {} disappeared", inner.cfg.interface));
        }
        let mut lost = None;
        while let Some(ev) = x.next_event() {
            match ev {
                ClientEvent::Bound(b) => {
                    inner.counters.renewed.fetch_add(1, Ordering::Relaxed);
                    let life = b.lease_time.map(Lifetime::secs).unwrap_or(Lifetime::FOREVER);
                    if let Err(e) = inner.table.refresh(inner.ifindex, b.ip, b.prefix_len, life) {
                        lost = Some(format!("renewed, but the address is gone from {}: {e}", inner.cfg.interface));
                    }
                }
                ClientEvent::Failed(e) => lost = Some(e.to_string()),
                _ => {}
            }
        }
        if let Some(why) = lost {
            break End::Lost(why);
        }
        tokio::select! {
            _ = &mut release => {
                if inner.cfg.send_release {
                    inner.release_turn().await;
                    x.client.release();
                    let _ = x.flush().await;
                }
                break End::Released;
            }
            r = x.step(&mut stop) => {
                if let Err(why) = r {
                    if why == SHUTDOWN && inner.cfg.send_release {
                        inner.release_turn().await;
                        x.client.release();
                        let _ = x.flush().await;
                    }
                    break End::Lost(why);
                }
            }
        }
    };
    end_lease(inner, &shared, end);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_identities_are_unique_within_a_pool() {
        let mut macs = HashSet::new();
        let mut ids = HashSet::new();
        for n in 0..70_000 {
            let (mac, id) = identity(42, n, Chaddr::PerAddress, [0; 6]);
            assert_eq!(mac[0], 0x02, "locally administered, unicast");
            assert_eq!(&id[1..], &mac);
            assert!(macs.insert(mac) && ids.insert(id));
        }
        // Another pool draws other MACs.
        let (a, _) = identity(42, 5, Chaddr::PerAddress, [0; 6]);
        let (b, _) = identity(splitmix(43), 5, Chaddr::PerAddress, [0; 6]);
        assert_ne!(a, b);
    }

    #[test]
    fn interface_identities_share_the_mac_not_the_client_id() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let (m1, id1) = identity(7, 1, Chaddr::Interface, mac);
        let (m2, id2) = identity(7, 2, Chaddr::Interface, mac);
        assert_eq!((m1, m2), (mac, mac));
        assert_ne!(id1, id2);
        assert_eq!(id1[0], 0xff);
        assert_eq!(&id1[5..9], &[0, 3, 0, 1]);
        assert_eq!(&id1[9..], &mac);
    }

    #[test]
    fn dhcp_errors_say_what_to_look_at() {
        let e = AddrError::Dhcp(ClientError::NoOffer { attempts: 3 });
        let s = e.to_string();
        assert!(s.contains("no DHCPOFFER after 3") && s.contains("exhausted"), "{s}");
    }
}

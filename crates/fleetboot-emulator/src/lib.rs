//! The boot-storm load generator: N emulated iPXE clients booting at once from one
//! interface of a lab network namespace, each a distinct host with its own address.
//!
//! Map of the crate:
//! - [`run`] / [`run_async`]: the whole run — checks it is inside a lab namespace, starts
//!   a [`fleetboot_addr::AddrPool`] on the interface, starts every client, stops them all
//!   at the global timeout or on Ctrl-C/SIGTERM, lets go of every address (released to
//!   the server with `--release`, taken off the interface either way), and returns an
//!   [`EmulateReport`].
//! - `boot` (private): one client — its address leased through the pool as itself
//!   ([`fleetboot_addr::AddrPool::lease_observed`]: the client's own MAC, client id, UUID
//!   and iPXE or PXE options, the sans-I/O [`fleetboot_dhcp::DhcpClient`] run by the pool,
//!   each step timed into the client's timeline), probed with ARP and installed over
//!   netlink with the lease's lifetime; then its boot plan fetched from that address: the
//!   boot file; if it is an iPXE script, its `kernel`/`initrd` images (and `chain`ed
//!   scripts). In [`BootMode::PxeMtftp`] the client is a PXE ROM instead: after DHCP,
//!   boot server discovery and the boot file over PXE MTFTP. Every socket of the client
//!   is bound to its own address, so a server sees as many hosts as there are clients.
//! - [`pxe`]: PXE boot server discovery (port 4011, fleetboot's wait packets) and the PXE
//!   MTFTP download, a blocking client on its own thread; also used by the namespace tests
//!   of `fleetboot negotiate`.
//! - [`http`]: a minimal HTTP/1.1 GET client (Content-Length, chunked, redirects).
//! - [`tftp`]: a TFTP read around `fleetboot_tftp::ReadClient`, locked onto the server's
//!   transfer port after its first reply.
//! - [`script`]: the part of iPXE's script language a boot needs.
//! - [`url`]: `http://`, `tftp://` and plain TFTP names; relative script references.
//! - [`net`]: the namespace check, the address pool's configuration, and every socket a
//!   client opens from its address.
//! - [`report`]: per-client timelines and the summary (percentiles, failures, counts).
//! - [`sink`]: bytes counted and SHA-256-hashed as they arrive, never stored whole
//!   (except small scripts).
//! - [`stream`]: [`BootMode::Stream`]: after DHCP, the image from fleetboot's multicast
//!   stream with the stream's own sans-I/O receiver, from the client's leased address.
//!
//! # Network safety
//!
//! [`run`] refuses to start unless `/proc/self/ns/net` differs from `/proc/1/ns/net` (and
//! is not the kernel's initial namespace; where PID 1's cannot be read, it must be a named
//! namespace under `/run/netns`): it broadcasts DHCP and adds addresses, which belongs in
//! a namespace made for it. It only removes addresses it added itself, and each is added
//! with the kernel lifetime of its lease: an emulator killed with SIGKILL leaves nothing
//! on the interface once its leases' times are up.

pub mod http;
pub mod net;
pub mod pxe;
pub mod report;
pub mod script;
pub mod sink;
pub mod stream;
pub mod tftp;
pub mod url;

mod boot;

pub use report::{
    ClientReport, EmulateReport, FileReport, Percentiles, Phase, PxeReport, PxeSummary, Timeline,
};
pub use sink::sha256_hex;
pub use stream::{StreamBoot, StreamReport};
pub use tftp::TftpParams;

use boot::{lock, Ctx, Slot};
use fleetboot_addr::AddrPool;
use fleetboot_boot::MacAddr;
use fleetboot_dhcp::client::ClientConfig;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a run could not start (or had to stop) as a whole. Per-client failures are in the
/// report instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulateError {
    #[error("refusing to run in the default network namespace: {0}")]
    DefaultNamespace(String),
    #[error("{option}: {reason}")]
    Option {
        option: &'static str,
        reason: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the clients' address pool on {interface}: {source}")]
    Addresses {
        interface: String,
        #[source]
        source: fleetboot_addr::AddrError,
    },
}

/// How long the end of a run waits for every address to be released and removed.
const LET_GO_TIMEOUT: Duration = Duration::from_secs(30);

/// The MAC of client 0 when none is given: locally administered, unicast.
pub const DEFAULT_MAC_BASE: MacAddr = MacAddr([0x02, 0xfb, 0xee, 0x00, 0x00, 0x00]);

/// What the clients do after DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BootMode {
    /// iPXE: the boot file, and if it is a script, its kernel and initrd (HTTP or TFTP).
    #[default]
    Ipxe,
    /// A PXE ROM (DHCP without iPXE's options 77 and 175): boot server discovery, then the
    /// boot file over PXE MTFTP ([`pxe`]).
    PxeMtftp(PxeMtftp),
    /// A streaming host (DHCP as iPXE, whose boot file it ignores): the image from
    /// fleetboot's synchronized multicast stream, received from the client's own address
    /// ([`stream`]).
    Stream(StreamBoot),
}

/// Where PXE MTFTP clients look for boot servers (see [`pxe::plan_discovery`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PxeMtftp {
    /// Ask these; empty: those of the ProxyDHCP offer, else the DHCP server.
    pub boot_servers: Vec<Ipv4Addr>,
    /// `None`: the ProxyDHCP offer's first menu item, else [`pxe::DEFAULT_BOOT_TYPE`].
    pub boot_type: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulateOptions {
    pub clients: usize,
    /// The interface every client shares (inside the lab namespace).
    pub interface: String,
    /// Client `i` gets this MAC plus `i` (as a 48-bit number); client id `01:MAC`.
    pub mac_base: MacAddr,
    pub tftp: TftpParams,
    /// Everything stops after this long (default 120 s).
    pub timeout: Duration,
    /// Delay between one client's start and the next (default 0: all at once).
    pub stagger: Duration,
    /// File name (last URL path segment) → SHA-256 every client must fetch exactly.
    pub expected: Vec<(String, [u8; 32])>,
    /// Send a DHCPRELEASE for every lease at the end (otherwise the leases stay bound on
    /// the server, as a storm of machines switched off would leave them).
    pub release: bool,
    pub mode: BootMode,
}

impl EmulateOptions {
    pub fn new(clients: usize, interface: impl Into<String>) -> EmulateOptions {
        EmulateOptions {
            clients,
            interface: interface.into(),
            mac_base: DEFAULT_MAC_BASE,
            tftp: TftpParams::default(),
            timeout: Duration::from_secs(120),
            stagger: Duration::ZERO,
            expected: Vec::new(),
            release: false,
            mode: BootMode::Ipxe,
        }
    }

    /// Parses `NAME=SHA256HEX` (the CLI's `--expect`) and adds it.
    pub fn expect(&mut self, spec: &str) -> Result<(), EmulateError> {
        let bad = |reason: String| EmulateError::Option {
            option: "--expect",
            reason,
        };
        let (name, hash) = spec
            .split_once('=')
            .ok_or_else(|| bad(format!("{spec:?}: want NAME=SHA256")))?;
        if name.is_empty() || name.contains('/') {
            return Err(bad(format!("{name:?}: want a file name without '/'")));
        }
        let hash = sink::parse_sha256(hash).map_err(bad)?;
        self.expected.push((name.to_string(), hash));
        Ok(())
    }

    pub fn validate(&self) -> Result<(), EmulateError> {
        let bad = |option, reason: &str| {
            Err(EmulateError::Option {
                option,
                reason: reason.into(),
            })
        };
        if self.clients == 0 {
            return bad("clients", "must be at least 1");
        }
        if self.clients > 65_536 {
            return bad("clients", "at most 65536");
        }
        if self.interface.is_empty() || self.interface.len() > 15 || self.interface.contains('/') {
            return bad("interface", "not a valid interface name");
        }
        if !(8..=65464).contains(&self.tftp.blksize) {
            return bad("tftp_blksize", "must be within 8..=65464 (RFC 2348)");
        }
        if self.tftp.windowsize == 0 {
            return bad("tftp_windowsize", "must be at least 1 (RFC 7440)");
        }
        if self.timeout.is_zero() {
            return bad("timeout", "must be positive");
        }
        if let BootMode::Stream(s) = &self.mode {
            s.validate().map_err(|reason| EmulateError::Option { option: "stream", reason })?;
        }
        if let BootMode::PxeMtftp(p) = &self.mode {
            if let Some(a) = p.boot_servers.iter().find(|a| {
                a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback()
            }) {
                return Err(EmulateError::Option {
                    option: "boot_server",
                    reason: format!("{a} is not a boot server's unicast address"),
                });
            }
        }
        Ok(())
    }

    /// Client `i`'s MAC.
    pub fn mac(&self, i: usize) -> MacAddr {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.mac_base.0);
        let v = u64::from_be_bytes(b).wrapping_add(i as u64) & 0xffff_ffff_ffff;
        let mut m = [0u8; 6];
        m.copy_from_slice(&v.to_be_bytes()[2..]);
        MacAddr(m)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A UUID (option 97) per client: recognisable (`fbe0` first) and derived from its MAC.
fn uuid_for(mac: MacAddr, i: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[0] = 0xfb;
    u[1] = 0xe0;
    u[4..8].copy_from_slice(&(i as u32).to_be_bytes());
    u[10..].copy_from_slice(&mac.0);
    u
}

/// Runs the storm on a runtime of its own. Call [`run_async`] from inside one.
pub fn run(opts: EmulateOptions) -> Result<EmulateReport, EmulateError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // PXE MTFTP and stream clients each hold a blocking thread for their whole
        // download: room for all of them, so none waits for another to finish before it
        // may start.
        .max_blocking_threads((opts.clients + 64).min(8192))
        .build()
        .map_err(|source| EmulateError::Io {
            context: "starting the runtime".into(),
            source,
        })?;
    rt.block_on(run_async(opts))
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => tokio::select! {
            _ = t.recv() => "SIGTERM",
            _ = i.recv() => "SIGINT",
        },
        _ => std::future::pending().await,
    }
}

/// Runs the storm; see the crate documentation.
pub async fn run_async(opts: EmulateOptions) -> Result<EmulateReport, EmulateError> {
    opts.validate()?;
    let netns = net::check_lab_namespace()?;
    tracing::info!(%netns, "running inside a lab network namespace");
    let pool = AddrPool::start(net::pool_config(&opts)).map_err(|source| EmulateError::Addresses {
        interface: opts.interface.clone(),
        source,
    })?;
    let cancel = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Ctx {
        pool: pool.clone(),
        tftp: opts.tftp.clone(),
        expected: opts.expected.clone(),
        mode: opts.mode.clone(),
        deadline: Instant::now() + opts.timeout,
        cancel: cancel.clone(),
    });
    let seed = splitmix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()) << 32,
    );
    let started = Instant::now();
    let t_start = tokio::time::Instant::now();
    let mut macs = HashSet::new();
    let mut slots: Vec<Slot> = Vec::with_capacity(opts.clients);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..opts.clients {
        let mac = opts.mac(i);
        if !macs.insert(mac) {
            return Err(EmulateError::Option {
                option: "clients",
                reason: format!("MAC {mac} would be used twice"),
            });
        }
        let slot: Slot = Arc::new(Mutex::new(ClientReport::new(i, mac.to_string())));
        slots.push(slot.clone());
        let config = match opts.mode {
            BootMode::Ipxe | BootMode::Stream(_) => ClientConfig::ipxe(mac, uuid_for(mac, i)),
            BootMode::PxeMtftp(_) => ClientConfig::pxe(mac, uuid_for(mac, i)),
        };
        let xid = splitmix(seed ^ i as u64) as u32;
        let start_at = t_start + opts.stagger * i as u32;
        set.spawn(boot::run(ctx.clone(), config, xid, start_at, slot));
    }
    tracing::info!(clients = opts.clients, interface = %opts.interface, "storm started");

    let mut holding = Vec::new();
    let stopped = {
        let all = async {
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Some(c)) => holding.push(c),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "an emulated client panicked"),
                }
            }
        };
        tokio::select! {
            _ = all => None,
            _ = tokio::time::sleep(opts.timeout) => {
                Some(format!("the global timeout of {:?} passed", opts.timeout))
            }
            sig = shutdown_signal() => Some(format!("interrupted by {sig}")),
        }
    };
    // Blocking PXE clients cannot be aborted like tasks: they see this within 250 ms.
    cancel.store(true, Ordering::Relaxed);
    set.abort_all();
    while set.join_next().await.is_some() {}
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;

    // Every address goes now: released (with `release`, paced by the pool) and taken off
    // the interface by the pool's task for it.
    drop(holding);
    drop(ctx);
    if tokio::time::timeout(LET_GO_TIMEOUT, pool.idle()).await.is_err() {
        tracing::warn!("some addresses were still being released after {LET_GO_TIMEOUT:?}; shutting the pool down");
        pool.shutdown().await;
    }
    let stats = pool.stats();
    let added = stats.leased as usize;
    tracing::info!(added, released = stats.released, lost = stats.lost, conflicts = stats.conflicts, "addresses removed");

    let clients: Vec<ClientReport> = slots
        .iter()
        .map(|s| {
            let mut r = lock(s).clone();
            if !r.succeeded() && r.error.is_none() {
                let during = match &r.current {
                    Some(url) => format!(" while fetching {url}"),
                    None => String::new(),
                };
                r.error = Some(match &stopped {
                    Some(why) => format!("stopped: {why}{during}"),
                    None => format!("the client task ended unexpectedly{during}"),
                });
            }
            r
        })
        .collect();
    Ok(EmulateReport::from_clients(
        &opts.interface,
        clients,
        wall_ms,
        stopped,
        added,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_count_up_from_the_base() {
        let mut o = EmulateOptions::new(3, "eth0");
        assert_eq!(o.mac(0), DEFAULT_MAC_BASE);
        assert_eq!(o.mac(257).to_string(), "02:fb:ee:00:01:01");
        o.mac_base = MacAddr([0, 0, 0, 0, 0, 0xff]);
        assert_eq!(o.mac(1).to_string(), "00:00:00:00:01:00");
        o.mac_base = MacAddr([0xff; 6]);
        assert_eq!(o.mac(1).to_string(), "00:00:00:00:00:00");
    }

    #[test]
    fn options_are_checked() {
        let mut o = EmulateOptions::new(0, "eth0");
        assert!(matches!(
            o.validate(),
            Err(EmulateError::Option {
                option: "clients",
                ..
            })
        ));
        o.clients = 1;
        assert!(o.validate().is_ok());
        o.tftp.windowsize = 0;
        assert!(o.validate().is_err());
        o.tftp.windowsize = 8;
        o.interface = "x".repeat(16);
        assert!(o.validate().is_err());
        let mut o = EmulateOptions::new(1, "eth0");
        o.mode = BootMode::PxeMtftp(PxeMtftp {
            boot_servers: vec![Ipv4Addr::new(10, 77, 0, 11)],
            boot_type: None,
        });
        assert!(o.validate().is_ok());
        for bad in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(239, 1, 1, 1)] {
            o.mode = BootMode::PxeMtftp(PxeMtftp {
                boot_servers: vec![bad],
                boot_type: None,
            });
            assert!(
                matches!(
                    o.validate(),
                    Err(EmulateError::Option {
                        option: "boot_server",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        let mut o = EmulateOptions::new(1, "eth0");
        o.expect(&format!("vmlinuz={}", sha256_hex(b"k"))).unwrap();
        assert_eq!(o.expected[0].0, "vmlinuz");
        assert!(o.expect("vmlinuz").is_err());
        assert!(o.expect("a/b=00").is_err());
        assert!(o.expect("x=zz").is_err());
    }

    #[test]
    fn uuids_differ_per_client() {
        let o = EmulateOptions::new(2, "eth0");
        assert_ne!(uuid_for(o.mac(0), 0), uuid_for(o.mac(1), 1));
    }

    #[tokio::test]
    async fn refuses_the_default_namespace_before_touching_the_network() {
        if !fleetboot_lab::gate::ready_if(
            "refuses_the_default_namespace_before_touching_the_network",
            &[(
                net::check_lab_namespace().is_err(),
                "this test runs in a network namespace of its own, where the emulator may run",
            )],
        ) {
            return;
        }
        // A name no interface has: even a broken check could not reach a network.
        let e = run_async(EmulateOptions::new(1, "fbemu-none0"))
            .await
            .unwrap_err();
        assert!(matches!(e, EmulateError::DefaultNamespace(_)), "{e}");
        assert!(e.to_string().contains("ip netns exec"));
    }
}

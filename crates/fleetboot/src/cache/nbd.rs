//! The cache's NBD service: catalog images its site's clients read as network disks,
//! read-only, from the cache's store.
//!
//! Export names are `IMAGE` (the version the client's plan, or the site, says) and
//! `IMAGE:VERSION`; the image is the cache's object `images/IMAGE`, filled from the origin
//! on a miss like any other object (one fill however many clients read it) and read only
//! from chunks checked against the manifest the origin signed — a chunk that cannot be had
//! verified fails the READ with an error, the client never gets a wrong byte. A client's
//! own copy-on-write overlay (`IMAGE@MAC`) is refused here with the reason: its writes live
//! at the origin, whose boot plans name the origin for those disks.
//!
//! The protocol and its bounds are `fleetboot_nbd`'s blocking shell ([`blocking`]), with an
//! [`ExportLookup`] over the cache and a [`BlockDevice`], [`CachedImage`]: each connection
//! runs on a thread of its own (a disk read waits for the fill); at most
//! `cache.nbd_max_connections` at once and `cache.nbd_max_connections_per_client` from one
//! address, an idle connection giving way when a cap is reached, the next ones closed,
//! counted (`fleetboot_nbd_connections_refused_total{reason}`) and logged.

use super::objects::{Counters, ReaderGuard};
use super::Cache;
use anyhow::Result;
use fleetboot_nbd::blocking;
use fleetboot_nbd::handshake::{ExportInfo, ExportLookup, LookupError};
use fleetboot_nbd::limits::{Admission, LogEvery};
use fleetboot_nbd::{BlockDevice, ExportName, Extents, Limits, ZeroMode};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;

static ACCEPT_FAILED: LogEvery = LogEvery::new(Duration::from_secs(10));

/// An image held at the cache, as a read-only disk: every byte from a verified chunk.
pub struct CachedImage {
    cache: Arc<Cache>,
    guard: ReaderGuard,
    handle: Handle,
}

impl std::fmt::Debug for CachedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedImage").field("name", &self.guard.slot.key.0).field("version", &self.guard.slot.key.1).finish()
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the cache serves images read-only")
}

impl BlockDevice for CachedImage {
    fn size(&self) -> u64 {
        self.guard.slot.manifest.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let slot = &self.guard.slot;
        let m = &slot.manifest;
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= m.size).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut at = offset;
        while at < end {
            let i = m.chunk_of(at);
            // Waits for the fill when the chunk is not held yet; checked either way.
            let data = self.handle.block_on(self.cache.objects.chunk(slot, i)).map_err(io::Error::other)?;
            let r = m.chunk_range(i);
            let (from, to) = ((at - r.start) as usize, (end.min(r.end) - r.start) as usize);
            let into = (at - offset) as usize;
            buf[into..into + (to - from)].copy_from_slice(&data[from..to]);
            at = r.start + to as u64;
        }
        Counters::add(&self.cache.objects.counters.bytes_served, buf.len() as u64);
        metrics::counter!("fleetboot_cache_bytes_served_total").increment(buf.len() as u64);
        Ok(())
    }
    fn write(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(read_only())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _mode: ZeroMode) -> io::Result<()> {
        Err(read_only())
    }
    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
        // "Data or unknown" is always true; holes are not tracked by the manifest.
        out.push(len, 0);
        Ok(())
    }
}

/// The handshake's view of the cache: held images to list, and the one a client opens.
struct Lookup {
    cache: Arc<Cache>,
    handle: Handle,
    peer: SocketAddr,
    opened: Option<(String, Arc<CachedImage>)>,
}

impl Lookup {
    fn open(&mut self, export: &str) -> Result<Arc<CachedImage>, LookupError> {
        if let Some((n, img)) = &self.opened {
            if n == export {
                return Ok(img.clone());
            }
        }
        let en = ExportName::parse(export).map_err(LookupError::Unknown)?;
        if en.client.is_some() {
            let why = format!("{export}: a client's own overlay is served by the origin, not by this cache (its boot plan names the origin for it)");
            tracing::info!(peer = %self.peer, reason = why, "NBD export refused");
            return Err(LookupError::Policy(why));
        }
        let name = fleetboot_cache::name::image_object(&en.image.name).map_err(|e| LookupError::Unknown(format!("{export}: {e}")))?;
        let ip = match self.peer.ip() {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(v) => v.to_ipv4_mapped(),
        };
        let (guard, hit) = self.handle.block_on(self.cache.object_at(ip, &name, en.image.version.map(u64::from))).map_err(|why| {
            tracing::info!(peer = %self.peer, export, reason = why, "NBD export refused");
            if let Some(mac) = ip.and_then(|i| self.cache.mac_of(i)) {
                self.cache.trace(mac, "CACHE-REFUSED", format!("nbd {export}: {why}"));
            }
            LookupError::Failed(why)
        })?;
        if let Some(mac) = ip.and_then(|i| self.cache.mac_of(i)) {
            let kind = if hit { "CACHE-HIT" } else { "CACHE-MISS" };
            self.cache.trace(mac, kind, format!("nbd {export}: {} v{}", guard.slot.key.0, guard.slot.key.1));
        }
        let img = Arc::new(CachedImage { cache: self.cache.clone(), guard, handle: self.handle.clone() });
        self.opened = Some((export.to_string(), img.clone()));
        Ok(img)
    }
}

impl ExportLookup for Lookup {
    fn list(&mut self) -> Result<Vec<(String, String)>, LookupError> {
        Ok(self
            .cache
            .objects
            .entries()
            .into_iter()
            .filter(|(_, e)| e.state.is_held())
            .filter_map(|((name, v), _)| name.strip_prefix("images/").map(|n| (format!("{n}:{v}"), format!("{n} version {v} (held verified at this cache)"))))
            .collect())
    }

    fn lookup(&mut self, name: &str, _go: bool) -> Result<ExportInfo, LookupError> {
        let img = self.open(name)?;
        Ok(ExportInfo {
            size: img.size(),
            read_only: true,
            // Read-only: every connection sees the same bytes.
            multi_conn: true,
            description: format!("{} version {} (fleetboot cache)", img.guard.slot.key.0, img.guard.slot.key.1),
        })
    }
}

impl fleetboot_nbd::blocking::Exports for Lookup {
    type Disk = CachedImage;
    fn disk(&mut self, export: &str) -> Result<Arc<CachedImage>, LookupError> {
        let img = self.open(export)?;
        tracing::info!(peer = %self.peer, export, "NBD client reading from the cache");
        Ok(img)
    }
}

/// The cache's NBD bounds: `cache.nbd_max_connections` in all,
/// `cache.nbd_max_connections_per_client` per address, the NBD server's timeouts.
fn limits(cfg: &fleetboot_cache::config::CacheConfig) -> Limits {
    Limits { max_connections: cfg.nbd_max_connections, max_connections_per_client: cfg.nbd_max_connections_per_client, ..Limits::default() }
}

/// Accepts NBD clients on `listener` until `stop` says so; each connection on its thread.
pub async fn serve(cache: Arc<Cache>, listener: TcpListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    let limits = limits(&cache.cfg);
    let admission = Admission::new(&limits);
    tracing::info!(
        listen = %listener.local_addr()?,
        max_connections = limits.max_connections,
        max_connections_per_client = limits.max_connections_per_client,
        "cache NBD listening (read-only images)"
    );
    loop {
        let (sock, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    metrics::counter!("fleetboot_nbd_accept_errors_total").increment(1);
                    if let Some(held_back) = ACCEPT_FAILED.allow() {
                        tracing::warn!(error = %e, held_back, "NBD accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
        };
        let Some(ticket) = admission.admit_or_count(peer, ("cache.nbd_max_connections", "cache.nbd_max_connections_per_client")) else {
            continue;
        };
        let sock = match sock.into_std().and_then(|s| s.set_nonblocking(false).map(|_| s)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "NBD connection unusable");
                continue;
            }
        };
        let (cache, handle) = (cache.clone(), Handle::current());
        blocking::spawn("fleetboot-cache-nbd", sock, peer, ticket, limits.clone(), move || Lookup { cache, handle, peer, opened: None });
    }
}

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
//! The protocol is `fleetboot_nbd`'s: its handshake machine ([`Handshake`], with an
//! [`ExportLookup`] over the cache) and transmission machine ([`Transmission`],
//! [`Responder`]) against a [`BlockDevice`], [`CachedImage`]. Each connection runs on a
//! thread of its own (a disk read waits for the fill); at most
//! `cache.nbd_max_connections` at once, the next ones closed, counted and logged.

use super::objects::{Counters, ReaderGuard};
use super::Cache;
use anyhow::Result;
use fleetboot_nbd::handshake::{ExportInfo, ExportLookup, Handshake, LookupError, Status};
use fleetboot_nbd::transmission::{Event, InputBuffer, Responder, Transmission};
use fleetboot_nbd::{BlockDevice, ExportName, Extents, ZeroMode};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;

/// Longest a client may take over its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a reply may wait for a client that does not read.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections being served, and those refused over the cap.
static OPEN: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

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

/// Accepts NBD clients on `listener` until `stop` says so; each connection on its thread.
pub async fn serve(cache: Arc<Cache>, listener: TcpListener, mut stop: watch::Receiver<bool>) -> Result<()> {
    tracing::info!(listen = %listener.local_addr()?, max = cache.cfg.nbd_max_connections, "cache NBD listening (read-only images)");
    loop {
        let (sock, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
        };
        if OPEN.load(Ordering::Relaxed) >= cache.cfg.nbd_max_connections {
            let n = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::counter!("fleetboot_cache_nbd_refused_total").increment(1);
            if n.is_power_of_two() {
                tracing::warn!(%peer, max = cache.cfg.nbd_max_connections, refused = n, "NBD connection cap reached; connection closed");
            }
            continue;
        }
        let sock = match sock.into_std().and_then(|s| s.set_nonblocking(false).map(|_| s)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "NBD connection unusable");
                continue;
            }
        };
        OPEN.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("fleetboot_cache_nbd_connections").increment(1.0);
        let (cache, handle) = (cache.clone(), Handle::current());
        let spawned = std::thread::Builder::new().name("fleetboot-cache-nbd".into()).spawn(move || {
            if let Err(e) = connection(&cache, handle, sock, peer) {
                tracing::debug!(%peer, error = %e, "NBD connection ended");
            }
            OPEN.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("fleetboot_cache_nbd_connections").decrement(1.0);
        });
        if let Err(e) = spawned {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("fleetboot_cache_nbd_connections").decrement(1.0);
            tracing::warn!(%peer, error = %e, "no thread for an NBD connection");
        }
    }
}

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One connection: the handshake, then requests against the image it opened.
fn connection(cache: &Arc<Cache>, handle: Handle, sock: TcpStream, peer: SocketAddr) -> io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let mut rd = sock.try_clone()?;
    let mut wr = io::BufWriter::with_capacity(256 << 10, sock);
    let mut hs = Handshake::new();
    let mut lookup = Lookup { cache: cache.clone(), handle, peer, opened: None };
    wr.write_all(&hs.take_output())?;
    wr.flush()?;
    let mut buf: Vec<u8> = Vec::new();
    let session = loop {
        let mut chunk = [0u8; 4096];
        let n = rd.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let (used, status) = hs.handle(&buf, &mut lookup);
        buf.drain(..used);
        wr.write_all(&hs.take_output())?;
        wr.flush()?;
        match status {
            Status::Continue => {}
            // No TLS offered: the handshake never asks for it.
            Status::StartTls | Status::Closed(_) => return Ok(()),
            Status::Ready(s) => break s,
        }
    };
    let disk = match lookup.opened.take() {
        Some((name, img)) if name == session.export => img,
        _ => lookup.open(&session.export).map_err(|e| bad_data(format!("{e:?}")))?,
    };
    drop(lookup);
    // A booted system's disk may stay idle for hours.
    rd.set_read_timeout(None)?;
    tracing::info!(%peer, export = session.export, "NBD client reading from the cache");
    let mut machine = Transmission::new(&session, disk.block_size());
    let replies = machine.replies();
    let mut input = InputBuffer::with_leftover(machine.input_capacity(), &buf).ok_or_else(|| bad_data("client sent requests before the handshake ended".into()))?;
    let mut responder = Responder::new();
    let disk: &CachedImage = &disk;
    loop {
        let (used, event) = machine.handle(input.data());
        match event {
            None if used == 0 => {
                // Replies go out before waiting for more requests.
                wr.flush()?;
                let spare = input.spare();
                if spare.is_empty() {
                    return Err(bad_data("input buffer full mid-request".into()));
                }
                match rd.read(spare)? {
                    0 if input.is_empty() && !machine.mid_request() => return Ok(()),
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => input.filled(n),
                }
                continue;
            }
            None => {}
            Some(Event::WriteData { offset, data, .. }) => {
                if let Err(error) = Responder::write_data(disk, offset, data) {
                    machine.write_failed(error);
                }
            }
            Some(Event::Command { cookie, command }) => {
                wr.write_all(responder.execute(disk, replies, cookie, command))?;
                // A long READ leaves in pieces.
                while responder.read_pending() {
                    match responder.continue_read(disk) {
                        Ok(piece) => wr.write_all(piece)?,
                        Err(e) => {
                            wr.flush()?;
                            return Err(bad_data(e.to_string()));
                        }
                    }
                }
            }
            Some(Event::Reject { cookie, command, error, message }) => {
                tracing::debug!(%peer, command, error, message, "NBD request refused");
                wr.write_all(responder.reject(replies, cookie, error, message))?;
            }
            Some(Event::Disconnect) => return wr.flush(),
            Some(Event::Close(e)) => {
                wr.flush()?;
                return Err(bad_data(e.to_string()));
            }
        }
        input.consume(used);
    }
}

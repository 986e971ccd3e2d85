//! The agent: `fleetboot agent stream` joins the image's session, receives it
//! into its cache, and serves the OS (or a VM) a local NBD disk meanwhile.
//!
//! ```text
//!  VM / OS ──NBD──▶ AgentDisk: overlay ── block written? ──▶ overlay file (writes stay here)
//!                     over RemoteImage ── block in cache? ──▶ cache file (from the stream)
//!                                       └─ else ─────────────▶ unicast NBD READ from the server
//!                                                              (stored in the cache as well)
//! ```
//!
//! The disk's size and the image's SHA-256 come from the server's NBD export (its
//! description names the `sha256:`); the multicast group defaults to the one the server
//! derives from that digest ([`crate::net::default_group`]). The local NBD server is
//! `fleetboot_nbd`'s blocking shell ([`blocking`]: a thread per connection, the same
//! handshake and transmission machines and bounds as fleetboot's NBD server); only the
//! disk differs: [`AgentDisk`] is a standard copy-on-write
//! [`fleetboot_nbd::overlay::Overlay`] over a [`RemoteImage`].

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::net::{SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fleetboot_nbd::device::{check_range, BlockDevice, Extents, ZeroMode};
use fleetboot_nbd::blocking;
use fleetboot_nbd::handshake::{ExportInfo, ExportLookup, LookupError};
use fleetboot_nbd::limits::{Admission, Limits};
use fleetboot_nbd::overlay::Overlay;

use crate::cache::Cache;
use crate::nbd_client::NbdClient;
use crate::net;
use crate::receiver::{run_receiver, ReceiveSpec};
use crate::sender::image_id;
use crate::StreamdError;

/// Granularity of the write overlay.
pub const OVERLAY_BLOCK: u32 = 4096;
/// The most a CACHE request fetches from the server at once.
pub const MAX_PREFETCH: u64 = 1 << 20;

/// `fleetboot agent stream` settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server's NBD address (`host:port`).
    pub server: String,
    /// The image (export) name: `NAME` or `NAME:VERSION`.
    pub image: String,
    /// Interface to join the group on (name or address).
    pub interface: String,
    /// Cache directory.
    pub cache: PathBuf,
    /// Where the local NBD disk listens.
    pub nbd_listen: String,
    /// Group and port (default: derived from the image digest).
    pub group: Option<SocketAddrV4>,
    /// The operator's site secret.
    pub site_secret: [u8; 32],
    /// The sender's ed25519 public key: only blocks it signed enter the cache.
    pub sender_key: [u8; 32],
    /// Print progress lines on stderr.
    pub progress: bool,
}

/// Counters of the local disk.
#[derive(Debug, Default)]
pub struct DiskStats {
    /// Read requests.
    pub reads: AtomicU64,
    /// Read requests served entirely from the cache or overlay.
    pub reads_local: AtomicU64,
    /// Read requests that fetched from the server.
    pub reads_fetched: AtomicU64,
    /// Write requests (WRITE and WRITE_ZEROES).
    pub writes: AtomicU64,
}

thread_local! {
    /// Set when this thread fetched from the server since it last cleared it: how a read
    /// of the disk learns whether the layers under the overlay had to go to the network.
    static FETCHED: Cell<bool> = const { Cell::new(false) };
}

/// The image as the agent has it: from the cache once the stream delivered a block, from
/// the server by unicast NBD before that (and what was fetched goes into the cache).
/// Read-only; the overlay above takes the writes.
#[derive(Debug)]
pub struct RemoteImage {
    size: u64,
    server: String,
    export: String,
    client: Mutex<Option<NbdClient>>,
    cache: OnceLock<Arc<Cache>>,
    bytes_fetched: AtomicU64,
}

impl RemoteImage {
    /// An image of `size` bytes whose misses go to `export` on `server` (over `client` when
    /// given, else a connection made on the first miss).
    pub fn new(size: u64, server: &str, export: &str, client: Option<NbdClient>) -> RemoteImage {
        RemoteImage {
            size,
            server: server.to_string(),
            export: export.to_string(),
            client: Mutex::new(client),
            cache: OnceLock::new(),
            bytes_fetched: AtomicU64::new(0),
        }
    }

    /// Attaches the cache (once the stream's block size is known).
    pub fn set_cache(&self, c: Arc<Cache>) {
        let _ = self.cache.set(c);
    }

    /// The cache, once attached.
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.get()
    }

    /// Bytes fetched from the server so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.bytes_fetched.load(Ordering::Relaxed)
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FETCHED.with(|f| f.set(true));
        let mut g = self.client.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if g.is_none() {
                *g = Some(NbdClient::connect(&self.server, &self.export)?);
            }
            match g.as_mut().expect("connected").read(offset, buf) {
                Ok(()) => {
                    self.bytes_fetched
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if attempt == 0 => {
                    tracing::warn!(error = %e, "unicast read failed; reconnecting");
                    *g = None;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    /// Fetches the whole cache blocks under `[offset, offset+len)` into the cache (those
    /// not there yet) and copies the requested bytes to `out` when given.
    fn fetch_blocks(&self, c: &Cache, offset: u64, len: u64, out: Option<&mut [u8]>) -> io::Result<()> {
        let (a, b) = c.block_range(offset, len);
        let bs = c.block_size() as u64;
        let start = a as u64 * bs;
        let end = ((b as u64 + 1) * bs).min(self.size);
        let mut tmp = vec![0u8; (end - start) as usize];
        self.fetch(start, &mut tmp)?;
        c.put_range(start, &tmp)?;
        if let Some(out) = out {
            let o = (offset - start) as usize;
            out.copy_from_slice(&tmp[o..o + out.len()]);
        }
        Ok(())
    }
}

impl BlockDevice for RemoteImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let Some(c) = self.cache.get() else {
            return self.fetch(offset, buf);
        };
        let len = buf.len() as u64;
        if c.has_range(offset, len) {
            return c.read_at(offset, buf);
        }
        // Fetch whole blocks so the cache can keep them.
        self.fetch_blocks(c, offset, len, Some(buf))
    }
    fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    /// Fetches what the stream has not delivered yet into the cache, so the reads that
    /// follow are local: runs of missing blocks, at most [`MAX_PREFETCH`] bytes per request
    /// to the server (CACHE may name gigabytes).
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let Some(c) = self.cache.get() else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let bs = c.block_size() as u64;
        let (first, last) = c.block_range(offset, len);
        let per_fetch = (MAX_PREFETCH / bs).max(1) as u32;
        let mut b = first;
        while b <= last {
            let (present, e) = c.run_end(b, last + 1);
            if !present {
                let mut s = b;
                while s < e {
                    let n = (e - s).min(per_fetch);
                    let start = s as u64 * bs;
                    let end = ((s + n) as u64 * bs).min(self.size);
                    self.fetch_blocks(c, start, end - start, None)?;
                    s += n;
                }
            }
            b = e;
        }
        Ok(())
    }
    /// Received blocks report the cache file's allocation (blocks of zeros are holes);
    /// blocks not received yet are "data" (not known).
    fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
        check_range(self.size, offset, len as u64)?;
        let end = offset + len as u64;
        let Some(c) = self.cache.get() else {
            out.push(len, 0);
            return Ok(());
        };
        let bs = c.block_size() as u64;
        let mut pos = offset;
        while pos < end {
            let (present, e) = c.run_end((pos / bs) as u32, c.blocks());
            let run_end = (e as u64 * bs).min(end);
            while pos < run_end {
                let (status, next) = if present {
                    c.extent(pos, run_end)
                } else {
                    (0, run_end)
                };
                if !out.push((next - pos) as u32, status) {
                    return Ok(());
                }
                pos = next;
            }
        }
        Ok(())
    }
}

/// The agent's local disk: a copy-on-write overlay (writes last as long as the agent runs)
/// over the [`RemoteImage`].
#[derive(Debug)]
pub struct AgentDisk {
    remote: Arc<RemoteImage>,
    overlay: Overlay,
    /// Counters.
    pub stats: DiskStats,
}

impl AgentDisk {
    /// A disk of `size` bytes whose misses go to `export` on `server`; the overlay's data
    /// file is made (and unlinked at once) in `overlay_dir`.
    pub fn new(
        size: u64,
        server: &str,
        export: &str,
        client: Option<NbdClient>,
        overlay_dir: &std::path::Path,
    ) -> io::Result<AgentDisk> {
        let remote = Arc::new(RemoteImage::new(size, server, export, client));
        let overlay = Overlay::standard(remote.clone(), OVERLAY_BLOCK, overlay_dir)?;
        Ok(AgentDisk {
            remote,
            overlay,
            stats: DiskStats::default(),
        })
    }

    /// Attaches the cache (once the stream's block size is known).
    pub fn set_cache(&self, c: Arc<Cache>) {
        self.remote.set_cache(c);
    }

    /// The cache, once attached.
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.remote.cache()
    }

    /// The image under the overlay.
    pub fn remote(&self) -> &Arc<RemoteImage> {
        &self.remote
    }
}

impl BlockDevice for AgentDisk {
    fn size(&self) -> u64 {
        self.overlay.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> u32 {
        OVERLAY_BLOCK
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        FETCHED.with(|f| f.set(false));
        let res = self.overlay.read(offset, buf);
        let fetched = FETCHED.with(|f| f.replace(false));
        res?;
        if fetched {
            self.stats.reads_fetched.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.reads_local.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.overlay.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.overlay.write_zeroes(offset, len, mode)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.overlay.trim(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.overlay.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.overlay.cache(offset, len)
    }
    fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
        self.overlay.block_status(offset, len, out)
    }
}

/// The one export of the agent's local NBD server: the image, over the agent's disk.
struct OneExport {
    name: String,
    info: ExportInfo,
    disk: Arc<AgentDisk>,
}

impl ExportLookup for OneExport {
    fn list(&mut self) -> Result<Vec<(String, String)>, LookupError> {
        Ok(vec![(self.name.clone(), self.info.description.clone())])
    }
    fn lookup(&mut self, name: &str, _go: bool) -> Result<ExportInfo, LookupError> {
        // The default export ("") is the image too.
        if name.is_empty() || name == self.name {
            Ok(self.info.clone())
        } else {
            Err(LookupError::Unknown(format!("no export {name:?}")))
        }
    }
}

impl blocking::Exports for OneExport {
    type Disk = AgentDisk;
    fn disk(&mut self, _export: &str) -> Result<Arc<AgentDisk>, LookupError> {
        Ok(self.disk.clone())
    }
}

/// Connections the local disk serves at once. Its clients are this machine's own (the OS,
/// a VM, `nbdcopy`), all from one address: the cap is for the whole server.
const LOCAL_CONNECTIONS: usize = 32;

/// Serves the local NBD disk on `listener` until `stop`: a blocking thread per connection
/// (`fleetboot_nbd::blocking`), at most [`LOCAL_CONNECTIONS`] at once.
pub fn serve_local(
    listener: TcpListener,
    disk: Arc<AgentDisk>,
    name: String,
    stop: Arc<AtomicBool>,
) {
    let limits = Limits {
        max_connections: LOCAL_CONNECTIONS,
        max_connections_per_client: LOCAL_CONNECTIONS,
        ..Limits::default()
    };
    let admission = Admission::new(&limits);
    let info = ExportInfo {
        size: disk.size(),
        read_only: false,
        // One overlay behind every connection: a flush on one covers them all.
        multi_conn: true,
        description: format!("{name} (fleetboot agent)"),
    };
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                let Some(ticket) = admission.admit_or_count(peer, ("the agent's local connections", "the agent's local connections")) else {
                    continue;
                };
                let _ = s.set_nonblocking(false);
                tracing::info!(%peer, "local NBD client");
                let (name, info, disk) = (name.clone(), info.clone(), disk.clone());
                blocking::spawn("fleetboot-agent-nbd", s, peer, ticket, limits.clone(), move || OneExport { name, info, disk });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What the agent did.
#[derive(Debug, Clone)]
pub struct AgentReport {
    pub sha256: String,
    pub size: u64,
    /// The stream completed and the cache hashes to the image's SHA-256.
    pub verified: bool,
    pub elapsed: Duration,
    pub reads: u64,
    pub reads_local: u64,
    pub reads_fetched: u64,
    pub bytes_fetched: u64,
}

/// Runs the agent: connects to the server's export, starts the local NBD disk, receives
/// the stream, then keeps serving from the cache until `stop`. `on_ready` gets the local
/// address once the disk is listening; `exit_when_complete` returns after the stream.
pub fn run_agent(
    cfg: &AgentConfig,
    stop: Arc<AtomicBool>,
    exit_when_complete: bool,
    on_ready: &mut dyn FnMut(std::net::SocketAddr),
) -> Result<AgentReport, StreamdError> {
    let start = Instant::now();
    let client = NbdClient::connect(&cfg.server, &cfg.image)
        .map_err(|e| StreamdError::Nbd(format!("{} export {}: {e}", cfg.server, cfg.image)))?;
    let sha = client.sha256().ok_or_else(|| {
        StreamdError::Nbd(format!(
            "export {} names no sha256 in its description {:?}",
            cfg.image, client.description
        ))
    })?;
    let size = client.size;
    let id = image_id(&sha)?;
    std::fs::create_dir_all(&cfg.cache).map_err(|e| StreamdError::io(&cfg.cache, e))?;
    let disk = Arc::new(
        AgentDisk::new(size, &cfg.server, &cfg.image, Some(client), &cfg.cache)
            .map_err(|e| StreamdError::io(&cfg.cache, e))?,
    );
    // A cache from an earlier run serves at once only when it is complete and still hashes
    // to the image: its blocks were checked as they arrived, but the file may have changed
    // since (a bad disk, anyone who can write it). A partial one starts over, since its
    // blocks could not be checked before they were served.
    let mut have_complete = false;
    if let Ok(c) = Cache::open(&cfg.cache, &sha, size, 1450) {
        if c.is_complete() && sha256_of(c.path()).is_ok_and(|h| h == sha) {
            disk.set_cache(Arc::new(c));
            have_complete = true;
        } else if c.present() > 0 {
            let why = if c.is_complete() { "its SHA-256 is not the image's" } else { "it is incomplete" };
            tracing::warn!(cache = %c.path().display(), why, "the cache from an earlier run is not used");
            eprintln!("agent: the cache from an earlier run is not used: {why}");
            drop(c);
            Cache::discard(&cfg.cache, &sha).map_err(|e| StreamdError::io(&cfg.cache, e))?;
        }
    }
    let listener = TcpListener::bind(&cfg.nbd_listen)
        .map_err(|e| StreamdError::Socket(format!("NBD listen {}: {e}", cfg.nbd_listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| StreamdError::Socket(e.to_string()))?;
    {
        let (disk, stop, name) = (disk.clone(), stop.clone(), cfg.image.clone());
        std::thread::Builder::new()
            .name("agent-nbd".into())
            .spawn(move || serve_local(listener, disk, name, stop))
            .map_err(|e| StreamdError::Socket(e.to_string()))?;
    }
    tracing::info!(%local, image = %cfg.image, %sha, size, "agent disk ready");
    on_ready(local);
    let mut verified = false;
    if !have_complete {
        let iface =
            net::resolve_iface(&cfg.interface).map_err(|e| StreamdError::Socket(e.to_string()))?;
        let group = cfg.group.unwrap_or(SocketAddrV4::new(
            net::default_group(&id),
            net::DEFAULT_PORT,
        ));
        let mut spec = ReceiveSpec::new(iface, group, id);
        spec.site_secret = cfg.site_secret;
        spec.sender_key = Some(cfg.sender_key);
        spec.image_size = Some(size);
        spec.idle_timeout = Duration::from_secs(3600);
        let d2 = disk.clone();
        let dir = cfg.cache.clone();
        let sha2 = sha.clone();
        let show = cfg.progress;
        let d3 = disk.clone();
        let (_report, cache) = run_receiver(
            &spec,
            &stop,
            &mut |size, bs| {
                let c = Arc::new(Cache::open(&dir, &sha2, size, bs as u32)?);
                d2.set_cache(c.clone());
                Ok(c)
            },
            &mut |p| {
                if show {
                    let st = &d3.stats;
                    eprintln!(
                        "agent: {}/{} blocks ({:.0}%) {:?}; disk reads {} (local {}, fetched {}, {} KiB by unicast)",
                        p.blocks,
                        p.total,
                        if p.total > 0 { 100.0 * p.blocks as f64 / p.total as f64 } else { 0.0 },
                        p.state,
                        st.reads.load(Ordering::Relaxed),
                        st.reads_local.load(Ordering::Relaxed),
                        st.reads_fetched.load(Ordering::Relaxed),
                        d3.remote().bytes_fetched() >> 10,
                    );
                }
            },
        )?;
        if let Some(c) = cache {
            verified = sha256_of(c.path()).is_ok_and(|h| h == sha);
            if !verified {
                return Err(StreamdError::Incomplete(
                    "the received image does not match its SHA-256".into(),
                ));
            }
        }
    } else {
        verified = true;
    }
    let st = &disk.stats;
    let report = || AgentReport {
        sha256: sha.clone(),
        size,
        verified,
        elapsed: start.elapsed(),
        reads: st.reads.load(Ordering::Relaxed),
        reads_local: st.reads_local.load(Ordering::Relaxed),
        reads_fetched: st.reads_fetched.load(Ordering::Relaxed),
        bytes_fetched: disk.remote().bytes_fetched(),
    };
    if cfg.progress {
        eprintln!("agent: image complete and verified; serving from the cache");
    }
    if !exit_when_complete {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    stop.store(true, Ordering::Relaxed);
    Ok(report())
}

fn sha256_of(p: &std::path::Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

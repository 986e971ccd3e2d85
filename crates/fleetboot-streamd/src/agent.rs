//! The agent (SPEC §4.4): `fleetboot agent stream` joins the image's session, receives it
//! into its cache, and serves the OS (or a VM) a local NBD disk meanwhile.
//!
//! ```text
//!  VM / OS ──NBD──▶ local export ── overlay written? ──▶ overlay file (writes stay here)
//!                                 └─ block in cache? ──▶ cache file (from the stream)
//!                                 └─ else ─────────────▶ unicast NBD READ from the server
//!                                                        (stored in the cache as well)
//! ```
//!
//! The disk's size and the image's SHA-256 come from the server's NBD export (its
//! description names the `sha256:`); the multicast group defaults to the one the server
//! derives from that digest ([`crate::net::default_group`]). The local NBD server is a
//! blocking thread per connection around `fleetboot-nbd`'s sans-I/O [`Handshake`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use fleetboot_nbd::handshake::{ExportInfo, ExportLookup, Handshake, LookupError, Status};
use fleetboot_nbd::proto::{
    chunk, cmd, encode_block_status, errno, error_chunk_payload, ChunkHeader, Request, SimpleReply,
    MAX_REQUEST_LEN,
};

use crate::cache::Cache;
use crate::nbd_client::NbdClient;
use crate::net;
use crate::receiver::{run_receiver, ReceiveSpec};
use crate::sender::image_id;
use crate::StreamdError;

/// Granularity of the write overlay.
pub const OVERLAY_BLOCK: u64 = 4096;

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
    /// Bytes fetched by unicast.
    pub bytes_fetched: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
}

/// The agent's local disk: overlay over cache over server.
#[derive(Debug)]
pub struct AgentDisk {
    size: u64,
    server: String,
    export: String,
    client: Mutex<Option<NbdClient>>,
    cache: OnceLock<Arc<Cache>>,
    overlay: File,
    overlay_map: Mutex<Vec<u64>>,
    /// Counters.
    pub stats: DiskStats,
}

impl AgentDisk {
    /// A disk of `size` bytes whose misses go to `export` on `server`; the overlay lives
    /// in `overlay_path` (truncated: writes last as long as the agent runs).
    pub fn new(
        size: u64,
        server: &str,
        export: &str,
        client: Option<NbdClient>,
        overlay_path: &std::path::Path,
    ) -> io::Result<AgentDisk> {
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(overlay_path)?;
        overlay.set_len(size)?;
        let chunks = size.div_ceil(OVERLAY_BLOCK) as usize;
        Ok(AgentDisk {
            size,
            server: server.to_string(),
            export: export.to_string(),
            client: Mutex::new(client),
            cache: OnceLock::new(),
            overlay,
            overlay_map: Mutex::new(vec![0; chunks.div_ceil(64)]),
            stats: DiskStats::default(),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Attaches the cache (once the stream's block size is known).
    pub fn set_cache(&self, c: Arc<Cache>) {
        let _ = self.cache.set(c);
    }

    /// The cache, once attached.
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.get()
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut g = self.client.lock().unwrap();
        for attempt in 0..2 {
            if g.is_none() {
                *g = Some(NbdClient::connect(&self.server, &self.export)?);
            }
            match g.as_mut().expect("connected").read(offset, buf) {
                Ok(()) => {
                    self.stats
                        .bytes_fetched
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

    /// Reads the image (not the overlay): cache, else the server at once.
    fn read_base(&self, offset: u64, buf: &mut [u8], fetched: &mut bool) -> io::Result<()> {
        let Some(c) = self.cache.get() else {
            *fetched = true;
            return self.fetch(offset, buf);
        };
        let len = buf.len() as u64;
        if c.has_range(offset, len) {
            return c.read_at(offset, buf);
        }
        *fetched = true;
        // Fetch whole blocks so the cache can keep them.
        let (a, b) = c.block_range(offset, len);
        let bs = c.block_size() as u64;
        let start = a as u64 * bs;
        let end = ((b as u64 + 1) * bs).min(self.size);
        let mut tmp = vec![0u8; (end - start) as usize];
        self.fetch(start, &mut tmp)?;
        c.put_range(start, &tmp)?;
        let o = (offset - start) as usize;
        buf.copy_from_slice(&tmp[o..o + buf.len()]);
        Ok(())
    }

    fn overlay_has(map: &[u64], chunk: u64) -> bool {
        map[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let mut fetched = false;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let chunk = pos / OVERLAY_BLOCK;
            let in_overlay = {
                let m = self.overlay_map.lock().unwrap();
                Self::overlay_has(&m, chunk)
            };
            // Extend the run while chunks stay on the same side.
            let mut run_end = ((chunk + 1) * OVERLAY_BLOCK).min(end);
            while run_end < end {
                let c = run_end / OVERLAY_BLOCK;
                let m = self.overlay_map.lock().unwrap();
                if Self::overlay_has(&m, c) != in_overlay {
                    break;
                }
                run_end = ((c + 1) * OVERLAY_BLOCK).min(end);
            }
            let b = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if in_overlay {
                self.overlay.read_exact_at(b, pos)?;
            } else {
                self.read_base(pos, b, &mut fetched)?;
            }
            pos = run_end;
        }
        if fetched {
            self.stats.reads_fetched.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.reads_local.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes into the overlay (partial chunks are filled from the image first).
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let end = offset + data.len() as u64;
        let mut map = self.overlay_map.lock().unwrap();
        let mut pos = offset;
        let mut fetched = false;
        while pos < end {
            let chunk = pos / OVERLAY_BLOCK;
            let cstart = chunk * OVERLAY_BLOCK;
            let cend = (cstart + OVERLAY_BLOCK).min(self.size);
            let wend = end.min(cend);
            let part = &data[(pos - offset) as usize..(wend - offset) as usize];
            if !Self::overlay_has(&map, chunk) && (pos != cstart || wend != cend) {
                let mut whole = vec![0u8; (cend - cstart) as usize];
                self.read_base(cstart, &mut whole, &mut fetched)?;
                let o = (pos - cstart) as usize;
                whole[o..o + part.len()].copy_from_slice(part);
                self.overlay.write_all_at(&whole, cstart)?;
            } else {
                self.overlay.write_all_at(part, pos)?;
            }
            map[(chunk / 64) as usize] |= 1 << (chunk % 64);
            pos = wend;
        }
        Ok(())
    }

    /// Writes zeros (WRITE_ZEROES, and TRIM, which may read back as anything).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write(pos, &zeros[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Makes overlay writes durable.
    pub fn flush(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }
}

struct OneExport<'a> {
    name: &'a str,
    info: ExportInfo,
}

impl ExportLookup for OneExport<'_> {
    fn list(&mut self) -> Vec<(String, String)> {
        vec![(self.name.to_string(), self.info.description.clone())]
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

/// Serves one local NBD connection.
fn serve_conn(mut sock: TcpStream, disk: &AgentDisk, name: &str) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let mut hs = Handshake::new();
    let mut lookup = OneExport {
        name,
        info: ExportInfo {
            size: disk.size(),
            read_only: false,
            multi_conn: true,
            description: format!("{name} (fleetboot agent)"),
        },
    };
    sock.write_all(&hs.take_output())?;
    let mut buf: Vec<u8> = Vec::new();
    let session = loop {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let (used, status) = hs.handle(&buf, &mut lookup);
        buf.drain(..used);
        let out = hs.take_output();
        if !out.is_empty() {
            sock.write_all(&out)?;
        }
        match status {
            Status::Continue => {}
            Status::Closed(_) => return Ok(()),
            Status::Ready(n) => break n,
        }
    };
    let mut rd =
        io::BufReader::with_capacity(256 << 10, io::Cursor::new(buf).chain(sock.try_clone()?));
    let mut wr = io::BufWriter::with_capacity(256 << 10, sock);
    let mut hdr = [0u8; Request::SIZE];
    let mut data: Vec<u8> = Vec::new();
    loop {
        wr.flush()?;
        match rd.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = Request::parse(&hdr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            .expect("28 bytes");
        let payload = req
            .payload_len()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            as usize;
        if data.len() < payload.max(req.len.min(MAX_REQUEST_LEN) as usize) {
            data.resize(payload.max(req.len.min(MAX_REQUEST_LEN) as usize), 0);
        }
        if payload > 0 {
            rd.read_exact(&mut data[..payload])?;
        }
        let in_range = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|e| e <= disk.size());
        let simple = |wr: &mut io::BufWriter<TcpStream>, error: u32| {
            wr.write_all(
                &SimpleReply {
                    error,
                    cookie: req.cookie,
                }
                .encode(),
            )
        };
        let res: io::Result<()> = match req.command {
            cmd::READ | cmd::BLOCK_STATUS if !in_range || req.len > MAX_REQUEST_LEN => {
                if session.structured {
                    let h = ChunkHeader {
                        flags: chunk::FLAG_DONE,
                        kind: chunk::ERROR,
                        cookie: req.cookie,
                        len: 6,
                    };
                    wr.write_all(&h.encode())?;
                    wr.write_all(&error_chunk_payload(errno::EINVAL))
                } else {
                    simple(&mut wr, errno::EINVAL)
                }
            }
            cmd::READ => {
                let n = req.len as usize;
                let r = disk.read(req.offset, &mut data[..n]);
                match (r, session.structured) {
                    (Ok(()), false) => {
                        simple(&mut wr, 0)?;
                        wr.write_all(&data[..n])
                    }
                    (Ok(()), true) if n == 0 => wr.write_all(
                        &ChunkHeader {
                            flags: chunk::FLAG_DONE,
                            kind: chunk::NONE,
                            cookie: req.cookie,
                            len: 0,
                        }
                        .encode(),
                    ),
                    (Ok(()), true) => {
                        let h = ChunkHeader {
                            flags: chunk::FLAG_DONE,
                            kind: chunk::OFFSET_DATA,
                            cookie: req.cookie,
                            len: 8 + req.len,
                        };
                        wr.write_all(&h.encode())?;
                        wr.write_all(&req.offset.to_be_bytes())?;
                        wr.write_all(&data[..n])
                    }
                    (Err(e), structured) => {
                        tracing::warn!(error = %e, offset = req.offset, "local disk read failed");
                        if structured {
                            let h = ChunkHeader {
                                flags: chunk::FLAG_DONE,
                                kind: chunk::ERROR,
                                cookie: req.cookie,
                                len: 6,
                            };
                            wr.write_all(&h.encode())?;
                            wr.write_all(&error_chunk_payload(errno::EIO))
                        } else {
                            simple(&mut wr, errno::EIO)
                        }
                    }
                }
            }
            cmd::BLOCK_STATUS => match session.base_allocation {
                Some(ctx) if req.len > 0 => {
                    let mut out = Vec::new();
                    encode_block_status(&mut out, req.cookie, ctx, &[(req.len, 0)]);
                    wr.write_all(&out)
                }
                _ => simple(&mut wr, errno::EINVAL),
            },
            cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM => {
                if !in_range {
                    simple(&mut wr, errno::ENOSPC)
                } else {
                    let r = match req.command {
                        cmd::WRITE => disk.write(req.offset, &data[..payload]),
                        cmd::WRITE_ZEROES => disk.write_zeroes(req.offset, req.len as u64),
                        _ => Ok(()), // TRIM: the data may read back as anything
                    };
                    let r = r.and_then(|_| {
                        if req.flags & fleetboot_nbd::proto::cmdflags::FUA != 0 {
                            disk.flush()
                        } else {
                            Ok(())
                        }
                    });
                    simple(&mut wr, if r.is_ok() { 0 } else { errno::EIO })
                }
            }
            cmd::FLUSH => {
                let r = disk.flush();
                simple(&mut wr, if r.is_ok() { 0 } else { errno::EIO })
            }
            cmd::DISC => {
                wr.flush()?;
                return Ok(());
            }
            _ => simple(&mut wr, errno::EINVAL),
        };
        res?;
    }
}

/// Serves the local NBD disk on `listener` until `stop` (checked between accepts).
pub fn serve_local(
    listener: TcpListener,
    disk: Arc<AgentDisk>,
    name: String,
    stop: Arc<AtomicBool>,
) {
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                let _ = s.set_nonblocking(false);
                let disk = disk.clone();
                let name = name.clone();
                std::thread::spawn(move || {
                    tracing::info!(%peer, "local NBD client");
                    if let Err(e) = serve_conn(s, &disk, &name) {
                        tracing::debug!(%peer, error = %e, "local NBD connection ended");
                    }
                });
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
    let overlay = cfg.cache.join(format!("{sha}.overlay"));
    let disk = Arc::new(
        AgentDisk::new(size, &cfg.server, &cfg.image, Some(client), &overlay)
            .map_err(|e| StreamdError::io(&overlay, e))?,
    );
    // A complete cache from an earlier run serves at once.
    let mut have_complete = false;
    if let Ok(c) = Cache::open(&cfg.cache, &sha, size, 1450) {
        if c.is_complete() {
            disk.set_cache(Arc::new(c));
            have_complete = true;
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
                        st.bytes_fetched.load(Ordering::Relaxed) >> 10,
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
        bytes_fetched: st.bytes_fetched.load(Ordering::Relaxed),
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

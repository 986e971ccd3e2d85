//! The sender shell: one thread per session drives a [`fleetboot_stream::Sender`] over a
//! `fleetboot_net` UDP socket, reading blocks from the image file in the session's order
//! ([`FileSource`]: large `pread`s ahead while the order runs on, one `pread` per block
//! where it jumps). A burst is gathered from `poll_transmit` into one buffer and leaves
//! in `sendmmsg` batches; what arrives is taken in `recvmmsg` batches. The image's block
//! hashes come from [`crate::hashes`]: computed once per image file, not per session.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetboot_net::{Inbox, Outbox};
use fleetboot_stream::{
    BlockSource, Manifest, Mode, Phase, Sender, SenderConfig, SenderStats, Solicitation,
};

use crate::net::{self, Iface, SenderSocketOptions};
use crate::sequence;
use crate::StreamdError;

/// Smallest and largest read-ahead: a run of the stream order that goes on gets twice
/// the previous read, up to the largest; one `pread` per 1450-byte block cost a tenth of
/// the sender's CPU at 400 Mbit/s.
const READ_AHEAD_MIN: usize = 64 << 10;
const READ_AHEAD_MAX: usize = 2 << 20;

/// Reads blocks from an image file, counting how many reads continued where the
/// previous one ended. A read that continues the previous one, or the bytes read ahead,
/// fills a read-ahead buffer (growing from [`READ_AHEAD_MIN`] to [`READ_AHEAD_MAX`] while
/// the run goes on); a block elsewhere (a repair, an FEC symbol's source, a jump of the
/// learned order) is read alone and leaves the buffer as it is.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
    block_size: u64,
    last_end: Option<u64>,
    ahead: Vec<u8>,
    /// File offset of `ahead[0]`.
    ahead_at: u64,
    window: usize,
    /// Block reads.
    pub reads: u64,
    /// Reads that started where the previous one ended.
    pub sequential: u64,
    /// `pread` calls.
    pub file_reads: u64,
}

impl FileSource {
    pub fn new(file: File, size: u64, block_size: u16) -> Self {
        FileSource {
            file,
            size,
            block_size: block_size as u64,
            last_end: None,
            ahead: Vec::new(),
            ahead_at: 0,
            window: READ_AHEAD_MIN,
            reads: 0,
            sequential: 0,
            file_reads: 0,
        }
    }

    fn fill_ahead(&mut self, off: u64) -> io::Result<()> {
        // Whole blocks, so the next read starts where this one ends.
        let window = (self.window as u64 / self.block_size).max(1) * self.block_size;
        let len = (self.size - off).min(window) as usize;
        self.ahead.resize(len, 0);
        self.ahead_at = off;
        self.file_reads += 1;
        let r = self.file.read_exact_at(&mut self.ahead, off);
        if r.is_err() {
            self.ahead.clear();
        }
        r
    }
}

impl BlockSource for FileSource {
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> io::Result<()> {
        let off = index as u64 * self.block_size;
        if off + buf.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block beyond the image",
            ));
        }
        self.reads += 1;
        let continues = self.last_end == Some(off);
        if continues {
            self.sequential += 1;
        }
        let end = off + buf.len() as u64;
        self.last_end = Some(end);
        let ahead_end = self.ahead_at + self.ahead.len() as u64;
        if off < self.ahead_at || end > ahead_end {
            // The block starts in the buffer or right after it: the run goes on.
            if off >= self.ahead_at && off <= ahead_end && !self.ahead.is_empty() {
                self.window = (self.window * 2).min(READ_AHEAD_MAX);
            } else if continues {
                self.window = READ_AHEAD_MIN;
            } else {
                self.file_reads += 1;
                return self.file.read_exact_at(buf, off);
            }
            self.fill_ahead(off)?;
        }
        let at = (off - self.ahead_at) as usize;
        buf.copy_from_slice(&self.ahead[at..at + buf.len()]);
        Ok(())
    }
}

/// One session to serve.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// The image file (a catalog blob).
    pub path: PathBuf,
    /// Its SHA-256 (hex): the first 16 bytes are the announced image id.
    pub sha256: String,
    /// Image size.
    pub size: u64,
    /// Group and port.
    pub group: SocketAddrV4,
    /// Outgoing interface.
    pub iface: Iface,
    /// Multicast TTL.
    pub ttl: u32,
    /// Block size (1450 fills a 1500-byte MTU).
    pub block_size: u16,
    /// Rate cap, bytes per second (datagram bytes).
    pub rate: u64,
    /// Solicitation window.
    pub solicit: Duration,
    /// Receivers to wait for (the window is extended until they have registered).
    pub min_receivers: u32,
    /// Start as soon as this many have registered.
    pub start_at: Option<u32>,
    /// Block order (a learned sequence); empty: natural order.
    pub order: Vec<u32>,
    /// Stream the blocks not in `order` after it.
    pub append_remaining: bool,
    /// Lock-step instead of streaming.
    pub lockstep: bool,
    /// The site secret ([`crate::secret`]); all zeros (unset) is refused by
    /// [`run_session`].
    pub site_secret: [u8; 32],
    /// The sender's ed25519 signing key ([`crate::secret::load_signing_key`]): it signs
    /// the ANNOUNCE and the manifest of block hashes receivers check every block against.
    /// `None` is refused by [`run_session`].
    pub signing_key: Option<fleetboot_stream::SigningKey>,
    /// Receivers' ACK interval in packets.
    pub ack_every: u16,
    /// Socket buffers.
    pub send_buffer: usize,
    pub recv_buffer: usize,
    /// Where the image's block hashes are kept between processes ([`crate::hashes`]);
    /// `None`: in this process's memory only.
    pub hash_cache: Option<PathBuf>,
}

impl SessionSpec {
    /// A session for a catalog image with lab defaults; `group` defaults to
    /// [`net::default_group`] on [`net::DEFAULT_PORT`]. Uses the image's learned sequence
    /// (`images/sequences/<sha256>.seq`) when there is one.
    pub fn for_image(
        catalog: &fleetboot_images::Catalog,
        spec: &str,
        iface: Iface,
        group: Option<SocketAddrV4>,
    ) -> Result<SessionSpec, StreamdError> {
        let v = catalog.resolve(spec)?;
        let id = image_id(&v.sha256)?;
        let block_size: u16 = 1450;
        let order = sequence::load(catalog.root(), &v.sha256)?
            .map(|s| s.to_order(block_size as u32, v.size.div_ceil(block_size as u64) as u32))
            .unwrap_or_default();
        Ok(SessionSpec {
            path: catalog.blob_path(&v.sha256),
            group: group.unwrap_or(SocketAddrV4::new(
                net::default_group(&id),
                net::DEFAULT_PORT,
            )),
            sha256: v.sha256,
            size: v.size,
            iface,
            ttl: 1,
            block_size,
            rate: 50_000_000,
            solicit: Duration::from_secs(5),
            min_receivers: 1,
            start_at: None,
            order,
            append_remaining: true,
            lockstep: false,
            site_secret: [0; 32],
            signing_key: None,
            ack_every: 16,
            send_buffer: 4 << 20,
            recv_buffer: 4 << 20,
            hash_cache: None,
        })
    }
}

/// The image id a session announces: the first 16 bytes of the image's SHA-256.
pub fn image_id(sha256_hex: &str) -> Result<[u8; 16], StreamdError> {
    let b = sha256_hex.as_bytes();
    if b.len() < 32 {
        return Err(StreamdError::Config(format!("bad sha256 {sha256_hex:?}")));
    }
    let mut id = [0u8; 16];
    for (i, x) in id.iter_mut().enumerate() {
        let h = std::str::from_utf8(&b[i * 2..i * 2 + 2]).unwrap_or("zz");
        *x = u8::from_str_radix(h, 16)
            .map_err(|_| StreamdError::Config(format!("bad sha256 {sha256_hex:?}")))?;
    }
    Ok(id)
}

/// What a finished session did.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub session_id: u32,
    pub stats: SenderStats,
    /// From the first DATA to the end.
    pub elapsed: Duration,
    /// Datagram bytes sent (what `stats.bytes_sent` counts).
    pub bytes_sent: u64,
    pub image_size: u64,
    pub receivers: u32,
    pub complete_receivers: u32,
    /// Image block reads, how many of them were sequential, and the `pread` calls they
    /// took.
    pub reads: u64,
    pub sequential_reads: u64,
    pub file_reads: u64,
    /// Where the block hashes came from, and how long getting them took (before the
    /// session opened).
    pub hashes: crate::hashes::HashOrigin,
    pub hashing: Duration,
}

/// Serves one session to its end (or until `stop`). `progress` is called about once a
/// second with the sender.
pub fn run_session(
    spec: &SessionSpec,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Sender),
) -> Result<SessionReport, StreamdError> {
    if spec.site_secret == [0; 32] {
        return Err(StreamdError::Config("the session has no site secret (all zeros)".into()));
    }
    let Some(signing_key) = spec.signing_key.clone() else {
        return Err(StreamdError::Config("the session has no signing key".into()));
    };
    let file = File::open(&spec.path).map_err(|e| StreamdError::io(&spec.path, e))?;
    let hashing = Instant::now();
    let hashes = crate::hashes::shared().get(
        spec.hash_cache.as_deref(),
        crate::hashes::ImageRef {
            file: &file,
            path: &spec.path,
            sha256: &spec.sha256,
            size: spec.size,
            block_size: spec.block_size,
        },
    )?;
    let manifest = Manifest::from_hashes(hashes.hashes, spec.size, spec.block_size, signing_key)
        .map_err(|e| StreamdError::Config(format!("{}: {e}", spec.path.display())))?;
    let hashing = hashing.elapsed();
    tracing::info!(
        image = %spec.sha256,
        blocks = spec.size.div_ceil(spec.block_size as u64),
        hashes = hashes.origin.as_str(),
        ms = hashing.as_millis() as u64,
        "block manifest ready"
    );
    let mut source = FileSource::new(file, spec.size, spec.block_size);
    let sock = net::sender_socket(
        &spec.iface,
        &SenderSocketOptions {
            ttl: spec.ttl,
            send_buffer: spec.send_buffer,
            recv_buffer: spec.recv_buffer,
            port: 0,
        },
    )
    .map_err(|e| StreamdError::Socket(format!("sender socket on {}: {e}", spec.iface.name)))?;
    let session_id = u32::from_be_bytes(net::random_bytes::<4>()) | 1;
    let group = SocketAddr::V4(spec.group);
    let mut cfg = SenderConfig::new(
        session_id,
        image_id(&spec.sha256)?,
        spec.size,
        spec.block_size,
        net::random_bytes::<16>(),
        group,
    );
    cfg.order = spec.order.clone();
    cfg.append_remaining = spec.append_remaining;
    cfg.rate = spec.rate;
    // Enough tokens for ~2 ms: the wait between bursts is short but not free.
    cfg.burst = (spec.rate / 500).max(64 * 1024);
    cfg.solicit = Solicitation {
        window: spec.solicit,
        min_receivers: spec.min_receivers,
        start_at: spec.start_at,
    };
    cfg.mode = if spec.lockstep {
        Mode::LockStep
    } else {
        Mode::Stream
    };
    cfg.site_secret = spec.site_secret;
    cfg.manifest = Some(manifest);
    cfg.ack_every = spec.ack_every;
    let now = Instant::now();
    let mut snd = Sender::new(now, cfg).map_err(|e| StreamdError::Config(e.to_string()))?;
    tracing::info!(
        session = format_args!("{session_id:08x}"),
        group = %spec.group,
        iface = %spec.iface.name,
        image = %spec.sha256,
        size = spec.size,
        rate = spec.rate,
        stream_len = snd.stream_len(),
        "stream session open"
    );
    let mut inbox = Inbox::new(RECV_BATCH, 9216);
    let mut outbox = Outbox::new(SEND_BATCH);
    let mut started: Option<Instant> = None;
    // Where the time goes (`RUST_LOG=fleetboot_streamd=debug`): each phase and repair
    // round as it begins, in ms since the session opened.
    let opened = now;
    let mut seen = (snd.phase(), snd.stats().rounds);
    let mut next_progress = now + Duration::from_secs(1);
    let mut reported = (0u64, 0u64, 0u64);
    while !snd.is_finished() {
        if stop.load(Ordering::Relaxed) {
            return Err(StreamdError::Stopped);
        }
        let now = Instant::now();
        recv_batch(&sock, &mut inbox, |from, b| snd.handle(now, from, b))?;
        if snd.poll_timeout().is_some_and(|t| t <= now) {
            snd.handle_timeout(now);
        }
        while let Some(t) = snd.poll_transmit(now, &mut source, outbox.buffer()) {
            outbox.push(t);
            if outbox.is_full() {
                send_all(&sock, &mut outbox)?;
            }
        }
        send_all(&sock, &mut outbox)?;
        if started.is_none() && snd.phase() != Phase::Soliciting {
            started = Some(now);
        }
        if (snd.phase(), snd.stats().rounds) != seen {
            seen = (snd.phase(), snd.stats().rounds);
            let st = snd.stats();
            tracing::debug!(
                session = format_args!("{session_id:08x}"),
                phase = ?seen.0,
                rounds_planned = seen.1,
                ms = opened.elapsed().as_secs_f64() * 1e3,
                // So far: what the rounds cost.
                fec = st.fec_sent,
                repairs_uc = st.repair_unicast,
                repairs_mc = st.repair_multicast,
                status_parts = st.status_parts,
                control = st.control_sent,
                "session phase"
            );
        }
        if now >= next_progress {
            progress(&snd);
            next_progress = now + Duration::from_secs(1);
            // Once a second at most: what the bounds turned away since the last time.
            let st = snd.stats();
            let dropped = (st.registrations_refused, st.flood_dropped, st.forged);
            if dropped != reported {
                tracing::warn!(
                    session = format_args!("{session_id:08x}"),
                    registrations_refused = st.registrations_refused - reported.0,
                    floods_dropped = st.flood_dropped - reported.1,
                    forged = st.forged - reported.2,
                    receivers_forgotten = st.peers_forgotten,
                    "datagrams refused by the session's bounds or checks"
                );
                reported = dropped;
            }
        }
        if snd.is_finished() {
            // The last LEAVE came in this turn: nothing is left to wait for.
            break;
        }
        let wait = snd
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(100));
        if !wait.is_zero() {
            fleetboot_net::wait_readable(&sock, wait).map_err(|e| StreamdError::Socket(e.to_string()))?;
        }
    }
    progress(&snd);
    if let Some(why) = snd.failure() {
        // The receivers were told the session is over; the image could not be read.
        return Err(StreamdError::io(&spec.path, io::Error::other(why.to_string())));
    }
    let receivers: Vec<_> = snd.receivers().collect();
    let st = snd.stats().clone();
    let report = SessionReport {
        session_id,
        elapsed: started.map_or(Duration::ZERO, |s| s.elapsed()),
        bytes_sent: st.bytes_sent,
        image_size: spec.size,
        receivers: receivers.len() as u32,
        complete_receivers: receivers.iter().filter(|r| r.complete).count() as u32,
        reads: source.reads,
        sequential_reads: source.sequential,
        file_reads: source.file_reads,
        hashes: hashes.origin,
        hashing,
        stats: st,
    };
    tracing::info!(
        session = format_args!("{session_id:08x}"),
        elapsed_ms = report.elapsed.as_millis() as u64,
        bytes = report.bytes_sent,
        ratio = report.bytes_sent as f64 / spec.size as f64,
        receivers = report.receivers,
        complete = report.complete_receivers,
        // Why the others ended incomplete: silent for the dead timeout, or no progress
        // for max_rounds repair rounds.
        dead = report.stats.dead,
        // Declared dead, then heard again and served to the end.
        revived = report.stats.revived,
        given_up = report.stats.given_up,
        rounds = report.stats.rounds,
        fec = report.stats.fec_sent,
        repairs_mc = report.stats.repair_multicast,
        repairs_uc = report.stats.repair_unicast,
        reads = report.reads,
        sequential_reads = report.sequential_reads,
        random_reads = report.reads - report.sequential_reads,
        file_reads = report.file_reads,
        hashes = report.hashes.as_str(),
        hashing_ms = report.hashing.as_millis() as u64,
        "stream session finished"
    );
    Ok(report)
}

/// Datagrams taken per turn of a loop (one `recvmmsg`): a peer that cannot keep up must
/// still get to drain its cache and send its ACKs between batches, or it falls silent
/// and is declared dead while its socket buffer is full.
pub(crate) const RECV_BATCH: usize = 32;

/// Datagrams gathered before a `sendmmsg` (a burst of the token bucket is ~2 ms of the
/// rate cap: 64 datagrams at 50 MB/s).
pub(crate) const SEND_BATCH: usize = 64;

/// Takes one batch of the datagrams waiting on `sock` (at most [`RECV_BATCH`]).
pub(crate) fn recv_batch(
    sock: &UdpSocket,
    inbox: &mut Inbox,
    mut f: impl FnMut(SocketAddr, &[u8]),
) -> Result<(), StreamdError> {
    loop {
        match inbox.recv(sock) {
            Ok(_) => {
                for (m, b) in inbox.iter() {
                    f(m.source, b);
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // ICMP errors from earlier sends (a receiver went away) surface here: ignore.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(StreamdError::Socket(format!("recv: {e}"))),
        }
    }
}

/// Sends what the outbox holds, waiting briefly whenever the socket buffer is full. A
/// datagram the kernel refuses (a receiver's port gone, reported by ICMP) is dropped:
/// UDP is best effort and the session goes on.
pub(crate) fn send_all(sock: &UdpSocket, outbox: &mut Outbox) -> Result<(), StreamdError> {
    let mut tries = 0;
    while !outbox.is_empty() {
        match outbox.send(sock) {
            Ok(r) => {
                if let Some(e) = r.last_error.filter(|e| e.kind() != io::ErrorKind::ConnectionRefused) {
                    tracing::debug!(error = %e, failed = r.failed, "datagrams refused by the kernel");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && tries < 1000 => {
                tries += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                outbox.clear();
                return Err(StreamdError::Socket(format!("send: {e}")));
            }
        }
    }
    Ok(())
}

/// Several sessions at once, one thread each (each on its own group and port).
pub fn serve_sessions(
    specs: Vec<SessionSpec>,
    stop: Arc<AtomicBool>,
) -> Vec<Result<SessionReport, StreamdError>> {
    let handles: Vec<_> = specs
        .into_iter()
        .map(|s| {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("stream-{}", s.group))
                .spawn(move || run_session(&s, &stop, &mut |_| {}))
                .expect("spawning a session thread")
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(StreamdError::Socket("session thread panicked".into())))
        })
        .collect()
}

/// `fleetboot stream serve`: serves the config's sessions; with `repeat`, opens a new
/// session for an image each time its previous one ends, until `stop`.
pub fn serve_config(
    cfg: &crate::config::StreamSessions,
    stop: Arc<AtomicBool>,
) -> Vec<Result<SessionReport, StreamdError>> {
    let mut all = Vec::new();
    loop {
        let reports = serve_sessions(cfg.sessions.clone(), stop.clone());
        for r in &reports {
            match r {
                Ok(r) => tracing::info!(
                    session = format_args!("{:08x}", r.session_id),
                    receivers = r.receivers,
                    complete = r.complete_receivers,
                    ratio = r.bytes_sent as f64 / r.image_size as f64,
                    "session report"
                ),
                Err(StreamdError::Stopped) => {}
                Err(e) => tracing::error!(error = %e, "session failed"),
            }
        }
        all.extend(reports);
        if !cfg.repeat || stop.load(Ordering::Relaxed) {
            return all;
        }
        // A session whose socket cannot even open would spin: pause between rounds.
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetboot_stream::BlockSource;

    #[test]
    fn read_ahead_gives_every_block_its_bytes_with_few_preads() {
        let t = tempfile::tempdir().unwrap();
        let bs = 1450usize;
        let data: Vec<u8> = (0..bs * 3000 + 77).map(|i| (i * 31 + i / 1450) as u8).collect();
        let p = t.path().join("img");
        std::fs::write(&p, &data).unwrap();
        let blocks = data.len().div_ceil(bs) as u32;
        let mut src = FileSource::new(File::open(&p).unwrap(), data.len() as u64, bs as u16);
        let mut buf = vec![0u8; bs];
        let mut check = |src: &mut FileSource, b: u32| {
            let start = b as usize * bs;
            let len = (data.len() - start).min(bs);
            src.read_block(b, &mut buf[..len]).unwrap();
            assert_eq!(&buf[..len], &data[start..start + len], "block {b}");
        };
        // The stream in order, with a source block of an earlier group read now and then
        // (FEC) and a jump (a learned order): all right, and far fewer preads than blocks.
        for b in 0..blocks {
            check(&mut src, b);
            if b % 200 == 199 {
                check(&mut src, b - 150);
            }
            if b == 1000 {
                check(&mut src, 2500);
                check(&mut src, 2501);
            }
        }
        assert_eq!(src.reads, blocks as u64 + 15 + 2);
        // 4.3 MB at up to 2 MiB per pread, plus the first block, the 15 behind the buffer,
        // the jump and its run (64 KiB).
        assert!(src.file_reads <= 30, "{} preads", src.file_reads);
        // Repairs after the pass: one block each, anywhere.
        for b in [7, 2999, 3000, 1, 1500] {
            check(&mut src, b);
        }
        assert!(src.read_block(blocks, &mut buf).is_err());
    }
}

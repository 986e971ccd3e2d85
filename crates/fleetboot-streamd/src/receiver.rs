//! The receiver shell: joins a group on one interface, learns the sender from its
//! ANNOUNCE, drives a [`fleetboot_stream::Receiver`] and drains its data cache into a
//! [`Cache`] (sparse file + bitmap) as fast as the disk takes it.
//!
//! With [`ReceiveSpec::hash_image`] it also computes the whole image's SHA-256 while the
//! image arrives ([`ImageHasher`]): the cache file is read back and hashed in order as
//! far as every block is present, so the check at the end costs the last few MiB, not a
//! second pass over the image after the session.
//!
//! The cache is made durable ([`Cache::persist`]: data synced, then its map) once the
//! image is complete. So that this does not write the whole image out at the end (half
//! a second for 128 MiB on a virtual disk), a writeback thread ([`Writeback`]) syncs
//! the file's data every [`ReceiveSpec::flush_every`] while blocks arrive: the disk
//! writes as the network delivers, and the last sync has only the last moments' blocks.

use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetboot_stream::{Receiver, ReceiverConfig, ReceiverState, ReceiverStats};

use fleetboot_net::{Inbox, Outbox};
use sha2::{Digest, Sha256};

use crate::cache::{Cache, CacheSink};
use crate::net::{self, Iface};
use crate::sender::{recv_batch, send_all, RECV_BATCH};
use crate::StreamdError;

/// What to receive.
#[derive(Debug, Clone)]
pub struct ReceiveSpec {
    pub iface: Iface,
    pub group: SocketAddrV4,
    /// The image wanted (first 16 bytes of its SHA-256).
    pub image_id: [u8; 16],
    /// The site secret ([`crate::secret`]); all zeros (unset) is refused by
    /// [`run_receiver`].
    pub site_secret: [u8; 32],
    /// The sender's ed25519 public key ([`crate::secret::resolve_public_key`]): only
    /// what it signed is accepted. `None` is refused by [`run_receiver`].
    pub sender_key: Option<[u8; 32]>,
    /// Data cache slots (blocks buffered between the socket and the disk).
    pub cache_slots: u32,
    pub recv_buffer: usize,
    /// Once complete, wait this long for the sender's closing DONE before leaving.
    pub linger: Duration,
    /// Give up when nothing at all is heard for this long (no sender).
    pub idle_timeout: Duration,
    /// The image's size when known (an ANNOUNCE of another size is refused).
    pub image_size: Option<u64>,
    /// Compute the SHA-256 of the whole cache file as it fills ([`ReceiveReport::sha256`]).
    pub hash_image: bool,
    /// Sync the cache file's data this often while receiving ([`Writeback`]); `None`:
    /// only when complete.
    pub flush_every: Option<Duration>,
}

impl ReceiveSpec {
    pub fn new(iface: Iface, group: SocketAddrV4, image_id: [u8; 16]) -> Self {
        ReceiveSpec {
            iface,
            group,
            image_id,
            site_secret: [0; 32],
            sender_key: None,
            cache_slots: 8192,
            recv_buffer: 16 << 20,
            linger: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            image_size: None,
            hash_image: false,
            flush_every: Some(Duration::from_millis(100)),
        }
    }
}

/// What a receiver did.
#[derive(Debug, Clone)]
pub struct ReceiveReport {
    pub session: Option<u32>,
    pub state: ReceiverState,
    pub stats: ReceiverStats,
    /// From the first datagram of the session to complete.
    pub elapsed: Duration,
    pub blocks: u32,
    pub bytes_received: u64,
    /// With [`ReceiveSpec::hash_image`], once complete: the SHA-256 (hex) of the cache
    /// file, read back from it.
    pub sha256: Option<String>,
}

/// A thread that syncs a file's data (`fdatasync`, through a handle of its own) every
/// interval until dropped. The receive loop never waits for it; dropping it does not
/// wait either (a sync under way finishes on its own).
#[derive(Debug)]
pub struct Writeback {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Writeback {
    pub fn start(path: &std::path::Path, every: Duration) -> io::Result<Writeback> {
        let file = std::fs::File::open(path)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new().name("cache-writeback".into()).spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if let Err(e) = file.sync_data() {
                    tracing::debug!(error = %e, "syncing the cache while receiving");
                    return;
                }
            }
        })?;
        Ok(Writeback { _stop: stop })
    }
}

/// Once every block is in: the cache's last sync and the image hash's rest, on a thread
/// of their own (side by side: one waits on the disk, the other on the CPU).
struct Finishing(std::thread::JoinHandle<(io::Result<Option<String>>, f64, f64)>);

impl Finishing {
    fn start(cache: Arc<Cache>, hasher: Option<ImageHasher>) -> Result<Finishing, StreamdError> {
        let spawned = std::thread::Builder::new().name("cache-finish".into()).spawn(move || {
            let t = Instant::now();
            std::thread::scope(|s| {
                let sync = s.spawn(|| {
                    let _ = cache.persist();
                    t.elapsed()
                });
                let hashed = hasher.map(|mut h| h.finish(&cache)).transpose().map(Option::flatten);
                let hash_ms = t.elapsed().as_secs_f64() * 1e3;
                let persist_ms = sync.join().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
                (hashed, hash_ms, persist_ms)
            })
        });
        spawned
            .map(Finishing)
            .map_err(|e| StreamdError::Socket(format!("starting the cache's last sync and hash: {e}")))
    }

    /// The image's SHA-256 (`None` without a hasher), and ms spent hashing and syncing.
    fn join(self) -> (io::Result<Option<String>>, f64, f64) {
        self.0
            .join()
            .unwrap_or_else(|_| (Err(io::Error::other("the hashing thread panicked")), f64::NAN, f64::NAN))
    }
}

/// Read-back bytes hashed per turn of the receive loop at most, and at least unless the
/// image's end is reached (large reads; the loop's other work goes on between them).
const HASH_STEP_MAX: u64 = 4 << 20;
const HASH_STEP_MIN: u64 = 1 << 20;

/// The SHA-256 of a [`Cache`]'s file, computed from its start as far as every block is
/// present: each step reads back (from the page cache, where the blocks were just
/// written) and hashes the next run of present blocks. What it hashed is what the file
/// holds, as a hash of the whole file after the session would: a present block is never
/// written again.
#[derive(Debug, Default)]
pub struct ImageHasher {
    hash: Sha256,
    /// Bytes hashed so far (always a block boundary, or the image's end).
    done: u64,
    buf: Vec<u8>,
}

impl ImageHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hashes on from where it stopped: up to `max` bytes of present blocks, and none
    /// unless at least `min` bytes (or the rest of the image) are ready. Returns whether
    /// it stopped at `max` (more may be ready: call again soon).
    pub fn advance(&mut self, cache: &Cache, min: u64, max: u64) -> io::Result<bool> {
        let bs = cache.block_size() as u64;
        let size = cache.size();
        while self.done < size {
            let first = (self.done / bs) as u32;
            let limit = self.done.saturating_add(max).div_ceil(bs).min(cache.blocks() as u64) as u32;
            let (present, end) = cache.run_end(first, limit);
            if !present {
                return Ok(false);
            }
            let end = (end as u64 * bs).min(size);
            let len = end - self.done;
            if len < min && end < size {
                return Ok(false);
            }
            self.buf.resize(len as usize, 0);
            cache.read_at(self.done, &mut self.buf)?;
            self.hash.update(&self.buf);
            self.done = end;
            if len >= max {
                return Ok(self.done < size);
            }
        }
        Ok(false)
    }

    /// The whole file's SHA-256 (hex), hashing what is left; `None` while blocks are
    /// missing.
    pub fn finish(&mut self, cache: &Cache) -> io::Result<Option<String>> {
        // In steps that stay in the CPU's cache: one read of the whole rest would fault
        // in a buffer the size of the image first (a third more time at 128 MiB).
        while self.advance(cache, 0, HASH_STEP_MAX)? {}
        if self.done < cache.size() {
            return Ok(None);
        }
        let d = std::mem::take(&mut self.hash).finalize();
        Ok(Some(d.iter().map(|b| format!("{b:02x}")).collect()))
    }
}

/// Progress passed to the caller's callback about once a second.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub blocks: u32,
    pub total: u32,
    pub state: ReceiverState,
}

/// Receives one image. `open_cache(size, block_size)` is called once the session's
/// ANNOUNCE is heard. Returns when complete (and the sender closed, or `linger` passed),
/// when the session failed, or on `stop`.
pub fn run_receiver(
    spec: &ReceiveSpec,
    stop: &AtomicBool,
    open_cache: &mut dyn FnMut(u64, u16) -> std::io::Result<Arc<Cache>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(ReceiveReport, Option<Arc<Cache>>), StreamdError> {
    if spec.site_secret == [0; 32] {
        return Err(StreamdError::Config("the receiver has no site secret (all zeros)".into()));
    }
    if spec.sender_key.is_none() {
        return Err(StreamdError::Config(
            "the receiver has no sender public key: it could not tell the sender's blocks from forged ones".into(),
        ));
    }
    let sock = net::receiver_socket(&spec.iface, spec.group, spec.recv_buffer).map_err(|e| {
        StreamdError::Socket(format!(
            "joining {} on {}: {e}",
            spec.group, spec.iface.name
        ))
    })?;
    let mut cfg = ReceiverConfig::new(spec.image_id, u64::from_be_bytes(net::random_bytes()));
    cfg.cache_slots = spec.cache_slots;
    cfg.site_secret = spec.site_secret;
    cfg.sender_key = spec.sender_key;
    cfg.image_size = spec.image_size;
    let start = Instant::now();
    let mut rx = Receiver::new(start, cfg);
    let mut cache: Option<Arc<Cache>> = None;
    let mut inbox = Inbox::new(RECV_BATCH, 9216);
    let mut outbox = Outbox::new(16);
    let mut first: Option<Instant> = None;
    let mut done_at: Option<Instant> = None;
    let mut complete_at: Option<Instant> = None;
    let mut last_heard = start;
    let mut next_progress = start + Duration::from_secs(1);
    let mut bytes = 0u64;
    let mut forgeries_logged = (0u64, 0u64, 0u64);
    let mut early_dropped_logged = 0u64;
    let mut hasher = spec.hash_image.then(ImageHasher::new);
    // The hasher has blocks ready beyond its last step: the loop does not sleep (a
    // receiver whose first gap was just repaired catches up between repair rounds,
    // not after the last).
    let mut hash_more = false;
    let mut writeback: Option<Writeback> = None;
    let mut finishing: Option<Finishing> = None;
    let mut sha256 = None;
    let hash_err = |e: io::Error| StreamdError::Socket(format!("reading the cache back: {e}"));
    tracing::info!(group = %spec.group, iface = %spec.iface.name, "waiting for the session");
    loop {
        if stop.load(Ordering::Relaxed) {
            rx.leave();
        }
        let now = Instant::now();
        let mut heard = false;
        recv_batch(&sock, &mut inbox, |from, b| {
            heard = true;
            bytes += b.len() as u64;
            rx.handle(now, from, b);
        })?;
        if heard {
            last_heard = now;
        }
        if cache.is_none() {
            if let Some(a) = rx.announce() {
                let c = open_cache(a.image_size, a.block_size)
                    .map_err(|e| StreamdError::Socket(format!("opening the cache: {e}")))?;
                first = Some(now);
                if let Some(every) = spec.flush_every {
                    writeback = Writeback::start(c.path(), every)
                        .map_err(|e| tracing::warn!(error = %e, "no writeback while receiving"))
                        .ok();
                }
                tracing::info!(
                    sender = ?rx.sender_addr(),
                    size = a.image_size,
                    block_size = a.block_size,
                    blocks = a.block_count,
                    "session found"
                );
                cache = Some(c);
            }
        }
        if let Some(c) = &cache {
            rx.drain(now, &mut CacheSink(c), usize::MAX)
                .map_err(|e| StreamdError::Socket(format!("writing the cache: {e}")))?;
            if let Some(h) = hasher.as_mut() {
                hash_more = h.advance(c, HASH_STEP_MIN, HASH_STEP_MAX).map_err(hash_err)?;
            }
        }
        if rx.poll_timeout().is_some_and(|t| t <= now) {
            rx.handle_timeout(now);
        }
        while let Some(t) = rx.poll_transmit(now, outbox.buffer()) {
            outbox.push(t);
        }
        send_all(&sock, &mut outbox)?;
        if rx.is_complete() && complete_at.is_none() {
            complete_at = Some(now);
            // The last sync is persist's own.
            drop(writeback.take());
            if let Some(c) = &cache {
                // The sync and the rest of the hash (all of it after an early gap) run
                // beside the loop, which meanwhile answers the sender's closing DONE:
                // the session ends for everyone while this receiver still checks.
                finishing = Some(Finishing::start(c.clone(), hasher.take())?);
                hash_more = false;
            }
        }
        if now >= next_progress {
            // Someone with the site secret (another receiver) is sending what the sender
            // did not sign: said once a second at most, with what was dropped so far.
            let st = rx.stats();
            let refused = (st.bad_signature, st.bad_block, st.unverified);
            if refused.0 + refused.1 > forgeries_logged.0 + forgeries_logged.1 {
                tracing::warn!(
                    bad_signature = st.bad_signature,
                    bad_block = st.bad_block,
                    unverified = st.unverified,
                    "dropping datagrams the sender did not sign"
                );
            }
            forgeries_logged = refused;
            if st.early_dropped > early_dropped_logged {
                tracing::warn!(
                    early_dropped = st.early_dropped,
                    early_kept = st.early_kept,
                    limit_bytes = fleetboot_stream::receiver::MAX_EARLY_BYTES,
                    "datagrams came before the session key with its memory full: dropped, they come again with the repairs"
                );
                early_dropped_logged = st.early_dropped;
            }
            progress(Progress {
                blocks: rx.blocks_received(),
                total: rx.announce().map_or(0, |a| a.stream_len),
                state: rx.state(),
            });
            next_progress = now + Duration::from_secs(1);
        }
        let finished = match rx.state() {
            ReceiverState::Finished | ReceiverState::Failed => true,
            ReceiverState::Complete => complete_at.is_some_and(|c| now >= c + spec.linger),
            _ => false,
        };
        let stopped = stop.load(Ordering::Relaxed);
        if finished || stopped || now >= last_heard + spec.idle_timeout {
            // Flush a LEAVE (or the last STATUS) before going.
            done_at.get_or_insert(now);
            break;
        }
        let wait = rx
            .poll_timeout()
            .map_or(Duration::from_millis(50), |t| {
                t.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(50));
        if !hash_more {
            fleetboot_net::wait_readable(&sock, wait.max(Duration::from_micros(100)))
                .map_err(|e| StreamdError::Socket(e.to_string()))?;
        }
    }
    if let Some(f) = finishing.take() {
        let (hashed, hash_ms, persist_ms) = f.join();
        sha256 = hashed.map_err(hash_err)?;
        tracing::debug!(
            ms = first.zip(complete_at).map_or(0.0, |(f, c)| (c - f).as_secs_f64() * 1e3),
            persist_ms,
            hash_ms,
            image_hashed = sha256.is_some(),
            "complete"
        );
    } else if let Some(c) = &cache {
        let _ = c.persist();
    }
    let report = ReceiveReport {
        session: None,
        state: rx.state(),
        stats: rx.stats().clone(),
        elapsed: match (first, complete_at) {
            (Some(f), Some(c)) => c - f,
            (Some(f), None) => f.elapsed(),
            _ => Duration::ZERO,
        },
        blocks: rx.blocks_received(),
        bytes_received: bytes,
        sha256,
    };
    progress(Progress {
        blocks: report.blocks,
        total: rx.announce().map_or(0, |a| a.stream_len),
        state: report.state,
    });
    if !rx.is_complete() {
        return Err(StreamdError::Incomplete(format!(
            "{:?} with {} of {} blocks",
            report.state,
            report.blocks,
            rx.announce().map_or(0, |a| a.stream_len)
        )));
    }
    Ok((report, cache))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks land out of order, with a gap that is filled last (a repair): the hasher
    /// goes as far as every block is present, in large steps, and ends with the SHA-256
    /// of the whole file, zero blocks (holes) and the short last block included.
    #[test]
    fn the_image_hash_follows_the_blocks_as_they_land() {
        let t = tempfile::tempdir().unwrap();
        let bs = 1000usize;
        let mut img: Vec<u8> = (0..bs * 3000 + 123).map(|i| (i * 7 + i / 999) as u8).collect();
        img[bs * 10..bs * 12].fill(0);
        let want: String = Sha256::digest(&img).iter().map(|b| format!("{b:02x}")).collect();
        let cache = Cache::open(t.path(), "img", img.len() as u64, bs as u32).unwrap();
        let blocks = img.len().div_ceil(bs) as u32;
        let put = |b: u32| {
            let s = b as usize * bs;
            cache.put_block(b, &img[s..(s + bs).min(img.len())]).unwrap();
        };
        let mut h = ImageHasher::new();
        // Blocks 0..1500 but 700: hashed up to 700 only, 64 KiB at a time at least.
        for b in (0..1500).filter(|&b| b != 700) {
            put(b);
            h.advance(&cache, 64 << 10, 256 << 10).unwrap();
        }
        let gap = 700 * bs as u64;
        assert!(h.done <= gap && h.done + (64 << 10) > gap, "hashed {} bytes", h.done);
        assert_eq!(h.done % bs as u64, 0);
        assert_eq!(h.finish(&cache).unwrap(), None);
        put(700);
        // One step: 256 KiB, to the next block boundary.
        let before = h.done;
        h.advance(&cache, 64 << 10, 256 << 10).unwrap();
        assert!((256 << 10..(256 << 10) + bs as u64).contains(&(h.done - before)), "{}", h.done - before);
        for b in 1500..blocks {
            put(b);
        }
        assert_eq!(h.finish(&cache).unwrap(), Some(want));
    }
}

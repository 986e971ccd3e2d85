//! The receiver shell: joins a group on one interface, learns the sender from its
//! ANNOUNCE, drives a [`fleetboot_stream::Receiver`] and drains its data cache into a
//! [`Cache`] (sparse file + bitmap) as fast as the disk takes it.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetboot_stream::{Receiver, ReceiverConfig, ReceiverState, ReceiverStats};

use fleetboot_net::{Inbox, Outbox};

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
            if let Some(c) = &cache {
                let _ = c.persist();
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
        fleetboot_net::wait_readable(&sock, wait.max(Duration::from_micros(100)))
            .map_err(|e| StreamdError::Socket(e.to_string()))?;
    }
    if let Some(c) = &cache {
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

//! Stream mode: after its DHCP lease, a client takes the boot image from fleetboot's
//! synchronized multicast stream (`fleetboot-streamd send`, `fleetboot stream serve`) with
//! the same sans-I/O receiver every streaming host runs ([`fleetboot_stream::Receiver`]),
//! from its own leased address: a hundred emulated clients are a hundred receivers to the
//! sender, each registered, acknowledged and repaired on its own.
//!
//! Each client has two sockets, both made in [`crate::net`]: the group's
//! ([`crate::net::group_socket`]: bound to the group and port, shared with the other
//! clients of this host, each of which gets its own copy of every datagram) and a unicast
//! one on its leased address ([`crate::net::client_udp`]), from which it registers,
//! acknowledges and asks for repairs, and on which the sender's REGISTERED and unicast
//! repairs arrive. One blocking thread per client.
//!
//! The blocks land in memory (FEC decoding reads a group's blocks back); once every block
//! is in, the image is hashed whole and compared with the SHA-256 the client was given,
//! and the memory is freed at once.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetboot_net::{Inbox, Outbox, Poller};
use fleetboot_stream::{BlockSink, Receiver, ReceiverConfig, ReceiverState};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What every client of a stream-mode run receives.
#[derive(Clone, PartialEq, Eq)]
pub struct StreamBoot {
    /// The session's group and port.
    pub group: SocketAddrV4,
    /// The image's SHA-256: its first 16 bytes name the image to the sender, the whole
    /// of it is checked once every block is in.
    pub sha256: [u8; 32],
    /// The site secret the sender was given (never all zeros).
    pub site_secret: [u8; 32],
    /// The sender's ed25519 public key: only what it signed is taken.
    pub sender_key: [u8; 32],
    /// Once complete, wait this long for the sender's closing DONE before leaving.
    pub linger: Duration,
}

impl std::fmt::Debug for StreamBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The site secret stays out of logs.
        f.debug_struct("StreamBoot")
            .field("group", &self.group)
            .field("sha256", &crate::sink::hex(&self.sha256))
            .field("linger", &self.linger)
            .finish_non_exhaustive()
    }
}

impl StreamBoot {
    pub fn new(group: SocketAddrV4, sha256: [u8; 32], site_secret: [u8; 32], sender_key: [u8; 32]) -> StreamBoot {
        StreamBoot {
            group,
            sha256,
            site_secret,
            sender_key,
            linger: Duration::from_secs(2),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.group.ip().is_multicast() {
            return Err(format!("{} is not a multicast group", self.group.ip()));
        }
        if self.site_secret == [0; 32] {
            return Err("the site secret is all zeros (unset)".into());
        }
        Ok(())
    }
}

/// One client's stream: when it happened (wall clock, so clients of several emulator
/// processes can be lined up) and what the receiver counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StreamReport {
    /// The first ANNOUNCE of the image heard, Unix time in milliseconds.
    pub announced_unix_ms: Option<f64>,
    /// Every block in, Unix time in milliseconds.
    pub complete_unix_ms: Option<f64>,
    /// The ANNOUNCE to complete.
    pub elapsed_ms: Option<f64>,
    pub image_size: u64,
    pub blocks: u32,
    /// Datagrams and their bytes (UDP payload) taken from both sockets.
    pub datagrams_received: u64,
    pub bytes_received: u64,
    pub data_accepted: u64,
    pub repairs_accepted: u64,
    pub fec_recovered: u64,
    pub duplicates: u64,
    pub cache_overflow: u64,
    /// Datagrams refused (bad tag, signature or block hash): 0 on a lab network.
    pub refused: u64,
    /// `Finished` (the sender closed the session after this client was complete),
    /// `Complete`, or where it stopped.
    pub state: String,
}

/// A received image.
pub(crate) struct Received {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// The image in memory, block by block.
struct MemoryImage {
    data: Vec<u8>,
    block_size: usize,
}

impl BlockSink for MemoryImage {
    fn write_block(&mut self, index: u32, data: &[u8]) -> std::io::Result<()> {
        let at = index as usize * self.block_size;
        let dst = self
            .data
            .get_mut(at..at + data.len())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "block past the image's end"))?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let at = index as usize * self.block_size;
        let src = self
            .data
            .get(at..at + buf.len())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "block past the image's end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Each client's group socket buffer: about 0.7 s of a 100 Mbit/s stream.
const RECV_BUFFER: usize = 8 << 20;

/// While datagrams flow, a client takes them at most this often (each turn empties its
/// sockets in `recvmmsg` batches): a hundred clients on two cores would otherwise wake
/// for every datagram or two, and spend the cores switching between threads. At 1 ms a
/// hundred clients of a 20 Mbit/s stream fell behind it (the slowest held the sender's
/// window: 1.23-1.50x one client's time); at 4 ms each turn takes ~7 datagrams, and the
/// socket's buffer holds far more than 4 ms at any rate.
const COALESCE: Duration = Duration::from_millis(4);

/// The largest image a client holds in memory.
pub const MAX_IMAGE: u64 = 1 << 30;

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Receives the image from `local` until it is complete (and the sender closed the
/// session, or `linger` passed), the session fails, `deadline` passes or `cancel` is set.
/// `report` is called with what the receiver counted about once a second and at the end.
pub(crate) fn receive(
    spec: &StreamBoot,
    local: std::net::Ipv4Addr,
    deadline: Instant,
    cancel: &AtomicBool,
    report: &mut dyn FnMut(&StreamReport),
) -> Result<Received, String> {
    spec.validate()?;
    let group = crate::net::stream_group_socket(spec.group, local, RECV_BUFFER)
        .map_err(|e| format!("joining {}: {e}", spec.group))?;
    let unicast = crate::net::client_udp(local, "stream receiver").map_err(|e| format!("binding {local}: {e}"))?;
    let mut image_id = [0u8; 16];
    image_id.copy_from_slice(&spec.sha256[..16]);
    let mut nonce = [0u8; 8];
    Sha256::digest([&local.octets()[..], &unix_ms().to_bits().to_be_bytes()].concat())
        .iter()
        .zip(nonce.iter_mut())
        .for_each(|(s, n)| *n = *s);
    let mut cfg = ReceiverConfig::new(image_id, u64::from_be_bytes(nonce));
    // A second of the stream at a hundred megabits: the socket's buffer is behind it.
    cfg.cache_slots = 8192;
    cfg.site_secret = spec.site_secret;
    cfg.sender_key = Some(spec.sender_key);
    cfg.max_image_size = MAX_IMAGE;
    let start = Instant::now();
    let mut rx = Receiver::new(start, cfg);
    let mut image: Option<MemoryImage> = None;
    let mut inbox = Inbox::new(64, 9216);
    let mut outbox = Outbox::new(16);
    let mut poller = Poller::new();
    let mut st = StreamReport::default();
    let mut announced: Option<Instant> = None;
    let mut complete_at: Option<Instant> = None;
    let mut next_report = start + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        // Each socket emptied (a bounded number of batches) every turn; the receiver's
        // cache is drained after each batch.
        let mut heard = false;
        // The unicast socket first: REGISTERED (the session key) comes on it, and the
        // group's DATA that arrived in the same turn can only be checked with that key.
        for sock in [&unicast, &group] {
            for _ in 0..64 {
                match inbox.recv(sock) {
                    Ok(_) => {
                        for (m, b) in inbox.iter() {
                            st.datagrams_received += 1;
                            st.bytes_received += b.len() as u64;
                            rx.handle(now, m.source, b);
                        }
                        heard = true;
                        if let Some(img) = image.as_mut() {
                            rx.drain(now, img, usize::MAX).map_err(|e| format!("storing a block: {e}"))?;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                // An earlier datagram to the sender was refused (ICMP).
                                | std::io::ErrorKind::ConnectionRefused
                        ) => break,
                    Err(e) => return Err(format!("receiving: {e}")),
                }
            }
        }
        if image.is_none() {
            if let Some(a) = rx.announce() {
                if a.image_size > MAX_IMAGE {
                    return Err(format!("the image is {} bytes, more than this client holds", a.image_size));
                }
                image = Some(MemoryImage {
                    data: vec![0; a.image_size as usize],
                    block_size: usize::from(a.block_size),
                });
                st.image_size = a.image_size;
                announced = Some(now);
                st.announced_unix_ms = Some(unix_ms());
            }
        }
        if let Some(img) = image.as_mut() {
            rx.drain(now, img, usize::MAX).map_err(|e| format!("storing a block: {e}"))?;
        }
        if rx.poll_timeout().is_some_and(|t| t <= now) {
            rx.handle_timeout(now);
        }
        while let Some(t) = rx.poll_transmit(now, outbox.buffer()) {
            outbox.push(t);
        }
        while !outbox.is_empty() {
            match outbox.send(&unicast) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A full buffer or a refused datagram: the protocol asks again.
                Err(_) => outbox.clear(),
            }
        }
        if rx.is_complete() && complete_at.is_none() {
            complete_at = Some(now);
            st.complete_unix_ms = Some(unix_ms());
            st.elapsed_ms = announced.map(|a| (now - a).as_secs_f64() * 1000.0);
        }
        let stopping = cancel.load(Ordering::Relaxed) || now >= deadline;
        let finished = match rx.state() {
            ReceiverState::Finished | ReceiverState::Failed => true,
            ReceiverState::Complete => complete_at.is_some_and(|c| now >= c + spec.linger),
            _ => false,
        };
        if now >= next_report || finished || stopping {
            fill(&mut st, &rx);
            report(&st);
            next_report = now + Duration::from_secs(1);
        }
        if finished || stopping {
            if !rx.is_complete() {
                rx.leave();
                while let Some(t) = rx.poll_transmit(now, outbox.buffer()) {
                    outbox.push(t);
                }
                let _ = outbox.send(&unicast);
            }
            break;
        }
        if heard {
            std::thread::sleep(COALESCE);
            continue;
        }
        poller.clear();
        poller.add(&group);
        poller.add(&unicast);
        let wait = rx
            .poll_timeout()
            .map_or(Duration::from_millis(50), |t| t.saturating_duration_since(Instant::now()))
            .clamp(Duration::from_micros(100), Duration::from_millis(50));
        poller.wait_for(Some(wait)).map_err(|e| format!("waiting: {e}"))?;
    }
    if !rx.is_complete() {
        let total = rx.announce().map_or(0, |a| a.stream_len);
        return Err(match (cancel.load(Ordering::Relaxed), rx.state()) {
            (true, _) => format!("stopped with {} of {total} blocks", rx.blocks_received()),
            (false, ReceiverState::Listening) => format!("no session of the image announced on {}", spec.group),
            (false, ReceiverState::Failed) => format!(
                "Failed with {} of {total} blocks: {}",
                rx.blocks_received(),
                rx.failure().unwrap_or_default()
            ),
            (false, s) => format!("{s:?} with {} of {total} blocks", rx.blocks_received()),
        });
    }
    let img = image.ok_or("complete without an ANNOUNCE")?;
    let sha256: [u8; 32] = Sha256::digest(&img.data).into();
    Ok(Received {
        bytes: img.data.len() as u64,
        sha256,
    })
}

fn fill(st: &mut StreamReport, rx: &Receiver) {
    let s = rx.stats();
    st.blocks = rx.blocks_received();
    st.data_accepted = s.data_accepted;
    st.repairs_accepted = s.repairs_accepted;
    st.fec_recovered = s.fec_recovered;
    st.duplicates = s.duplicates;
    st.cache_overflow = s.cache_overflow;
    st.refused = s.forged + s.bad_signature + s.bad_block;
    st.state = format!("{:?}", rx.state());
}

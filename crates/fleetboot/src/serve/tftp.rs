//! The TFTP shell: requests on port 69, each read transfer on its own socket (its TID)
//! driven by a `fleetboot_tftp::ReadTransfer`. Every socket comes from `fleetboot_net` and
//! is bound to `server.interface` when one is set, as DHCP's are.
//!
//! `boot/<mac>.ipxe` (and `boot/<capability>/<mac>.ipxe`) is virtual: the client's iPXE
//! script, rendered from its profile, so a network without HTTP boots the same way; so are
//! the GRUB and PXELINUX configurations (`Shared::loader_config`). Each is sent to its own
//! client only (`Shared::authorize_client`). Everything else is a file under
//! server.root, confined to it (`..`, absolute paths and symlinks out are refused).
//!
//! Bounded: at most `tftp.max_transfers` transfers (threads) at once and
//! `tftp.max_transfers_per_client` per client address (`fleetboot_tftp::admission`; when
//! every place is taken, the oldest transfer whose client never answered gives its thread
//! to the newcomer), each ended after `tftp.idle_timeout_secs` without progress. A receive
//! error on port 69 is logged and counted, never the end of the service.

use super::shared::{ScriptRequest, Shared};
use crate::config::TftpConfig;
use crate::limits::{Throttle, LOG_EVERY};
use anyhow::Result;
use fleetboot_net::{Buffer, Outbox, UdpBuilder};
use fleetboot_tftp::admission::{Admission, Admit, Limits, Refusal, TransferId};
use fleetboot_tftp::codec::{ErrorCode, Mode, Packet, ParseError};
use fleetboot_tftp::server::{BlockSource, ReadTransfer, TransferConfig, TransferState};
use fleetboot_tftp::source::{Netascii, ReadAhead};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

static RECV_ERRORS: Throttle = Throttle::new(LOG_EVERY);
static REFUSED_BUSY: Throttle = Throttle::new(LOG_EVERY);
static REFUSED_FULL: Throttle = Throttle::new(LOG_EVERY);
static EVICTED: Throttle = Throttle::new(LOG_EVERY);
static NO_FDS: Throttle = Throttle::new(LOG_EVERY);
static NO_THREAD: Throttle = Throttle::new(LOG_EVERY);

/// A transfer thread's stack: the transfer's buffers live on the heap.
const TRANSFER_STACK: usize = 512 << 10;

pub async fn run(shared: Arc<Shared>, cfg: TftpConfig) -> Result<()> {
    let iface = shared.config.interface.clone();
    // The local address each request was sent to (IP_PKTINFO) becomes its transfer's.
    let sock = UdpBuilder::new(cfg.listen)
        .device(iface.as_deref())
        .buffer(Buffer::Receive, 4 << 20)
        .pktinfo(true)
        .purpose("TFTP requests")
        .bind_tokio()?;
    shared.listening_on(super::shared::Service::Tftp, sock.local_addr()?);
    tracing::info!(
        listen = %cfg.listen,
        interface = iface.as_deref().unwrap_or("any"),
        root = %shared.config.root.display(),
        max_transfers = cfg.max_transfers,
        max_transfers_per_client = cfg.max_transfers_per_client,
        idle_timeout_secs = cfg.idle_timeout.as_secs(),
        "TFTP listening"
    );
    metrics::gauge!("fleetboot_tftp_transfers_max").set(cfg.max_transfers as f64);
    metrics::gauge!("fleetboot_tftp_transfers_per_client_max").set(cfg.max_transfers_per_client as f64);
    let transfers = Transfers::new(Limits { max_transfers: cfg.max_transfers, max_per_client: cfg.max_transfers_per_client });
    let cfg = Arc::new(cfg);
    let iface: Option<Arc<str>> = iface.map(Into::into);
    let mut buf = vec![0u8; 65536];
    loop {
        let meta = match fleetboot_net::recv_from_to_async(&sock, &mut buf).await {
            Ok(meta) => meta,
            Err(e) => {
                // Whatever went wrong with one datagram (no memory for it, say), the next
                // may be fine: the service keeps listening.
                metrics::counter!("fleetboot_tftp_receive_errors_total").increment(1);
                if let Some(skipped) = RECV_ERRORS.ready() {
                    tracing::warn!(error = %e, skipped, "TFTP: receiving a request failed; still listening");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (n, peer, local) = (meta.len, meta.source, meta.reply_source());
        match Packet::parse(&buf[..n]) {
            Ok(Packet::Rrq { filename, mode, options }) => {
                let request = Request { from: Endpoints { peer, local, iface: iface.clone() }, filename, mode, options };
                transfers.start(request, &shared, &cfg);
            }
            Ok(Packet::Wrq { filename, .. }) => {
                tracing::info!(%peer, filename, "TFTP write refused");
                reply_error(&sock, peer, local, ErrorCode::AccessViolation, "fleetboot serves files read-only").await;
            }
            Ok(other) => tracing::debug!(%peer, ?other, "TFTP packet on port 69 that is not a request; dropped"),
            Err(e) => {
                metrics::counter!("fleetboot_tftp_malformed_total").increment(1);
                tracing::info!(%peer, len = n, error = %e, "malformed TFTP packet dropped");
                // A request we cannot read gets an answer, so its client stops waiting;
                // anything else on port 69 is dropped silently.
                if n >= 2 && matches!(u16::from_be_bytes([buf[0], buf[1]]), 1 | 2) {
                    let code = if matches!(e, ParseError::TooManyOptions | ParseError::OptionTooLong | ParseError::OptionWithoutValue(_)) {
                        ErrorCode::OptionsRefused
                    } else {
                        ErrorCode::IllegalOperation
                    };
                    reply_error(&sock, peer, local, code, &format!("malformed request: {e}")).await;
                }
            }
        }
    }
}

/// A read request waiting for, or running on, a transfer thread.
struct Request {
    from: Endpoints,
    filename: String,
    mode: Mode,
    options: Vec<(String, String)>,
}

/// One transfer thread, as the listener sees it: how to stop what it runs, and the request
/// it runs next (the newcomer that displaced it).
#[derive(Default)]
struct Slot {
    stop: AtomicBool,
    socket: Mutex<Option<Arc<std::net::UdpSocket>>>,
    next: Mutex<Option<(TransferId, Request)>>,
}

/// The transfers in progress: who may start one (`Admission`) and the thread each runs on.
#[derive(Clone)]
struct Transfers(Arc<Mutex<TransfersInner>>);

struct TransfersInner {
    admission: Admission,
    /// The slot of each running transfer, by the id it runs now.
    slots: HashMap<TransferId, Arc<Slot>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Transfers {
    fn new(limits: Limits) -> Transfers {
        Transfers(Arc::new(Mutex::new(TransfersInner { admission: Admission::new(limits), slots: HashMap::new() })))
    }

    fn publish(inner: &TransfersInner) {
        let s = inner.admission.stats();
        metrics::gauge!("fleetboot_tftp_transfers_active").set(s.live as f64);
        metrics::gauge!("fleetboot_tftp_transfer_clients").set(s.clients as f64);
    }

    /// Admits `request` and runs it on a thread of its own or on a displaced transfer's.
    fn start(&self, request: Request, shared: &Arc<Shared>, cfg: &Arc<TftpConfig>) {
        let peer = request.from.peer;
        let mut inner = lock(&self.0);
        match inner.admission.admit(peer.ip()) {
            Admit::Start(id) => {
                let slot = Arc::new(Slot::default());
                inner.slots.insert(id, slot.clone());
                Self::publish(&inner);
                drop(inner);
                let (me, shared, cfg) = (self.clone(), shared.clone(), cfg.clone());
                let spawned = std::thread::Builder::new()
                    .name("fleetboot-tftp".into())
                    .stack_size(TRANSFER_STACK)
                    .spawn(move || me.run_slot(id, request, slot, shared, cfg));
                if let Err(e) = spawned {
                    metrics::counter!("fleetboot_tftp_requests_dropped_total", "reason" => "no_thread").increment(1);
                    if let Some(skipped) = NO_THREAD.ready() {
                        tracing::error!(%peer, error = %e, skipped, "TFTP: no thread for a transfer; request dropped");
                    }
                    let mut inner = lock(&self.0);
                    inner.admission.finished(id);
                    inner.slots.remove(&id);
                    Self::publish(&inner);
                }
            }
            Admit::Replace { id, evict } => {
                metrics::counter!("fleetboot_tftp_evictions_total").increment(1);
                if let Some(skipped) = EVICTED.ready() {
                    tracing::warn!(
                        %peer,
                        max_transfers = inner.admission.limits().max_transfers,
                        skipped,
                        "TFTP: every transfer place is taken; the oldest transfer whose client never answered gives way"
                    );
                }
                let slot = inner.slots.get(&evict).cloned().expect("every live transfer has a slot");
                // A newcomer already waiting here (displaced before it started) is dropped.
                if let Some((dropped, _)) = lock(&slot.next).replace((id, request)) {
                    tracing::debug!(dropped, "a waiting TFTP request displaced before it started");
                }
                slot.stop.store(true, Ordering::SeqCst);
                let sock = lock(&slot.socket).clone();
                if let Some(sock) = sock {
                    let _ = fleetboot_net::stop_receiving(&*sock);
                }
            }
            Admit::Refused(why) => {
                let (reason, throttle, what) = match why {
                    Refusal::ClientBusy => ("client_busy", &REFUSED_BUSY, "this client already has tftp.max_transfers_per_client transfers"),
                    Refusal::Full => ("full", &REFUSED_FULL, "every transfer place (tftp.max_transfers) is held by a client that answers"),
                };
                metrics::counter!("fleetboot_tftp_requests_dropped_total", "reason" => reason).increment(1);
                if let Some(skipped) = throttle.ready() {
                    tracing::warn!(%peer, skipped, "TFTP request dropped: {what}");
                }
            }
        }
    }

    /// A transfer thread: runs its request, then whatever newcomer displaced it, until none.
    fn run_slot(&self, mut id: TransferId, mut request: Request, slot: Arc<Slot>, shared: Arc<Shared>, cfg: Arc<TftpConfig>) {
        loop {
            let peer = request.from.peer;
            if let Err(e) = serve_read(&shared, &cfg, request, Running { id, slot: &slot, transfers: self }) {
                if crate::limits::chain_out_of_fds(&e) {
                    metrics::counter!("fleetboot_tftp_requests_dropped_total", "reason" => "no_file_descriptors").increment(1);
                    if let Some(skipped) = NO_FDS.ready() {
                        let limit = crate::limits::fd_limit().map_or(0, |l| l.soft);
                        tracing::error!(%peer, fd_limit = limit, skipped, error = %format!("{e:#}"),
                            "TFTP: out of file descriptors; request dropped (raise the open file limit or lower tftp.max_transfers)");
                    }
                } else {
                    tracing::warn!(%peer, error = %format!("{e:#}"), "TFTP transfer ended with an error");
                }
            }
            *lock(&slot.socket) = None;
            let mut inner = lock(&self.0);
            let next = lock(&slot.next).take();
            slot.stop.store(false, Ordering::SeqCst);
            inner.slots.remove(&id);
            match next {
                Some((new_id, new_request)) => {
                    inner.admission.replaced(id, new_id, new_request.from.peer.ip());
                    inner.slots.insert(new_id, slot.clone());
                    (id, request) = (new_id, new_request);
                }
                None => {
                    inner.admission.finished(id);
                    Self::publish(&inner);
                    return;
                }
            }
        }
    }

    fn answered(&self, id: TransferId) {
        lock(&self.0).admission.answered(id);
    }
}

/// What a running transfer needs to know of its thread: whether to stop, and whom to tell
/// that its client answered.
struct Running<'a> {
    id: TransferId,
    slot: &'a Slot,
    transfers: &'a Transfers,
}

/// An ERROR answer from port 69, from the address the request was sent to.
async fn reply_error(sock: &UdpSocket, peer: SocketAddr, local: Option<IpAddr>, code: ErrorCode, message: &str) {
    let mut out = Vec::new();
    Packet::Error { code, message: message.into() }.encode(&mut out);
    if let Err(e) = fleetboot_net::send_from_async(sock, &out, peer, local).await {
        tracing::debug!(%peer, error = %e, "TFTP error reply not sent");
    }
}

/// How much of a file one read brings in, once a transfer is under way: a block then costs
/// a copy, not a system call. A transfer starts with a small read (`ReadAhead`).
const READ_AHEAD: usize = 256 << 10;

enum Source {
    File(ReadAhead<std::fs::File>),
    Netascii(Netascii<ReadAhead<std::fs::File>>),
    Memory(Vec<u8>),
}

impl BlockSource for Source {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::File(f) => f.read_at(offset, buf),
            Source::Netascii(n) => n.read_at(offset, buf),
            Source::Memory(v) => v.read_at(offset, buf),
        }
    }
}

/// Why a request gets no file.
enum Refused {
    /// Answered with this ERROR.
    Answer(ErrorCode, String),
    /// Out of descriptors: the request is dropped (its client asks again) and logged.
    NoDescriptors(std::io::Error),
}

fn open(shared: &Shared, cfg: &TftpConfig, filename: &str, mode: Mode, peer: IpAddr) -> Result<(Source, u64), Refused> {
    let answer = |code, message: String| Refused::Answer(code, message);
    if let Some(req) = ScriptRequest::parse(filename) {
        if let Err(refusal) = shared.authorize_client(req.mac, peer, req.capability.as_deref()) {
            shared.refused("tftp", "script", &refusal);
            return Err(answer(ErrorCode::AccessViolation, refusal.to_string()));
        }
        // It is the client: its later transfers land in its trace.
        if let IpAddr::V4(ip) = peer {
            shared.bind_ip(ip, req.mac);
        }
        let bytes = shared.script_for(req.mac).into_bytes();
        let len = bytes.len() as u64;
        return Ok((Source::Memory(bytes), len));
    }
    if let Some((req, text)) = shared.loader_config(filename) {
        shared
            .authorize_loader_config(&req, peer, "tftp")
            .map_err(|refusal| answer(ErrorCode::AccessViolation, refusal.to_string()))?;
        let len = text.len() as u64;
        return Ok((Source::Memory(text.into_bytes()), len));
    }
    let path = fleetboot_tftp::path::resolve(&shared.config.root, filename)
        .map_err(|e| answer(ErrorCode::AccessViolation, e.to_string()))?;
    let file = std::fs::File::open(&path).map_err(|e| match crate::limits::is_out_of_fds(&e) {
        true => Refused::NoDescriptors(e),
        false => answer(ErrorCode::FileNotFound, format!("{filename}: {e}")),
    })?;
    let meta = file.metadata().map_err(|e| answer(ErrorCode::FileNotFound, e.to_string()))?;
    if !meta.is_file() {
        return Err(answer(ErrorCode::FileNotFound, format!("{filename}: not a regular file")));
    }
    let file = ReadAhead::new(file, READ_AHEAD);
    if mode == Mode::Netascii {
        // Converted block by block; only the length is counted up front, in one pass.
        if meta.len() > cfg.netascii_max_bytes {
            return Err(answer(
                ErrorCode::IllegalOperation,
                format!("file larger than tftp.netascii_max_bytes ({}); use octet mode", cfg.netascii_max_bytes),
            ));
        }
        let mut text = Netascii::new(file, meta.len());
        let len = text.converted_len().map_err(|e| answer(ErrorCode::NotDefined, format!("{filename}: {e}")))?;
        return Ok((Source::Netascii(text), len));
    }
    Ok((Source::File(file), meta.len()))
}

/// Where a transfer's datagrams go and come from.
struct Endpoints {
    peer: SocketAddr,
    /// The local address the request was sent to (unicast requests only).
    local: Option<IpAddr>,
    iface: Option<Arc<str>>,
}

/// One read transfer on its own OS thread with a blocking socket. A lock-step client
/// waits for every block, so the time from its ACK to our next DATA is the transfer's
/// speed: a thread blocked in recv() wakes straight into the state machine, without an
/// event loop hop in between.
fn serve_read(shared: &Shared, cfg: &TftpConfig, request: Request, running: Running<'_>) -> Result<()> {
    let Request { from, filename, mode, options } = request;
    let peer = from.peer;
    let unspecified: SocketAddr = match peer {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    // A fresh port for this transfer (its TID), on the address the client asked: a host
    // with several addresses (a floating service address, say) answers from the one the
    // ROM expects, not the one routing would pick. Connected so only the client reaches it.
    let socket = |bind: SocketAddr| {
        UdpBuilder::new(bind).device(from.iface.as_deref()).connect(peer).purpose("TFTP transfer").bind()
    };
    let bind = from.local.map_or(unspecified, |ip| SocketAddr::new(ip, 0));
    let sock = Arc::new(socket(bind).or_else(|_| socket(unspecified))?);
    // Registered before the first look at `stop`: a displacement from now on wakes recv().
    *lock(&running.slot.socket) = Some(sock.clone());
    let ip4 = match peer.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    };
    let opened = open(shared, cfg, &filename, mode, peer.ip());
    let mac = ip4.and_then(|ip| shared.mac_of(ip));
    let opts_text = options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    let (mut source, len) = match opened {
        Ok(x) => x,
        Err(Refused::NoDescriptors(e)) => return Err(anyhow::Error::from(e).context(format!("opening {filename}"))),
        Err(Refused::Answer(code, message)) => {
            metrics::counter!("fleetboot_tftp_refused_total").increment(1);
            if let Some(mac) = mac {
                shared.trace(mac, "TFTP-REFUSED", format!("{filename}: {message}"));
            }
            tracing::info!(%peer, filename, message, "TFTP request refused");
            let mut out = Vec::new();
            Packet::Error { code, message }.encode(&mut out);
            sock.send(&out)?;
            return Ok(());
        }
    };
    let quirk = mac.is_some_and(|m| cfg.no_options_for.iter().any(|p| m.to_string().starts_with(p.trim_end_matches('*'))));
    let tcfg = TransferConfig {
        max_blksize: cfg.max_blksize,
        max_windowsize: cfg.max_windowsize,
        ignore_options: quirk,
        idle_timeout: cfg.idle_timeout,
        ..TransferConfig::default()
    };
    let started = Instant::now();
    let mut transfer = ReadTransfer::new(started, peer, &options, len, &tcfg);
    // What the client asked for and what it got (the OACK), per transfer: firmware differs
    // (EDK2 probes tsize, then asks for blksize and windowsize; GRUB asks for blksize only).
    let granted = transfer.accepted_options().oack.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    let granted = if granted.is_empty() { "none".to_string() } else { granted };
    tracing::info!(%peer, filename, asked = %opts_text, %granted, "TFTP read request");
    if let Some(mac) = mac {
        shared.trace(mac, "TFTP-RRQ", format!("{filename} {len} bytes asked [{opts_text}] granted [{granted}]"));
    }
    let displaced = drive_read(&sock, peer, &mut transfer, &mut source, Some(&running))?;
    let stats = transfer.stats();
    metrics::counter!("fleetboot_tftp_retransmits_total").increment(stats.retransmits);
    if displaced {
        metrics::counter!("fleetboot_tftp_transfers_total", "result" => "displaced").increment(1);
        tracing::debug!(%peer, filename, "TFTP transfer whose client never answered gave its place to a newcomer");
        if let Some(mac) = mac {
            shared.trace(mac, "TFTP-FAILED", format!("{filename}: the client never answered and the server needed the place"));
        }
        return Ok(());
    }
    let (kind, detail) = match transfer.state() {
        TransferState::Completed { bytes, retransmits } => {
            metrics::counter!("fleetboot_tftp_transfers_total", "result" => "completed").increment(1);
            metrics::counter!("fleetboot_tftp_bytes_total").increment(*bytes);
            let secs = started.elapsed().as_secs_f64();
            ("TFTP-DONE", format!("{filename} {bytes} bytes in {secs:.3}s, {retransmits} retransmits"))
        }
        // UEFI firmware (EDK2) asks for tsize alone, reads the size from the OACK and ends
        // the transfer before any data: a probe, answered as asked, then the real fetch.
        TransferState::Failed { reason: fleetboot_tftp::server::FailReason::ClientError { code, message } }
            if stats.data_packets == 0 && *code == ErrorCode::OptionsRefused =>
        {
            metrics::counter!("fleetboot_tftp_transfers_total", "result" => "probed").increment(1);
            ("TFTP-PROBED", format!("{filename}: the client took the OACK and ended the transfer ({message:?})"))
        }
        TransferState::Failed { reason } => {
            metrics::counter!("fleetboot_tftp_transfers_total", "result" => "failed").increment(1);
            ("TFTP-FAILED", format!("{filename}: {reason:?}"))
        }
        TransferState::InProgress => ("TFTP-FAILED", format!("{filename}: stopped unfinished")),
    };
    if let Some(mac) = mac {
        shared.trace(mac, kind, detail.clone());
    }
    tracing::info!(%peer, kind, detail, "TFTP transfer finished");
    Ok(())
}

/// Drives one read transfer over its own connected socket until it ends: each window out
/// in `sendmmsg` batches, ACKs in, the retransmission timer. Every TFTP server of the
/// binary runs its transfers through here (`fleetboot serve`, `fleetboot cache`). With
/// `running` (the serve's transfer table), the transfer reports when its client first
/// answered and stops when the table asks it to make room; returns whether it did.
fn drive_read(
    sock: &std::net::UdpSocket,
    peer: SocketAddr,
    transfer: &mut ReadTransfer,
    source: &mut dyn BlockSource,
    running: Option<&Running<'_>>,
) -> std::io::Result<bool> {
    let mut out = Outbox::new(MAX_BATCH);
    // ACKs and ERRORs: a longer datagram is cut, which spoils nothing a reader sends.
    let mut rx = vec![0u8; 2048];
    let mut armed: Option<Duration> = None;
    let mut answered = false;
    loop {
        if running.is_some_and(|r| r.slot.stop.load(Ordering::SeqCst)) {
            return Ok(true);
        }
        if !answered && transfer.answered() {
            answered = true;
            if let Some(r) = running {
                r.transfers.answered(r.id);
            }
        }
        // A whole window leaves in one sendmmsg(2). A send error (an ICMP unreachable from
        // a client that left) is not fatal by itself: the retransmission timeout decides
        // when to give up.
        let now = Instant::now();
        while let Some(t) = transfer.poll_transmit(now, source, out.buffer()) {
            out.push(t);
            if out.is_full() {
                send_window(&mut out, sock, peer);
            }
        }
        send_window(&mut out, sock, peer);
        if transfer.is_finished() {
            break;
        }
        let Some(deadline) = transfer.poll_timeout() else { break };
        let now = Instant::now();
        if deadline <= now {
            transfer.handle_timeout(now);
            continue;
        }
        let wait = deadline - now;
        // Re-arm only when the wait moved: in lock-step it is the same RTO every block.
        if armed.is_none_or(|a| a.abs_diff(wait) > Duration::from_millis(2)) {
            sock.set_read_timeout(Some(wait))?;
            armed = Some(wait);
        }
        // Connected: whatever arrives is from the client. Zero bytes is also what recv()
        // returns once the listener stopped this transfer (checked at the top).
        match sock.recv(&mut rx) {
            Ok(0) => {}
            Ok(n) => transfer.handle(Instant::now(), peer, &rx[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                let now = Instant::now();
                if now >= deadline {
                    transfer.handle_timeout(now);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Ok(false)
}

/// [`drive_read`] for a TFTP server without a transfer table (`fleetboot cache`).
pub(crate) fn drive_read_alone(
    sock: &std::net::UdpSocket,
    peer: SocketAddr,
    transfer: &mut ReadTransfer,
    source: &mut dyn BlockSource,
) -> std::io::Result<()> {
    drive_read(sock, peer, transfer, source, None).map(|_| ())
}

/// Datagrams sent per batch; a window of up to 64 blocks leaves in one or a few
/// sendmmsg(2) calls.
const MAX_BATCH: usize = 32;

/// Sends what the transfer queued. Datagrams the kernel refused count as lost: the
/// client's ACK says so and the transfer resends.
fn send_window(out: &mut Outbox, sock: &std::net::UdpSocket, peer: SocketAddr) {
    if out.is_empty() {
        return;
    }
    if let Err(e) = out.send_connected(sock, peer) {
        tracing::debug!(%peer, error = %e, "TFTP window not sent");
    }
    out.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_serves_any_offset() {
        let data: Vec<u8> = (0..(READ_AHEAD * 2 + 777)).map(|i| (i * 7 % 251) as u8).collect();
        let path = std::env::temp_dir().join(format!("fleetboot-readahead-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let mut r = ReadAhead::new(std::fs::File::open(&path).unwrap(), READ_AHEAD);
        let mut buf = vec![0u8; 1468];
        // In order, across chunk ends, backwards (a resend) and past the end.
        for off in [0usize, 1468, READ_AHEAD - 100, READ_AHEAD + 5, 3000, data.len() - 10, data.len()] {
            let n = r.read_at(off as u64, &mut buf).unwrap();
            let want = &data[off..(off + 1468).min(data.len())];
            assert_eq!(&buf[..n], &want[..n], "offset {off}");
            assert!(n > 0 || off == data.len());
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn netascii_files_are_converted_block_by_block() {
        let text: Vec<u8> = (0..50_000).flat_map(|i| format!("line {i}\r\n").into_bytes()).collect();
        let path = std::env::temp_dir().join(format!("fleetboot-netascii-{}", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        let file = ReadAhead::new(std::fs::File::open(&path).unwrap(), READ_AHEAD);
        let mut n = Netascii::new(file, text.len() as u64);
        let want = fleetboot_tftp::source::to_netascii(&text);
        assert_eq!(n.converted_len().unwrap(), want.len() as u64);
        let mut got = Vec::new();
        let mut block = vec![0u8; 1468];
        loop {
            let k = n.read_at(got.len() as u64, &mut block).unwrap();
            got.extend_from_slice(&block[..k]);
            if k < block.len() {
                break;
            }
        }
        assert!(got == want, "the streamed conversion differs from the whole-file one");
        let _ = std::fs::remove_file(path);
    }

    fn script_mac(filename: &str) -> Option<fleetboot_boot::MacAddr> {
        super::ScriptRequest::parse(filename).map(|r| r.mac)
    }

    #[test]
    fn script_paths() {
        assert_eq!(script_mac("boot/52-54-00-77-00-10.ipxe"), "52:54:00:77:00:10".parse().ok());
        assert_eq!(script_mac("/boot/52-54-00-77-00-10.ipxe"), None);
        assert_eq!(script_mac("boot/x.ipxe"), None);
    }
}

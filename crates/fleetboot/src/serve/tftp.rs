//! The TFTP shell: requests on port 69, each read transfer on its own socket (its TID)
//! driven by a `fleetboot_tftp::ReadTransfer`. Every socket comes from `fleetboot_net` and
//! is bound to `server.interface` when one is set, as DHCP's are.
//!
//! `boot/<mac>.ipxe` (and `boot/<capability>/<mac>.ipxe`) is virtual: the client's iPXE
//! script, rendered from its profile, so a network without HTTP boots the same way; so are
//! the GRUB and PXELINUX configurations (`Shared::loader_config`). Each is sent to its own
//! client only (`Shared::authorize_client`). Everything else is a file under
//! server.root, confined to it (`..`, absolute paths and symlinks out are refused).

use super::shared::{ScriptRequest, Shared};
use crate::config::TftpConfig;
use anyhow::Result;
use fleetboot_tftp::codec::{ErrorCode, Mode, Packet, ParseError};
use fleetboot_net::{Buffer, Outbox, UdpBuilder};
use fleetboot_tftp::server::{BlockSource, ReadTransfer, TransferConfig, TransferState};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Netascii is converted in memory; refuse to do that for anything this large.
const MAX_NETASCII: u64 = 64 << 20;

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
    tracing::info!(listen = %cfg.listen, interface = iface.as_deref().unwrap_or("any"), root = %shared.config.root.display(), "TFTP listening");
    let cfg = Arc::new(cfg);
    let iface: Option<Arc<str>> = iface.map(Into::into);
    let mut buf = vec![0u8; 65536];
    loop {
        let meta = fleetboot_net::recv_from_to_async(&sock, &mut buf).await?;
        let (n, peer, local) = (meta.len, meta.source, meta.reply_source());
        match Packet::parse(&buf[..n]) {
            Ok(Packet::Rrq { filename, mode, options }) => {
                let (shared, cfg, iface) = (shared.clone(), cfg.clone(), iface.clone());
                let spawned = std::thread::Builder::new().name("fleetboot-tftp".into()).spawn(move || {
                    let from = Endpoints { peer, local, iface };
                    if let Err(e) = serve_read(shared, cfg, from, filename, mode, options) {
                        tracing::warn!(%peer, error = %format!("{e:#}"), "TFTP transfer ended with an error");
                    }
                });
                if let Err(e) = spawned {
                    tracing::error!(%peer, error = %e, "no thread for a TFTP transfer; request dropped");
                }
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
                        ErrorCode::OptionNegotiation
                    } else {
                        ErrorCode::IllegalOperation
                    };
                    reply_error(&sock, peer, local, code, &format!("malformed request: {e}")).await;
                }
            }
        }
    }
}

/// An ERROR answer from port 69, from the address the request was sent to.
async fn reply_error(sock: &UdpSocket, peer: SocketAddr, local: Option<IpAddr>, code: ErrorCode, message: &str) {
    let mut out = Vec::new();
    Packet::Error { code, message: message.into() }.encode(&mut out);
    if let Err(e) = fleetboot_net::send_from_async(sock, &out, peer, local).await {
        tracing::debug!(%peer, error = %e, "TFTP error reply not sent");
    }
}

/// How much of a file one read brings in: a block then costs a copy, not a system call.
const READ_AHEAD: usize = 256 << 10;

enum Source {
    File(ReadAhead),
    Memory(Vec<u8>),
}

impl BlockSource for Source {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::File(f) => f.read_at(offset, buf),
            Source::Memory(v) => v.read_at(offset, buf),
        }
    }
}

/// A file read in large chunks. Blocks are asked for in order (a go-back-N resend steps
/// back at most a window, which is usually still inside the chunk).
struct ReadAhead {
    file: std::fs::File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
}

impl ReadAhead {
    fn new(file: std::fs::File) -> ReadAhead {
        ReadAhead { file, buf: Vec::new(), start: 0 }
    }
}

impl BlockSource for ReadAhead {
    fn read_at(&mut self, offset: u64, out: &mut [u8]) -> std::io::Result<usize> {
        let end = self.start + self.buf.len() as u64;
        if offset < self.start || offset >= end {
            self.buf.resize(READ_AHEAD.max(out.len()), 0);
            let n = self.file.read_at(offset, &mut self.buf)?;
            self.buf.truncate(n);
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        let n = out.len().min(self.buf.len() - from);
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        Ok(n)
    }
}

/// RFC 1350 netascii: CR LF line ends, a bare CR becomes CR NUL.
fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

fn open(shared: &Shared, filename: &str, mode: Mode, peer: IpAddr) -> Result<(Source, u64), (ErrorCode, String)> {
    if let Some(req) = ScriptRequest::parse(filename) {
        if let Err(refusal) = shared.authorize_client(req.mac, peer, req.capability.as_deref()) {
            shared.refused("tftp", "script", &refusal);
            return Err((ErrorCode::AccessViolation, refusal.to_string()));
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
            .map_err(|refusal| (ErrorCode::AccessViolation, refusal.to_string()))?;
        let len = text.len() as u64;
        return Ok((Source::Memory(text.into_bytes()), len));
    }
    let path = fleetboot_tftp::path::resolve(&shared.config.root, filename)
        .map_err(|e| (ErrorCode::AccessViolation, e.to_string()))?;
    let file = std::fs::File::open(&path).map_err(|e| (ErrorCode::FileNotFound, format!("{filename}: {e}")))?;
    let meta = file.metadata().map_err(|e| (ErrorCode::FileNotFound, e.to_string()))?;
    if !meta.is_file() {
        return Err((ErrorCode::FileNotFound, format!("{filename}: not a regular file")));
    }
    if mode == Mode::Netascii {
        if meta.len() > MAX_NETASCII {
            return Err((ErrorCode::IllegalOperation, "file too large for netascii; use octet mode".into()));
        }
        let data = to_netascii(&std::fs::read(&path).map_err(|e| (ErrorCode::FileNotFound, e.to_string()))?);
        let len = data.len() as u64;
        return Ok((Source::Memory(data), len));
    }
    Ok((Source::File(ReadAhead::new(file)), meta.len()))
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
fn serve_read(
    shared: Arc<Shared>,
    cfg: Arc<TftpConfig>,
    from: Endpoints,
    filename: String,
    mode: Mode,
    options: Vec<(String, String)>,
) -> Result<()> {
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
    let sock = socket(bind).or_else(|_| socket(unspecified))?;
    let ip4 = match peer.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    };
    let opened = open(&shared, &filename, mode, peer.ip());
    let mac = ip4.and_then(|ip| shared.mac_of(ip));
    let opts_text = options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    let (mut source, len) = match opened {
        Ok(x) => x,
        Err((code, message)) => {
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
        ..TransferConfig::default()
    };
    let started = Instant::now();
    let mut transfer = ReadTransfer::new(started, peer, &options, len, &tcfg);
    // What the client asked for and what it got (the OACK), per transfer: firmware differs
    // (EDK2 probes tsize, then asks for blksize and windowsize; GRUB asks for blksize only).
    let granted = transfer.negotiated().oack.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    let granted = if granted.is_empty() { "none".to_string() } else { granted };
    tracing::info!(%peer, filename, asked = %opts_text, %granted, "TFTP read request");
    if let Some(mac) = mac {
        shared.trace(mac, "TFTP-RRQ", format!("{filename} {len} bytes asked [{opts_text}] granted [{granted}]"));
    }
    let mut out = Outbox::new(MAX_BATCH);
    let mut rx = vec![0u8; 65536];
    let mut armed: Option<Duration> = None;
    loop {
        // A whole window leaves in one sendmmsg(2). A send error (an ICMP unreachable from
        // a client that left) is not fatal by itself: the retransmission timeout decides
        // when to give up.
        let now = Instant::now();
        while let Some(t) = transfer.poll_transmit(now, &mut source, out.buffer()) {
            out.push(t);
            if out.is_full() {
                send_window(&mut out, &sock, peer);
            }
        }
        send_window(&mut out, &sock, peer);
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
        // Connected: whatever arrives is from the client.
        match sock.recv(&mut rx) {
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
    let stats = transfer.stats();
    metrics::counter!("fleetboot_tftp_retransmits_total").increment(stats.retransmits);
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
            if stats.data_packets == 0 && *code == ErrorCode::OptionNegotiation =>
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
        let mut r = ReadAhead::new(std::fs::File::open(&path).unwrap());
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
    fn netascii_line_ends() {
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
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

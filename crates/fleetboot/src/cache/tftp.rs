//! The cache's TFTP service (explicit mode: the site's DHCP names the cache as
//! next-server). `boot/<mac>.ipxe` is the client's script; any other name is the object
//! `files/<name>`, read through the same verified chunks as HTTP. Each transfer runs on
//! its own thread with `fleetboot_tftp::ReadTransfer`, driven by the loop every TFTP
//! server of the binary shares (`serve::tftp::drive_read_alone`); a block whose chunk is not
//! verified yet waits for it.

use super::objects::{Counters, ReaderGuard};
use super::Cache;
use crate::config::TftpConfig;
use anyhow::Result;
use fleetboot_boot::MacAddr;
use fleetboot_net::{Buffer, UdpBuilder};
use fleetboot_tftp::codec::{ErrorCode, Mode, Packet};
use fleetboot_tftp::server::{BlockSource, ReadTransfer, TransferConfig, TransferState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;
use tokio::runtime::Handle;

/// Binds the request socket (port 69 unless `[tftp] listen` says otherwise).
pub fn bind(cache: &Cache, t: &TftpConfig) -> Result<UdpSocket> {
    Ok(UdpBuilder::new(t.listen)
        .device(cache.config.interface.as_deref())
        .buffer(Buffer::Receive, 4 << 20)
        .pktinfo(true)
        .purpose("cache TFTP requests")
        .bind()?)
}

fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    Packet::Error { code, message: message.into() }.encode(&mut out);
    out
}

/// Answers requests until the process ends.
pub fn run(cache: Arc<Cache>, t: TftpConfig, sock: UdpSocket, rt: Handle) -> Result<()> {
    tracing::info!(listen = %sock.local_addr()?, "cache TFTP listening");
    let t = Arc::new(t);
    let mut buf = vec![0u8; 65536];
    loop {
        let meta = match fleetboot_net::recv_from_to(&sock, &mut buf) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let (n, peer, local) = (meta.len, meta.source, meta.reply_source());
        match Packet::parse(&buf[..n]) {
            Ok(Packet::Rrq { filename, mode, options }) => {
                let (cache, t, rt) = (cache.clone(), t.clone(), rt.clone());
                let spawned = std::thread::Builder::new().name("fleetboot-cache-tftp".into()).spawn(move || {
                    if let Err(e) = serve_read(&cache, &t, peer, local, &filename, mode, &options, &rt) {
                        tracing::warn!(%peer, error = %format!("{e:#}"), "cache TFTP transfer ended with an error");
                    }
                });
                if let Err(e) = spawned {
                    tracing::error!(%peer, error = %e, "no thread for a TFTP transfer; request dropped");
                }
            }
            Ok(Packet::Wrq { .. }) => {
                let _ = fleetboot_net::send_from(&sock, &error_packet(ErrorCode::AccessViolation, "the cache serves files read-only"), Some(peer), local);
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!("fleetboot_tftp_malformed_total").increment(1);
                tracing::info!(%peer, len = n, error = %e, "malformed TFTP packet dropped");
                if n >= 2 && matches!(u16::from_be_bytes([buf[0], buf[1]]), 1 | 2) {
                    let _ = fleetboot_net::send_from(&sock, &error_packet(ErrorCode::IllegalOperation, &format!("malformed request: {e}")), Some(peer), local);
                }
            }
        }
    }
}

enum Source {
    Memory(Vec<u8>),
    Object(ObjectSource),
}

impl BlockSource for Source {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Memory(v) => v.read_at(offset, buf),
            Source::Object(o) => o.read_at(offset, buf),
        }
    }
}

/// An object's verified chunks, one in hand at a time.
struct ObjectSource {
    cache: Arc<Cache>,
    guard: ReaderGuard,
    rt: Handle,
    current: Option<(u32, Arc<[u8]>)>,
}

impl BlockSource for ObjectSource {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let m = &self.guard.slot.manifest;
        if offset >= m.size {
            return Ok(0);
        }
        let i = m.chunk_of(offset);
        if self.current.as_ref().is_none_or(|(c, _)| *c != i) {
            let (objects, slot) = (self.cache.objects.clone(), self.guard.slot.clone());
            let data = self.rt.block_on(async move { objects.chunk(&slot, i).await }).map_err(std::io::Error::other)?;
            self.current = Some((i, data));
        }
        let (_, data) = self.current.as_ref().expect("set above");
        let from = (offset - m.chunk_range(i).start) as usize;
        let n = buf.len().min(data.len() - from);
        buf[..n].copy_from_slice(&data[from..from + n]);
        Counters::add(&self.cache.objects.counters.bytes_served, n as u64);
        Ok(n)
    }
}

fn script_mac(filename: &str) -> Option<MacAddr> {
    filename.trim_start_matches('/').strip_prefix("boot/")?.strip_suffix(".ipxe")?.parse().ok()
}

#[allow(clippy::too_many_arguments)]
fn serve_read(
    cache: &Arc<Cache>,
    t: &TftpConfig,
    peer: SocketAddr,
    local: Option<IpAddr>,
    filename: &str,
    mode: Mode,
    options: &[(String, String)],
    rt: &Handle,
) -> Result<()> {
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let socket = |bind: SocketAddr| {
        UdpBuilder::new(bind).device(cache.config.interface.as_deref()).connect(peer).purpose("cache TFTP transfer").bind()
    };
    let sock = socket(local.map_or(unspecified, |ip| SocketAddr::new(ip, 0))).or_else(|_| socket(unspecified))?;
    let ip: Option<Ipv4Addr> = match peer.ip() {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    };
    let source = if let Some(mac) = script_mac(filename) {
        let c = cache.clone();
        Ok(Source::Memory(rt.block_on(async move { c.script(mac, ip).await }).into_bytes()))
    } else {
        match fleetboot_cache::name::file_object(filename) {
            Err(e) => Err((ErrorCode::AccessViolation, e.to_string())),
            Ok(_) if mode == Mode::Netascii => Err((ErrorCode::IllegalOperation, "the cache serves octet mode only".to_string())),
            Ok(name) => {
                let c = cache.clone();
                match rt.block_on(async move { c.object(ip, &name).await }) {
                    Ok((guard, _)) => Ok(Source::Object(ObjectSource { cache: cache.clone(), guard, rt: rt.clone(), current: None })),
                    Err(why) => Err((ErrorCode::FileNotFound, why)),
                }
            }
        }
    };
    let mac = ip.and_then(|i| cache.mac_of(i));
    let mut source = match source {
        Ok(s) => s,
        Err((code, message)) => {
            if let Some(mac) = mac {
                cache.trace(mac, "CACHE-REFUSED", format!("TFTP {filename}: {message}"));
            }
            sock.send(&error_packet(code, &message))?;
            return Ok(());
        }
    };
    let len = match &source {
        Source::Memory(v) => v.len() as u64,
        Source::Object(o) => o.guard.slot.manifest.size,
    };
    let tcfg = TransferConfig { max_blksize: t.max_blksize, max_windowsize: t.max_windowsize, ..TransferConfig::default() };
    let started = Instant::now();
    let mut transfer = ReadTransfer::new(started, peer, options, len, &tcfg);
    crate::serve::tftp::drive_read_alone(&sock, peer, &mut transfer, &mut source)?;
    let (kind, detail) = match transfer.state() {
        TransferState::Completed { bytes, retransmits } => {
            ("CACHE-TFTP-DONE", format!("{filename} {bytes} bytes in {:.3}s, {retransmits} retransmits", started.elapsed().as_secs_f64()))
        }
        TransferState::Failed { reason } => ("CACHE-TFTP-FAILED", format!("{filename}: {reason:?}")),
        TransferState::InProgress => ("CACHE-TFTP-FAILED", format!("{filename}: stopped unfinished")),
    };
    if let Some(mac) = mac.or_else(|| script_mac(filename)) {
        cache.trace(mac, kind, detail.clone());
    }
    tracing::info!(%peer, kind, detail, "cache TFTP transfer finished");
    Ok(())
}

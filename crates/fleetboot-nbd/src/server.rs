//! The tokio shell: accepts connections, runs [`Handshake`] over the socket, then serves
//! requests against the connection's [`Disk`].
//!
//! Each connection is one task handling its requests in order (clients pipeline; several
//! connections of one client run in parallel and share its overlay). Reads go straight
//! from `pread` into a reused buffer that already has room for the reply header in front,
//! so a READ costs one `pread` and one socket write and no allocation. FLUSH and FUA, which
//! wait for `fdatasync`, run on the blocking pool.
//!
//! A protocol violation the stream cannot recover from (bad request magic, a WRITE longer
//! than [`MAX_REQUEST_LEN`]) closes that connection only; bad offsets, lengths, flags and
//! unknown commands get an error reply and the connection goes on.

use crate::export::{Disk, Export, Exports, ReadRecorder};
use crate::handshake::{ExportInfo, ExportLookup, Handshake, LookupError, Negotiated, Status};
use crate::proto::*;
use fleetboot_images::ImageVersion;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// How long a client may take to negotiate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Extents returned per BLOCK_STATUS request at most.
pub const MAX_EXTENTS: usize = 1024;

/// Serves NBD on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exports: Arc<Exports>) -> io::Result<()> {
    serve_until(listener, exports, std::future::pending()).await
}

/// Serves NBD on `listener` until `shutdown` resolves (connections already open go on until
/// their clients disconnect or the runtime stops).
pub async fn serve_until(
    listener: TcpListener,
    exports: Arc<Exports>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "NBD listening");
    }
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((sock, peer)) => {
                let _ = sock.set_nodelay(true);
                let exports = exports.clone();
                let span = tracing::info_span!("nbd", %peer, export = tracing::field::Empty);
                tokio::spawn(
                    async move {
                        match connection(sock, peer, exports).await {
                            Ok(()) => tracing::debug!("connection closed"),
                            Err(e) => tracing::debug!(error = %e, "connection ended"),
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct Lookup<'a> {
    exports: &'a Arc<Exports>,
    opened: Option<Export>,
}

impl ExportLookup for Lookup<'_> {
    fn list(&mut self) -> Vec<(String, String)> {
        self.exports.list()
    }
    fn lookup(&mut self, name: &str, go: bool) -> Result<ExportInfo, LookupError> {
        if go {
            let (export, info) = self.exports.open(name)?;
            self.opened = Some(export);
            Ok(info)
        } else {
            self.exports.describe(name)
        }
    }
}

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Negotiates; returns the export, the session and bytes already received past it.
async fn negotiate(
    sock: &mut TcpStream,
    exports: &Arc<Exports>,
) -> io::Result<Option<(Export, Negotiated, Vec<u8>)>> {
    let mut hs = Handshake::new();
    let mut lookup = Lookup {
        exports,
        opened: None,
    };
    sock.write_all(&hs.take_output()).await?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
        let (used, status) = hs.handle(&buf, &mut lookup);
        buf.drain(..used);
        let out = hs.take_output();
        if !out.is_empty() {
            sock.write_all(&out).await?;
        }
        match status {
            Status::Continue => {}
            Status::Closed(reason) => {
                tracing::debug!(%reason, "negotiation ended");
                return Ok(None);
            }
            Status::Ready(n) => {
                let export = lookup
                    .opened
                    .take()
                    .ok_or_else(|| bad_data("no export opened".into()))?;
                return Ok(Some((export, n, buf)));
            }
        }
    }
}

async fn connection(
    mut sock: TcpStream,
    peer: SocketAddr,
    exports: Arc<Exports>,
) -> io::Result<()> {
    let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut sock, &exports))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "negotiation timed out"))??;
    let Some((export, session, leftover)) = negotiated else {
        return Ok(());
    };
    tracing::Span::current().record("export", tracing::field::display(&export.name));
    tracing::info!(%peer, size = session.info.size, read_only = export.disk.read_only(), structured = session.structured, "NBD session");
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(256 << 10, io::Cursor::new(leftover).chain(rd));
    let recorder = exports.read_recorder();
    let recorder = recorder.as_deref().map(|r| (r, &export.image));
    let result = transmission(&mut rd, &mut wr, &export.disk, &session, recorder).await;
    let _ = wr.shutdown().await;
    drop(export); // a client's last connection releases its overlay
    result
}

/// Header room kept in front of READ data: structured chunk header + offset.
const HEAD: usize = ChunkHeader::SIZE + 8;

struct Replier<'a, W> {
    wr: &'a mut W,
    structured: bool,
}

impl<W: tokio::io::AsyncWrite + Unpin> Replier<'_, W> {
    async fn simple(&mut self, cookie: u64, error: u32) -> io::Result<()> {
        self.wr
            .write_all(&SimpleReply { error, cookie }.encode())
            .await
    }

    /// An error for READ/BLOCK_STATUS: an error chunk when structured replies are on.
    async fn error(&mut self, cookie: u64, error: u32) -> io::Result<()> {
        if self.structured {
            let mut b = [0u8; ChunkHeader::SIZE + 6];
            b[..ChunkHeader::SIZE].copy_from_slice(
                &ChunkHeader {
                    flags: chunk::FLAG_DONE,
                    kind: chunk::ERROR,
                    cookie,
                    len: 6,
                }
                .encode(),
            );
            b[ChunkHeader::SIZE..].copy_from_slice(&error_chunk_payload(error));
            self.wr.write_all(&b).await
        } else {
            self.simple(cookie, error).await
        }
    }
}

fn errno_of(e: &io::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::PermissionDenied => errno::EPERM,
        io::ErrorKind::InvalidInput => errno::EINVAL,
        io::ErrorKind::StorageFull => errno::ENOSPC,
        io::ErrorKind::OutOfMemory => errno::ENOMEM,
        _ => errno::EIO,
    }
}

async fn blocking(disk: &Disk, f: fn(&Disk) -> io::Result<()>) -> io::Result<()> {
    let d = disk.clone();
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
}

async fn transmission<R, W>(
    rd: &mut R,
    wr: &mut W,
    disk: &Disk,
    s: &Negotiated,
    recorder: Option<(&dyn ReadRecorder, &ImageVersion)>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let size = disk.size();
    let mut r = Replier {
        wr,
        structured: s.structured,
    };
    let mut hdr = [0u8; Request::SIZE];
    // READ: [room for the reply header][data]; WRITE: the payload. Reused, never shrunk.
    let mut buf: Vec<u8> = Vec::new();
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let known_flags = cmdflags::FUA | cmdflags::NO_HOLE | cmdflags::DF | cmdflags::REQ_ONE;
    loop {
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = match Request::parse(&hdr) {
            Ok(Some(req)) => req,
            Ok(None) => unreachable!("28 bytes were read"),
            Err(e) => return Err(bad_data(format!("request: {e}"))),
        };
        let payload = match req.payload_len() {
            Ok(n) => n as usize,
            Err(e) => {
                // We cannot skip what we will not read: say so and close.
                r.simple(req.cookie, errno::EINVAL).await?;
                return Err(bad_data(format!("request: {e}")));
            }
        };
        if payload > 0 {
            if buf.len() < payload {
                buf.resize(payload, 0);
            }
            rd.read_exact(&mut buf[..payload]).await?;
        }
        let len = req.len as u64;
        let in_range = req.offset.checked_add(len).is_some_and(|e| e <= size);
        let writes = matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        if req.flags & !known_flags != 0 {
            match req.command {
                cmd::READ | cmd::BLOCK_STATUS => r.error(req.cookie, errno::EINVAL).await?,
                _ => r.simple(req.cookie, errno::EINVAL).await?,
            }
            continue;
        }
        if writes && disk.read_only() {
            r.simple(req.cookie, errno::EPERM).await?;
            continue;
        }
        match req.command {
            cmd::READ => {
                if !in_range || req.len > MAX_REQUEST_LEN {
                    r.error(req.cookie, errno::EINVAL).await?;
                    continue;
                }
                let n = req.len as usize;
                if n == 0 && s.structured {
                    // An OFFSET_DATA chunk may not be empty.
                    let h = ChunkHeader {
                        flags: chunk::FLAG_DONE,
                        kind: chunk::NONE,
                        cookie: req.cookie,
                        len: 0,
                    };
                    r.wr.write_all(&h.encode()).await?;
                    continue;
                }
                if buf.len() < HEAD + n {
                    buf.resize(HEAD + n, 0);
                }
                match disk.read(req.offset, &mut buf[HEAD..HEAD + n]) {
                    Ok(()) => {
                        if let Some((r, image)) = recorder {
                            r.record_read(image, req.offset, req.len);
                        }
                        let start = if s.structured {
                            let h = ChunkHeader {
                                flags: chunk::FLAG_DONE,
                                kind: chunk::OFFSET_DATA,
                                cookie: req.cookie,
                                len: 8 + req.len,
                            };
                            buf[..ChunkHeader::SIZE].copy_from_slice(&h.encode());
                            buf[ChunkHeader::SIZE..HEAD].copy_from_slice(&req.offset.to_be_bytes());
                            0
                        } else {
                            let h = SimpleReply {
                                error: 0,
                                cookie: req.cookie,
                            }
                            .encode();
                            buf[HEAD - SimpleReply::SIZE..HEAD].copy_from_slice(&h);
                            HEAD - SimpleReply::SIZE
                        };
                        r.wr.write_all(&buf[start..HEAD + n]).await?;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, offset = req.offset, len, "read failed");
                        r.error(req.cookie, errno_of(&e)).await?;
                    }
                }
            }
            cmd::WRITE | cmd::WRITE_ZEROES => {
                if !in_range {
                    r.simple(req.cookie, errno::ENOSPC).await?;
                    continue;
                }
                let res = if req.command == cmd::WRITE {
                    disk.write(req.offset, &buf[..payload])
                } else {
                    disk.write_zeroes(req.offset, len)
                };
                let res = match res {
                    Ok(()) if req.flags & cmdflags::FUA != 0 => blocking(disk, Disk::flush).await,
                    other => other,
                };
                if let Err(e) = &res {
                    tracing::warn!(error = %e, offset = req.offset, len, "write failed");
                }
                r.simple(req.cookie, res.as_ref().map_or_else(errno_of, |_| 0))
                    .await?;
            }
            cmd::TRIM => {
                if !in_range {
                    r.simple(req.cookie, errno::EINVAL).await?;
                    continue;
                }
                let mut res = disk.trim(req.offset, len);
                if res.is_ok() && req.flags & cmdflags::FUA != 0 {
                    res = blocking(disk, Disk::flush).await;
                }
                r.simple(req.cookie, res.as_ref().map_or_else(errno_of, |_| 0))
                    .await?;
            }
            cmd::FLUSH => {
                let res = blocking(disk, Disk::flush).await;
                if let Err(e) = &res {
                    tracing::error!(error = %e, "flush failed");
                }
                r.simple(req.cookie, res.as_ref().map_or_else(errno_of, |_| 0))
                    .await?;
            }
            cmd::BLOCK_STATUS => {
                let Some(ctx) = s.base_allocation else {
                    r.error(req.cookie, errno::EINVAL).await?;
                    continue;
                };
                if !in_range || req.len == 0 {
                    r.error(req.cookie, errno::EINVAL).await?;
                    continue;
                }
                let max = if req.flags & cmdflags::REQ_ONE != 0 {
                    1
                } else {
                    MAX_EXTENTS
                };
                extents.clear();
                match disk.extents(req.offset, req.len, max, &mut extents) {
                    Ok(()) => {
                        let mut out = Vec::with_capacity(ChunkHeader::SIZE + 4 + 8 * extents.len());
                        encode_block_status(&mut out, req.cookie, ctx, &extents);
                        r.wr.write_all(&out).await?;
                    }
                    Err(e) => r.error(req.cookie, errno_of(&e)).await?,
                }
            }
            cmd::DISC => return Ok(()),
            _ => {
                r.simple(req.cookie, errno::EINVAL).await?;
            }
        }
    }
}

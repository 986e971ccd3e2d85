//! The tokio shell: accepts connections, runs [`Handshake`] over the socket, then serves
//! requests against the connection's [`Disk`].
//!
//! Each connection is one task handling its requests in order (clients pipeline; several
//! connections of one client run in parallel and share its overlay). The task only moves
//! bytes: what they mean is [`Transmission`]'s business (the same machine the streaming
//! agent's local disk runs), what the export does with them is the [`BlockDevice`]'s, and
//! [`Responder`] joins the two. A READ costs one `pread` into a reused buffer with room for
//! the reply header and one socket write; a WRITE's payload goes to the disk in pieces as
//! it arrives. FLUSH and FUA, which wait for `fdatasync`, run on the blocking pool.
//!
//! A protocol violation the stream cannot recover from (bad request magic, a WRITE longer
//! than [`crate::proto::MAX_REQUEST_LEN`]) closes that connection only; bad offsets,
//! lengths, flags and unknown commands get an error reply and the connection goes on.

use crate::device::{BlockDevice, Extents, ZeroMode};
use crate::export::{Export, Exports, ReadRecorder};
use crate::handshake::{ExportInfo, ExportLookup, Handshake, LookupError, Negotiated, Status};
use crate::transmission::{Event, InputBuffer, Responder, Transmission};
use fleetboot_images::ImageVersion;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// How long a client may take to negotiate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

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
    let disk: Arc<dyn BlockDevice> = match exports.read_recorder() {
        Some(recorder) => Arc::new(Recorded {
            inner: export.disk.clone(),
            recorder,
            image: export.image.clone(),
        }),
        None => export.disk.clone(),
    };
    let result = transmission(&mut sock, disk, &session, &leftover).await;
    // A client's last connection releases its overlay (a private one is flushed), before
    // the socket closes: a client that saw the close can count on it.
    drop(export);
    let _ = sock.shutdown().await;
    result
}

/// Reports successful READs of a connection's disk to the [`ReadRecorder`].
#[derive(Debug)]
struct Recorded {
    inner: Arc<dyn BlockDevice>,
    recorder: Arc<dyn ReadRecorder>,
    image: ImageVersion,
}

impl BlockDevice for Recorded {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf)?;
        self.recorder
            .record_read(&self.image, offset, buf.len() as u32);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, mode)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }
    fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
        self.inner.block_status(offset, len, out)
    }
}

/// The transmission phase: bytes from the socket into the machine, its commands to the
/// responder, the replies back out. Commands that wait for stable storage run on the
/// blocking pool; reads and writes run here (`pread`/`pwrite` on a warm page cache).
async fn transmission(
    sock: &mut TcpStream,
    disk: Arc<dyn BlockDevice>,
    session: &Negotiated,
    leftover: &[u8],
) -> io::Result<()> {
    let mut machine = Transmission::new(session, disk.block_size());
    let replies = machine.replies();
    let capacity = machine.input_capacity();
    let mut input = InputBuffer::with_leftover(capacity, leftover)
        .ok_or_else(|| bad_data("client sent requests before negotiation ended".into()))?;
    let mut responder = Responder::new();
    let (mut rd, mut wr) = sock.split();
    loop {
        let (used, event) = machine.handle(input.data());
        match event {
            None if used == 0 => {
                let spare = input.spare();
                if spare.is_empty() {
                    // Cannot happen with a buffer from input_capacity(); never read 0 bytes
                    // and take it for the client's EOF.
                    return Err(bad_data("input buffer full mid-request".into()));
                }
                match rd.read(spare).await? {
                    0 if input.is_empty() && !machine.mid_request() => return Ok(()),
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => input.filled(n),
                }
                continue;
            }
            None => {}
            Some(Event::WriteData { offset, data, .. }) => {
                if let Err(error) = Responder::write_data(&*disk, offset, data) {
                    machine.write_failed(error);
                }
            }
            Some(Event::Command { cookie, command }) if command.syncs() => {
                let d = disk.clone();
                let reply = tokio::task::spawn_blocking(move || {
                    Responder::new().execute(&*d, replies, cookie, command).to_vec()
                })
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
                wr.write_all(&reply).await?;
            }
            Some(Event::Command { cookie, command }) => {
                wr.write_all(responder.execute(&*disk, replies, cookie, command))
                    .await?;
            }
            Some(Event::Reject {
                cookie,
                command,
                error,
                message,
            }) => {
                tracing::debug!(command, error, message, "request refused");
                wr.write_all(responder.reject(replies, cookie, error, message))
                    .await?;
            }
            Some(Event::Disconnect) => return Ok(()),
            Some(Event::Close(e)) => return Err(bad_data(e.to_string())),
        }
        input.consume(used);
    }
}

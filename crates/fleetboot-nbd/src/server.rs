//! The tokio shell: accepts connections within the [`Limits`], runs [`Handshake`] over the
//! socket (upgrading it to TLS on `NBD_OPT_STARTTLS`), checks what the client names against
//! the [`Access`] rules, then serves requests against the connection's disk.
//!
//! Each connection is one task handling its requests in order (clients pipeline; several
//! connections of one client run in parallel and share its overlay). The task only moves
//! bytes: what they mean is [`Transmission`]'s business (the same machine the streaming
//! agent's local disk runs), what the export does with them is the [`BlockDevice`]'s, and
//! [`Responder`] joins the two. Everything that touches a disk — each READ piece, each
//! piece of a WRITE's payload, FLUSH, the catalog lookups and overlay opens and closes of
//! the handshake — runs on the server's [`DiskPool`], never on the tokio workers, which
//! in `fleetboot serve` also answer DHCP and HTTP.
//!
//! A protocol violation the stream cannot recover from (bad request magic, a WRITE longer
//! than [`crate::proto::MAX_REQUEST_LEN`], a READ that fails after its reply began without
//! structured replies) closes that connection only; bad offsets, lengths, flags and unknown
//! commands get an error reply and the connection goes on.
//!
//! On plain TCP a READ piece that is one run of one file and already in the page cache
//! ([`BlockDevice::cached_file_span`]) is not read at all: its reply header goes out with
//! `MSG_MORE` and the bytes follow with `sendfile(2)`, straight from the page cache into
//! the socket on the connection's own task. Only pieces that would wait for the disk, and
//! every piece over TLS, are read into a buffer (on the [`DiskPool`] when they wait).

use crate::access::{Access, Decision};
use crate::device::{BlockDevice, Extents, FileRun, ZeroMode};
use crate::export::{Export, ExportName, Exports, ReadRecorder};
use crate::handshake::{ExportInfo, ExportLookup, Handshake, LookupError, Session, Status, TlsPolicy};
use crate::limits::{Activity, Admission, Limits, LogEvery};
use crate::pool::DiskPool;
use crate::tls::Tls;
use crate::transmission::{Event, InputBuffer, Responder, Transmission};
use fleetboot_images::ImageVersion;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

/// How the server runs: who may open what, its bounds, TLS.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub access: Access,
    pub limits: Limits,
    pub tls: Option<Tls>,
    /// Send READ data the page cache holds with `sendfile(2)` on plain TCP (the default);
    /// false copies every piece through a buffer, as over TLS.
    pub send_from_files: bool,
}

impl ServerOptions {
    /// `access` with the default [`Limits`], no TLS, READ data sent from files.
    pub fn new(access: Access) -> ServerOptions {
        ServerOptions { access, limits: Limits::default(), tls: None, send_from_files: true }
    }
}

/// Bytes of READ replies sent with `sendfile(2)` and through a buffer, by this process.
static BYTES_FROM_FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static BYTES_COPIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of READ replies (headers and data) this process's NBD servers have sent so far:
/// `(data with sendfile, through a buffer)` (also the `fleetboot_nbd_read_bytes_total`
/// metric, by `path`).
pub fn read_bytes_sent() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (BYTES_FROM_FILES.load(Relaxed), BYTES_COPIED.load(Relaxed))
}

fn count_read_bytes(from_file: bool, n: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    let (total, path) = if from_file { (&BYTES_FROM_FILES, "sendfile") } else { (&BYTES_COPIED, "copy") };
    total.fetch_add(n as u64, Relaxed);
    metrics::counter!("fleetboot_nbd_read_bytes_total", "path" => path).increment(n as u64);
}

/// Serves NBD on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exports: Arc<Exports>, options: ServerOptions) -> io::Result<()> {
    serve_until(listener, exports, options, std::future::pending()).await
}

struct Server {
    exports: Arc<Exports>,
    access: Access,
    limits: Limits,
    tls: Option<Tls>,
    pool: DiskPool,
    admission: Arc<Admission>,
    send_from_files: bool,
}

static REFUSED_EXPORTS: LogEvery = LogEvery::new(Duration::from_secs(10));
/// Any host can fail TLS handshakes at will: at most one line per 10 s says so.
static TLS_FAILURES: LogEvery = LogEvery::new(Duration::from_secs(10));
static ACCEPT_FAILED: LogEvery = LogEvery::new(Duration::from_secs(10));

/// Serves NBD on `listener` until `shutdown` resolves (connections already open go on until
/// their clients disconnect or the runtime stops).
pub async fn serve_until(
    listener: TcpListener,
    exports: Arc<Exports>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    let limits = options.limits;
    let server = Arc::new(Server {
        pool: DiskPool::new(limits.io_threads, limits.max_connections + 64)?,
        admission: Admission::new(&limits),
        exports,
        access: options.access,
        tls: options.tls,
        send_from_files: options.send_from_files,
        limits,
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            allow = %server.access.allow,
            tls = ?server.tls.as_ref().map(|t| t.policy),
            max_connections = server.limits.max_connections,
            max_connections_per_client = server.limits.max_connections_per_client,
            "NBD listening"
        );
    }
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((sock, peer)) => {
                let Some(ticket) = server.admission.admit_or_count(peer, ("nbd.max_connections", "nbd.max_connections_per_client")) else {
                    drop(sock);
                    continue;
                };
                let _ = sock.set_nodelay(true);
                crate::limits::keep_alive(&sock);
                let server = server.clone();
                let span = tracing::info_span!("nbd", %peer, export = tracing::field::Empty);
                tokio::spawn(
                    async move {
                        match connection(&server, sock, peer, &ticket.activity).await {
                            Ok(()) => tracing::debug!("connection closed"),
                            Err(e) => tracing::debug!(error = %e, "connection ended"),
                        }
                        drop(ticket);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                metrics::counter!("fleetboot_nbd_accept_errors_total").increment(1);
                if let Some(held_back) = ACCEPT_FAILED.allow() {
                    tracing::warn!(error = %e, held_back, "NBD accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A connection, in plain text or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Resolves exports for one connection, applying the server's [`Access`] rules.
struct Lookup {
    server: Arc<Server>,
    peer: IpAddr,
    opened: Option<Export>,
}

impl Lookup {
    fn refused(&self, what: &str, reason: &'static str, detail: &str) -> LookupError {
        metrics::counter!("fleetboot_nbd_exports_refused_total", "reason" => reason).increment(1);
        if let Some(held_back) = REFUSED_EXPORTS.allow() {
            tracing::warn!(peer = %self.peer, what, reason, detail, held_back, "NBD export refused");
        }
        LookupError::Policy(format!("{what}: {detail}"))
    }

    /// Whether this peer may have `en` at all.
    fn check(&self, en: &ExportName) -> Result<(), LookupError> {
        let what = en.to_string();
        match en.mac() {
            None if self.server.access.allow.allows(self.peer) => Ok(()),
            None => Err(self.refused(&what, "not_allowed", "this address may not read catalog images (nbd.allow)")),
            Some(mac) => match self.server.access.clients.may_open(self.peer, mac, en.capability.as_deref()) {
                Decision::Allow => Ok(()),
                Decision::Refuse { reason, detail } => Err(self.refused(&what, reason, &detail)),
            },
        }
    }
}

impl ExportLookup for Lookup {
    fn list(&mut self) -> Result<Vec<(String, String)>, LookupError> {
        if !self.server.access.allow.allows(self.peer) {
            return Err(self.refused("the export list", "not_allowed", "this address may not list catalog images (nbd.allow)"));
        }
        Ok(self.server.exports.list())
    }

    fn lookup(&mut self, name: &str, go: bool) -> Result<ExportInfo, LookupError> {
        let en = ExportName::parse(name).map_err(LookupError::Unknown)?;
        self.check(&en)?;
        if !go {
            return self.server.exports.describe(&en);
        }
        match self.server.exports.open(&en, self.peer) {
            Ok((export, info)) => {
                self.opened = Some(export);
                Ok(info)
            }
            Err(LookupError::Policy(detail)) => Err(self.refused(&en.to_string(), "in_use", &detail)),
            Err(e) => Err(e),
        }
    }
}

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Releases a connection's export on the disk threads: the last connection of a client
/// closes its overlay, which flushes and fsyncs a private one.
async fn release(server: &Server, export: Export) {
    if server.pool.run(move || drop(export)).await.is_err() {
        tracing::error!("releasing an export failed");
    }
}

/// A connection past its handshake: its stream, export, session and the bytes already
/// received after the handshake.
type Ready = (Stream, Export, Session, Vec<u8>);

/// Runs the handshake (upgrading to TLS when asked); `None` when the client went away or
/// the handshake ended without an export.
async fn run_handshake(server: &Arc<Server>, sock: TcpStream, peer: SocketAddr) -> io::Result<Option<Ready>> {
    let policy = server.tls.as_ref().map_or(TlsPolicy::Off, |t| t.policy);
    let mut stream = Stream::Plain(sock);
    let mut hs = Handshake::with_tls(policy);
    let mut lookup = Lookup { server: server.clone(), peer: peer.ip(), opened: None };
    stream.write_all(&hs.take_output()).await?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
        // Catalog reads and overlay opens happen in here: off the async workers.
        let (h, l, b, used, status, out) = server
            .pool
            .run(move || {
                let (used, status) = hs.handle(&buf, &mut lookup);
                let out = hs.take_output();
                (hs, lookup, buf, used, status, out)
            })
            .await?;
        (hs, lookup, buf) = (h, l, b);
        buf.drain(..used);
        let opened = lookup.opened.take();
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                if let Some(export) = opened {
                    release(server, export).await;
                }
                return Err(e);
            }
        }
        match status {
            Status::Continue => {}
            Status::StartTls => {
                if !buf.is_empty() {
                    return Err(bad_data("the client sent data before the TLS handshake".into()));
                }
                let (Stream::Plain(tcp), Some(tls)) = (stream, &server.tls) else {
                    return Err(bad_data("STARTTLS without TLS".into()));
                };
                match tls.acceptor.accept(tcp).await {
                    Ok(s) => stream = Stream::Tls(Box::new(s)),
                    Err(e) => {
                        metrics::counter!("fleetboot_nbd_tls_failures_total").increment(1);
                        if let Some(held_back) = TLS_FAILURES.allow() {
                            tracing::info!(%peer, error = %e, held_back, "NBD TLS handshake failed");
                        }
                        return Ok(None);
                    }
                }
                hs.tls_established();
            }
            Status::Closed(reason) => {
                tracing::debug!(%reason, "handshake ended");
                return Ok(None);
            }
            Status::Ready(n) => {
                let export = opened.ok_or_else(|| bad_data("no export opened".into()))?;
                return Ok(Some((stream, export, n, buf)));
            }
        }
    }
}

async fn connection(server: &Arc<Server>, sock: TcpStream, peer: SocketAddr, activity: &Activity) -> io::Result<()> {
    let ready = match tokio::time::timeout(server.limits.handshake_timeout, run_handshake(server, sock, peer)).await {
        Ok(r) => r?,
        Err(_) => {
            metrics::counter!("fleetboot_nbd_connections_timed_out_total", "phase" => "handshake").increment(1);
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"));
        }
    };
    let Some((mut stream, export, session, leftover)) = ready else {
        return Ok(());
    };
    tracing::Span::current().record("export", tracing::field::display(&export.name));
    tracing::info!(
        %peer,
        size = session.info.size,
        read_only = export.disk.read_only(),
        structured = session.structured,
        tls = matches!(stream, Stream::Tls(_)),
        "NBD session"
    );
    let disk: Arc<dyn BlockDevice> = match server.exports.read_recorder() {
        Some(recorder) => Arc::new(Recorded {
            inner: export.disk.clone(),
            recorder,
            image: export.image.clone(),
        }),
        None => export.disk.clone(),
    };
    let result = transmission(server, &mut stream, disk, &session, &leftover, activity).await;
    // A client's last connection releases its overlay (a private one is flushed), before
    // the socket closes: a client that saw the close can count on it.
    release(server, export).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
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
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let cached = self.inner.read_cached(offset, buf)?;
        if cached {
            self.recorder.record_read(&self.image, offset, buf.len() as u32);
        }
        Ok(cached)
    }
    fn cached_file_runs<'a>(&'a self, offset: u64, len: u64, runs: &mut Vec<FileRun<'a>>) -> bool {
        let cached = self.inner.cached_file_runs(offset, len, runs);
        if cached {
            self.recorder.record_read(&self.image, offset, len as u32);
        }
        cached
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

/// What the machine's event asks the shell to do, without borrowing the input buffer.
enum Step {
    NeedInput,
    Consumed,
    Write { offset: u64, len: usize },
    Execute { cookie: u64, command: crate::transmission::Command },
    Reject { cookie: u64, command: u16, error: u32, message: &'static str },
    Disconnect,
    Close(String),
}

/// Sends `bytes`, giving up when the client stops reading for `limit`.
async fn send(stream: &mut Stream, bytes: &[u8], limit: Duration) -> io::Result<()> {
    let sent = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(limit, sent).await {
        Ok(r) => r,
        Err(_) => {
            metrics::counter!("fleetboot_nbd_connections_timed_out_total", "phase" => "reply").increment(1);
            Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading replies"))
        }
    }
}

/// Sends `header`, then the bytes of `runs` with `sendfile(2)`, giving up when the client
/// stops reading for `limit`; the number of data bytes sent. The bytes are in the page
/// cache (the device said so just before), so this waits for the client, not the disk.
async fn send_from_files(stream: &mut Stream, header: &[u8], runs: &[FileRun<'_>], limit: Duration) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let Stream::Plain(tcp) = stream else {
        return Err(io::Error::other("sendfile over TLS"));
    };
    let sent = async {
        let fd = tcp.as_raw_fd();
        let mut header = header;
        while !header.is_empty() {
            tcp.writable().await?;
            // SAFETY: send(2) reads `header`, alive for the call.
            let r = tcp.try_io(Interest::WRITABLE, || {
                let n = unsafe { libc::send(fd, header.as_ptr().cast(), header.len(), libc::MSG_MORE | libc::MSG_NOSIGNAL) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match r {
                Ok(n) => header = &header[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let mut sent = 0;
        for run in runs {
            let mut offset = libc::off_t::try_from(run.offset).map_err(|_| io::Error::other("file offset out of range"))?;
            let mut left = usize::try_from(run.len).map_err(|_| io::Error::other("run too long"))?;
            while left > 0 {
                tcp.writable().await?;
                // SAFETY: sendfile(2) between two descriptors open for the call; `offset` is ours.
                let r = tcp.try_io(Interest::WRITABLE, || {
                    let n = unsafe { libc::sendfile(fd, run.file.as_raw_fd(), &mut offset, left) };
                    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
                });
                match r {
                    // The file is shorter than the device said: the reply cannot be finished.
                    Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ended inside a READ reply")),
                    Ok(n) => {
                        left -= n.min(left);
                        sent += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(sent)
    };
    match tokio::time::timeout(limit, sent).await {
        Ok(r) => r,
        Err(_) => {
            metrics::counter!("fleetboot_nbd_connections_timed_out_total", "phase" => "reply").increment(1);
            Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading replies"))
        }
    }
}

/// The transmission phase: bytes from the socket into the machine, its commands to the
/// responder on the disk threads, the replies back out.
async fn transmission(
    server: &Server,
    stream: &mut Stream,
    disk: Arc<dyn BlockDevice>,
    session: &Session,
    leftover: &[u8],
    activity: &Activity,
) -> io::Result<()> {
    let limit = server.limits.request_timeout;
    let mut machine = Transmission::new(session, disk.block_size());
    let replies = machine.replies();
    let capacity = machine.input_capacity();
    let mut input = InputBuffer::with_leftover(capacity, leftover)
        .ok_or_else(|| bad_data("client sent requests before the handshake ended".into()))?;
    let mut responder = Responder::new();
    // Where the READ piece being sent lies in files (reused: no allocation per piece).
    let mut runs = Vec::new();
    loop {
        let (used, event) = machine.handle(input.data());
        let step = match event {
            None if used == 0 => Step::NeedInput,
            None => Step::Consumed,
            Some(Event::WriteData { offset, data, .. }) => Step::Write { offset, len: data.len() },
            Some(Event::Command { cookie, command }) => Step::Execute { cookie, command },
            Some(Event::Reject { cookie, command, error, message }) => Step::Reject { cookie, command, error, message },
            Some(Event::Disconnect) => Step::Disconnect,
            Some(Event::Close(e)) => Step::Close(e.to_string()),
        };
        match step {
            Step::NeedInput => {
                let idle = input.is_empty() && !machine.mid_request();
                let spare = input.spare();
                if spare.is_empty() {
                    // Cannot happen with a buffer from input_capacity(); never read 0 bytes
                    // and take it for the client's EOF.
                    return Err(bad_data("input buffer full mid-request".into()));
                }
                let n = if idle {
                    // Between requests a client may stay quiet as long as it likes, unless
                    // its slot is needed (see crate::limits).
                    activity.idle();
                    tokio::select! {
                        r = stream.read(spare) => r?,
                        _ = activity.evicted() => {
                            tracing::info!("idle NBD connection closed to make room for another");
                            return Ok(());
                        }
                    }
                } else {
                    match tokio::time::timeout(limit, stream.read(spare)).await {
                        Ok(r) => r?,
                        Err(_) => {
                            metrics::counter!("fleetboot_nbd_connections_timed_out_total", "phase" => "request").increment(1);
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "the client stalled mid-request"));
                        }
                    }
                };
                activity.busy();
                match n {
                    0 if input.is_empty() && !machine.mid_request() => return Ok(()),
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => input.filled(n),
                }
                continue;
            }
            Step::Consumed => {}
            Step::Write { offset, len } => {
                let d = disk.clone();
                let (buf, res) = server
                    .pool
                    .run(move || {
                        let res = Responder::write_data(&*d, offset, &input.data()[..len]);
                        (input, res)
                    })
                    .await?;
                input = buf;
                if let Err(error) = res {
                    machine.write_failed(error);
                }
            }
            Step::Execute { cookie, command } => {
                let from_files = server.send_from_files && matches!(stream, Stream::Plain(_));
                // A READ piece in the page cache goes from the file to the socket; else a
                // READ from the page cache is a copy, done here; anything that would wait
                // for the disk goes to the disk threads.
                match from_files && responder.execute_from_files(&*disk, replies, cookie, command, &mut runs) {
                    true => {
                        let n = send_from_files(stream, responder.last_reply(), &runs, limit).await?;
                        count_read_bytes(true, responder.last_reply().len() + n);
                    }
                    false => {
                        if responder.execute_cached(&*disk, replies, cookie, command).is_none() {
                            let d = disk.clone();
                            responder = server
                                .pool
                                .run(move || {
                                    responder.execute(&*d, replies, cookie, command);
                                    responder
                                })
                                .await?;
                        }
                        send(stream, responder.last_reply(), limit).await?;
                        if matches!(command, crate::transmission::Command::Read { .. }) {
                            count_read_bytes(false, responder.last_reply().len());
                        }
                    }
                }
                while responder.read_pending() {
                    if from_files && responder.continue_read_from_files(&*disk, &mut runs) {
                        let n = send_from_files(stream, responder.last_reply(), &runs, limit).await?;
                        count_read_bytes(true, responder.last_reply().len() + n);
                        continue;
                    }
                    let res = match responder.continue_read_cached(&*disk) {
                        Some(res) => res.map(drop).map_err(|e| e.to_string()),
                        None => {
                            let d = disk.clone();
                            let res;
                            (responder, res) = server
                                .pool
                                .run(move || {
                                    let res = responder.continue_read(&*d).map(drop).map_err(|e| e.to_string());
                                    (responder, res)
                                })
                                .await?;
                            res
                        }
                    };
                    res.map_err(bad_data)?;
                    send(stream, responder.last_reply(), limit).await?;
                    count_read_bytes(false, responder.last_reply().len());
                }
            }
            Step::Reject { cookie, command, error, message } => {
                tracing::debug!(command, error, message, "request refused");
                send(stream, responder.reject(replies, cookie, error, message), limit).await?;
            }
            Step::Disconnect => return Ok(()),
            Step::Close(e) => return Err(bad_data(e)),
        }
        input.consume(used);
    }
}

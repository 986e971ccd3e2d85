//! The boot network's HTTP/1.1 connections, served so that files and images go from the
//! page cache to the socket with sendfile(2) instead of being copied through fleetboot.
//!
//! Each connection accepted on `http.listen` is read here: the request head is parsed at
//! the boundary ([`parse_head`]: at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields,
//! anything else answered 400/431 and closed), turned into an `http::Request` and handed to
//! the same axum [`Router`] as before — routing, authorization, refusals, traces, metrics
//! and limits are the routes' own. The request carries [`CanSendFile`]; a file or image
//! route that sees it answers with its headers and a [`SendFile`] instead of a body, and
//! this module sends that span with sendfile(2) (counted in
//! `fleetboot_http_sendfile_bytes_total`). Every other response is written as it comes
//! (Content-Length, or chunked). Connections are kept alive between requests (HTTP/1.1,
//! pipelining included) until the client or the response says `close`, or the service
//! stops.
//!
//! A request this module does not serve itself — a body (POST, PUT...), HTTP/1.0,
//! `Upgrade`, `Expect` — hands its whole connection, with the bytes already read replayed
//! first, to hyper through [`Handoff`], which stays with it to its end (and streams files
//! through user space, like TLS connections do).

use super::accept::Held;
use super::transfer_gate::{Admitted, TransferGate, GATED_FROM, STALL};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use axum::Router;
use futures_util::StreamExt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

/// The longest request head (request line and fields) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// The most header fields in one request.
pub const MAX_HEADERS: usize = 64;
/// The most bytes one sendfile(2) call is asked for: a slow reader's connection yields
/// to the others between calls.
const SENDFILE_CHUNK: usize = 1 << 20;

/// In a request's extensions: its connection can take a [`SendFile`] response.
#[derive(Debug, Clone, Copy)]
pub struct CanSendFile;

/// In a response's extensions (whose body is then empty): send `count` bytes of `file`
/// from `start` with sendfile(2).
#[derive(Debug, Clone)]
pub struct SendFile {
    pub file: Arc<std::fs::File>,
    pub start: u64,
    pub count: u64,
}

/// A request head, parsed.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    /// HTTP/1.1 (else 1.0).
    pub http11: bool,
    pub headers: HeaderMap,
    /// Bytes of the buffer the head took.
    pub len: usize,
}

/// What the start of a connection's buffer holds.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet (and under [`MAX_HEAD`]).
    Partial,
    Complete(Box<Head>),
    /// Longer than [`MAX_HEAD`] or more than [`MAX_HEADERS`] fields: 431.
    TooLarge,
    /// Not an HTTP/1.x request head: 400.
    Invalid(&'static str),
}

/// Parses the request head at the start of `buf`. Never panics, whatever `buf` holds.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Parsed::TooLarge,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Parsed::TooLarge,
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
        Err(_) => return Parsed::Invalid("malformed request head"),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid("incomplete request line");
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Invalid("bad method");
    };
    // Origin form only ("/path?query"): what boot clients send.
    if !path.starts_with('/') {
        return Parsed::Invalid("request target is not a path");
    }
    let Ok(uri) = path.parse::<Uri>() else {
        return Parsed::Invalid("bad request target");
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for f in req.headers.iter() {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(f.name.as_bytes()), HeaderValue::from_bytes(f.value)) else {
            return Parsed::Invalid("bad header field");
        };
        headers.append(name, value);
    }
    Parsed::Complete(Box::new(Head { method, uri, http11: version == 1, headers, len }))
}

impl Head {
    /// Whether this module serves the request (else the connection goes to hyper): a
    /// bodiless GET or HEAD over HTTP/1.1, nothing to negotiate.
    pub fn served_here(&self) -> bool {
        let bodiless = self.headers.get(header::CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0")
            && !self.headers.contains_key(header::TRANSFER_ENCODING);
        self.http11
            && (self.method == Method::GET || self.method == Method::HEAD)
            && bodiless
            && !self.headers.contains_key(header::UPGRADE)
            && !self.headers.contains_key(header::EXPECT)
    }

    /// Whether the client asked for the connection to end after this request.
    fn wants_close(&self) -> bool {
        has_token(&self.headers, "close")
    }
}

fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Connections this module gives to hyper (see the module documentation).
pub struct Handoff {
    rx: mpsc::Receiver<(Replayed, SocketAddr)>,
    local: SocketAddr,
}

pub type HandoffSender = mpsc::Sender<(Replayed, SocketAddr)>;

impl Handoff {
    /// `capacity`: connections waiting for hyper to take them.
    pub fn new(local: SocketAddr, capacity: usize) -> (HandoffSender, Handoff) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (tx, Handoff { rx, local })
    }
}

impl axum::serve::Listener for Handoff {
    type Io = Replayed;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Replayed, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // Every sender is gone: the service is stopping, nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Replayed {
    already: Vec<u8>,
    at: usize,
    io: Held<TcpStream>,
}

impl AsyncRead for Replayed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.already.len() {
            let n = (this.already.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.already[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves one connection until it ends, the service stops (`stop`; after the response in
/// progress), or it is handed to hyper.
pub async fn serve(
    mut io: Held<TcpStream>,
    peer: SocketAddr,
    router: Router,
    handoff: HandoffSender,
    gate: Arc<TransferGate>,
    stop: CancellationToken,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_HEAD);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Parsed::Complete(head) => break *head,
                Parsed::Partial => {}
                Parsed::TooLarge => {
                    metrics::counter!("fleetboot_http_bad_requests_total", "reason" => "too_large").increment(1);
                    let _ = refuse(&mut io, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await;
                    return;
                }
                Parsed::Invalid(why) => {
                    metrics::counter!("fleetboot_http_bad_requests_total", "reason" => "malformed").increment(1);
                    tracing::debug!(%peer, why, "bad HTTP request head; connection closed");
                    let _ = refuse(&mut io, StatusCode::BAD_REQUEST).await;
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            let room = (MAX_HEAD - buf.len()).min(chunk.len());
            let read = tokio::select! {
                r = io.read(&mut chunk[..room]) => r,
                // Between requests or in the middle of a head: nothing is owed.
                _ = stop.cancelled() => return,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if !head.served_here() {
            // hyper takes the connection from here, reading the bytes already read again.
            // Once stopping, hyper takes no more connections: this one is closed instead.
            tokio::select! {
                _ = handoff.send((Replayed { already: buf, at: 0, io }, peer)) => {}
                _ = stop.cancelled() => {}
            }
            return;
        }
        buf.drain(..head.len);
        let keep_alive = !head.wants_close() && !stop.is_cancelled();
        let head_only = head.method == Method::HEAD;
        let mut req = Request::builder().method(head.method).uri(head.uri).body(Body::empty()).unwrap_or_default();
        *req.headers_mut() = head.headers;
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(CanSendFile);
        let mut router = router.clone();
        // The router is always ready and never fails (its error type is Infallible).
        let Ok(()) = std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut router, cx)).await;
        let Ok(resp) = router.call(req).await;
        let keep_alive = keep_alive && !has_token(resp.headers(), "close");
        match respond(&mut io, resp, head_only, keep_alive, &gate, peer).await {
            Ok(true) if keep_alive => {}
            _ => return,
        }
    }
}

/// A bare error answer to a request that could not be read, before closing.
async fn refuse(io: &mut Held<TcpStream>, status: StatusCode) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    io.write_all(head.as_bytes()).await?;
    io.flush().await
}

/// Writes `resp`; `Ok(false)` when the connection cannot carry another response (its body
/// ended short). A large file waits for its place in `gate` first.
async fn respond(
    io: &mut Held<TcpStream>,
    resp: Response<Body>,
    head_only: bool,
    keep_alive: bool,
    gate: &Arc<TransferGate>,
    peer: SocketAddr,
) -> io::Result<bool> {
    let (parts, body) = resp.into_parts();
    let send_file = parts.extensions.get::<SendFile>().cloned();
    // Before the head: the head is corked to leave with the body's first bytes.
    let mut place = match &send_file {
        Some(sf) if !head_only && sf.count >= GATED_FROM => Some(gate.admit(peer.ip()).await),
        _ => None,
    };
    if let Some(p) = &place {
        let admitted = match p.admitted {
            Admitted::AtOnce => "at_once",
            Admitted::Queued => "queued",
            Admitted::WaitedTooLong => "waited_too_long",
        };
        metrics::counter!("fleetboot_http_transfers_admitted_total", "how" => admitted).increment(1);
    }
    let status = parts.status;
    let no_body = head_only || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let length = match send_file.as_ref() {
        Some(sf) => Some(sf.count),
        None => parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            // Like hyper: a body whose size is known (an empty one, say) gets its length.
            .or_else(|| axum::body::HttpBody::size_hint(&body).exact()),
    };
    let length_header = length.is_some() && !parts.headers.contains_key(header::CONTENT_LENGTH);
    let chunked = length.is_none() && !no_body;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or("")).as_bytes());
    for (name, value) in parts.headers.iter() {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING || name.as_str() == "keep-alive" {
            continue;
        }
        if name == header::CONTENT_LENGTH && send_file.is_some() {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length.filter(|_| send_file.is_some() || length_header) {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // Corked: the head leaves in the same segment as the first bytes of the body, and a
    // small body is not held back waiting for the head's acknowledgement.
    let _cork = Cork::new(io.tcp());
    if no_body {
        io.write_all(&out).await?;
        io.flush().await?;
        return Ok(true);
    }
    if let Some(sf) = send_file {
        io.write_all(&out).await?;
        let (mut offset, end) = (sf.start, sf.start + sf.count);
        while offset < end {
            let want = usize::try_from(end - offset).unwrap_or(usize::MAX).min(SENDFILE_CHUNK);
            let send = std::future::poll_fn(|cx| io.poll_sendfile(cx, &sf.file, &mut offset, want));
            let n = match place.as_mut().filter(|p| p.holds_place()) {
                Some(p) => match tokio::time::timeout(STALL, send).await {
                    Ok(sent) => sent?,
                    Err(_) => {
                        // Its client is not reading: the next transfer gets the place.
                        p.give_back();
                        metrics::counter!("fleetboot_http_transfers_stalled_total").increment(1);
                        continue;
                    }
                },
                None => send.await?,
            };
            if n == 0 {
                // The file is shorter than when it was opened: the promised length cannot
                // be kept, only the connection's end tells the client.
                tracing::warn!(missing = end - offset, "a file shrank while it was being sent; connection closed");
                return Ok(false);
            }
            metrics::counter!("fleetboot_http_sendfile_bytes_total").increment(n as u64);
        }
        return Ok(true);
    }
    io.write_all(&out).await?;
    let mut stream = body.into_data_stream();
    let mut sent = 0u64;
    while let Some(data) = stream.next().await {
        let Ok(data) = data else {
            // The body failed midway: the client can only tell by the connection closing.
            return Ok(false);
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if chunked {
            io.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
            io.write_all(&data).await?;
            io.write_all(b"\r\n").await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    io.flush().await?;
    Ok(length.is_none_or(|l| l == sent))
}

/// TCP_CORK on a socket while it lives: partial segments wait to be filled.
struct Cork(std::os::fd::RawFd);

impl Cork {
    fn new(tcp: &TcpStream) -> Cork {
        use std::os::fd::AsRawFd;
        set_cork(tcp.as_raw_fd(), true);
        Cork(tcp.as_raw_fd())
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        // The socket outlives this guard (it is dropped before the connection).
        set_cork(self.0, false);
    }
}

fn set_cork(fd: std::os::fd::RawFd, on: bool) {
    let v: libc::c_int = on.into();
    // SAFETY: an open socket descriptor and a pointer to an int of the size given.
    // Failing only costs a segment; nothing to do about it.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_boot_clients_request_is_parsed_and_served_here() {
        let raw = b"GET /files/vmlinuz HTTP/1.1\r\nHost: 10.0.0.1\r\nRange: bytes=0-99\r\n\r\nGET /next";
        let Parsed::Complete(head) = parse_head(raw) else { panic!("not complete") };
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.path(), "/files/vmlinuz");
        assert_eq!(head.headers.get(header::RANGE).unwrap(), "bytes=0-99");
        assert_eq!(&raw[head.len..], b"GET /next");
        assert!(head.served_here());
    }

    #[test]
    fn bodies_http10_and_upgrades_go_to_hyper() {
        for raw in [
            &b"POST /api/x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"GET /files/a HTTP/1.0\r\n\r\n",
            b"GET /files/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ] {
            let Parsed::Complete(head) = parse_head(raw) else { panic!("not complete") };
            assert!(!head.served_here(), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn oversized_heads_and_too_many_fields_are_refused() {
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        assert!(matches!(parse_head(&long), Parsed::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse_head(&many), Parsed::TooLarge));
        assert!(matches!(parse_head(b"GET http://x/ HTTP/1.1\r\n\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse_head(b"\x00\x01 / HTTP/1.1\r\n\r\n"), Parsed::Invalid(_)));
        assert!(matches!(parse_head(b"GET /files/a HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever arrives, parsing returns; a complete head never claims more than it was given.
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Parsed::Complete(head) = parse_head(&bytes) {
                prop_assert!(head.len <= bytes.len());
            }
        }

        /// Mutations of a real head (a byte replaced, the head cut) never panic either.
        #[test]
        fn mutated_heads_parse_without_panicking(at in 0usize..120, byte in any::<u8>(), cut in 0usize..120) {
            let mut raw = b"GET /files/boot/vmlinuz?x=1 HTTP/1.1\r\nHost: 10.1.0.1\r\nRange: bytes=-500\r\nConnection: keep-alive\r\n\r\n".to_vec();
            let at = at % raw.len();
            raw[at] = byte;
            raw.truncate(cut.max(1).min(raw.len()));
            let _ = parse_head(&raw);
        }

        /// A well-formed GET comes back as sent: the path and every field.
        #[test]
        fn well_formed_heads_round_trip(path in "/[a-zA-Z0-9._~/%-]{0,64}", fields in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~&&[^ ]]{1,32}"), 0..10)) {
            let mut raw = format!("GET {path} HTTP/1.1\r\n");
            for (k, v) in &fields {
                raw.push_str(&format!("X-{k}: {v}\r\n"));
            }
            raw.push_str("\r\n");
            match parse_head(raw.as_bytes()) {
                Parsed::Complete(head) => {
                    prop_assert_eq!(head.uri.path(), path.as_str());
                    prop_assert_eq!(head.len, raw.len());
                    prop_assert_eq!(head.headers.len(), fields.len());
                    prop_assert!(head.served_here());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}

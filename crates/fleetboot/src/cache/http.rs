//! The cache's HTTP service for its site's clients, the same paths as the origin's:
//!
//! - `GET /boot/start.ipxe`: chains to the client's own script (for DHCP servers that hand
//!   every client one file name);
//! - `GET /boot/{mac}.ipxe`: the client's script (from the origin's plan, or the image map
//!   while the origin is unreachable);
//! - `GET|HEAD /files/{path}`, `GET|HEAD /images/{name}`: an object, with `Range`, only
//!   ever from verified chunks (a client that arrives mid-fill waits for each chunk).
//!
//! On the transparent listener (connections a gateway diverted from the origin's
//! address), every other request is passed through to the address the client asked for.

use super::objects::{Counters, ReaderGuard};
use super::Cache;
use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fleetboot_boot::MacAddr;
use fleetboot_images::range::{byte_range, Unsatisfiable};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use crate::serve::accept::Accepting;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Both ends of a client's connection: on the transparent listener `local` is the address
/// the client meant (the origin's).
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

impl Connected<axum::serve::IncomingStream<'_, Accepting>> for Conn {
    fn connect_info(s: axum::serve::IncomingStream<'_, Accepting>) -> Conn {
        let peer = *s.remote_addr();
        Conn { peer, local: s.io().local_addr().unwrap_or(peer) }
    }
}

#[derive(Clone)]
struct App {
    cache: Arc<Cache>,
    transparent: bool,
}

pub fn router(cache: Arc<Cache>, transparent: bool) -> Router {
    let r = Router::new()
        .route("/boot/{script}", get(script))
        .route("/files/{*path}", get(file))
        .route("/images/{spec}", get(image));
    let r = if transparent { r.fallback(pass_through) } else { r };
    r.with_state(App { cache, transparent })
}

/// Serves `listener` until `stop` says so.
pub async fn serve(cache: Arc<Cache>, listener: TcpListener, transparent: bool, mut stop: watch::Receiver<bool>) -> Result<()> {
    tracing::info!(listen = %listener.local_addr()?, transparent, "cache HTTP listening");
    // Accept errors (out of descriptors) are counted and logged at most every few seconds.
    let listener = Accepting::new(listener, "cache_http");
    axum::serve(listener, router(cache, transparent).into_make_service_with_connect_info::<Conn>())
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(v) => v.to_ipv4_mapped(),
    }
}

async fn script(State(app): State<App>, ConnectInfo(conn): ConnectInfo<Conn>, Path(name): Path<String>) -> Response {
    let text = if name == "start.ipxe" {
        Cache::start_script()
    } else {
        let Some(mac) = name.strip_suffix(".ipxe").and_then(|m| m.parse::<MacAddr>().ok()) else {
            return (StatusCode::NOT_FOUND, "want /boot/<mac>.ipxe or /boot/start.ipxe").into_response();
        };
        app.cache.script(mac, v4(conn.peer.ip())).await
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn file(State(app): State<App>, ConnectInfo(conn): ConnectInfo<Conn>, method: Method, headers: HeaderMap, Path(path): Path<String>) -> Response {
    match fleetboot_cache::name::file_object(&path) {
        Ok(name) => object(&app, conn, &method, &headers, &name, &format!("/files/{path}")).await,
        Err(e) => (StatusCode::NOT_FOUND, format!("{path}: {e}")).into_response(),
    }
}

async fn image(State(app): State<App>, ConnectInfo(conn): ConnectInfo<Conn>, method: Method, headers: HeaderMap, Path(spec): Path<String>) -> Response {
    let name = spec.split(':').next().unwrap_or(&spec);
    match fleetboot_cache::name::image_object(name) {
        Ok(name) => object(&app, conn, &method, &headers, &name, &format!("/images/{spec}")).await,
        Err(e) => (StatusCode::NOT_FOUND, format!("{spec}: {e}")).into_response(),
    }
}

async fn object(app: &App, conn: Conn, method: &Method, headers: &HeaderMap, name: &str, shown: &str) -> Response {
    let cache = &app.cache;
    let ip = v4(conn.peer.ip());
    let mac = ip.and_then(|i| cache.mac_of(i));
    let (guard, hit) = match cache.object(ip, name).await {
        Ok(x) => x,
        Err(why) => {
            if let Some(mac) = mac {
                cache.trace(mac, "CACHE-REFUSED", format!("{shown}: {why}"));
            }
            tracing::info!(peer = %conn.peer, name, reason = why, "request refused");
            return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
        }
    };
    let m = &guard.slot.manifest;
    let len = m.size;
    let (status, start, end) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|h| byte_range(h, len)) {
        None => (StatusCode::OK, 0, len),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        Some(Err(Unsatisfiable)) => return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))]).into_response(),
    };
    if let Some(mac) = mac {
        let kind = if hit { "CACHE-HIT" } else { "CACHE-MISS" };
        cache.trace(mac, kind, format!("{shown} {} v{} bytes {start}-{}/{len}", guard.slot.key.0, guard.slot.key.1, end.max(1) - 1));
    }
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{}\"", fleetboot_cache::hash::to_hex(&m.sha256)))
        .header(header::CONTENT_TYPE, if name.ends_with(".efi") { "application/efi" } else { "application/octet-stream" });
    if status == StatusCode::PARTIAL_CONTENT {
        r = r.header(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", end - 1));
    }
    let body = if *method == Method::HEAD { Body::empty() } else { Body::from_stream(verified_bytes(cache.clone(), guard, start, end)) };
    r.body(body).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Bytes `start..end` of an object, chunk by chunk as each is verified. A chunk that
/// cannot be had ends the body with an error (the client sees a cut transfer, never a
/// wrong byte).
fn verified_bytes(cache: Arc<Cache>, guard: ReaderGuard, start: u64, end: u64) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold((cache, guard, start), move |(cache, guard, at)| async move {
        if at >= end {
            return None;
        }
        let m = &guard.slot.manifest;
        let i = m.chunk_of(at);
        match cache.objects.chunk(&guard.slot, i).await {
            Ok(data) => {
                let r = m.chunk_range(i);
                let (from, to) = ((at - r.start) as usize, (end.min(r.end) - r.start) as usize);
                let bytes = Bytes::copy_from_slice(&data[from..to]);
                Counters::add(&cache.objects.counters.bytes_served, bytes.len() as u64);
                metrics::counter!("fleetboot_cache_bytes_served_total").increment(bytes.len() as u64);
                let next = r.start + to as u64;
                Some((Ok(bytes), (cache, guard, next)))
            }
            Err(why) => {
                tracing::warn!(name = guard.slot.key.0, chunk = i, reason = why, "transfer cut: a chunk could not be had verified");
                Some((Err(std::io::Error::other(why)), (cache, guard, end)))
            }
        }
    })
}

/// Hop-by-hop headers, which a proxy does not forward.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "upgrade" | "proxy-authorization" | "proxy-authenticate"
    )
}

/// Anything else on the transparent listener goes to the address the client asked for,
/// unchanged but for hop-by-hop headers (HTTP/1.0 upstream: the answer ends at close).
async fn pass_through(State(app): State<App>, ConnectInfo(conn): ConnectInfo<Conn>, req: Request) -> Response {
    if !app.transparent {
        return StatusCode::NOT_FOUND.into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "at most 1 MiB is passed through").into_response(),
    };
    let target = conn.local;
    let timeout = std::time::Duration::from_millis(app.cache.cfg.origin_timeout_ms);
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => return (StatusCode::BAD_GATEWAY, format!("{target} unreachable")).into_response(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("{} {path} HTTP/1.0\r\n", parts.method);
    for (k, v) in parts.headers.iter().filter(|(k, _)| !hop_by_hop(k.as_str()) && *k != header::CONTENT_LENGTH) {
        head.push_str(&format!("{}: {}\r\n", k, String::from_utf8_lossy(v.as_bytes())));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
    let mut reader = BufReader::new(stream);
    if reader.get_mut().write_all(head.as_bytes()).await.is_err() || reader.get_mut().write_all(&body).await.is_err() {
        return (StatusCode::BAD_GATEWAY, format!("{target}: the request could not be sent")).into_response();
    }
    let mut line = String::new();
    if !matches!(tokio::time::timeout(timeout, reader.read_line(&mut line)).await, Ok(Ok(n)) if n > 0) {
        return (StatusCode::BAD_GATEWAY, format!("{target}: no answer")).into_response();
    }
    let Some(status) = line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).and_then(|s| StatusCode::from_u16(s).ok()) else {
        return (StatusCode::BAD_GATEWAY, format!("{target}: not an HTTP answer")).into_response();
    };
    let mut r = Response::builder().status(status);
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(n) if n > 0 => {}
            _ => return (StatusCode::BAD_GATEWAY, format!("{target}: the answer was cut")).into_response(),
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if !hop_by_hop(k.trim()) {
                r = r.header(k.trim(), v.trim());
            }
        }
    }
    let stream = tokio_util::io::ReaderStream::new(reader.take(u64::MAX));
    r.body(Body::from_stream(stream)).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}


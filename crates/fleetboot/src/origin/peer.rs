//! The origin's listener for caches (`origin.listen`). Every request must be signed by a
//! cache `[[origin.cache]]` lists ([`fleetboot_cache::auth`]); control replies are signed by
//! the origin.
//!
//! - `GET /cache/v1/manifest/{name}[?version=N]`: the signed manifest (newest version
//!   unless asked for one);
//! - `GET /cache/v1/blob/{sha256}` with `Range`: object bytes, only while they are the
//!   bytes of that digest;
//! - `GET /cache/v1/plan/{mac}`: a client's plan (script + object versions) for the
//!   cache's site;
//! - `POST /cache/v1/report`: state changes of the cache's verification table;
//! - `GET /cache/v1/directives?after=SEQ`: the cache's standing orders, as soon as they
//!   differ from `SEQ` (long poll, at most [`LONG_POLL`]).

use super::{now_ms, Origin};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use fleetboot_cache::auth::{self, AUTH_HEADER, REPLY_HEADER};
use fleetboot_cache::hash::from_hex;
use fleetboot_cache::messages::{Message, ReportAck, MAX_BODY};
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Longest a directives request waits for a change.
pub const LONG_POLL: Duration = Duration::from_secs(25);

type App = Arc<Origin>;

pub fn router(origin: Arc<Origin>) -> Router {
    Router::new()
        .route("/cache/v1/manifest/{*name}", get(manifest))
        .route("/cache/v1/blob/{sha}", get(blob))
        .route("/cache/v1/plan/{mac}", get(plan))
        .route("/cache/v1/report", post(report))
        .route("/cache/v1/directives", get(directives))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(origin)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, msg.into()).into_response()
}

/// Checks a request's signature; `Err` is the refusal to send.
#[allow(clippy::result_large_err)]
fn authenticate(o: &Origin, headers: &HeaderMap, method: &Method, uri: &Uri, body: &[u8]) -> Result<(String, [u8; 16]), Response> {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let header = headers.get(AUTH_HEADER).and_then(|v| v.to_str().ok());
    let verdict = super::lock(&o.verifier).verify(header, method.as_str(), path, body, now_ms());
    match verdict {
        Ok((peer, nonce)) => {
            o.count(&peer, |s| s.requests += 1);
            Ok((peer, nonce))
        }
        Err(e) => {
            metrics::counter!("fleetboot_origin_refused_total").increment(1);
            if let Some(peer) = header.and_then(|h| auth::RequestAuth::parse(h).ok()).map(|a| a.peer) {
                if o.cache_cfg(&peer).is_some() {
                    o.count(&peer, |s| s.refused += 1);
                }
            }
            tracing::warn!(path, error = %e, "cache request refused");
            Err(text(StatusCode::UNAUTHORIZED, e.to_string()))
        }
    }
}

/// A JSON control reply, signed for the request that carried `nonce`.
fn signed_json(o: &Origin, cache: &str, nonce: &[u8; 16], value: &impl serde::Serialize) -> Response {
    let body = match serde_json::to_vec(value) {
        Ok(b) => b,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let sig = auth::sign_reply(&o.key, nonce, 200, &body);
    o.count(cache, |s| s.bytes_control += body.len() as u64);
    metrics::counter!("fleetboot_origin_bytes_total", "kind" => "control").increment(body.len() as u64);
    ([(header::CONTENT_TYPE, "application/json".to_string()), (header::HeaderName::from_static(REPLY_HEADER), sig)], body).into_response()
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u64>,
}

async fn manifest(
    State(o): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Response {
    let (cache, _) = match authenticate(&o, &headers, &method, &uri, b"") {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(e) = fleetboot_cache::name::validate(&name) {
        return text(StatusCode::BAD_REQUEST, format!("{name}: {e}"));
    }
    // The newest content is checked first: a changed file is a new version at once.
    let newest = match o.refresh(&name).await {
        Ok(v) => v.version,
        Err(e) if q.version.is_none() => return text(StatusCode::NOT_FOUND, format!("{name}: {e:#}")),
        Err(_) => 0,
    };
    let version = q.version.unwrap_or(newest);
    let Some(m) = super::lock(&o.objects).manifest(&name, version, now_ms()) else {
        return text(StatusCode::GONE, format!("{name} version {version} is no longer available here (newest: {newest})"));
    };
    let body = m.encode(&o.key);
    o.count(&cache, |s| s.bytes_manifests += body.len() as u64);
    metrics::counter!("fleetboot_origin_bytes_total", "kind" => "manifest").increment(body.len() as u64);
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

/// `bytes=A-B` (one range, both ends given) within `len`.
fn range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let h = headers.get(header::RANGE)?.to_str().ok()?;
    let (a, b) = h.trim().strip_prefix("bytes=")?.split_once('-')?;
    let (a, b): (u64, u64) = match (a.parse(), b.parse()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Some(Err(())),
    };
    Some(if a > b || b >= len { Err(()) } else { Ok((a, b)) })
}

async fn blob(State(o): State<App>, method: Method, uri: Uri, headers: HeaderMap, Path(sha): Path<String>) -> Response {
    let (cache, _) = match authenticate(&o, &headers, &method, &uri, b"") {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(digest) = from_hex::<32>(&sha) else {
        return text(StatusCode::BAD_REQUEST, "want /cache/v1/blob/<sha256 hex>");
    };
    let Some(path) = super::lock(&o.objects).blob(&digest) else {
        return text(StatusCode::GONE, format!("{sha}: no such content here any more"));
    };
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return text(StatusCode::GONE, format!("{sha}: {e}")),
    };
    let len = match f.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (status, start, end) = match range(&headers, len) {
        None if len == 0 => return StatusCode::OK.into_response(),
        None => (StatusCode::OK, 0, len - 1),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))]).into_response(),
    };
    if start > 0 && f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "seek failed");
    }
    let count = end - start + 1;
    let counter = o.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(count), 256 << 10).inspect(move |chunk| {
        if let Ok(b) = chunk {
            let n = b.len() as u64;
            counter.count(&cache, |s| s.bytes_objects += n);
            metrics::counter!("fleetboot_origin_bytes_total", "kind" => "object").increment(n);
        }
    });
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, count)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if status == StatusCode::PARTIAL_CONTENT {
        r = r.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
    }
    r.body(Body::from_stream(stream)).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn plan(State(o): State<App>, method: Method, uri: Uri, headers: HeaderMap, Path(mac): Path<String>) -> Response {
    let (cache, nonce) = match authenticate(&o, &headers, &method, &uri, b"") {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Ok(mac) = mac.parse::<fleetboot_boot::MacAddr>() else {
        return text(StatusCode::BAD_REQUEST, format!("{mac:?} is not a MAC address"));
    };
    let plan = o.plan(&cache, mac).await;
    signed_json(&o, &cache, &nonce, &plan)
}

async fn report(State(o): State<App>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let (cache, nonce) = match authenticate(&o, &headers, &method, &uri, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let r = match fleetboot_cache::messages::Report::parse(&body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let n = r.changes.len();
    if let Err(e) = o.apply_report(&cache, r.changes, r.full, r.counters).await {
        return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
    }
    tracing::debug!(cache, changes = n, full = r.full, "cache report");
    signed_json(&o, &cache, &nonce, &ReportAck { seq: *o.seq.borrow() })
}

#[derive(Deserialize)]
struct After {
    after: Option<u64>,
}

async fn directives(State(o): State<App>, method: Method, uri: Uri, headers: HeaderMap, Query(q): Query<After>) -> Response {
    let (cache, nonce) = match authenticate(&o, &headers, &method, &uri, b"") {
        Ok(x) => x,
        Err(r) => return r,
    };
    let after = q.after.unwrap_or(0);
    let mut rx = o.seq.subscribe();
    let _ = tokio::time::timeout(LONG_POLL, rx.wait_for(|s| *s > after)).await;
    let d = o.directives(&cache);
    signed_json(&o, &cache, &nonce, &d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_need_both_ends_inside_the_object() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::RANGE, v.parse().unwrap());
            m
        };
        assert_eq!(range(&h("bytes=0-9"), 10), Some(Ok((0, 9))));
        assert_eq!(range(&h("bytes=0-10"), 10), Some(Err(())));
        assert_eq!(range(&h("bytes=5-"), 10), Some(Err(())));
        assert_eq!(range(&h("bytes=7-3"), 10), Some(Err(())));
        assert_eq!(range(&HeaderMap::new(), 10), None);
    }
}

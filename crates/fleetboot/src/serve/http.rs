//! HTTP: the boot network's file service, and the operators' API on a listener of its own.
//!
//! The boot network (`http.listen`, [`router`]): what booting machines fetch.
//! - `GET /files/{path}`: a file under server.root (Range, HEAD; never outside the root;
//!   `.efi` as `application/efi` for UEFI HTTP Boot), or a boot loader's configuration
//!   rendered per client (`grub/grub.cfg`, `grub/<mac>.cfg`, `pxelinux.cfg/01-<mac>`), to
//!   anyone who reaches the listener, like TFTP
//! - `GET /boot/{mac}.ipxe`, `GET /boot/{capability}/{mac}.ipxe`: the client's iPXE
//!   script, rendered from its profile, to that client only ([`Shared::authorize_client`])
//! - `GET /trace/{mac}`, `GET /trace/{capability}/{mac}`: the client's own boot trace, to
//!   that client only
//! - `GET /images/{name[:version]}`: a catalog disk image, read-only (Range, HEAD), for
//!   iPXE `sanboot`, to the addresses in `http.image_clients`
//!
//! Operators (`admin.listen`, [`admin_router`]; every route needs a token, see
//! [`super::admin`]; reads need role `read`, changes `admin`, and each accepted change is
//! in the audit log):
//! - `GET|POST /api/profiles`, `GET|PUT|DELETE /api/profiles/{name}`
//! - `GET /api/leases`, `GET /api/trace/{mac}`, `GET /api/clients/{mac}/script`
//! - `GET /api/images`, `GET /api/images/{name}`, `DELETE /api/images/{name[:version]}`
//! - `GET /api/audit?limit=N&after=ID`, `GET /metrics`
//!
//! Routes another part of fleetboot adds: what machines call goes on [`router`], what
//! operators call goes into [`admin_router`] before the token check is layered on.

use super::admin::{Actor, Audited};
use super::http1::{CanSendFile, SendFile};
use super::shared::{Grant, Refusal, ScriptRequest, Service, Shared};
use anyhow::Result;
use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleetboot_boot::{MacAddr, Profile};
use fleetboot_images::range::{byte_range, Unsatisfiable};
use fleetboot_store::{StoredProfile, Write};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

#[derive(Clone)]
pub(crate) struct App {
    pub(crate) shared: Arc<Shared>,
    /// API changes are made one at a time, so each audit entry's "before" is exactly what
    /// its change replaced.
    changes: Arc<tokio::sync::Mutex<()>>,
}

impl App {
    pub(crate) fn new(shared: Arc<Shared>) -> App {
        App { shared, changes: Arc::new(tokio::sync::Mutex::new(())) }
    }
}

/// The boot network's routes: files, each client's own script and trace, base images.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/files/{*path}", get(file))
        .route("/boot/{script}", get(script))
        .route("/boot/{capability}/{script}", get(script_with_capability))
        .route("/trace/{mac}", get(own_trace))
        .route("/trace/{capability}/{mac}", get(own_trace_with_capability))
        .route("/images/{spec}", get(image))
        .with_state(App::new(shared))
}

/// The operators' routes, without the token check (`super::admin::run` layers it on top
/// of these and whatever else is mounted beside them).
pub fn admin_router(shared: Arc<Shared>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/api/profiles", get(list_profiles).post(create_profile))
        .route("/api/profiles/{name}", get(get_profile).put(put_profile).delete(delete_profile))
        .route("/api/leases", get(leases))
        .route("/api/trace/{mac}", get(trace))
        .route("/api/clients/{mac}/script", get(client_script))
        .route("/api/audit", get(super::admin::audit))
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/api/images", get(list_images))
        .route("/api/images/{spec}", get(show_image).delete(delete_image))
        .nest_service("/api/origin", crate::origin::api::service(&shared))
        .with_state(App::new(shared))
}

/// Serves the boot network's routes until `shutdown` resolves, then finishes the
/// requests in progress.
pub async fn run(
    shared: Arc<Shared>,
    listen: SocketAddr,
    other_routes: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, "HTTP listening");
    shared.listening_on(Service::Http, local);
    let app = router(shared.clone()).merge(other_routes);
    // Connections are capped overall and per client; accept errors are counted and
    // logged, never the end of the service (serve::accept).
    let mut listener =
        super::accept::Bounded::new(super::accept::Accepting::new(listener, "http"), "http", shared.config.http_connections)
            .with_timeouts(shared.config.http_timeouts);
    // Each connection is read by serve::http1 (files and images with sendfile); those
    // that need more of HTTP than it speaks go on to hyper, with graceful shutdown.
    let stop = tokio_util::sync::CancellationToken::new();
    let (handoff, handed) = super::http1::Handoff::new(local, 64);
    let gate = super::transfer_gate::TransferGate::new(shared.config.http_concurrent_transfers);
    // `tap_io` is how axum hands a wrapped listener's peer address to the routes.
    let handed = axum::serve::ListenerExt::tap_io(handed, |_| {});
    let hyper = axum::serve(handed, app.clone().into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let hyper = tokio::spawn(async move { hyper.await });
    let connections = tokio_util::task::TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = &mut shutdown => break,
        };
        connections.spawn(super::http1::serve(io, peer, app.clone(), handoff.clone(), gate.clone(), stop.clone()));
    }
    // The port is released at once; connections finish the response they are sending.
    drop(listener);
    drop(handoff);
    stop.cancel();
    connections.close();
    connections.wait().await;
    hyper.await??;
    Ok(())
}

pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// 403 for a caller who is not the client (503 when the store could not say).
fn refusal_response(r: &Refusal) -> Response {
    let status = match r {
        Refusal::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::FORBIDDEN,
    };
    (status, Json(json!({ "error": r.to_string(), "reason": r.label() }))).into_response()
}

/// Checks that `peer` is `mac` (see [`Shared::authorize_client`]); once it is, its later
/// requests land in the client's trace.
#[allow(clippy::result_large_err)]
fn authorize(app: &App, what: &'static str, mac: MacAddr, peer: SocketAddr, capability: Option<&str>) -> Result<Grant, Response> {
    match app.shared.authorize_client(mac, peer.ip(), capability) {
        Ok(grant) => {
            let ip = match peer.ip() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(v6) => v6.to_ipv4_mapped(),
            };
            if let Some(ip) = ip {
                app.shared.bind_ip(ip, mac);
            }
            Ok(grant)
        }
        Err(r) => {
            app.shared.refused("http", what, &r);
            Err(refusal_response(&r))
        }
    }
}

fn client_of(shared: &Shared, peer: SocketAddr) -> Option<MacAddr> {
    match peer.ip() {
        IpAddr::V4(v4) => shared.mac_of(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().and_then(|v4| shared.mac_of(v4)),
    }
}

async fn script(State(app): State<App>, ConnectInfo(peer): ConnectInfo<SocketAddr>, Path(name): Path<String>) -> Response {
    serve_script(&app, peer, &format!("boot/{name}"))
}

async fn script_with_capability(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((capability, name)): Path<(String, String)>,
) -> Response {
    serve_script(&app, peer, &format!("boot/{capability}/{name}"))
}

fn serve_script(app: &App, peer: SocketAddr, path: &str) -> Response {
    let Some(req) = ScriptRequest::parse(path) else {
        return error(StatusCode::NOT_FOUND, "want /boot/<mac>.ipxe");
    };
    let grant = match authorize(app, "script", req.mac, peer, req.capability.as_deref()) {
        Ok(g) => g,
        Err(refused) => return refused,
    };
    let body = app.shared.script_for(req.mac);
    let file = path.rsplit('/').next().unwrap_or(path);
    app.shared.trace(req.mac, "HTTP-SCRIPT", format!("/boot/{file} from {} ({grant:?})", peer.ip()));
    metrics::counter!("fleetboot_http_requests_total", "kind" => "script").increment(1);
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// `GET /api/clients/{mac}/script`: the script a client would get now (operators).
async fn client_script(State(app): State<App>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return error(StatusCode::BAD_REQUEST, format!("{mac:?} is not a MAC address"));
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], app.shared.script_for(mac)).into_response()
}

/// A request's byte range of a file of `len` bytes: the whole file (200) or one range (206).
struct Span {
    status: StatusCode,
    start: u64,
    end: u64,
    len: u64,
}

impl Span {
    /// `None`: the range cannot be satisfied (answer with [`Span::unsatisfiable`]).
    fn of(headers: &HeaderMap, len: u64) -> Option<Span> {
        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|h| byte_range(h, len));
        let (status, start, end) = match range {
            None => (StatusCode::OK, 0, len.saturating_sub(1)),
            Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
            Some(Err(Unsatisfiable)) => return None,
        };
        Some(Span { status, start, end, len })
    }

    fn unsatisfiable(len: u64) -> Response {
        (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))]).into_response()
    }

    fn count(&self) -> u64 {
        if self.len == 0 { 0 } else { self.end - self.start + 1 }
    }

    /// For the trace: `N bytes` or `bytes A-B/LEN`.
    fn describe(&self) -> String {
        if self.status == StatusCode::OK {
            format!("{} bytes", self.count())
        } else {
            format!("bytes {}-{}/{}", self.start, self.end, self.len)
        }
    }

    /// The response: headers, and unless `method` is HEAD the span's bytes from `f` —
    /// left to the connection to send with sendfile(2) when it can (`zero_copy`, see
    /// [`super::http1`]), else streamed through this process.
    async fn send(
        &self,
        mut f: tokio::fs::File,
        method: &Method,
        extra: &[(header::HeaderName, String)],
        zero_copy: Option<Extension<CanSendFile>>,
    ) -> Response {
        let count = self.count();
        metrics::counter!("fleetboot_http_bytes_total").increment(if method == Method::HEAD { 0 } else { count });
        let mut builder = Response::builder()
            .status(self.status)
            .header(header::CONTENT_LENGTH, count)
            .header(header::ACCEPT_RANGES, "bytes");
        if !extra.iter().any(|(k, _)| k == header::CONTENT_TYPE) {
            builder = builder.header(header::CONTENT_TYPE, "application/octet-stream");
        }
        for (k, v) in extra {
            builder = builder.header(k, v);
        }
        if self.status == StatusCode::PARTIAL_CONTENT {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {}-{}/{}", self.start, self.end, self.len));
        }
        if method == Method::HEAD {
            return builder.body(Body::empty()).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
        if zero_copy.is_some() {
            let file = Arc::new(f.into_std().await);
            let mut resp = builder.body(Body::empty()).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
            resp.extensions_mut().insert(SendFile { file, start: self.start, count });
            return resp;
        }
        if self.start > 0 && f.seek(std::io::SeekFrom::Start(self.start)).await.is_err() {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "seek failed");
        }
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f.take(count), 256 * 1024));
        builder.body(body).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

async fn file(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    zero_copy: Option<Extension<CanSendFile>>,
    Path(path): Path<String>,
) -> Response {
    let shared = &app.shared;
    let mac = client_of(shared, peer);
    if let Some((req, text)) = shared.loader_config(&path) {
        // A boot loader's configuration (GRUB, PXELINUX), rendered like the iPXE scripts
        // and, like them, for its own client only.
        if let Err(refusal) = shared.authorize_loader_config(&req, peer.ip(), "http") {
            return error(StatusCode::FORBIDDEN, refusal.to_string());
        }
        if let Some(mac) = client_of(shared, peer).or(req.mac()) {
            shared.trace(mac, "HTTP-CONFIG", format!("/files/{path} from {}", peer.ip()));
        }
        metrics::counter!("fleetboot_http_requests_total", "kind" => "config").increment(1);
        return ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response();
    }
    let resolved = match fleetboot_tftp::path::resolve(&shared.config.root, &path) {
        Ok(p) => p,
        Err(e) => {
            if let Some(mac) = mac {
                shared.trace(mac, "HTTP-REFUSED", format!("/files/{path}: {e}"));
            }
            metrics::counter!("fleetboot_http_requests_total", "kind" => "refused").increment(1);
            return error(StatusCode::NOT_FOUND, format!("{path}: {e}"));
        }
    };
    let f = match tokio::fs::File::open(&resolved).await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::NOT_FOUND, format!("{path}: {e}")),
    };
    let len = match f.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        _ => return error(StatusCode::NOT_FOUND, format!("{path}: not a regular file")),
    };
    let Some(span) = Span::of(&headers, len) else {
        return Span::unsatisfiable(len);
    };
    if let Some(mac) = mac {
        shared.trace(mac, "HTTP-GET", format!("/files/{path} {}", span.describe()));
    }
    metrics::counter!("fleetboot_http_requests_total", "kind" => "file").increment(1);
    // UEFI HTTP Boot decides what a download is by its Content-Type before its extension.
    let efi = path.rsplit('.').next().is_some_and(|e| e.eq_ignore_ascii_case("efi"));
    let extra = if efi { vec![(header::CONTENT_TYPE, "application/efi".to_string())] } else { Vec::new() };
    span.send(f, &method, &extra, zero_copy).await
}

/// Runs a blocking catalog call on the blocking pool.
async fn with_catalog<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&fleetboot_images::Catalog) -> fleetboot_images::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let data_dir = shared.config.data_dir.clone();
    let joined = tokio::task::spawn_blocking(move || fleetboot_images::Catalog::open_dir(&data_dir).and_then(|c| f(&c))).await;
    match joined {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(catalog_error(e)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, format!("catalog task failed: {e}"))),
    }
}

fn catalog_error(e: fleetboot_images::Error) -> Response {
    use fleetboot_images::Error as E;
    let status = match &e {
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::InvalidName(_) | E::InvalidRef(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// `GET|HEAD /images/{name[:version]}`: a catalog image, read-only, with Range (iPXE sanboot).
async fn image(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    zero_copy: Option<Extension<CanSendFile>>,
    Path(spec): Path<String>,
) -> Response {
    let shared = &app.shared;
    let mac = client_of(shared, peer);
    if !shared.config.image_clients.allows(peer.ip()) {
        let why = format!("{} is not in http.image_clients {}", peer.ip(), shared.config.image_clients);
        metrics::counter!("fleetboot_client_data_refused_total", "service" => "http", "what" => "image", "reason" => "not_allowed")
            .increment(1);
        if let Some(mac) = mac {
            shared.trace(mac, "HTTP-REFUSED", format!("/images/{spec}: {why}"));
        }
        tracing::info!(peer = %peer.ip(), spec, "image read refused: not in http.image_clients");
        return error(StatusCode::FORBIDDEN, why);
    }
    let wanted = spec.clone();
    let img = match with_catalog(shared, move |c| c.open(&wanted)).await {
        Ok(img) => img,
        Err(r) => {
            if let Some(mac) = mac {
                shared.trace(mac, "HTTP-REFUSED", format!("/images/{spec}: {}", r.status()));
            }
            metrics::counter!("fleetboot_http_requests_total", "kind" => "refused").increment(1);
            return r;
        }
    };
    let Some(span) = Span::of(&headers, img.size) else {
        return Span::unsatisfiable(img.size);
    };
    if let Some(mac) = mac {
        shared.trace(mac, "HTTP-IMAGE", format!("/images/{spec} ({}) {}", img.version.reference(), span.describe()));
    }
    metrics::counter!("fleetboot_http_requests_total", "kind" => "image").increment(1);
    // The content never changes under a version: its SHA-256 is a strong validator.
    let extra = [(header::ETAG, format!("\"{}\"", img.version.sha256))];
    span.send(tokio::fs::File::from_std(img.file), &method, &extra, zero_copy).await
}

async fn list_images(State(app): State<App>) -> Response {
    match with_catalog(&app.shared, |c| c.list()).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// `GET /api/images/{name}`: every version of a name; `NAME:VERSION`: that one (as a list).
async fn show_image(State(app): State<App>, Path(spec): Path<String>) -> Response {
    let got = with_catalog(&app.shared, move |c| match spec.contains(':') {
        true => c.resolve(&spec).map(|v| vec![v]),
        false => c.show(&spec),
    });
    match got.await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

/// `DELETE /api/images/{name[:version]}`: removes that version or every version; answers
/// with what was removed. Clients reading it keep their open file until they disconnect.
async fn delete_image(State(app): State<App>, Extension(actor): Extension<Actor>, Path(spec): Path<String>) -> Response {
    let _one_change = app.changes.lock().await;
    let target = format!("image/{spec}");
    match with_catalog(&app.shared, move |c| c.remove(&spec)).await {
        Ok(removed) => {
            let before = serde_json::to_value(&removed).unwrap_or_default();
            // The files are gone already: record it even if the store is slow to answer.
            if let Err(e) = app.shared.store.write(vec![actor.audit("image.delete", &target, Some(before), None)]).await {
                tracing::error!(error = %e, target, "an image was removed but its audit entry was not stored");
            }
            (Extension(Audited), Json(removed)).into_response()
        }
        Err(r) => r,
    }
}

fn profile_json(p: &Profile, source: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    v["source"] = json!(source);
    v
}

async fn list_profiles(State(app): State<App>) -> Response {
    match app.shared.store.profiles() {
        Ok(stored) => {
            let out: Vec<_> = stored
                .iter()
                .filter_map(|s| serde_json::from_str::<Profile>(&s.json).ok().map(|p| profile_json(&p, &s.source)))
                .collect();
            Json(out).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn get_profile(State(app): State<App>, Path(name): Path<String>) -> Response {
    let profiles = app.shared.profiles.read().unwrap_or_else(|e| e.into_inner()).clone();
    match profiles.iter().find(|p| p.name == name) {
        Some(p) => Json(serde_json::to_value(p).unwrap_or_default()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no profile named {name:?}")),
    }
}

/// Parses a profile body, naming the offending field on any error.
// The error is the 422 response itself, built once per rejected request: boxing it
// would buy nothing.
#[allow(clippy::result_large_err)]
fn parse_profile(body: &[u8]) -> Result<Profile, Response> {
    let invalid = |field: String, problem: String| {
        (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": format!("{field}: {problem}"), "field": field, "problem": problem })))
            .into_response()
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let p: Profile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        invalid(if field == "." { String::new() } else { field }, e.inner().to_string())
    })?;
    p.validate().map_err(|e| invalid(e.field, e.problem))?;
    Ok(p)
}

/// The profile named `name` as it stands, for an audit entry's "before".
fn current_profile(app: &App, name: &str) -> Option<serde_json::Value> {
    let profiles = app.shared.profiles.read().unwrap_or_else(|e| e.into_inner());
    profiles.iter().find(|p| p.name == name).map(|p| serde_json::to_value(p).unwrap_or_default())
}

/// Stores `p` and its audit entry in one transaction: a change is never without its record.
async fn save_profile(app: &App, actor: &Actor, action: &str, p: Profile) -> Result<(), Response> {
    let stored = StoredProfile {
        name: p.name.clone(),
        json: serde_json::to_string(&p).unwrap_or_default(),
        source: "api".into(),
    };
    let before = current_profile(app, &p.name);
    let after = serde_json::to_value(&p).ok();
    let audit = actor.audit(action, &format!("profile/{}", p.name), before, after);
    app.shared
        .store
        .write(vec![Write::UpsertProfile(stored), audit])
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut profiles = app.shared.profiles.write().unwrap_or_else(|e| e.into_inner());
    profiles.retain(|x| x.name != p.name);
    profiles.push(p);
    Ok(())
}

async fn create_profile(State(app): State<App>, Extension(actor): Extension<Actor>, body: axum::body::Bytes) -> Response {
    let p = match parse_profile(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let _one_change = app.changes.lock().await;
    if app.shared.profiles.read().unwrap_or_else(|e| e.into_inner()).iter().any(|x| x.name == p.name) {
        return error(StatusCode::CONFLICT, format!("a profile named {:?} exists; PUT /api/profiles/{} to change it", p.name, p.name));
    }
    let v = profile_json(&p, "api");
    match save_profile(&app, &actor, "profile.create", p).await {
        Ok(()) => (StatusCode::CREATED, Extension(Audited), Json(v)).into_response(),
        Err(r) => r,
    }
}

/// Profiles written in the config file belong to it: they are re-applied at every start,
/// so an API change to one would silently vanish at the next restart. Refuse it instead.
fn owned_by_config(app: &App, name: &str) -> Option<Response> {
    let stored = app.shared.store.profiles().ok()?;
    stored.iter().find(|s| s.name == name && s.source == "config").map(|_| {
        error(
            StatusCode::CONFLICT,
            format!("profile {name:?} is defined in the config file; change it there (API changes would be lost at the next start)"),
        )
    })
}

async fn put_profile(
    State(app): State<App>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let _one_change = app.changes.lock().await;
    if let Some(refused) = owned_by_config(&app, &name) {
        return refused;
    }
    let p = match parse_profile(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if p.name != name {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": format!("name: body says {:?} but the URL says {name:?}", p.name), "field": "name"})),
        )
            .into_response();
    }
    let v = profile_json(&p, "api");
    let action = if current_profile(&app, &name).is_some() { "profile.update" } else { "profile.create" };
    match save_profile(&app, &actor, action, p).await {
        Ok(()) => (Extension(Audited), Json(v)).into_response(),
        Err(r) => r,
    }
}

async fn delete_profile(State(app): State<App>, Extension(actor): Extension<Actor>, Path(name): Path<String>) -> Response {
    let _one_change = app.changes.lock().await;
    let Some(before) = current_profile(&app, &name) else {
        return error(StatusCode::NOT_FOUND, format!("no profile named {name:?}"));
    };
    if let Some(refused) = owned_by_config(&app, &name) {
        return refused;
    }
    let audit = actor.audit("profile.delete", &format!("profile/{name}"), Some(before), None);
    if let Err(e) = app.shared.store.write(vec![Write::DeleteProfile(name.clone()), audit]).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    app.shared.profiles.write().unwrap_or_else(|e| e.into_inner()).retain(|x| x.name != name);
    (StatusCode::NO_CONTENT, Extension(Audited)).into_response()
}

async fn leases(State(app): State<App>) -> Response {
    match app.shared.store.leases() {
        Ok(ls) => Json(
            ls.iter()
                .map(|l| json!({"ip": l.ip, "mac": l.mac, "expires_at": l.expires_at, "hostname": l.hostname, "state": l.state}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn trace(State(app): State<App>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return error(StatusCode::BAD_REQUEST, format!("{mac:?} is not a MAC address"));
    };
    trace_json(&app, mac)
}

/// `GET /trace/{mac}` on the boot network: a client's own trace, to that client.
async fn own_trace(State(app): State<App>, ConnectInfo(peer): ConnectInfo<SocketAddr>, Path(mac): Path<String>) -> Response {
    serve_own_trace(&app, peer, &mac, None)
}

async fn own_trace_with_capability(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((capability, mac)): Path<(String, String)>,
) -> Response {
    serve_own_trace(&app, peer, &mac, Some(&capability))
}

fn serve_own_trace(app: &App, peer: SocketAddr, mac: &str, capability: Option<&str>) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return error(StatusCode::BAD_REQUEST, format!("{mac:?} is not a MAC address"));
    };
    if let Err(refused) = authorize(app, "trace", mac, peer, capability) {
        return refused;
    }
    trace_json(app, mac)
}

fn trace_json(app: &App, mac: MacAddr) -> Response {
    match app.shared.store.trace(&mac.to_string(), 1000) {
        Ok(evs) => Json(
            evs.iter()
                .map(|e| json!({"ts_ms": e.ts_ms, "mac": e.mac, "kind": e.kind, "detail": e.detail}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

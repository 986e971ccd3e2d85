//! The operators' listener: the JSON API and `/metrics`, apart from the boot network.
//!
//! - **Where**: `admin.listen`, 127.0.0.1:8081 by default, so an operator who configures
//!   nothing exposes nothing; with `admin.tls_cert`/`admin.tls_key` it speaks HTTPS
//!   ([`super::tls`]).
//! - **Who**: every request carries `Authorization: Bearer <token>`. A token is made with
//!   `fleetboot token create` (or, while the store has none at all, by `fleetboot serve`
//!   itself into `data_dir/admin.token`, mode 0600: [`bootstrap_token`]); the store keeps
//!   its SHA-256 only. `GET`/`HEAD` need role `read`, anything else `admin`. No token or
//!   an unknown or revoked one: 401; a `read` token asking to change something: 403. Both
//!   with a JSON `{"error", "reason"}`, before any handler runs, counted in
//!   `fleetboot_api_auth_failures_total{reason}`.
//! - **What changed**: every accepted change is in the audit log (`GET /api/audit`,
//!   `fleetboot audit`). Handlers that know the state before and after record it in the
//!   same transaction as the change and mark their response [`Audited`]; any other
//!   successful change (routes mounted by other parts of fleetboot) gets an entry with the
//!   request's JSON body as "after".

use super::http::{error, App};
use super::shared::{now_ms, LogLimit, Service, Shared};
use super::tls::{AdminListener, Peer};
use crate::config::Config;
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::serve::Listener;
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetboot_auth::{token, Role, TokenHash};
use fleetboot_store::{AuditEntry, Store, TokenRecord, Write};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Who made a request: the token it carried (put into the request's extensions by the
/// token check, for handlers to record in the audit log).
#[derive(Debug, Clone)]
pub struct Actor {
    pub token_id: Option<i64>,
    pub name: String,
    pub role: Role,
    pub remote: Option<SocketAddr>,
}

impl Actor {
    /// The audit entry of a change this actor made to `target`.
    pub fn audit(&self, action: &str, target: &str, before: Option<Value>, after: Option<Value>) -> Write {
        Write::Audit(AuditEntry {
            id: 0,
            ts_ms: now_ms(),
            actor: self.name.clone(),
            actor_id: self.token_id,
            action: action.into(),
            target: target.into(),
            before: before.map(|v| v.to_string()),
            after: after.map(|v| v.to_string()),
            remote: self.remote.map(|r| r.ip().to_string()),
        })
    }
}

/// A response extension: the handler put its change in the audit log itself.
#[derive(Debug, Clone, Copy)]
pub struct Audited;

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Not a fleetboot token, or one no store knows.
    Invalid,
    Revoked { name: String },
    /// A valid token whose role does not allow this request.
    Forbidden { name: String, role: Role, needed: Role },
}

impl AuthFailure {
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
            AuthFailure::Revoked { .. } => "revoked",
            AuthFailure::Forbidden { .. } => "forbidden",
        }
    }
}

/// The bearer token of a request: `None` without one, `Some(Err)` for several or a
/// header that is not `Bearer <token>`.
/// The cookie the dashboard's login sets (a token, for browsers, which cannot send a
/// bearer header on their own). Accepted for reading only.
pub const SESSION_COOKIE: &str = "fleetboot_session";

/// The token in the session cookie, when there is exactly one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    let mut found = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

fn bearer(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return Some(Err(()));
    }
    let token = first.to_str().ok().and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    });
    Some(token.ok_or(()))
}

/// Who `headers` say the caller is, if the store knows the token and its role allows
/// `needed`. Every live token is compared, each in constant time.
pub fn authenticate(store: &Store, headers: &HeaderMap, needed: Role) -> Result<Result<(TokenRecord, Role), AuthFailure>> {
    let presented = match bearer(headers) {
        // A browser sends its cookie with any request a page makes it send, whoever made
        // the page: the cookie may read, never change.
        None if needed == Role::Read => match session_cookie(headers) {
            Some(t) => t,
            None => return Ok(Err(AuthFailure::Missing)),
        },
        None => return Ok(Err(AuthFailure::Missing)),
        Some(Err(())) => return Ok(Err(AuthFailure::Invalid)),
        Some(Ok(t)) => t,
    };
    if !token::well_formed(presented) {
        return Ok(Err(AuthFailure::Invalid));
    }
    // Live tokens are few (`token_cli::MAX_LIVE_TOKENS`): compare with each of them.
    let live = store.live_tokens().context("reading API tokens")?;
    let candidates = live.iter().filter_map(|t| TokenHash::from_hex(&t.sha256).map(|h| (h, t)));
    let Some(found) = token::find(presented, candidates) else {
        // Not live: a revoked token is told so (its hash finds it; that reveals nothing
        // about any live token).
        let revoked = store.token_by_sha256(&TokenHash::of(presented).to_hex()).context("reading API tokens")?;
        return Ok(Err(match revoked {
            Some(t) => AuthFailure::Revoked { name: t.name },
            None => AuthFailure::Invalid,
        }));
    };
    let Ok(role) = found.role.parse::<Role>() else {
        tracing::error!(token = %found.name, role = %found.role, "a stored token has an unknown role; refused");
        return Ok(Err(AuthFailure::Invalid));
    };
    if !role.allows(needed) {
        return Ok(Err(AuthFailure::Forbidden { name: found.name.clone(), role, needed }));
    }
    Ok(Ok((found.clone(), role)))
}

fn failure_response(f: &AuthFailure, method: &Method, path: &str) -> Response {
    let (status, message, challenge) = match f {
        AuthFailure::Missing => (
            StatusCode::UNAUTHORIZED,
            "this API needs a token: send `Authorization: Bearer <token>` (make one with `fleetboot token create`)".to_string(),
            "Bearer realm=\"fleetboot\"",
        ),
        AuthFailure::Invalid => (
            StatusCode::UNAUTHORIZED,
            "the token is not valid (unknown to this server, or not a fleetboot token)".to_string(),
            "Bearer realm=\"fleetboot\", error=\"invalid_token\"",
        ),
        AuthFailure::Revoked { name } => (
            StatusCode::UNAUTHORIZED,
            format!("token {name:?} has been revoked"),
            "Bearer realm=\"fleetboot\", error=\"invalid_token\"",
        ),
        AuthFailure::Forbidden { name, role, needed } => (
            StatusCode::FORBIDDEN,
            format!("token {name:?} has role {role}; {method} {path} needs role {needed}"),
            "Bearer realm=\"fleetboot\", error=\"insufficient_scope\"",
        ),
    };
    let mut r = (status, Json(json!({ "error": message, "reason": f.label() }))).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    r
}

fn failures_logged() -> &'static LogLimit {
    static LIMIT: OnceLock<LogLimit> = OnceLock::new();
    LIMIT.get_or_init(|| LogLimit::new(Duration::from_secs(10)))
}

/// Bodies up to this size are kept for the audit entry of a change no handler recorded.
const AUDIT_BODY_LIMIT: usize = 64 * 1024;

/// The token check in front of every operator route (see the module documentation), with
/// the store that holds the tokens and receives the audit entries. `fleetboot master`
/// puts the same check in front of its operator routes.
pub async fn require_token(State(store): State<Store>, ConnectInfo(Peer(peer)): ConnectInfo<Peer>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let needed = if matches!(method, Method::GET | Method::HEAD) { Role::Read } else { Role::Admin };
    let (record, role) = match authenticate(&store, req.headers(), needed) {
        Ok(Ok(found)) => found,
        Ok(Err(f)) => {
            metrics::counter!("fleetboot_api_auth_failures_total", "reason" => f.label()).increment(1);
            if let Some(held_back) = failures_logged().allow() {
                tracing::warn!(%peer, %method, path, reason = f.label(), held_back, "API request refused");
            }
            // A person opening the dashboard is shown the login form, not a JSON error.
            let page = path == "/dashboard" || path.starts_with("/dashboard/client/");
            if page && method == Method::GET && !matches!(f, AuthFailure::Forbidden { .. }) {
                return (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard/login")]).into_response();
            }
            return failure_response(&f, &method, &path);
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot check API tokens; refusing");
            return error(StatusCode::SERVICE_UNAVAILABLE, "cannot check tokens right now");
        }
    };
    let actor = Actor { token_id: Some(record.id), name: record.name, role, remote: Some(peer) };
    req.extensions_mut().insert(actor.clone());
    // Routes written for a plain TCP listener find their peer where they expect it.
    req.extensions_mut().insert(ConnectInfo(peer));
    if needed == Role::Read {
        return next.run(req).await;
    }
    let small_json = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n <= AUDIT_BODY_LIMIT);
    let (req, body) = if small_json {
        let (parts, body) = req.into_parts();
        match axum::body::to_bytes(body, AUDIT_BODY_LIMIT).await {
            Ok(bytes) => {
                let seen = serde_json::from_slice::<Value>(&bytes).ok();
                (Request::from_parts(parts, Body::from(bytes)), seen)
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the request body: {e}")),
        }
    } else {
        (req, None)
    };
    let response = next.run(req).await;
    if response.status().is_success() && response.extensions().get::<Audited>().is_none() {
        let entry = actor.audit(&format!("{method} {path}"), &path, None, body);
        if let Err(e) = store.write(vec![entry]).await {
            tracing::error!(error = %e, %method, path, "a change was accepted but its audit entry was not stored");
        }
    }
    response
}

#[derive(serde::Deserialize)]
pub(crate) struct AuditQuery {
    limit: Option<usize>,
    after: Option<i64>,
}

/// The most entries one `GET /api/audit` returns.
const AUDIT_PAGE_MAX: usize = 1000;

pub(crate) fn audit_json(e: &AuditEntry) -> Value {
    let parse = |s: &Option<String>| s.as_deref().map(|t| serde_json::from_str::<Value>(t).unwrap_or_else(|_| json!(t)));
    json!({
        "id": e.id,
        "ts_ms": e.ts_ms,
        "actor": e.actor,
        "actor_id": e.actor_id,
        "action": e.action,
        "target": e.target,
        "before": parse(&e.before),
        "after": parse(&e.after),
        "remote": e.remote,
    })
}

/// `GET /api/audit?limit=N&after=ID`: the newest N entries (100 unless asked, at most
/// 1000), or the first N after entry ID; oldest first.
pub(crate) async fn audit(State(app): State<App>, Query(q): Query<AuditQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(AUDIT_PAGE_MAX);
    match app.shared.store.audit(q.after, limit) {
        Ok(entries) => Json(entries.iter().map(audit_json).collect::<Vec<_>>()).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Serves the operators' routes on `admin.listen` until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    metrics: PrometheusHandle,
    other_routes: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let cfg = shared.config.admin.clone().context("[admin] is disabled")?;
    // Capped like the boot network's listener (serve::accept): a host that reaches the API
    // cannot hold every connection, or every descriptor, open.
    let listener = super::accept::Bounded::new(
        AdminListener::bind(cfg.listen, cfg.tls.as_ref()).await?,
        "admin",
        super::accept::ConnectionLimits::ADMIN,
    )
    .with_timeouts(cfg.timeouts);
    let local = listener.local_addr()?;
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %local, scheme, "API listening");
    if cfg.tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(
            listen = %local,
            "the API listens beyond this host without TLS: tokens cross the network in clear text (set admin.tls_cert and admin.tls_key)"
        );
    }
    shared.listening_on(Service::Admin, local);
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let api = super::http::admin_router(shared.clone(), metrics)
        .merge(super::dashboard::routes(shared.clone(), stopped.clone()))
        .merge(other_routes);
    // Operator routes of other parts of fleetboot are merged into `api` here, before the
    // token check is layered over all of them; only the dashboard's login form is outside.
    let app = api
        .layer(middleware::from_fn_with_state(shared.store.clone(), require_token))
        .merge(super::dashboard::login_routes(shared.clone()));
    let mut stopped = stopped;
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping.send(true);
    });
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// The rows that make a token: the token record and its audit entry.
pub fn token_writes(name: &str, role: Role, hash: &TokenHash, actor: &str) -> Vec<Write> {
    let now = now_ms();
    let record = TokenRecord { id: 0, name: name.into(), role: role.name().into(), sha256: hash.to_hex(), created_ms: now, revoked_ms: None };
    let audit = AuditEntry {
        id: 0,
        ts_ms: now,
        actor: actor.into(),
        actor_id: None,
        action: "token.create".into(),
        target: format!("token/{name}"),
        before: None,
        after: Some(json!({ "name": name, "role": role.name() }).to_string()),
        remote: None,
    };
    vec![Write::InsertToken(record), Write::Audit(audit)]
}

/// While the store holds no token at all (a first start), makes an admin token named
/// `bootstrap` and writes it to `data_dir/admin.token` (mode 0600), so the operator on
/// this host can use the API at once. Once any token exists, even a revoked one, this
/// does nothing: revoking the bootstrap token does not bring it back. `maker` is the
/// program that made it, for the audit log.
pub async fn bootstrap_token(config: &Config, store: &Store, maker: &str) -> Result<Option<PathBuf>> {
    let Some(admin) = &config.admin else { return Ok(None) };
    if !admin.bootstrap_token || !store.tokens()?.is_empty() {
        return Ok(None);
    }
    let path = config.bootstrap_token_path();
    // A file left from an earlier store holds a token no store knows any more.
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a bootstrap token the store does not know"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let t = token::generate()?;
    fleetboot_auth::secret::create_new(&path, &format!("{}\n", t.secret))?;
    store.write(token_writes("bootstrap", Role::Admin, &t.hash, maker)).await?;
    tracing::info!(
        path = %path.display(),
        "no API token existed: made admin token \"bootstrap\" in this file; make your own with `fleetboot token create` and `fleetboot token revoke bootstrap`"
    );
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(&headers(&[])), None);
        assert_eq!(bearer(&headers(&["Bearer abc"])), Some(Ok("abc")));
        assert_eq!(bearer(&headers(&["bearer   abc "])), Some(Ok("abc")));
        assert_eq!(bearer(&headers(&["Basic abc"])), Some(Err(())));
        assert_eq!(bearer(&headers(&["Bearer"])), Some(Err(())));
        assert_eq!(bearer(&headers(&["Bearer a", "Bearer b"])), Some(Err(())));
    }
}

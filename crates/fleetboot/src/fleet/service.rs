//! The provisioning master's shell: `fleetboot_fleet::master::Master` behind HTTP.
//!
//! Agent routes (signed, see `fleetboot_fleet::protocol`):
//! - `POST /fleet/v1/exchange`: an `Envelope` in, a `SignedReply` out (status 200, or
//!   400/401/403/409 with a signed `refused` reply);
//! - `GET /fleet/v1/blobs/{sha256}` with `X-Fleet-Auth`: a blob the node's last plan named;
//! - `GET /fleet/v1/master-key`: the master's public key, for operators who pin it.
//!
//! A backup master (see `super::replica`) answers the first two with `503
//! {"not_master": true, "master": URL}` (URL: the current master, or null while nobody
//! holds the lease); masters copy blobs from each other on
//! `GET /fleet/v1/replica/blobs/{sha256}` (signed with the fleet's master key).
//!
//! Operator routes (`--json` of the CLI is the same data):
//! `GET /api/fleet/nodes`, `/api/fleet/nodes/{name}`, `/api/fleet/classes`,
//! `/api/fleet/packages`, `/api/fleet/counters`, `/api/fleet/campaigns`,
//! `/api/fleet/verifications?node=&limit=`, `/api/audit`; `POST /api/fleet/prepare`
//! (`{"class": .., "deadline_s": ..}`). They always sit behind the API's token check
//! (`serve::admin::require_token`: a `read` token reads, an `admin` token changes, every
//! accepted change is audited): inside `fleetboot serve` and `fleetboot master` on the
//! admin listener (`[admin]`, loopback unless set), never on the agents' listener. A
//! standalone master makes the same bootstrap token as `fleetboot serve` on its first
//! start (`data_dir/admin.token`, 0600).
//!
//! Writes are durable before the reply leaves (persist before send), fenced by the
//! epoch this master got with the lease. The master polls the store's configuration revision at every exchange
//! and every half second, so an operator's import or CLI change applies at once.

use super::db;
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetboot_fleet::blobs::BlobStore;
use fleetboot_fleet::config::FleetConfig;
use fleetboot_fleet::master::{CampaignSpec, Master};
use fleetboot_fleet::protocol::{blob_body, Envelope, KeyPair, Reply, SignedReply, MAX_BODY};
use fleetboot_fleet::Sha256;
use fleetboot_store::{Store, StoreError};
use serde_json::json;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct MasterService {
    master: Mutex<Master>,
    config_rev: AtomicU64,
    /// Holds the lease and has loaded the databases as the master.
    serving: AtomicBool,
    /// The epoch the lease gave this master (meaningful while it serves).
    epoch: AtomicU64,
    /// Taking over and loading as a backup do not interleave.
    transition: tokio::sync::Mutex<()>,
    /// The current master's URL, for the agents a backup turns away.
    current_master: Mutex<Option<String>>,
    identity: super::replica::ReplicaIdentity,
    replica_auth: super::replica::ReplicaAuth,
    store: Store,
    blobs: BlobStore,
    key: KeyPair,
    config: FleetConfig,
}

/// The master's signing key: `fleet.key_file` (the fleet's key, copied by the operator to
/// every master; it must exist and be private to its owner), else
/// `data_dir/fleet/master.key` (created at first start, 0600).
fn load_or_create_key(configured: Option<&FsPath>, default: &FsPath) -> Result<KeyPair> {
    if let Some(path) = configured {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).with_context(|| format!("fleet.key_file {}: copy the fleet's master key here", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            anyhow::bail!("fleet.key_file {}: readable by others (mode {:o}); chmod 600 it", path.display(), meta.permissions().mode() & 0o777);
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return KeyPair::from_hex(&text).with_context(|| format!("{}: not a master key (64 hex digits)", path.display()));
    }
    let path = default;
    if let Ok(text) = std::fs::read_to_string(path) {
        return KeyPair::from_hex(&text).with_context(|| format!("{}: not a master key (64 hex digits)", path.display()));
    }
    let key = KeyPair::generate().context("the OS random number generator failed")?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, key.secret_hex().as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

pub fn blob_store(data_dir: &FsPath) -> Result<BlobStore> {
    let dir = data_dir.join("fleet").join("blobs");
    BlobStore::open(&dir).with_context(|| format!("opening the package blob directory {}", dir.display()))
}

impl MasterService {
    /// Loads the databases and takes part in the master lease: serves at once if this
    /// master may take the lease now, else starts as a backup.
    pub async fn start(store: Store, data_dir: &FsPath, config: FleetConfig, identity: super::replica::ReplicaIdentity) -> Result<Arc<MasterService>> {
        let blobs = blob_store(data_dir)?;
        let key = load_or_create_key(config.key_file.as_deref(), &data_dir.join("fleet").join("master.key"))?;
        let (master, config_rev) = load_master(&store, &config)?;
        let svc = Arc::new(MasterService {
            master: Mutex::new(master.0),
            config_rev: AtomicU64::new(config_rev),
            serving: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            transition: tokio::sync::Mutex::new(()),
            current_master: Mutex::new(None),
            identity,
            replica_auth: super::replica::ReplicaAuth::new(),
            store,
            blobs,
            key,
            config,
        });
        let (mut free, mut renewed) = (None, std::time::Instant::now());
        super::replica::lease_step(&svc, &mut free, &mut renewed).await;
        tracing::info!(name = %svc.identity.name, url = %svc.identity.url, key = %svc.key.public_hex(),
            role = if svc.serving() { "master" } else { "backup" }, "provisioning master started");
        super::replica::spawn(svc.clone());
        let ticker = svc.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
            let mut n = 0u64;
            loop {
                every.tick().await;
                n += 1;
                if let Err(e) = ticker.sync().await {
                    tracing::warn!(error = %format!("{e:#}"), "master: reloading the databases failed");
                }
                if !ticker.serving() {
                    continue;
                }
                let writes = ticker.lock().tick(db::now_ms());
                if let Err(e) = ticker.persist(writes).await {
                    tracing::warn!(error = %format!("{e:#}"), "master: persisting campaign progress failed");
                }
                if n.is_multiple_of(120) {
                    let trim = fleetboot_store::fleet::FleetWrite::TrimVerifications { keep: ticker.config.keep_verifications };
                    let _ = ticker.store.write(vec![fleetboot_store::Write::Fleet { fence: Some(ticker.epoch()), write: trim }]).await;
                }
            }
        });
        Ok(svc)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Master> {
        self.master.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn public_key(&self) -> String {
        self.key.public_hex()
    }

    pub(crate) fn key(&self) -> &KeyPair {
        &self.key
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    pub(crate) fn config(&self) -> &FleetConfig {
        &self.config
    }

    pub(crate) fn identity(&self) -> &super::replica::ReplicaIdentity {
        &self.identity
    }

    /// Whether this master holds the lease and serves agents.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub(crate) fn loaded_rev(&self) -> u64 {
        self.config_rev.load(Ordering::Relaxed)
    }

    pub(crate) fn set_current_master(&self, url: Option<String>) {
        *self.current_master.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }

    fn current_master(&self) -> Option<String> {
        self.current_master.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops serving at once: from now on agents are turned away to the current master.
    pub(crate) fn step_down(&self, why: &str) {
        if self.serving.swap(false, Ordering::SeqCst) {
            metrics::gauge!("fleetboot_fleet_master_serving").set(0.0);
            tracing::error!(epoch = self.epoch(), why, "master: this master stops serving and goes on as a backup");
        }
    }

    /// This master took the lease with `epoch`: load everything the old master made
    /// durable, start serving.
    pub(crate) async fn take_over(&self, epoch: u64, previous: super::replica::Previous) -> Result<()> {
        let _t = self.transition.lock().await;
        let ((master, writes), rev) = load_master(&self.store, &self.config)?;
        *self.lock() = master;
        self.config_rev.store(rev, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::SeqCst);
        self.persist_with(writes, epoch).await?;
        self.serving.store(true, Ordering::SeqCst);
        metrics::gauge!("fleetboot_fleet_master_serving").set(1.0);
        metrics::counter!("fleetboot_fleet_master_takeovers_total", "previous" => previous.as_str()).increment(1);
        Ok(())
    }

    /// Reloads the configuration if an operator changed it.
    async fn sync(&self) -> Result<()> {
        let meta = self.store.fleet_meta()?;
        if self.serving() && meta.epoch != self.epoch() {
            self.step_down("another master claimed a newer epoch");
        }
        if meta.config_rev == self.config_rev.load(Ordering::Relaxed) {
            return Ok(());
        }
        if !self.serving() {
            // A backup keeps its databases loaded (for its blob copies, its report and the
            // operators' views); what a master would write stays for the one that takes over.
            let Ok(_t) = self.transition.try_lock() else { return Ok(()) };
            if self.serving() {
                return Ok(());
            }
            let ((master, _), rev) = load_master(&self.store, &self.config)?;
            *self.lock() = master;
            self.config_rev.store(rev, Ordering::Relaxed);
            return Ok(());
        }
        let generation = self.lock().generation();
        let loaded = db::load(&self.store)?;
        self.config_rev.store(loaded.config_rev, Ordering::Relaxed);
        let writes = self.lock().reload(loaded.db, loaded.specs, db::now_ms(), generation);
        self.persist(writes).await
    }

    async fn persist(&self, writes: Vec<fleetboot_fleet::master::Write>) -> Result<()> {
        if !self.serving() && !writes.is_empty() {
            anyhow::bail!("not the master: nothing is written");
        }
        self.persist_with(writes, self.epoch()).await
    }

    async fn persist_with(&self, writes: Vec<fleetboot_fleet::master::Write>, epoch: u64) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        match self.store.write(db::master_writes(writes.clone(), epoch)).await {
            Err(StoreError::StaleEpoch { held, current }) => {
                self.step_down("the store refused a write of an old epoch");
                anyhow::bail!("deposed: epoch {held} is no longer current ({current})")
            }
            Err(e) => Err(e.into()),
            Ok(()) => {
                self.lock().confirm(&writes);
                Ok(())
            }
        }
    }

    /// What a backup answers agents: who to ask instead.
    fn not_master(&self) -> Response {
        let master = self.current_master().filter(|u| *u != self.identity.url);
        metrics::counter!("fleetboot_fleet_not_master_total").increment(1);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "this is a backup master", "not_master": true, "master": master, "name": self.identity.name })),
        )
            .into_response()
    }

    /// One signed exchange.
    pub async fn exchange(&self, env: Envelope) -> Option<(StatusCode, SignedReply)> {
        let refuse = |status: StatusCode, reason: &str| {
            (status, SignedReply::sign(&self.key, &env.nonce, &Reply::Refused { reason: reason.into(), retry: true }))
        };
        if let Err(e) = self.sync().await {
            tracing::warn!(error = %format!("{e:#}"), "master: reloading the databases failed");
        }
        if !self.serving() {
            return None;
        }
        let out = self.lock().handle(&env, db::now_ms());
        metrics::counter!("fleetboot_fleet_exchanges_total", "status" => out.status.to_string()).increment(1);
        if let Err(e) = self.persist(out.writes).await {
            tracing::error!(error = %format!("{e:#}"), node = %env.node, "master: a write failed; the reply is withheld");
            if !self.serving() {
                return None;
            }
            return Some(refuse(StatusCode::SERVICE_UNAVAILABLE, "the master could not record this exchange; retry"));
        }
        Some((StatusCode::from_u16(out.status).unwrap_or(StatusCode::OK), SignedReply::sign(&self.key, &env.nonce, &out.reply)))
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// What agents call: their signed exchange, their blobs, the master's public key. On the
/// boot network's HTTP listener (agents prove who they are per request).
pub fn agent_routes(svc: Arc<MasterService>) -> Router {
    Router::new()
        .route("/fleet/v1/exchange", post(exchange))
        .route("/fleet/v1/blobs/{sha}", get(blob))
        .route("/fleet/v1/replica/blobs/{sha}", get(replica_blob))
        .route("/fleet/v1/master-key", get(|State(s): State<Arc<MasterService>>| async move { s.public_key() }))
        .with_state(svc)
}

/// What operators call. Inside `fleetboot serve` these sit behind the API's token check
/// (`serve::admin`).
pub fn operator_routes(svc: Arc<MasterService>) -> Router {
    Router::new()
        .route("/api/fleet/nodes", get(api_nodes))
        .route("/api/fleet/nodes/{name}", get(api_node))
        .route("/api/fleet/classes", get(api_classes))
        .route("/api/fleet/packages", get(api_packages))
        .route("/api/fleet/counters", get(api_counters))
        .route("/api/fleet/campaigns", get(api_campaigns))
        .route("/api/fleet/verifications", get(api_verifications))
        .route("/api/fleet/prepare", post(api_prepare))
        .with_state(svc)
}

/// With `[fleet] enabled = true`, the master inside `fleetboot serve`.
pub async fn start_in_serve(shared: &crate::serve::shared::Shared) -> Result<Option<Arc<MasterService>>> {
    match &shared.config.fleet {
        Some(f) if f.enabled => {
            let identity = super::replica::identity(f, shared.config.http)?;
            Ok(Some(MasterService::start(shared.store.clone(), &shared.config.data_dir, f.clone(), identity).await?))
        }
        _ => Ok(None),
    }
}

/// `fleetboot master --config F`: only the master. Agents on `fleet.listen` (default: the
/// HTTP service's address), bounded like the boot network's HTTP listener; operators on
/// the `[admin]` listener (127.0.0.1:8081 unless set, HTTPS with `admin.tls_cert`), behind
/// a token checked against the store's tokens like `fleetboot serve`'s API — so an
/// operator's token never has to cross the boot network, and never in clear text.
pub async fn run_standalone(config: crate::config::Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let fleet = config.fleet.clone().unwrap_or_default();
    let listen = fleet.listen.or(config.http).context("fleet.listen: no address to listen on (set fleet.listen or enable [http])")?;
    let store = config.open_store()?;
    crate::serve::admin::bootstrap_token(&config, &store, "fleetboot master").await?;
    let identity = super::replica::identity(&fleet, Some(listen))?;
    let tcp = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let svc = MasterService::start(store.clone(), &config.data_dir, fleet, identity).await?;
    let agents = crate::serve::accept::Bounded::new(crate::serve::accept::Accepting::new(tcp, "fleet"), "fleet", config.http_connections)
        .with_timeouts(config.http_timeouts);
    tracing::info!(%listen, "provisioning master listening for agents");
    let agents = axum::serve(agents, agent_routes(svc.clone()).into_make_service());
    let operators = match config.admin.clone() {
        None => {
            tracing::warn!("[admin] is disabled: the master's operator routes are served nowhere");
            None
        }
        Some(admin) => {
            let listener = crate::serve::accept::Bounded::new(
                crate::serve::tls::AdminListener::bind(admin.listen, admin.tls.as_ref()).await?,
                "admin",
                crate::serve::accept::ConnectionLimits::ADMIN,
            )
            .with_timeouts(admin.timeouts);
            let local = axum::serve::Listener::local_addr(&listener)?;
            tracing::info!(listen = %local, tls = admin.tls.is_some(), "provisioning master listening for operators");
            if admin.tls.is_none() && !local.ip().is_loopback() {
                tracing::warn!(listen = %local, "the operators' API listens beyond this host without TLS: tokens cross the network in clear text (set admin.tls_cert and admin.tls_key)");
            }
            Some(listener)
        }
    };
    let routes = standalone_operator_routes(svc.clone(), store).into_make_service_with_connect_info::<crate::serve::tls::Peer>();
    let operators = async move {
        match operators {
            Some(listener) => axum::serve(listener, routes).await.context("operators' HTTP service"),
            None => std::future::pending().await,
        }
    };
    let r = tokio::select! {
        r = agents => r.context("agents' HTTP service"),
        r = operators => r,
        _ = crate::serve::shutdown_signal() => Ok(()),
    };
    // A clean stop hands the lease over at once instead of letting it expire.
    svc.serving.store(false, Ordering::SeqCst);
    let released = svc.store.release_master(&svc.identity.instance).await;
    super::replica::report_stopped(&svc).await;
    match released {
        Ok(()) => tracing::info!("provisioning master stopped; the lease is released"),
        Err(e) => tracing::warn!(error = %e, "provisioning master stopped without releasing the lease: a backup takes over once it lapses"),
    }
    r
}

/// The operator routes of `fleetboot master`, and its audit log, behind the token check.
pub fn standalone_operator_routes(svc: Arc<MasterService>, store: Store) -> Router {
    operator_routes(svc)
        .route("/api/audit", get(api_audit).with_state(store.clone()))
        .layer(axum::middleware::from_fn_with_state(store, crate::serve::admin::require_token))
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
    after: Option<i64>,
}

/// `GET /api/audit?limit=N&after=ID`, as `fleetboot serve` answers it.
async fn api_audit(State(store): State<Store>, Query(q): Query<AuditQuery>) -> Response {
    match store.audit(q.after, q.limit.unwrap_or(100).min(1000)) {
        Ok(entries) => Json(entries.iter().map(crate::serve::admin::audit_json).collect::<Vec<_>>()).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn exchange(State(svc): State<Arc<MasterService>>, body: axum::body::Bytes) -> Response {
    if body.len() > MAX_BODY + 4096 {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request too large");
    }
    let env: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a signed request: {e}")),
    };
    match svc.exchange(env).await {
        Some((status, reply)) => (status, Json(reply)).into_response(),
        None => svc.not_master(),
    }
}

/// Another master of the fleet copying a blob (see `super::replica`).
async fn replica_blob(State(svc): State<Arc<MasterService>>, headers: HeaderMap, Path(sha): Path<String>) -> Response {
    let Ok(sha) = sha.parse::<Sha256>() else { return error(StatusCode::NOT_FOUND, "not a blob name") };
    let Some(h) = headers.get("x-fleet-replica").and_then(|h| h.to_str().ok()) else {
        return error(StatusCode::UNAUTHORIZED, "X-Fleet-Replica: missing");
    };
    if let Err(e) = svc.replica_auth.check(h, &sha, &svc.key, svc.config.policy.max_clock_skew_ms, db::now_ms()) {
        return error(StatusCode::UNAUTHORIZED, e);
    }
    stream_blob(&svc, &sha, None).await
}

async fn stream_blob(svc: &MasterService, sha: &Sha256, size: Option<u64>) -> Response {
    let f = match tokio::fs::File::open(svc.blobs.path(sha)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return error(StatusCode::NOT_FOUND, format!("blob {sha}: not here")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("blob {sha}: {e}")),
    };
    let size = match size {
        Some(s) => s,
        None => match f.metadata().await {
            Ok(m) => m.len(),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("blob {sha}: {e}")),
        },
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024));
    Response::builder()
        .header(header::CONTENT_LENGTH, size)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn blob(State(svc): State<Arc<MasterService>>, headers: HeaderMap, Path(sha): Path<String>) -> Response {
    let Ok(sha) = sha.parse::<Sha256>() else { return error(StatusCode::NOT_FOUND, "not a blob name") };
    let Some(env) = headers.get("x-fleet-auth").and_then(|h| h.to_str().ok()).and_then(|h| Envelope::from_header(h, blob_body(&sha))) else {
        return error(StatusCode::UNAUTHORIZED, "X-Fleet-Auth: missing or malformed");
    };
    let _ = svc.sync().await;
    if !svc.serving() {
        return svc.not_master();
    }
    let authorized = svc.lock().authorize_blob(&env, &sha, db::now_ms());
    let size = match authorized {
        Ok(size) => size,
        Err(e @ fleetboot_fleet::master::BlobRefusal::NotOffered(_)) => return error(StatusCode::FORBIDDEN, e.to_string()),
        Err(e) => return error(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    metrics::counter!("fleetboot_fleet_blob_bytes_total").increment(size);
    stream_blob(&svc, &sha, Some(size)).await
}

/// The databases as a master starts from them (and the writes starting the campaigns
/// it finds), with the configuration revision read.
fn load_master(store: &Store, config: &FleetConfig) -> Result<((Master, Vec<fleetboot_fleet::master::Write>), u64)> {
    let loaded = db::load(store)?;
    let states = db::node_states(store)?;
    let mut master = Master::new(config.policy.clone(), loaded.db.clone(), states, loaded.campaigns);
    let writes = master.reload(loaded.db, loaded.specs, db::now_ms(), 0);
    Ok(((master, writes), loaded.config_rev))
}

/// One node as the API and `fleetboot node show --json` present it.
pub fn node_view(m: &Master, name: &str, now_ms: u64) -> Option<serde_json::Value> {
    let n = m.db().nodes.get(name)?;
    let state = m.states().get(name).cloned().unwrap_or_default();
    Some(json!({
        "config": n,
        "state": state,
        "present": m.present(name, now_ms),
        "counters": m.counters().get(name).copied().unwrap_or_default(),
        "selection": fleetboot_fleet::select::select(m.db(), n, fleetboot_fleet::select::Want::Configured)
            .map(|s| s.all().map(|c| format!("{} {}", c.name, c.version)).collect::<Vec<_>>())
            .map_err(|e| e.to_string()),
    }))
}

async fn api_nodes(State(svc): State<Arc<MasterService>>) -> Response {
    let _ = svc.sync().await;
    let m = svc.lock();
    let now = db::now_ms();
    Json(m.db().nodes.keys().filter_map(|n| node_view(&m, n, now)).collect::<Vec<_>>()).into_response()
}

async fn api_node(State(svc): State<Arc<MasterService>>, Path(name): Path<String>) -> Response {
    let _ = svc.sync().await;
    match node_view(&svc.lock(), &name, db::now_ms()) {
        Some(v) => Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no node named {name:?}")),
    }
}

async fn api_classes(State(svc): State<Arc<MasterService>>) -> Response {
    let _ = svc.sync().await;
    Json(svc.lock().db().classes.values().cloned().collect::<Vec<_>>()).into_response()
}

async fn api_packages(State(svc): State<Arc<MasterService>>) -> Response {
    let _ = svc.sync().await;
    Json(svc.lock().db().all_packages().cloned().collect::<Vec<_>>()).into_response()
}

async fn api_counters(State(svc): State<Arc<MasterService>>) -> Response {
    let m = svc.lock();
    let per_node = m.counters().clone();
    let mut total = fleetboot_fleet::master::Counters::default();
    for c in per_node.values() {
        total.image_bytes += c.image_bytes;
        total.package_bytes += c.package_bytes;
        total.blobs_served += c.blobs_served;
        total.boots += c.boots;
        total.verifications += c.verifications;
        total.matches += c.matches;
        total.updates += c.updates;
        total.installs += c.installs;
        total.tests += c.tests;
        total.refusals += c.refusals;
    }
    Json(json!({ "epoch": svc.epoch(), "serving": svc.serving(), "total": total, "nodes": per_node })).into_response()
}

async fn api_campaigns(State(svc): State<Arc<MasterService>>) -> Response {
    let _ = svc.sync().await;
    let m = svc.lock();
    let v: Vec<_> = m.campaigns().values().map(|c| json!({ "campaign": c, "tally": c.tally() })).collect();
    Json(v).into_response()
}

#[derive(serde::Deserialize)]
struct VerificationQuery {
    node: Option<String>,
    limit: Option<usize>,
}

async fn api_verifications(State(svc): State<Arc<MasterService>>, Query(q): Query<VerificationQuery>) -> Response {
    match svc.store.fleet_verifications(q.node.as_deref(), q.limit.unwrap_or(100).min(10_000)) {
        Ok(v) => Json(
            v.iter()
                .map(|r| json!({"ts_ms": r.ts_ms, "node": r.node, "result": r.result, "epoch": r.epoch,
                                "detail": serde_json::from_str::<serde_json::Value>(&r.detail).unwrap_or_default()}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepareBody {
    class: Option<String>,
    deadline_s: Option<u64>,
}

async fn api_prepare(State(svc): State<Arc<MasterService>>, body: axum::body::Bytes) -> Response {
    let b: PrepareBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("body: {e}")),
    };
    if let Some(c) = &b.class {
        if !svc.lock().db().classes.contains_key(c) {
            return error(StatusCode::UNPROCESSABLE_ENTITY, format!("class: {c:?} does not exist"));
        }
    }
    let spec = new_campaign(b.class, b.deadline_s.unwrap_or(600));
    if let Err(e) = svc.store.write(vec![db::campaign_spec_write(&spec)]).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let _ = svc.sync().await;
    (StatusCode::CREATED, Json(spec)).into_response()
}

pub fn new_campaign(class: Option<String>, deadline_s: u64) -> CampaignSpec {
    let now = db::now_ms();
    CampaignSpec { id: format!("prepare-{now}"), class, started_ms: now, deadline_ms: deadline_s.saturating_mul(1000) }
}

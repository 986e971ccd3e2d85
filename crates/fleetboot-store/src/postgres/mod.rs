//! The PostgreSQL backend: the same tables and the same [`Write`]s as SQLite, shared by
//! several fleetboot servers.
//!
//! - Its own small tokio runtime (two workers) runs the driver (`tokio-postgres`, pooled
//!   by `deadpool-postgres`), so a [`Store`](crate::Store) works the same from the CLI
//!   (no runtime), from `fleetboot serve`'s runtime, and from a test's.
//! - Writes: one writer thread takes the same jobs as SQLite's and commits everything
//!   pending in one transaction, each job in its own savepoint (group commit: many ACKs,
//!   one WAL flush). Trace events of a batch go in with one statement.
//! - Leases of servers that share the store go through [`leases`]: conditional upserts
//!   decided by the database, so an address is never bound to two clients.
//! - Changes are announced with `NOTIFY fleetboot` inside the transaction that makes them
//!   (delivered at commit); one connection per store `LISTEN`s and fans them out as
//!   [`Notice`]s. After a reconnection it sends [`NoticeKind::Resync`]: what was said while
//!   it was away is lost, so subscribers reload.
//! - A lost connection is the pool's to replace; a write that fails is reported failed
//!   (the DHCP shell then sends no ACK), never retried behind the caller's back.

pub(crate) mod cluster;
pub(crate) mod leases;
mod write;

use crate::config::{Migrate, PgConfig};
use crate::{LeaseRecord, Result, StoreError, StoredProfile, TraceEvent};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::config::{Host, SslMode};

/// The channel every fleetboot server listens on.
pub const CHANNEL: &str = "fleetboot";

/// The advisory lock taken while migrating ("flee" in ASCII), so servers starting together
/// migrate once.
const MIGRATION_LOCK: i64 = 0x666c_6565;

/// What a server announced; `origin` is the announcing store's [`PgStore::instance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub origin: String,
    pub kind: NoticeKind,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// Lease changes; the body is a JSON array of [`leases::LeaseNotice`].
    Leases,
    /// Boot profiles changed; the body names them ([`parse_profile_names`]).
    Profiles,
    /// The master's tables changed (configuration, epoch, master lease).
    Fleet,
    /// A DHCP server joined or left.
    Servers,
    /// The listener reconnected: anything may have changed meanwhile.
    Resync,
}

impl NoticeKind {
    /// The kind as it travels in a notice (and labels metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Leases => "leases",
            NoticeKind::Profiles => "profiles",
            NoticeKind::Fleet => "fleet",
            NoticeKind::Servers => "servers",
            NoticeKind::Resync => "resync",
        }
    }

    fn parse(s: &str) -> Option<NoticeKind> {
        Some(match s {
            "leases" => NoticeKind::Leases,
            "profiles" => NoticeKind::Profiles,
            "fleet" => NoticeKind::Fleet,
            "servers" => NoticeKind::Servers,
            _ => return None,
        })
    }
}

/// `origin kind body`, as sent with `pg_notify`.
pub(crate) fn notice_payload(origin: &str, kind: NoticeKind, body: &str) -> String {
    format!("{origin} {} {body}", kind.as_str())
}

fn parse_notice(payload: &str) -> Option<Notice> {
    let (origin, rest) = payload.split_once(' ')?;
    let (kind, body) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(Notice { origin: origin.to_string(), kind: NoticeKind::parse(kind)?, body: body.to_string() })
}

/// The profiles a `profiles` notice body names; `None`: it names none (any profile may
/// have changed: read them all).
pub fn parse_profile_names(body: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(body).ok()
}

/// The database's clock, in Unix milliseconds: servers on several hosts compare times
/// (heartbeats, the master lease) on one clock.
pub(crate) const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

pub(crate) fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Postgres(format!("{} (SQLSTATE {})", db.message(), db.code().code()));
    }
    if e.is_closed() {
        return StoreError::Unavailable(format!("connection closed: {e}"));
    }
    StoreError::Unavailable(e.to_string())
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

pub(crate) struct PgStore {
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    /// Unique per opened store: tells a server its own notices apart.
    instance: String,
    notices: tokio::sync::broadcast::Sender<Notice>,
    lease_jobs: tokio::sync::mpsc::Sender<leases::LeaseJob>,
    /// What the connection is, for `fleetboot store check` (user@host/db, TLS or not).
    describe: String,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The last handle may go away inside someone's async task: a runtime cannot be
        // dropped there, but it can be told to stop in the background.
        if let Some(rt) = self.runtime.lock().unwrap_or_else(|e| e.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

fn read_password(cfg: &PgConfig) -> Result<Option<String>> {
    if let Some(p) = &cfg.password_file {
        let text = std::fs::read_to_string(p)
            .map_err(|e| StoreError::Config(format!("store.password_file {}: {e}", p.display())))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    for var in ["FLEETBOOT_STORE_PASSWORD", "PGPASSWORD"] {
        if let Ok(v) = std::env::var(var) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn is_local(hosts: &[Host]) -> bool {
    hosts.iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
    })
}

/// The driver's config: the URL plus the password from its file or the environment, TLS
/// required unless the URL says otherwise or the server is on this host, keepalives so a
/// dead server is noticed.
pub(crate) fn driver_config(cfg: &PgConfig) -> Result<tokio_postgres::Config> {
    let mut c: tokio_postgres::Config =
        cfg.url.parse().map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
    if let Some(pw) = read_password(cfg)? {
        c.password(pw);
    }
    if !cfg.url.contains("sslmode=") && !is_local(c.get_hosts()) {
        // Secure by default: over a network, TLS with a verified certificate or nothing.
        c.ssl_mode(SslMode::Require);
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(cfg.connect_timeout);
    }
    c.application_name("fleetboot");
    c.keepalives(true);
    c.keepalives_idle(Duration::from_secs(10));
    c.keepalives_interval(Duration::from_secs(2));
    c.keepalives_retries(3);
    c.tcp_user_timeout(Duration::from_secs(15));
    Ok(c)
}

/// rustls with the ring provider, trusting `ca_file` or the system's roots. The server's
/// certificate and name are always verified when TLS is used.
pub(crate) fn tls(cfg: &PgConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| StoreError::Config(format!("store.ca_file {}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| StoreError::Config(format!("store.ca_file {}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| StoreError::Config(format!("store.ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn describe(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{host}:{port}/{} (sslmode {:?})",
        c.get_user().unwrap_or("?"),
        c.get_dbname().unwrap_or("?"),
        c.get_ssl_mode()
    )
    .to_lowercase()
}

fn instance_id() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b.copy_from_slice(&(t as u64 ^ std::process::id() as u64).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl PgStore {
    /// Connects (the first connection proves the settings), migrates per `migrate` (`None`:
    /// leaves the schema alone, for `fleetboot store check`), starts the listener and the
    /// lease writer.
    pub(crate) fn open(cfg: &PgConfig, migrate: Option<Migrate>) -> Result<Arc<PgStore>> {
        let driver = driver_config(cfg)?;
        let tls = tls(cfg)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fleetboot-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("starting the PostgreSQL runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let manager = Manager::from_config(driver.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Verified });
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(cfg.connect_timeout))
            .create_timeout(Some(cfg.connect_timeout))
            .recycle_timeout(Some(cfg.connect_timeout))
            .build()
            .map_err(|e| StoreError::Config(format!("store: {e}")))?;
        let (notices, _) = tokio::sync::broadcast::channel(4096);
        let (lease_jobs, lease_rx) = tokio::sync::mpsc::channel(leases::MAX_PENDING);
        let store = Arc::new(PgStore {
            runtime: std::sync::Mutex::new(Some(runtime)),
            handle,
            pool,
            instance: instance_id(),
            notices,
            lease_jobs,
            describe: describe(&driver),
        });
        let s = store.clone();
        match migrate {
            Some(m) => store.block(async move { s.migrate_or_check(m).await })??,
            None => {
                store.block(async move { PgStore::client(&s.pool).await.map(drop) })??;
            }
        }
        // Listening before `open` returns: a change another server commits after that is
        // heard (until the listener's connection drops; then subscribers get a Resync).
        let (ready, listening) = tokio::sync::oneshot::channel();
        // Named so an operator (or a test) can tell this server's listening connection in
        // pg_stat_activity: the instance is in this store's log line below.
        let mut listener = driver.clone();
        listener.application_name(format!("fleetboot-listen {}", store.instance));
        store.handle.spawn(listen(listener, tls, store.notices.clone(), ready));
        let wait = cfg.connect_timeout;
        if !matches!(store.block(async move { tokio::time::timeout(wait, listening).await })?, Ok(Ok(()))) {
            tracing::warn!("the PostgreSQL listener is not connected yet; changes of other servers are heard once it is");
        }
        store.handle.spawn(leases::run_writer(store.pool.clone(), store.instance.clone(), lease_rx));
        tracing::info!(store = %store.describe, instance = %store.instance, "PostgreSQL store open");
        Ok(store)
    }

    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `fut` on the store's runtime and waits for it from a thread that is not one of
    /// the runtime's own (the CLI, a reader in an API handler).
    pub(crate) fn block<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| StoreError::Unavailable("the PostgreSQL runtime stopped".into()))
    }

    /// Runs `fut` on the store's runtime and awaits it from any runtime.
    pub(crate) async fn run<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> Result<T> {
        self.handle.spawn(fut).await.map_err(|e| StoreError::Unavailable(format!("PostgreSQL task: {e}")))
    }

    pub(crate) async fn client(pool: &Pool) -> Result<deadpool_postgres::Object> {
        pool.get().await.map_err(pool_error)
    }

    /// The schema version in the database and the newest this fleetboot knows.
    pub(crate) async fn schema_version(pool: &Pool) -> Result<(usize, usize)> {
        let c = PgStore::client(pool).await?;
        let exists: bool = c
            .query_one("SELECT to_regclass('fleetboot_schema') IS NOT NULL", &[])
            .await
            .map_err(pg_error)?
            .get(0);
        let current = if exists {
            let v: i64 = c.query_one("SELECT version FROM fleetboot_schema", &[]).await.map_err(pg_error)?.get(0);
            v as usize
        } else {
            0
        };
        Ok((current, crate::schema::MIGRATIONS.len()))
    }

    async fn migrate_or_check(&self, migrate: Migrate) -> Result<()> {
        let (current, latest) = PgStore::schema_version(&self.pool).await?;
        if current > latest {
            return Err(StoreError::SchemaAhead { current, latest });
        }
        if current < latest {
            match migrate {
                Migrate::Auto => {
                    PgStore::migrate(&self.pool).await?;
                }
                Migrate::Manual => return Err(StoreError::SchemaBehind { current, latest }),
            }
        }
        Ok(())
    }

    /// Applies the pending migrations in one transaction under an advisory lock; returns
    /// the versions (before, after).
    pub(crate) async fn migrate(pool: &Pool) -> Result<(usize, usize)> {
        let mut c = PgStore::client(pool).await?;
        let tx = c.transaction().await.map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS fleetboot_schema (id BIGINT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
             INSERT INTO fleetboot_schema (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;",
        )
        .await
        .map_err(pg_error)?;
        let before = tx.query_one("SELECT version FROM fleetboot_schema", &[]).await.map_err(pg_error)?.get::<_, i64>(0) as usize;
        let latest = crate::schema::MIGRATIONS.len();
        if before > latest {
            return Err(StoreError::SchemaAhead { current: before, latest });
        }
        for (i, step) in crate::schema::MIGRATIONS.iter().enumerate().skip(before) {
            tx.batch_execute(&crate::dialect::to_postgres(step))
                .await
                .map_err(|e| StoreError::Postgres(format!("migration {}: {}", i + 1, pg_error(e))))?;
            tx.execute("UPDATE fleetboot_schema SET version = $1", &[&((i + 1) as i64)]).await.map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        if before < latest {
            tracing::info!(from = before, to = latest, "PostgreSQL schema migrated");
        }
        Ok((before, latest))
    }

    // ---- reads (the same rows as SQLite's) ----------------------------------------------

    pub(crate) fn leases(&self) -> Result<Vec<LeaseRecord>> {
        let pool = self.pool.clone();
        self.block(async move { read_leases(&pool).await })?
    }

    pub(crate) fn profiles(&self) -> Result<Vec<StoredProfile>> {
        let pool = self.pool.clone();
        self.block(async move { PgStore::all_profiles(&pool).await })?
    }

    /// The stored profiles named `names` (those still there).
    pub(crate) async fn profiles_named(pool: &Pool, names: &[String]) -> Result<Vec<StoredProfile>> {
        let c = PgStore::client(pool).await?;
        let rows = c
            .query("SELECT name, json, source FROM profiles WHERE name = ANY($1) ORDER BY name", &[&names])
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(|r| StoredProfile { name: r.get(0), json: r.get(1), source: r.get(2) }).collect())
    }

    pub(crate) async fn all_profiles(pool: &Pool) -> Result<Vec<StoredProfile>> {
        let c = PgStore::client(pool).await?;
        let rows = c.query("SELECT name, json, source FROM profiles ORDER BY name", &[]).await.map_err(pg_error)?;
        Ok(rows.iter().map(|r| StoredProfile { name: r.get(0), json: r.get(1), source: r.get(2) }).collect())
    }

    pub(crate) fn trace(&self, mac: &str, limit: usize) -> Result<Vec<TraceEvent>> {
        let (pool, mac) = (self.pool.clone(), mac.to_string());
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            let rows = c
                .query(
                    "SELECT ts_ms, mac, kind, detail FROM (SELECT id, ts_ms, mac, kind, detail FROM trace
                     WHERE mac = $1 ORDER BY id DESC LIMIT $2) newest ORDER BY id",
                    &[&mac, &(limit as i64)],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| TraceEvent { ts_ms: r.get::<_, i64>(0) as u64, mac: r.get(1), kind: r.get(2), detail: r.get(3) })
                .collect())
        })?
    }

    pub(crate) fn fleet_meta(&self) -> Result<crate::fleet::FleetMeta> {
        let pool = self.pool.clone();
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            let r = c.query_one("SELECT epoch, config_rev FROM fleet_meta WHERE id = 1", &[]).await.map_err(pg_error)?;
            Ok(crate::fleet::FleetMeta { epoch: r.get::<_, i64>(0) as u64, config_rev: r.get::<_, i64>(1) as u64 })
        })?
    }

    pub(crate) fn fleet_config(&self) -> Result<crate::fleet::FleetConfigRows> {
        let pool = self.pool.clone();
        self.block(async move {
            let mut c = PgStore::client(&pool).await?;
            // One snapshot: the rows and the revision they belong to agree.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_error)?;
            let pairs = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| (r.get(0), r.get(1))).collect::<Vec<(String, String)>>();
            let rev: i64 = tx.query_one("SELECT config_rev FROM fleet_meta WHERE id = 1", &[]).await.map_err(pg_error)?.get(0);
            let nodes = pairs(tx.query("SELECT name, json FROM fleet_nodes ORDER BY name", &[]).await.map_err(pg_error)?);
            let classes = pairs(tx.query("SELECT name, json FROM fleet_classes ORDER BY name", &[]).await.map_err(pg_error)?);
            let packages = tx
                .query("SELECT json, added_ms FROM fleet_packages ORDER BY name, version", &[])
                .await
                .map_err(pg_error)?
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect();
            let campaigns = tx
                .query("SELECT id, json, progress FROM fleet_campaigns ORDER BY id", &[])
                .await
                .map_err(pg_error)?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            tx.commit().await.map_err(pg_error)?;
            Ok(crate::fleet::FleetConfigRows { config_rev: rev as u64, nodes, classes, packages, campaigns })
        })?
    }

    pub(crate) fn fleet_node_states(&self) -> Result<Vec<(String, String)>> {
        let pool = self.pool.clone();
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            let rows = c.query("SELECT name, json FROM fleet_node_state ORDER BY name", &[]).await.map_err(pg_error)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })?
    }

    pub(crate) fn fleet_node_state(&self, name: &str) -> Result<Option<String>> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            let row = c.query_opt("SELECT json FROM fleet_node_state WHERE name = $1", &[&name]).await.map_err(pg_error)?;
            Ok(row.map(|r| r.get(0)))
        })?
    }

    pub(crate) fn fleet_verifications(&self, node: Option<&str>, limit: usize) -> Result<Vec<crate::fleet::VerificationRecord>> {
        let (pool, node) = (self.pool.clone(), node.map(str::to_string));
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            let rows = c
                .query(
                    "SELECT ts_ms, node, result, detail, epoch FROM (SELECT * FROM fleet_verifications
                     WHERE $1::text IS NULL OR node = $1 ORDER BY id DESC LIMIT $2) newest ORDER BY id",
                    &[&node, &(limit as i64)],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| crate::fleet::VerificationRecord {
                    ts_ms: r.get::<_, i64>(0) as u64,
                    node: r.get(1),
                    result: r.get(2),
                    detail: r.get(3),
                    epoch: r.get::<_, i64>(4) as u64,
                })
                .collect())
        })?
    }

    pub(crate) fn lease(&self, ip: Ipv4Addr) -> Result<Option<LeaseRecord>> {
        let pool = self.pool.clone();
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            let row = c
                .query_opt("SELECT ip, mac, client_id, expires_at, hostname, state FROM leases WHERE ip = $1", &[&ip.to_string()])
                .await
                .map_err(pg_error)?;
            Ok(row.as_ref().and_then(lease_row))
        })?
    }

    /// API tokens, all or those matching `filter` (`live`: not revoked; `sha256`: that hash).
    pub(crate) fn tokens(&self, live_only: bool, sha256: Option<&str>) -> Result<Vec<crate::TokenRecord>> {
        let (pool, sha256) = (self.pool.clone(), sha256.map(str::to_string));
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            let rows = c
                .query(
                    "SELECT id, name, role, sha256, created_ms, revoked_ms FROM api_tokens
                     WHERE (NOT $1 OR revoked_ms IS NULL) AND ($2::text IS NULL OR sha256 = $2) ORDER BY id",
                    &[&live_only, &sha256],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| crate::TokenRecord {
                    id: r.get(0),
                    name: r.get(1),
                    role: r.get(2),
                    sha256: r.get(3),
                    created_ms: r.get::<_, i64>(4) as u64,
                    revoked_ms: r.get::<_, Option<i64>>(5).map(|v| v as u64),
                })
                .collect())
        })?
    }

    pub(crate) fn audit(&self, after: Option<i64>, limit: usize) -> Result<Vec<crate::AuditEntry>> {
        let pool = self.pool.clone();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.block(async move {
            let c = PgStore::client(&pool).await?;
            const COLUMNS: &str = "id, ts_ms, actor, actor_id, action, target, before, after, remote";
            let rows = match after {
                Some(after) => c.query(&format!("SELECT {COLUMNS} FROM audit WHERE id > $1 ORDER BY id LIMIT $2"), &[&after, &limit]).await,
                None => {
                    c.query(&format!("SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM audit ORDER BY id DESC LIMIT $1) newest ORDER BY id"), &[&limit])
                        .await
                }
            }
            .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| crate::AuditEntry {
                    id: r.get(0),
                    ts_ms: r.get::<_, i64>(1) as u64,
                    actor: r.get(2),
                    actor_id: r.get(3),
                    action: r.get(4),
                    target: r.get(5),
                    before: r.get(6),
                    after: r.get(7),
                    remote: r.get(8),
                })
                .collect())
        })?
    }

    /// Starts the writer thread for [`crate::Write`] jobs. It holds the store, so the
    /// runtime lives until the last job is answered.
    pub(crate) fn spawn_writer(self: &Arc<PgStore>) -> std::sync::mpsc::Sender<crate::writer::Job> {
        let (tx, rx) = std::sync::mpsc::channel::<crate::writer::Job>();
        let store = self.clone();
        std::thread::Builder::new()
            .name("fleetboot-pg-writer".into())
            .spawn(move || write::run(store, rx))
            .expect("spawning the PostgreSQL writer thread");
        tx
    }

    pub(crate) fn lease_jobs(&self) -> &tokio::sync::mpsc::Sender<leases::LeaseJob> {
        &self.lease_jobs
    }
}

pub(crate) async fn read_leases(pool: &Pool) -> Result<Vec<LeaseRecord>> {
    let c = PgStore::client(pool).await?;
    let rows = c
        .query("SELECT ip, mac, client_id, expires_at, hostname, state FROM leases ORDER BY ip", &[])
        .await
        .map_err(pg_error)?;
    Ok(rows.iter().filter_map(lease_row).collect())
}

pub(crate) fn lease_row(r: &tokio_postgres::Row) -> Option<LeaseRecord> {
    let ip: String = r.get(0);
    Some(LeaseRecord {
        ip: ip.parse::<Ipv4Addr>().ok()?,
        mac: r.get(1),
        client_id: r.get(2),
        expires_at: r.get::<_, i64>(3) as u64,
        hostname: r.get(4),
        state: r.get(5),
    })
}

/// One connection that `LISTEN`s, reconnecting with backoff; every notice goes to the
/// subscribers. Ends when the store's runtime does.
async fn listen(
    driver: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    out: tokio::sync::broadcast::Sender<Notice>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    use futures_util::StreamExt;
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    loop {
        let started = Instant::now();
        match driver.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let pump = tokio::spawn(async move {
                    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if tx.send(n.payload().to_string()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL listener connection lost");
                                break;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        if !first {
                            tracing::info!("PostgreSQL listener reconnected");
                            let _ = out.send(Notice { origin: String::new(), kind: NoticeKind::Resync, body: String::new() });
                        }
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        backoff = Duration::from_millis(200);
                        while let Some(payload) = rx.recv().await {
                            match parse_notice(&payload) {
                                Some(n) => {
                                    let _ = out.send(n);
                                }
                                None => tracing::debug!(%payload, "unreadable notification ignored"),
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                }
                pump.abort();
                drop(client);
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(1) || backoff >= Duration::from_secs(2) {
                    tracing::warn!(error = %e, "PostgreSQL listener cannot connect; retrying");
                }
            }
        }
        // Whatever happened while disconnected was not heard: say so once reconnected.
        first = false;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_notices_name_their_profiles() {
        let body = leases::chunk_notices(&["pxe-default", "rescue"]);
        assert_eq!(body.len(), 1);
        assert_eq!(parse_profile_names(&body[0]), Some(vec!["pxe-default".to_string(), "rescue".to_string()]));
        assert_eq!(parse_profile_names(""), None, "an unnamed notice: read every profile");
    }

    #[test]
    fn notices_round_trip() {
        let p = notice_payload("ab12", NoticeKind::Leases, "[1, 2]");
        assert_eq!(parse_notice(&p), Some(Notice { origin: "ab12".into(), kind: NoticeKind::Leases, body: "[1, 2]".into() }));
        assert_eq!(parse_notice("x servers").map(|n| n.kind), Some(NoticeKind::Servers));
        assert_eq!(parse_notice("x bogus body"), None);
    }

    #[test]
    fn tls_is_required_off_this_host_unless_the_url_says() {
        let cfg = |url: &str| PgConfig {
            url: url.into(),
            password_file: None,
            ca_file: None,
            pool_size: 4,
            connect_timeout: Duration::from_secs(1),
        };
        assert_eq!(driver_config(&cfg("postgresql://u@db.example/f")).unwrap().get_ssl_mode(), SslMode::Require);
        assert_eq!(driver_config(&cfg("postgresql://u@127.0.0.1/f")).unwrap().get_ssl_mode(), SslMode::Prefer);
        assert_eq!(driver_config(&cfg("postgresql://u@db.example/f?sslmode=disable")).unwrap().get_ssl_mode(), SslMode::Disable);
        assert_eq!(driver_config(&cfg("postgresql://u@%2Ftmp%2Fsock/f")).unwrap().get_ssl_mode(), SslMode::Prefer);
    }
}

//! fleetboot's state: one SQLite file (WAL mode) by default, or a PostgreSQL database
//! that several servers share (`[store] url`, see [`config`]; the backend in `postgres`).
//!
//! - [`Store`]: the handle every service holds. Writes go to one writer thread that drains
//!   its queue and commits everything pending in one transaction (group commit): a burst of
//!   DHCP ACKs costs one fsync, not one each ([`Store::stats`] counts the transactions). A
//!   lease write's future resolves only after its transaction is durable, which is what
//!   lets the address service promise "an ACK is sent only for a lease on disk".
//! - Reads use their own connection, so an API query never waits behind a commit.
//! - Schema migrations live in [`schema`], applied in order on open (`PRAGMA user_version`).
//! - The boot trace has a path of its own ([`trace`]): [`Store::record_trace`] never blocks,
//!   repeats and overflow are counted rather than written, trace rows are written in their
//!   own transactions after the lease commits and kept within [`TraceLimits`] (the
//!   `[trace]` section, [`trace_config`]; on PostgreSQL trace events go with the writer's batches).
//!
//! Row types here ([`LeaseRecord`], [`TraceEvent`], [`StoredProfile`], [`TokenRecord`],
//! [`AuditEntry`]) are plain data; the services convert to and from their own domain
//! types, so this crate knows no protocol.
//!
//! API tokens are stored as their SHA-256 only (`api_tokens`); revoking one keeps its row,
//! so the audit log can still name it. The audit log (`audit`) is append-only: who (a
//! token's name and id, `config`, a local user), when, what, and the JSON before and after.
//!
//! Both backends take the same [`Write`]s and answer the same reads; the same migrations
//! make the same tables (`dialect.rs` maps the few type names). What only a shared store
//! has: [`Store::commit_leases`] (addresses decided by the database among servers),
//! [`Store::subscribe`] (what other servers changed, as it commits), DHCP membership
//! ([`Store::dhcp_heartbeat`]). The master lease and replica reports ([`cluster`]) work on
//! both.

pub mod cluster;
pub mod config;
mod dialect;
pub mod fleet;
mod postgres;
mod schema;
pub mod testing;
pub mod trace;
pub mod trace_config;
mod writer;

use rusqlite::{params, Connection, OpenFlags};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

pub use postgres::leases::{parse_notices, LeaseCommit, LeaseNotice};
pub use postgres::{parse_profile_names, Notice, NoticeKind};
pub use trace::{Recorded, TraceStats};
pub use trace_config::TraceLimits;
pub use writer::Write;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the store's writer thread has stopped")]
    WriterGone,
    /// A fenced write from a master whose epoch is no longer the current one.
    #[error("stale master epoch {held} (the current epoch is {current}): this master was deposed")]
    StaleEpoch { held: u64, current: u64 },
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The database cannot be reached now (connection refused or lost, pool exhausted).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Config(String),
    #[error("the store's schema is at version {current}, this fleetboot needs {latest}: run `fleetboot store migrate` (or set store.migrate = \"auto\")")]
    SchemaBehind { current: usize, latest: usize },
    #[error("the store's schema is at version {current}, newer than this fleetboot knows ({latest}): upgrade fleetboot")]
    SchemaAhead { current: usize, latest: usize },
    /// A lease bind lost: the address is another client's (`current`, when it still is).
    #[error("{ip} is held by another client")]
    LeaseConflict { ip: Ipv4Addr, current: Option<LeaseRecord> },
    #[error("{0} needs a shared (PostgreSQL) store")]
    NeedsSharedStore(&'static str),
}

impl StoreError {
    /// The same error for another waiter of a failed batch (SQLite's errors do not clone).
    pub(crate) fn clone_for_waiter(&self) -> StoreError {
        match self {
            StoreError::Open { path, source } => StoreError::Unavailable(format!("database {}: {source}", path.display())),
            StoreError::Sql(e) => StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(e.to_string().into())),
            StoreError::WriterGone => StoreError::WriterGone,
            StoreError::StaleEpoch { held, current } => StoreError::StaleEpoch { held: *held, current: *current },
            StoreError::Postgres(m) => StoreError::Postgres(m.clone()),
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Config(m) => StoreError::Config(m.clone()),
            StoreError::SchemaBehind { current, latest } => StoreError::SchemaBehind { current: *current, latest: *latest },
            StoreError::SchemaAhead { current, latest } => StoreError::SchemaAhead { current: *current, latest: *latest },
            StoreError::LeaseConflict { ip, current } => StoreError::LeaseConflict { ip: *ip, current: current.clone() },
            StoreError::NeedsSharedStore(w) => StoreError::NeedsSharedStore(w),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One address lease as stored. `state` is `bound` or `declined`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub ip: Ipv4Addr,
    /// `52:54:00:77:00:10`
    pub mac: String,
    pub client_id: Option<Vec<u8>>,
    /// Unix seconds.
    pub expires_at: u64,
    pub hostname: Option<String>,
    pub state: String,
}

/// One event in a client's boot: a DHCP message, a TFTP or HTTP transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// Unix milliseconds.
    pub ts_ms: u64,
    pub mac: String,
    /// `DHCPDISCOVER`, `TFTP-RRQ`, `HTTP-GET`, ...
    pub kind: String,
    pub detail: String,
}

/// A boot profile as stored: its JSON text and where it came from (`config` or `api`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProfile {
    pub name: String,
    pub json: String,
    pub source: String,
}

/// A version of an object an origin published for its caches (`files/...`, `images/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginObject {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    pub created_ms: u64,
}

/// A row of an origin's verification table: what one cache holds of one object version.
/// `state` is `pending`, `verified`, `stale` or `evicted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldingRow {
    pub cache: String,
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub state: String,
    pub changed_ms: u64,
}

/// A row of a cache's own verification table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheObject {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    pub state: String,
    pub pinned: bool,
    pub last_used_ms: u64,
    pub changed_ms: u64,
}

/// A client's plan in a cache's image map, as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheClient {
    pub mac: String,
    pub plan: String,
    pub learned_ms: u64,
}

/// An API token as stored: never the token itself, only its SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Assigned by the store (0 in a [`Write::InsertToken`]).
    pub id: i64,
    pub name: String,
    /// `read` or `admin`.
    pub role: String,
    pub sha256: String,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
}

/// One accepted change: who made it, when, to what, and the state before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Assigned by the store (0 in a [`Write::Audit`]).
    pub id: i64,
    /// Unix milliseconds.
    pub ts_ms: u64,
    /// A token's name, `config`, `local:<user>` for the command line...
    pub actor: String,
    /// The token's id, when a token made the change.
    pub actor_id: Option<i64>,
    /// `profile.create`, `image.delete`, `token.revoke`, `POST /api/...`
    pub action: String,
    /// What changed: `profile/NAME`, `image/NAME:VERSION`, `token/NAME`...
    pub target: String,
    /// JSON text of the state before (`None`: it did not exist).
    pub before: Option<String>,
    /// JSON text of the state after (`None`: it is gone).
    pub after: Option<String>,
    /// The address the request came from, for changes made over the network.
    pub remote: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    writes: mpsc::Sender<writer::Job>,
    traces: Arc<trace::TraceQueue>,
    /// SQLite's read connection; `None` on PostgreSQL.
    reader: Option<Arc<Mutex<Connection>>>,
    path: PathBuf,
    counters: Arc<writer::Counters>,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    /// `side`: a connection of its own for the master lease and replica reports, opened
    /// when first needed (a serving DHCP server never needs it).
    Sqlite { side: Arc<Mutex<Option<Connection>>> },
    Postgres(Arc<postgres::PgStore>),
}

/// The schema a store has and the one this fleetboot needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaVersion {
    pub current: usize,
    pub latest: usize,
}

fn sqlite_version(conn: &Connection) -> Result<usize> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize)
}

/// What the writer thread has done since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Writes someone waits on ([`Store::write`], [`Store::write_blocking`]) queued so far.
    pub queued: u64,
    /// Transactions committed (or tried), each one fsync.
    pub transactions: u64,
    /// Transactions that carried at least one write someone waited on.
    pub durable_transactions: u64,
    /// Writes someone waited on, committed (or tried) in those transactions.
    pub durable_writes: u64,
    /// Transactions that failed (their writers got the error).
    pub failed: u64,
}

/// Holds the writer thread before its next transaction while it lives
/// ([`Store::hold_commits`]); writes queue up meanwhile and go in one transaction after.
#[cfg(any(test, feature = "test-hooks"))]
pub struct CommitHold(#[allow(dead_code)] mpsc::Sender<()>);

fn open_conn(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Runs `step` again while SQLite answers "busy" or "locked", for up to 10 s.
///
/// The busy timeout does not cover a file's first moments: while it is still in rollback
/// mode, SQLite refuses a lock upgrade that could deadlock at once, without waiting, and
/// switching to WAL needs the file to itself. Two processes opening a new file together
/// (`fleetboot serve` and `fleetboot nbd` from the packaged units) hit exactly that.
fn retry_while_busy<T>(mut step: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        match step() {
            Err(StoreError::Sql(rusqlite::Error::SqliteFailure(e, _)))
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database, migrates it and starts the writer thread,
    /// with the default trace limits.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with_limits(path, TraceLimits::default())
    }

    /// [`Store::open`] with the boot trace kept within `limits`.
    pub fn open_with_limits(path: &Path, limits: TraceLimits) -> Result<Store> {
        let conn = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)?;
        let version = retry_while_busy(|| {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            schema::migrate(&conn)?;
            sqlite_version(&conn)
        })?;
        // FULL: a commit is on disk when it returns, even across power loss, not just a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        if version > schema::MIGRATIONS.len() {
            return Err(StoreError::SchemaAhead { current: version, latest: schema::MIGRATIONS.len() });
        }
        let reader = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let traces = Arc::new(trace::TraceQueue::new(limits));
        traces.rows.store(trace::count_rows(&conn)?, std::sync::atomic::Ordering::Relaxed);
        let counters = Arc::new(writer::Counters::default());
        let writes = writer::spawn(conn, counters.clone(), traces.clone());
        Ok(Store {
            writes,
            traces,
            reader: Some(Arc::new(Mutex::new(reader))),
            path: path.to_path_buf(),
            backend: Backend::Sqlite { side: Arc::new(Mutex::new(None)) },
            counters,
        })
    }

    /// Records one boot-trace event without waiting: queued for the writer, or counted as a
    /// repeat or as overflow (see [`trace`]). Never delays or fails a lease commit. On
    /// PostgreSQL the event goes with the writer's next batch.
    pub fn record_trace(&self, event: TraceEvent) -> Recorded {
        if matches!(self.backend, Backend::Postgres(_)) {
            self.write_later(vec![Write::Trace(event)]);
            return Recorded::Queued;
        }
        let (recorded, wake) = self.traces.push(event, std::time::Instant::now());
        if wake {
            let _ = self.writes.send(writer::Job::wake());
        }
        recorded
    }

    /// The trace's counters since this store was opened.
    pub fn trace_stats(&self) -> TraceStats {
        self.traces.stats()
    }

    /// The trace limits this store keeps.
    pub fn trace_limits(&self) -> &TraceLimits {
        &self.traces.limits
    }

    /// Opens the store a `[store]` section names: SQLite at `sqlite_path`, or PostgreSQL
    /// (default trace limits).
    pub fn open_with(cfg: &config::StoreConfig, sqlite_path: &Path) -> Result<Store> {
        Store::open_configured(cfg, sqlite_path, TraceLimits::default())
    }

    /// [`Store::open_with`], the boot trace kept within `limits` (the `[trace]` section).
    pub fn open_configured(cfg: &config::StoreConfig, sqlite_path: &Path, limits: TraceLimits) -> Result<Store> {
        match &cfg.backend {
            config::Backend::Sqlite => {
                if cfg.migrate == config::Migrate::Manual {
                    let v = Store::schema_version(cfg, sqlite_path)?;
                    if v.current < v.latest {
                        return Err(StoreError::SchemaBehind { current: v.current, latest: v.latest });
                    }
                }
                Store::open_with_limits(sqlite_path, limits)
            }
            config::Backend::Postgres(pg) => Store::from_pg(postgres::PgStore::open(pg, Some(cfg.migrate))?, sqlite_path, limits),
        }
    }

    fn from_pg(pg: Arc<postgres::PgStore>, sqlite_path: &Path, limits: TraceLimits) -> Result<Store> {
        let writes = pg.spawn_writer();
        // PostgreSQL's writer does not count its transactions (`stats` stays at zero there)
        // and writes trace events with its batches (`trace_stats` too).
        let counters = Arc::new(writer::Counters::default());
        let traces = Arc::new(trace::TraceQueue::new(limits));
        Ok(Store { writes, traces, reader: None, path: sqlite_path.to_path_buf(), backend: Backend::Postgres(pg), counters })
    }

    /// The schema version of the store `cfg` names, without changing it.
    pub fn schema_version(cfg: &config::StoreConfig, sqlite_path: &Path) -> Result<SchemaVersion> {
        let latest = schema::MIGRATIONS.len();
        match &cfg.backend {
            config::Backend::Sqlite => {
                if !sqlite_path.exists() {
                    return Ok(SchemaVersion { current: 0, latest });
                }
                let conn = open_conn(sqlite_path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
                Ok(SchemaVersion { current: sqlite_version(&conn)?, latest })
            }
            config::Backend::Postgres(pg) => {
                let store = postgres::PgStore::open(pg, None)?;
                let pool = store.pool().clone();
                let (current, latest) = store.block(async move { postgres::PgStore::schema_version(&pool).await })??;
                Ok(SchemaVersion { current, latest })
            }
        }
    }

    /// Applies pending migrations to the store `cfg` names; returns the versions before
    /// and after.
    pub fn migrate(cfg: &config::StoreConfig, sqlite_path: &Path) -> Result<(usize, usize)> {
        match &cfg.backend {
            config::Backend::Sqlite => {
                let before = Store::schema_version(cfg, sqlite_path)?.current;
                drop(Store::open(sqlite_path)?);
                Ok((before, schema::MIGRATIONS.len()))
            }
            config::Backend::Postgres(pg) => {
                let store = postgres::PgStore::open(pg, None)?;
                let pool = store.pool().clone();
                store.block(async move { postgres::PgStore::migrate(&pool).await })?
            }
        }
    }

    /// Whether other servers may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Which database this is, for logs and `fleetboot store check` (no password).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite { .. } => format!("sqlite {}", self.path.display()),
            Backend::Postgres(pg) => pg.describe().to_string(),
        }
    }

    /// What other servers change, as they commit it (shared stores only). A subscriber
    /// that falls behind gets `RecvError::Lagged` and must reload, as after a `Resync`.
    pub fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<Notice>> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg.subscribe()),
            Backend::Sqlite { .. } => None,
        }
    }

    /// This store's name in the notices it sends (its own come back to it too).
    pub fn notice_origin(&self) -> Option<&str> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg.instance()),
            Backend::Sqlite { .. } => None,
        }
    }

    /// One DHCP exchange's lease changes, decided by the database among the servers that
    /// share it; resolves `Ok` once committed, `Err(LeaseConflict)` when a bound address
    /// is another client's. Shared stores only.
    pub async fn commit_leases(&self, commit: LeaseCommit) -> Result<()> {
        let Backend::Postgres(pg) = &self.backend else { return Err(StoreError::NeedsSharedStore("commit_leases")) };
        let (done, rx) = tokio::sync::oneshot::channel();
        pg.lease_jobs().try_send(postgres::leases::LeaseJob { commit, done }).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => StoreError::Unavailable("too many lease commits pending".into()),
            tokio::sync::mpsc::error::TrySendError::Closed(_) => StoreError::WriterGone,
        })?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Says this DHCP server is alive; returns the names of the live ones (sorted).
    pub async fn dhcp_heartbeat(&self, name: &str, peer_timeout: std::time::Duration) -> Result<Vec<String>> {
        let Backend::Postgres(pg) = &self.backend else { return Err(StoreError::NeedsSharedStore("dhcp_heartbeat")) };
        let (pool, name) = (pg.pool().clone(), name.to_string());
        pg.run(async move { postgres::leases::heartbeat(&pool, &name, peer_timeout).await }).await?
    }

    /// Tells the other DHCP servers this one joined (or is leaving: its row goes).
    pub async fn dhcp_announce(&self, name: &str, joined: bool) -> Result<()> {
        let Backend::Postgres(pg) = &self.backend else { return Err(StoreError::NeedsSharedStore("dhcp_announce")) };
        let (pool, origin, name) = (pg.pool().clone(), pg.instance().to_string(), name.to_string());
        pg.run(async move { postgres::leases::announce_membership(&pool, &origin, &name, joined).await }).await?
    }

    /// The SQLite side connection, opened on first use.
    fn with_side<T>(side: &Mutex<Option<Connection>>, path: &Path, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut guard = side.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?);
        }
        Ok(f(guard.as_mut().expect("opened above"))?)
    }

    /// Renews or takes the master lease (see [`cluster`]).
    pub async fn claim_master(&self, claim: cluster::MasterClaim<'_>) -> Result<cluster::MasterLease> {
        match &self.backend {
            Backend::Sqlite { side } => Store::with_side(side, &self.path, |c| cluster::sqlite::claim(c, &claim)),
            Backend::Postgres(pg) => {
                let (pool, origin) = (pg.pool().clone(), pg.instance().to_string());
                let (name, instance, url) = (claim.name.to_string(), claim.instance.to_string(), claim.url.to_string());
                let (ttl_ms, may_take) = (claim.ttl_ms, claim.may_take);
                pg.run(async move {
                    let claim = cluster::MasterClaim { name: &name, instance: &instance, url: &url, ttl_ms, may_take };
                    postgres::cluster::claim(&pool, &origin, &claim).await
                })
                .await?
            }
        }
    }

    /// Gives the master lease up at once (a master stopping cleanly), if `instance` holds it.
    pub async fn release_master(&self, instance: &str) -> Result<()> {
        match &self.backend {
            Backend::Sqlite { side } => Store::with_side(side, &self.path, |c| cluster::sqlite::release(c, instance)),
            Backend::Postgres(pg) => {
                let (pool, origin, instance) = (pg.pool().clone(), pg.instance().to_string(), instance.to_string());
                pg.run(async move { postgres::cluster::release(&pool, &origin, &instance).await }).await?
            }
        }
    }

    /// A master's or backup's report of how far it is.
    pub async fn report_replica(&self, report: cluster::ReplicaReport) -> Result<()> {
        match &self.backend {
            Backend::Sqlite { side } => Store::with_side(side, &self.path, |c| cluster::sqlite::report(c, &report)),
            Backend::Postgres(pg) => {
                let pool = pg.pool().clone();
                pg.run(async move { postgres::cluster::report(&pool, &report).await }).await?
            }
        }
    }

    /// The master lease, the epoch and every replica's report.
    pub fn cluster_status(&self) -> Result<cluster::ClusterStatus> {
        match &self.backend {
            Backend::Sqlite { side } => Store::with_side(side, &self.path, cluster::sqlite::status),
            Backend::Postgres(pg) => {
                let pool = pg.pool().clone();
                pg.block(async move { postgres::cluster::status(&pool).await })?
            }
        }
    }

    /// [`Store::cluster_status`] from async code.
    pub async fn cluster_status_async(&self) -> Result<cluster::ClusterStatus> {
        match &self.backend {
            Backend::Sqlite { .. } => self.cluster_status(),
            Backend::Postgres(pg) => {
                let pool = pg.pool().clone();
                pg.run(async move { postgres::cluster::status(&pool).await }).await?
            }
        }
    }

    /// [`Store::leases`] from async code, without blocking the caller's runtime.
    pub async fn leases_async(&self) -> Result<Vec<LeaseRecord>> {
        match &self.backend {
            Backend::Sqlite { .. } => self.leases(),
            Backend::Postgres(pg) => {
                let pool = pg.pool().clone();
                pg.run(async move { postgres::read_leases(&pool).await }).await?
            }
        }
    }

    /// The stored profiles, read without blocking the caller's runtime (on PostgreSQL: on
    /// the store's own).
    pub async fn profiles_async(&self) -> Result<Vec<StoredProfile>> {
        match &self.backend {
            Backend::Sqlite { .. } => self.profiles(),
            Backend::Postgres(pg) => {
                let pool = pg.pool().clone();
                pg.run(async move { postgres::PgStore::all_profiles(&pool).await }).await?
            }
        }
    }

    /// The stored profiles among `names` (a name with no row is not in the answer).
    pub async fn profiles_named_async(&self, names: Vec<String>) -> Result<Vec<StoredProfile>> {
        match &self.backend {
            Backend::Sqlite { .. } => Ok(self.profiles()?.into_iter().filter(|p| names.contains(&p.name)).collect()),
            Backend::Postgres(pg) => {
                let pool = pg.pool().clone();
                pg.run(async move { postgres::PgStore::profiles_named(&pool, &names).await }).await?
            }
        }
    }

    /// What the writer thread has done so far: how many writes were grouped into how many
    /// transactions.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        StoreStats {
            queued: c.queued.load(Ordering::Relaxed),
            transactions: c.transactions.load(Ordering::Relaxed),
            durable_transactions: c.durable_transactions.load(Ordering::Relaxed),
            durable_writes: c.durable_writes.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Holds the writer thread before its next transaction until the returned guard is
    /// dropped, so a test can let a burst of writes queue up and watch them go in one
    /// transaction. One hold at a time.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn hold_commits(&self) -> CommitHold {
        let (tx, rx) = mpsc::channel();
        let _ = self.writes.send(writer::Job { writes: Vec::new(), done: None, hold: Some(rx) });
        CommitHold(tx)
    }

    fn submit(&self, writes: Vec<Write>, done: Option<tokio::sync::oneshot::Sender<Result<()>>>) -> Result<()> {
        let durable = done.is_some();
        self.writes.send(writer::Job { writes, done, hold: None }).map_err(|_| StoreError::WriterGone)?;
        // Counted once in the queue, so a `queued` seen by a test is a write the writer can take.
        if durable {
            self.counters.queued.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues writes and resolves once they are committed durably.
    pub async fn write(&self, writes: Vec<Write>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(writes, Some(tx))?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Queues writes without waiting (trace events: losing the last few to a crash is fine).
    pub fn write_later(&self, writes: Vec<Write>) {
        let _ = self.submit(writes, None);
    }

    /// Blocking variant of [`Store::write`] for non-async callers (CLI, tests).
    pub fn write_blocking(&self, writes: Vec<Write>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(writes, Some(tx))?;
        rx.blocking_recv().map_err(|_| StoreError::WriterGone)?
    }

    /// A read on SQLite's read connection. A PostgreSQL store answers each public read
    /// itself (`postgres.rs`); one that has no PostgreSQL version yet says so.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let Some(reader) = &self.reader else {
            return Err(StoreError::Postgres("this read has no PostgreSQL version yet".into()));
        };
        let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&conn)?)
    }

    fn pg(&self) -> Option<&postgres::PgStore> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite { .. } => None,
        }
    }

    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        if let Some(pg) = self.pg() {
            return pg.leases();
        }
        self.read(read_leases)
    }

    pub fn profiles(&self) -> Result<Vec<StoredProfile>> {
        if let Some(pg) = self.pg() {
            return pg.profiles();
        }
        self.read(read_profiles)
    }

    pub fn trace(&self, mac: &str, limit: usize) -> Result<Vec<TraceEvent>> {
        if let Some(pg) = self.pg() {
            return pg.trace(mac, limit);
        }
        self.read(|c| read_trace(c, mac, limit))
    }

    pub fn origin_objects(&self) -> Result<Vec<OriginObject>> {
        self.read(|c| {
            let mut st = c.prepare("SELECT name, version, sha256, size, created_ms FROM origin_objects ORDER BY name, version")?;
            let rows = st.query_map([], |r| {
                Ok(OriginObject {
                    name: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    sha256: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    created_ms: r.get::<_, i64>(4)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    pub fn holdings(&self) -> Result<Vec<HoldingRow>> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT cache, name, version, sha256, state, changed_ms FROM origin_holdings ORDER BY cache, name, version",
            )?;
            let rows = st.query_map([], |r| {
                Ok(HoldingRow {
                    cache: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get::<_, i64>(2)? as u64,
                    sha256: r.get(3)?,
                    state: r.get(4)?,
                    changed_ms: r.get::<_, i64>(5)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    pub fn cache_objects(&self) -> Result<Vec<CacheObject>> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT name, version, sha256, size, state, pinned, last_used_ms, changed_ms FROM cache_objects ORDER BY name, version",
            )?;
            let rows = st.query_map([], |r| {
                Ok(CacheObject {
                    name: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    sha256: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    state: r.get(4)?,
                    pinned: r.get(5)?,
                    last_used_ms: r.get::<_, i64>(6)? as u64,
                    changed_ms: r.get::<_, i64>(7)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    pub fn cache_clients(&self) -> Result<Vec<CacheClient>> {
        self.read(|c| {
            let mut st = c.prepare("SELECT mac, plan, learned_ms FROM cache_clients ORDER BY learned_ms")?;
            let rows = st.query_map([], |r| Ok(CacheClient { mac: r.get(0)?, plan: r.get(1)?, learned_ms: r.get::<_, i64>(2)? as u64 }))?;
            rows.collect()
        })
    }

    /// The site's current versions at a cache: (name, version, sha256).
    pub fn cache_site(&self) -> Result<Vec<(String, u64, String)>> {
        self.read(|c| {
            let mut st = c.prepare("SELECT name, version, sha256 FROM cache_site ORDER BY name")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)))?;
            rows.collect()
        })
    }

    pub fn fleet_meta(&self) -> Result<fleet::FleetMeta> {
        if let Some(pg) = self.pg() {
            return pg.fleet_meta();
        }
        self.read(fleet::read_meta)
    }

    pub fn fleet_config(&self) -> Result<fleet::FleetConfigRows> {
        if let Some(pg) = self.pg() {
            return pg.fleet_config();
        }
        self.read(fleet::read_config)
    }

    pub fn fleet_node_states(&self) -> Result<Vec<(String, String)>> {
        if let Some(pg) = self.pg() {
            return pg.fleet_node_states();
        }
        self.read(fleet::read_node_states)
    }

    pub fn fleet_node_state(&self, name: &str) -> Result<Option<String>> {
        if let Some(pg) = self.pg() {
            return pg.fleet_node_state(name);
        }
        self.read(|c| fleet::read_node_state(c, name))
    }

    /// The newest `limit` verifications (of one node, or all), oldest first.
    pub fn fleet_verifications(&self, node: Option<&str>, limit: usize) -> Result<Vec<fleet::VerificationRecord>> {
        if let Some(pg) = self.pg() {
            return pg.fleet_verifications(node, limit);
        }
        self.read(|c| fleet::read_verifications(c, node, limit))
    }

    /// The lease row of `ip`, if any (whatever its state and expiry).
    pub fn lease(&self, ip: Ipv4Addr) -> Result<Option<LeaseRecord>> {
        if let Some(pg) = self.pg() {
            return pg.lease(ip);
        }
        self.read(|c| read_lease(c, ip))
    }

    /// Every token, revoked ones included, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        if let Some(pg) = self.pg() {
            return pg.tokens(false, None);
        }
        self.read(read_tokens)
    }

    /// The tokens that are not revoked.
    pub fn live_tokens(&self) -> Result<Vec<TokenRecord>> {
        if let Some(pg) = self.pg() {
            return pg.tokens(true, None);
        }
        self.read(|c| query_tokens(c, "WHERE revoked_ms IS NULL", []))
    }

    /// The token with this SHA-256 (hex), live or revoked.
    pub fn token_by_sha256(&self, sha256: &str) -> Result<Option<TokenRecord>> {
        if let Some(pg) = self.pg() {
            return Ok(pg.tokens(false, Some(sha256))?.pop());
        }
        self.read(|c| Ok(query_tokens(c, "WHERE sha256 = ?1", [sha256])?.pop()))
    }

    /// Audit entries, oldest first: the newest `limit`, or with `after` the first `limit`
    /// whose id is greater (for following the log).
    pub fn audit(&self, after: Option<i64>, limit: usize) -> Result<Vec<AuditEntry>> {
        if let Some(pg) = self.pg() {
            return pg.audit(after, limit);
        }
        self.read(|c| read_audit(c, after, limit))
    }
}

/// Read-only access for tools that inspect a running server's database (`fleetboot trace`).
pub struct ReadOnlyStore {
    conn: Connection,
}

impl ReadOnlyStore {
    pub fn open(path: &Path) -> Result<ReadOnlyStore> {
        Ok(ReadOnlyStore { conn: open_conn(path, OpenFlags::SQLITE_OPEN_READ_ONLY)? })
    }
    pub fn trace(&self, mac: &str, limit: usize) -> Result<Vec<TraceEvent>> {
        Ok(read_trace(&self.conn, mac, limit)?)
    }
    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        Ok(read_leases(&self.conn)?)
    }
    /// Rows in the trace table, and how many distinct MACs they belong to.
    pub fn trace_rows(&self) -> Result<(u64, u64)> {
        Ok(self.conn.query_row("SELECT count(*), count(DISTINCT mac) FROM trace", [], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?)
    }
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        Ok(read_tokens(&self.conn)?)
    }
    pub fn audit(&self, after: Option<i64>, limit: usize) -> Result<Vec<AuditEntry>> {
        Ok(read_audit(&self.conn, after, limit)?)
    }
}

fn lease_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseRecord> {
    let ip: String = r.get(0)?;
    Ok(LeaseRecord {
        ip: ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
        mac: r.get(1)?,
        client_id: r.get(2)?,
        expires_at: r.get::<_, i64>(3)? as u64,
        hostname: r.get(4)?,
        state: r.get(5)?,
    })
}

fn read_lease(c: &Connection, ip: Ipv4Addr) -> rusqlite::Result<Option<LeaseRecord>> {
    let mut st = c.prepare_cached("SELECT ip, mac, client_id, expires_at, hostname, state FROM leases WHERE ip = ?1")?;
    let mut rows = st.query_map(params![ip.to_string()], lease_row)?;
    rows.next().transpose()
}

fn read_tokens(c: &Connection) -> rusqlite::Result<Vec<TokenRecord>> {
    query_tokens(c, "", [])
}

fn query_tokens<P: rusqlite::Params>(c: &Connection, filter: &str, params: P) -> rusqlite::Result<Vec<TokenRecord>> {
    let sql = format!("SELECT id, name, role, sha256, created_ms, revoked_ms FROM api_tokens {filter} ORDER BY id");
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(params, |r| {
        Ok(TokenRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            role: r.get(2)?,
            sha256: r.get(3)?,
            created_ms: r.get::<_, i64>(4)? as u64,
            revoked_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        })
    })?;
    rows.collect()
}

fn read_audit(c: &Connection, after: Option<i64>, limit: usize) -> rusqlite::Result<Vec<AuditEntry>> {
    let row = |r: &rusqlite::Row<'_>| {
        Ok(AuditEntry {
            id: r.get(0)?,
            ts_ms: r.get::<_, i64>(1)? as u64,
            actor: r.get(2)?,
            actor_id: r.get(3)?,
            action: r.get(4)?,
            target: r.get(5)?,
            before: r.get(6)?,
            after: r.get(7)?,
            remote: r.get(8)?,
        })
    };
    const COLUMNS: &str = "id, ts_ms, actor, actor_id, action, target, before, after, remote";
    let limit = limit.min(i64::MAX as usize) as i64;
    match after {
        Some(after) => {
            let mut st = c.prepare(&format!("SELECT {COLUMNS} FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2"))?;
            let rows = st.query_map(params![after, limit], row)?;
            rows.collect()
        }
        None => {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id"
            ))?;
            let rows = st.query_map(params![limit], row)?;
            rows.collect()
        }
    }
}

fn read_leases(c: &Connection) -> rusqlite::Result<Vec<LeaseRecord>> {
    let mut st = c.prepare("SELECT ip, mac, client_id, expires_at, hostname, state FROM leases ORDER BY ip")?;
    let rows = st.query_map([], lease_row)?;
    rows.filter(|r| !matches!(r, Ok(l) if l.ip.is_unspecified())).collect()
}

fn read_profiles(c: &Connection) -> rusqlite::Result<Vec<StoredProfile>> {
    let mut st = c.prepare("SELECT name, json, source FROM profiles ORDER BY name")?;
    let rows = st.query_map([], |r| Ok(StoredProfile { name: r.get(0)?, json: r.get(1)?, source: r.get(2)? }))?;
    rows.collect()
}

fn read_trace(c: &Connection, mac: &str, limit: usize) -> rusqlite::Result<Vec<TraceEvent>> {
    // The newest `limit` events, returned oldest first.
    let mut st = c.prepare(
        "SELECT ts_ms, mac, kind, detail FROM (SELECT id, ts_ms, mac, kind, detail FROM trace
         WHERE mac = ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id",
    )?;
    let rows = st.query_map(params![mac, limit as i64], |r| {
        Ok(TraceEvent { ts_ms: r.get::<_, i64>(0)? as u64, mac: r.get(1)?, kind: r.get(2)?, detail: r.get(3)? })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fleetboot-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("fleetboot.db")
    }

    /// `fleetboot serve` and `fleetboot nbd` start side by side on one fresh file (the
    /// packaged units do): every opener gets a store, none a "database is locked".
    #[test]
    fn processes_opening_one_fresh_file_at_once_all_open_it() {
        for round in 0..40 {
            let path = temp_db(&format!("open-race-{round}"));
            let barrier = Arc::new(std::sync::Barrier::new(6));
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        Store::open(&path).map(drop)
                    })
                })
                .collect();
            for opener in openers {
                if let Err(e) = opener.join().unwrap() {
                    panic!("round {round}: an opener failed: {e}");
                }
            }
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
    }

    fn writer_now_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
    }

    fn lease(ip: &str, mac: &str) -> LeaseRecord {
        LeaseRecord {
            ip: ip.parse().unwrap(),
            mac: mac.into(),
            client_id: Some(vec![1, 2, 3]),
            expires_at: 1_000,
            hostname: None,
            state: "bound".into(),
        }
    }

    #[test]
    fn leases_survive_reopen_and_removal_sticks() {
        let path = temp_db("leases");
        {
            let s = Store::open(&path).unwrap();
            s.write_blocking(vec![
                Write::UpsertLease(lease("10.0.0.5", "aa:bb:cc:dd:ee:01")),
                Write::UpsertLease(lease("10.0.0.6", "aa:bb:cc:dd:ee:02")),
            ])
            .unwrap();
            s.write_blocking(vec![Write::RemoveLease("10.0.0.6".parse().unwrap())]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.leases().unwrap(), vec![lease("10.0.0.5", "aa:bb:cc:dd:ee:01")]);
    }

    #[test]
    fn a_lease_row_is_replaced_not_duplicated() {
        let s = Store::open(&temp_db("replace")).unwrap();
        s.write_blocking(vec![Write::UpsertLease(lease("10.0.0.5", "aa:bb:cc:dd:ee:01"))]).unwrap();
        s.write_blocking(vec![Write::UpsertLease(lease("10.0.0.5", "aa:bb:cc:dd:ee:02"))]).unwrap();
        let all = s.leases().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].mac, "aa:bb:cc:dd:ee:02");
    }

    #[test]
    fn trace_returns_newest_events_oldest_first() {
        let path = temp_db("trace");
        let s = Store::open(&path).unwrap();
        // Recent timestamps: rows past trace.max_age would be deleted by the writer.
        let t0 = writer_now_ms();
        let ev = |i: u64| TraceEvent { ts_ms: t0 + i, mac: "m".into(), kind: format!("K{i}"), detail: String::new() };
        s.write_blocking((0..10).map(|i| Write::Trace(ev(i))).collect()).unwrap();
        let got = s.trace("m", 3).unwrap();
        assert_eq!(got.iter().map(|e| e.ts_ms - t0).collect::<Vec<_>>(), vec![7, 8, 9]);
        assert!(s.trace("other", 3).unwrap().is_empty());
        assert_eq!(ReadOnlyStore::open(&path).unwrap().trace("m", 100).unwrap().len(), 10);
    }

    fn wait_written(s: &Store, n: u64) {
        for _ in 0..500 {
            let st = s.trace_stats();
            if st.written + st.write_failures >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the writer did not take the trace events: {:?}", s.trace_stats());
    }

    #[test]
    fn trace_rows_are_kept_per_mac_in_all_and_by_age() {
        let path = temp_db("retention");
        let limits = TraceLimits { max_rows: 1000, max_rows_per_mac: 10, repeat_window: std::time::Duration::ZERO, ..TraceLimits::default() };
        let s = Store::open_with_limits(&path, limits).unwrap();
        let now = writer_now_ms();
        let ev = |mac: String, i: u64| TraceEvent { ts_ms: now + i, mac, kind: "K".into(), detail: i.to_string() };
        // One chatty client: only its newest 10 rows stay.
        for i in 0..50 {
            assert_eq!(s.record_trace(ev("chatty".into(), i)), Recorded::Queued);
        }
        wait_written(&s, 50);
        let kept = s.trace("chatty", 100).unwrap();
        assert_eq!(kept.iter().map(|e| e.detail.parse::<u64>().unwrap()).collect::<Vec<_>>(), (40..50).collect::<Vec<_>>());
        // Many clients: never more than max_rows in all.
        for i in 0..5000u64 {
            s.record_trace(ev(format!("m{i}"), i));
        }
        wait_written(&s, 5050);
        let ro = ReadOnlyStore::open(&path).unwrap();
        let (rows, _) = ro.trace_rows().unwrap();
        assert!(rows <= 1000, "{rows} rows");
        assert_eq!(s.trace_stats().rows, rows);
        // Rows written long ago go when the writer checks their age (at open, then each minute).
        drop(s);
        let old = TraceEvent { ts_ms: 1_000, mac: "old".into(), kind: "K".into(), detail: String::new() };
        let s = Store::open_with_limits(&path, TraceLimits { max_rows: 1000, max_rows_per_mac: 10, ..TraceLimits::default() }).unwrap();
        s.write_blocking(vec![Write::Trace(old)]).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        s.write_blocking(vec![]).unwrap();
        for _ in 0..200 {
            if s.trace("old", 10).unwrap().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(s.trace("old", 10).unwrap().is_empty(), "a row older than max_age survived");
    }

    /// Trace rows are written apart from leases: when they cannot be written at all, every
    /// lease commit still succeeds; a flood of events is cut at the queue, and counted.
    #[test]
    fn a_trace_that_cannot_be_written_never_fails_a_lease() {
        let path = temp_db("trace-apart");
        let limits = TraceLimits { queue: 100, repeat_window: std::time::Duration::ZERO, ..TraceLimits::default() };
        let s = Store::open_with_limits(&path, limits).unwrap();
        // Stand-in for a full disk that only the trace hits: every trace insert fails.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("CREATE TRIGGER no_trace BEFORE INSERT ON trace BEGIN SELECT RAISE(ABORT, 'no room'); END;").unwrap();
        let now = writer_now_ms();
        let mut recorded = std::collections::HashMap::new();
        let mut record = |i: u32| {
            let r = s.record_trace(TraceEvent { ts_ms: now, mac: format!("m{i}"), kind: "DHCPDISCOVER".into(), detail: String::new() });
            *recorded.entry(format!("{r:?}")).or_insert(0) += 1;
        };
        // A writer that cannot keep up (held here, so the flood does not race a fast disk):
        // the queue takes its 100 and the rest are cut and counted.
        let hold = s.hold_commits();
        for i in 0..10_000u32 {
            record(i);
        }
        drop(hold);
        for i in 10_000..20_000u32 {
            record(i);
            if i % 500 == 0 {
                let ip = Ipv4Addr::from(0x0a00_0000 + i);
                s.write_blocking(vec![Write::UpsertLease(LeaseRecord { ip, ..lease("10.0.0.1", "m") })]).unwrap();
            }
        }
        let st = s.trace_stats();
        assert!(st.queue_full >= 10_000 - 100, "{recorded:?} {st:?}");
        assert_eq!(st.queued + st.queue_full, 20_000);
        wait_written(&s, st.queued);
        assert!(s.trace_stats().write_failures > 0);
        assert_eq!(s.leases().unwrap().len(), 20);
        assert_eq!(ReadOnlyStore::open(&path).unwrap().trace_rows().unwrap().0, 0);
    }

    #[test]
    fn profiles_upsert_and_delete() {
        let s = Store::open(&temp_db("profiles")).unwrap();
        let p = |j: &str| StoredProfile { name: "a".into(), json: j.into(), source: "api".into() };
        s.write_blocking(vec![Write::UpsertProfile(p("{}"))]).unwrap();
        s.write_blocking(vec![Write::UpsertProfile(p("{\"x\":1}"))]).unwrap();
        assert_eq!(s.profiles().unwrap(), vec![p("{\"x\":1}")]);
        s.write_blocking(vec![Write::DeleteProfile("a".into())]).unwrap();
        assert!(s.profiles().unwrap().is_empty());
    }

    #[test]
    fn cache_tables_upsert_replace_and_trim() {
        let path = temp_db("cache");
        let s = Store::open(&path).unwrap();
        let obj = |name: &str, v: u64, state: &str, at: u64| CacheObject {
            name: name.into(),
            version: v,
            sha256: "ab".repeat(32),
            size: 10,
            state: state.into(),
            pinned: false,
            last_used_ms: at,
            changed_ms: at,
        };
        let hold = |cache: &str, v: u64, state: &str| HoldingRow {
            cache: cache.into(),
            name: "files/k".into(),
            version: v,
            sha256: "cd".repeat(32),
            state: state.into(),
            changed_ms: v,
        };
        s.write_blocking(vec![
            Write::UpsertOriginObject(OriginObject { name: "files/k".into(), version: 1, sha256: "cd".repeat(32), size: 5, created_ms: 1 }),
            Write::UpsertHolding(hold("b1", 1, "pending")),
            Write::UpsertHolding(hold("b1", 1, "verified")),
            Write::UpsertHolding(hold("b2", 1, "verified")),
            Write::ReplaceHoldings { cache: "b2".into(), rows: vec![hold("b2", 2, "pending")] },
            Write::UpsertCacheObject(obj("files/a", 1, "evicted", 1)),
            Write::UpsertCacheObject(obj("files/b", 1, "evicted", 2)),
            Write::UpsertCacheObject(obj("files/c", 1, "verified", 3)),
            Write::TrimEvictedCacheObjects { keep: 1 },
            Write::UpsertCacheClient { mac: "m".into(), plan: "{}".into(), learned_ms: 4 },
            Write::ReplaceCacheSite(vec![("files/k".into(), 2, "ee".repeat(32))]),
        ])
        .unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.origin_objects().unwrap().len(), 1);
        let h = s.holdings().unwrap();
        assert_eq!(h.iter().map(|r| (r.cache.as_str(), r.version, r.state.as_str())).collect::<Vec<_>>(), vec![("b1", 1, "verified"), ("b2", 2, "pending")]);
        assert_eq!(s.cache_objects().unwrap().iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), vec!["files/b", "files/c"]);
        assert_eq!(s.cache_clients().unwrap().len(), 1);
        s.write_blocking(vec![Write::DeleteCacheClient("m".into())]).unwrap();
        assert!(s.cache_clients().unwrap().is_empty());
        assert_eq!(s.cache_site().unwrap(), vec![("files/k".to_string(), 2, "ee".repeat(32))]);
    }

    #[test]
    fn fleet_writes_bump_the_revision_and_are_fenced_by_epoch() {
        use fleet::FleetWrite as F;
        let path = temp_db("fleet");
        let s = Store::open(&path).unwrap();
        let w = |fence, write| Write::Fleet { fence, write };
        assert_eq!(s.fleet_meta().unwrap(), fleet::FleetMeta { epoch: 0, config_rev: 0 });
        s.write_blocking(vec![w(None, F::PutNode { name: "n1".into(), mac: "52:54:00:00:00:01".into(), json: "{}".into() })]).unwrap();
        s.write_blocking(vec![w(None, F::ClaimEpoch { epoch: 1 })]).unwrap();
        s.write_blocking(vec![w(Some(1), F::PutNodeState { name: "n1".into(), json: "{\"a\":1}".into() })]).unwrap();
        assert_eq!(s.fleet_meta().unwrap(), fleet::FleetMeta { epoch: 1, config_rev: 1 });
        // A second master takes over; the first one's writes are refused, alone.
        s.write_blocking(vec![w(None, F::ClaimEpoch { epoch: 2 })]).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (tx2, rx2) = tokio::sync::oneshot::channel();
        let _ = s.writes.send(writer::Job {
            writes: vec![w(Some(1), F::PutNodeState { name: "n1".into(), json: "{\"a\":2}".into() })],
            done: Some(tx),
            hold: None,
        });
        let _ = s.writes.send(writer::Job { writes: vec![Write::Trace(TraceEvent { ts_ms: 1, mac: "m".into(), kind: "K".into(), detail: String::new() })], done: Some(tx2), hold: None });
        assert!(matches!(rx.blocking_recv().unwrap(), Err(StoreError::StaleEpoch { held: 1, current: 2 })));
        rx2.blocking_recv().unwrap().unwrap();
        assert_eq!(s.fleet_node_state("n1").unwrap().as_deref(), Some("{\"a\":1}"));
        assert!(matches!(s.write_blocking(vec![w(None, F::ClaimEpoch { epoch: 2 })]), Err(StoreError::StaleEpoch { .. })));
        s.write_blocking(vec![w(Some(2), F::Verification { ts_ms: 5, node: "n1".into(), result: "match".into(), detail: "{}".into() })]).unwrap();
        let v = s.fleet_verifications(Some("n1"), 10).unwrap();
        assert_eq!((v.len(), v[0].epoch), (1, 2));
        let c = s.fleet_config().unwrap();
        assert_eq!((c.config_rev, c.nodes.len()), (1, 1));
    }

    fn token(name: &str, sha: &str) -> TokenRecord {
        TokenRecord { id: 0, name: name.into(), role: "admin".into(), sha256: sha.into(), created_ms: 5, revoked_ms: None }
    }

    #[test]
    fn tokens_keep_their_rows_when_revoked_and_live_names_are_unique() {
        let path = temp_db("tokens");
        let s = Store::open(&path).unwrap();
        s.write_blocking(vec![Write::InsertToken(token("ci", "aa")), Write::InsertToken(token("ops", "bb"))]).unwrap();
        // A second live "ci" is ignored, not an error for the batch it is in.
        s.write_blocking(vec![Write::InsertToken(token("ci", "cc")), Write::Trace(TraceEvent {
            ts_ms: 1,
            mac: "m".into(),
            kind: "K".into(),
            detail: String::new(),
        })])
        .unwrap();
        assert_eq!(s.trace("m", 10).unwrap().len(), 1, "the rest of the batch landed");
        let all = s.tokens().unwrap();
        assert_eq!(all.iter().map(|t| (t.name.as_str(), t.sha256.as_str())).collect::<Vec<_>>(), [("ci", "aa"), ("ops", "bb")]);
        let ci = all[0].id;
        s.write_blocking(vec![Write::RevokeToken { id: ci, at_ms: 9 }]).unwrap();
        s.write_blocking(vec![Write::RevokeToken { id: ci, at_ms: 10 }]).unwrap();
        assert_eq!(s.tokens().unwrap()[0].revoked_ms, Some(9), "revoked once, at the first time");
        assert_eq!(s.live_tokens().unwrap().len(), 1);
        assert_eq!(s.token_by_sha256("aa").unwrap().unwrap().revoked_ms, Some(9));
        assert_eq!(s.token_by_sha256("zz").unwrap(), None);
        // Once revoked, its name may be used again.
        s.write_blocking(vec![Write::InsertToken(token("ci", "dd"))]).unwrap();
        assert_eq!(s.live_tokens().unwrap().iter().filter(|t| t.name == "ci").count(), 1);
        assert_eq!(ReadOnlyStore::open(&path).unwrap().tokens().unwrap().len(), 3);
    }

    #[test]
    fn audit_pages_newest_or_after_an_id() {
        let path = temp_db("audit");
        let s = Store::open(&path).unwrap();
        let entry = |i: u64| AuditEntry {
            id: 0,
            ts_ms: i,
            actor: "ci".into(),
            actor_id: Some(1),
            action: "profile.update".into(),
            target: format!("profile/p{i}"),
            before: (i > 0).then(|| "{}".to_string()),
            after: Some(format!("{{\"n\":{i}}}")),
            remote: None,
        };
        s.write_blocking((0..5).map(|i| Write::Audit(entry(i))).collect()).unwrap();
        let newest = s.audit(None, 2).unwrap();
        assert_eq!(newest.iter().map(|e| e.ts_ms).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(newest[1].after.as_deref(), Some("{\"n\":4}"));
        let first = s.audit(None, 100).unwrap()[0].clone();
        assert_eq!((first.before, first.actor_id), (None, Some(1)));
        let after = s.audit(Some(newest[0].id), 100).unwrap();
        assert_eq!(after.iter().map(|e| e.ts_ms).collect::<Vec<_>>(), [4]);
        assert_eq!(ReadOnlyStore::open(&path).unwrap().audit(None, 100).unwrap().len(), 5);
    }

    #[test]
    fn one_lease_by_address() {
        let s = Store::open(&temp_db("one-lease")).unwrap();
        s.write_blocking(vec![Write::UpsertLease(lease("10.0.0.5", "aa:bb:cc:dd:ee:01"))]).unwrap();
        assert_eq!(s.lease("10.0.0.5".parse().unwrap()).unwrap().unwrap().mac, "aa:bb:cc:dd:ee:01");
        assert_eq!(s.lease("10.0.0.6".parse().unwrap()).unwrap(), None);
    }

    #[tokio::test]
    async fn concurrent_writers_are_grouped_and_all_durable() {
        let path = temp_db("group");
        let s = Store::open(&path).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let ip = Ipv4Addr::from(0x0a00_0000 + i);
                s.write(vec![Write::UpsertLease(LeaseRecord { ip, ..lease("10.0.0.1", "m") })]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let stats = s.stats();
        assert_eq!((stats.queued, stats.durable_writes, stats.failed), (200, 200, 0));
        assert!(stats.durable_transactions <= 200);
        drop(s);
        assert_eq!(ReadOnlyStore::open(&path).unwrap().leases().unwrap().len(), 200);
    }

    /// Many writers waiting at once cost one transaction: while the writer is held, 50
    /// writes queue; released, they are committed together, and each writer learns it.
    #[tokio::test]
    async fn writes_queued_together_share_one_transaction() {
        let s = Store::open(&temp_db("held")).unwrap();
        let before = s.stats();
        let hold = s.hold_commits();
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let s = s.clone();
            let ip = Ipv4Addr::from(0x0a00_0100 + i);
            tasks.push(tokio::spawn(async move { s.write(vec![Write::UpsertLease(LeaseRecord { ip, ..lease("10.0.0.1", "m") })]).await }));
        }
        while s.stats().queued < before.queued + 50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(s.stats().durable_writes, before.durable_writes, "nothing committed while held");
        drop(hold);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let after = s.stats();
        assert_eq!(after.durable_writes - before.durable_writes, 50);
        assert_eq!(after.durable_transactions - before.durable_transactions, 1, "{before:?} -> {after:?}");
        assert_eq!(s.leases().unwrap().len(), 50);
    }
}

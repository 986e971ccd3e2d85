//! fleetboot's embedded state, in one SQLite file (WAL mode).
//!
//! - [`Store`]: the handle every service holds. Writes go to one writer thread that drains
//!   its queue and commits everything pending in one transaction (group commit): a burst of
//!   DHCP ACKs costs one fsync, not one each. A lease write's future resolves only after
//!   its transaction is durable, which is what lets the address service promise "an ACK
//!   is sent only for a lease on disk".
//! - Reads use their own connection, so an API query never waits behind a commit.
//! - Schema migrations live in [`schema`], applied in order on open (`PRAGMA user_version`).
//! - The boot trace has a path of its own ([`trace`]): [`Store::record_trace`] never blocks,
//!   repeats and overflow are counted rather than written, trace rows are written in their
//!   own transactions after the lease commits and kept within [`TraceLimits`] (the
//!   `[trace]` section, [`config`]).
//!
//! Row types here ([`LeaseRecord`], [`TraceEvent`], [`StoredProfile`], [`TokenRecord`],
//! [`AuditEntry`]) are plain data; the services convert to and from their own domain
//! types, so this crate knows no protocol.
//!
//! API tokens are stored as their SHA-256 only (`api_tokens`); revoking one keeps its row,
//! so the audit log can still name it. The audit log (`audit`) is append-only: who (a
//! token's name and id, `config`, a local user), when, what, and the JSON before and after.

pub mod config;
pub mod fleet;
mod schema;
pub mod trace;
mod writer;

use rusqlite::{params, Connection, OpenFlags};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

pub use config::TraceLimits;
pub use trace::{Recorded, TraceStats};
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
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn open_conn(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the database, migrates it and starts the writer thread,
    /// with the default trace limits.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, TraceLimits::default())
    }

    /// [`Store::open`] with the boot trace kept within `limits`.
    pub fn open_with(path: &Path, limits: TraceLimits) -> Result<Store> {
        let conn = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk when it returns, even across power loss, not just a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        schema::migrate(&conn)?;
        let reader = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let traces = Arc::new(trace::TraceQueue::new(limits));
        traces.rows.store(trace::count_rows(&conn)?, std::sync::atomic::Ordering::Relaxed);
        let writes = writer::spawn(conn, traces.clone());
        Ok(Store { writes, traces, reader: Arc::new(Mutex::new(reader)), path: path.to_path_buf() })
    }

    /// Records one boot-trace event without waiting: queued for the writer, or counted as a
    /// repeat or as overflow (see [`trace`]). Never delays or fails a lease commit.
    pub fn record_trace(&self, event: TraceEvent) -> Recorded {
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues writes and resolves once they are committed durably.
    pub async fn write(&self, writes: Vec<Write>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writes.send(writer::Job { writes, done: Some(tx) }).map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Queues writes without waiting (trace events: losing the last few to a crash is fine).
    pub fn write_later(&self, writes: Vec<Write>) {
        let _ = self.writes.send(writer::Job { writes, done: None });
    }

    /// Blocking variant of [`Store::write`] for non-async callers (CLI, tests).
    pub fn write_blocking(&self, writes: Vec<Write>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writes.send(writer::Job { writes, done: Some(tx) }).map_err(|_| StoreError::WriterGone)?;
        rx.blocking_recv().map_err(|_| StoreError::WriterGone)?
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&conn)?)
    }

    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        self.read(read_leases)
    }

    pub fn profiles(&self) -> Result<Vec<StoredProfile>> {
        self.read(read_profiles)
    }

    pub fn trace(&self, mac: &str, limit: usize) -> Result<Vec<TraceEvent>> {
        self.read(|c| read_trace(c, mac, limit))
    }

    pub fn fleet_meta(&self) -> Result<fleet::FleetMeta> {
        self.read(fleet::read_meta)
    }

    pub fn fleet_config(&self) -> Result<fleet::FleetConfigRows> {
        self.read(fleet::read_config)
    }

    pub fn fleet_node_states(&self) -> Result<Vec<(String, String)>> {
        self.read(fleet::read_node_states)
    }

    pub fn fleet_node_state(&self, name: &str) -> Result<Option<String>> {
        self.read(|c| fleet::read_node_state(c, name))
    }

    /// The newest `limit` verifications (of one node, or all), oldest first.
    pub fn fleet_verifications(&self, node: Option<&str>, limit: usize) -> Result<Vec<fleet::VerificationRecord>> {
        self.read(|c| fleet::read_verifications(c, node, limit))
    }

    /// The lease row of `ip`, if any (whatever its state and expiry).
    pub fn lease(&self, ip: Ipv4Addr) -> Result<Option<LeaseRecord>> {
        self.read(|c| read_lease(c, ip))
    }

    /// Every token, revoked ones included, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(read_tokens)
    }

    /// The tokens that are not revoked.
    pub fn live_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(|c| query_tokens(c, "WHERE revoked_ms IS NULL", []))
    }

    /// The token with this SHA-256 (hex), live or revoked.
    pub fn token_by_sha256(&self, sha256: &str) -> Result<Option<TokenRecord>> {
        self.read(|c| Ok(query_tokens(c, "WHERE sha256 = ?1", [sha256])?.pop()))
    }

    /// Audit entries, oldest first: the newest `limit`, or with `after` the first `limit`
    /// whose id is greater (for following the log).
    pub fn audit(&self, after: Option<i64>, limit: usize) -> Result<Vec<AuditEntry>> {
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
        let s = Store::open_with(&path, limits).unwrap();
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
        let s = Store::open_with(&path, TraceLimits { max_rows: 1000, max_rows_per_mac: 10, ..TraceLimits::default() }).unwrap();
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
        let s = Store::open_with(&path, limits).unwrap();
        // Stand-in for a full disk that only the trace hits: every trace insert fails.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("CREATE TRIGGER no_trace BEFORE INSERT ON trace BEGIN SELECT RAISE(ABORT, 'no room'); END;").unwrap();
        let now = writer_now_ms();
        let mut recorded = std::collections::HashMap::new();
        for i in 0..20_000u32 {
            let r = s.record_trace(TraceEvent { ts_ms: now, mac: format!("m{i}"), kind: "DHCPDISCOVER".into(), detail: String::new() });
            *recorded.entry(format!("{r:?}")).or_insert(0) += 1;
            if i % 1000 == 0 {
                let ip = Ipv4Addr::from(0x0a00_0000 + i);
                s.write_blocking(vec![Write::UpsertLease(LeaseRecord { ip, ..lease("10.0.0.1", "m") })]).unwrap();
            }
        }
        let st = s.trace_stats();
        assert!(st.queue_full > 0, "{recorded:?} {st:?}");
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
        });
        let _ = s.writes.send(writer::Job { writes: vec![Write::Trace(TraceEvent { ts_ms: 1, mac: "m".into(), kind: "K".into(), detail: String::new() })], done: Some(tx2) });
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
        drop(s);
        assert_eq!(ReadOnlyStore::open(&path).unwrap().leases().unwrap().len(), 200);
    }
}

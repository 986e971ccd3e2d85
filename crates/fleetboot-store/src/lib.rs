//! fleetboot's embedded state, in one SQLite file (WAL mode).
//!
//! - [`Store`]: the handle every service holds. Writes go to one writer thread that drains
//!   its queue and commits everything pending in one transaction (group commit): a burst of
//!   DHCP ACKs costs one fsync, not one each. A lease write's future resolves only after
//!   its transaction is durable, which is what lets the address service promise "an ACK
//!   is sent only for a lease on disk".
//! - Reads use their own connection, so an API query never waits behind a commit.
//! - Schema migrations live in [`schema`], applied in order on open (`PRAGMA user_version`).
//!
//! Row types here ([`LeaseRecord`], [`TraceEvent`], [`StoredProfile`]) are plain data; the
//! services convert to and from their own domain types, so this crate knows no protocol.

mod schema;
mod writer;

use rusqlite::{params, Connection, OpenFlags};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

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

#[derive(Clone)]
pub struct Store {
    writes: mpsc::Sender<writer::Job>,
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
    /// Opens (creating if needed) the database, migrates it and starts the writer thread.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk when it returns, even across power loss, not just a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        schema::migrate(&conn)?;
        let reader = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        let writes = writer::spawn(conn);
        Ok(Store { writes, reader: Arc::new(Mutex::new(reader)), path: path.to_path_buf() })
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
}

fn read_leases(c: &Connection) -> rusqlite::Result<Vec<LeaseRecord>> {
    let mut st = c.prepare("SELECT ip, mac, client_id, expires_at, hostname, state FROM leases ORDER BY ip")?;
    let rows = st.query_map([], |r| {
        let ip: String = r.get(0)?;
        Ok(LeaseRecord {
            ip: ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            mac: r.get(1)?,
            client_id: r.get(2)?,
            expires_at: r.get::<_, i64>(3)? as u64,
            hostname: r.get(4)?,
            state: r.get(5)?,
        })
    })?;
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
        let ev = |i: u64| TraceEvent { ts_ms: i, mac: "m".into(), kind: format!("K{i}"), detail: String::new() };
        s.write_blocking((0..10).map(|i| Write::Trace(ev(i))).collect()).unwrap();
        let got = s.trace("m", 3).unwrap();
        assert_eq!(got.iter().map(|e| e.ts_ms).collect::<Vec<_>>(), vec![7, 8, 9]);
        assert!(s.trace("other", 3).unwrap().is_empty());
        assert_eq!(ReadOnlyStore::open(&path).unwrap().trace("m", 100).unwrap().len(), 10);
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

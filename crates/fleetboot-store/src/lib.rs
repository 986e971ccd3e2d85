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
//! Row types here ([`LeaseRecord`], [`TraceEvent`], [`StoredProfile`]) are plain data; the
//! services convert to and from their own domain types, so this crate knows no protocol.

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

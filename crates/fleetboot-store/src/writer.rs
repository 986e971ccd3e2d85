//! The single writer thread and its group commit.

use crate::trace::{Retention, TraceQueue, TRACE_BATCH};
use crate::{AuditEntry, LeaseRecord, Result, StoredProfile, TokenRecord, TraceEvent};
use rusqlite::{params, Connection};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

/// One change to the store.
#[derive(Debug, Clone)]
pub enum Write {
    UpsertLease(LeaseRecord),
    RemoveLease(Ipv4Addr),
    UpsertProfile(StoredProfile),
    DeleteProfile(String),
    /// A trace row written with the job's other writes (services record events through
    /// [`crate::Store::record_trace`] instead, apart from lease commits).
    Trace(TraceEvent),
    /// An origin published a version of an object.
    UpsertOriginObject(crate::OriginObject),
    /// A row of an origin's verification table (one cache, one object version).
    UpsertHolding(crate::HoldingRow),
    /// Everything an origin knows of one cache, replaced (the cache's full report).
    ReplaceHoldings { cache: String, rows: Vec<crate::HoldingRow> },
    /// A row of a cache's own verification table.
    UpsertCacheObject(crate::CacheObject),
    /// Forgets evicted rows of a cache's table beyond the newest `keep`.
    TrimEvictedCacheObjects { keep: usize },
    /// A client's plan in a cache's image map (JSON).
    UpsertCacheClient { mac: String, plan: String, learned_ms: u64 },
    DeleteCacheClient(String),
    /// The site's current versions at a cache, replaced: (name, version, sha256).
    ReplaceCacheSite(Vec<(String, u64, String)>),
    /// The provisioning master's tables; `fence`: the epoch of the master writing (none
    /// for operators' configuration changes).
    Fleet { fence: Option<u64>, write: crate::fleet::FleetWrite },
    /// A new API token (its `id` is ignored). A live token of the same name or hash makes
    /// this a no-op rather than failing the whole batch: read back to see whether it landed.
    InsertToken(TokenRecord),
    /// Marks a token revoked at `at_ms` (a no-op for one already revoked).
    RevokeToken { id: i64, at_ms: u64 },
    /// Appends to the audit log (its `id` is ignored).
    Audit(AuditEntry),
}

pub(crate) struct Job {
    pub writes: Vec<Write>,
    pub done: Option<tokio::sync::oneshot::Sender<Result<()>>>,
    /// The writer stops here until the other end is dropped (a test's hold).
    pub hold: Option<mpsc::Receiver<()>>,
}

/// What the writer thread has done, for [`crate::Store::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub queued: AtomicU64,
    pub transactions: AtomicU64,
    pub durable_transactions: AtomicU64,
    pub durable_writes: AtomicU64,
    pub failed: AtomicU64,
}

impl Job {
    /// Nothing to write and nobody waiting: only wakes the writer for queued trace events.
    pub(crate) fn wake() -> Job {
        Job { writes: Vec::new(), done: None, hold: None }
    }

    fn is_wake(&self) -> bool {
        self.writes.is_empty() && self.done.is_none()
    }
}

/// Jobs drained into one transaction at most; bounds the latency of the first in a burst.
const MAX_BATCH: usize = 4096;

static COMMIT_FAILED_LOG: crate::trace::Throttle = crate::trace::Throttle::new();
static WRITE_REFUSED_LOG: crate::trace::Throttle = crate::trace::Throttle::new();

pub(crate) fn spawn(conn: Connection, counters: Arc<Counters>, traces: Arc<TraceQueue>) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("fleetboot-store".into())
        .spawn(move || run(conn, rx, counters, traces))
        .expect("spawning the store writer thread");
    tx
}

fn wait_for_hold(job: &Job) {
    if let Some(h) = &job.hold {
        // Returns when the hold's sender is dropped.
        let _ = h.recv();
    }
}

/// Lease (and other) jobs first, each burst in one transaction; then a batch of trace
/// events in a transaction of its own; then, when due, a chunk of old trace rows.
fn run(mut conn: Connection, rx: mpsc::Receiver<Job>, counters: Arc<Counters>, traces: Arc<TraceQueue>) {
    let mut retention = Retention::new();
    loop {
        let first = if traces.is_empty() && !retention.busy() {
            match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => break, // every Store handle is gone and nothing is queued
            }
        } else {
            rx.try_recv().ok()
        };
        if let Some(j) = &first {
            wait_for_hold(j);
        }
        let mut batch: Vec<Job> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    wait_for_hold(&j);
                    batch.push(j)
                }
                Err(_) => break,
            }
        }
        batch.retain(|j| !j.is_wake());
        if !batch.is_empty() {
            commit_jobs(&mut conn, batch, &counters);
        }
        let events = traces.take(TRACE_BATCH);
        if !events.is_empty() {
            retention.write(&mut conn, &traces, &events);
        }
        retention.age(&conn, &traces, now_ms());
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn commit_jobs(conn: &mut Connection, batch: Vec<Job>, counters: &Counters) {
    let durable = batch.iter().filter(|j| j.done.is_some()).count() as u64;
    let outcome = apply(conn, &batch);
    counters.transactions.fetch_add(1, Ordering::Relaxed);
    if durable > 0 {
        counters.durable_transactions.fetch_add(1, Ordering::Relaxed);
        counters.durable_writes.fetch_add(durable, Ordering::Relaxed);
    }
    match &outcome {
        Err(e) => {
            // A full disk fails every batch: said once per interval with the count, which
            // `Store::stats` and the callers' own errors carry in full.
            let failed = counters.failed.fetch_add(1, Ordering::Relaxed) + 1;
            if COMMIT_FAILED_LOG.ready() {
                tracing::error!(error = %e, jobs = batch.len(), failed_so_far = failed, "store commit failed");
            }
        }
        Ok(per_job) => {
            for e in per_job.iter().filter_map(|r| r.as_ref().err()) {
                if WRITE_REFUSED_LOG.ready() {
                    tracing::warn!(error = %e, "store write refused; the other writes of its batch were committed");
                }
            }
        }
    }
    for (i, job) in batch.into_iter().enumerate() {
        if let Some(done) = job.done {
            let _ = done.send(match &outcome {
                Ok(per_job) => match &per_job[i] {
                    Ok(()) => Ok(()),
                    Err(e) => Err(to_store_error(e)),
                },
                Err(e) => Err(to_store_error(e)),
            });
        }
    }
}

fn to_store_error(e: &rusqlite::Error) -> crate::StoreError {
    if let rusqlite::Error::ToSqlConversionFailure(inner) = e {
        if let Some(s) = inner.downcast_ref::<crate::fleet::StaleEpoch>() {
            return crate::StoreError::StaleEpoch { held: s.held, current: s.current };
        }
    }
    crate::StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(e.to_string().into()))
}

fn upsert_holding(tx: &Connection, h: &crate::HoldingRow) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO origin_holdings (cache, name, version, sha256, state, changed_ms) VALUES (?1,?2,?3,?4,?5,?6)
         ON CONFLICT(cache, name, version) DO UPDATE SET sha256=?4, state=?5, changed_ms=?6",
    )?
    .execute(params![h.cache, h.name, h.version as i64, h.sha256, h.state, h.changed_ms as i64])?;
    Ok(())
}

/// One transaction for the batch; each job in its own savepoint, so a job that is refused
/// (a fenced write from a deposed master, a constraint) leaves the others committed.
/// Outer error: the transaction itself failed and nothing was committed.
fn apply(conn: &mut Connection, batch: &[Job]) -> rusqlite::Result<Vec<rusqlite::Result<()>>> {
    // IMMEDIATE: take the write lock first. A deferred transaction that reads and then
    // writes fails at once (no busy wait) when another process — the CLI beside a running
    // master — committed in between.
    let mut tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let mut sp = tx.savepoint()?;
        match apply_job(&sp, &job.writes) {
            Ok(()) => {
                sp.commit()?;
                results.push(Ok(()));
            }
            Err(e) => {
                sp.rollback()?;
                drop(sp);
                results.push(Err(e));
            }
        }
    }
    tx.commit()?;
    Ok(results)
}

fn apply_job(tx: &Connection, writes: &[Write]) -> rusqlite::Result<()> {
    for w in writes {
        match w {
            Write::UpsertLease(l) => {
                tx.prepare_cached(
                    "INSERT INTO leases (ip, mac, client_id, expires_at, hostname, state) VALUES (?1,?2,?3,?4,?5,?6)
                     ON CONFLICT(ip) DO UPDATE SET mac=?2, client_id=?3, expires_at=?4, hostname=?5, state=?6",
                )?
                .execute(params![l.ip.to_string(), l.mac, l.client_id, l.expires_at as i64, l.hostname, l.state])?;
            }
            Write::RemoveLease(ip) => {
                tx.prepare_cached("DELETE FROM leases WHERE ip = ?1")?.execute(params![ip.to_string()])?;
            }
            Write::UpsertProfile(p) => {
                tx.prepare_cached(
                    "INSERT INTO profiles (name, json, source) VALUES (?1,?2,?3)
                     ON CONFLICT(name) DO UPDATE SET json=?2, source=?3",
                )?
                .execute(params![p.name, p.json, p.source])?;
            }
            Write::DeleteProfile(name) => {
                tx.prepare_cached("DELETE FROM profiles WHERE name = ?1")?.execute(params![name])?;
            }
            Write::InsertToken(t) => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO api_tokens (name, role, sha256, created_ms, revoked_ms) VALUES (?1,?2,?3,?4,?5)",
                )?
                .execute(params![t.name, t.role, t.sha256, t.created_ms as i64, t.revoked_ms.map(|v| v as i64)])?;
            }
            Write::RevokeToken { id, at_ms } => {
                tx.prepare_cached("UPDATE api_tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL")?
                    .execute(params![id, *at_ms as i64])?;
            }
            Write::Audit(a) => {
                tx.prepare_cached(
                    "INSERT INTO audit (ts_ms, actor, actor_id, action, target, before, after, remote)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                )?
                .execute(params![a.ts_ms as i64, a.actor, a.actor_id, a.action, a.target, a.before, a.after, a.remote])?;
            }
            Write::Trace(e) => {
                tx.prepare_cached("INSERT INTO trace (ts_ms, mac, kind, detail) VALUES (?1,?2,?3,?4)")?
                    .execute(params![e.ts_ms as i64, e.mac, e.kind, e.detail])?;
            }
            Write::UpsertOriginObject(o) => {
                tx.prepare_cached(
                    "INSERT INTO origin_objects (name, version, sha256, size, created_ms) VALUES (?1,?2,?3,?4,?5)
                     ON CONFLICT(name, version) DO UPDATE SET sha256=?3, size=?4, created_ms=?5",
                )?
                .execute(params![o.name, o.version as i64, o.sha256, o.size as i64, o.created_ms as i64])?;
            }
            Write::UpsertHolding(h) => upsert_holding(tx, h)?,
            Write::ReplaceHoldings { cache, rows } => {
                tx.prepare_cached("DELETE FROM origin_holdings WHERE cache = ?1")?.execute(params![cache])?;
                for h in rows {
                    upsert_holding(tx, h)?;
                }
            }
            Write::UpsertCacheObject(o) => {
                tx.prepare_cached(
                    "INSERT INTO cache_objects (name, version, sha256, size, state, pinned, last_used_ms, changed_ms)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8)
                     ON CONFLICT(name, version) DO UPDATE SET sha256=?3, size=?4, state=?5, pinned=?6,
                     last_used_ms=?7, changed_ms=?8",
                )?
                .execute(params![
                    o.name,
                    o.version as i64,
                    o.sha256,
                    o.size as i64,
                    o.state,
                    o.pinned,
                    o.last_used_ms as i64,
                    o.changed_ms as i64
                ])?;
            }
            Write::TrimEvictedCacheObjects { keep } => {
                tx.prepare_cached(
                    "DELETE FROM cache_objects WHERE state = 'evicted' AND rowid NOT IN
                     (SELECT rowid FROM cache_objects WHERE state = 'evicted' ORDER BY changed_ms DESC LIMIT ?1)",
                )?
                .execute(params![*keep as i64])?;
            }
            Write::UpsertCacheClient { mac, plan, learned_ms } => {
                tx.prepare_cached(
                    "INSERT INTO cache_clients (mac, plan, learned_ms) VALUES (?1,?2,?3)
                     ON CONFLICT(mac) DO UPDATE SET plan=?2, learned_ms=?3",
                )?
                .execute(params![mac, plan, *learned_ms as i64])?;
            }
            Write::DeleteCacheClient(mac) => {
                tx.prepare_cached("DELETE FROM cache_clients WHERE mac = ?1")?.execute(params![mac])?;
            }
            Write::ReplaceCacheSite(rows) => {
                tx.prepare_cached("DELETE FROM cache_site")?.execute([])?;
                for (name, version, sha256) in rows {
                    tx.prepare_cached("INSERT INTO cache_site (name, version, sha256) VALUES (?1,?2,?3)")?
                        .execute(params![name, *version as i64, sha256])?;
                }
            }
            Write::Fleet { fence, write } => crate::fleet::apply(tx, *fence, write)?,
        }
    }
    Ok(())
}

//! The single writer thread and its group commit.

use crate::{LeaseRecord, Result, StoredProfile, TraceEvent};
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
    Trace(TraceEvent),
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

/// Jobs drained into one transaction at most; bounds the latency of the first in a burst.
const MAX_BATCH: usize = 4096;

pub(crate) fn spawn(conn: Connection, counters: Arc<Counters>) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("fleetboot-store".into())
        .spawn(move || run(conn, rx, counters))
        .expect("spawning the store writer thread");
    tx
}

fn wait_for_hold(job: &Job) {
    if let Some(h) = &job.hold {
        // Returns when the hold's sender is dropped.
        let _ = h.recv();
    }
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Job>, counters: Arc<Counters>) {
    while let Ok(first) = rx.recv() {
        wait_for_hold(&first);
        let mut batch = vec![first];
        // Group commit: everything already waiting goes into this one transaction.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    wait_for_hold(&j);
                    batch.push(j)
                }
                Err(_) => break,
            }
        }
        let durable = batch.iter().filter(|j| j.done.is_some()).count() as u64;
        let outcome = apply(&mut conn, &batch);
        counters.transactions.fetch_add(1, Ordering::Relaxed);
        if durable > 0 {
            counters.durable_transactions.fetch_add(1, Ordering::Relaxed);
            counters.durable_writes.fetch_add(durable, Ordering::Relaxed);
        }
        if let Err(e) = &outcome {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, jobs = batch.len(), "store commit failed");
        }
        for job in batch {
            if let Some(done) = job.done {
                let _ = done.send(match &outcome {
                    Ok(()) => Ok(()),
                    Err(e) => Err(crate::StoreError::Sql(clone_err(e))),
                });
            }
        }
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(e.to_string().into())
}

fn apply(conn: &mut Connection, batch: &[Job]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for w in batch.iter().flat_map(|j| &j.writes) {
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
            Write::Trace(e) => {
                tx.prepare_cached("INSERT INTO trace (ts_ms, mac, kind, detail) VALUES (?1,?2,?3,?4)")?
                    .execute(params![e.ts_ms as i64, e.mac, e.kind, e.detail])?;
            }
        }
    }
    tx.commit()
}

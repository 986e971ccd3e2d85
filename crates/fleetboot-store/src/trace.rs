//! The boot trace's own path to the database, apart from lease commits.
//!
//! Services record events with [`crate::Store::record_trace`], which never blocks: an event
//! identical to one of the same client recorded within `repeat_window` is only counted; the
//! rest go into a queue of at most `queue` events, and when it is full the newest are dropped
//! and counted. The writer thread takes them after each lease commit and writes them in a
//! transaction of their own (without an fsync of its own: the next lease commit's covers
//! it), so a trace that cannot be written — a full disk — never withholds a lease, and a
//! flood of events never delays one by more than one trace batch. After each batch the
//! writer deletes what is over `max_rows_per_mac` for the clients in it and over
//! `max_rows` in all; rows older than `max_age` go a chunk per cycle, checked every minute.

use crate::trace_config::TraceLimits;
use crate::TraceEvent;
use rusqlite::{params, Connection};
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Events written per transaction at most.
pub(crate) const TRACE_BATCH: usize = 4096;
/// Rows deleted per statement when pruning by age.
const AGE_CHUNK: usize = 5000;
/// How often the age limit is checked.
const AGE_EVERY: Duration = Duration::from_secs(60);

/// What happened to one recorded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Queued for the writer.
    Queued,
    /// The same client's identical event was recorded within the repeat window: counted.
    Repeat,
    /// The queue was full: dropped and counted.
    QueueFull,
}

/// Counts since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceStats {
    pub queued: u64,
    pub repeats: u64,
    pub queue_full: u64,
    pub written: u64,
    pub write_failures: u64,
    /// Rows in the table (as the writer counts them).
    pub rows: u64,
}

#[derive(Clone, Copy)]
struct RepeatSlot {
    hash: u64,
    at: Instant,
    suppressed: u32,
}

struct Inner {
    events: VecDeque<TraceEvent>,
    /// A fixed table of recent events by hash: the same event lands in the same slot.
    repeats: Vec<Option<RepeatSlot>>,
}

pub(crate) struct TraceQueue {
    pub(crate) limits: TraceLimits,
    hasher: RandomState,
    inner: Mutex<Inner>,
    queued: AtomicU64,
    repeats: AtomicU64,
    queue_full: AtomicU64,
    pub(crate) written: AtomicU64,
    pub(crate) write_failures: AtomicU64,
    pub(crate) rows: AtomicU64,
}

/// A log line at most every 30 s per kind of trouble.
pub(crate) struct Throttle(Mutex<Option<Instant>>);

impl Throttle {
    pub(crate) const fn new() -> Throttle {
        Throttle(Mutex::new(None))
    }
    pub(crate) fn ready(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(30)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

static QUEUE_FULL_LOG: Throttle = Throttle::new();

impl TraceQueue {
    pub(crate) fn new(limits: TraceLimits) -> TraceQueue {
        metrics::gauge!("fleetboot_trace_queue_max").set(limits.queue as f64);
        metrics::gauge!("fleetboot_trace_rows_max").set(limits.max_rows as f64);
        let slots = if limits.repeat_window.is_zero() { 0 } else { limits.repeat_slots };
        TraceQueue {
            inner: Mutex::new(Inner { events: VecDeque::new(), repeats: vec![None; slots] }),
            limits,
            hasher: RandomState::new(),
            queued: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
            written: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `ev` unless it repeats or the queue is full. The bool: the queue was empty
    /// (the writer needs a wake-up).
    pub(crate) fn push(&self, mut ev: TraceEvent, now: Instant) -> (Recorded, bool) {
        let hash = self.hasher.hash_one((&ev.mac, &ev.kind, &ev.detail));
        let mut inner = self.lock();
        let n = inner.repeats.len();
        if n > 0 {
            let slot = &mut inner.repeats[(hash % n as u64) as usize];
            match slot {
                Some(s) if s.hash == hash && now.saturating_duration_since(s.at) < self.limits.repeat_window => {
                    s.suppressed = s.suppressed.saturating_add(1);
                    drop(inner);
                    self.repeats.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("fleetboot_trace_events_total", "outcome" => "repeat").increment(1);
                    return (Recorded::Repeat, false);
                }
                Some(s) if s.hash == hash && s.suppressed > 0 => {
                    ev.detail = format!("{} (repeated {} more times, not recorded)", ev.detail, s.suppressed);
                    *slot = Some(RepeatSlot { hash, at: now, suppressed: 0 });
                }
                _ => *slot = Some(RepeatSlot { hash, at: now, suppressed: 0 }),
            }
        }
        if inner.events.len() >= self.limits.queue {
            drop(inner);
            self.queue_full.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("fleetboot_trace_events_total", "outcome" => "queue_full").increment(1);
            if QUEUE_FULL_LOG.ready() {
                tracing::warn!(
                    queue = self.limits.queue,
                    dropped_so_far = self.queue_full.load(Ordering::Relaxed),
                    "boot trace: events arrive faster than they are written; new ones are dropped (trace.queue)"
                );
            }
            return (Recorded::QueueFull, false);
        }
        let was_empty = inner.events.is_empty();
        inner.events.push_back(ev);
        let len = inner.events.len();
        drop(inner);
        self.queued.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fleetboot_trace_events_total", "outcome" => "queued").increment(1);
        metrics::gauge!("fleetboot_trace_queue_len").set(len as f64);
        (Recorded::Queued, was_empty)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().events.is_empty()
    }

    pub(crate) fn take(&self, max: usize) -> Vec<TraceEvent> {
        let mut inner = self.lock();
        let n = inner.events.len().min(max);
        let out: Vec<TraceEvent> = inner.events.drain(..n).collect();
        metrics::gauge!("fleetboot_trace_queue_len").set(inner.events.len() as f64);
        out
    }

    pub(crate) fn stats(&self) -> TraceStats {
        TraceStats {
            queued: self.queued.load(Ordering::Relaxed),
            repeats: self.repeats.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            write_failures: self.write_failures.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
        }
    }
}

/// The writer's side: writes batches, keeps the limits, and checks the age limit.
pub(crate) struct Retention {
    next_age_check: Instant,
    pruning_by_age: bool,
}

static WRITE_FAILED_LOG: Throttle = Throttle::new();

impl Retention {
    pub(crate) fn new() -> Retention {
        Retention { next_age_check: Instant::now(), pruning_by_age: false }
    }

    /// Writes `events` in one transaction with the per-client and total limits applied.
    /// A failure (a full disk) is logged and counted; the events are lost.
    pub(crate) fn write(&mut self, conn: &mut Connection, q: &TraceQueue, events: &[TraceEvent]) {
        match write_batch(conn, &q.limits, events) {
            Ok((inserted, deleted)) => {
                q.written.fetch_add(inserted, Ordering::Relaxed);
                let rows = q.rows.load(Ordering::Relaxed) + inserted;
                q.rows.store(rows.saturating_sub(deleted), Ordering::Relaxed);
                metrics::gauge!("fleetboot_trace_rows").set(q.rows.load(Ordering::Relaxed) as f64);
            }
            Err(e) => {
                q.write_failures.fetch_add(events.len() as u64, Ordering::Relaxed);
                metrics::counter!("fleetboot_trace_events_total", "outcome" => "write_failed").increment(events.len() as u64);
                if WRITE_FAILED_LOG.ready() {
                    tracing::error!(error = %e, events = events.len(), "boot trace events not written (leases are committed apart and are not affected)");
                }
            }
        }
    }

    /// Deletes one chunk of rows older than `max_age` when due.
    pub(crate) fn age(&mut self, conn: &Connection, q: &TraceQueue, now_ms: u64) {
        let now = Instant::now();
        if !self.pruning_by_age {
            if now < self.next_age_check {
                return;
            }
            self.pruning_by_age = true;
        }
        let cutoff = now_ms.saturating_sub(q.limits.max_age.as_millis() as u64);
        let deleted = with_relaxed_sync(conn, |c| {
            c.prepare_cached(
                "DELETE FROM trace WHERE id IN (SELECT id FROM trace ORDER BY id LIMIT ?1) AND ts_ms < ?2",
            )?
            .execute(params![AGE_CHUNK as i64, cutoff as i64])
        });
        match deleted {
            Ok(n) => {
                metrics::counter!("fleetboot_trace_rows_deleted_total", "why" => "age").increment(n as u64);
                q.rows.store(q.rows.load(Ordering::Relaxed).saturating_sub(n as u64), Ordering::Relaxed);
                metrics::gauge!("fleetboot_trace_rows").set(q.rows.load(Ordering::Relaxed) as f64);
                if n < AGE_CHUNK {
                    self.pruning_by_age = false;
                    self.next_age_check = now + AGE_EVERY;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "boot trace: deleting old rows failed; retried in a minute");
                self.pruning_by_age = false;
                self.next_age_check = now + AGE_EVERY;
            }
        }
    }

    /// Whether the writer has work of its own to come back to without waiting.
    pub(crate) fn busy(&self) -> bool {
        self.pruning_by_age
    }
}

/// Runs `f` with `synchronous = NORMAL`: trace rows need no fsync of their own (in WAL
/// mode, the next lease commit's fsync makes them durable too).
fn with_relaxed_sync<T>(conn: &Connection, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let r = f(conn);
    let restored = conn.pragma_update(None, "synchronous", "FULL");
    let r = r?;
    restored?;
    Ok(r)
}

/// Inserts `events` and applies the row limits, in one transaction: (inserted, deleted).
fn write_batch(conn: &mut Connection, limits: &TraceLimits, events: &[TraceEvent]) -> rusqlite::Result<(u64, u64)> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let r = (|| -> rusqlite::Result<(u64, u64)> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut deleted = 0u64;
        {
            let mut insert = tx.prepare_cached("INSERT INTO trace (ts_ms, mac, kind, detail) VALUES (?1,?2,?3,?4)")?;
            for e in events {
                insert.execute(params![e.ts_ms as i64, e.mac, e.kind, e.detail])?;
            }
            let mut per_mac = tx.prepare_cached(
                "DELETE FROM trace WHERE mac = ?1 AND id <= (SELECT id FROM trace WHERE mac = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?;
            let macs: HashSet<&str> = events.iter().map(|e| e.mac.as_str()).collect();
            let mut n = 0;
            for mac in macs {
                n += per_mac.execute(params![mac, limits.max_rows_per_mac as i64])?;
            }
            metrics::counter!("fleetboot_trace_rows_deleted_total", "why" => "per_mac").increment(n as u64);
            deleted += n as u64;
        }
        // Ids only grow: keeping those above the newest minus max_rows keeps at most max_rows.
        let last = tx.last_insert_rowid();
        let n = tx.prepare_cached("DELETE FROM trace WHERE id <= ?1")?.execute(params![last - limits.max_rows as i64])?;
        metrics::counter!("fleetboot_trace_rows_deleted_total", "why" => "max_rows").increment(n as u64);
        deleted += n as u64;
        tx.commit()?;
        Ok((events.len() as u64, deleted))
    })();
    let restored = conn.pragma_update(None, "synchronous", "FULL");
    let r = r?;
    restored?;
    Ok(r)
}

/// Rows in the trace table now (once, at open).
pub(crate) fn count_rows(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT count(*) FROM trace", [], |r| r.get::<_, i64>(0)).map(|n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(mac: &str, kind: &str, detail: &str) -> TraceEvent {
        TraceEvent { ts_ms: 1, mac: mac.into(), kind: kind.into(), detail: detail.into() }
    }

    #[test]
    fn identical_events_within_the_window_are_counted_not_queued() {
        let q = TraceQueue::new(TraceLimits { repeat_window: Duration::from_secs(60), ..TraceLimits::default() });
        let t0 = Instant::now();
        assert_eq!(q.push(ev("m", "TFTP-REFUSED", "x: not found"), t0), (Recorded::Queued, true));
        for i in 1..=5 {
            assert_eq!(q.push(ev("m", "TFTP-REFUSED", "x: not found"), t0 + Duration::from_secs(i)).0, Recorded::Repeat);
        }
        // Another client, or another detail, is not a repeat.
        assert_eq!(q.push(ev("n", "TFTP-REFUSED", "x: not found"), t0).0, Recorded::Queued);
        assert_eq!(q.push(ev("m", "TFTP-REFUSED", "y: not found"), t0).0, Recorded::Queued);
        // After the window the event is recorded again, saying how often it was skipped.
        assert_eq!(q.push(ev("m", "TFTP-REFUSED", "x: not found"), t0 + Duration::from_secs(61)).0, Recorded::Queued);
        let got = q.take(100);
        assert_eq!(got.len(), 4);
        assert_eq!(got[3].detail, "x: not found (repeated 5 more times, not recorded)");
        assert_eq!((q.stats().queued, q.stats().repeats), (4, 5));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let q = TraceQueue::new(TraceLimits { queue: 16, repeat_window: Duration::ZERO, ..TraceLimits::default() });
        let t0 = Instant::now();
        let outcomes: Vec<Recorded> = (0..40).map(|i| q.push(ev(&format!("m{i}"), "K", ""), t0).0).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == Recorded::Queued).count(), 16);
        assert_eq!(q.stats().queue_full, 24);
        assert_eq!(q.take(usize::MAX).len(), 16);
        assert!(q.is_empty());
        // Repeats are not suppressed with a zero window.
        assert_eq!(q.push(ev("a", "K", ""), t0).0, Recorded::Queued);
        assert_eq!(q.push(ev("a", "K", ""), t0).0, Recorded::Queued);
    }
}

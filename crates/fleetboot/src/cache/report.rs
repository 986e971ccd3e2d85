//! Reports to the origin: every change of the cache's verification table is sent as soon
//! as it happens (coalesced while one is in flight), and again until the origin took it.
//! The first report after a start carries the whole table (`full`), so the origin's copy
//! matches after either side restarted.
//!
//! Bounded: one pending row per object version; past [`MAX_PENDING`] rows (a long outage
//! with much eviction) the oldest evicted rows are dropped — the next full report, after
//! the origin answers again, carries the truth anyway.

use super::link::Link;
use fleetboot_cache::index::Key;
use fleetboot_cache::messages::{CacheCounters, Report, ReportAck};
use fleetboot_cache::table::{Holding, State};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

pub const MAX_PENDING: usize = 50_000;
/// How often the counters alone are sent when nothing else changes.
pub const COUNTERS_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Reporter {
    pending: Mutex<BTreeMap<Key, Holding>>,
    wake: Notify,
    /// The origin has the whole table (a full report went through since the start, or
    /// since it last failed).
    synced: AtomicBool,
    /// Reports the origin acknowledged.
    pub sent: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reporter {
    pub fn push(&self, h: Holding) {
        let mut p = lock(&self.pending);
        let key = (h.name.clone(), h.version);
        if p.get(&key).is_none_or(|old| old.changed_ms <= h.changed_ms) {
            p.insert(key, h);
        }
        if p.len() > MAX_PENDING {
            let oldest = p.iter().filter(|(_, h)| h.state == State::Evicted).min_by_key(|(_, h)| h.changed_ms).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                p.remove(&k);
                self.synced.store(false, Ordering::Relaxed);
            }
        }
        drop(p);
        self.wake.notify_one();
    }

    pub fn pending(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Sends reports until the task is dropped. `table` gives the whole table for a full
    /// report, `counters` the cache's counters.
    pub async fn run(self: Arc<Self>, link: Arc<Link>, table: impl Fn() -> Vec<Holding>, counters: impl Fn() -> CacheCounters) {
        let mut backoff = Duration::from_millis(200);
        let mut last_counters = None;
        let mut last_sent = std::time::Instant::now();
        loop {
            let full = !self.synced.load(Ordering::Relaxed);
            let changes: Vec<Holding> = if full {
                lock(&self.pending).clear();
                table()
            } else {
                let p = std::mem::take(&mut *lock(&self.pending));
                p.into_values().collect()
            };
            let now = counters();
            if changes.is_empty() && !full {
                // No change of the table: the counters alone go at most every
                // COUNTERS_EVERY (a boot storm changes them all the time).
                let due = COUNTERS_EVERY.saturating_sub(last_sent.elapsed());
                if last_counters == Some(now) || !due.is_zero() {
                    let wait = if last_counters == Some(now) { COUNTERS_EVERY } else { due };
                    let _ = tokio::time::timeout(wait, self.wake.notified()).await;
                    continue;
                }
            }
            let report = Report { changes: changes.clone(), counters: now, full };
            let body = serde_json::to_vec(&report).unwrap_or_default();
            let idle = Duration::from_millis(link.config().origin_timeout_ms);
            match link.control::<ReportAck>("POST", "/cache/v1/report", &body, idle).await {
                Ok(_) => {
                    self.synced.store(true, Ordering::Relaxed);
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    last_counters = Some(now);
                    last_sent = std::time::Instant::now();
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    tracing::debug!(error = %e, full, rows = changes.len(), "report not delivered; kept for the next try");
                    if !full {
                        for h in changes {
                            self.push(h);
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

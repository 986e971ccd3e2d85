//! Verification tables: which cache holds which version of which object, in which state.
//!
//! Both sides keep one. A cache keeps its own rows (in its store, beside the objects) and
//! reports every change to its origin as it happens; the origin keeps a row per (cache,
//! object, version) — [`OriginTable`] — and decides from it:
//!
//! - which version a client of a cache is handed ([`OriginTable::handed_version`]): a new
//!   version only once that cache holds it verified, until then the newest it holds;
//! - which caches hold a version that just became stale ([`OriginTable::supersede`]), so
//!   it can push the new one to them.
//!
//! States: `pending` (being fetched, nothing of it served unverified), `verified` (every
//! chunk checked against the signed manifest), `stale` (verified content of a version the
//! origin has since replaced; still served until the new one is verified), `evicted`
//! (gone from the cache; the row remains as history).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Verified,
    Stale,
    Evicted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Verified => "verified",
            State::Stale => "stale",
            State::Evicted => "evicted",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "verified" => State::Verified,
            "stale" => State::Stale,
            "evicted" => State::Evicted,
            _ => return None,
        })
    }

    /// The cache holds every byte of it, checked.
    pub fn is_held(self) -> bool {
        matches!(self, State::Verified | State::Stale)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row: a version of an object and its state at one cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holding {
    pub name: String,
    pub version: u64,
    /// SHA-256, hex.
    pub sha256: String,
    pub state: State,
    /// Unix ms of the last change.
    pub changed_ms: u64,
}

/// A version of an object the origin publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub version: u64,
    pub sha256: String,
}

/// The origin's table over all its caches. Bounded: at most `max_rows_per_cache` rows per
/// cache; when full, the oldest evicted rows go first, then the oldest rows of any state.
#[derive(Debug, Clone)]
pub struct OriginTable {
    rows: BTreeMap<(String, String, u64), Holding>,
    max_rows_per_cache: usize,
}

impl OriginTable {
    pub fn new(max_rows_per_cache: usize) -> OriginTable {
        OriginTable { rows: BTreeMap::new(), max_rows_per_cache: max_rows_per_cache.max(1) }
    }

    /// Records a change a cache reported. Returns whether the table changed. A report
    /// older than the row it would replace is ignored (reports may arrive out of order
    /// after a retry).
    pub fn apply(&mut self, cache: &str, h: Holding) -> bool {
        let key = (cache.to_string(), h.name.clone(), h.version);
        if let Some(old) = self.rows.get(&key) {
            if old.changed_ms > h.changed_ms || (old.state == h.state && old.sha256 == h.sha256) {
                return false;
            }
        }
        self.rows.insert(key, h);
        self.trim(cache);
        true
    }

    /// Replaces everything known of `cache` with `rows` (its first report after a start).
    pub fn replace(&mut self, cache: &str, rows: Vec<Holding>) {
        self.rows.retain(|(c, _, _), _| c != cache);
        for h in rows {
            self.rows.insert((cache.to_string(), h.name.clone(), h.version), h);
        }
        self.trim(cache);
    }

    fn trim(&mut self, cache: &str) {
        let mine: Vec<_> = self.rows.iter().filter(|((c, _, _), _)| c == cache).map(|(k, h)| (k.clone(), h.state, h.changed_ms)).collect();
        if mine.len() <= self.max_rows_per_cache {
            return;
        }
        let mut order = mine;
        order.sort_by_key(|(_, state, at)| (*state != State::Evicted, *at));
        let excess = order.len() - self.max_rows_per_cache;
        for (k, _, _) in order.into_iter().take(excess) {
            self.rows.remove(&k);
        }
    }

    pub fn get(&self, cache: &str, name: &str, version: u64) -> Option<&Holding> {
        self.rows.get(&(cache.to_string(), name.to_string(), version))
    }

    /// Every row of one cache.
    pub fn of_cache<'a>(&'a self, cache: &'a str) -> impl Iterator<Item = &'a Holding> + 'a {
        self.rows.iter().filter(move |((c, _, _), _)| c == cache).map(|(_, h)| h)
    }

    /// Every (cache, row).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Holding)> {
        self.rows.iter().map(|((c, _, _), h)| (c.as_str(), h))
    }

    /// The version of `name` a client of `cache` gets, given the versions the origin
    /// publishes (any order): the newest one the cache holds verified (or stale: verified
    /// content, superseded) with the same content; if it holds none, the newest published
    /// (the cache fills it on demand, checking every chunk). `None` when nothing is
    /// published.
    pub fn handed_version(&self, cache: &str, name: &str, published: &[Published]) -> Option<u64> {
        let newest = published.iter().map(|p| p.version).max()?;
        let held = published
            .iter()
            .filter(|p| self.get(cache, name, p.version).is_some_and(|h| h.state.is_held() && h.sha256 == p.sha256))
            .map(|p| p.version)
            .max();
        Some(held.unwrap_or(newest))
    }

    /// `name` now has `version` published: every cache holding an older version (verified,
    /// or still fetching it) gets that row marked stale. Returns the caches that hold an
    /// older version, to push the new one to.
    pub fn supersede(&mut self, name: &str, version: u64, now_ms: u64) -> Vec<String> {
        let mut caches = Vec::new();
        for ((cache, n, v), h) in self.rows.iter_mut() {
            if n == name && *v < version && matches!(h.state, State::Verified | State::Pending | State::Stale) {
                if h.state != State::Stale {
                    h.state = State::Stale;
                    h.changed_ms = now_ms;
                }
                if !caches.contains(cache) {
                    caches.push(cache.clone());
                }
            }
        }
        // A cache that already holds the new version needs no push.
        caches.retain(|c| self.get(c, name, version).is_none_or(|h| h.state != State::Verified));
        caches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, version: u64, sha: &str, state: State, at: u64) -> Holding {
        Holding { name: name.into(), version, sha256: sha.repeat(64), state, changed_ms: at }
    }

    fn published(v: &[(u64, &str)]) -> Vec<Published> {
        v.iter().map(|(version, s)| Published { version: *version, sha256: s.repeat(64) }).collect()
    }

    #[test]
    fn a_new_version_is_handed_out_only_once_the_cache_verified_it() {
        let mut t = OriginTable::new(100);
        let name = "files/vmlinuz";
        // Cold: nothing held, the newest is handed out (filled on demand, verified).
        assert_eq!(t.handed_version("b1", name, &published(&[(1, "a")])), Some(1));
        t.apply("b1", h(name, 1, "a", State::Verified, 10));
        // Version 2 appears: b1 holds 1, so its clients keep getting 1.
        let both = published(&[(1, "a"), (2, "b")]);
        assert_eq!(t.supersede(name, 2, 20), vec!["b1".to_string()]);
        assert_eq!(t.get("b1", name, 1).unwrap().state, State::Stale);
        assert_eq!(t.handed_version("b1", name, &both), Some(1));
        t.apply("b1", h(name, 2, "b", State::Pending, 30));
        assert_eq!(t.handed_version("b1", name, &both), Some(1), "pending is not verified");
        t.apply("b1", h(name, 2, "b", State::Verified, 40));
        assert_eq!(t.handed_version("b1", name, &both), Some(2));
        // Another cache that never held it gets the newest.
        assert_eq!(t.handed_version("b2", name, &both), Some(2));
        // A verified row whose content differs from what is published does not count.
        t.apply("b3", h(name, 1, "z", State::Verified, 50));
        assert_eq!(t.handed_version("b3", name, &both), Some(2));
        assert_eq!(t.handed_version("b1", name, &[]), None);
    }

    #[test]
    fn supersede_skips_caches_with_the_new_version_and_evicted_rows() {
        let mut t = OriginTable::new(100);
        t.apply("b1", h("files/k", 1, "a", State::Verified, 1));
        t.apply("b2", h("files/k", 1, "a", State::Evicted, 1));
        t.apply("b3", h("files/k", 1, "a", State::Verified, 1));
        t.apply("b3", h("files/k", 2, "b", State::Verified, 2));
        assert_eq!(t.supersede("files/k", 2, 5), vec!["b1".to_string()]);
        assert_eq!(t.get("b2", "files/k", 1).unwrap().state, State::Evicted);
    }

    #[test]
    fn late_reports_lose_and_the_table_is_bounded() {
        let mut t = OriginTable::new(3);
        assert!(t.apply("b1", h("files/a", 1, "a", State::Verified, 20)));
        assert!(!t.apply("b1", h("files/a", 1, "a", State::Pending, 10)), "older report");
        assert!(!t.apply("b1", h("files/a", 1, "a", State::Verified, 30)), "no change");
        t.apply("b1", h("files/b", 1, "a", State::Evicted, 5));
        t.apply("b1", h("files/c", 1, "a", State::Verified, 6));
        t.apply("b1", h("files/d", 1, "a", State::Verified, 7));
        assert_eq!(t.of_cache("b1").count(), 3);
        assert!(t.get("b1", "files/b", 1).is_none(), "the evicted row went first");
        t.replace("b1", vec![h("files/z", 4, "c", State::Pending, 9)]);
        assert_eq!(t.of_cache("b1").map(|h| h.name.as_str()).collect::<Vec<_>>(), vec!["files/z"]);
    }
}

//! The cache's own verification table and space accounting: every object version it holds
//! or is fetching, its state, whether the origin pinned it, when a client last used it.
//!
//! Bounded by bytes: a fill reserves its object's whole size before the first chunk is
//! written, evicting unpinned objects least recently used first. An object is never evicted
//! while pinned (prestaged by the origin), being filled, or open by a reader; when nothing
//! else can go, the new fill is refused ([`NoRoom`]) and the shell says so to the client.

use crate::hash::{to_hex, Digest};
use crate::table::{Holding, State};
use std::collections::BTreeMap;

/// (object name, version)
pub type Key = (String, u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sha256: Digest,
    pub size: u64,
    pub state: State,
    pub pinned: bool,
    pub last_used_ms: u64,
    pub changed_ms: u64,
    /// Readers holding it open.
    pub readers: u32,
    /// A fill is running.
    pub filling: bool,
}

impl Entry {
    fn evictable(&self) -> bool {
        !self.pinned && self.readers == 0 && !self.filling
    }
}

/// Nothing more can be evicted to make room.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cache cannot make room for {need} bytes: {used} of {capacity} bytes are pinned or in use")]
pub struct NoRoom {
    pub need: u64,
    pub used: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone)]
pub struct Index {
    entries: BTreeMap<Key, Entry>,
    capacity: u64,
    used: u64,
}

impl Index {
    pub fn new(capacity: u64) -> Index {
        Index { entries: BTreeMap::new(), capacity, used: 0 }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved by the objects present (held or being filled).
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn get(&self, key: &Key) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Entry)> {
        self.entries.iter()
    }

    /// The versions of `name` present, newest first.
    pub fn versions<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (u64, &'a Entry)> + 'a {
        self.entries.range((name.to_string(), 0)..=(name.to_string(), u64::MAX)).rev().map(|((_, v), e)| (*v, e))
    }

    /// Restores an entry found on disk at start (no eviction: the shell evicts afterwards
    /// with [`Index::over_capacity`] if the limit shrank).
    pub fn restore(&mut self, key: Key, entry: Entry) {
        if let Some(old) = self.entries.insert(key, entry.clone()) {
            self.used -= old.size;
        }
        self.used += entry.size;
    }

    /// Makes room for a new object of `size` bytes: returns the keys to evict (least
    /// recently used unpinned objects first), or [`NoRoom`]. Nothing changes on `Err`. The
    /// caller evicts them ([`Index::evict`]) and then calls [`Index::insert`].
    pub fn room_for(&self, size: u64) -> Result<Vec<Key>, NoRoom> {
        let mut free = self.capacity.saturating_sub(self.used);
        if size <= free {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<(&Key, &Entry)> = self.entries.iter().filter(|(_, e)| e.evictable()).collect();
        candidates.sort_by_key(|(_, e)| (e.last_used_ms, e.state != State::Stale));
        let mut victims = Vec::new();
        for (k, e) in candidates {
            if size <= free {
                break;
            }
            free += e.size;
            victims.push(k.clone());
        }
        if size <= free {
            Ok(victims)
        } else {
            Err(NoRoom { need: size, used: self.used, capacity: self.capacity })
        }
    }

    /// Adds a new object in state `pending` (filling). Call after [`Index::room_for`].
    pub fn insert(&mut self, key: Key, sha256: Digest, size: u64, pinned: bool, now_ms: u64) -> Holding {
        let entry = Entry { sha256, size, state: State::Pending, pinned, last_used_ms: now_ms, changed_ms: now_ms, readers: 0, filling: true };
        self.restore(key.clone(), entry);
        self.holding(&key).expect("just inserted")
    }

    /// Removes an object; returns its last row, now `evicted`.
    pub fn evict(&mut self, key: &Key, now_ms: u64) -> Option<Holding> {
        let e = self.entries.remove(key)?;
        self.used -= e.size;
        Some(Holding { name: key.0.clone(), version: key.1, sha256: to_hex(&e.sha256), state: State::Evicted, changed_ms: now_ms })
    }

    /// Keys to evict because the objects present exceed the capacity (after a restart
    /// with a smaller limit), least recently used first; pinned and busy ones stay.
    pub fn over_capacity(&self) -> Vec<Key> {
        if self.used <= self.capacity {
            return Vec::new();
        }
        let mut over = self.used - self.capacity;
        let mut candidates: Vec<(&Key, &Entry)> = self.entries.iter().filter(|(_, e)| e.evictable()).collect();
        candidates.sort_by_key(|(_, e)| e.last_used_ms);
        let mut out = Vec::new();
        for (k, e) in candidates {
            if over == 0 {
                break;
            }
            over = over.saturating_sub(e.size);
            out.push(k.clone());
        }
        out
    }

    /// Sets the state; returns the new row when it changed.
    pub fn set_state(&mut self, key: &Key, state: State, now_ms: u64) -> Option<Holding> {
        let e = self.entries.get_mut(key)?;
        if e.state == state {
            return None;
        }
        e.state = state;
        e.changed_ms = now_ms;
        if state != State::Pending {
            e.filling = false;
        }
        self.holding(key)
    }

    /// A fill starts again on an object present (a chunk read back was corrupt, or a
    /// failed fill is retried).
    pub fn set_filling(&mut self, key: &Key, filling: bool) {
        if let Some(e) = self.entries.get_mut(key) {
            e.filling = filling;
        }
    }

    pub fn set_pinned(&mut self, key: &Key, pinned: bool) {
        if let Some(e) = self.entries.get_mut(key) {
            e.pinned = pinned;
        }
    }

    /// A client used it (LRU order).
    pub fn touch(&mut self, key: &Key, now_ms: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            e.last_used_ms = e.last_used_ms.max(now_ms);
        }
    }

    pub fn open_reader(&mut self, key: &Key) {
        if let Some(e) = self.entries.get_mut(key) {
            e.readers += 1;
        }
    }

    pub fn close_reader(&mut self, key: &Key) {
        if let Some(e) = self.entries.get_mut(key) {
            e.readers = e.readers.saturating_sub(1);
        }
    }

    /// The row of the verification table for an object present.
    pub fn holding(&self, key: &Key) -> Option<Holding> {
        let e = self.entries.get(key)?;
        Some(Holding { name: key.0.clone(), version: key.1, sha256: to_hex(&e.sha256), state: e.state, changed_ms: e.changed_ms })
    }

    /// Every row, for a full report.
    pub fn holdings(&self) -> Vec<Holding> {
        self.entries.keys().filter_map(|k| self.holding(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str, v: u64) -> Key {
        (n.to_string(), v)
    }

    fn done(ix: &mut Index, k: &Key) {
        ix.set_state(k, State::Verified, 1);
    }

    #[test]
    fn least_recently_used_unpinned_objects_make_room() {
        let mut ix = Index::new(100);
        for (i, name) in ["files/a", "files/b", "files/c"].iter().enumerate() {
            assert_eq!(ix.room_for(30), Ok(vec![]));
            ix.insert(key(name, 1), [i as u8; 32], 30, false, i as u64 * 10);
            done(&mut ix, &key(name, 1));
        }
        ix.touch(&key("files/a", 1), 100);
        // 90 used; 50 more need b (oldest use) and c.
        assert_eq!(ix.room_for(50), Ok(vec![key("files/b", 1), key("files/c", 1)]));
        ix.set_pinned(&key("files/b", 1), true);
        assert_eq!(ix.room_for(50), Ok(vec![key("files/c", 1), key("files/a", 1)]));
        ix.open_reader(&key("files/a", 1));
        assert_eq!(ix.room_for(50), Err(NoRoom { need: 50, used: 90, capacity: 100 }));
        ix.close_reader(&key("files/a", 1));
        let victims = ix.room_for(50).unwrap();
        for v in &victims {
            assert_eq!(ix.evict(v, 7).unwrap().state, State::Evicted);
        }
        ix.insert(key("files/d", 1), [9; 32], 50, false, 200);
        assert_eq!(ix.used(), 80);
        assert!(ix.room_for(21).is_err(), "d is filling, b pinned");
    }

    #[test]
    fn state_changes_become_rows_once() {
        let mut ix = Index::new(1000);
        let k = key("files/k", 2);
        let row = ix.insert(k.clone(), [1; 32], 10, true, 5);
        assert_eq!((row.state, row.version), (State::Pending, 2));
        assert_eq!(ix.set_state(&k, State::Verified, 6).unwrap().state, State::Verified);
        assert_eq!(ix.set_state(&k, State::Verified, 7), None);
        assert!(!ix.get(&k).unwrap().filling);
        assert_eq!(ix.versions("files/k").map(|(v, _)| v).collect::<Vec<_>>(), vec![2]);
        assert_eq!(ix.holdings().len(), 1);
    }

    #[test]
    fn a_smaller_limit_after_restart_evicts_down_to_it() {
        let mut ix = Index::new(50);
        for (i, n) in ["files/a", "files/b", "files/c"].iter().enumerate() {
            let e = Entry { sha256: [0; 32], size: 30, state: State::Verified, pinned: i == 0, last_used_ms: i as u64, changed_ms: 0, readers: 0, filling: false };
            ix.restore(key(n, 1), e);
        }
        // 90 bytes for 50: b and c go (a is pinned), oldest use first.
        assert_eq!(ix.over_capacity(), vec![key("files/b", 1), key("files/c", 1)]);
    }
}

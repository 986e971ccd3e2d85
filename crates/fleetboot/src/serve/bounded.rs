//! A map with a capacity: inserting into a full one forgets the entry written longest ago.
//! For what the services remember about clients they heard from (`Shared`): anyone on the
//! LAN can make up MAC addresses, so nothing keyed by them may grow without end.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug)]
pub struct BoundedMap<K, V> {
    capacity: usize,
    entries: HashMap<K, (V, u64)>,
    /// Write stamp -> key, oldest first.
    order: BTreeMap<u64, K>,
    next_stamp: u64,
    evicted: u64,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    pub fn new(capacity: usize) -> BoundedMap<K, V> {
        BoundedMap { capacity: capacity.max(1), entries: HashMap::new(), order: BTreeMap::new(), next_stamp: 0, evicted: 0 }
    }

    /// Inserts or replaces; the entry becomes the newest. Returns whether an old entry was
    /// forgotten to make room.
    pub fn insert(&mut self, key: K, value: V) -> bool {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some((_, old)) = self.entries.insert(key.clone(), (value, stamp)) {
            self.order.remove(&old);
            self.order.insert(stamp, key);
            return false;
        }
        self.order.insert(stamp, key);
        if self.entries.len() <= self.capacity {
            return false;
        }
        if let Some((_, oldest)) = self.order.pop_first() {
            self.entries.remove(&oldest);
            self.evicted += 1;
        }
        true
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(v, _)| v)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (v, stamp) = self.entries.remove(key)?;
        self.order.remove(&stamp);
        Some(v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries forgotten to make room, since creation.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_written_longest_ago_goes_first() {
        let mut m = BoundedMap::new(3);
        for k in 0..3 {
            assert!(!m.insert(k, k * 10));
        }
        // Rewriting 0 makes it the newest: 1 is now the oldest.
        assert!(!m.insert(0, 1));
        assert!(m.insert(3, 30));
        assert_eq!(m.get(&1), None);
        assert_eq!((m.get(&0), m.get(&2), m.get(&3)), (Some(&1), Some(&20), Some(&30)));
        assert_eq!(m.remove(&2), Some(20));
        assert!(!m.insert(4, 40));
        assert_eq!((m.len(), m.evicted()), (3, 1));
    }

    #[test]
    fn a_flood_of_new_keys_stays_within_capacity() {
        let mut m = BoundedMap::new(1000);
        for k in 0..100_000u32 {
            m.insert(k, ());
            assert!(m.len() <= 1000);
        }
        assert_eq!(m.order.len(), m.len());
        assert_eq!(m.evicted(), 99_000);
        assert!(m.get(&99_999).is_some() && m.get(&98_999).is_none());
    }
}

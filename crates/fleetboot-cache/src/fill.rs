//! One object being filled at a cache, chunk by chunk: which chunks it holds (each checked
//! against the signed manifest), which are on their way, which to ask for next, and what a
//! wrong chunk costs.
//!
//! A cache runs one [`Fill`] per object however many clients want it (single flight): the
//! first miss starts it, later ones wait for the chunks they need. Requests are runs of
//! missing chunks, starting where a waiting reader is ([`Fill::next_request`]), so a client
//! that arrived mid-fill is served as soon as its next chunk is verified. A broken link
//! abandons what was in flight ([`Fill::abandon`]); the next request resumes at the first
//! chunk still missing, so a transfer never moves a verified chunk twice. Chunks the cache
//! already holds under another version with the same BLAKE3 are copied locally
//! ([`Fill::adopt`]) instead of crossing the WAN: an updated image moves only the chunks
//! that changed.

use crate::manifest::Manifest;
use std::ops::Range;

/// Consecutive wrong copies of one chunk after which the fill gives up (the origin's file
/// changed under its manifest, or the link corrupts everything).
pub const MAX_CHUNK_FAILURES: u32 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u32) -> Bits {
        Bits(vec![0; (n as usize).div_ceil(64)])
    }
    fn get(&self, i: u32) -> bool {
        self.0.get(i as usize / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    fn set(&mut self, i: u32, v: bool) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            if v {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }
}

/// What a chunk that arrived turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// It matches the manifest and is now held.
    Verified,
    /// It does not match; it will be asked for again. `attempts` wrong copies so far.
    Corrupt { attempts: u32 },
    /// It does not match, for the [`MAX_CHUNK_FAILURES`]th time in a row: the fill failed.
    Failed,
    /// Already held (a duplicate, or a chunk adopted meanwhile): ignored.
    Duplicate,
}

/// Counters of one fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FillStats {
    /// Verified chunks and their bytes that came from the origin.
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Bytes received that did not match (and were thrown away).
    pub corrupt_chunks: u64,
    pub corrupt_bytes: u64,
    /// Chunks copied from another version held locally.
    pub chunks_adopted: u64,
    pub bytes_adopted: u64,
}

#[derive(Debug, Clone)]
pub struct Fill {
    manifest: Manifest,
    have: Bits,
    in_flight: Bits,
    held: u32,
    failures: std::collections::HashMap<u32, u32>,
    failed: bool,
    stats: FillStats,
}

impl Fill {
    pub fn new(manifest: Manifest) -> Fill {
        let n = manifest.chunk_count();
        Fill {
            have: Bits::new(n),
            in_flight: Bits::new(n),
            held: 0,
            failures: Default::default(),
            failed: false,
            stats: FillStats::default(),
            manifest,
        }
    }

    /// Resumes with the chunks a previous run held (the shell's record of them; it checks
    /// every chunk again whenever it reads one back, see [`Fill::invalidate`]).
    pub fn resume(manifest: Manifest, held_words: &[u64]) -> Fill {
        let mut f = Fill::new(manifest);
        for i in 0..f.manifest.chunk_count() {
            if held_words.get(i as usize / 64).is_some_and(|w| w >> (i % 64) & 1 == 1) {
                f.have.set(i, true);
                f.held += 1;
            }
        }
        f
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn stats(&self) -> FillStats {
        self.stats
    }

    pub fn has(&self, i: u32) -> bool {
        self.have.get(i)
    }

    pub fn held_chunks(&self) -> u32 {
        self.held
    }

    pub fn missing_chunks(&self) -> u32 {
        self.manifest.chunk_count() - self.held
    }

    pub fn is_complete(&self) -> bool {
        self.held == self.manifest.chunk_count()
    }

    /// A chunk failed too often: nothing more will be asked for until [`Fill::retry`].
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Clears a failure so the fill may try again (a new client asks, the origin pushes).
    pub fn retry(&mut self) {
        self.failed = false;
        self.failures.clear();
    }

    /// The held chunks as 64-bit words, for the shell to persist.
    pub fn held_words(&self) -> &[u64] {
        &self.have.0
    }

    /// The next run of chunks to ask the origin for: missing, not in flight, starting at
    /// the first such chunk at or after `from` (where a reader waits), else the first
    /// anywhere; at most `max_chunks` long. Marks it in flight.
    pub fn next_request(&mut self, from: u32, max_chunks: u32) -> Option<Range<u32>> {
        if self.failed || max_chunks == 0 {
            return None;
        }
        let n = self.manifest.chunk_count();
        let wanted = |i: u32| !self.have.get(i) && !self.in_flight.get(i);
        let start = (from.min(n)..n).find(|&i| wanted(i)).or_else(|| (0..from.min(n)).find(|&i| wanted(i)))?;
        let mut end = start + 1;
        while end < n && end - start < max_chunks && wanted(end) {
            end += 1;
        }
        for i in start..end {
            self.in_flight.set(i, true);
        }
        Some(start..end)
    }

    /// Whether some chunk is on its way from the origin.
    pub fn in_flight(&self) -> bool {
        self.in_flight.0.iter().any(|w| *w != 0)
    }

    /// Chunk `i` arrived from the origin.
    pub fn receive(&mut self, i: u32, data: &[u8]) -> Receipt {
        if i >= self.manifest.chunk_count() {
            return Receipt::Duplicate;
        }
        self.in_flight.set(i, false);
        if self.have.get(i) {
            return Receipt::Duplicate;
        }
        if !self.manifest.check_chunk(i, data) {
            self.stats.corrupt_chunks += 1;
            self.stats.corrupt_bytes += data.len() as u64;
            let attempts = self.failures.entry(i).or_insert(0);
            *attempts += 1;
            if *attempts >= MAX_CHUNK_FAILURES {
                self.failed = true;
                return Receipt::Failed;
            }
            return Receipt::Corrupt { attempts: *attempts };
        }
        self.failures.remove(&i);
        self.have.set(i, true);
        self.held += 1;
        self.stats.chunks_fetched += 1;
        self.stats.bytes_fetched += data.len() as u64;
        Receipt::Verified
    }

    /// The chunks of `range` still in flight will not arrive (the link broke): they are
    /// missing again.
    pub fn abandon(&mut self, range: Range<u32>) {
        for i in range {
            self.in_flight.set(i, false);
        }
    }

    /// Chunk `i` is copied from another object held here whose chunk has the same BLAKE3
    /// (checked again here against this manifest). Returns whether it was taken.
    pub fn adopt(&mut self, i: u32, data: &[u8]) -> bool {
        if i >= self.manifest.chunk_count() || self.have.get(i) || !self.manifest.check_chunk(i, data) {
            return false;
        }
        self.have.set(i, true);
        self.in_flight.set(i, false);
        self.held += 1;
        self.stats.chunks_adopted += 1;
        self.stats.bytes_adopted += data.len() as u64;
        true
    }

    /// Chunk `i` read back from disk did not match: it is missing again.
    ///
    /// Returns whether it was held: several readers may find the same bad chunk at once,
    /// and only the first has found something new.
    pub fn invalidate(&mut self, i: u32) -> bool {
        if !self.have.get(i) {
            return false;
        }
        self.have.set(i, false);
        self.held -= 1;
        true
    }

    /// The chunks whose BLAKE3 appears in `local` (a lookup into what the cache already
    /// holds), missing here: candidates for [`Fill::adopt`].
    pub fn adoptable<T>(&self, mut local: impl FnMut(&crate::hash::Digest) -> Option<T>) -> Vec<(u32, T)> {
        (0..self.manifest.chunk_count())
            .filter(|&i| !self.have.get(i))
            .filter_map(|i| local(&self.manifest.chunks[i as usize]).map(|t| (i, t)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{of_bytes, MIN_CHUNK};

    const CS: usize = MIN_CHUNK as usize;

    fn object(chunks: usize, seed: u8) -> (Manifest, Vec<u8>) {
        let data: Vec<u8> = (0..chunks * CS - 10).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect();
        (of_bytes("files/x", 1, MIN_CHUNK, &data, 0), data)
    }

    fn chunk(data: &[u8], i: u32) -> &[u8] {
        &data[i as usize * CS..((i as usize + 1) * CS).min(data.len())]
    }

    #[test]
    fn requests_start_where_the_reader_waits_and_resume_after_a_break() {
        let (m, data) = object(10, 3);
        let mut f = Fill::new(m);
        assert_eq!(f.next_request(4, 3), Some(4..7));
        assert_eq!(f.next_request(4, 100), Some(7..10), "in flight chunks are skipped");
        assert_eq!(f.next_request(4, 100), Some(0..4), "then wraps to the start");
        assert_eq!(f.next_request(0, 100), None, "everything is in flight");
        for i in 4..6 {
            assert_eq!(f.receive(i, chunk(&data, i)), Receipt::Verified);
        }
        // The link broke after chunk 5.
        f.abandon(6..7);
        f.abandon(7..10);
        f.abandon(0..4);
        assert_eq!(f.next_request(0, 100), Some(0..4));
        assert_eq!(f.next_request(0, 100), Some(6..10), "verified chunks are not asked for again");
        for i in (0..4).chain(6..10) {
            assert_eq!(f.receive(i, chunk(&data, i)), Receipt::Verified);
        }
        assert!(f.is_complete());
        assert_eq!(f.stats().bytes_fetched, data.len() as u64);
        assert_eq!(f.receive(3, chunk(&data, 3)), Receipt::Duplicate);
    }

    #[test]
    fn a_wrong_chunk_is_asked_for_again_until_the_fill_gives_up() {
        let (m, data) = object(3, 5);
        let mut f = Fill::new(m);
        assert_eq!(f.next_request(0, 10), Some(0..3));
        let mut bad = chunk(&data, 1).to_vec();
        bad[100] ^= 0xff;
        assert_eq!(f.receive(0, chunk(&data, 0)), Receipt::Verified);
        assert_eq!(f.receive(1, &bad), Receipt::Corrupt { attempts: 1 });
        assert_eq!(f.receive(2, chunk(&data, 2)), Receipt::Verified);
        assert!(!f.has(1));
        assert_eq!(f.next_request(0, 10), Some(1..2));
        for attempt in 2..MAX_CHUNK_FAILURES {
            assert_eq!(f.receive(1, &bad), Receipt::Corrupt { attempts: attempt });
        }
        assert_eq!(f.receive(1, &bad), Receipt::Failed);
        assert!(f.has_failed());
        assert_eq!(f.next_request(0, 10), None);
        f.retry();
        assert_eq!(f.next_request(0, 10), Some(1..2));
        assert_eq!(f.receive(1, chunk(&data, 1)), Receipt::Verified);
        assert!(f.is_complete());
        assert_eq!(f.stats().corrupt_chunks, u64::from(MAX_CHUNK_FAILURES));
    }

    #[test]
    fn unchanged_chunks_are_adopted_from_the_old_version() {
        let (old_m, old) = object(6, 7);
        let mut new = old.clone();
        new[2 * CS + 5] ^= 1;
        let new_m = of_bytes("files/x", 2, MIN_CHUNK, &new, 0);
        let mut f = Fill::new(new_m);
        let by_hash: std::collections::HashMap<_, _> = old_m.chunks.iter().enumerate().map(|(i, h)| (*h, i as u32)).collect();
        let candidates = f.adoptable(|h| by_hash.get(h).copied());
        assert_eq!(candidates.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 1, 3, 4, 5]);
        for (i, src) in candidates {
            assert!(f.adopt(i, chunk(&old, src)));
        }
        // Adopting a chunk whose bytes differ from this manifest is refused.
        assert!(!f.adopt(2, chunk(&old, 2)));
        assert_eq!(f.next_request(0, 10), Some(2..3), "only the changed chunk crosses the WAN");
        assert_eq!(f.receive(2, chunk(&new, 2)), Receipt::Verified);
        assert!(f.is_complete());
        assert_eq!(f.stats().bytes_fetched, CS as u64);
    }

    #[test]
    fn resume_and_invalidate() {
        let (m, data) = object(70, 9);
        let mut f = Fill::new(m.clone());
        for i in [0u32, 65, 69] {
            f.receive(i, chunk(&data, i));
        }
        let mut g = Fill::resume(m, f.held_words());
        assert_eq!(g.held_chunks(), 3);
        assert!(g.has(65) && g.has(69) && !g.has(1));
        g.invalidate(65);
        g.invalidate(65);
        assert_eq!(g.held_chunks(), 2);
        assert_eq!(g.next_request(60, 10), Some(60..69), "the invalidated chunk is asked for again");
    }
}

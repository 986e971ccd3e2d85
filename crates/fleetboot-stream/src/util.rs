//! Small shared pieces: a bitset, a token bucket, FEC group arithmetic.

use std::time::{Duration, Instant};

/// A fixed-size bitset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitset {
    words: Vec<u64>,
    len: u32,
}

impl Bitset {
    pub(crate) fn new(len: u32) -> Self {
        Bitset {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
        }
    }
    pub(crate) fn len(&self) -> u32 {
        self.len
    }
    pub(crate) fn get(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Sets bit `i`; returns whether it was newly set.
    pub(crate) fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let new = *w & m == 0;
        *w |= m;
        new
    }
    /// Clears bit `i`.
    pub(crate) fn clear(&mut self, i: u32) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1u64 << (i % 64));
        }
    }
    pub(crate) fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }
    /// Number of set bits in `[start, end)`.
    pub(crate) fn count_range(&self, start: u32, end: u32) -> u32 {
        let end = end.min(self.len);
        let mut n = 0;
        let mut i = start;
        while i < end {
            if i % 64 == 0 && end - i >= 64 {
                n += self.words[(i / 64) as usize].count_ones();
                i += 64;
            } else {
                n += self.get(i) as u32;
                i += 1;
            }
        }
        n
    }
    /// First clear bit at or after `from` (or `len`).
    pub(crate) fn next_clear(&self, mut from: u32) -> u32 {
        while from < self.len {
            let w = self.words[(from / 64) as usize] | ((1u64 << (from % 64)) - 1);
            if w != u64::MAX {
                let b = (from / 64) * 64 + w.trailing_ones();
                return b.min(self.len);
            }
            from = (from / 64 + 1) * 64;
        }
        self.len
    }
    /// First set bit at or after `from` (or `len`).
    #[cfg(test)]
    pub(crate) fn next_set(&self, mut from: u32) -> u32 {
        while from < self.len {
            let w = self.words[(from / 64) as usize] & !((1u64 << (from % 64)) - 1);
            if w != 0 {
                let b = (from / 64) * 64 + w.trailing_zeros();
                return b.min(self.len);
            }
            from = (from / 64 + 1) * 64;
        }
        self.len
    }
}

/// A token bucket in bytes, refilled from `now`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Sub-byte credit, in byte-nanoseconds (`< 1e9`).
    frac: u128,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(now: Instant, rate: u64, burst: u64) -> Self {
        TokenBucket {
            rate: rate.max(1),
            burst: burst.max(1),
            tokens: burst.max(1),
            frac: 0,
            last: now,
        }
    }
    fn refill(&mut self, now: Instant) {
        if now <= self.last {
            return;
        }
        let ns = now.duration_since(self.last).as_nanos();
        self.last = now;
        let acc = self.frac + ns * self.rate as u128;
        let whole = acc / 1_000_000_000;
        self.frac = acc % 1_000_000_000;
        self.tokens = (self.tokens as u128 + whole).min(self.burst as u128) as u64;
        if self.tokens == self.burst {
            self.frac = 0;
        }
    }
    /// Takes `n` bytes if available.
    pub(crate) fn try_take(&mut self, now: Instant, n: u64) -> bool {
        self.refill(now);
        let n = n.min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
    /// When `n` bytes will be available.
    pub(crate) fn ready_at(&self, n: u64) -> Instant {
        let n = n.min(self.burst);
        if self.tokens >= n {
            return self.last;
        }
        let need = (n - self.tokens) as u128 * 1_000_000_000 - self.frac.min(1_000_000_000);
        let ns = need.div_ceil(self.rate as u128);
        self.last + Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
    }
}

/// FEC group arithmetic shared by both ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Groups {
    pub(crate) group: u32,
    pub(crate) stream_len: u32,
}

impl Groups {
    pub(crate) fn count(&self) -> u32 {
        self.stream_len.div_ceil(self.group)
    }
    pub(crate) fn range(&self, g: u32) -> (u32, u32) {
        let s = g * self.group;
        (s, (s + self.group).min(self.stream_len))
    }
    pub(crate) fn of(&self, pos: u32) -> u32 {
        pos / self.group
    }
}

/// Recovery symbols per generation for a group of `k` originals: enough for a quarter
/// of the group lost, at least 8, within what Reed-Solomon supports.
pub(crate) fn recovery_total(k: u32) -> u16 {
    let mut r = (k / 4).max(8).min(k.max(1) * 4).min(32768);
    while r > 1 && !reed_solomon_simd::ReedSolomonEncoder::supports(k as usize, r as usize) {
        r /= 2;
    }
    r as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_scans() {
        let mut b = Bitset::new(200);
        for i in [0, 1, 2, 63, 64, 130, 199] {
            b.set(i);
        }
        assert_eq!(b.next_clear(0), 3);
        assert_eq!(b.next_set(3), 63);
        assert_eq!(b.next_set(65), 130);
        assert_eq!(b.next_set(131), 199);
        assert_eq!(b.next_set(200), 200);
        assert_eq!(b.count_range(0, 200), 7);
        assert_eq!(b.count_range(60, 131), 3);
        let mut f = Bitset::new(130);
        for i in 0..130 {
            f.set(i);
        }
        assert_eq!(f.next_clear(0), 130);
    }

    #[test]
    fn bucket_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 1000, 100);
        assert!(b.try_take(t0, 100));
        assert!(!b.try_take(t0, 10));
        let at = b.ready_at(10);
        assert_eq!(at, t0 + Duration::from_millis(10));
        assert!(b.try_take(at, 10));
    }

    #[test]
    fn recovery_supported() {
        for k in [1, 2, 7, 100, 1000, 4096, 32768] {
            let r = recovery_total(k);
            assert!(r >= 1);
            assert!(reed_solomon_simd::ReedSolomonEncoder::supports(
                k as usize, r as usize
            ));
        }
    }
}

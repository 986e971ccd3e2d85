//! A sparse file cut into fixed-size blocks, with a bitmap of the blocks it holds.
//!
//! This is the one "bitmap over a file" of fleetboot's disks: a client's copy-on-write
//! overlay (a set bit means "read this block from the overlay, not the image"), the
//! streaming agent's cache of an image (a set bit means "this block was received") and the
//! agent's write overlay are all a [`BlockFile`]; what differs is how (and whether) the
//! bitmap is made durable, which stays with its owner (the overlay's journal, the cache's
//! snapshot).
//!
//! Readers never lock: bits are atomic words. A writer stores a block's bytes first and
//! sets its bit after (release); a reader checks the bit (acquire) before it reads the
//! bytes, so a set bit always covers bytes that are in the file. Bits are only ever set,
//! never cleared: a block the file holds keeps holding it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// A sparse file of `size` bytes in blocks of `block_size` bytes (the last one may be
/// shorter), and which of those blocks it holds.
#[derive(Debug)]
pub struct BlockFile {
    file: File,
    size: u64,
    block: u64,
    blocks: u64,
    bits: Vec<AtomicU64>,
    present: AtomicU64,
}

impl BlockFile {
    /// Wraps `file` (already `size` bytes long) with an empty bitmap.
    pub fn new(file: File, size: u64, block_size: u32) -> io::Result<BlockFile> {
        if block_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block size 0",
            ));
        }
        let blocks = size.div_ceil(block_size as u64);
        let words = usize::try_from(blocks.div_ceil(64))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many blocks"))?;
        Ok(BlockFile {
            file,
            size,
            block: block_size as u64,
            blocks,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            present: AtomicU64::new(0),
        })
    }

    /// The file itself.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block
    }
    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// How many blocks the file holds.
    pub fn present(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }
    /// The file holds every block.
    pub fn is_complete(&self) -> bool {
        self.present() == self.blocks
    }
    /// First byte after block `b`.
    pub fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * self.block).min(self.size)
    }
    /// Length of block `b` in bytes (the last block may be short).
    pub fn block_len(&self, b: u64) -> u64 {
        self.block_end(b) - b * self.block
    }

    /// Whether the file holds block `b`.
    pub fn has(&self, b: u64) -> bool {
        b < self.blocks
            && self.bits[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// The blocks `[first, end)` that `len` bytes at `offset` touch (`len` 0 touches none).
    pub fn blocks_of(&self, offset: u64, len: u64) -> (u64, u64) {
        if len == 0 {
            let b = (offset / self.block).min(self.blocks);
            return (b, b);
        }
        let first = offset / self.block;
        let end = (offset.saturating_add(len) - 1) / self.block + 1;
        (first.min(self.blocks), end.min(self.blocks))
    }

    /// Whether the file holds every block that `[offset, offset+len)` touches.
    pub fn has_range(&self, offset: u64, len: u64) -> bool {
        let (a, b) = self.blocks_of(offset, len);
        a == b || self.run_end(a, b) == (true, b)
    }

    /// From block `i` (< `limit`): whether the file holds it, and the end of the run of
    /// blocks in that same state, at most `limit`.
    pub fn run_end(&self, i: u64, limit: u64) -> (bool, u64) {
        bits_run_end(&self.bits, self.blocks, i, limit)
    }

    /// Marks blocks `[a, b)` as held (their bytes must already be in the file); appends
    /// the ranges that were not held before to `newly`.
    pub fn mark(&self, a: u64, b: u64, newly: &mut Vec<(u64, u64)>) {
        let b = b.min(self.blocks);
        let mut i = a;
        while i < b {
            let word = (i / 64) as usize;
            let lo = i % 64;
            let hi = (b - (i - lo)).min(64); // bit index (exclusive) within this word
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.bits[word].fetch_or(mask, Ordering::AcqRel);
            let added = mask & !old;
            if added != 0 {
                self.present
                    .fetch_add(added.count_ones() as u64, Ordering::Relaxed);
                // Append the newly set bits of this word as ranges.
                let base = word as u64 * 64;
                let mut m = added;
                while m != 0 {
                    let s = m.trailing_zeros() as u64;
                    let len = (m >> s).trailing_ones() as u64;
                    let (ra, rb) = (base + s, base + s + len);
                    match newly.last_mut() {
                        Some(last) if last.1 == ra => last.1 = rb,
                        _ => newly.push((ra, rb)),
                    }
                    m &= if s + len >= 64 {
                        0
                    } else {
                        !((1u64 << (s + len)) - 1)
                    };
                }
            }
            i = i - lo + hi;
        }
    }

    /// Marks one block; returns whether it was not held before.
    pub fn mark_one(&self, b: u64) -> bool {
        if b >= self.blocks {
            return false;
        }
        let m = 1u64 << (b % 64);
        let old = self.bits[(b / 64) as usize].fetch_or(m, Ordering::AcqRel);
        let new = old & m == 0;
        if new {
            self.present.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    /// The held blocks as ranges `[a, b)`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        let mut i = 0;
        while i < self.blocks {
            let (set, e) = self.run_end(i, self.blocks);
            if set {
                v.push((i, e));
            }
            i = e;
        }
        v
    }

    /// The bitmap as 64-bit words (bit `i % 64` of word `i / 64` is block `i`).
    pub fn words(&self) -> Vec<u64> {
        self.bits.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    /// Marks the blocks set in `words` (as [`BlockFile::words`] gives them); bits past the
    /// last block are ignored. Fails when `words` has the wrong length.
    pub fn load_words(&self, words: &[u64]) -> io::Result<()> {
        if words.len() != self.bits.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bitmap length does not match the file",
            ));
        }
        for (i, &w) in words.iter().enumerate() {
            let mut w = w;
            let valid = self.blocks - i as u64 * 64;
            if valid < 64 {
                w &= (1u64 << valid) - 1;
            }
            let old = self.bits[i].fetch_or(w, Ordering::AcqRel);
            self.present
                .fetch_add((w & !old).count_ones() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` from the file (held or not).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// [`BlockFile::read_at`] when every byte is in the page cache, `Ok(false)` otherwise
    /// (see [`crate::device::read_exact_at_cached`]).
    pub fn read_at_cached(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        crate::device::read_exact_at_cached(&self.file, offset, buf)
    }

    /// `[offset, offset+len)` of the file when all of it is in the page cache (see
    /// [`crate::device::BlockDevice::cached_file_runs`]).
    pub fn cached_run(&self, offset: u64, len: u64) -> Option<crate::device::FileRun<'_>> {
        crate::device::range_cached(&self.file, offset, len).then_some(crate::device::FileRun { file: &self.file, offset, len })
    }

    /// Writes `data` at `offset` into the file (marks nothing).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Makes `[offset, offset+len)` of the file read as zeros, deallocating what it can.
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_hole(&self.file, offset, len)
    }

    /// Writes explicit (allocated) zeros over `[offset, offset+len)`.
    pub fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(&self.file, offset, len)
    }

    /// The `base:allocation` state of the file's bytes from `offset` (see [`file_extent`]).
    pub fn extent(&self, offset: u64, end: u64) -> (u32, u64) {
        file_extent(&self.file, offset, end)
    }
}

/// In a bitmap of `nbits` bits held in atomic words (bit `i % 64` of word `i / 64`), from
/// bit `i` (< `limit`): its value, and the end of the run of bits with that value, at most
/// `limit` (and `nbits`).
pub(crate) fn bits_run_end(bits: &[AtomicU64], nbits: u64, i: u64, limit: u64) -> (bool, u64) {
    let limit = limit.min(nbits);
    if i >= limit {
        return (false, limit);
    }
    let v = bits[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0;
    let mut j = i + 1;
    while j < limit {
        let w = bits[(j / 64) as usize].load(Ordering::Acquire);
        // Skip whole words in the same state.
        let rest = if v { !w } else { w } >> (j % 64);
        if rest == 0 {
            j = (j / 64 + 1) * 64;
            continue;
        }
        j += rest.trailing_zeros() as u64;
        break;
    }
    (v, j.min(limit))
}

/// The `base:allocation` state of `[offset, end)` of a plain file: data (0) or hole
/// (HOLE|ZERO), and where that state ends (at most `end`).
pub fn file_extent(file: &File, offset: u64, end: u64) -> (u32, u64) {
    use crate::proto::state;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an fd we own; its file position is never used (all I/O is pread).
    let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            return (state::HOLE | state::ZERO, end);
        }
        return (0, end); // SEEK_DATA unsupported: say data
    }
    let data = data as u64;
    if data > offset {
        return (state::HOLE | state::ZERO, data.min(end));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return (0, end);
    }
    (0, (hole as u64).clamp(offset + 1, end))
}

/// [`file_extent`] for bytes that are most likely data: one `SEEK_HOLE` answers when they
/// are (`SEEK_DATA` follows only when `offset` is in a hole).
pub fn file_extent_data_first(file: &File, offset: u64, end: u64) -> (u32, u64) {
    use crate::proto::state;
    // SAFETY: lseek on an fd we own; its file position is never used (all I/O is pread).
    let hole = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            // At or past the end of the file: reads as zeros.
            return (state::HOLE | state::ZERO, end);
        }
        return (0, end); // SEEK_HOLE unsupported: say data
    }
    if hole as u64 > offset {
        return (0, (hole as u64).min(end));
    }
    file_extent(file, offset, end)
}

/// Appends to `spans` the parts of `[start, end)` of `file` that are written data, by
/// `FIEMAP` (many extents per call), neighbours merged, in order; extents allocated but
/// unwritten (they read as zeros) are left out. `Ok(false)` when the file system cannot
/// say (tmpfs, for one), with `spans` in any state.
pub fn file_data_spans(file: &File, start: u64, end: u64, spans: &mut Vec<(u64, u64)>) -> io::Result<bool> {
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        reserved: u32,
        extents: [Extent; FIEMAP_BATCH],
    }
    const FIEMAP_BATCH: usize = 128;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const EXTENT_LAST: u32 = 0x1;
    const EXTENT_UNWRITTEN: u32 = 0x800;
    let mut map = Box::new(Fiemap {
        start: 0,
        length: 0,
        flags: 0,
        mapped_extents: 0,
        extent_count: FIEMAP_BATCH as u32,
        reserved: 0,
        extents: [Extent::default(); FIEMAP_BATCH],
    });
    let mut next = start;
    while next < end {
        map.start = next;
        map.length = end - next;
        map.flags = 0;
        map.mapped_extents = 0;
        map.extent_count = FIEMAP_BATCH as u32;
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most `extent_count` extents
        // into the array that follows it, all inside `map`; `file` is open for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) } != 0 {
            return Ok(false);
        }
        let n = (map.mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            break;
        }
        let asked_from = next;
        for e in &map.extents[..n] {
            let (a, b) = (e.logical, e.logical.saturating_add(e.length));
            if e.flags & EXTENT_UNWRITTEN == 0 && b > a {
                match spans.last_mut() {
                    Some(last) if last.1 >= a => last.1 = last.1.max(b),
                    _ => spans.push((a, b)),
                }
            }
            next = next.max(b);
            if e.flags & EXTENT_LAST != 0 {
                return Ok(true);
            }
        }
        if next <= asked_from {
            // Extents that do not move on: take no answer rather than loop.
            return Ok(false);
        }
    }
    Ok(true)
}

/// Makes `[offset, offset+len)` of `file` read as zeros: a hole where the file system can
/// punch one, written zeros where it cannot.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on an fd we own.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    write_zeros(file, offset, len)
}

/// Writes explicit zeros (at most 1 MiB of them at a time).
pub fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut pos = offset;
    while pos < offset + len {
        let n = ((offset + len - pos) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(size: u64) -> (tempfile::TempDir, File) {
        let d = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("f"))
            .unwrap();
        f.set_len(size).unwrap();
        (d, f)
    }

    proptest! {
        /// The bitmap agrees with a plain `Vec<bool>` under any sequence of marks, and
        /// runs, ranges, counts and words are consistent with it.
        #[test]
        fn bitmap_matches_a_model(blocks in 1u64..300, marks in proptest::collection::vec((0u64..300, 0u64..200), 0..30)) {
            let (_d, f) = file(blocks * 10);
            let bf = BlockFile::new(f, blocks * 10 - 3, 10).unwrap();
            prop_assert_eq!(bf.blocks(), blocks);
            let mut model = vec![false; blocks as usize];
            for (a, l) in marks {
                let a = a.min(blocks);
                let b = (a + l).min(blocks);
                let mut newly = Vec::new();
                bf.mark(a, b, &mut newly);
                let mut want = Vec::new();
                for i in a..b {
                    if !model[i as usize] {
                        model[i as usize] = true;
                        match want.last_mut() {
                            Some((_, e)) if *e == i => *e = i + 1,
                            _ => want.push((i, i + 1)),
                        }
                    }
                }
                prop_assert_eq!(newly, want);
            }
            for i in 0..blocks {
                prop_assert_eq!(bf.has(i), model[i as usize]);
                let (v, e) = bf.run_end(i, blocks);
                prop_assert_eq!(v, model[i as usize]);
                prop_assert!(e > i && e <= blocks);
                prop_assert!((i..e).all(|k| model[k as usize] == v));
                prop_assert!(e == blocks || model[e as usize] != v);
            }
            prop_assert_eq!(bf.present(), model.iter().filter(|b| **b).count() as u64);
            let (_d2, f2) = file(blocks * 10);
            let copy = BlockFile::new(f2, blocks * 10 - 3, 10).unwrap();
            copy.load_words(&bf.words()).unwrap();
            prop_assert_eq!(copy.ranges(), bf.ranges());
            prop_assert_eq!(copy.present(), bf.present());
        }
    }

    #[test]
    fn data_spans_are_the_written_parts() {
        let (_d, f) = file(1 << 20);
        // Written (some synced, some still only in the page cache), and holes between.
        f.write_all_at(&[1u8; 8192], 4096).unwrap();
        f.write_all_at(&[2u8; 4096], 12288).unwrap(); // adjoins the first: one span
        f.sync_all().unwrap();
        f.write_all_at(&[3u8; 65536], 512 << 10).unwrap();
        let mut spans = Vec::new();
        if !file_data_spans(&f, 0, 1 << 20, &mut spans).unwrap() {
            eprintln!("FIEMAP not answered by this file system: nothing to check");
            return;
        }
        // File systems allocate in their own blocks: the spans cover what was written and
        // nothing far from it.
        let covers = |a: u64, b: u64| spans.iter().any(|s| s.0 <= a && b <= s.1);
        assert!(covers(4096, 16384) && covers(512 << 10, (512 << 10) + 65536), "{spans:?}");
        assert!(spans.iter().all(|s| (s.0 >= 4096 && s.1 <= 16384) || (s.0 >= 512 << 10 && s.1 <= (512 << 10) + 65536)), "{spans:?}");
        // A part of the file: the extents that overlap it.
        let mut part = Vec::new();
        assert!(file_data_spans(&f, 600 << 10, 1 << 20, &mut part).unwrap());
        assert!(part.is_empty(), "{part:?}");
    }

    #[test]
    fn ranges_of_bytes_and_extents() {
        let (_d, f) = file(1 << 20);
        let bf = BlockFile::new(f, 1 << 20, 4096).unwrap();
        assert_eq!(bf.blocks_of(4095, 2), (0, 2));
        assert_eq!(bf.blocks_of(4096, 0), (1, 1));
        assert!(bf.has_range(100, 0));
        assert!(!bf.has_range(0, 1));
        bf.write_at(8192, &[1u8; 4096]).unwrap();
        assert!(bf.mark_one(2));
        assert!(!bf.mark_one(2));
        assert!(bf.has_range(8192, 4096) && !bf.has_range(8191, 2));
        use crate::proto::state;
        assert_eq!(bf.extent(0, 1 << 20), (state::HOLE | state::ZERO, 8192));
        assert_eq!(bf.extent(8192, 1 << 20), (0, 12288));
        bf.punch(8192, 4096).unwrap();
        let mut b = [9u8; 4];
        bf.read_at(8192, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        // Words past the last block are ignored on load.
        let (_d2, f2) = file(100);
        let small = BlockFile::new(f2, 100, 10).unwrap();
        small.load_words(&[u64::MAX]).unwrap();
        assert_eq!(small.present(), 10);
        assert!(small.load_words(&[0, 0]).is_err());
    }
}

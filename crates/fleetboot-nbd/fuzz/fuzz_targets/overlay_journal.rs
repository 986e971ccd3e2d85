//! A private overlay's map journal, replayed: from bytes alone, and by opening an overlay
//! whose `map` file holds them.
//!
//! Input: byte 0 picks whether the harness writes a valid header first (so that the
//! records behind it are reached: the header carries a CRC) and whether the overlay is
//! opened from a file; byte 1 the block size (512 B .. 4 MiB); bytes 2..6 the image size;
//! the rest is the journal (or what follows the header).
//!
//! Checked: nothing panics; the valid prefix is never longer than the journal; every
//! mapped range lies inside the image; the ranges replayed, written back as one record (as
//! compaction does), replay to the same blocks with nothing torn; an overlay opened on the
//! file maps exactly the blocks the replay names, reads back the base where nothing is
//! mapped, and after a clean close its journal is whole.

#![no_main]

use fleetboot_nbd::device::MemoryDisk;
use fleetboot_nbd::overlay::{journal_bytes, replay_journal, Overlay};
use fleetboot_nbd::BlockDevice;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// Blocks named by `ranges`, sorted and merged.
fn blocks(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v = ranges.to_vec();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let flags = data[0];
    let block = 512u32 << (data[1] % 14);
    let size = u32::from_be_bytes([data[2], data[3], data[4], data[5]]) as u64;
    let body = &data[6..];
    let journal = if flags & 1 != 0 {
        let mut j = journal_bytes(block, size, &[]);
        j.extend_from_slice(body);
        j
    } else {
        body.to_vec()
    };
    let Ok(replayed) = replay_journal(&journal, block, size) else {
        return;
    };
    assert!(replayed.valid_len as usize <= journal.len());
    let nblocks = size.div_ceil(block as u64);
    for &(a, b) in &replayed.ranges {
        assert!(a < b && b <= nblocks, "range {a}..{b} of {nblocks} blocks");
    }
    let merged = blocks(&replayed.ranges);
    let compacted = journal_bytes(block, size, &merged);
    let again = replay_journal(&compacted, block, size).expect("a journal we wrote replays");
    assert_eq!(again.valid_len as usize, compacted.len());
    assert_eq!(blocks(&again.ranges), merged);

    // Opening an overlay from the file: only for images small enough to hold in memory.
    if flags & 2 == 0 || size == 0 || size > (1 << 20) {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let ov_dir = dir.path().join("ov");
    std::fs::create_dir(&ov_dir).unwrap();
    std::fs::write(ov_dir.join("map"), &journal).unwrap();
    // A base whose every byte is nonzero; the overlay's new data file holds zeros.
    let base = Arc::new(MemoryDisk::new(size as usize, false));
    let pattern: Vec<u8> = (0..size as usize).map(|i| (i as u8).wrapping_mul(7) | 1).collect();
    base.write(0, &pattern).unwrap();
    let ov = Overlay::private(base.clone(), block, &ov_dir).expect("a journal that replays opens");
    let mapped: u64 = merged.iter().map(|(a, b)| b - a).sum();
    assert_eq!(ov.mapped_blocks(), mapped);
    for b in 0..nblocks {
        let inside = merged.iter().any(|&(x, y)| x <= b && b < y);
        assert_eq!(ov.is_mapped(b), inside, "block {b}");
    }
    // Mapped blocks read from the overlay (zeros), the others from the base.
    let mut buf = vec![0u8; size as usize];
    ov.read(0, &mut buf).expect("read");
    for (i, &byte) in buf.iter().enumerate() {
        let mapped = ov.is_mapped(i as u64 / block as u64);
        assert_eq!(byte, if mapped { 0 } else { pattern[i] }, "byte {i}");
    }
    ov.close().expect("close");
    drop(ov);
    let after = std::fs::read(ov_dir.join("map")).unwrap();
    let whole = replay_journal(&after, block, size).expect("the journal after close");
    assert_eq!(whole.valid_len as usize, after.len(), "a clean close leaves no torn tail");
    assert_eq!(blocks(&whole.ranges), merged);
});

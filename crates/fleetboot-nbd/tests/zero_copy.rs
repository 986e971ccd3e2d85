//! READ data in the page cache goes from the image (or overlay) file to the socket with
//! `sendfile(2)`: the bytes a client gets are the same, in simple and structured replies,
//! for reads inside one piece, across pieces, unaligned, and across overlay blocks that a
//! client wrote (those pieces go out in runs from two files). Counted by
//! `fleetboot_nbd::server::read_bytes_sent`, which is per process: each test here is its
//! own process under nextest.

mod common;

use common::*;
use fleetboot_nbd::server::read_bytes_sent;
use fleetboot_nbd::OverlayMode;

/// (offset, length) pairs: one byte, a page boundary, a piece boundary (128 KiB), several
/// pieces unaligned, and all of the image's first 3 MiB of data at once.
const READS: &[(u64, u32)] = &[(0, 1), (4095, 2), (131_000, 1_000), (12_345, 300_000), (0, 3 << 20)];

fn read_everything(f: &Fixture, export: &str, img: &[u8]) -> u64 {
    let mut total = 0;
    for structured in [true, false] {
        let mut c = RawClient::try_connect(f.addr, export, structured).expect("connect");
        for &(off, len) in READS {
            let got = c.read(off, len);
            assert!(got == img[off as usize..][..len as usize], "{export} structured={structured}: {off}+{len} differs");
            total += len as u64;
        }
        c.disconnect();
    }
    total
}

#[test]
fn cached_reads_of_the_image_are_sent_from_the_file_byte_for_byte() {
    let f = Fixture::new(OverlayMode::Standard);
    let img = image_bytes();
    // Every data page of the image in the page cache.
    assert_eq!(std::fs::read(&f.image_path).unwrap(), img);
    let (files0, copied0) = read_bytes_sent();
    let total = read_everything(&f, "img", &img);
    let (files, copied) = read_bytes_sent();
    eprintln!("sent from the file {} B, copied {} B, data asked {total} B", files - files0, copied - copied0);
    // Headers ride along in both counts; the data of every piece here is cached.
    assert!(files - files0 >= total, "only {} of {total} B went out with sendfile", files - files0);
    assert!(copied - copied0 < total / 100, "{} B were copied", copied - copied0);
}

#[test]
fn without_sendfile_every_piece_is_copied() {
    let mut options = fleetboot_nbd::ServerOptions::new(fleetboot_nbd::Access::open_to_all());
    options.send_from_files = false;
    let f = Fixture::with_options(OverlayMode::Standard, options);
    let img = image_bytes();
    assert_eq!(std::fs::read(&f.image_path).unwrap(), img);
    let (files0, copied0) = read_bytes_sent();
    let total = read_everything(&f, "img", &img);
    let (files, copied) = read_bytes_sent();
    assert_eq!(files, files0, "sendfile used although turned off");
    assert!(copied - copied0 >= total);
}

#[test]
fn overlay_reads_mix_written_blocks_and_the_image() {
    let f = Fixture::new(OverlayMode::Standard);
    let mut img = image_bytes();
    assert_eq!(std::fs::read(&f.image_path).unwrap(), img);
    let export = "img@0c-00-00-00-00-09";
    let mut w = RawClient::connect(f.addr, export);
    // Written blocks: one unaligned patch across blocks, one whole piece later on.
    for (off, len, byte) in [(70_001usize, 200_000usize, 0xA5u8), (1 << 20, 128 << 10, 0x5A)] {
        assert_eq!(w.write(off as u64, &vec![byte; len]), 0);
        img[off..off + len].fill(byte);
    }
    assert_eq!(w.flush(), 0);
    let (files0, _) = read_bytes_sent();
    // The same client's second connection shares its overlay.
    let total = read_everything(&f, export, &img);
    let (files, _) = read_bytes_sent();
    assert!(files - files0 >= total, "only {} of {total} B went out with sendfile", files - files0);
    w.disconnect();
    f.assert_image_unchanged();
}

/// The overlay of the bench's "50 %" run, in small: every other 64 KiB block written (in the
/// image's data and in its holes), plus a patch at odd offsets. Any READ, at any offset and
/// length, in simple or structured replies, returns exactly the bytes of a model, all of them
/// sent from the two files; any BLOCK_STATUS describes the range in order and calls nothing
/// zero that is not. A READ whose bytes are all cached comes in one chunk per
/// [`fleetboot_nbd::transmission::FILE_PIECE`], not one per buffer-sized piece.
#[test]
fn reads_across_written_blocks_and_the_image_match_a_model() {
    use fleetboot_nbd::proto::{cmd, state};
    use fleetboot_nbd::transmission::FILE_PIECE;
    use proptest::prelude::*;
    let f = Fixture::new(OverlayMode::Standard);
    let mut model = image_bytes();
    assert_eq!(std::fs::read(&f.image_path).unwrap(), model);
    let export = "img@0c-00-00-00-00-0b";
    let mut structured = RawClient::connect(f.addr, export);
    const BLOCK: usize = 64 << 10;
    for (i, at) in (0..IMAGE_SIZE).step_by(2 * BLOCK).enumerate() {
        let bytes: Vec<u8> = (0..BLOCK).map(|k| (k as u8).wrapping_mul(7) ^ i as u8 ^ 0x80).collect();
        assert_eq!(structured.write(at as u64, &bytes), 0);
        model[at..at + BLOCK].copy_from_slice(&bytes);
    }
    let (patch_at, patch_len) = (1_000_003usize, 333_331usize);
    assert_eq!(structured.write(patch_at as u64, &vec![0xC3; patch_len]), 0);
    model[patch_at..patch_at + patch_len].fill(0xC3);
    assert_eq!(structured.flush(), 0);
    let simple = RawClient::try_connect(f.addr, export, false).expect("connect");

    // Whole requests in one chunk each, while every byte is in the page cache.
    let r = structured.call(cmd::READ, 0, 3 * BLOCK as u64, 4 * BLOCK as u32, &[]);
    assert!(r.error == 0 && r.data == model[3 * BLOCK..7 * BLOCK]);
    assert_eq!(r.data_chunks, 1, "a 256 KiB READ across 4 runs of 2 files");
    let r = structured.call(cmd::READ, 0, 5, (2 * FILE_PIECE + 9) as u32, &[]);
    assert!(r.error == 0 && r.data == model[5..5 + 2 * FILE_PIECE + 9]);
    assert_eq!(r.data_chunks, 3);

    let (files0, copied0) = read_bytes_sent();
    // The runner takes a `Fn`: the connections and the count live in cells.
    let asked = std::cell::Cell::new(0u64);
    let (structured, simple) = (std::cell::RefCell::new(structured), std::cell::RefCell::new(simple));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(200));
    let reads = (0..IMAGE_SIZE as u64, 1u32..(2 * FILE_PIECE as u32 + 3 * BLOCK as u32), any::<bool>());
    runner
        .run(&reads, |(offset, len, use_simple)| {
            let len = len.min((IMAGE_SIZE as u64 - offset) as u32);
            let want = &model[offset as usize..][..len as usize];
            let got = if use_simple { simple.borrow_mut().read(offset, len) } else { structured.borrow_mut().read(offset, len) };
            prop_assert!(got == want, "READ {}+{} (simple replies: {})", offset, len, use_simple);
            asked.set(asked.get() + len as u64);
            let r = structured.borrow_mut().call(cmd::BLOCK_STATUS, 0, offset, len, &[]);
            prop_assert_eq!(r.error, 0);
            let mut at = offset as usize;
            for &(l, flags) in &r.extents {
                prop_assert!(l > 0);
                let end = (at + l as usize).min(offset as usize + len as usize);
                if flags & state::ZERO != 0 {
                    prop_assert!(model[at..end].iter().all(|b| *b == 0), "{}+{} called zero", at, l);
                }
                at += l as usize;
            }
            prop_assert!(at > offset as usize, "BLOCK_STATUS described nothing");
            Ok(())
        })
        .unwrap();
    let (files, copied) = read_bytes_sent();
    let asked = asked.get();
    assert!(files - files0 >= asked, "only {} of {asked} B went out with sendfile", files - files0);
    assert!(copied - copied0 < asked / 100, "{} B were copied", copied - copied0);
    structured.into_inner().disconnect();
    simple.into_inner().disconnect();
    f.assert_image_unchanged();
}

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

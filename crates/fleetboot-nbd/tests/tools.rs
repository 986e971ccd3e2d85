//! Real NBD clients against fleetboot on 127.0.0.1: nbdinfo, nbdcopy (libnbd), qemu-img
//! (info, convert, compare) and qemu-io. Skipped with a message when a tool is missing,
//! failed instead under FLEETBOOT_REQUIRE_E2E=1.

mod common;

use common::*;
use fleetboot_nbd::OverlayMode;
use std::process::Command;
use std::time::Duration;

#[test]
fn nbdinfo_lists_describes_and_maps() {
    if !have("nbdinfo") {
        return;
    }
    let f = Fixture::new(OverlayMode::Standard);
    let out = run(Command::new("nbdinfo").args(["--json", &f.uri("img")]));
    assert!(
        out.contains(&format!("\"export-size\": {IMAGE_SIZE}")),
        "{out}"
    );
    assert!(out.contains("\"is_read_only\": true"), "{out}");
    assert!(out.contains("\"can_multi_conn\": true"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    let out = run(Command::new("nbdinfo").args(["--json", &f.uri("img@aa-00-00-00-00-01")]));
    assert!(out.contains("\"is_read_only\": false"), "{out}");
    let out = run(Command::new("nbdinfo").args(["--list", &f.uri("")]));
    assert!(
        out.contains("export=\"img\"") || out.contains("img"),
        "{out}"
    );
    assert!(out.contains("img:1"), "{out}");
    // The map shows the image's data and holes.
    let out = run(Command::new("nbdinfo").args(["--map", &f.uri("img")]));
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["0", "3145728", "0"], "{out}");
    assert_eq!(lines[1][..3], ["3145728", "3145728", "3"], "{out}");
    f.assert_image_unchanged();
}

#[test]
fn nbdcopy_and_qemu_img_read_the_image() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let f = Fixture::new(OverlayMode::Standard);
    let out = f.dir.path().join("copy.raw");
    run(Command::new("nbdcopy").args([&f.uri("img"), out.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out).unwrap(), image_bytes());
    // Through a client overlay too (nbdcopy opens several connections: multi-conn).
    let out2 = f.dir.path().join("copy2.raw");
    run(Command::new("nbdcopy").args([
        "--connections=4",
        &f.uri("img@aa-00-00-00-00-01"),
        out2.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&out2).unwrap(), image_bytes());

    let info = run(Command::new("qemu-img").args(["info", "--output=json", &f.uri("img")]));
    assert!(
        info.contains(&format!("\"virtual-size\": {IMAGE_SIZE}")),
        "{info}"
    );
    let q = f.dir.path().join("out.qcow2");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &f.uri("img"),
        q.to_str().unwrap(),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &f.uri("img"),
        q.to_str().unwrap(),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &f.uri("img"),
        f.image_path.to_str().unwrap(),
    ]));
    f.assert_image_unchanged();
}

#[test]
fn qemu_io_writes_stay_with_their_client() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let f = Fixture::new(OverlayMode::Private);
    let aa = f.uri("img@aa-00-00-00-00-01");
    let bb = f.uri("img@bb-00-00-00-00-02");
    // Aligned and unaligned writes (read-modify-write of partial blocks), zeroes, discard.
    let (ok, out) = qemu_io(
        &aa,
        &[
            "write -P 0xaa 0 64k",
            "write -P 0xab 100001 3000",
            "write -z 6M 128k",
            "discard 2M 64k",
            "flush",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(
        &aa,
        &[
            "read -P 0xaa 0 64k",
            "read -P 0xab 100001 3000",
            "read -P 0 6M 128k",
        ],
    );
    assert!(ok, "{out}");
    // Another client sees the image, not aa's writes.
    let (ok, _) = qemu_io(&bb, &["read -P 0xaa 0 64k"]);
    assert!(!ok, "bb must not see aa's data");
    let (ok, out) = qemu_io(&f.uri("img"), &["read -P 0xaa 0 64k"]);
    assert!(!ok, "the shared export must not see aa's data: {out}");
    // Byte for byte: aa = image + its writes (outside the discarded range); bb = image.
    let mut want = image_bytes();
    want[..65536].fill(0xaa);
    want[100001..103001].fill(0xab);
    want[6 << 20..(6 << 20) + (128 << 10)].fill(0);
    let got = f.dir.path().join("aa.raw");
    run(Command::new("nbdcopy").args([&aa, got.to_str().unwrap()]));
    let got = std::fs::read(&got).unwrap();
    assert_eq!(got[..2 << 20], want[..2 << 20]);
    assert_eq!(got[(2 << 20) + 65536..], want[(2 << 20) + 65536..]);
    let gotb = f.dir.path().join("bb.raw");
    run(Command::new("nbdcopy").args([&bb, gotb.to_str().unwrap()]));
    assert_eq!(std::fs::read(&gotb).unwrap(), image_bytes());
    // qemu-img compare agrees: aa differs from the image, bb does not.
    let st = Command::new("qemu-img")
        .args([
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            &aa,
            f.image_path.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1), "aa differs from the image");
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &bb,
        f.image_path.to_str().unwrap(),
    ]));
    // qemu-io cannot write the read-only export.
    let (ok, _) = qemu_io(&f.uri("img"), &["write -P 0x11 0 4k"]);
    assert!(!ok);
    f.assert_image_unchanged();
}

#[test]
fn standard_overlay_is_gone_after_disconnect() {
    if !have("qemu-io") {
        return;
    }
    let f = Fixture::new(OverlayMode::Standard);
    let aa = f.uri("img@aa-00-00-00-00-01");
    let (ok, out) = qemu_io(&aa, &["write -P 0xaa 0 64k", "flush", "read -P 0xaa 0 64k"]);
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(100));
    let (ok, _) = qemu_io(&aa, &["read -P 0xaa 0 64k"]);
    assert!(!ok, "a standard overlay must be discarded on disconnect");
    let (ok, out) = qemu_io(&aa, &[&format!("read -P {} 3M 64k", 0)]);
    assert!(ok, "{out}");
    f.assert_image_unchanged();
}

#[test]
fn private_overlay_is_kept_across_reconnects() {
    if !have("qemu-io") {
        return;
    }
    let f = Fixture::new(OverlayMode::Private);
    let aa = f.uri("img@aa-00-00-00-00-01");
    let (ok, out) = qemu_io(&aa, &["write -P 0x5a 1M 1M"]);
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(100));
    let (ok, out) = qemu_io(&aa, &["read -P 0x5a 1M 1M"]);
    assert!(ok, "{out}");
    let (ok, _) = qemu_io(&f.uri("img@aa-00-00-00-00-02"), &["read -P 0x5a 1M 1M"]);
    assert!(!ok);
    f.assert_image_unchanged();
}

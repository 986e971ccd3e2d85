//! Real NBD clients against fleetboot on 127.0.0.1: nbdinfo, nbdcopy (libnbd), qemu-img
//! (info, convert, compare) and qemu-io. A missing tool is a skip through the one gate
//! (`fleetboot_lab::gate`), a failure under FLEETBOOT_REQUIRE_E2E=1.

mod common;

use common::*;
use fleetboot_images::ImportOptions;
use fleetboot_nbd::OverlayMode;
use std::process::Command;
use std::time::Duration;

/// How long the server may take to release a client's overlay after qemu-io exits.
const RELEASE: Duration = Duration::from_secs(10);

#[test]
fn nbdinfo_lists_describes_and_maps() {
    if !tools_ready("nbdinfo_lists_describes_and_maps", &["nbdinfo"]) {
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
    assert!(out.contains("\"can_cache\": true"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    let out = run(Command::new("nbdinfo").args(["--json", &f.uri("img@aa-00-00-00-00-01")]));
    assert!(out.contains("\"is_read_only\": false"), "{out}");
    assert!(out.contains("\"can_fast_zero\": true"), "{out}");
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

/// `nbdinfo --list` shows every image of the catalog twice — by name (its latest version)
/// and by `NAME:VERSION` — each with its size, its description (the version and the
/// SHA-256 a client can check) and read-only, since no export name here names a client.
#[test]
fn nbdinfo_list_shows_every_image_and_version() {
    if !tools_ready("nbdinfo_list_shows_every_image_and_version", &["nbdinfo"]) {
        return;
    }
    let f = Fixture::new(OverlayMode::Standard);
    // A second version of `img` (half the size) and another image.
    let src = f.dir.path().join("v2.raw");
    std::fs::write(&src, &image_bytes()[..IMAGE_SIZE / 2]).unwrap();
    let import = |name: &str| {
        f.catalog
            .import(
                &src,
                &ImportOptions {
                    name: Some(name.into()),
                    format: Some("raw".into()),
                },
                &mut |_| {},
            )
            .unwrap()
    };
    let v2 = import("img");
    let other = import("tiny");
    let v1 = f.catalog.resolve("img:1").unwrap();

    let out = run(Command::new("nbdinfo").args(["--list", "--json", &f.uri("")]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let exports = json["exports"].as_array().unwrap_or_else(|| panic!("{out}"));
    let got: Vec<(String, String, u64, bool)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["description"].as_str().unwrap_or("").to_string(),
                e["export-size"].as_u64().unwrap(),
                e["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    let half = (IMAGE_SIZE / 2) as u64;
    let full = IMAGE_SIZE as u64;
    let latest = |r: &str| format!("{r} (latest, {half} bytes)");
    let version = |size: u64, sha: &str| format!("{size} bytes, sha256 {sha}");
    let want = vec![
        ("img".to_string(), latest("img:2"), half, true),
        ("tiny".to_string(), latest("tiny:1"), half, true),
        ("img:1".to_string(), version(full, &v1.sha256), full, true),
        ("img:2".to_string(), version(half, &v2.sha256), half, true),
        ("tiny:1".to_string(), version(half, &other.sha256), half, true),
    ];
    assert_eq!(got, want, "{out}");
}

#[test]
fn nbdcopy_and_qemu_img_read_the_image() {
    if !tools_ready("nbdcopy_and_qemu_img_read_the_image", &["nbdcopy", "qemu-img"]) {
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
    // And written: qemu-img convert onto a client's overlay (zeroes, fast zeroes, writes).
    let target = f.uri("img@cc-00-00-00-00-03");
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "qcow2",
        "-O",
        "raw",
        q.to_str().unwrap(),
        &target,
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &target,
        f.image_path.to_str().unwrap(),
    ]));
    f.assert_image_unchanged();
}

#[test]
fn qemu_io_writes_stay_with_their_client() {
    if !tools_ready("qemu_io_writes_stay_with_their_client", &["qemu-io", "nbdcopy", "qemu-img"]) {
        return;
    }
    let f = Fixture::new(OverlayMode::Private);
    let aa = f.uri("img@aa-00-00-00-00-01");
    let bb = f.uri("img@bb-00-00-00-00-02");
    // Aligned and unaligned writes (read-modify-write of partial blocks), zeroes, discard.
    let (r, out) = qemu_io(
        &aa,
        &[
            "write -P 0xaa 0 64k",
            "write -P 0xab 100001 3000",
            "write -z 6M 128k",
            "discard 2M 64k",
            "flush",
        ],
    );
    assert_eq!(r, QemuIo::Ok, "{out}");
    let (r, out) = qemu_io(
        &aa,
        &[
            "read -P 0xaa 0 64k",
            "read -P 0xab 100001 3000",
            "read -P 0 6M 128k",
        ],
    );
    assert_eq!(r, QemuIo::Ok, "{out}");
    // Another client sees the image, not aa's writes: the read works and the bytes differ.
    let (r, out) = qemu_io(&bb, &["read -P 0xaa 0 64k"]);
    assert_eq!(r, QemuIo::PatternMismatch, "bb must not see aa's data: {out}");
    let (r, out) = qemu_io_read_only(&f.uri("img"), &["read -P 0xaa 0 64k"]);
    assert_eq!(
        r,
        QemuIo::PatternMismatch,
        "the shared export must not see aa's data: {out}"
    );
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
    // The read-only export cannot be opened for writing: the server says it is read-only,
    // so qemu refuses with EPERM itself (a WRITE sent anyway gets EPERM from the server:
    // protocol.rs). Not a connection failure.
    let (r, out) = qemu_io(&f.uri("img"), &["write -P 0x11 0 4k"]);
    assert_eq!(
        r,
        QemuIo::OpenRefused("Permission denied".into()),
        "{out}"
    );
    f.assert_image_unchanged();
}

#[test]
fn standard_overlay_is_gone_after_disconnect() {
    if !tools_ready("standard_overlay_is_gone_after_disconnect", &["qemu-io"]) {
        return;
    }
    let f = Fixture::new(OverlayMode::Standard);
    let aa = f.uri("img@aa-00-00-00-00-01");
    let (r, out) = qemu_io(&aa, &["write -P 0xaa 0 64k", "flush", "read -P 0xaa 0 64k"]);
    assert_eq!(r, QemuIo::Ok, "{out}");
    f.wait_released("aa-00-00-00-00-01", RELEASE);
    let (r, out) = qemu_io(&aa, &["read -P 0xaa 0 64k"]);
    assert_eq!(
        r,
        QemuIo::PatternMismatch,
        "a standard overlay must be discarded on disconnect: {out}"
    );
    let (r, out) = qemu_io(&aa, &[&format!("read -P {} 3M 64k", 0)]);
    assert_eq!(r, QemuIo::Ok, "{out}");
    f.assert_image_unchanged();
}

#[test]
fn private_overlay_is_kept_across_reconnects() {
    if !tools_ready("private_overlay_is_kept_across_reconnects", &["qemu-io"]) {
        return;
    }
    let f = Fixture::new(OverlayMode::Private);
    let aa = f.uri("img@aa-00-00-00-00-01");
    let (r, out) = qemu_io(&aa, &["write -P 0x5a 1M 1M"]);
    assert_eq!(r, QemuIo::Ok, "{out}");
    // Released (flushed and closed), then opened again from disk.
    f.wait_released("aa-00-00-00-00-01", RELEASE);
    let (r, out) = qemu_io(&aa, &["read -P 0x5a 1M 1M"]);
    assert_eq!(r, QemuIo::Ok, "{out}");
    let (r, out) = qemu_io(&f.uri("img@aa-00-00-00-00-02"), &["read -P 0x5a 1M 1M"]);
    assert_eq!(r, QemuIo::PatternMismatch, "{out}");
    f.assert_image_unchanged();
}

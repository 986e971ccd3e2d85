//! The catalog against real files: raw and qcow2 imports, versions, dedup, removal.

use fleetboot_images::{Catalog, Error, ImportOptions, Phase};
use std::path::Path;
use std::process::Command;

fn write_file(path: &Path, len: usize, seed: u8) {
    let mut v = vec![0u8; len];
    // Some data, some zero MiBs (to be stored as holes).
    for (i, b) in v.iter_mut().enumerate().take(len / 2) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    std::fs::write(path, v).unwrap();
}

fn sha(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(std::fs::read(path).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn import_versions_dedup_remove() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open_dir(dir.path()).unwrap();
    let a = dir.path().join("disk-a.raw");
    let b = dir.path().join("disk-b.img");
    write_file(&a, 4 << 20, 1);
    write_file(&b, 3 << 20, 2);

    let mut seen = Vec::new();
    let v1 = cat
        .import(
            &a,
            &ImportOptions {
                name: Some("deb".into()),
                format: None,
            },
            &mut |p| seen.push(p),
        )
        .unwrap();
    assert_eq!((v1.name.as_str(), v1.version, v1.size), ("deb", 1, 4 << 20));
    assert_eq!(v1.sha256, sha(&a));
    assert_eq!(v1.source_format, "raw");
    // The source is copied, then the stored copy read back whole.
    assert!(seen
        .iter()
        .all(|p| matches!(p.phase, Phase::Copy | Phase::Verify) && p.total == 4 << 20));
    let copied = seen.iter().rfind(|p| p.phase == Phase::Copy).unwrap();
    assert_eq!(copied.done, 4 << 20);
    assert_eq!(seen.last().unwrap(), &fleetboot_images::Progress { phase: Phase::Verify, done: 4 << 20, total: 4 << 20 });
    let blob = cat.blob_path(&v1.sha256);
    assert_eq!(sha(&blob), v1.sha256);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&blob).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert!(meta.blocks() * 512 < 4 << 20, "zero MiBs are holes");

    let v2 = cat
        .import(
            &b,
            &ImportOptions {
                name: Some("deb".into()),
                format: None,
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(v2.version, 2);
    // Same content under another name shares the file.
    let o = cat
        .import(&a, &ImportOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!((o.name.as_str(), o.version), ("disk-a", 1));
    assert_eq!(o.sha256, v1.sha256);

    assert_eq!(cat.resolve("deb").unwrap(), v2);
    assert_eq!(cat.resolve("deb:1").unwrap(), v1);
    assert!(matches!(cat.resolve("deb:9"), Err(Error::NotFound(_))));
    assert_eq!(cat.show("deb").unwrap(), vec![v1.clone(), v2.clone()]);
    assert_eq!(cat.list().unwrap().len(), 3);
    let img = cat.open("deb:1").unwrap();
    assert_eq!(img.size, 4 << 20);
    assert_eq!(img.path, blob);

    // Removing deb:1 keeps the shared file (disk-a still uses it); removing disk-a deletes it.
    assert_eq!(cat.remove("deb:1").unwrap(), vec![v1.clone()]);
    assert!(blob.exists());
    cat.remove("disk-a").unwrap();
    assert!(!blob.exists());
    // The next version after a removal never reuses a live number.
    let v3 = cat
        .import(
            &a,
            &ImportOptions {
                name: Some("deb".into()),
                format: None,
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(v3.version, 3);
    cat.remove("deb").unwrap();
    assert!(cat.list().unwrap().is_empty());
    assert!(matches!(cat.remove("deb"), Err(Error::NotFound(_))));
    // Nothing left behind in tmp/.
    assert_eq!(
        std::fs::read_dir(cat.root().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open_dir(dir.path()).unwrap();
    let a = dir.path().join("a.raw");
    write_file(&a, 4096, 1);
    for bad in ["a/b", "..", "x@y", "x:1", ""] {
        let r = cat.import(
            &a,
            &ImportOptions {
                name: Some(bad.into()),
                format: None,
            },
            &mut |_| {},
        );
        assert!(matches!(r, Err(Error::InvalidName(_))), "{bad}: {r:?}");
    }
}

#[test]
fn qcow2_import_converts_to_raw() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        if std::env::var("FLEETBOOT_REQUIRE_E2E").as_deref() == Ok("1") {
            panic!("qemu-img missing");
        }
        eprintln!("SKIP: qemu-img not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open_dir(dir.path()).unwrap();
    let raw = dir.path().join("src.raw");
    write_file(&raw, 2 << 20, 7);
    let q = dir.path().join("src.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q)
        .status()
        .unwrap();
    assert!(st.success());
    let mut phases = Vec::new();
    let v = cat
        .import(&q, &ImportOptions::default(), &mut |p| phases.push(p.phase))
        .unwrap();
    assert_eq!(v.source_format, "qcow2");
    assert_eq!(v.name, "src");
    assert_eq!(v.sha256, sha(&raw), "the catalog holds the raw bytes");
    assert!(phases.contains(&Phase::Convert) && phases.contains(&Phase::Hash));
}

#[test]
fn catalog_entries_are_checked_before_they_become_paths() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open_dir(dir.path()).unwrap();
    let a = dir.path().join("a.raw");
    write_file(&a, 64 << 10, 3);
    let v = cat.import(&a, &ImportOptions::default(), &mut |_| {}).unwrap();
    let path = cat.root().join("catalog.json");
    let good = std::fs::read_to_string(&path).unwrap();
    for (what, bad_sha) in [
        ("a path", "../../../../etc/passwd".to_string()),
        ("upper case", v.sha256.to_ascii_uppercase()),
        ("too short", v.sha256[..63].to_string()),
        ("a slash inside", format!("{}/x", &v.sha256[..62])),
    ] {
        std::fs::write(&path, good.replace(&v.sha256, &bad_sha)).unwrap();
        for r in [cat.resolve("a").map(|_| ()), cat.open("a").map(|_| ()), cat.list().map(|_| ())] {
            match r {
                Err(Error::Corrupt { message, .. }) => assert!(message.contains("sha256"), "{what}: {message}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }
    std::fs::write(&path, good.replace("\"version\": 1", "\"version\": 0")).unwrap();
    assert!(matches!(cat.list(), Err(Error::Corrupt { .. })));
    std::fs::write(&path, &good).unwrap();
    assert_eq!(cat.resolve("a").unwrap(), v);
    // An ImageVersion from elsewhere is checked too.
    let mut forged = v.clone();
    forged.sha256 = "../catalog.json".into();
    assert!(matches!(cat.open_version(forged), Err(Error::Corrupt { .. })));
}

#[test]
fn leftovers_of_killed_imports_go_and_running_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open_dir(dir.path()).unwrap();
    let tmp = cat.root().join("tmp");
    // What a killed import leaves: an unlocked file.
    std::fs::write(tmp.join("import-1-1"), vec![7u8; 4096]).unwrap();
    // A running import (another process) holds a lock on its file.
    let running = tmp.join("import-2-2");
    std::fs::write(&running, b"in progress").unwrap();
    let held = std::fs::File::open(&running).unwrap();
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on an fd this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    assert_eq!(cat.remove_leftovers().unwrap(), 1);
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("import-2-2")]);
    drop(held);
    // The first open of a catalog by a process cleans by itself (this data_dir is new to it).
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("images/tmp")).unwrap();
    std::fs::write(other.path().join("images/tmp/import-3-3"), b"x").unwrap();
    let c2 = Catalog::open_dir(other.path()).unwrap();
    assert_eq!(std::fs::read_dir(c2.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn verify_finds_corrupt_missing_and_resized_images() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open_dir(dir.path()).unwrap();
    let (a, b, c) = (dir.path().join("a.raw"), dir.path().join("b.raw"), dir.path().join("c.raw"));
    write_file(&a, 3 << 20, 1);
    write_file(&b, 2 << 20, 2);
    write_file(&c, 1 << 20, 3);
    let named = |n: &str| ImportOptions { name: Some(n.into()), format: None };
    let va = cat.import(&a, &named("a"), &mut |_| {}).unwrap();
    let va2 = cat.import(&a, &named("a2"), &mut |_| {}).unwrap();
    let vb = cat.import(&b, &named("b"), &mut |_| {}).unwrap();
    let vc = cat.import(&c, &named("c"), &mut |_| {}).unwrap();
    let all = cat.verify(None, &mut |_| {}).unwrap();
    assert_eq!(all.len(), 3, "one entry per stored file: {all:?}");
    assert!(all.iter().all(|s| s.outcome.is_intact()), "{all:?}");
    let shared = all.iter().find(|s| s.sha256 == va.sha256).unwrap();
    assert_eq!(shared.used_by, vec![va.reference(), va2.reference()]);

    use std::os::unix::fs::PermissionsExt;
    let blob_a = cat.blob_path(&va.sha256);
    std::fs::set_permissions(&blob_a, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&blob_a).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"\xff", 12345).unwrap();
    drop(f);
    std::fs::remove_file(cat.blob_path(&vb.sha256)).unwrap();
    let blob_c = cat.blob_path(&vc.sha256);
    std::fs::set_permissions(&blob_c, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&blob_c).unwrap().set_len(4096).unwrap();
    let all = cat.verify(None, &mut |_| {}).unwrap();
    let of = |sha: &str| all.iter().find(|s| s.sha256 == sha).unwrap().outcome.clone();
    assert!(matches!(of(&va.sha256), fleetboot_images::Outcome::Corrupt(found) if found != va.sha256));
    assert_eq!(of(&vb.sha256), fleetboot_images::Outcome::Missing);
    assert_eq!(of(&vc.sha256), fleetboot_images::Outcome::WrongSize(4096));
    // One name only; an unknown one is an error.
    let one = cat.verify(Some("b"), &mut |_| {}).unwrap();
    assert_eq!(one.len(), 1);
    assert!(matches!(cat.verify(Some("nothing"), &mut |_| {}), Err(Error::NotFound(_))));
    // Importing the same content again repairs the corrupt file.
    cat.import(&a, &named("a3"), &mut |_| {}).unwrap();
    assert_eq!(sha(&blob_a), va.sha256);
}

#[test]
fn an_import_that_cannot_update_the_catalog_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cat = Catalog::open_dir(dir.path()).unwrap();
    let a = dir.path().join("a.raw");
    write_file(&a, 2 << 20, 9);
    let before = cat.import(&a, &ImportOptions { name: Some("kept".into()), format: None }, &mut |_| {}).unwrap();
    let json = std::fs::read(cat.root().join("catalog.json")).unwrap();
    let b = dir.path().join("b.raw");
    write_file(&b, 1 << 20, 4);
    // Writing the new catalog fails (here: its temporary name is taken by a directory).
    std::fs::create_dir(cat.root().join("catalog.json.tmp")).unwrap();
    let r = cat.import(&b, &ImportOptions { name: Some("new".into()), format: None }, &mut |_| {});
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert_eq!(std::fs::read(cat.root().join("catalog.json")).unwrap(), json, "catalog.json changed");
    let blobs: Vec<_> = std::fs::read_dir(cat.root().join("sha256")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(blobs, vec![std::ffi::OsString::from(&before.sha256)], "the failed import's file stayed");
    assert_eq!(std::fs::read_dir(cat.root().join("tmp")).unwrap().count(), 0);
}

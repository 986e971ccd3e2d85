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
    assert!(seen
        .iter()
        .all(|p| p.phase == Phase::Copy && p.total == 4 << 20));
    assert_eq!(seen.last().unwrap().done, 4 << 20);
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

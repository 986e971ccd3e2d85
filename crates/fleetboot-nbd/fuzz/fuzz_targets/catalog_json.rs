//! `catalog.json` as the catalog reads it: arbitrary bytes through
//! `fleetboot_images::parse_catalog`, and through a real catalog directory holding them.
//!
//! Checked: nothing panics; every entry of an accepted file has a valid name, a version
//! from 1 and a SHA-256 of 64 lower-case hex digits, so the path it becomes is a direct
//! child of `images/sha256/`; the catalog resolves each accepted `NAME:VERSION` to that
//! entry and refuses to open any file outside `sha256/`.

#![no_main]

use fleetboot_images::{is_sha256_hex, parse_catalog, validate_name, Catalog};
use libfuzzer_sys::fuzz_target;
use std::path::Component;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_catalog(data);
    if let Ok(images) = &parsed {
        for v in images {
            assert!(validate_name(&v.name).is_ok(), "{:?}", v.name);
            assert!(v.version >= 1);
            assert!(is_sha256_hex(&v.sha256), "{:?}", v.sha256);
        }
    }
    // The same bytes as a catalog on disk.
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let catalog = Catalog::open_dir(dir.path()).unwrap();
    std::fs::write(catalog.root().join("catalog.json"), data).unwrap();
    let listed = catalog.list();
    assert_eq!(listed.is_ok(), parsed.is_ok());
    let Ok(images) = listed else { return };
    let blobs = catalog.root().join("sha256");
    for v in images.iter().take(16) {
        let path = catalog.blob_path(&v.sha256);
        let rest = path.strip_prefix(&blobs).expect("under sha256/");
        let parts: Vec<_> = rest.components().collect();
        assert!(matches!(parts.as_slice(), [Component::Normal(_)]), "{}", path.display());
        let found = catalog.resolve(&v.reference()).expect("an accepted entry resolves");
        assert_eq!(found.sha256, v.sha256);
        // No such file was imported: opening fails with "not found", never elsewhere.
        assert!(catalog.open_version(found).is_err());
    }
});

//! `fleetboot image remove` from the command line, on a real catalog directory: removing
//! one version keeps the others and any content another version still uses; removing a
//! name removes all its versions; unknown names, versions and malformed references are
//! refused with a non-zero exit and leave the catalog as it was; after every step the
//! blobs under `images/sha256/` are exactly the contents `catalog.json` refers to.
//! Local files only (no root, no network).

mod common;

use common::{base_config, TestDir, BIN};
use fleetboot_lab::netns::output_with_timeout;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Cli {
    config: PathBuf,
    images: PathBuf,
}

impl Cli {
    fn new(dir: &TestDir) -> Cli {
        let config = dir.join("fb.toml");
        std::fs::write(&config, base_config(&dir.path)).unwrap();
        Cli {
            config,
            images: dir.join("data/images"),
        }
    }

    /// `fleetboot image ARGS --config CFG`: (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut c = Command::new(BIN);
        c.arg("image").args(args).arg("--config").arg(&self.config);
        let out = output_with_timeout(c, Duration::from_secs(60)).expect("running fleetboot image");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "fleetboot image {args:?} failed:\n{out}\n{err}");
        out
    }

    /// `image list --json` as (reference, sha256), sorted.
    fn listed(&self) -> BTreeSet<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["list", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    format!("{}:{}", i["name"].as_str().unwrap(), i["version"]),
                    i["sha256"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// The listing is what `catalog.json` holds, and the blobs on disk are exactly the
    /// contents it refers to: nothing orphaned, nothing missing.
    fn assert_consistent(&self, want: &[(&str, &str)]) {
        let listed = self.listed();
        let want: BTreeSet<(String, String)> =
            want.iter().map(|(r, s)| (r.to_string(), s.to_string())).collect();
        assert_eq!(listed, want, "image list");
        let blobs: BTreeSet<String> = std::fs::read_dir(self.images.join("sha256"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let referenced: BTreeSet<String> = want.iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(blobs, referenced, "blobs under images/sha256 vs the catalog");
        let catalog: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.images.join("catalog.json")).unwrap())
                .expect("catalog.json is valid JSON");
        assert!(catalog.is_object(), "{catalog}");
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn write(path: &Path, data: &[u8]) -> String {
    std::fs::write(path, data).unwrap();
    path.display().to_string()
}

#[test]
fn image_remove_versions_names_and_refusals() {
    let dir = TestDir::new("image-cli");
    let cli = Cli::new(&dir);
    let a = common::random_bytes(0xa, 96 * 1024);
    let b = common::random_bytes(0xb, 64 * 1024 + 512);
    let (sa, sb) = (sha256_hex(&a), sha256_hex(&b));
    let fa = write(&dir.join("a.raw"), &a);
    let fb = write(&dir.join("b.raw"), &b);
    // disk:1 = A, disk:2 = B, other:1 = A (shares disk:1's content).
    cli.ok(&["import", &fa, "--name", "disk", "--format", "raw"]);
    cli.ok(&["import", &fb, "--name", "disk", "--format", "raw"]);
    cli.ok(&["import", &fa, "--name", "other", "--format", "raw"]);
    cli.assert_consistent(&[("disk:1", &sa), ("disk:2", &sb), ("other:1", &sa)]);

    // Refusals: nothing changes.
    for bad in ["disk:7", "nosuch", "nosuch:1", "disk:", "../disk", "disk:x"] {
        let (ok, out, err) = cli.run(&["remove", bad]);
        assert!(!ok, "`image remove {bad}` succeeded: {out}");
        assert!(
            err.contains(bad.split(':').next().unwrap()) || err.contains("invalid"),
            "`image remove {bad}` did not say what it refused: {err}"
        );
        cli.assert_consistent(&[("disk:1", &sa), ("disk:2", &sb), ("other:1", &sa)]);
    }

    // One version: disk:1 goes, its content stays for other:1.
    let out = cli.ok(&["remove", "disk:1"]);
    assert_eq!(out.trim(), format!("removed disk:1 (sha256 {sa})"));
    cli.assert_consistent(&[("disk:2", &sb), ("other:1", &sa)]);
    let (ok, _, _) = cli.run(&["remove", "disk:1"]);
    assert!(!ok, "removing disk:1 twice succeeded");

    // A whole name: every version of disk, and B's content with it.
    cli.ok(&["import", &fa, "--name", "disk", "--format", "raw"]);
    cli.assert_consistent(&[("disk:2", &sb), ("disk:3", &sa), ("other:1", &sa)]);
    let out = cli.ok(&["remove", "disk"]);
    let removed: BTreeSet<&str> = out.lines().collect();
    let want_removed = [
        format!("removed disk:2 (sha256 {sb})"),
        format!("removed disk:3 (sha256 {sa})"),
    ];
    assert_eq!(removed, want_removed.iter().map(String::as_str).collect(), "{out}");
    cli.assert_consistent(&[("other:1", &sa)]);
    assert!(!cli.ok(&["show", "other"]).is_empty());
    let (ok, _, _) = cli.run(&["show", "disk"]);
    assert!(!ok, "`image show disk` after removing it");

    // The last one: an empty catalog, no blobs.
    cli.ok(&["remove", "other"]);
    cli.assert_consistent(&[]);
}

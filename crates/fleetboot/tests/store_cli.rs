//! `fleetboot store check|migrate` from the command line, on the default SQLite store and
//! on a private PostgreSQL cluster (skipped without PostgreSQL unless
//! FLEETBOOT_REQUIRE_E2E=1): check refuses a schema that is behind and changes nothing,
//! migrate brings it to this fleetboot's version once, then check passes; on PostgreSQL,
//! `fleetboot token` and `fleetboot audit` use that database too.

mod common;

use common::{base_config, TestDir, BIN};
use fleetboot_lab::netns::output_with_timeout;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `fleetboot store ARGS --config CFG`: (success, stdout + stderr).
fn store(config: &Path, args: &[&str]) -> (bool, String) {
    let mut c = Command::new(BIN);
    c.arg("store").args(args).arg("--config").arg(config);
    let out = output_with_timeout(c, Duration::from_secs(120)).expect("running fleetboot store");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn check_then_migrate(config: &Path, backend: &str) {
    let (ok, out) = store(config, &["check"]);
    assert!(!ok && out.contains("schema version 0") && out.contains("behind"), "{backend}: check of a new store:\n{out}");
    let (ok, again) = store(config, &["check"]);
    assert!(!ok && again.contains("schema version 0"), "{backend}: check changed the store:\n{again}");

    let (ok, out) = store(config, &["migrate"]);
    assert!(ok && out.starts_with(backend) && out.contains("schema version 0 -> "), "{backend}: migrate:\n{out}");
    let (ok, out) = store(config, &["migrate"]);
    assert!(ok && out.contains("nothing to do"), "{backend}: second migrate:\n{out}");
    let (ok, out) = store(config, &["check"]);
    assert!(ok && out.starts_with(backend), "{backend}: check after migrate:\n{out}");
}

#[test]
fn sqlite_store_check_and_migrate() {
    let dir = TestDir::new("store-cli-sqlite");
    let config = dir.join("fb.toml");
    std::fs::write(&config, base_config(&dir.path)).unwrap();
    check_then_migrate(&config, "sqlite");
    assert!(dir.join("data/fleetboot.db").exists());
}

#[test]
fn postgresql_store_check_and_migrate() {
    if !fleetboot_store::testing::ready("postgresql_store_check_and_migrate") {
        return;
    }
    let pg = fleetboot_store::testing::PgCluster::start(Default::default()).unwrap();
    let dir = TestDir::new("store-cli-pg");
    let config = dir.join("fb.toml");
    let store = format!("\n[store]\nurl = {:?}\nmigrate = \"manual\"\n", pg.url());
    std::fs::write(&config, base_config(&dir.path) + &store).unwrap();
    check_then_migrate(&config, "postgresql");

    // Tokens and the audit log go to the store the servers read, not to a local file.
    let run = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args).arg("--config").arg(&config);
        let out = output_with_timeout(c, Duration::from_secs(120)).expect("running fleetboot");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "fleetboot {args:?}:\n{text}");
        text
    };
    run(&["token", "create", "--role", "read", "--name", "ci-pg"]);
    assert!(run(&["token", "list"]).contains("ci-pg"));
    assert!(run(&["audit"]).contains("ci-pg"), "the token's creation is in the audit log");
    assert!(!dir.join("data/fleetboot.db").exists(), "a PostgreSQL store made an SQLite file");
}

//! Whether this machine can run an end-to-end test, decided the same way everywhere.
//!
//! End-to-end tests need root (namespaces) and real tools. Without them a test says why
//! and passes, so `cargo test` works on a laptop; with `FLEETBOOT_REQUIRE_E2E=1` (set by
//! `scripts/test.sh`, hence CI) the same condition is a failure, so CI can never go
//! green by skipping.

use std::path::PathBuf;

/// True when `test` can run: root and every tool in `tools` present. Otherwise prints
/// the reason and returns false, or panics with it under `FLEETBOOT_REQUIRE_E2E=1`.
pub fn e2e_ready(test: &str, tools: &[&str]) -> bool {
    let mut why = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        why.push("not root (network namespaces need it)".to_string());
    }
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if !missing.is_empty() {
        why.push(format!("missing tools: {} (scripts/setup.sh installs them)", missing.join(", ")));
    }
    if why.is_empty() {
        return true;
    }
    let msg = format!("{test}: cannot run end to end: {}", why.join("; "));
    if required() {
        panic!("{msg} (FLEETBOOT_REQUIRE_E2E=1 makes that a failure)");
    }
    eprintln!("{msg}; skipped (set FLEETBOOT_REQUIRE_E2E=1 to make this a failure)");
    false
}

/// True when every tool in `tools` is present, for tests that run real clients on
/// loopback and need no root. Otherwise prints the reason and returns false, or panics
/// with it under `FLEETBOOT_REQUIRE_E2E=1`.
pub fn tools_ready(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: missing tools: {} (scripts/setup.sh installs them)",
        missing.join(", ")
    );
    if required() {
        panic!("{msg} (FLEETBOOT_REQUIRE_E2E=1 makes that a failure)");
    }
    eprintln!("{msg}; skipped (set FLEETBOOT_REQUIRE_E2E=1 to make this a failure)");
    false
}

/// Is a skipped end-to-end test a failure in this run?
pub fn required() -> bool {
    std::env::var("FLEETBOOT_REQUIRE_E2E").as_deref() == Ok("1")
}

/// The full path of an executable on PATH or in the sbin directories root has.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

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
    e2e_ready_with(test, tools, &[])
}

/// [`e2e_ready`] with prerequisites other than tools: each `(met, why)` whose `met` is
/// false is one more reason not to run, `why` saying what is wrong ("no lab payload
/// (scripts/setup.sh builds it)").
pub fn e2e_ready_with(test: &str, tools: &[&str], conditions: &[(bool, &str)]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    let tools_why = format!("missing tools: {} (scripts/setup.sh installs them)", missing.join(", "));
    let mut all = vec![
        (root, "not root (network namespaces need it)"),
        (missing.is_empty(), tools_why.as_str()),
    ];
    all.extend_from_slice(conditions);
    ready_if(test, &all)
}

/// The one place a test decides not to run: true when every `(met, why)` is met;
/// otherwise prints the reasons and returns false, or panics with them under
/// `FLEETBOOT_REQUIRE_E2E=1`. For tests that need neither root nor tools but only run
/// where some condition holds; [`e2e_ready`] and [`e2e_ready_with`] end here too, so
/// `FLEETBOOT_REQUIRE_E2E=1` turns every skip into a failure.
pub fn ready_if(test: &str, conditions: &[(bool, &str)]) -> bool {
    let why: Vec<&str> = conditions.iter().filter(|(met, _)| !met).map(|(_, w)| *w).collect();
    if why.is_empty() {
        return true;
    }
    let msg = format!("{test}: cannot run here: {}", why.join("; "));
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

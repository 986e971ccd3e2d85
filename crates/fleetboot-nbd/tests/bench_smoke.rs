//! The NBD bench (`examples/nbd_bench.rs`) at a tiny size, so that its default invocation
//! and its many-clients mode cannot rot between the runs that fill docs/benchmarks.md.
//! Counts only: every run must finish and print its summary; no timing is judged.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

/// The bench binary next to this test's own (`target/PROFILE/examples/`), built first
/// when only this test target was.
fn bench_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/PROFILE");
    let bin = profile_dir.join("examples").join("nbd_bench");
    if !bin.exists() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-q", "-p", "fleetboot-nbd", "--example", "nbd_bench"]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let st = build.status().expect("cargo");
        assert!(st.success(), "building nbd_bench failed");
    }
    bin
}

fn bench(args: &[&str]) -> String {
    let out = Command::new(bench_binary()).args(args).output().expect("nbd_bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nbd_bench {args:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn nbd_bench_runs_with_one_and_with_many_clients() {
    if !tools_ready("nbd_bench_runs_with_one_and_with_many_clients", &["nbdcopy", "qemu-img", "nbdkit", "qemu-nbd"]) {
        return;
    }
    // The default client and output, one round of a 4 MiB image.
    let out = bench(&["4", "1"]);
    assert!(out.contains("nbdcopy 4 MiB to null:"), "{out}");
    assert!(out.contains("throughput ratio fleetboot/nbdkit"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("server CPU")).count(), 6, "one line per server\n{out}");
    // Three clients at once, each with its own overlay on fleetboot, without multi-conn.
    let out = bench(&["4", "1", "nbdcopy", "--clients", "3", "--connections", "1", "--client-nice", "1"]);
    assert!(out.contains("3 × nbdcopy 4 MiB to null: at once, connections per client 1"), "{out}");
    assert!(out.contains("own client overlay each"), "{out}");
    assert!(out.contains("throughput ratio fleetboot/nbdkit"), "{out}");
}

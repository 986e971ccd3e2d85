//! Shared by the provisioning master's tests: the binary, free ports, its command line.
#![allow(dead_code)]

use std::process::Command;

pub const EXE: &str = env!("CARGO_BIN_EXE_fleetboot");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `fleetboot ARGS`: whether it succeeded, its stdout and its stderr.
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(EXE).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `fleetboot ARGS`, which must succeed: its stdout.
pub fn ok(args: &[&str]) -> String {
    let (ok, out, err) = cli(args);
    assert!(ok, "fleetboot {args:?} failed:\n{out}\n{err}");
    out
}

//! Shared by `multicast_tftp_e2e` and `negotiators_e2e`: a lab of namespaces, `fleetboot
//! files` / `fleetboot negotiate` processes started by the lab (killed by pid on drop),
//! their JSON-line records, and [`pxe_client`]: the emulator's PXE client
//! (`fleetboot_emulator::pxe`: boot server discovery REQUEST to 4011 obeying fleetboot's
//! wait packets, then the PXE MTFTP fetch) run on a thread that entered a client namespace.
#![allow(dead_code)]

use fleetboot_boot::MacAddr;
use fleetboot_emulator::pxe::{self, TransferStart};
use fleetboot_lab::netns::{Lab, Proto};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// fleetboot's wait packet sub-option and its reader, from the emulator's client (one
/// definition for every client of `fleetboot negotiate`), for tests that read wait packets
/// themselves.
#[allow(unused_imports)]
pub use fleetboot_emulator::pxe::{wait_period, SUB_WAIT_MS};

pub fn work_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fleetboot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("root")).unwrap();
    d
}

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `timeout LIMIT ip netns exec NS fleetboot SUB --config CFG`, output to `log`.
pub fn spawn_fleetboot(
    lab: &mut Lab,
    ns: &str,
    sub: &str,
    cfg: &Path,
    log: &Path,
    limit_s: u64,
) -> u32 {
    let mut c = Command::new("timeout");
    c.arg(limit_s.to_string())
        .args([
            "ip",
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_fleetboot"),
            sub,
            "--config",
        ])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap());
    lab.spawn(sub, c).unwrap()
}

pub fn wait_udp(lab: &Lab, ns: &str, port: u16) {
    lab.wait_listening(ns, Proto::Udp, port, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("port {port} in {ns}: {e:#}"));
}

/// Every JSON record in a records file.
pub fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until a record in `path` matches `pred` and returns it; panics with the records
/// after `limit` (a hang guard: the server writes each record as it happens).
pub fn wait_record(
    path: &Path,
    pred: impl Fn(&serde_json::Value) -> bool,
    limit: Duration,
) -> serde_json::Value {
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(r) = records(path).into_iter().find(|r| pred(r)) {
            return r;
        }
        if std::time::Instant::now() >= end {
            panic!("no such record in {} after {limit:?}: {:?}", path.display(), records(path));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one emulated PXE client ended with.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub mac: [u8; 6],
    pub negotiator: Ipv4Addr,
    pub file: String,
    pub group: SocketAddrV4,
    pub file_server: SocketAddrV4,
    pub bytes: Vec<u8>,
    /// Wait packets received (from any negotiator) before the answer.
    pub waits: u32,
    /// Whether it opened its transfer, rode along from block 1, or joined one flowing.
    pub start: TransferStart,
}

/// [`pxe::discover_and_fetch`] (default timers: 2 s per negotiator, REQUEST every 500 ms,
/// wait packets obeyed for up to 10 s, back to discovery after 8 s without progress), the
/// file kept for byte comparison.
pub fn pxe_client(
    me: Ipv4Addr,
    mac: [u8; 6],
    negotiators: &[Ipv4Addr],
    boot_type: u16,
    limit: Duration,
) -> Result<Fetched, String> {
    let f = pxe::discover_and_fetch(me, MacAddr(mac), negotiators, boot_type, limit)
        .map_err(|e| e.to_string())?;
    Ok(Fetched {
        mac,
        negotiator: f.boot_server,
        file: f.file,
        group: f.group,
        file_server: f.file_server,
        bytes: f.data.unwrap_or_default(),
        waits: f.waits,
        start: f.start,
    })
}

//! What a run found: per client, its timeline and counts; over all, percentiles of the
//! boot time, failures with reasons, retransmits.

use serde::Serialize;
use std::fmt;
use std::net::Ipv4Addr;

/// Milliseconds, for the report (JSON-friendly).
pub type Ms = f64;

/// How far a client got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started yet (staggered start).
    Waiting,
    Dhcp,
    /// Putting the leased address on the interface.
    Address,
    Script,
    Files,
    Done,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Waiting => "waiting to start",
            Phase::Dhcp => "DHCP",
            Phase::Address => "adding the address",
            Phase::Script => "fetching the script",
            Phase::Files => "fetching files",
            Phase::Done => "done",
        })
    }
}

/// One file fetched (the script included).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileReport {
    /// `script`, or the script command that named it (`kernel`, `initrd`, `chain`, ...).
    pub role: String,
    pub url: String,
    pub transport: &'static str,
    pub bytes: u64,
    pub sha256: String,
    /// Milliseconds from the client's start until the file was complete.
    pub done_ms: Ms,
    /// Checked against `--expect NAME=SHA256`.
    pub verified: bool,
    /// TFTP only: timer expiries (each resends the RRQ or the last ACK).
    pub tftp_timeouts: u64,
}

/// Milliseconds from the client's start (its first DISCOVER).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    pub discover_ms: Option<Ms>,
    pub offer_ms: Option<Ms>,
    pub ack_ms: Option<Ms>,
    pub address_ms: Option<Ms>,
    pub script_ms: Option<Ms>,
    /// Until the last file was complete (only for clients that succeeded).
    pub total_ms: Option<Ms>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DhcpCounts {
    pub discovers: u32,
    pub requests: u32,
    pub retransmits: u32,
    pub naks: u32,
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientReport {
    pub index: usize,
    pub mac: String,
    pub ip: Option<Ipv4Addr>,
    pub boot_file: Option<String>,
    pub phase: Phase,
    pub timeline: Timeline,
    pub files: Vec<FileReport>,
    pub dhcp: DhcpCounts,
    /// TFTP timer expiries over all of this client's transfers, failed ones included.
    pub tftp_timeouts: u64,
    /// The URL being fetched right now (or when the client was stopped).
    pub current: Option<String>,
    /// Why the client did not finish; `None` when it did.
    pub error: Option<String>,
}

impl ClientReport {
    pub fn new(index: usize, mac: String) -> ClientReport {
        ClientReport {
            index,
            mac,
            ip: None,
            boot_file: None,
            phase: Phase::Waiting,
            timeline: Timeline::default(),
            files: Vec::new(),
            dhcp: DhcpCounts::default(),
            tftp_timeouts: 0,
            current: None,
            error: None,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.phase == Phase::Done && self.error.is_none()
    }
}

/// Nearest-rank percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Ms,
    pub p90: Ms,
    pub p99: Ms,
    pub max: Ms,
}

impl Percentiles {
    pub fn of(values: impl IntoIterator<Item = Ms>) -> Option<Percentiles> {
        let mut v: Vec<Ms> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Percentiles {
            count: v.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: v[v.len() - 1],
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmulateReport {
    pub interface: String,
    pub requested: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// DISCOVER → last file, successful clients only.
    pub boot: Option<Percentiles>,
    /// DISCOVER → ACK, every client that got one.
    pub dhcp: Option<Percentiles>,
    pub dhcp_retransmits: u64,
    pub tftp_timeouts: u64,
    /// Bytes of every file fetched (scripts included).
    pub bytes: u64,
    /// Wall time of the whole run, cleanup excluded.
    pub wall_ms: Ms,
    /// Set when the run was cut short: the global timeout, or a signal.
    pub stopped: Option<String>,
    /// Addresses put on the interface (all removed again at the end).
    pub addresses_added: usize,
    pub clients: Vec<ClientReport>,
}

impl EmulateReport {
    pub fn from_clients(
        interface: &str,
        clients: Vec<ClientReport>,
        wall_ms: Ms,
        stopped: Option<String>,
        addresses_added: usize,
    ) -> EmulateReport {
        let succeeded = clients.iter().filter(|c| c.succeeded()).count();
        EmulateReport {
            interface: interface.to_string(),
            requested: clients.len(),
            succeeded,
            failed: clients.len() - succeeded,
            boot: Percentiles::of(
                clients
                    .iter()
                    .filter(|c| c.succeeded())
                    .filter_map(|c| c.timeline.total_ms),
            ),
            dhcp: Percentiles::of(clients.iter().filter_map(|c| c.timeline.ack_ms)),
            dhcp_retransmits: clients.iter().map(|c| u64::from(c.dhcp.retransmits)).sum(),
            tftp_timeouts: clients.iter().map(|c| c.tftp_timeouts).sum(),
            bytes: clients.iter().flat_map(|c| &c.files).map(|f| f.bytes).sum(),
            wall_ms,
            stopped,
            addresses_added,
            clients,
        }
    }

    /// Every client got its address and all its files.
    pub fn success(&self) -> bool {
        self.failed == 0 && self.stopped.is_none()
    }
}

fn secs(ms: Ms) -> String {
    format!("{:.3}s", ms / 1000.0)
}

fn line(f: &mut fmt::Formatter<'_>, what: &str, p: &Option<Percentiles>) -> fmt::Result {
    match p {
        Some(p) => writeln!(
            f,
            "{what:<28} p50 {}  p90 {}  p99 {}  max {}  (n={})",
            secs(p.p50),
            secs(p.p90),
            secs(p.p99),
            secs(p.max),
            p.count
        ),
        None => writeln!(f, "{what:<28} -"),
    }
}

impl fmt::Display for EmulateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fleetboot emulate on {}: {} clients, {} succeeded, {} failed, wall {}",
            self.interface,
            self.requested,
            self.succeeded,
            self.failed,
            secs(self.wall_ms)
        )?;
        if let Some(s) = &self.stopped {
            writeln!(f, "stopped early: {s}")?;
        }
        line(f, "boot (DISCOVER → last file)", &self.boot)?;
        line(f, "DHCP (DISCOVER → ACK)", &self.dhcp)?;
        writeln!(
            f,
            "retransmits: DHCP {}, TFTP timeouts {}; {:.1} MB fetched; {} addresses added and removed",
            self.dhcp_retransmits,
            self.tftp_timeouts,
            self.bytes as f64 / 1e6,
            self.addresses_added
        )?;
        let failures: Vec<_> = self.clients.iter().filter(|c| !c.succeeded()).collect();
        if !failures.is_empty() {
            writeln!(f, "failures:")?;
            for c in failures.iter().take(50) {
                let ip = c.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
                writeln!(
                    f,
                    "  #{:<4} {} {:<15} during {}: {}",
                    c.index,
                    c.mac,
                    ip,
                    c.phase,
                    c.error.as_deref().unwrap_or("unfinished")
                )?;
            }
            if failures.len() > 50 {
                writeln!(f, "  ... and {} more (see --json)", failures.len() - 50)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from)).unwrap();
        assert_eq!(
            (p.p50, p.p90, p.p99, p.max, p.count),
            (50.0, 90.0, 99.0, 100.0, 100)
        );
        let p = Percentiles::of([7.0]).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (7.0, 7.0, 7.0));
        assert_eq!(Percentiles::of([]), None);
        let p = Percentiles::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((p.p50, p.p90), (2.0, 3.0));
    }

    #[test]
    fn summary_counts_failures() {
        let mut ok = ClientReport::new(0, "02:fb:ee:00:00:00".into());
        ok.phase = Phase::Done;
        ok.timeline.total_ms = Some(1500.0);
        ok.timeline.ack_ms = Some(10.0);
        ok.dhcp.retransmits = 2;
        let mut bad = ClientReport::new(1, "02:fb:ee:00:00:01".into());
        bad.phase = Phase::Dhcp;
        bad.error = Some("no DHCPOFFER".into());
        let r = EmulateReport::from_clients("eth0", vec![ok, bad], 2000.0, None, 1);
        assert_eq!((r.succeeded, r.failed, r.dhcp_retransmits), (1, 1, 2));
        assert!(!r.success());
        assert_eq!(r.boot.unwrap().max, 1500.0);
        let text = r.to_string();
        assert!(
            text.contains("#1") && text.contains("no DHCPOFFER"),
            "{text}"
        );
    }
}

//! What a run found: per client, its timeline and counts; over all, percentiles of the
//! boot time, failures with reasons, retransmits. PXE MTFTP runs add, per client, how the
//! discovery and the transfer went ([`PxeReport`]) and a summary ([`PxeSummary`]); the
//! default mode's report is unchanged (those fields are left out of its JSON).

use crate::pxe::{DiscoveryPlan, PxeEvent, PxeFetch, ServersFrom, TransferStart};
use serde::Serialize;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

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
    /// PXE boot server discovery (UDP 4011), until a boot server names the file.
    Discovery,
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
            Phase::Discovery => "boot server discovery",
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
    /// PXE MTFTP mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pxe: Option<PxeReport>,
    /// Stream mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<crate::stream::StreamReport>,
}

/// One PXE MTFTP client: where it looked for boot servers, who answered, and how its
/// transfer went. Filled as it happens, so a client stopped midway shows how far it got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PxeReport {
    pub boot_type: u16,
    /// Asked in this order.
    pub boot_servers: Vec<Ipv4Addr>,
    pub servers_from: ServersFrom,
    /// The ProxyDHCP server whose offer the client kept, if any.
    pub proxy: Option<Ipv4Addr>,
    /// The boot server (negotiator) whose answer led to the file (the latest answer while
    /// unfinished).
    pub answered_by: Option<Ipv4Addr>,
    pub file: Option<String>,
    pub group: Option<SocketAddrV4>,
    pub file_server: Option<SocketAddrV4>,
    /// fleetboot wait packets received.
    pub waits: u32,
    /// Answers acted on: more than 1 when a stalled file server sent the client back to
    /// discovery.
    pub answers: u32,
    /// Whether this client opened the transfer, rode along another's from block 1, or
    /// joined one already flowing (and fetched the blocks it missed afterwards).
    pub transfer: Option<TransferStart>,
    /// The first DATA block it heard (1 unless it joined late).
    pub first_block: Option<u16>,
    /// RRQs it sent in the transfer that completed.
    pub rrqs: u32,
    pub duplicates: u64,
    /// Milliseconds from the client's start: the answer naming the file, the first block,
    /// the last one.
    pub answered_ms: Option<Ms>,
    pub first_block_ms: Option<Ms>,
    pub done_ms: Option<Ms>,
}

impl PxeReport {
    pub fn new(plan: &DiscoveryPlan, proxy: Option<Ipv4Addr>) -> PxeReport {
        PxeReport {
            boot_type: plan.boot_type,
            boot_servers: plan.servers.clone(),
            servers_from: plan.from,
            proxy,
            answered_by: None,
            file: None,
            group: None,
            file_server: None,
            waits: 0,
            answers: 0,
            transfer: None,
            first_block: None,
            rrqs: 0,
            duplicates: 0,
            answered_ms: None,
            first_block_ms: None,
            done_ms: None,
        }
    }

    /// Updates from an event observed `at_ms` after the client's start.
    pub fn apply(&mut self, e: &PxeEvent, at_ms: Ms) {
        match e {
            PxeEvent::Asking(_) => {}
            PxeEvent::Wait { .. } => self.waits += 1,
            PxeEvent::Answered {
                from,
                file,
                group,
                file_server,
            } => {
                self.answers += 1;
                self.answered_by = Some(*from);
                self.file = Some(file.clone());
                self.group = Some(*group);
                self.file_server = Some(*file_server);
                self.answered_ms = Some(at_ms);
                self.transfer = None;
                self.first_block = None;
                self.first_block_ms = None;
            }
            PxeEvent::FirstBlock { block, rrq_before } => {
                self.first_block = Some(*block);
                self.transfer = Some(TransferStart::of(*block, *rrq_before));
                self.first_block_ms = Some(at_ms);
            }
            PxeEvent::Stalled(_) => {}
        }
    }

    /// The final word, from the finished fetch.
    pub fn finish(&mut self, f: &PxeFetch, done_ms: Ms) {
        self.answered_by = Some(f.boot_server);
        self.file = Some(f.file.clone());
        self.group = Some(f.group);
        self.file_server = Some(f.file_server);
        self.waits = f.waits;
        self.answers = f.answers;
        self.transfer = Some(f.start);
        self.first_block = Some(f.first_block);
        self.rrqs = f.rrqs;
        self.duplicates = f.duplicates;
        self.done_ms = Some(done_ms);
    }
}

/// Over every PXE MTFTP client.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PxeSummary {
    /// Clients that sent an RRQ before the flow began at block 1 (the one whose RRQ opened
    /// the transfer, and any that asked in the same instant).
    pub opened: usize,
    /// Clients that rode along a transfer another opened, from block 1.
    pub shared: usize,
    /// Clients that joined a flowing transfer and fetched the head afterwards.
    pub joined_late: usize,
    pub waits: u64,
    /// Stalled transfers that sent a client back to discovery.
    pub rediscoveries: u64,
    /// Client start → the answer naming the file, every client that got one.
    pub answered: Option<Percentiles>,
}

impl PxeSummary {
    pub fn of(clients: &[ClientReport]) -> Option<PxeSummary> {
        let pxe: Vec<&PxeReport> = clients.iter().filter_map(|c| c.pxe.as_ref()).collect();
        if pxe.is_empty() {
            return None;
        }
        let count = |t| pxe.iter().filter(|p| p.transfer == Some(t)).count();
        Some(PxeSummary {
            opened: count(TransferStart::Opened),
            shared: count(TransferStart::Shared),
            joined_late: count(TransferStart::JoinedLate),
            waits: pxe.iter().map(|p| u64::from(p.waits)).sum(),
            rediscoveries: pxe
                .iter()
                .map(|p| u64::from(p.answers.saturating_sub(1)))
                .sum(),
            answered: Percentiles::of(pxe.iter().filter_map(|p| p.answered_ms)),
        })
    }
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
            pxe: None,
            stream: None,
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
    /// PXE MTFTP mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pxe: Option<PxeSummary>,
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
            pxe: PxeSummary::of(&clients),
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
        if let Some(p) = &self.pxe {
            line(f, "boot server (→ answer)", &p.answered)?;
            writeln!(
                f,
                "PXE MTFTP: {} opened, {} rode along from block 1, {} joined late; {} wait packets; {} back to discovery",
                p.opened, p.shared, p.joined_late, p.waits, p.rediscoveries
            )?;
        }
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

    #[test]
    fn pxe_fields_only_in_pxe_runs() {
        use crate::pxe::{DiscoveryPlan, PxeEvent};
        let plain = ClientReport::new(0, "02:fb:ee:00:00:00".into());
        let r = EmulateReport::from_clients("eth0", vec![plain.clone()], 1.0, None, 1);
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("pxe").is_none() && json["clients"][0].get("pxe").is_none());
        assert!(!r.to_string().contains("PXE"));

        let plan = DiscoveryPlan {
            servers: vec![Ipv4Addr::new(10, 77, 0, 11)],
            boot_type: 0x8000,
            from: ServersFrom::ProxyBootServers,
        };
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 1, 1), 1758);
        let fs = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 21), 1759);
        let answered = PxeEvent::Answered {
            from: Ipv4Addr::new(10, 77, 0, 11),
            file: "bios/pxelinux.0".into(),
            group,
            file_server: fs,
        };
        let client = |i: usize, events: &[PxeEvent]| {
            let mut c = ClientReport::new(i, format!("02:fb:ee:00:00:0{i}"));
            let mut p = PxeReport::new(&plan, Some(Ipv4Addr::new(10, 77, 0, 2)));
            for (t, e) in events.iter().enumerate() {
                p.apply(e, 100.0 * t as f64);
            }
            c.pxe = Some(p);
            c
        };
        let wait = PxeEvent::Wait {
            from: Ipv4Addr::new(10, 77, 0, 11),
            period: std::time::Duration::from_millis(500),
        };
        let first = |block, rrq_before| PxeEvent::FirstBlock { block, rrq_before };
        let stalled = PxeEvent::Stalled("stalled".into());
        let clients = vec![
            client(0, &[wait.clone(), answered.clone(), first(1, true)]),
            client(1, &[wait, answered.clone(), first(1, false)]),
            client(2, &[answered.clone(), first(40, false)]),
            // Went back to discovery after a stall and is still listening.
            client(3, &[answered.clone(), first(1, true), stalled, answered]),
        ];
        let c0 = clients[0].pxe.as_ref().unwrap();
        assert_eq!(
            (
                c0.waits,
                c0.answers,
                c0.transfer,
                c0.first_block,
                c0.answered_ms
            ),
            (1, 1, Some(TransferStart::Opened), Some(1), Some(100.0))
        );
        let c3 = clients[3].pxe.as_ref().unwrap();
        assert_eq!((c3.answers, c3.transfer, c3.first_block), (2, None, None));
        let r = EmulateReport::from_clients("eth0", clients, 1.0, None, 4);
        let s = r.pxe.as_ref().unwrap();
        assert_eq!(
            (s.opened, s.shared, s.joined_late, s.waits, s.rediscoveries),
            (1, 1, 1, 2, 1)
        );
        assert_eq!(s.answered.unwrap().count, 4);
        let json = serde_json::to_value(&r).unwrap();
        let c2 = &json["clients"][2]["pxe"];
        assert_eq!(c2["transfer"], "joined_late");
        assert_eq!(c2["first_block"], 40);
        assert_eq!(c2["group"], "239.255.1.1:1758");
        assert_eq!(c2["servers_from"], "proxy_boot_servers");
        assert_eq!(json["pxe"]["joined_late"], 1);
        let text = r.to_string();
        assert!(
            text.contains("1 opened, 1 rode along from block 1, 1 joined late"),
            "{text}"
        );
    }

    /// The report's percentiles from known boot and DHCP times: nearest rank over the
    /// clients they describe (boot: successful clients only; DHCP: every client that got an
    /// ACK), whatever order the clients finished in, and the same figures in the JSON and
    /// the text report.
    #[test]
    fn report_percentiles_from_known_times() {
        const OK: usize = 180;
        const ALL: usize = 200;
        // Client i (in an order that is not sorted by time) succeeded in (i+1)*10 ms with
        // its ACK at i+1 ms; the last 20 failed after their ACK at 1000+i ms, and their
        // (huge) partial boot time must not count.
        let clients: Vec<ClientReport> = (0..ALL)
            .map(|k| (k * 73) % ALL)
            .map(|i| {
                let mut c = ClientReport::new(i, format!("02:fb:ee:00:00:{i:02x}"));
                if i < OK {
                    c.phase = Phase::Done;
                    c.timeline.total_ms = Some((i + 1) as f64 * 10.0);
                    c.timeline.ack_ms = Some((i + 1) as f64);
                } else {
                    c.phase = Phase::Files;
                    c.error = Some("TFTP timeout".into());
                    c.timeline.total_ms = Some(1e9);
                    c.timeline.ack_ms = Some(1000.0 + i as f64);
                }
                c
            })
            .collect();
        let r = EmulateReport::from_clients("eth0", clients, 5000.0, None, ALL);
        // boot, 10..=1800 ms: ranks ceil(0.5*180)=90, ceil(0.9*180)=162, ceil(0.99*180)=179.
        let boot = Percentiles { count: OK, p50: 900.0, p90: 1620.0, p99: 1790.0, max: 1800.0 };
        assert_eq!(r.boot, Some(boot));
        // DHCP, 1..=180 then 1180..=1199 ms: ranks 100, 180, 198 of 200.
        let dhcp = Percentiles { count: ALL, p50: 100.0, p90: 180.0, p99: 1197.0, max: 1199.0 };
        assert_eq!(r.dhcp, Some(dhcp));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["boot"],
            serde_json::json!({"count": 180, "p50": 900.0, "p90": 1620.0, "p99": 1790.0, "max": 1800.0})
        );
        assert_eq!(json["dhcp"]["p99"], 1197.0);
        let text = r.to_string();
        assert!(
            text.contains("p50 0.900s  p90 1.620s  p99 1.790s  max 1.800s  (n=180)"),
            "{text}"
        );
        assert!(text.contains("p50 0.100s  p90 0.180s  p99 1.197s  max 1.199s  (n=200)"), "{text}");
        // Times that are not numbers (a clock that went wrong) are left out, not ranked.
        let p = Percentiles::of([f64::NAN, 5.0, f64::INFINITY, 1.0]).unwrap();
        assert_eq!((p.count, p.p50, p.max), (2, 1.0, 5.0));
    }
}

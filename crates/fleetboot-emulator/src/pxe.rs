//! A PXE ROM's second half, as fleetboot's negotiators expect it: boot server discovery on
//! UDP 4011 (`fleetboot_dhcp`'s sans-I/O [`PxeDiscovery`], which obeys fleetboot's wait
//! packets), then the boot file over PXE MTFTP (the multicast scheme of PXE 2.1 §M5, the
//! sans-I/O [`MtftpClient`]).
//!
//! - [`plan_discovery`]: which boot servers to ask and for which boot server type, from the
//!   operator's list, the ProxyDHCP offer or the DHCP server.
//! - [`PxeRom`]: the two machines in sequence, as one machine of the `fleetboot_proto`
//!   contract: discovery until an answer, the transfer, back to discovery when it stalls.
//! - [`discover_and_fetch`] / [`discover_and_fetch_with`]: its blocking shell. It runs on a
//!   thread of its own (sockets from `crate::net`, a `Poller`): the namespace e2e tests call
//!   it from a thread that `setns()`-ed into a client namespace, the emulator from tokio's
//!   blocking pool.
//!
//! # Transfer
//!
//! The group is listened on by a socket bound to the group address (so other groups on the
//! same port in this namespace stay out) with `IP_MULTICAST_ALL` off (so groups other
//! sockets of this host joined stay out too), joined on the client's address; REQUESTs,
//! RRQs and ACKs go from one unicast socket. A transfer that brings no new block for 8 s
//! (its file server died after the negotiator answered) sends the client back to
//! discovery, at the next boot server, as a PXE ROM that fails and retries would. New means
//! not held before, wherever it falls: a client that joined late hears the tail first, and
//! its contiguous count stays 0 until the head comes.
//!
//! # Opened or joined late
//!
//! [`MtftpClient`] does not say whose transfer it received; the client watches it instead:
//! the first DATA block it heard, and whether it had sent an RRQ by then
//! ([`TransferStart::of`]). Clients answered together listen together and open together:
//! each of them counts as [`TransferStart::Opened`], though the file server made only the
//! first RRQ it read the master (its records say which).

use fleetboot_boot::MacAddr;
use fleetboot_dhcp::client::Binding;
use fleetboot_dhcp::discovery::{DiscoveryConfig, DiscoveryEvent, MulticastAnswer, PxeDiscovery};
use fleetboot_net::{Outbox, Poller};
use fleetboot_proto::Transmit;
use fleetboot_tftp::mtftp::{ClientPhase, MtftpClient, MtftpClientConfig, BLOCK};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use fleetboot_dhcp::discovery::{discovery_request, BOOT_SERVER_PORT};
pub use fleetboot_dhcp::pxe::{wait_period, SUB_WAIT_MS};

/// The boot server type asked for when neither the operator nor a ProxyDHCP offer names
/// one: the first vendor type, which `fleetboot negotiate` maps to its first boot file.
pub const DEFAULT_BOOT_TYPE: u16 = 0x8000;

/// Parses a boot server type: `0x8000`, or decimal.
pub fn parse_boot_type(s: &str) -> Result<u16, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{s:?}: want a boot server type, 0..=65535 (e.g. 0x8000)"))
}

/// Where the boot servers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServersFrom {
    /// The operator's list (`--boot-server`).
    Given,
    /// The ProxyDHCP offer's option 43 sub-option 8, for the boot server type.
    ProxyBootServers,
    /// The ProxyDHCP offer's server id (a ProxyDHCP server answers on 4011 too).
    ProxyServer,
    /// No ProxyDHCP offer said anything: the DHCP ACK's next server and server id.
    DhcpServer,
}

/// Whom to ask, for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryPlan {
    /// In the order they are tried (round robin after a failure).
    pub servers: Vec<Ipv4Addr>,
    pub boot_type: u16,
    pub from: ServersFrom,
}

fn usable(a: &Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast())
}

fn push_unique(v: &mut Vec<Ipv4Addr>, a: Ipv4Addr) {
    if usable(&a) && !v.contains(&a) {
        v.push(a);
    }
}

/// The boot server type and servers for a client bound as `binding`.
///
/// Type: `given_type`, else the ProxyDHCP offer's first menu item, else its first boot
/// server entry, else [`DEFAULT_BOOT_TYPE`]. Servers: `given` when not empty; else the
/// ProxyDHCP offer's boot servers of that type; else that offer's server id; else the ACK's
/// next server and server id.
pub fn plan_discovery(
    binding: &Binding,
    given: &[Ipv4Addr],
    given_type: Option<u16>,
) -> DiscoveryPlan {
    let proxy_pxe = binding.proxy.as_ref().and_then(|p| p.pxe.as_ref());
    let boot_type = given_type
        .or_else(|| proxy_pxe.and_then(|p| p.boot_menu.first().map(|m| m.server_type)))
        .or_else(|| proxy_pxe.and_then(|p| p.boot_servers.first().map(|s| s.server_type)))
        .unwrap_or(DEFAULT_BOOT_TYPE);
    let mut servers = Vec::new();
    given.iter().for_each(|a| push_unique(&mut servers, *a));
    if !servers.is_empty() {
        return DiscoveryPlan {
            servers,
            boot_type,
            from: ServersFrom::Given,
        };
    }
    if let Some(p) = proxy_pxe {
        p.boot_servers
            .iter()
            .filter(|s| s.server_type == boot_type)
            .flat_map(|s| &s.addrs)
            .for_each(|a| push_unique(&mut servers, *a));
        if !servers.is_empty() {
            return DiscoveryPlan {
                servers,
                boot_type,
                from: ServersFrom::ProxyBootServers,
            };
        }
    }
    if let Some(p) = &binding.proxy {
        push_unique(&mut servers, p.server);
        if !servers.is_empty() {
            return DiscoveryPlan {
                servers,
                boot_type,
                from: ServersFrom::ProxyServer,
            };
        }
    }
    if let Some(n) = binding.next_server {
        push_unique(&mut servers, n);
    }
    push_unique(&mut servers, binding.server_id);
    DiscoveryPlan {
        servers,
        boot_type,
        from: ServersFrom::DhcpServer,
    }
}

/// How this client came by the file's first block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStart {
    /// It sent an RRQ while nothing flowed, and the flow began at block 1: its RRQ opened
    /// the transfer (as far as a client can tell: another client's RRQ in the same instant
    /// looks the same).
    Opened,
    /// It heard block 1 of a transfer without having asked: another client opened it while
    /// this one listened, and it rode along from the start.
    Shared,
    /// The first block it heard was past block 1: a transfer was flowing when it joined. It
    /// kept what it heard and fetched the blocks it missed afterwards (re-opening, or from a
    /// later transfer).
    JoinedLate,
}

impl TransferStart {
    /// From the first DATA block heard and whether an RRQ had gone out before it.
    pub fn of(first_block: u16, rrq_before: bool) -> TransferStart {
        match (first_block, rrq_before) {
            (1, true) => TransferStart::Opened,
            (1, false) => TransferStart::Shared,
            _ => TransferStart::JoinedLate,
        }
    }
}

/// The client's patience. The defaults are what `fleetboot negotiate`'s clients are tested
/// with; the tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeTimers {
    /// How long one boot server gets before the next is asked.
    pub per_server: Duration,
    /// REQUESTs are repeated this often while no answer comes.
    pub resend: Duration,
    /// Wait packets keep the client with their server for at most this long.
    pub wait_cap: Duration,
    /// A transfer without progress for this long is abandoned (back to discovery).
    pub stall: Duration,
    /// RRQ repetition while nothing flows after opening.
    pub rrq_retry: Duration,
    /// UDP port of the boot servers (4011; tests on loopback use another).
    pub port: u16,
}

impl Default for PxeTimers {
    fn default() -> Self {
        PxeTimers {
            per_server: Duration::from_secs(2),
            resend: Duration::from_millis(500),
            wait_cap: Duration::from_secs(10),
            stall: Duration::from_secs(8),
            rrq_retry: Duration::from_secs(1),
            port: BOOT_SERVER_PORT,
        }
    }
}

/// One PXE client's discovery and download.
#[derive(Debug, Clone)]
pub struct PxeClientConfig {
    /// The client's address: every socket is bound to it and the group is joined on it.
    pub me: Ipv4Addr,
    pub mac: MacAddr,
    /// Asked in turn; at least one.
    pub boot_servers: Vec<Ipv4Addr>,
    pub boot_type: u16,
    /// Option 97 in the REQUEST, when given.
    pub uuid: Option<[u8; 16]>,
    /// The REQUEST's transaction id.
    pub xid: u32,
    /// Give up after this long.
    pub limit: Duration,
    /// Return the file's bytes ([`PxeFetch::data`]), not only its length and hash.
    pub keep_data: bool,
    pub timers: PxeTimers,
    /// Set to stop early (checked at least every 250 ms): a run that ends does not wait
    /// for its clients' blocking threads to reach their limits.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl PxeClientConfig {
    /// Default timers, the data kept, xid from the MAC.
    pub fn new(
        me: Ipv4Addr,
        mac: MacAddr,
        boot_servers: &[Ipv4Addr],
        boot_type: u16,
        limit: Duration,
    ) -> PxeClientConfig {
        let m = mac.0;
        PxeClientConfig {
            me,
            mac,
            boot_servers: boot_servers.to_vec(),
            boot_type,
            uuid: None,
            xid: u32::from_be_bytes([m[2], m[3], m[4], m[5]]),
            limit,
            keep_data: true,
            timers: PxeTimers::default(),
            cancel: None,
        }
    }
}

/// What one PXE client ended with. Durations count from the call's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeFetch {
    /// The boot server (negotiator) whose answer led to the file.
    pub boot_server: Ipv4Addr,
    pub file: String,
    /// Multicast group and client port (sub-options 1 and 2).
    pub group: SocketAddrV4,
    /// `siaddr` and sub-option 3: where RRQs went.
    pub file_server: SocketAddrV4,
    pub len: u64,
    pub sha256: [u8; 32],
    /// The file, when [`PxeClientConfig::keep_data`].
    pub data: Option<Vec<u8>>,
    /// Wait packets received, from any boot server, over the whole call.
    pub waits: u32,
    /// Answers acted on: 1, plus one per stalled transfer that sent the client back.
    pub answers: u32,
    pub start: TransferStart,
    /// The first DATA block heard in the transfer that completed.
    pub first_block: u16,
    /// RRQs this client sent in that transfer (opening, and re-opening to fill gaps).
    pub rrqs: u32,
    /// DATA blocks heard more than once.
    pub duplicates: u64,
    /// The answer that led to the file arrived.
    pub answered_at: Duration,
    pub first_block_at: Duration,
    pub done_at: Duration,
}

/// Why a PXE client gave up, with what it had counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct PxeError {
    pub reason: String,
    pub waits: u32,
    pub answers: u32,
}

/// What happens as it happens, for callers that report progress (the emulator's report of
/// a client stopped midway says where it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PxeEvent {
    /// A REQUEST went to this boot server for the first time in its turn.
    Asking(Ipv4Addr),
    Wait {
        from: Ipv4Addr,
        period: Duration,
    },
    /// A real answer; the client has joined the group and listens.
    Answered {
        from: Ipv4Addr,
        file: String,
        group: SocketAddrV4,
        file_server: SocketAddrV4,
    },
    FirstBlock {
        block: u16,
        rrq_before: bool,
    },
    /// The transfer made no progress; back to discovery.
    Stalled(String),
}

/// What a stalled transfer, or a boot server, left the client with.
fn join_err(why: String, last: &str) -> String {
    match last.is_empty() {
        true => format!("{why}: no boot server answered"),
        false => format!("{why}; last: {last}"),
    }
}

/// The transfer after an answer.
#[derive(Debug)]
struct Fetch {
    from: Ipv4Addr,
    answer: MulticastAnswer,
    answered_at: Duration,
    client: MtftpClient,
    /// The first DATA block heard, whether an RRQ had gone out before it, and when.
    first: Option<(u16, bool, Duration)>,
    /// DATA blocks heard (duplicates too).
    heard: u64,
    /// Distinct blocks so far, and when that count last grew.
    progress: (u64, Instant),
}

impl Fetch {
    fn distinct(&self) -> u64 {
        self.heard.saturating_sub(self.client.duplicates)
    }
}

#[derive(Debug)]
enum Phase {
    Discovering,
    Fetching(Box<Fetch>),
    /// The file is complete; the transfer stays to send its last ACK (which tells the file
    /// server its master is done).
    Done(Box<Fetch>, Box<PxeFetch>),
    Failed(PxeError),
}

/// One PXE client after DHCP, sans-I/O: boot server discovery ([`PxeDiscovery`]), then the
/// PXE MTFTP transfer ([`MtftpClient`]) of the answer, back to discovery at the next
/// server when the transfer stalls, until the file is complete or `limit` passes.
///
/// Everything it sends leaves from the client's unicast socket; what arrives there and on
/// the group socket goes to [`PxeRom::handle`]. [`PxeEvent::Answered`] is the shell's cue to
/// join the group (and [`PxeEvent::Stalled`] to leave it).
#[derive(Debug)]
pub struct PxeRom {
    cfg: PxeClientConfig,
    start: Instant,
    discovery: PxeDiscovery,
    answers: u32,
    phase: Phase,
    /// Why the last transfer stalled, for the final error.
    last_err: String,
    events: VecDeque<PxeEvent>,
}

impl PxeRom {
    /// Starts discovery at `now` (the first REQUEST is ready at once).
    pub fn new(cfg: PxeClientConfig, now: Instant) -> PxeRom {
        let t = &cfg.timers;
        let mut dc = DiscoveryConfig::new(cfg.me, cfg.mac, &cfg.boot_servers, cfg.boot_type);
        dc.xid = cfg.xid;
        dc.uuid = cfg.uuid;
        dc.port = t.port;
        dc.per_server = t.per_server;
        dc.resend = t.resend;
        dc.wait_cap = t.wait_cap;
        let mut rom = PxeRom {
            discovery: PxeDiscovery::new(dc, now),
            cfg,
            start: now,
            answers: 0,
            phase: Phase::Discovering,
            last_err: String::new(),
            events: VecDeque::new(),
        };
        if !rom.discovery.has_servers() {
            rom.phase = Phase::Failed(rom.error("no boot server to ask".into()));
        }
        rom.discovery_events(now);
        rom
    }

    fn error(&self, reason: String) -> PxeError {
        PxeError { reason, waits: self.discovery.waits(), answers: self.answers }
    }

    /// Gives up now (the shell's cancellation).
    pub fn cancel(&mut self) {
        if !self.is_finished() {
            self.phase = Phase::Failed(self.error("cancelled".into()));
        }
    }

    /// The file is complete, or the client gave up.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done(..) | Phase::Failed(_))
    }

    /// What it ended with, once [`is_finished`](Self::is_finished).
    pub fn into_result(self) -> Option<Result<PxeFetch, PxeError>> {
        match self.phase {
            Phase::Done(_, f) => Some(Ok(*f)),
            Phase::Failed(e) => Some(Err(e)),
            _ => None,
        }
    }

    /// Turns what discovery reports into events; starts the transfer of an answer.
    fn discovery_events(&mut self, now: Instant) {
        while let Some(e) = self.discovery.poll_event() {
            match e {
                DiscoveryEvent::Asking(s) => self.events.push_back(PxeEvent::Asking(s)),
                DiscoveryEvent::Wait { from, period } => self.events.push_back(PxeEvent::Wait { from, period }),
                DiscoveryEvent::Answered(_) => self.answered(now),
            }
        }
    }

    fn answered(&mut self, now: Instant) {
        let Some((from, ack)) = self.discovery.answer() else { return };
        self.answers += 1;
        let answer = match MulticastAnswer::of(ack) {
            Ok(a) => a,
            Err(e) => {
                self.phase = Phase::Failed(self.error(format!("answer from {from}: {e}")));
                return;
            }
        };
        let client = MtftpClient::new(
            now,
            MtftpClientConfig {
                file: answer.file.clone(),
                server: answer.file_server,
                listen_timeout: answer.listen_timeout,
                delay: answer.delay,
                rrq_retry: self.cfg.timers.rrq_retry,
            },
        );
        self.events.push_back(PxeEvent::Answered { from, file: answer.file.clone(), group: answer.group, file_server: answer.file_server });
        let answered_at = now - self.start;
        self.phase = Phase::Fetching(Box::new(Fetch { from, answer, answered_at, client, first: None, heard: 0, progress: (0, now) }));
    }

    /// A datagram on the client's unicast socket or its group socket.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match &mut self.phase {
            Phase::Discovering => {
                self.discovery.handle(now, from, bytes);
                self.discovery_events(now);
            }
            Phase::Fetching(f) => {
                // What MtftpClient takes as a block, seen before it takes it.
                if let Some((block, data)) = fleetboot_tftp::codec::parse_data(bytes) {
                    if block != 0 && data.len() <= BLOCK {
                        f.heard += 1;
                        if f.first.is_none() {
                            let rrq_before = f.client.opens > 0;
                            f.first = Some((block, rrq_before, now - self.start));
                            self.events.push_back(PxeEvent::FirstBlock { block, rrq_before });
                        }
                    }
                }
                f.client.handle(now, from, bytes);
                // Progress is a block not held before, wherever it falls.
                if f.distinct() > f.progress.0 {
                    f.progress = (f.distinct(), now);
                }
                if f.client.phase() == ClientPhase::Done {
                    self.finish(now);
                }
            }
            Phase::Done(..) | Phase::Failed(_) => {}
        }
    }

    fn finish(&mut self, now: Instant) {
        let Phase::Fetching(f) = std::mem::replace(&mut self.phase, Phase::Discovering) else { return };
        let data = f.client.file().unwrap_or_default();
        let (first_block, rrq_before, first_block_at) = f.first.unwrap_or((1, f.client.opens > 0, now - self.start));
        let result = PxeFetch {
            boot_server: f.from,
            file: f.answer.file.clone(),
            group: f.answer.group,
            file_server: f.answer.file_server,
            len: data.len() as u64,
            sha256: Sha256::digest(&data).into(),
            data: self.cfg.keep_data.then_some(data),
            waits: self.discovery.waits(),
            answers: self.answers,
            start: TransferStart::of(first_block, rrq_before),
            first_block,
            rrqs: f.client.opens,
            duplicates: f.client.duplicates,
            answered_at: f.answered_at,
            first_block_at,
            done_at: now - self.start,
        };
        self.phase = Phase::Done(f, Box::new(result));
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_finished() {
            return;
        }
        if now.saturating_duration_since(self.start) >= self.cfg.limit {
            let why = join_err(format!("no file within {:?}", self.cfg.limit), &self.last_err);
            self.phase = Phase::Failed(self.error(why));
            return;
        }
        match &mut self.phase {
            Phase::Discovering => {
                self.discovery.handle_timeout(now);
                self.discovery_events(now);
            }
            Phase::Fetching(f) => {
                if now >= f.progress.1 + self.cfg.timers.stall {
                    self.last_err = format!(
                        "{} from {} on {}: no new block for {:?} (had {} blocks)",
                        f.answer.file,
                        f.answer.file_server,
                        f.answer.group,
                        self.cfg.timers.stall,
                        f.distinct()
                    );
                    self.events.push_back(PxeEvent::Stalled(self.last_err.clone()));
                    self.phase = Phase::Discovering;
                    self.discovery.restart(now);
                    self.discovery_events(now);
                    return;
                }
                f.client.handle_timeout(now);
            }
            Phase::Done(..) | Phase::Failed(_) => {}
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let limit = self.start + self.cfg.limit;
        let phase = match &self.phase {
            Phase::Discovering => self.discovery.poll_timeout(),
            Phase::Fetching(f) => {
                let stall = f.progress.1 + self.cfg.timers.stall;
                Some(f.client.poll_timeout().map_or(stall, |t| t.min(stall)))
            }
            Phase::Done(..) | Phase::Failed(_) => return None,
        };
        Some(phase.map_or(limit, |t| t.min(limit)))
    }

    /// Appends the next REQUEST, RRQ or ACK (all from the client's unicast socket).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        match &mut self.phase {
            Phase::Discovering => self.discovery.poll_transmit(now, buf),
            Phase::Fetching(f) | Phase::Done(f, _) => f.client.poll_transmit(now, buf),
            Phase::Failed(_) => None,
        }
    }

    pub fn poll_event(&mut self) -> Option<PxeEvent> {
        self.events.pop_front()
    }
}

/// [`discover_and_fetch_with`] with default timers, the data kept and no cancellation.
pub fn discover_and_fetch(
    me: Ipv4Addr,
    mac: MacAddr,
    boot_servers: &[Ipv4Addr],
    boot_type: u16,
    limit: Duration,
) -> Result<PxeFetch, PxeError> {
    let cfg = PxeClientConfig::new(me, mac, boot_servers, boot_type, limit);
    discover_and_fetch_with(&cfg, |_| {})
}

/// Everything queued, from the unicast socket. UDP is best effort: a refused datagram is as
/// good as lost, and the machine's timers repeat what matters.
fn flush(rom: &mut PxeRom, out: &mut Outbox, sock: &UdpSocket, now: Instant) {
    while let Some(t) = rom.poll_transmit(now, out.buffer()) {
        out.push(t);
    }
    let _ = out.send(sock);
    out.clear();
}

/// Drains one nonblocking socket into the machine.
fn receive(rom: &mut PxeRom, sock: &UdpSocket, buf: &mut [u8], now: Instant) {
    for _ in 0..1024 {
        match sock.recv_from(buf) {
            Ok((len, from)) => rom.handle(now, from, &buf[..len]),
            Err(_) => return,
        }
    }
}

/// Boot server discovery, then the PXE MTFTP download: [`PxeRom`] on this thread, its
/// sockets from `crate::net`. Blocks until the file is complete, `limit` passes or `cancel`
/// is set. `observe` sees each [`PxeEvent`] on this thread (after the group is joined, for
/// [`PxeEvent::Answered`]: whoever sees it may rely on the client hearing the group).
pub fn discover_and_fetch_with(cfg: &PxeClientConfig, mut observe: impl FnMut(PxeEvent)) -> Result<PxeFetch, PxeError> {
    let mut rom = PxeRom::new(cfg.clone(), Instant::now());
    let unicast = if rom.is_finished() {
        None
    } else {
        Some(crate::net::client_udp(cfg.me, "PXE boot server discovery and MTFTP requests").map_err(|e| rom.error(format!("bind {}: {e}", cfg.me)))?)
    };
    let mut group: Option<UdpSocket> = None;
    let mut out = Outbox::new(16);
    let mut buf = vec![0u8; 65536];
    let mut poller = Poller::new();
    loop {
        while let Some(e) = rom.poll_event() {
            match &e {
                PxeEvent::Answered { group: g, .. } => match crate::net::group_socket(*g, cfg.me) {
                    Ok(s) => group = Some(s),
                    Err(err) => return Err(rom.error(format!("MTFTP group {g}: {err}"))),
                },
                PxeEvent::Stalled(_) => group = None,
                _ => {}
            }
            observe(e);
        }
        let Some(us) = &unicast else { break };
        flush(&mut rom, &mut out, us, Instant::now());
        if rom.is_finished() {
            break;
        }
        if cfg.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            rom.cancel();
            break;
        }
        poller.clear();
        poller.add(us);
        if let Some(g) = &group {
            poller.add(g);
        }
        // Woken at least every 250 ms to see a cancellation.
        let cap = Instant::now() + Duration::from_millis(250);
        let _ = poller.wait(Some(rom.poll_timeout().map_or(cap, |t| t.min(cap))));
        let now = Instant::now();
        receive(&mut rom, us, &mut buf, now);
        if let Some(g) = &group {
            receive(&mut rom, g, &mut buf, now);
        }
        if rom.poll_timeout().is_some_and(|t| t <= now) {
            rom.handle_timeout(now);
        }
    }
    rom.into_result().unwrap_or_else(|| Err(PxeError { reason: "stopped".into(), waits: 0, answers: 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetboot_dhcp::client::ProxyOffer;
    use fleetboot_dhcp::codec::{opt, BOOTREPLY};
    use fleetboot_dhcp::pxe::{BootServer, MenuItem, PxeOptions};
    use fleetboot_dhcp::{DhcpMessage, MessageType};
    use fleetboot_net::{MulticastInterface, UdpBuilder};
    use fleetboot_tftp::mtftp::{MtftpServer, SenderConfig};
    use std::collections::HashMap;
    use std::sync::mpsc;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn binding(proxy: Option<ProxyOffer>) -> Binding {
        Binding {
            ip: ip("10.77.0.100"),
            server_id: ip("10.77.0.1"),
            prefix_len: 24,
            router: None,
            lease_time: Some(3600),
            boot_file: None,
            next_server: Some(ip("10.77.0.5")),
            proxy,
        }
    }

    fn proxy(pxe: Option<PxeOptions>) -> ProxyOffer {
        ProxyOffer {
            server: ip("10.77.0.2"),
            pxe,
            file: None,
            next_server: None,
        }
    }

    fn servers(list: &[(u16, &[&str])]) -> Vec<BootServer> {
        list.iter()
            .map(|(t, a)| BootServer {
                server_type: *t,
                addrs: a.iter().map(|s| ip(s)).collect(),
            })
            .collect()
    }

    #[test]
    fn boot_servers_come_from_the_flag_then_the_proxy_then_dhcp() {
        let menu = PxeOptions {
            boot_menu: vec![MenuItem {
                server_type: 0x8002,
                description: "arm".into(),
            }],
            boot_servers: servers(&[
                (0x8000, &["10.77.0.11"]),
                (
                    0x8002,
                    &["10.77.0.12", "0.0.0.0", "10.77.0.13", "10.77.0.12"],
                ),
                (0x8002, &["10.77.0.14"]),
            ]),
            ..Default::default()
        };
        let b = binding(Some(proxy(Some(menu.clone()))));
        // The menu's first item picks the type; its servers, in order, without repeats or
        // unusable addresses.
        let p = plan_discovery(&b, &[], None);
        assert_eq!(p.boot_type, 0x8002);
        assert_eq!(p.from, ServersFrom::ProxyBootServers);
        assert_eq!(
            p.servers,
            [ip("10.77.0.12"), ip("10.77.0.13"), ip("10.77.0.14")]
        );
        // The flag's type picks among the proxy's servers.
        let p = plan_discovery(&b, &[], Some(0x8000));
        assert_eq!(
            (p.boot_type, &p.servers[..]),
            (0x8000, &[ip("10.77.0.11")][..])
        );
        // A type the proxy lists no server for: the proxy itself.
        let p = plan_discovery(&b, &[], Some(0x8007));
        assert_eq!(p.from, ServersFrom::ProxyServer);
        assert_eq!(p.servers, [ip("10.77.0.2")]);
        // The flag's servers win, with the proxy's type.
        let given = [ip("10.77.0.21"), ip("255.255.255.255"), ip("10.77.0.22")];
        let p = plan_discovery(&b, &given, None);
        assert_eq!(p.from, ServersFrom::Given);
        assert_eq!(p.boot_type, 0x8002);
        assert_eq!(p.servers, [ip("10.77.0.21"), ip("10.77.0.22")]);
        // No menu: the first boot server entry's type.
        let no_menu = PxeOptions {
            boot_menu: vec![],
            ..menu
        };
        let p = plan_discovery(&binding(Some(proxy(Some(no_menu)))), &[], None);
        assert_eq!((p.boot_type, p.servers[0]), (0x8000, ip("10.77.0.11")));
        // A proxy offer without (readable) option 43: its server id, the default type.
        let p = plan_discovery(&binding(Some(proxy(None))), &[], None);
        assert_eq!(p.boot_type, DEFAULT_BOOT_TYPE);
        assert_eq!(
            (p.from, &p.servers[..]),
            (ServersFrom::ProxyServer, &[ip("10.77.0.2")][..])
        );
        // No proxy: the ACK's next server, then its server id.
        let p = plan_discovery(&binding(None), &[], None);
        assert_eq!(p.from, ServersFrom::DhcpServer);
        assert_eq!(p.servers, [ip("10.77.0.5"), ip("10.77.0.1")]);
        assert_eq!(p.boot_type, DEFAULT_BOOT_TYPE);
    }

    #[test]
    fn how_a_transfer_started() {
        assert_eq!(TransferStart::of(1, true), TransferStart::Opened);
        assert_eq!(TransferStart::of(1, false), TransferStart::Shared);
        assert_eq!(TransferStart::of(57, false), TransferStart::JoinedLate);
        // An RRQ that went out while another client's transfer flowed did not open it.
        assert_eq!(TransferStart::of(57, true), TransferStart::JoinedLate);
        assert_eq!(
            serde_json::to_value(TransferStart::JoinedLate).unwrap(),
            "joined_late"
        );
    }

    #[test]
    fn boot_types_parse_in_hex_or_decimal() {
        assert_eq!(parse_boot_type("0x8000"), Ok(0x8000));
        assert_eq!(parse_boot_type("0X8001"), Ok(0x8001));
        assert_eq!(parse_boot_type("32770"), Ok(0x8002));
        assert!(parse_boot_type("0x10000").is_err());
        assert!(parse_boot_type("pxe").is_err());
        assert!(parse_boot_type("").is_err());
    }

    fn ack_to(req: &DhcpMessage) -> DhcpMessage {
        let mut r = DhcpMessage {
            op: BOOTREPLY,
            xid: req.xid,
            chaddr: req.chaddr,
            hlen: 6,
            htype: 1,
            ..DhcpMessage::default()
        };
        r.set_option(opt::MESSAGE_TYPE, vec![MessageType::Ack as u8]);
        r.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
        r
    }

    fn wait_packet(req: &DhcpMessage, ms: u32) -> DhcpMessage {
        let mut r = ack_to(req);
        let pxe = PxeOptions {
            other: vec![(SUB_WAIT_MS, ms.to_be_bytes().to_vec())],
            ..Default::default()
        };
        r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        r
    }

    fn answer(
        req: &DhcpMessage,
        file: &str,
        group: SocketAddrV4,
        fs: SocketAddrV4,
        tmout: u8,
    ) -> DhcpMessage {
        let mut r = ack_to(req);
        r.siaddr = *fs.ip();
        r.file = file.as_bytes().to_vec();
        let pxe = PxeOptions {
            mtftp_ip: Some(*group.ip()),
            mtftp_client_port: Some(group.port()),
            mtftp_server_port: Some(fs.port()),
            mtftp_timeout: Some(tmout),
            mtftp_delay: Some(1),
            ..Default::default()
        };
        r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        r
    }

    #[test]
    fn no_boot_servers_is_an_error_not_a_panic() {
        let e = discover_and_fetch(
            Ipv4Addr::LOCALHOST,
            MacAddr([2, 0, 0, 0, 0, 1]),
            &[],
            0x8000,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.reason.contains("no boot server"), "{e}");
    }

    /// Real sockets on loopback (multicast with TTL 0 on `lo`): a boot server that sends a
    /// wait packet, then an answer naming a file server that never sends, then a real one;
    /// a file server (the crate's `MtftpServer`) that pauses after block 10 until a second
    /// client has joined the group, then sends slowly. Client A: waited once, went back to
    /// discovery after the stall, opened the transfer. Client B: joined late at block 11,
    /// heard the tail for longer than the stall limit without a contiguous block (that is
    /// progress, not a stall), and fetched the head afterwards. Both files exact.
    #[test]
    fn wait_stall_open_and_late_join_on_loopback() {
        let lo = Ipv4Addr::LOCALHOST;
        let file: Vec<u8> = (0..120 * BLOCK + 100)
            .map(|i| (i * 31 + i / 509) as u8)
            .collect();
        // A port nobody uses right now, for the group.
        let port = UdpSocket::bind((lo, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let group = SocketAddrV4::new(
            Ipv4Addr::new(239, 255, 250, (std::process::id() % 200) as u8 + 1),
            port,
        );
        let stop = Arc::new(AtomicBool::new(false));

        // The file server: one socket for RRQs, ACKs and DATA to the group (TTL 0, looped).
        let fs_sock = UdpBuilder::new(SocketAddr::from((lo, 0)))
            .multicast_interface(MulticastInterface::Address(lo))
            .multicast_ttl(0)
            .multicast_loop(true)
            .bind()
            .unwrap();
        let fs = match fs_sock.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let dead = UdpSocket::bind((lo, 0)).unwrap();
        let dead_addr = match dead.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let (paused_tx, paused_rx) = mpsc::channel::<()>();
        let resume = Arc::new(AtomicBool::new(false));
        let fs_thread = {
            let (stop, resume, file) = (stop.clone(), resume.clone(), file.clone());
            std::thread::spawn(move || {
                let mut server =
                    MtftpServer::new("boot.0", file.len() as u64, group, SenderConfig::default()).unwrap();
                fs_sock
                    .set_read_timeout(Some(Duration::from_millis(5)))
                    .unwrap();
                let mut buf = vec![0u8; 2048];
                let mut out = Vec::new();
                let mut paused = false;
                while !stop.load(Ordering::Relaxed) {
                    if server.sender().blocks_sent >= 10 && !resume.load(Ordering::Relaxed) {
                        // Frozen: nothing read, nothing sent, no timers.
                        if !paused {
                            paused = true;
                            let _ = paused_tx.send(());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let now = Instant::now();
                    if let Ok((n, from)) = fs_sock.recv_from(&mut buf) {
                        server.handle(now, from, &buf[..n]);
                    }
                    server.handle_timeout(now);
                    let mut src: &[u8] = &file;
                    while let Some(t) = server.poll_transmit(now, &mut src, &mut out) {
                        let _ = fs_sock.send_to(&out, t.destination);
                        out.clear();
                        if paused {
                            // ~110 blocks after the pause take ~2.2 s, longer than `stall`.
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                server.opened()
            })
        };

        // The boot server: per client, the answers in this order.
        let bs = UdpSocket::bind((lo, 0)).unwrap();
        let bs_port = bs.local_addr().unwrap().port();
        let mac_a = MacAddr([2, 0xfb, 0, 0, 0, 0xa]);
        let mac_b = MacAddr([2, 0xfb, 0, 0, 0, 0xb]);
        let bs_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                bs.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let mut asked: HashMap<MacAddr, usize> = HashMap::new();
                let mut buf = vec![0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = bs.recv_from(&mut buf) else {
                        continue;
                    };
                    let req = DhcpMessage::parse(&buf[..n]).unwrap();
                    let k = asked.entry(req.mac()).or_default();
                    *k += 1;
                    let reply = match (req.mac() == mac_a, *k) {
                        (true, 1) => wait_packet(&req, 100),
                        // The stall makes A ask again, two REQUESTs later at most.
                        (true, 2) => answer(&req, "boot.0", group, dead_addr, 0),
                        _ => answer(&req, "boot.0", group, fs, 1),
                    };
                    bs.send_to(&reply.encode(), from).unwrap();
                }
            })
        };

        let client = |mac: MacAddr| {
            let mut cfg = PxeClientConfig::new(lo, mac, &[lo], 0x8000, Duration::from_secs(60));
            cfg.timers = PxeTimers {
                stall: Duration::from_millis(1500),
                rrq_retry: Duration::from_millis(200),
                port: bs_port,
                ..PxeTimers::default()
            };
            cfg
        };
        let (events_a_tx, events_a) = mpsc::channel();
        let cfg_a = client(mac_a);
        let a = std::thread::spawn(move || {
            discover_and_fetch_with(&cfg_a, |e| {
                let _ = events_a_tx.send(e);
            })
        });
        // The file server froze after block 10 of A's transfer: start B, and let the flow
        // go on once B listens on the group.
        paused_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("A's transfer started");
        let (answered_b_tx, answered_b) = mpsc::channel();
        let cfg_b = client(mac_b);
        let b = std::thread::spawn(move || {
            discover_and_fetch_with(&cfg_b, |e| {
                if matches!(e, PxeEvent::Answered { .. }) {
                    let _ = answered_b_tx.send(());
                }
            })
        });
        answered_b
            .recv_timeout(Duration::from_secs(30))
            .expect("B answered");
        resume.store(true, Ordering::Relaxed);
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        stop.store(true, Ordering::Relaxed);
        let opened = fs_thread.join().unwrap();
        bs_thread.join().unwrap();
        drop(dead);

        let ra = ra.unwrap();
        let rb = rb.unwrap();
        for r in [&ra, &rb] {
            assert_eq!(r.data.as_deref(), Some(&file[..]));
            assert_eq!(r.len, file.len() as u64);
            assert_eq!(r.sha256, <[u8; 32]>::from(Sha256::digest(&file)));
            assert_eq!(
                (r.file.as_str(), r.group, r.file_server),
                ("boot.0", group, fs)
            );
            assert_eq!(r.boot_server, lo);
            assert!(r.answered_at <= r.first_block_at && r.first_block_at <= r.done_at);
        }
        assert_eq!(
            (ra.start, ra.first_block, ra.waits, ra.answers),
            (TransferStart::Opened, 1, 1, 2),
            "{ra:?}"
        );
        assert!(ra.rrqs >= 1, "{ra:?}");
        assert_eq!(
            (rb.start, rb.waits, rb.answers),
            (TransferStart::JoinedLate, 0, 1),
            "{rb:?}"
        );
        // Block 11 unless the server had to resend one of the first ten.
        assert!((2..=11).contains(&rb.first_block), "{rb:?}");
        assert!(rb.rrqs >= 1, "B re-opened for the head it missed: {rb:?}");
        assert!(
            opened >= 2,
            "A's transfer, then B's for the missing head: {opened}"
        );
        let ev: Vec<PxeEvent> = events_a.try_iter().collect();
        let kinds: Vec<&str> = ev
            .iter()
            .map(|e| match e {
                PxeEvent::Asking(_) => "asking",
                PxeEvent::Wait { .. } => "wait",
                PxeEvent::Answered { file_server, .. } if *file_server == dead_addr => "dead",
                PxeEvent::Answered { .. } => "answered",
                PxeEvent::FirstBlock { .. } => "first",
                PxeEvent::Stalled(_) => "stalled",
            })
            .filter(|k| *k != "asking")
            .collect();
        assert_eq!(
            kinds,
            ["wait", "dead", "stalled", "answered", "first"],
            "{ev:?}"
        );
    }
}

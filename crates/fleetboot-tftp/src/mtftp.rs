//! Multicast TFTP, PXE style (PXE spec 2.1 §M5 "MTFTP"), sans-I/O.
//!
//! - [`McastSender`]: the server's core, shared with [`rfc2090`](crate::rfc2090): DATA blocks
//!   to a multicast group, lock-step with one *master* client whose ACKs drive it. An ACK for
//!   block `m` means "I have everything up to `m`": the sender continues at `m + 1`, so a
//!   master that already caught part of the file skips what it has.
//! - [`MtftpServer`]: one file on one (group, client port). An RRQ to the MTFTP server port
//!   opens a transfer when none is flowing; the requester is the master. RRQs while a
//!   transfer flows are ignored: their clients take what is flowing.
//! - [`MtftpClient`]: a PXE client. It listens on the group for `listen_timeout`; if nothing
//!   flows it opens the transfer itself (RRQ) and ACKs; if a transfer is flowing it takes the
//!   blocks, and when the flow stops (`delay` of silence) with blocks missing it re-opens a
//!   transfer and ACKs what it has contiguously, so the server resends only the rest.
//!
//! Blocks are 512 bytes (PXE MTFTP carries no options), numbered from 1; a file must fit
//! in 65535 blocks (32 MiB), which PXE network boot programs do.

use crate::codec::{self, ErrorCode, Mode, Packet, OP_RRQ};
use crate::server::BlockSource;
use fleetboot_proto::Transmit;
use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

pub const BLOCK: usize = 512;

/// Unicast answers waiting to leave; beyond this, requests are dropped unanswered (their
/// clients ask again).
const MAX_QUEUED: usize = 64;

/// Number of DATA blocks for a file: the last one is short (possibly empty).
pub fn block_count(len: u64, blksize: u16) -> Option<u16> {
    u16::try_from(len / u64::from(blksize) + 1).ok()
}

/// MTFTP is IPv4 only: an IPv6 peer is not one of its clients.
fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub blksize: u16,
    pub rto: Duration,
    /// Retransmissions of one block without an ACK before the master is given up.
    pub max_retries: u32,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            blksize: BLOCK as u16,
            rto: Duration::from_millis(500),
            max_retries: 5,
        }
    }
}

/// What the sender says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderEvent {
    /// The master acknowledged the last block.
    MasterDone(SocketAddrV4),
    /// The master stopped acknowledging.
    MasterLost(SocketAddrV4),
    /// The file could not be read (or was shorter than announced): the transfer stopped.
    SourceFailed(std::io::ErrorKind),
}

/// Lock-step multicast sender driven by one master: the core shared by [`MtftpServer`]
/// and [`Rfc2090Server`](crate::rfc2090::Rfc2090Server). Its datagrams all go to the group.
#[derive(Debug)]
pub struct McastSender {
    cfg: SenderConfig,
    file_len: u64,
    blocks: u16,
    group: SocketAddr,
    master: Option<SocketAddrV4>,
    /// The block to send next (when `due`), or the one awaiting its ACK.
    next: u16,
    due: bool,
    deadline: Option<Instant>,
    retries: u32,
    /// A new master's first ACK sets the position wherever it is.
    fresh: bool,
    pub blocks_sent: u64,
    events: VecDeque<SenderEvent>,
}

impl McastSender {
    /// A sender of `file_len` bytes to `group`; `None` when the file is too large for
    /// 16-bit block numbers at this block size.
    pub fn new(file_len: u64, group: SocketAddr, cfg: SenderConfig) -> Option<McastSender> {
        let blocks = block_count(file_len, cfg.blksize)?;
        Some(McastSender {
            cfg,
            file_len,
            blocks,
            group,
            master: None,
            next: 1,
            due: false,
            deadline: None,
            retries: 0,
            fresh: false,
            blocks_sent: 0,
            events: VecDeque::new(),
        })
    }

    /// The same file and group, no master, counters kept.
    fn restart(&mut self) {
        let sent = self.blocks_sent;
        *self = McastSender::new(self.file_len, self.group, self.cfg.clone()).expect("same size as before");
        self.blocks_sent = sent;
    }

    pub fn blocks(&self) -> u16 {
        self.blocks
    }

    pub fn group(&self) -> SocketAddr {
        self.group
    }

    pub fn master(&self) -> Option<SocketAddrV4> {
        self.master
    }

    pub fn is_idle(&self) -> bool {
        self.master.is_none()
    }

    /// A (new) master, which has everything up to `have` (0: nothing).
    pub fn set_master(&mut self, now: Instant, master: SocketAddrV4, have: u16) {
        self.master = Some(master);
        self.retries = 0;
        self.deadline = None;
        self.fresh = true;
        self.ack_from(now, master, have);
    }

    /// A master that must first confirm (RFC 2090: ACK the OACK): nothing is sent until its
    /// ACK arrives, but it is given up like any master if that ACK never comes.
    pub fn await_master(&mut self, now: Instant, master: SocketAddrV4) {
        self.master = Some(master);
        self.retries = 0;
        self.due = false;
        self.fresh = true;
        self.deadline = Some(now + self.cfg.rto * (self.cfg.max_retries + 1));
    }

    /// An ACK. Only the master's count.
    pub fn ack_from(&mut self, now: Instant, from: SocketAddrV4, block: u16) {
        if self.master != Some(from) {
            return;
        }
        if block >= self.blocks {
            self.events.push_back(SenderEvent::MasterDone(from));
            self.master = None;
            self.due = false;
            self.deadline = None;
            return;
        }
        if block + 1 >= self.next || self.fresh {
            self.fresh = false;
            self.next = block + 1;
            self.due = true;
            self.retries = 0;
            self.deadline = Some(now);
        }
    }

    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(d) = self.deadline else { return };
        if now < d || self.due {
            return;
        }
        if self.retries >= self.cfg.max_retries {
            if let Some(m) = self.master.take() {
                self.events.push_back(SenderEvent::MasterLost(m));
            }
            self.deadline = None;
            return;
        }
        self.retries += 1;
        self.due = true;
    }

    /// Appends the next DATA datagram for the group, if one is due.
    pub fn poll_transmit(&mut self, now: Instant, file: &mut dyn BlockSource, buf: &mut Vec<u8>) -> Option<Transmit> {
        if !self.due || self.master.is_none() {
            return None;
        }
        self.due = false;
        let start = buf.len();
        codec::encode_data_header(self.next, buf);
        let bs = usize::from(self.cfg.blksize);
        let offset = u64::from(self.next - 1) * bs as u64;
        let want = bs.min(self.file_len.saturating_sub(offset) as usize);
        let data = buf.len();
        buf.resize(data + want, 0);
        let mut got = 0;
        while got < want {
            match file.read_at(offset + got as u64, &mut buf[data + got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.truncate(start);
                    self.fail(e.kind());
                    return None;
                }
            }
        }
        if got < want {
            // A short block would tell every listener the file ended here.
            buf.truncate(start);
            self.fail(std::io::ErrorKind::UnexpectedEof);
            return None;
        }
        self.blocks_sent += 1;
        self.deadline = Some(now + self.cfg.rto);
        Some(Transmit::new(self.group, buf.len() - start))
    }

    fn fail(&mut self, kind: std::io::ErrorKind) {
        self.events.push_back(SenderEvent::SourceFailed(kind));
        self.master = None;
        self.due = false;
        self.deadline = None;
    }
}

/// What an [`MtftpServer`] reports, for records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtftpEvent {
    /// An RRQ opened a transfer; `master` drives it.
    Opened { master: SocketAddrV4 },
    /// The master has the whole file.
    MasterDone(SocketAddrV4),
    /// The master stopped acknowledging; the transfer stops until the next RRQ.
    MasterLost(SocketAddrV4),
    /// The file could not be read.
    SourceFailed(std::io::ErrorKind),
}

/// PXE MTFTP server side for one file on one group, reached on two sockets: RRQs on the
/// MTFTP server port, ACKs on the transfer's own port. DATA goes to the group; an ERROR
/// answering an RRQ goes to its sender (the shell sends it from the port the RRQ came to).
#[derive(Debug)]
pub struct MtftpServer {
    pub file: String,
    sender: McastSender,
    opened: u32,
    errors: VecDeque<SocketAddrV4>,
    events: VecDeque<MtftpEvent>,
}

impl MtftpServer {
    /// `None` when the file needs more than 65535 blocks of 512 bytes.
    pub fn new(file: &str, file_len: u64, group: SocketAddrV4, cfg: SenderConfig) -> Option<MtftpServer> {
        let cfg = SenderConfig {
            blksize: BLOCK as u16,
            ..cfg
        };
        Some(MtftpServer {
            file: file.to_string(),
            sender: McastSender::new(file_len, SocketAddr::V4(group), cfg)?,
            opened: 0,
            errors: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    pub fn sender(&self) -> &McastSender {
        &self.sender
    }

    /// Transfers opened so far.
    pub fn opened(&self) -> u32 {
        self.opened
    }

    /// A datagram on the MTFTP server port or the transfer's port.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Some(from) = v4(from) else { return };
        match Packet::parse(bytes) {
            Ok(Packet::Rrq { filename, mode, .. }) => {
                if filename != self.file || mode != Mode::Octet {
                    if self.errors.len() < MAX_QUEUED {
                        self.errors.push_back(from);
                    }
                    return;
                }
                if self.sender.is_idle() {
                    self.opened += 1;
                    self.events.push_back(MtftpEvent::Opened { master: from });
                    self.sender.set_master(now, from, 0);
                }
            }
            Ok(Packet::Ack { block }) => self.sender.ack_from(now, from, block),
            // The master gave up: stop, and let the next RRQ open afresh.
            Ok(Packet::Error { .. }) if self.sender.master() == Some(from) => self.sender.restart(),
            _ => {}
        }
        self.collect();
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.sender.handle_timeout(now);
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(e) = self.sender.poll_event() {
            self.events.push_back(match e {
                SenderEvent::MasterDone(m) => MtftpEvent::MasterDone(m),
                SenderEvent::MasterLost(m) => MtftpEvent::MasterLost(m),
                SenderEvent::SourceFailed(k) => MtftpEvent::SourceFailed(k),
            });
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sender.poll_timeout()
    }

    /// Appends the next datagram: an ERROR owed to a requester, else DATA for the group.
    pub fn poll_transmit(&mut self, now: Instant, file: &mut dyn BlockSource, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some(to) = self.errors.pop_front() {
            return Some(fleetboot_proto::append(buf, SocketAddr::V4(to), |b| {
                codec::encode_error(ErrorCode::FileNotFound, "not on this group", b)
            }));
        }
        let t = self.sender.poll_transmit(now, file, buf);
        self.collect();
        t
    }

    pub fn poll_event(&mut self) -> Option<MtftpEvent> {
        self.events.pop_front()
    }
}

#[derive(Debug, Clone)]
pub struct MtftpClientConfig {
    pub file: String,
    /// The MTFTP server's address and port (PXE sub-option 3 with siaddr).
    pub server: SocketAddrV4,
    /// Seconds to listen before opening (PXE sub-option 4).
    pub listen_timeout: Duration,
    /// Silence after which a started reception re-opens (PXE sub-option 5).
    pub delay: Duration,
    pub rrq_retry: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPhase {
    Listening,
    /// We sent the RRQ and ACK what we have.
    Master,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientOut {
    Rrq,
    Ack(u16),
}

/// A PXE MTFTP client: listens, opens when nothing flows, ACKs as master, re-opens to fill
/// gaps. Its socket(s) hear the group and the server's unicast; `handle` takes both.
#[derive(Debug)]
pub struct MtftpClient {
    cfg: MtftpClientConfig,
    phase: ClientPhase,
    blocks: BTreeMap<u16, Vec<u8>>,
    /// Highest block held with every block before it: kept up to date as blocks arrive,
    /// since every DATA needs it and recounting would cost a walk over the whole file.
    contiguous: u16,
    last: Option<u16>,
    /// When silence will make us open a transfer.
    quiet_until: Instant,
    tid: Option<SocketAddrV4>,
    out: VecDeque<(SocketAddrV4, ClientOut)>,
    pub opens: u32,
    pub duplicates: u64,
}

impl MtftpClient {
    pub fn new(now: Instant, cfg: MtftpClientConfig) -> MtftpClient {
        MtftpClient {
            quiet_until: now + cfg.listen_timeout,
            cfg,
            phase: ClientPhase::Listening,
            blocks: BTreeMap::new(),
            contiguous: 0,
            last: None,
            tid: None,
            out: VecDeque::new(),
            opens: 0,
            duplicates: 0,
        }
    }

    pub fn phase(&self) -> ClientPhase {
        self.phase
    }

    /// Highest block number held with every block before it.
    pub fn contiguous(&self) -> u16 {
        self.contiguous
    }

    fn complete(&self) -> bool {
        self.last.is_some_and(|l| self.contiguous() >= l)
    }

    /// The file, once [`ClientPhase::Done`].
    pub fn file(&self) -> Option<Vec<u8>> {
        (self.phase == ClientPhase::Done).then(|| self.blocks.values().flatten().copied().collect())
    }

    fn queue(&mut self, to: SocketAddrV4, what: ClientOut) {
        if self.out.len() < MAX_QUEUED {
            self.out.push_back((to, what));
        }
    }

    /// A datagram heard on the group or unicast from the server's transfer port (DATA;
    /// anything else is ignored).
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Some(from) = v4(from) else { return };
        let Some((block, data)) = codec::parse_data(bytes) else {
            return;
        };
        if block == 0 || data.len() > BLOCK || self.phase == ClientPhase::Done {
            return;
        }
        if data.len() < BLOCK {
            self.last = Some(block);
        }
        if self.blocks.insert(block, data.to_vec()).is_some() {
            self.duplicates += 1;
        }
        while self
            .contiguous
            .checked_add(1)
            .is_some_and(|next| self.blocks.contains_key(&next))
        {
            self.contiguous += 1;
        }
        self.quiet_until = now + self.cfg.delay;
        if self.phase == ClientPhase::Master {
            self.tid = Some(from);
            let c = self.contiguous();
            // Only ACK progress we can vouch for; a gap is refilled by the server's timeout.
            if c >= block || self.complete() {
                self.queue(from, ClientOut::Ack(c));
            }
        }
        if self.complete() {
            self.phase = ClientPhase::Done;
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.phase != ClientPhase::Done).then_some(self.quiet_until)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == ClientPhase::Done || now < self.quiet_until {
            return;
        }
        // Nothing flowed (or the flow stopped) and the file is incomplete: open a transfer.
        self.phase = ClientPhase::Master;
        self.opens += 1;
        self.queue(self.cfg.server, ClientOut::Rrq);
        // A server already sending to us as master gets our progress too.
        if let Some(tid) = self.tid {
            self.queue(tid, ClientOut::Ack(self.contiguous()));
        }
        self.quiet_until = now + self.cfg.rrq_retry.max(self.cfg.delay);
    }

    /// Appends the next unicast datagram: an RRQ to the server port or an ACK to the
    /// transfer's port.
    pub fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let (to, what) = self.out.pop_front()?;
        Some(fleetboot_proto::append(buf, SocketAddr::V4(to), |b| match what {
            ClientOut::Rrq => codec::encode_request(OP_RRQ, &self.cfg.file, Mode::Octet, &[], b),
            ClientOut::Ack(n) => codec::encode_ack(n, b),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetboot_testkit::{LinkConfig, Network, Node, Rng, Sim, SimClock};
    use std::net::{IpAddr, Ipv4Addr};

    const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1759);
    const TID: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40000);
    const GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 1, 1, 1), 1758);

    fn client_addr(i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, i as u8 + 1), 2000)
    }

    /// The file server (RRQs on 1759, ACKs on its transfer port, DATA to the group from
    /// the transfer port) or a client that starts listening at `start`.
    enum Party {
        Server(MtftpServer, Vec<u8>),
        Client { me: SocketAddrV4, start: Instant, cfg: MtftpClientConfig, c: Option<MtftpClient> },
    }

    impl Node for Party {
        fn handle(&mut self, now: Instant, from: SocketAddr, _to: SocketAddr, bytes: &[u8]) {
            match self {
                Party::Server(m, _) => m.handle(now, from, bytes),
                Party::Client { c: Some(c), .. } => c.handle(now, from, bytes),
                Party::Client { c: None, .. } => {}
            }
        }
        fn handle_timeout(&mut self, now: Instant) {
            match self {
                Party::Server(m, _) => m.handle_timeout(now),
                Party::Client { c: Some(c), .. } => c.handle_timeout(now),
                Party::Client { c, start, cfg, .. } => {
                    if now >= *start {
                        *c = Some(MtftpClient::new(now, cfg.clone()));
                    }
                }
            }
        }
        fn poll_timeout(&self) -> Option<Instant> {
            match self {
                Party::Server(m, _) => m.poll_timeout(),
                Party::Client { c: Some(c), .. } => c.poll_timeout(),
                Party::Client { start, .. } => Some(*start),
            }
        }
        fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
            match self {
                Party::Server(m, file) => {
                    let t = m.poll_transmit(now, &mut file.as_slice(), buf)?;
                    let from = if t.destination == SocketAddr::V4(GROUP) { TID } else { SERVER };
                    Some((SocketAddr::V4(from), t))
                }
                Party::Client { me, c: Some(c), .. } => c.poll_transmit(now, buf).map(|t| (SocketAddr::V4(*me), t)),
                Party::Client { c: None, .. } => None,
            }
        }
    }

    struct Run {
        opened: u32,
        blocks_sent: u64,
        opens: Vec<u32>,
    }

    /// Clients start at different times (some while a transfer flows) over a link losing
    /// `loss` per mille in each direction, independently per client; each must end with
    /// the exact file.
    fn run(seed: u64, len: usize, starts_ms: &[u64], loss: u32) -> Run {
        let file: Vec<u8> = (0..len).map(|i| (i * 7 + i / 511) as u8).collect();
        let clock = SimClock::new();
        let t0 = clock.now();
        let link = LinkConfig { loss_ppm: loss * 1000, ..LinkConfig::PERFECT };
        let mut sim = Sim::new(clock, Network::new(Rng::new(seed), link));
        let server = MtftpServer::new("boot.0", len as u64, GROUP, SenderConfig::default()).unwrap();
        let s = sim.add(Party::Server(server, file.clone()), &[IpAddr::V4(*SERVER.ip())]);
        let mut clients = Vec::new();
        for (i, &ms) in starts_ms.iter().enumerate() {
            let me = client_addr(i);
            sim.net.join(SocketAddr::V4(GROUP), IpAddr::V4(*me.ip()));
            let cfg = MtftpClientConfig {
                file: "boot.0".into(),
                server: SERVER,
                listen_timeout: Duration::from_millis(300),
                delay: Duration::from_millis(300),
                rrq_retry: Duration::from_millis(500),
            };
            let start = t0 + Duration::from_millis(ms);
            clients.push(sim.add(Party::Client { me, start, cfg, c: None }, &[IpAddr::V4(*me.ip())]));
        }
        let done = |sim: &Sim<Party>| {
            clients.iter().all(|&i| matches!(sim.node(i), Party::Client { c: Some(c), .. } if c.phase() == ClientPhase::Done))
        };
        sim.run_until(5_000_000, done).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let mut opens = Vec::new();
        for (k, &i) in clients.iter().enumerate() {
            let Party::Client { c: Some(c), .. } = sim.node(i) else { unreachable!() };
            assert_eq!(c.file().as_deref(), Some(&file[..]), "seed {seed} client {k}");
            opens.push(c.opens);
        }
        let Party::Server(m, _) = sim.node(s) else { unreachable!() };
        Run { opened: m.opened(), blocks_sent: m.sender().blocks_sent, opens }
    }

    #[test]
    fn a_request_for_another_file_gets_an_error_from_the_server_port() {
        let t0 = Instant::now();
        let mut m = MtftpServer::new("boot.0", 100, GROUP, SenderConfig::default()).unwrap();
        let mut rrq = Vec::new();
        codec::encode_request(OP_RRQ, "other", Mode::Octet, &[], &mut rrq);
        m.handle(t0, SocketAddr::V4(client_addr(0)), &rrq);
        let mut buf = Vec::new();
        let t = m.poll_transmit(t0, &mut &[0u8; 100][..], &mut buf).unwrap();
        assert_eq!(t.destination, SocketAddr::V4(client_addr(0)));
        assert!(matches!(Packet::parse(&buf), Ok(Packet::Error { code: ErrorCode::FileNotFound, .. })));
        assert_eq!((m.opened(), m.poll_event()), (0, None));
        codec::encode_request(OP_RRQ, "boot.0", Mode::Octet, &[], {
            rrq.clear();
            &mut rrq
        });
        m.handle(t0, SocketAddr::V4(client_addr(1)), &rrq);
        assert_eq!(m.poll_event(), Some(MtftpEvent::Opened { master: client_addr(1) }));
        buf.clear();
        let t = m.poll_transmit(t0, &mut &[0u8; 100][..], &mut buf).unwrap();
        assert_eq!((t.destination, t.size), (SocketAddr::V4(GROUP), 104));
    }

    #[test]
    fn a_short_source_stops_the_transfer_instead_of_sending_a_short_block() {
        let t0 = Instant::now();
        let mut m = MtftpServer::new("boot.0", 2000, GROUP, SenderConfig::default()).unwrap();
        let mut rrq = Vec::new();
        codec::encode_request(OP_RRQ, "boot.0", Mode::Octet, &[], &mut rrq);
        m.handle(t0, SocketAddr::V4(client_addr(0)), &rrq);
        let mut buf = Vec::new();
        assert!(m.poll_transmit(t0, &mut &[0u8; 100][..], &mut buf).is_none());
        assert!(buf.is_empty());
        assert_eq!(m.poll_event(), Some(MtftpEvent::Opened { master: client_addr(0) }));
        assert_eq!(m.poll_event(), Some(MtftpEvent::SourceFailed(std::io::ErrorKind::UnexpectedEof)));
        assert!(m.sender().is_idle());
    }

    #[test]
    fn one_client_opens_and_receives() {
        let r = run(1, 10 * BLOCK + 100, &[0], 0);
        assert_eq!((r.opened, r.opens[0], r.blocks_sent), (1, 1, 11));
    }

    #[test]
    fn exact_multiple_of_the_block_size_ends_with_an_empty_block() {
        assert_eq!(run(2, 4 * BLOCK, &[0], 0).blocks_sent, 5);
    }

    #[test]
    fn listeners_share_one_transfer() {
        // Five clients within the listen window: one transfer, one master, all complete.
        let r = run(3, 40 * BLOCK + 3, &[0, 10, 50, 100, 200], 0);
        assert_eq!(r.opened, 1, "one transfer serves everyone listening");
        assert_eq!(r.opens.iter().sum::<u32>(), 1);
        assert_eq!(r.blocks_sent, 41);
    }

    #[test]
    fn late_joiner_takes_the_flow_then_fetches_the_rest() {
        // The late client arrives mid-transfer: it keeps the tail it hears, then re-opens and
        // ACKs what it has contiguously so only the missing head is resent.
        let len = 200 * BLOCK + 9;
        let r = run(4, len, &[0, 400], 0);
        assert_eq!((r.opens[1], r.opened), (1, 2));
        let sent = r.blocks_sent;
        assert!(
            sent < 2 * 201,
            "the second transfer skipped blocks the joiner had: {sent}"
        );
    }

    #[test]
    fn lossy_many_seeds() {
        for seed in 0..40 {
            run(seed, 60 * BLOCK + 77, &[0, 30, 200, 600, 900], 30);
        }
    }
}

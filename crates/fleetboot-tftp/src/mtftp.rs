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
//! Blocks are 512 bytes (PXE MTFTP negotiates no options), numbered from 1; a file must fit
//! in 65535 blocks (32 MiB), which PXE network boot programs do.

use crate::codec::{self, ErrorCode, Mode, Packet, OP_RRQ};
use crate::server::BlockSource;
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

pub const BLOCK: usize = 512;

/// Number of DATA blocks for a file: the last one is short (possibly empty).
pub fn block_count(len: u64, blksize: u16) -> Option<u16> {
    u16::try_from(len / u64::from(blksize) + 1).ok()
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
}

/// Lock-step multicast sender driven by one master.
#[derive(Debug)]
pub struct McastSender {
    cfg: SenderConfig,
    file_len: u64,
    blocks: u16,
    master: Option<SocketAddrV4>,
    /// The block to send next (when `due`), or the one awaiting its ACK.
    next: u16,
    due: bool,
    deadline: Option<Instant>,
    retries: u32,
    /// A new master's first ACK sets the position wherever it is.
    fresh: bool,
    pub blocks_sent: u64,
    events: Vec<SenderEvent>,
}

impl McastSender {
    /// `None` when the file is too large for 16-bit block numbers at this block size.
    pub fn new(file_len: u64, cfg: SenderConfig) -> Option<McastSender> {
        let blocks = block_count(file_len, cfg.blksize)?;
        Some(McastSender {
            cfg,
            file_len,
            blocks,
            master: None,
            next: 1,
            due: false,
            deadline: None,
            retries: 0,
            fresh: false,
            blocks_sent: 0,
            events: Vec::new(),
        })
    }

    pub fn blocks(&self) -> u16 {
        self.blocks
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
            self.events.push(SenderEvent::MasterDone(from));
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

    pub fn take_events(&mut self) -> Vec<SenderEvent> {
        std::mem::take(&mut self.events)
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
                self.events.push(SenderEvent::MasterLost(m));
            }
            self.deadline = None;
            return;
        }
        self.retries += 1;
        self.due = true;
    }

    /// The next DATA datagram for the group, if one is due.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        file: &mut dyn BlockSource,
        out: &mut Vec<u8>,
    ) -> std::io::Result<bool> {
        if !self.due || self.master.is_none() {
            return Ok(false);
        }
        self.due = false;
        out.clear();
        codec::encode_data_header(self.next, out);
        let bs = usize::from(self.cfg.blksize);
        let offset = u64::from(self.next - 1) * bs as u64;
        let want = bs.min(self.file_len.saturating_sub(offset) as usize);
        let start = out.len();
        out.resize(start + want, 0);
        let mut got = 0;
        while got < want {
            let n = file.read_at(offset + got as u64, &mut out[start + got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        out.truncate(start + got);
        self.blocks_sent += 1;
        self.deadline = Some(now + self.cfg.rto);
        Ok(true)
    }
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// The multicast group and client port.
    Group,
    Unicast(SocketAddrV4),
}

/// PXE MTFTP server side for one file on one group.
#[derive(Debug)]
pub struct MtftpServer {
    pub file: String,
    sender: McastSender,
    /// Transfers opened so far (for records and tests).
    pub opened: u32,
}

impl MtftpServer {
    pub fn new(file: &str, file_len: u64, cfg: SenderConfig) -> Option<MtftpServer> {
        let cfg = SenderConfig {
            blksize: BLOCK as u16,
            ..cfg
        };
        Some(MtftpServer {
            file: file.to_string(),
            sender: McastSender::new(file_len, cfg)?,
            opened: 0,
        })
    }

    pub fn sender(&self) -> &McastSender {
        &self.sender
    }

    /// A datagram on the MTFTP server port or the transfer's port. Returns an ERROR to
    /// unicast back, if any.
    pub fn handle(&mut self, now: Instant, from: SocketAddrV4, bytes: &[u8]) -> Option<Vec<u8>> {
        match Packet::parse(bytes) {
            Ok(Packet::Rrq { filename, mode, .. }) => {
                if filename != self.file || mode != Mode::Octet {
                    let mut e = Vec::new();
                    codec::encode_error(ErrorCode::FileNotFound, "not on this group", &mut e);
                    return Some(e);
                }
                if self.sender.is_idle() {
                    self.opened += 1;
                    self.sender.set_master(now, from, 0);
                }
                None
            }
            Ok(Packet::Ack { block }) => {
                self.sender.ack_from(now, from, block);
                None
            }
            Ok(Packet::Error { .. }) => {
                if self.sender.master() == Some(from) {
                    self.sender = McastSender::new(self.sender.file_len, self.sender.cfg.clone())
                        .expect("same size as before");
                }
                None
            }
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.sender.handle_timeout(now);
        self.sender.take_events();
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sender.poll_timeout()
    }

    /// DATA for the group.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        file: &mut dyn BlockSource,
        out: &mut Vec<u8>,
    ) -> std::io::Result<bool> {
        self.sender.poll_transmit(now, file, out)
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

/// A PXE MTFTP client: listens, opens when nothing flows, ACKs as master, re-opens to fill
/// gaps.
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
    out: Vec<(SocketAddrV4, Vec<u8>)>,
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
            out: Vec::new(),
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

    /// A DATA datagram heard on the group (or unicast from the server's transfer port).
    pub fn handle_data(&mut self, now: Instant, from: SocketAddrV4, bytes: &[u8]) {
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
            let mut ack = Vec::new();
            let c = self.contiguous();
            codec::encode_ack(c, &mut ack);
            // Only ACK progress we can vouch for; a gap is refilled by the server's timeout.
            if c >= block || self.complete() {
                self.out.push((from, ack));
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
        let mut rrq = Vec::new();
        codec::encode_request(OP_RRQ, &self.cfg.file, Mode::Octet, &[], &mut rrq);
        self.out.push((self.cfg.server, rrq));
        // A server already sending to us as master gets our progress too.
        if let Some(tid) = self.tid {
            let mut ack = Vec::new();
            codec::encode_ack(self.contiguous(), &mut ack);
            self.out.push((tid, ack));
        }
        self.quiet_until = now + self.cfg.rrq_retry.max(self.cfg.delay);
    }

    /// Datagrams to unicast: RRQs to the server port, ACKs to the transfer's port.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddrV4, Vec<u8>)> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn chance(&mut self, per_mille: u64) -> bool {
            self.next() % 1000 < per_mille
        }
    }

    const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1759);
    const TID: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40000);

    fn client_addr(i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, i as u8 + 1), 2000)
    }

    /// Clients start at different times (some while a transfer flows) over a lossy link; each
    /// must end with the exact file. Time advances in 10 ms ticks; delivery is per tick.
    fn run(seed: u64, len: usize, starts_ms: &[u64], loss: u64) -> (MtftpServer, Vec<MtftpClient>) {
        let mut rng = Rng(seed * 2 + 1);
        let file: Vec<u8> = (0..len).map(|i| (i * 7 + i / 511) as u8).collect();
        let t0 = Instant::now();
        let cfg = |_: usize| MtftpClientConfig {
            file: "boot.0".into(),
            server: SERVER,
            listen_timeout: Duration::from_millis(300),
            delay: Duration::from_millis(300),
            rrq_retry: Duration::from_millis(500),
        };
        let mut server = MtftpServer::new("boot.0", len as u64, SenderConfig::default()).unwrap();
        let mut clients: Vec<Option<MtftpClient>> = starts_ms.iter().map(|_| None).collect();
        let mut src: &[u8] = &file;
        let mut buf = Vec::new();
        for tick in 0..20_000u64 {
            let now = t0 + Duration::from_millis(tick * 10);
            for (i, c) in clients.iter_mut().enumerate() {
                if c.is_none() && tick * 10 >= starts_ms[i] {
                    *c = Some(MtftpClient::new(now, cfg(i)));
                }
            }
            server.handle_timeout(now);
            // Several blocks per tick: a lock-step round trip is well under 10 ms here.
            for _ in 0..8 {
                if !server.poll_transmit(now, &mut src, &mut buf).unwrap() {
                    break;
                }
                for c in clients.iter_mut().flatten() {
                    if !rng.chance(loss) {
                        c.handle_data(now, TID, &buf);
                    }
                }
                for (i, c) in clients.iter_mut().enumerate() {
                    let Some(c) = c else { continue };
                    while let Some((to, bytes)) = c.poll_transmit() {
                        if rng.chance(loss) {
                            continue;
                        }
                        let to_server = if to == SERVER { SERVER } else { TID };
                        assert!(to_server == SERVER || to == TID);
                        server.handle(now, client_addr(i), &bytes);
                    }
                }
            }
            for (i, c) in clients.iter_mut().enumerate() {
                let Some(c) = c else { continue };
                c.handle_timeout(now);
                while let Some((_, bytes)) = c.poll_transmit() {
                    if !rng.chance(loss) {
                        server.handle(now, client_addr(i), &bytes);
                    }
                }
            }
            if clients
                .iter()
                .all(|c| c.as_ref().is_some_and(|c| c.phase() == ClientPhase::Done))
            {
                break;
            }
        }
        let clients: Vec<MtftpClient> = clients.into_iter().map(|c| c.unwrap()).collect();
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(
                c.file().as_deref(),
                Some(&file[..]),
                "seed {seed} client {i}"
            );
        }
        (server, clients)
    }

    #[test]
    fn one_client_opens_and_receives() {
        let (server, clients) = run(1, 10 * BLOCK + 100, &[0], 0);
        assert_eq!(server.opened, 1);
        assert_eq!(clients[0].opens, 1);
        assert_eq!(server.sender().blocks_sent, 11);
    }

    #[test]
    fn exact_multiple_of_the_block_size_ends_with_an_empty_block() {
        let (server, _) = run(2, 4 * BLOCK, &[0], 0);
        assert_eq!(server.sender().blocks_sent, 5);
    }

    #[test]
    fn listeners_share_one_transfer() {
        // Five clients within the listen window: one transfer, one master, all complete.
        let (server, clients) = run(3, 40 * BLOCK + 3, &[0, 10, 50, 100, 200], 0);
        assert_eq!(server.opened, 1, "one transfer serves everyone listening");
        assert_eq!(clients.iter().map(|c| c.opens).sum::<u32>(), 1);
        assert_eq!(server.sender().blocks_sent, 41);
    }

    #[test]
    fn late_joiner_takes_the_flow_then_fetches_the_rest() {
        // The late client arrives mid-transfer: it keeps the tail it hears, then re-opens and
        // ACKs what it has contiguously so only the missing head is resent.
        let len = 200 * BLOCK + 9;
        let (server, clients) = run(4, len, &[0, 400], 0);
        assert_eq!(clients[1].opens, 1);
        assert_eq!(server.opened, 2);
        let sent = server.sender().blocks_sent;
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

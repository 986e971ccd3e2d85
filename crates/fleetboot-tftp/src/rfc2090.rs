//! RFC 2090 multicast TFTP (the `multicast` option), server side, sans-I/O.
//!
//! A client asks with `multicast` in its RRQ. Every client gets an OACK carrying
//! `multicast=<group>,<port>,<mc>`; the first (while no master exists) gets `mc=1` and is the
//! master: it ACKs the OACK (block 0) and then every block, driving the lock-step
//! [`McastSender`] that multicasts DATA to the group. The others (`mc=0`) listen. When the
//! master has the whole file (ACK of the last block) or stops answering, the next client in
//! line is made master with a fresh OACK `mc=1`; it ACKs the last block it holds
//! contiguously and the sender continues from there, so late joiners get the blocks they
//! missed. A client that ACKs the last block leaves the list.

use crate::codec::{self, ErrorCode, Mode, Packet};
use crate::mtftp::{McastSender, SenderConfig, SenderEvent};
use crate::server::BlockSource;
use fleetboot_proto::Transmit;
use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Instant;

/// Unicast answers (OACKs, errors) waiting to leave; beyond this, requests are dropped
/// unanswered (their clients ask again).
const MAX_QUEUED: usize = 64;
/// Clients waiting for one file; more are refused.
pub const MAX_CLIENTS: usize = 4096;

#[derive(Debug)]
pub struct Rfc2090Server {
    pub file: String,
    file_len: u64,
    group: SocketAddrV4,
    cfg: SenderConfig,
    sender: McastSender,
    /// Clients waiting for (or receiving) the file, in arrival order; the master among them.
    clients: Vec<SocketAddrV4>,
    replies: VecDeque<(SocketAddrV4, Vec<u8>)>,
    pub masters: u32,
}

impl Rfc2090Server {
    /// A server of `file` to `group` in blocks of `cfg.blksize` (what the OACK confirms);
    /// `None` when the file needs more than 65535 blocks.
    pub fn new(file: &str, file_len: u64, group: SocketAddrV4, cfg: SenderConfig) -> Option<Self> {
        Some(Rfc2090Server {
            file: file.to_string(),
            file_len,
            group,
            sender: McastSender::new(file_len, SocketAddr::V4(group), cfg.clone())?,
            cfg,
            clients: Vec::new(),
            replies: VecDeque::new(),
            masters: 0,
        })
    }

    pub fn clients(&self) -> &[SocketAddrV4] {
        &self.clients
    }

    pub fn sender(&self) -> &McastSender {
        &self.sender
    }

    fn reply(&mut self, to: SocketAddrV4, bytes: Vec<u8>) {
        if self.replies.len() < MAX_QUEUED {
            self.replies.push_back((to, bytes));
        }
    }

    fn oack(&self, master: bool, asked: &[(String, String)]) -> Vec<u8> {
        let mut opts = vec![(
            "multicast".to_string(),
            format!(
                "{},{},{}",
                self.group.ip(),
                self.group.port(),
                u8::from(master)
            ),
        )];
        for (k, _) in asked {
            match k.to_ascii_lowercase().as_str() {
                "blksize" => opts.push((k.clone(), self.cfg.blksize.to_string())),
                "tsize" => opts.push((k.clone(), self.file_len.to_string())),
                _ => {}
            }
        }
        let mut out = Vec::new();
        codec::encode_oack(&opts, &mut out);
        out
    }

    fn error(&mut self, to: SocketAddrV4, code: ErrorCode, message: &str) {
        let mut e = Vec::new();
        codec::encode_error(code, message, &mut e);
        self.reply(to, e);
    }

    /// A datagram from a client (its RRQ, ACKs, ERROR) on the transfer's socket.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let SocketAddr::V4(from) = from else { return };
        match Packet::parse(bytes) {
            Ok(Packet::Rrq {
                filename,
                mode,
                options,
            }) => {
                let wants = options
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("multicast"));
                if filename != self.file || mode != Mode::Octet || !wants {
                    return self.error(from, ErrorCode::IllegalOperation, "multicast octet RRQ only");
                }
                if !self.clients.contains(&from) {
                    if self.clients.len() >= MAX_CLIENTS {
                        return self.error(from, ErrorCode::DiskFull, "too many clients for this file");
                    }
                    self.clients.push(from);
                }
                let master = self.sender.is_idle() || self.sender.master() == Some(from);
                if self.sender.is_idle() {
                    self.masters += 1;
                    self.sender.await_master(now, from);
                }
                let oack = self.oack(master, &options);
                self.reply(from, oack);
            }
            Ok(Packet::Ack { block }) => {
                self.sender.ack_from(now, from, block);
                if block >= self.sender.blocks() {
                    self.clients.retain(|c| *c != from);
                }
                self.next_master(now);
            }
            Ok(Packet::Error { .. }) => {
                self.clients.retain(|c| *c != from);
                if self.sender.master() == Some(from) {
                    self.sender = McastSender::new(self.file_len, SocketAddr::V4(self.group), self.cfg.clone())
                        .expect("same size as before");
                }
                self.next_master(now);
            }
            _ => {}
        }
    }

    /// After the master finished or was lost: make the next waiting client master.
    fn next_master(&mut self, now: Instant) {
        while let Some(e) = self.sender.poll_event() {
            match e {
                SenderEvent::MasterDone(m) | SenderEvent::MasterLost(m) => self.clients.retain(|c| *c != m),
                // Nothing more can be sent: tell the waiting clients and let them go.
                SenderEvent::SourceFailed(_) => {
                    for c in std::mem::take(&mut self.clients) {
                        self.error(c, ErrorCode::NotDefined, "read error");
                    }
                }
            }
        }
        if !self.sender.is_idle() {
            return;
        }
        if let Some(&next) = self.clients.first() {
            self.masters += 1;
            self.sender.await_master(now, next);
            let oack = self.oack(true, &[]);
            self.reply(next, oack);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sender.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.sender.handle_timeout(now);
        self.next_master(now);
    }

    /// Appends the next datagram: an OACK or ERROR owed to a client, else DATA for the
    /// group.
    pub fn poll_transmit(&mut self, now: Instant, file: &mut dyn BlockSource, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some((to, bytes)) = self.replies.pop_front() {
            return Some(fleetboot_proto::append(buf, SocketAddr::V4(to), |b| b.extend_from_slice(&bytes)));
        }
        let t = self.sender.poll_transmit(now, file, buf);
        if t.is_none() {
            // A read failure shows up as an event: answer the clients it strands.
            self.next_master(now);
            if let Some((to, bytes)) = self.replies.pop_front() {
                return Some(fleetboot_proto::append(buf, SocketAddr::V4(to), |b| b.extend_from_slice(&bytes)));
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    /// A minimal RFC 2090 client as atftp behaves: RRQ with multicast, ACK 0 when master,
    /// ACK every block while master, collect group DATA always; when made master later,
    /// ACK the last contiguous block.
    struct Client {
        addr: SocketAddrV4,
        master: bool,
        blocks: BTreeMap<u16, Vec<u8>>,
        last: Option<u16>,
    }

    impl Client {
        fn contiguous(&self) -> u16 {
            let mut n = 0;
            while self.blocks.contains_key(&(n + 1)) {
                n += 1;
            }
            n
        }
        fn done(&self) -> bool {
            self.last.is_some_and(|l| self.contiguous() >= l)
        }
        fn on_unicast(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
            let Ok(Packet::Oack { options }) = Packet::parse(bytes) else {
                return None;
            };
            let mc = options.iter().find(|(k, _)| k == "multicast")?;
            self.master = mc.1.ends_with(",1");
            let mut ack = Vec::new();
            self.master.then(|| {
                codec::encode_ack(self.contiguous(), &mut ack);
                ack
            })
        }
        fn on_data(&mut self, bytes: &[u8], bs: usize) -> Option<Vec<u8>> {
            let (b, d) = codec::parse_data(bytes)?;
            if d.len() < bs {
                self.last = Some(b);
            }
            self.blocks.insert(b, d.to_vec());
            let mut ack = Vec::new();
            self.master.then(|| {
                codec::encode_ack(self.contiguous(), &mut ack);
                ack
            })
        }
    }

    #[test]
    fn master_then_late_joiner_becomes_master_and_gets_the_head() {
        let bs = 1024u16;
        let len = 50 * bs as usize + 33;
        let file: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 1, 1, 1), 1758);
        let cfg = SenderConfig {
            blksize: bs,
            ..SenderConfig::default()
        };
        let mut s = Rfc2090Server::new("f", len as u64, group, cfg).unwrap();
        let t0 = Instant::now();
        let mut clients: Vec<Client> = (0..3)
            .map(|i| Client {
                addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10 + i), 3000),
                master: false,
                blocks: BTreeMap::new(),
                last: None,
            })
            .collect();
        let mut rrq = Vec::new();
        codec::encode_request(
            codec::OP_RRQ,
            "f",
            Mode::Octet,
            &[
                ("multicast".into(), "".into()),
                ("blksize".into(), bs.to_string()),
            ],
            &mut rrq,
        );
        let mut joined = 0usize;
        for step in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(step));
            // Client 0 at once; client 1 after 20 blocks; client 2 after 40.
            let sent = s.sender().blocks_sent;
            if joined < 3 && (joined == 0 || sent >= 20 * joined as u64) {
                let c = joined;
                joined += 1;
                s.handle(now, SocketAddr::V4(clients[c].addr), &rrq);
            }
            s.handle_timeout(now);
            pump(&mut s, &mut clients[..joined], &file, now, group);
            if joined == 3 && clients.iter().all(Client::done) && s.clients().is_empty() {
                break;
            }
        }
        for (i, c) in clients.iter().enumerate() {
            assert!(c.done(), "client {i}");
            let got: Vec<u8> = c.blocks.values().flatten().copied().collect();
            assert_eq!(got, file, "client {i}");
        }
        assert_eq!(s.masters, 3, "each late joiner became master in turn");
        // 51 blocks once; then client 1 (joined at 20) as master gets 1..=20, which client 2
        // (joined at 40) hears too; then client 2 as master needs only 21..=40. Not 3 x 51.
        assert_eq!(s.sender().blocks_sent, 51 + 20 + 20);
    }

    /// Delivers what the server sends: every unicast reply, and one DATA block (so that
    /// joiners arrive mid-transfer). The clients' ACKs go straight back to the server.
    fn pump(s: &mut Rfc2090Server, clients: &mut [Client], file: &[u8], now: Instant, group: SocketAddrV4) {
        let mut buf = Vec::new();
        while let Some(t) = s.poll_transmit(now, &mut &file[..], &mut buf) {
            let bytes = buf[buf.len() - t.size..].to_vec();
            if t.destination == SocketAddr::V4(group) {
                for c in clients.iter_mut() {
                    if let Some(ack) = c.on_data(&bytes, s.cfg.blksize as usize) {
                        s.handle(now, SocketAddr::V4(c.addr), &ack);
                    }
                }
                return;
            }
            let c = clients.iter_mut().find(|c| SocketAddr::V4(c.addr) == t.destination).unwrap();
            if let Some(ack) = c.on_unicast(&bytes) {
                s.handle(now, SocketAddr::V4(c.addr), &ack);
            }
        }
    }
}

//! The server side of one read transfer, as a sans-I/O state machine.
//!
//! Blocks are indexed with a `u64` from 1 (index 0 stands for the OACK); the wire carries the
//! index modulo 65536, so files of more than 65535 blocks roll over. Sending is go-back-N over
//! a window of `windowsize` blocks (RFC 7440; a window of 1 is RFC 1350 lock-step).

use crate::codec::{self, ErrorCode, Packet};
use crate::options::{self, AcceptedOptions};
use fleetboot_proto::Transmit;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// ERROR 5 answers to strangers waiting to leave; beyond this, strangers are only counted.
const MAX_FOREIGN_REPLIES: usize = 8;

/// Limits and retransmission tuning for read transfers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferConfig {
    /// Largest blksize granted; the default fits a 1500-byte MTU (1468 + 4 + 8 + 20).
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// First retransmission timeout when the client did not send a `timeout` option.
    pub initial_rto: Duration,
    pub min_rto: Duration,
    pub max_rto: Duration,
    /// Consecutive timeouts tolerated before the transfer fails.
    pub max_retries: u32,
    /// A transfer whose client acknowledged nothing new for this long fails, whatever its
    /// retransmission timer says: a client that went away (or never existed: a spoofed
    /// request) holds its socket and thread this long at most.
    pub idle_timeout: Duration,
    /// For firmware that chokes on OACK: serve as if the request carried no options.
    pub ignore_options: bool,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            max_blksize: 1468,
            max_windowsize: 64,
            initial_rto: Duration::from_secs(1),
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(10),
            max_retries: 6,
            idle_timeout: Duration::from_secs(15),
            ignore_options: false,
        }
    }
}

/// Where a transfer's bytes come from: a file in the shell, a slice in tests.
pub trait BlockSource {
    /// Reads up to `buf.len()` bytes at `offset`; `Ok(0)` means end of data.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

impl BlockSource for &[u8] {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl BlockSource for Vec<u8> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.as_slice().read_at(offset, buf)
    }
}

#[cfg(unix)]
impl BlockSource for std::fs::File {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

/// Why a transfer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// `max_retries` consecutive timeouts without progress.
    TimedOut,
    /// The client sent an ERROR packet.
    ClientError { code: ErrorCode, message: String },
    /// The block source failed or ended before `file_len`.
    Source {
        kind: io::ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferState {
    InProgress,
    Completed { bytes: u64, retransmits: u64 },
    Failed { reason: FailReason },
}

/// Packet counts, for metrics and for tests (which assert counts, never times).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// DATA packets sent, retransmissions included.
    pub data_packets: u64,
    /// DATA and OACK packets sent more than once.
    pub retransmits: u64,
    /// Timeouts that fired.
    pub timeouts: u64,
    /// Datagrams from an address other than the client's (answered with ERROR 5).
    pub foreign: u64,
}

/// One read transfer, following the `fleetboot_proto` contract. The shell gives it its
/// own socket (TID) and drives it: `handle` for every datagram, `handle_timeout` when
/// `poll_timeout` is reached, and `poll_transmit` until it returns `None` after each of
/// those. Every datagram goes to the client, except ERROR 5 answers to a stranger that
/// reached the transfer's port.
#[derive(Debug)]
pub struct ReadTransfer {
    client: SocketAddr,
    /// Strangers owed an ERROR 5 (unknown transfer ID).
    foreign: VecDeque<SocketAddr>,
    accepted: AcceptedOptions,
    file_len: u64,
    /// Index of the final DATA block, which is shorter than blksize (possibly empty).
    last_block: u64,
    next_unacked: u64,
    next_send: u64,
    /// One past the highest index ever sent: anything below it is a retransmission.
    sent_high: u64,
    deadline: Option<Instant>,
    /// When the client last moved the transfer on (or when it started).
    last_progress: Instant,
    idle_timeout: Duration,
    /// An ACK from the client has moved the transfer.
    answered: bool,
    consecutive_timeouts: u32,
    rto: Duration,
    srtt: Option<Duration>,
    rttvar: Duration,
    /// The one block being timed for an RTT sample, and when it was first sent.
    rtt_probe: Option<(u64, Instant)>,
    min_rto: Duration,
    max_rto: Duration,
    max_retries: u32,
    stats: TransferStats,
    state: TransferState,
}

impl ReadTransfer {
    /// A transfer of `file_len` bytes to `client` (the RRQ's source), answering the
    /// options it asked for.
    pub fn new(
        now: Instant,
        client: SocketAddr,
        request_options: &[(String, String)],
        file_len: u64,
        config: &TransferConfig,
    ) -> Self {
        let accepted = options::accept(request_options, file_len, config);
        let first = if accepted.sends_oack() { 0 } else { 1 };
        let min_rto = config.min_rto;
        let max_rto = config.max_rto.max(min_rto);
        let initial = accepted
            .timeout
            .map_or(config.initial_rto, |s| Duration::from_secs(s.into()));
        let rto = initial.clamp(min_rto, max_rto);
        ReadTransfer {
            client,
            foreign: VecDeque::new(),
            last_block: file_len / u64::from(accepted.blksize) + 1,
            accepted,
            file_len,
            next_unacked: first,
            next_send: first,
            sent_high: first,
            deadline: Some(now + rto.min(config.idle_timeout)),
            last_progress: now,
            idle_timeout: config.idle_timeout,
            answered: false,
            consecutive_timeouts: 0,
            rto,
            srtt: None,
            rttvar: Duration::ZERO,
            rtt_probe: None,
            min_rto,
            max_rto,
            max_retries: config.max_retries,
            stats: TransferStats::default(),
            state: TransferState::InProgress,
        }
    }

    /// The client's address (the transfer's peer).
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The options this transfer runs with, as its OACK acknowledged them.
    pub fn accepted_options(&self) -> &AcceptedOptions {
        &self.accepted
    }

    pub fn state(&self) -> &TransferState {
        &self.state
    }

    pub fn stats(&self) -> TransferStats {
        self.stats
    }

    /// Whether the client has acknowledged anything yet: a client that answers is real (a
    /// spoofed request never is), which is what a shell short of room evicts by.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// The current retransmission timeout, backoff included.
    pub fn rto(&self) -> Duration {
        self.rto
    }

    /// True once the transfer is over; any final ERROR has already been handed out by
    /// `poll_transmit`, so the shell may drop it.
    pub fn is_finished(&self) -> bool {
        self.state != TransferState::InProgress
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// A datagram that reached the transfer's port. One from anyone but the client gets
    /// ERROR 5 and changes nothing else (RFC 1350).
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if from != self.client {
            self.stats.foreign += 1;
            if self.foreign.len() < MAX_FOREIGN_REPLIES {
                self.foreign.push_back(from);
            }
            return;
        }
        if self.state != TransferState::InProgress {
            return; // late duplicates after the end are harmless
        }
        match Packet::parse(bytes) {
            Ok(Packet::Ack { block }) => self.on_ack(now, block),
            Ok(Packet::Error { code, message }) => {
                self.fail(FailReason::ClientError { code, message });
            }
            // Garbage, or packets a reading client never sends on this TID.
            _ => {}
        }
    }

    fn on_ack(&mut self, now: Instant, block: u16) {
        // The only indices an ACK can newly acknowledge are next_unacked..sent_high, fewer
        // than 65536 of them, so the wire number maps to exactly one candidate.
        let j = self.next_unacked + u64::from(block.wrapping_sub(self.next_unacked as u16));
        if j >= self.sent_high {
            // A duplicate of an older ACK. Never resend on one: that is the Sorcerer's
            // Apprentice bug (RFC 1123 4.2.3.1); a real loss is caught by the timer.
            return;
        }
        if let Some((probe, sent_at)) = self.rtt_probe {
            if probe <= j {
                self.rtt_probe = None;
                self.on_rtt_sample(now.saturating_duration_since(sent_at));
            } else if j + 1 < self.next_send {
                self.rtt_probe = None; // it is about to be resent (Karn)
            }
        }
        self.next_unacked = j + 1;
        self.answered = true;
        self.last_progress = now;
        // Go-back-N: an ACK short of what was sent means the client missed j + 1 (RFC 7440).
        self.next_send = j + 1;
        self.consecutive_timeouts = 0;
        self.deadline = None;
        if self.next_unacked > self.last_block {
            self.state = TransferState::Completed {
                bytes: self.file_len,
                retransmits: self.stats.retransmits,
            };
        }
    }

    /// RFC 6298 estimator.
    fn on_rtt_sample(&mut self, r: Duration) {
        let srtt = match self.srtt {
            None => {
                self.rttvar = r / 2;
                r
            }
            Some(s) => {
                self.rttvar = self.rttvar * 3 / 4 + s.abs_diff(r) / 4;
                s * 7 / 8 + r / 8
            }
        };
        self.srtt = Some(srtt);
        self.rto = (srtt + self.rttvar * 4).clamp(self.min_rto, self.max_rto);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if now >= d && self.state == TransferState::InProgress => {}
            _ => return,
        }
        self.stats.timeouts += 1;
        self.consecutive_timeouts += 1;
        if self.consecutive_timeouts > self.max_retries || now >= self.give_up_at() {
            self.fail(FailReason::TimedOut);
            return;
        }
        self.rto = (self.rto * 2).min(self.max_rto);
        self.rtt_probe = None;
        self.next_send = self.next_unacked;
        self.deadline = Some(self.timer_at(now));
    }

    /// When an idle transfer fails.
    fn give_up_at(&self) -> Instant {
        self.last_progress + self.idle_timeout
    }

    /// The retransmission timer from `now`, but never past the idle limit.
    fn timer_at(&self, now: Instant) -> Instant {
        (now + self.rto).min(self.give_up_at()).max(now)
    }

    fn fail(&mut self, reason: FailReason) {
        self.state = TransferState::Failed { reason };
        self.deadline = None;
    }

    fn window_end(&self) -> u64 {
        if self.next_unacked == 0 {
            1 // no DATA before the client has acknowledged the OACK
        } else {
            (self.next_unacked + u64::from(self.accepted.windowsize)).min(self.last_block + 1)
        }
    }

    /// Appends the next datagram to `buf` (reading file data from `source`), or returns
    /// `None` when there is nothing to send now.
    pub fn poll_transmit(&mut self, now: Instant, source: &mut dyn BlockSource, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some(stranger) = self.foreign.pop_front() {
            return Some(fleetboot_proto::append(buf, stranger, |b| {
                codec::encode_error(ErrorCode::UnknownTid, "unknown transfer ID", b)
            }));
        }
        if self.state != TransferState::InProgress || self.next_send >= self.window_end() {
            return None;
        }
        let start = buf.len();
        let idx = self.next_send;
        if idx == 0 {
            codec::encode_oack(&self.accepted.oack, buf);
        } else {
            if let Err(e) = self.write_data(idx, source, buf) {
                buf.truncate(start);
                codec::encode_error(ErrorCode::NotDefined, "read error", buf);
                self.fail(FailReason::Source { kind: e.kind(), message: e.to_string() });
                return Some(Transmit::new(self.client, buf.len() - start));
            }
            self.stats.data_packets += 1;
        }
        if idx < self.sent_high {
            self.stats.retransmits += 1;
        } else {
            self.sent_high = idx + 1;
            if self.rtt_probe.is_none() {
                self.rtt_probe = Some((idx, now));
            }
        }
        if self.deadline.is_none() {
            self.deadline = Some(self.timer_at(now));
        }
        self.next_send += 1;
        Some(Transmit::new(self.client, buf.len() - start))
    }

    fn write_data(
        &self,
        idx: u64,
        source: &mut dyn BlockSource,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let blksize = u64::from(self.accepted.blksize);
        let offset = (idx - 1) * blksize;
        let len = (self.file_len - offset).min(blksize) as usize;
        codec::encode_data_header(idx as u16, out);
        let data_start = out.len();
        out.resize(data_start + len, 0);
        let mut filled = data_start;
        while filled < out.len() {
            match source.read_at(offset + (filled - data_start) as u64, &mut out[filled..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "source shorter than file_len",
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 9), 2000));

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ack(block: u16) -> Vec<u8> {
        let mut v = Vec::new();
        codec::encode_ack(block, &mut v);
        v
    }

    /// Everything the transfer wants to send now, parsed.
    fn drain(t: &mut ReadTransfer, now: Instant, src: &[u8]) -> Vec<Packet> {
        let mut src = src;
        let mut out = Vec::new();
        let mut v = Vec::new();
        while let Some(tx) = t.poll_transmit(now, &mut src, &mut out) {
            assert_eq!(tx.destination, CLIENT);
            v.push(Packet::parse(&out[out.len() - tx.size..]).unwrap());
        }
        v
    }

    fn blocks(p: &[Packet]) -> Vec<u16> {
        p.iter()
            .map(|p| match p {
                Packet::Data { block, .. } => *block,
                other => panic!("not DATA: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn plain_lockstep_transfer() {
        let file: Vec<u8> = (0..513u32).map(|i| i as u8).collect();
        let t0 = Instant::now();
        let mut t = ReadTransfer::new(t0, CLIENT, &[], file.len() as u64, &TransferConfig::default());
        let p = drain(&mut t, t0, &file);
        assert_eq!(
            p,
            vec![Packet::Data {
                block: 1,
                data: file[..512].to_vec()
            }]
        );
        t.handle(t0, CLIENT, &ack(1));
        let p = drain(&mut t, t0, &file);
        assert_eq!(
            p,
            vec![Packet::Data {
                block: 2,
                data: file[512..].to_vec()
            }]
        );
        assert_eq!(t.state(), &TransferState::InProgress);
        t.handle(t0, CLIENT, &ack(2));
        assert_eq!(
            t.state(),
            &TransferState::Completed {
                bytes: 513,
                retransmits: 0
            }
        );
        assert!(t.is_finished());
        assert_eq!(t.poll_timeout(), None);
        t.handle(t0, CLIENT, &ack(2));
        assert!(drain(&mut t, t0, &file).is_empty());
    }

    #[test]
    fn exact_multiple_ends_with_empty_block_and_empty_file_is_one_block() {
        let t0 = Instant::now();
        let file = vec![7u8; 1024];
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 1024, &TransferConfig::default());
        for b in 1..=3u16 {
            let p = drain(&mut t, t0, &file);
            assert_eq!(blocks(&p), vec![b]);
            if b == 3 {
                assert_eq!(
                    p[0],
                    Packet::Data {
                        block: 3,
                        data: vec![]
                    }
                );
            }
            t.handle(t0, CLIENT, &ack(b));
        }
        assert!(t.is_finished());
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 0, &TransferConfig::default());
        assert_eq!(
            drain(&mut t, t0, &[]),
            vec![Packet::Data {
                block: 1,
                data: vec![]
            }]
        );
        t.handle(t0, CLIENT, &ack(1));
        assert_eq!(
            t.state(),
            &TransferState::Completed {
                bytes: 0,
                retransmits: 0
            }
        );
    }

    #[test]
    fn oack_then_data_after_ack_zero() {
        let t0 = Instant::now();
        let file = vec![1u8; 3000];
        let req = opts(&[("blksize", "1432"), ("tsize", "0")]);
        let mut t = ReadTransfer::new(t0, CLIENT, &req, 3000, &TransferConfig::default());
        let p = drain(&mut t, t0, &file);
        assert_eq!(
            p,
            vec![Packet::Oack {
                options: opts(&[("blksize", "1432"), ("tsize", "3000")])
            }]
        );
        // Nothing but the OACK until it is acknowledged; ACKs for unsent blocks are ignored.
        t.handle(t0, CLIENT, &ack(1));
        assert!(drain(&mut t, t0, &file).is_empty());
        t.handle(t0, CLIENT, &ack(0));
        let p = drain(&mut t, t0, &file);
        assert_eq!(
            p,
            vec![Packet::Data {
                block: 1,
                data: vec![1; 1432]
            }]
        );
    }

    #[test]
    fn ignore_options_quirk_serves_plain() {
        let t0 = Instant::now();
        let cfg = TransferConfig {
            ignore_options: true,
            ..TransferConfig::default()
        };
        let mut t = ReadTransfer::new(t0, CLIENT, &opts(&[("blksize", "1432")]), 600, &cfg);
        assert_eq!(blocks(&drain(&mut t, t0, &[0; 600])), vec![1]);
    }

    #[test]
    fn window_go_back_and_duplicate_acks() {
        let t0 = Instant::now();
        let file = vec![0u8; 512 * 10];
        let req = opts(&[("windowsize", "4"), ("blksize", "512")]);
        let mut t = ReadTransfer::new(t0, CLIENT, &req, file.len() as u64, &TransferConfig::default());
        drain(&mut t, t0, &file);
        t.handle(t0, CLIENT, &ack(0));
        assert_eq!(blocks(&drain(&mut t, t0, &file)), vec![1, 2, 3, 4]);
        // The client saw a gap after 2: resend from 3, as a new window.
        t.handle(t0, CLIENT, &ack(2));
        assert_eq!(blocks(&drain(&mut t, t0, &file)), vec![3, 4, 5, 6]);
        assert_eq!(t.stats().retransmits, 2);
        // A duplicate ACK 2 (the network copied it) changes nothing.
        t.handle(t0, CLIENT, &ack(2));
        assert!(drain(&mut t, t0, &file).is_empty());
        t.handle(t0, CLIENT, &ack(6));
        assert_eq!(blocks(&drain(&mut t, t0, &file)), vec![7, 8, 9, 10]);
        t.handle(t0, CLIENT, &ack(10));
        assert_eq!(blocks(&drain(&mut t, t0, &file)), vec![11]);
        t.handle(t0, CLIENT, &b"\x00\x04"[..]);
        t.handle(t0, CLIENT, b"garbage");
        t.handle(t0, CLIENT, &ack(11));
        assert_eq!(
            t.state(),
            &TransferState::Completed {
                bytes: 5120,
                retransmits: 2
            }
        );
    }

    #[test]
    fn block_numbers_roll_over() {
        let t0 = Instant::now();
        let n = 65536 * 8 + 3; // 65536 full blocks of 8, then a short one
        let file: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let req = opts(&[("blksize", "8"), ("windowsize", "7")]);
        let mut t = ReadTransfer::new(t0, CLIENT, &req, n as u64, &TransferConfig::default());
        drain(&mut t, t0, &file);
        t.handle(t0, CLIENT, &ack(0));
        let mut got = Vec::new();
        let mut idx = 0u64;
        while !t.is_finished() {
            let p = drain(&mut t, t0, &file);
            for pk in &p {
                let Packet::Data { block, data } = pk else {
                    panic!()
                };
                idx += 1;
                assert_eq!(*block, idx as u16);
                got.extend_from_slice(data);
            }
            t.handle(t0, CLIENT, &ack(idx as u16));
        }
        assert_eq!(idx, 65537);
        assert_eq!(got, file);
        assert_eq!(t.stats().retransmits, 0);
    }

    #[test]
    fn timeouts_back_off_then_fail() {
        let t0 = Instant::now();
        let cfg = TransferConfig {
            max_retries: 2,
            ..TransferConfig::default()
        };
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 100, &cfg);
        assert_eq!(blocks(&drain(&mut t, t0, &[0; 100])), vec![1]);
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        t.handle_timeout(t0 + Duration::from_millis(999));
        assert!(drain(&mut t, t0, &[0; 100]).is_empty());
        let t1 = t0 + Duration::from_secs(1);
        t.handle_timeout(t1);
        assert_eq!(blocks(&drain(&mut t, t1, &[0; 100])), vec![1]);
        assert_eq!(t.poll_timeout(), Some(t1 + Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        t.handle_timeout(t2);
        assert_eq!(t.poll_timeout(), Some(t2 + Duration::from_secs(4)));
        assert_eq!(blocks(&drain(&mut t, t2, &[0; 100])), vec![1]);
        t.handle_timeout(t2 + Duration::from_secs(4));
        assert_eq!(
            t.state(),
            &TransferState::Failed {
                reason: FailReason::TimedOut
            }
        );
        assert_eq!(t.stats().retransmits, 2);
    }

    #[test]
    fn a_silent_client_is_given_up_after_the_idle_timeout() {
        // Many retries and a client-chosen long timeout: the idle limit still ends it.
        let t0 = Instant::now();
        let cfg = TransferConfig { max_retries: 100, idle_timeout: Duration::from_secs(12), ..TransferConfig::default() };
        let req = opts(&[("timeout", "9")]);
        let file = vec![0u8; 5000];
        let mut t = ReadTransfer::new(t0, CLIENT, &req, 5000, &cfg);
        let mut now = t0;
        while !t.is_finished() {
            drain(&mut t, now, &file);
            now = t.poll_timeout().unwrap();
            assert!(now <= t0 + Duration::from_secs(12), "a timer past the idle limit");
            t.handle_timeout(now);
        }
        assert_eq!(now, t0 + Duration::from_secs(12));
        assert_eq!(t.state(), &TransferState::Failed { reason: FailReason::TimedOut });
        assert!(!t.answered());
        // A client that answers moves the limit on each time.
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 5000, &cfg);
        drain(&mut t, t0, &file);
        let t1 = t0 + Duration::from_secs(11);
        t.handle(t1, CLIENT, &ack(1));
        assert!(t.answered());
        drain(&mut t, t1, &file);
        let mut now = t1;
        while !t.is_finished() {
            now = t.poll_timeout().unwrap();
            t.handle_timeout(now);
            drain(&mut t, now, &file);
        }
        assert_eq!(now, t1 + Duration::from_secs(12));
    }

    #[test]
    fn rto_follows_measured_rtt_and_karn() {
        let t0 = Instant::now();
        let cfg = TransferConfig {
            min_rto: Duration::from_millis(1),
            ..TransferConfig::default()
        };
        let file = vec![0u8; 5000];
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 5000, &cfg);
        drain(&mut t, t0, &file);
        let t1 = t0 + Duration::from_millis(10);
        t.handle(t1, CLIENT, &ack(1));
        // First sample 10 ms: srtt 10, rttvar 5, RTO 30 ms.
        assert_eq!(t.rto(), Duration::from_millis(30));
        drain(&mut t, t1, &file);
        assert_eq!(t.poll_timeout(), Some(t1 + Duration::from_millis(30)));
        // Block 2 times out and is resent; its ACK must not be taken as a sample.
        let t2 = t1 + Duration::from_millis(30);
        t.handle_timeout(t2);
        assert_eq!(t.rto(), Duration::from_millis(60));
        drain(&mut t, t2, &file);
        t.handle(t2 + Duration::from_millis(1), CLIENT, &ack(2));
        assert_eq!(t.rto(), Duration::from_millis(60));
        // A fresh block gives a sample again: srtt 10, rttvar 3.75 -> 25 ms.
        let t3 = t2 + Duration::from_millis(1);
        drain(&mut t, t3, &file);
        t.handle(t3 + Duration::from_millis(10), CLIENT, &ack(3));
        assert_eq!(t.rto(), Duration::from_millis(25));
    }

    #[test]
    fn client_error_aborts() {
        let t0 = Instant::now();
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 100, &TransferConfig::default());
        drain(&mut t, t0, &[0; 100]);
        let mut e = Vec::new();
        codec::encode_error(ErrorCode::DiskFull, "full", &mut e);
        t.handle(t0, CLIENT, &e);
        assert_eq!(
            t.state(),
            &TransferState::Failed {
                reason: FailReason::ClientError {
                    code: ErrorCode::DiskFull,
                    message: "full".into()
                }
            }
        );
        assert!(t.is_finished());
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn short_source_sends_error() {
        let t0 = Instant::now();
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 100, &TransferConfig::default());
        let p = drain(&mut t, t0, &[0; 10]);
        assert!(matches!(
            p.as_slice(),
            [Packet::Error {
                code: ErrorCode::NotDefined,
                ..
            }]
        ));
        assert!(matches!(
            t.state(),
            TransferState::Failed {
                reason: FailReason::Source {
                    kind: io::ErrorKind::UnexpectedEof,
                    ..
                }
            }
        ));
        assert!(t.is_finished());
    }

    #[test]
    fn strangers_get_error_5_and_change_nothing() {
        let t0 = Instant::now();
        let file = vec![3u8; 600];
        let mut t = ReadTransfer::new(t0, CLIENT, &[], 600, &TransferConfig::default());
        assert_eq!(blocks(&drain(&mut t, t0, &file)), vec![1]);
        let stranger: SocketAddr = "10.0.0.66:4444".parse().unwrap();
        for _ in 0..20 {
            t.handle(t0, stranger, &ack(1));
        }
        let mut out = Vec::new();
        let tx = t.poll_transmit(t0, &mut file.as_slice(), &mut out).unwrap();
        assert_eq!(tx.destination, stranger);
        assert!(matches!(Packet::parse(&out), Ok(Packet::Error { code: ErrorCode::UnknownTid, .. })));
        // Bounded: eight answers queued, twenty counted; the stranger's ACK moved nothing.
        let mut answers = 1;
        while t.poll_transmit(t0, &mut file.as_slice(), &mut out).is_some() {
            answers += 1;
        }
        assert_eq!((answers, t.stats().foreign), (MAX_FOREIGN_REPLIES, 20));
        t.handle(t0, CLIENT, &ack(1));
        assert_eq!(blocks(&drain(&mut t, t0, &file)), vec![2]);
    }

    #[test]
    fn keeps_the_contract_under_hostile_input() {
        use fleetboot_testkit::{conformance, Node, Rng};
        struct N(ReadTransfer, Vec<u8>);
        impl Node for N {
            fn handle(&mut self, now: Instant, from: SocketAddr, _: SocketAddr, b: &[u8]) {
                self.0.handle(now, from, b)
            }
            fn handle_timeout(&mut self, now: Instant) {
                self.0.handle_timeout(now)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                self.0.poll_timeout()
            }
            fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<(SocketAddr, Transmit)> {
                let tid: SocketAddr = "10.0.0.1:40000".parse().unwrap();
                self.0.poll_transmit(now, &mut self.1.as_slice(), buf).map(|t| (tid, t))
            }
        }
        let t0 = Instant::now();
        let tid: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let req = opts(&[("blksize", "512"), ("windowsize", "8"), ("tsize", "0")]);
        let fresh = || N(ReadTransfer::new(t0, CLIENT, &req, 20_000, &TransferConfig::default()), vec![1; 20_000]);
        // The timer: due at t0 + 1 s, and pushed past `now` once handled.
        let c = conformance::check(&mut fresh(), t0 + Duration::from_secs(2), tid, &[CLIENT], &mut Rng::new(1), 0);
        assert_eq!((c.datagrams, c.timeouts), (2, 1), "the OACK, then the OACK again");
        // Hostile bytes from the client and from strangers, on several seeds.
        for seed in 0..20 {
            let c = conformance::check(&mut fresh(), t0, tid, &[CLIENT], &mut Rng::new(seed), 300);
            assert!(c.datagrams >= 1 && c.fuzzed == 300);
        }
    }
}

//! The client side of a read, as a sans-I/O state machine: what the emulator and the
//! simulation tests use to fetch a file from a [`ReadTransfer`](crate::ReadTransfer).
//!
//! The receiver is go-back-N: out-of-order blocks are dropped, never buffered. It acknowledges
//! the last in-order block at the end of each window, once when it sees a gap (so the server
//! goes back), once when the server resends the block it last acknowledged (its ACK was
//! lost), and on its own timeout.
//!
//! The RRQ goes to the server's address; the source of the first reply becomes the
//! transfer ID (TID) and every later datagram goes there. A datagram from any other source
//! is answered with ERROR 5 and otherwise ignored (RFC 1350).

use crate::codec::{self, ErrorCode, Mode, Packet};
use crate::options::{DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE};
use fleetboot_proto::Transmit;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// ERROR 5 answers to strangers waiting to leave; beyond this, strangers are only counted.
const MAX_FOREIGN_REPLIES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Silence after which the RRQ or the last ACK is resent.
    pub timeout: Duration,
    /// Consecutive timeouts tolerated before giving up.
    pub max_retries: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            timeout: Duration::from_secs(1),
            max_retries: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    TimedOut,
    /// The server sent an ERROR packet.
    Server {
        code: ErrorCode,
        message: String,
    },
    /// The OACK carried an option not requested or a value out of bounds; the client
    /// answers with ERROR 8 (RFC 2347).
    BadOack {
        option: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Waiting for the first reply to the RRQ.
    Requesting,
    Receiving,
    Done,
    Failed(ClientError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Rrq,
    Ack(u64),
    Error(ErrorCode, &'static str),
}

/// The client side of one read, following the `fleetboot_proto` contract.
#[derive(Debug)]
pub struct ReadClient {
    server: SocketAddr,
    /// The server's transfer port, once it answered.
    tid: Option<SocketAddr>,
    /// Strangers owed an ERROR 5.
    foreign: VecDeque<SocketAddr>,
    foreign_count: u64,
    filename: String,
    requested: Vec<(String, String)>,
    config: ClientConfig,
    state: ClientState,
    blksize: u16,
    windowsize: u16,
    tsize: Option<u64>,
    /// Index of the last block received in order (0 before any).
    received: u64,
    last_acked: u64,
    /// A gap ACK was already sent for the block now expected.
    gap_acked: bool,
    pending: Option<Out>,
    deadline: Option<Instant>,
    retries: u32,
    data: Vec<u8>,
}

impl ReadClient {
    /// A read of `filename` from the server at `server` (its port 69, or another).
    pub fn new(filename: impl Into<String>, options: &[(String, String)], server: SocketAddr, now: Instant) -> Self {
        Self::with_config(filename, options, server, now, ClientConfig::default())
    }

    pub fn with_config(
        filename: impl Into<String>,
        options: &[(String, String)],
        server: SocketAddr,
        now: Instant,
        config: ClientConfig,
    ) -> Self {
        let requested = options
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        ReadClient {
            server,
            tid: None,
            foreign: VecDeque::new(),
            foreign_count: 0,
            filename: filename.into(),
            requested,
            state: ClientState::Requesting,
            blksize: DEFAULT_BLKSIZE,
            windowsize: 1,
            tsize: None,
            received: 0,
            last_acked: 0,
            gap_acked: false,
            pending: Some(Out::Rrq),
            deadline: Some(now + config.timeout),
            retries: 0,
            data: Vec::new(),
            config,
        }
    }

    pub fn state(&self) -> &ClientState {
        &self.state
    }

    pub fn is_done(&self) -> bool {
        self.state == ClientState::Done
    }

    /// The bytes received in order so far and not taken with [`ReadClient::take_data`]
    /// (the whole file once done, if none were taken).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    /// Hands over the bytes received in order since the last call (the first call: from the
    /// start), so a caller that streams them somewhere never holds the whole file.
    pub fn take_data(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.data)
    }

    pub fn blksize(&self) -> u16 {
        self.blksize
    }

    pub fn windowsize(&self) -> u16 {
        self.windowsize
    }

    /// The server's transfer address (TID), once it answered.
    pub fn tid(&self) -> Option<SocketAddr> {
        self.tid
    }

    /// Datagrams from a source other than the transfer's TID.
    pub fn foreign(&self) -> u64 {
        self.foreign_count
    }

    /// The file size the server announced, if it acknowledged `tsize`.
    pub fn tsize(&self) -> Option<u64> {
        self.tsize
    }

    /// `None` once done or failed: after the final ACK the client only answers resent final
    /// blocks (RFC 1350 dallying) and needs no timer of its own.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if now >= d => {}
            _ => return,
        }
        self.retries += 1;
        if self.retries > self.config.max_retries {
            self.state = ClientState::Failed(ClientError::TimedOut);
            self.deadline = None;
            return;
        }
        self.pending = Some(match self.state {
            ClientState::Requesting => Out::Rrq,
            _ => Out::Ack(self.received),
        });
        self.deadline = Some(now + self.config.timeout);
    }

    /// A datagram for the client's socket.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match self.tid {
            None => self.tid = Some(from),
            Some(t) if t != from => {
                self.foreign_count += 1;
                if self.foreign.len() < MAX_FOREIGN_REPLIES {
                    self.foreign.push_back(from);
                }
                return;
            }
            Some(_) => {}
        }
        if matches!(self.state, ClientState::Failed(_)) {
            return;
        }
        if let Some((block, payload)) = codec::parse_data(bytes) {
            self.on_data(now, block, payload);
            return;
        }
        match Packet::parse(bytes) {
            Ok(Packet::Oack { options }) => self.on_oack(now, &options),
            Ok(Packet::Error { code, message }) => {
                self.state = ClientState::Failed(ClientError::Server { code, message });
                self.deadline = None;
            }
            _ => {}
        }
    }

    fn on_oack(&mut self, now: Instant, options: &[(String, String)]) {
        match self.state {
            ClientState::Requesting => {}
            // The server resent its OACK: our ACK 0 was lost.
            ClientState::Receiving if self.received == 0 => {
                self.ack(0);
                return;
            }
            _ => return,
        }
        for (key, value) in options {
            if let Err(()) = self.apply_option(key, value) {
                self.state = ClientState::Failed(ClientError::BadOack {
                    option: key.clone(),
                });
                self.pending = Some(Out::Error(
                    ErrorCode::OptionsRefused,
                    "unacceptable OACK",
                ));
                self.deadline = None;
                return;
            }
        }
        self.state = ClientState::Receiving;
        self.progress(now);
        self.ack(0);
    }

    fn apply_option(&mut self, key: &str, value: &str) -> Result<(), ()> {
        let asked = self
            .requested
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or(())?;
        let num = |s: &str| s.parse::<u64>().map_err(|_| ());
        let (v, asked) = (num(value)?, num(asked));
        match key {
            "blksize"
                if (u64::from(MIN_BLKSIZE)..=asked?.min(u64::from(MAX_BLKSIZE))).contains(&v) =>
            {
                self.blksize = v as u16;
            }
            "windowsize" if (1..=asked?.min(65535)).contains(&v) => self.windowsize = v as u16,
            "timeout" if asked == Ok(v) => {}
            "tsize" => self.tsize = Some(v),
            _ => return Err(()),
        }
        Ok(())
    }

    fn on_data(&mut self, now: Instant, block: u16, payload: &[u8]) {
        match self.state {
            // The server ignored our options (or we sent none): plain RFC 1350 transfer.
            ClientState::Requesting if block == 1 => self.state = ClientState::Receiving,
            ClientState::Receiving | ClientState::Done => {}
            _ => return,
        }
        let expected = self.received + 1;
        let ahead = block.wrapping_sub(expected as u16);
        if ahead >= self.windowsize {
            // Behind us: an old copy. Answer only a resend of the block we last acked.
            let back = 65536 - u64::from(ahead);
            if back <= expected && expected - back == self.last_acked {
                self.ack(self.received);
            }
            return;
        }
        if self.state == ClientState::Done {
            return;
        }
        if ahead > 0 {
            if !std::mem::replace(&mut self.gap_acked, true) {
                self.ack(self.received);
            }
            return;
        }
        if payload.len() > usize::from(self.blksize) {
            return; // not a block of this transfer
        }
        self.data.extend_from_slice(payload);
        self.received = expected;
        self.gap_acked = false;
        self.progress(now);
        if payload.len() < usize::from(self.blksize) {
            self.state = ClientState::Done;
            self.deadline = None;
            self.ack(expected);
        } else if expected - self.last_acked >= u64::from(self.windowsize) {
            self.ack(expected);
        }
    }

    fn progress(&mut self, now: Instant) {
        self.retries = 0;
        self.deadline = Some(now + self.config.timeout);
    }

    fn ack(&mut self, idx: u64) {
        self.last_acked = idx;
        self.pending = Some(Out::Ack(idx));
    }

    /// Appends the next datagram to `buf`, or returns `None` when there is nothing to send.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some(stranger) = self.foreign.pop_front() {
            return Some(fleetboot_proto::append(buf, stranger, |b| {
                codec::encode_error(ErrorCode::UnknownTid, "unknown transfer ID", b)
            }));
        }
        let p = self.pending.take()?;
        let to = match p {
            Out::Rrq => self.server,
            Out::Ack(_) | Out::Error(..) => self.tid.unwrap_or(self.server),
        };
        let t = fleetboot_proto::append(buf, to, |out| match p {
            Out::Rrq => codec::encode_request(codec::OP_RRQ, &self.filename, Mode::Octet, &self.requested, out),
            Out::Ack(idx) => codec::encode_ack(idx as u16, out),
            Out::Error(code, message) => codec::encode_error(code, message, out),
        });
        if matches!(self.state, ClientState::Requesting | ClientState::Receiving) {
            self.deadline = Some(now + self.config.timeout);
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 1), 69));
    const TID: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 1), 40000));

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sent(c: &mut ReadClient, now: Instant) -> Option<Packet> {
        let mut out = Vec::new();
        let t = c.poll_transmit(now, &mut out)?;
        assert_eq!(t.size, out.len());
        let is_rrq = out.get(1) == Some(&1);
        assert_eq!(t.destination, if is_rrq { SERVER } else { TID });
        Some(Packet::parse(&out).unwrap())
    }

    fn data(block: u16, len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        Packet::Data {
            block,
            data: vec![block as u8; len],
        }
        .encode(&mut v);
        v
    }

    fn oack(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut v = Vec::new();
        Packet::Oack {
            options: opts(pairs),
        }
        .encode(&mut v);
        v
    }

    #[test]
    fn plain_read() {
        let t0 = Instant::now();
        let mut c = ReadClient::new("pxelinux.0", &[], SERVER, t0);
        assert_eq!(
            sent(&mut c, t0),
            Some(Packet::Rrq {
                filename: "pxelinux.0".into(),
                mode: Mode::Octet,
                options: vec![]
            })
        );
        assert_eq!(sent(&mut c, t0), None);
        c.handle(t0, TID, &data(1, 512));
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 1 }));
        // A duplicate of block 1 means our ACK was lost: ack again.
        c.handle(t0, TID, &data(1, 512));
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 1 }));
        c.handle(t0, TID, &data(2, 3));
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 2 }));
        assert!(c.is_done());
        assert_eq!(c.poll_timeout(), None);
        assert_eq!(c.data(), [[1u8; 512].as_slice(), &[2, 2, 2]].concat());
        // Dallying: the final block again is acked again.
        c.handle(t0, TID, &data(2, 3));
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 2 }));
    }

    #[test]
    fn oack_window_and_gap() {
        let t0 = Instant::now();
        let req = opts(&[("blksize", "16"), ("windowsize", "4"), ("tsize", "0")]);
        let mut c = ReadClient::new("f", &req, SERVER, t0);
        sent(&mut c, t0);
        c.handle(t0, TID,
            &oack(&[("blksize", "16"), ("windowsize", "4"), ("tsize", "100")]),
        );
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 0 }));
        assert_eq!((c.blksize(), c.windowsize(), c.tsize()), (16, 4, Some(100)));
        // A resent OACK (our ACK 0 was lost) is acked again.
        c.handle(t0, TID,
            &oack(&[("blksize", "16"), ("windowsize", "4"), ("tsize", "100")]),
        );
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 0 }));
        c.handle(t0, TID, &data(1, 16));
        c.handle(t0, TID, &data(2, 16));
        assert_eq!(sent(&mut c, t0), None);
        // Block 3 lost: one ACK 2 on the gap, not one per out-of-order block.
        c.handle(t0, TID, &data(4, 16));
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 2 }));
        c.handle(t0, TID, &data(5, 16));
        assert_eq!(sent(&mut c, t0), None);
        for b in 3..=6 {
            c.handle(t0, TID, &data(b, 16));
        }
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 6 }));
        assert_eq!(c.data().len(), 6 * 16);
    }

    #[test]
    fn unrequested_option_in_oack_is_refused() {
        let t0 = Instant::now();
        let mut c = ReadClient::new("f", &opts(&[("blksize", "1024")]), SERVER, t0);
        sent(&mut c, t0);
        c.handle(t0, TID, &oack(&[("blksize", "2048")]));
        assert!(matches!(
            sent(&mut c, t0),
            Some(Packet::Error {
                code: ErrorCode::OptionsRefused,
                ..
            })
        ));
        assert!(matches!(
            c.state(),
            ClientState::Failed(ClientError::BadOack { .. })
        ));
        let mut c = ReadClient::new("f", &opts(&[("blksize", "1024")]), SERVER, t0);
        sent(&mut c, t0);
        c.handle(t0, TID, &oack(&[("windowsize", "4")]));
        assert!(matches!(
            c.state(),
            ClientState::Failed(ClientError::BadOack { .. })
        ));
    }

    #[test]
    fn server_ignoring_options_means_defaults() {
        let t0 = Instant::now();
        let mut c = ReadClient::new("f", &opts(&[("blksize", "1024")]), SERVER, t0);
        sent(&mut c, t0);
        c.handle(t0, TID, &data(1, 100));
        assert!(c.is_done());
        assert_eq!(c.blksize(), 512);
    }

    #[test]
    fn timeouts_resend_then_fail() {
        let t0 = Instant::now();
        let cfg = ClientConfig {
            timeout: Duration::from_secs(1),
            max_retries: 1,
        };
        let mut c = ReadClient::with_config("f", &[], SERVER, t0, cfg);
        sent(&mut c, t0);
        let t1 = t0 + Duration::from_secs(1);
        c.handle_timeout(t1);
        assert!(matches!(sent(&mut c, t1), Some(Packet::Rrq { .. })));
        c.handle_timeout(t1 + Duration::from_secs(1));
        assert_eq!(c.state(), &ClientState::Failed(ClientError::TimedOut));
    }

    #[test]
    fn server_error_fails() {
        let t0 = Instant::now();
        let mut c = ReadClient::new("nope", &[], SERVER, t0);
        sent(&mut c, t0);
        let mut e = Vec::new();
        codec::encode_error(ErrorCode::FileNotFound, "no", &mut e);
        c.handle(t0, TID, &e);
        assert_eq!(
            c.state(),
            &ClientState::Failed(ClientError::Server {
                code: ErrorCode::FileNotFound,
                message: "no".into()
            })
        );
    }

    #[test]
    fn first_reply_fixes_the_tid_and_strangers_get_error_5() {
        let t0 = Instant::now();
        let mut c = ReadClient::new("f", &[], SERVER, t0);
        sent(&mut c, t0);
        assert_eq!(c.tid(), None);
        c.handle(t0, TID, &data(1, 512));
        assert_eq!(c.tid(), Some(TID));
        assert_eq!(sent(&mut c, t0), Some(Packet::Ack { block: 1 }));
        // Another server port (a second, late answer to the RRQ) is refused, not followed.
        let other: SocketAddr = "10.0.0.1:40001".parse().unwrap();
        c.handle(t0, other, &data(2, 3));
        let mut out = Vec::new();
        let t = c.poll_transmit(t0, &mut out).unwrap();
        assert_eq!(t.destination, other);
        assert!(matches!(Packet::parse(&out), Ok(Packet::Error { code: ErrorCode::UnknownTid, .. })));
        assert_eq!((c.foreign(), c.is_done()), (1, false));
        c.handle(t0, TID, &data(2, 3));
        assert!(c.is_done());
    }
}

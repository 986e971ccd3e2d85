//! The transmission phase as one state machine, for every NBD server in fleetboot (the
//! catalog's exports and the streaming agent's local disk).
//!
//! [`Transmission`] takes the bytes a client sent and hands back one [`Event`] at a time:
//! a validated [`Command`], a piece of a WRITE's payload, a request to refuse with a given
//! error, the client's disconnect, or a protocol violation that ends the connection. It
//! does no I/O and allocates nothing per request: a WRITE's payload is handed on in pieces
//! borrowed from the caller's input ([`Event::WriteData`]), cut on the device's block
//! boundaries, so no one ever holds a whole WRITE in memory and a connection's memory is
//! its [`InputBuffer`].
//!
//! [`Responder`] carries a command out on a [`BlockDevice`] and encodes the reply (simple,
//! or structured when the handshake agreed on them). The shells around the two only move bytes: read into
//! the input buffer, pass events to the responder, write what it returns. A READ is
//! answered in pieces of at most [`READ_PIECE`] bytes ([`Responder::read_pending`],
//! [`Responder::continue_read`]), so a connection never holds more than one piece of even
//! a 32 MiB READ: with structured replies each piece is its own `OFFSET_DATA` chunk (one
//! chunk when the client set `DF`), otherwise the data follows one header. A piece whose
//! bytes go from files to the socket ([`Responder::execute_from_files`]) is held nowhere
//! and may be up to [`FILE_PIECE`] long.
//!
//! What is checked, per the NBD protocol (`doc/proto.md` of the reference implementation):
//! - command flags: `FUA` on every command (it was advertised), `DF` on READ when structured
//!   replies were agreed in the handshake, `REQ_ONE` on BLOCK_STATUS, `NO_HOLE` and `FAST_ZERO` on
//!   WRITE_ZEROES (when advertised); any other flag, or a flag on a command it does not
//!   apply to → `EINVAL`;
//! - unknown commands → `EINVAL`; commands the export did not advertise (TRIM, WRITE_ZEROES
//!   on a read-only export...) → `EPERM` for writes to a read-only export, else `EINVAL`;
//! - ranges: a WRITE or WRITE_ZEROES past the end → `ENOSPC`, any other command past the
//!   end → `EINVAL`; a READ longer than [`MAX_REQUEST_LEN`] → `EINVAL`, or `EOVERFLOW` when
//!   it asked for one unfragmented chunk (`DF`); BLOCK_STATUS without a metadata context
//!   or of length 0 → `EINVAL`;
//! - a refused WRITE's payload is read and dropped, and the connection goes on; a WRITE
//!   longer than [`MAX_REQUEST_LEN`] gets `EINVAL` and then the connection is closed (its
//!   payload is not worth reading); a bad request magic closes the connection.

use crate::device::{errno_of, BlockDevice, Extents, FileRun, ZeroMode};
use crate::handshake::Session;
use crate::proto::{self, chunk, cmd, cmdflags, errno, tflags, ChunkHeader, SimpleReply};
use crate::proto::MAX_REQUEST_LEN;

/// Extents returned per BLOCK_STATUS request at most.
pub const MAX_EXTENTS: usize = 1024;
/// The input buffer a connection gets unless its device's blocks need more.
pub const DEFAULT_INPUT_BUFFER: usize = 256 << 10;
/// WRITE payloads are cut on block boundaries of at most this size.
pub const MAX_WRITE_ALIGN: u32 = 1 << 20;

/// A request the export can carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        /// `NBD_CMD_FLAG_DF`: the data in one structured chunk.
        df: bool,
    },
    /// Every byte of the WRITE went out as [`Event::WriteData`] and was written: reply
    /// (after a flush when `fua`).
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        mode: ZeroMode,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        /// At most one descriptor (`NBD_CMD_FLAG_REQ_ONE`).
        one: bool,
        /// The `base:allocation` context id the client selected.
        context: u32,
    },
    Cache {
        offset: u64,
        len: u32,
    },
}

impl Command {
    /// Whether carrying it out waits for stable storage (FLUSH, or a write with FUA):
    /// an async shell runs those off its event loop.
    pub fn syncs(&self) -> bool {
        matches!(
            self,
            Command::Flush
                | Command::Write { fua: true, .. }
                | Command::Trim { fua: true, .. }
                | Command::WriteZeroes { fua: true, .. }
        )
    }
}

/// Why a connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransmissionError {
    #[error("request: {0}")]
    Protocol(#[from] proto::ProtoError),
    #[error("WRITE of {len} bytes is longer than {max}")]
    WriteTooLong { len: u32, max: u32 },
}

/// What the client's bytes asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// Carry this out and reply ([`Responder::execute`]).
    Command { cookie: u64, command: Command },
    /// The next piece of a WRITE's payload: write `data` at `offset`. On failure, tell the
    /// machine ([`Transmission::write_failed`]); it then drops the rest of the payload and
    /// hands back the error to reply with instead of the [`Command::Write`].
    WriteData {
        cookie: u64,
        offset: u64,
        data: &'a [u8],
    },
    /// Refuse this request with `error` ([`Responder::reject`]).
    Reject {
        cookie: u64,
        command: u16,
        error: u32,
        message: &'static str,
    },
    /// `NBD_CMD_DISC`: the client is done; close once the replies before it are sent.
    Disconnect,
    /// The stream cannot be followed any further: close the connection (after sending any
    /// reply already handed out).
    Close(TransmissionError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Header,
    Payload {
        cookie: u64,
        start: u64,
        len: u32,
        /// Bytes of the payload already consumed.
        done: u32,
        fua: bool,
        fate: PayloadFate,
    },
    Closed(TransmissionError),
}

/// What becomes of the rest of a WRITE's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadFate {
    /// Handed on as [`Event::WriteData`].
    Written,
    /// Dropped: writing failed with this error, which answers the WRITE at its end.
    Failed(u32),
    /// Dropped: the WRITE was refused (and answered) when its header came.
    Refused,
}

/// The server side of one connection's transmission phase.
#[derive(Debug)]
pub struct Transmission {
    size: u64,
    flags: u16,
    structured: bool,
    base_allocation: Option<u32>,
    align: u64,
    state: State,
}

impl Transmission {
    /// The machine for the session a handshake agreed on. WRITE payloads are cut on multiples of
    /// `block_size` (the device's [`BlockDevice::block_size`], capped at
    /// [`MAX_WRITE_ALIGN`]).
    pub fn new(session: &Session, block_size: u32) -> Transmission {
        Transmission {
            size: session.info.size,
            flags: session.flags,
            structured: session.structured,
            base_allocation: session.base_allocation,
            align: block_size.clamp(1, MAX_WRITE_ALIGN) as u64,
            state: State::Header,
        }
    }

    /// The encoders for this session's replies.
    pub fn replies(&self) -> Replies {
        Replies {
            structured: self.structured,
        }
    }

    /// The smallest input buffer with which the machine always makes progress.
    pub fn min_input(&self) -> usize {
        (self.align as usize).max(proto::Request::SIZE)
    }

    /// The size of this connection's input buffer: [`DEFAULT_INPUT_BUFFER`], or more when
    /// the device's blocks are larger.
    pub fn input_capacity(&self) -> usize {
        DEFAULT_INPUT_BUFFER.max(2 * self.min_input())
    }

    /// Whether a WRITE's payload is being read (an event loop that waits for input with a
    /// timeout can tell an idle client from one stuck mid-request).
    pub fn mid_request(&self) -> bool {
        matches!(self.state, State::Payload { .. })
    }

    /// Reports that writing the last [`Event::WriteData`] failed with `error` (an NBD error
    /// value): the rest of that WRITE's payload is dropped and the WRITE is answered with
    /// the error.
    pub fn write_failed(&mut self, error: u32) {
        if let State::Payload { fate, .. } = &mut self.state {
            if *fate == PayloadFate::Written {
                *fate = PayloadFate::Failed(error.max(1));
            }
        }
    }

    /// Feeds received bytes: returns how many were consumed and at most one event. `(0,
    /// None)` means more bytes are needed (keep the unconsumed ones and append); any other
    /// result means call again with the rest.
    pub fn handle<'a>(&mut self, input: &'a [u8]) -> (usize, Option<Event<'a>>) {
        let State::Payload {
            cookie,
            start,
            len,
            done,
            fua,
            fate,
        } = &mut self.state
        else {
            return match &self.state {
                State::Closed(e) => (0, Some(Event::Close(e.clone()))),
                _ => self.header(input),
            };
        };
        let (cookie, start, len, fua, fate) = (*cookie, *start, *len, *fua, *fate);
        let remaining = (len - *done) as usize;
        if remaining == 0 {
            // The whole payload is in: the WRITE's outcome.
            let ev = match fate {
                PayloadFate::Written => Event::Command {
                    cookie,
                    command: Command::Write {
                        offset: start,
                        len,
                        fua,
                    },
                },
                PayloadFate::Failed(error) => Event::Reject {
                    cookie,
                    command: cmd::WRITE,
                    error,
                    message: "write failed",
                },
                PayloadFate::Refused => {
                    // Answered already (and left as soon as its last byte was consumed).
                    self.state = State::Header;
                    return self.header(input);
                }
            };
            self.state = State::Header;
            return (0, Some(ev));
        }
        let avail = input.len().min(remaining);
        if avail == 0 {
            return (0, None);
        }
        if fate != PayloadFate::Written {
            *done += avail as u32;
            if fate == PayloadFate::Refused && avail == remaining {
                self.state = State::Header;
            }
            return (avail, None);
        }
        let offset = start + *done as u64;
        let mut n = avail;
        if n < remaining {
            // Cut on a block boundary so that a device never copies a block up twice.
            let end = (offset + n as u64) / self.align * self.align;
            if end <= offset {
                return (0, None);
            }
            n = (end - offset) as usize;
        }
        *done += n as u32;
        (
            n,
            Some(Event::WriteData {
                cookie,
                offset,
                data: &input[..n],
            }),
        )
    }

    fn header<'a>(&mut self, input: &'a [u8]) -> (usize, Option<Event<'a>>) {
        let req = match proto::Request::parse(input) {
            Ok(Some(r)) => r,
            Ok(None) => return (0, None),
            Err(e) => {
                self.state = State::Closed(e.into());
                return (0, Some(Event::Close(self.closed_reason())));
            }
        };
        let used = proto::Request::SIZE;
        if req.command == cmd::WRITE && req.len > MAX_REQUEST_LEN {
            // The payload is not worth reading: refuse, then close.
            self.state = State::Closed(TransmissionError::WriteTooLong {
                len: req.len,
                max: MAX_REQUEST_LEN,
            });
            return (
                used,
                Some(Event::Reject {
                    cookie: req.cookie,
                    command: req.command,
                    error: errno::EINVAL,
                    message: "write longer than the maximum block size",
                }),
            );
        }
        let checked = self.check(&req);
        if req.command == cmd::WRITE && req.len > 0 {
            self.state = State::Payload {
                cookie: req.cookie,
                start: req.offset,
                len: req.len,
                done: 0,
                fua: req.flags & cmdflags::FUA != 0,
                fate: if checked.is_err() {
                    PayloadFate::Refused
                } else {
                    PayloadFate::Written
                },
            };
            return match checked {
                Ok(_) => (used, None),
                Err((error, message)) => (
                    used,
                    Some(Event::Reject {
                        cookie: req.cookie,
                        command: req.command,
                        error,
                        message,
                    }),
                ),
            };
        }
        let ev = match checked {
            Ok(None) => Event::Disconnect,
            Ok(Some(command)) => Event::Command {
                cookie: req.cookie,
                command,
            },
            Err((error, message)) => Event::Reject {
                cookie: req.cookie,
                command: req.command,
                error,
                message,
            },
        };
        (used, Some(ev))
    }

    fn closed_reason(&self) -> TransmissionError {
        match &self.state {
            State::Closed(e) => e.clone(),
            _ => unreachable!("only called once closed"),
        }
    }

    /// Validates a request header: the command (`None` for DISC) or the error to reply.
    fn check(&self, req: &proto::Request) -> Result<Option<Command>, (u32, &'static str)> {
        let (offset, len) = (req.offset, req.len);
        let f = req.flags;
        let has = |t: u16| self.flags & t != 0;
        let mut allowed = if has(tflags::SEND_FUA) {
            cmdflags::FUA
        } else {
            0
        };
        match req.command {
            cmd::READ if has(tflags::SEND_DF) => allowed |= cmdflags::DF,
            cmd::BLOCK_STATUS => allowed |= cmdflags::REQ_ONE,
            cmd::WRITE_ZEROES => {
                allowed |= cmdflags::NO_HOLE;
                if has(tflags::SEND_FAST_ZERO) {
                    allowed |= cmdflags::FAST_ZERO;
                }
            }
            _ => {}
        }
        let known = matches!(
            req.command,
            cmd::READ
                | cmd::WRITE
                | cmd::DISC
                | cmd::FLUSH
                | cmd::TRIM
                | cmd::CACHE
                | cmd::WRITE_ZEROES
                | cmd::BLOCK_STATUS
        );
        if !known {
            return Err((errno::EINVAL, "unknown command"));
        }
        if f & !allowed != 0 {
            return Err((errno::EINVAL, "command flag not valid for this command"));
        }
        let writes = matches!(req.command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        if writes && has(tflags::READ_ONLY) {
            return Err((errno::EPERM, "the export is read-only"));
        }
        let advertised = match req.command {
            cmd::FLUSH => has(tflags::SEND_FLUSH),
            cmd::TRIM => has(tflags::SEND_TRIM),
            cmd::WRITE_ZEROES => has(tflags::SEND_WRITE_ZEROES),
            cmd::CACHE => has(tflags::SEND_CACHE),
            _ => true,
        };
        if !advertised {
            return Err((errno::EINVAL, "command not offered by this export"));
        }
        let in_range = offset.checked_add(len as u64).is_some_and(|e| e <= self.size);
        let fua = f & cmdflags::FUA != 0;
        let command = match req.command {
            cmd::DISC => return Ok(None),
            cmd::FLUSH => Command::Flush,
            cmd::READ => {
                if len > MAX_REQUEST_LEN {
                    return Err(if f & cmdflags::DF != 0 {
                        (errno::EOVERFLOW, "read too long for one chunk")
                    } else {
                        (errno::EINVAL, "read longer than the maximum block size")
                    });
                }
                if !in_range {
                    return Err((errno::EINVAL, "read beyond the end of the export"));
                }
                Command::Read { offset, len, df: f & cmdflags::DF != 0 }
            }
            cmd::WRITE | cmd::WRITE_ZEROES => {
                if !in_range {
                    return Err((errno::ENOSPC, "write beyond the end of the export"));
                }
                if req.command == cmd::WRITE {
                    Command::Write { offset, len, fua }
                } else {
                    Command::WriteZeroes {
                        offset,
                        len,
                        fua,
                        mode: ZeroMode {
                            may_trim: f & cmdflags::NO_HOLE == 0,
                            fast: f & cmdflags::FAST_ZERO != 0,
                        },
                    }
                }
            }
            cmd::TRIM => {
                if !in_range {
                    return Err((errno::EINVAL, "trim beyond the end of the export"));
                }
                Command::Trim { offset, len, fua }
            }
            cmd::CACHE => {
                if !in_range {
                    return Err((errno::EINVAL, "cache beyond the end of the export"));
                }
                Command::Cache { offset, len }
            }
            cmd::BLOCK_STATUS => {
                let Some(context) = self.base_allocation.filter(|_| self.structured) else {
                    return Err((errno::EINVAL, "no metadata context was negotiated"));
                };
                if len == 0 || !in_range {
                    return Err((errno::EINVAL, "block status beyond the end or empty"));
                }
                Command::BlockStatus {
                    offset,
                    len,
                    one: f & cmdflags::REQ_ONE != 0,
                    context,
                }
            }
            _ => unreachable!("known commands are matched above"),
        };
        Ok(Some(command))
    }
}

/// Reply encoders for one session (simple replies, or structured ones when the handshake agreed on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replies {
    pub structured: bool,
}

/// Room kept in front of READ data for its reply header (a structured chunk header plus
/// the offset; a simple reply uses the last 16 bytes of it).
pub const READ_HEADER_ROOM: usize = ChunkHeader::SIZE + 8;

impl Replies {
    /// Success without data.
    pub fn ok(&self, cookie: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&SimpleReply { error: 0, cookie }.encode());
    }

    /// An error (`error` nonzero): an error chunk with `message` when structured, else a
    /// simple reply (which for a READ carries no data).
    pub fn error(&self, cookie: u64, error: u32, message: &str, out: &mut Vec<u8>) {
        let error = error.max(1);
        if self.structured {
            proto::encode_error_chunk(out, cookie, error, message);
        } else {
            out.extend_from_slice(&SimpleReply { error, cookie }.encode());
        }
    }

    /// Fills `room` with the header of a successful READ of `len` (> 0) bytes at `offset`
    /// and returns where the reply starts in it; the data follows `room`.
    pub fn read_header(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        room: &mut [u8; READ_HEADER_ROOM],
    ) -> usize {
        if self.structured {
            let h = ChunkHeader {
                flags: chunk::FLAG_DONE,
                kind: chunk::OFFSET_DATA,
                cookie,
                len: 8 + len,
            };
            room[..ChunkHeader::SIZE].copy_from_slice(&h.encode());
            room[ChunkHeader::SIZE..].copy_from_slice(&offset.to_be_bytes());
            0
        } else {
            let h = SimpleReply { error: 0, cookie }.encode();
            room[READ_HEADER_ROOM - SimpleReply::SIZE..].copy_from_slice(&h);
            READ_HEADER_ROOM - SimpleReply::SIZE
        }
    }

    /// A successful READ of 0 bytes (an OFFSET_DATA chunk may not be empty).
    pub fn read_empty(&self, cookie: u64, out: &mut Vec<u8>) {
        if self.structured {
            out.extend_from_slice(
                &ChunkHeader {
                    flags: chunk::FLAG_DONE,
                    kind: chunk::NONE,
                    cookie,
                    len: 0,
                }
                .encode(),
            );
        } else {
            self.ok(cookie, out);
        }
    }

    /// A BLOCK_STATUS reply (structured replies are a precondition of BLOCK_STATUS).
    pub fn block_status(&self, cookie: u64, context: u32, extents: &[(u32, u32)], out: &mut Vec<u8>) {
        proto::encode_block_status(out, cookie, context, extents);
    }
}

/// Data bytes per piece of a READ reply read into a buffer.
pub const READ_PIECE: usize = 128 << 10;

/// Data bytes per piece of a READ reply sent from files ([`Responder::execute_from_files`]):
/// such a piece needs no buffer, so it can be longer, and with structured replies each piece
/// is a chunk whose header the client reads with calls of its own (nbdcopy: two `recv`s and
/// a `poll` per chunk). Most clients' READs fit in one.
pub const FILE_PIECE: usize = 1 << 20;

/// The rest of a READ still to be sent.
#[derive(Debug, Clone, Copy)]
struct PendingRead {
    cookie: u64,
    /// Offset of the next piece.
    next: u64,
    end: u64,
    /// Each piece is an `OFFSET_DATA` chunk of its own (structured replies without `DF`);
    /// otherwise pieces are bare data after the header that went first.
    chunked: bool,
}

/// A READ could not be finished after part of its reply went out with no way to report an
/// error in-band (simple replies, or one structured chunk for `DF`): the shell closes the
/// connection, which is what the protocol asks for then.
#[derive(Debug, thiserror::Error)]
#[error("read failed mid-reply at offset {offset}: {source}")]
pub struct ReadAborted {
    pub offset: u64,
    #[source]
    pub source: std::io::Error,
}

/// Carries commands out on a [`BlockDevice`] and encodes their replies, reusing its buffers
/// (a READ piece costs one `pread` into a buffer that already has room for the reply
/// header; no allocation once the buffer has grown to one piece).
#[derive(Debug, Default)]
pub struct Responder {
    /// Replies other than READ data.
    out: Vec<u8>,
    /// READ pieces: grown once to a header and [`READ_PIECE`] bytes and never cleared, so
    /// no piece pays for zeroing the memory its `pread` overwrites.
    piece: Vec<u8>,
    /// Where the last reply lies: in `piece` or in `out`.
    reply_in_piece: bool,
    reply: std::ops::Range<usize>,
    extents: Extents,
    read: Option<PendingRead>,
}

/// How a READ piece may get its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// However long the disk takes (on a thread that may block).
    Wait,
    /// Only from memory ([`BlockDevice::read_cached`]); otherwise nothing happens.
    CachedOnly,
}

/// Reads `buf` at `offset` as `mode` allows; `None` when the bytes are not in memory.
fn read_as(dev: &dyn BlockDevice, offset: u64, buf: &mut [u8], mode: ReadMode) -> Option<std::io::Result<()>> {
    match mode {
        ReadMode::Wait => Some(dev.read(offset, buf)),
        ReadMode::CachedOnly => match dev.read_cached(offset, buf) {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        },
    }
}

impl Responder {
    pub fn new() -> Responder {
        Responder::default()
    }

    /// Writes one piece of a WRITE's payload; the NBD error value on failure (pass it to
    /// [`Transmission::write_failed`]).
    pub fn write_data(dev: &dyn BlockDevice, offset: u64, data: &[u8]) -> Result<(), u32> {
        dev.write(offset, data).map_err(|e| {
            tracing::warn!(error = %e, offset, len = data.len(), "write failed");
            device_errno(&e, false)
        })
    }

    /// The bytes [`Responder::execute`], [`Responder::reject`] or
    /// [`Responder::continue_read`] returned last (for shells that hand the responder to
    /// another thread to do the I/O and write its reply afterwards).
    pub fn last_reply(&self) -> &[u8] {
        let buf = if self.reply_in_piece { &self.piece } else { &self.out };
        &buf[self.reply.clone()]
    }

    fn finish(&mut self) -> &[u8] {
        self.reply_in_piece = false;
        self.reply = 0..self.out.len();
        &self.out
    }

    /// `piece[READ_HEADER_ROOM..][..n]`, for the next piece's bytes.
    fn piece_data(&mut self, n: usize) -> &mut [u8] {
        if self.piece.len() < READ_HEADER_ROOM + n {
            self.piece.resize(READ_HEADER_ROOM + n, 0);
        }
        &mut self.piece[READ_HEADER_ROOM..READ_HEADER_ROOM + n]
    }

    fn finish_piece(&mut self, reply: std::ops::Range<usize>) -> &[u8] {
        self.reply_in_piece = true;
        self.reply = reply;
        &self.piece[self.reply.clone()]
    }

    /// The reply refusing a request.
    pub fn reject(&mut self, replies: Replies, cookie: u64, error: u32, message: &str) -> &[u8] {
        self.out.clear();
        self.read = None;
        replies.error(cookie, error, message, &mut self.out);
        self.finish()
    }

    /// Carries `command` out on `dev` and returns the reply to send. For a READ this is its
    /// first piece: send the rest with [`Responder::continue_read`] while
    /// [`Responder::read_pending`].
    pub fn execute(
        &mut self,
        dev: &dyn BlockDevice,
        replies: Replies,
        cookie: u64,
        command: Command,
    ) -> &[u8] {
        self.out.clear();
        self.read = None;
        let res = match command {
            Command::Read { offset, len, df } => {
                return self.read_first(dev, replies, cookie, offset, len, df, ReadMode::Wait).expect("a waiting read always ends")
            }
            Command::BlockStatus {
                offset,
                len,
                one,
                context,
            } => {
                self.extents.reset(if one { 1 } else { MAX_EXTENTS });
                match dev.block_status(offset, len, &mut self.extents) {
                    Ok(()) => {
                        let list = clamp_extents(self.extents.as_slice(), len);
                        replies.block_status(cookie, context, &list, &mut self.out);
                        return self.finish();
                    }
                    Err(e) => Err((e, "block status failed")),
                }
            }
            Command::Write { fua, .. } => sync_if(dev, fua).map_err(|e| (e, "flush failed")),
            Command::Flush => dev.flush().map_err(|e| (e, "flush failed")),
            Command::Trim { offset, len, fua } => dev
                .trim(offset, len as u64)
                .and_then(|()| sync_if(dev, fua))
                .map_err(|e| (e, "trim failed")),
            Command::WriteZeroes {
                offset,
                len,
                fua,
                mode,
            } => dev
                .write_zeroes(offset, len as u64, mode)
                .and_then(|()| sync_if(dev, fua))
                .map_err(|e| (e, "write zeroes failed")),
            Command::Cache { offset, len } => dev
                .cache(offset, len as u64)
                .map_err(|e| (e, "cache failed")),
        };
        match res {
            Ok(()) => replies.ok(cookie, &mut self.out),
            Err((e, message)) => {
                let fast_zero = matches!(
                    command,
                    Command::WriteZeroes {
                        mode: ZeroMode { fast: true, .. },
                        ..
                    }
                );
                let error = device_errno(&e, fast_zero);
                if error == errno::ENOTSUP {
                    tracing::debug!(?command, "fast zeroing not possible");
                } else {
                    tracing::warn!(error = %e, ?command, "{message}");
                }
                replies.error(cookie, error, message, &mut self.out);
            }
        }
        self.finish()
    }

    /// Whether a READ has pieces left to send.
    pub fn read_pending(&self) -> bool {
        self.read.is_some()
    }

    /// The next piece of the READ in progress (empty when none is). With chunked
    /// structured replies a failure becomes an error chunk that ends the reply; otherwise
    /// it is [`ReadAborted`] and the connection must close.
    pub fn continue_read(&mut self, dev: &dyn BlockDevice) -> Result<&[u8], ReadAborted> {
        self.next_piece(dev, ReadMode::Wait).expect("a waiting read always ends")
    }

    /// [`Responder::execute`] for a READ whose first piece is all in memory; `None`, with
    /// nothing done, for any other command or when the piece would wait for the disk
    /// (then `execute` it on a thread that may block).
    pub fn execute_cached(&mut self, dev: &dyn BlockDevice, replies: Replies, cookie: u64, command: Command) -> Option<&[u8]> {
        let Command::Read { offset, len, df } = command else {
            return None;
        };
        self.out.clear();
        self.read = None;
        self.read_first(dev, replies, cookie, offset, len, df, ReadMode::CachedOnly)
    }

    /// [`Responder::continue_read`] when the next piece is all in memory; `None`, with
    /// nothing done, when it would wait for the disk.
    pub fn continue_read_cached(&mut self, dev: &dyn BlockDevice) -> Option<Result<&[u8], ReadAborted>> {
        self.next_piece(dev, ReadMode::CachedOnly)
    }

    fn next_piece(&mut self, dev: &dyn BlockDevice, mode: ReadMode) -> Option<Result<&[u8], ReadAborted>> {
        self.out.clear();
        let Some(p) = self.read else {
            return Some(Ok(self.finish()));
        };
        let n = (p.end - p.next).min(READ_PIECE as u64) as usize;
        let result = read_as(dev, p.next, self.piece_data(n), mode)?;
        self.read = None;
        match (result, p.chunked) {
            (Ok(()), _) => {
                let start = self.next_piece_header(p, n);
                Some(Ok(self.finish_piece(start..READ_HEADER_ROOM + n)))
            }
            (Err(e), true) => {
                tracing::warn!(error = %e, offset = p.next, len = n, "read failed");
                proto::encode_error_offset_chunk(&mut self.out, p.cookie, device_errno(&e, false), "read failed", p.next);
                Some(Ok(self.finish()))
            }
            (Err(source), false) => {
                tracing::warn!(error = %source, offset = p.next, len = n, "read failed after its reply began");
                self.reply_in_piece = false;
                self.reply = 0..0;
                Some(Err(ReadAborted { offset: p.next, source }))
            }
        }
    }

    /// Writes the header (if any) of the piece of `n` bytes at `p.next` before the piece's
    /// data, moves the pending READ past it, and returns where the reply starts in `piece`.
    fn next_piece_header(&mut self, mut p: PendingRead, n: usize) -> usize {
        let last = p.next + n as u64 == p.end;
        let start = if p.chunked {
            data_chunk_header(p.cookie, p.next, n as u32, last, &mut self.piece[..READ_HEADER_ROOM]);
            0
        } else {
            READ_HEADER_ROOM
        };
        p.next += n as u64;
        self.read = (!last).then_some(p);
        start
    }

    /// Writes the reply header of a READ of `len` bytes at `offset` whose first piece has
    /// `n` bytes, records the rest as pending, and returns where the reply starts in `piece`.
    #[allow(clippy::too_many_arguments)]
    fn first_piece_header(&mut self, replies: Replies, cookie: u64, offset: u64, len: u32, n: usize, df: bool) -> usize {
        if self.piece.len() < READ_HEADER_ROOM {
            self.piece.resize(READ_HEADER_ROOM, 0);
        }
        let chunked = replies.structured && !df;
        let whole = n == len as usize;
        let room: &mut [u8; READ_HEADER_ROOM] = (&mut self.piece[..READ_HEADER_ROOM]).try_into().expect("room");
        let start = if chunked {
            data_chunk_header(cookie, offset, n as u32, whole, room);
            0
        } else {
            replies.read_header(cookie, offset, len, room)
        };
        if !whole {
            self.read = Some(PendingRead { cookie, next: offset + n as u64, end: offset + len as u64, chunked });
        }
        start
    }

    /// [`Responder::execute_cached`] for a READ whose first piece lies in files, all in the
    /// page cache: nothing is read; [`Responder::last_reply`] is the header to send, then
    /// the bytes of `runs` (`sendfile(2)`), which this fills. False, with nothing done,
    /// otherwise. Once the header is out the data must follow: a shell that cannot send it
    /// closes the connection.
    pub fn execute_from_files<'d>(
        &mut self,
        dev: &'d dyn BlockDevice,
        replies: Replies,
        cookie: u64,
        command: Command,
        runs: &mut Vec<FileRun<'d>>,
    ) -> bool {
        let Command::Read { offset, len, df } = command else {
            return false;
        };
        let n = (len as usize).min(FILE_PIECE);
        runs.clear();
        if len == 0 || !dev.cached_file_runs(offset, n as u64, runs) {
            return false;
        }
        self.out.clear();
        self.read = None;
        let start = self.first_piece_header(replies, cookie, offset, len, n, df);
        self.finish_piece(start..READ_HEADER_ROOM);
        true
    }

    /// [`Responder::continue_read_cached`] sending the next piece from files, as
    /// [`Responder::execute_from_files`] does; the header may be empty (simple replies).
    pub fn continue_read_from_files<'d>(&mut self, dev: &'d dyn BlockDevice, runs: &mut Vec<FileRun<'d>>) -> bool {
        let Some(p) = self.read else {
            return false;
        };
        let n = (p.end - p.next).min(FILE_PIECE as u64) as usize;
        runs.clear();
        if !dev.cached_file_runs(p.next, n as u64, runs) {
            return false;
        }
        self.out.clear();
        if self.piece.len() < READ_HEADER_ROOM {
            self.piece.resize(READ_HEADER_ROOM, 0);
        }
        let start = self.next_piece_header(p, n);
        self.finish_piece(start..READ_HEADER_ROOM);
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn read_first(
        &mut self,
        dev: &dyn BlockDevice,
        replies: Replies,
        cookie: u64,
        offset: u64,
        len: u32,
        df: bool,
        mode: ReadMode,
    ) -> Option<&[u8]> {
        if len == 0 {
            replies.read_empty(cookie, &mut self.out);
            return Some(self.finish());
        }
        let n = (len as usize).min(READ_PIECE);
        match read_as(dev, offset, self.piece_data(n), mode)? {
            Ok(()) => {
                let start = self.first_piece_header(replies, cookie, offset, len, n, df);
                Some(self.finish_piece(start..READ_HEADER_ROOM + n))
            }
            Err(e) => {
                tracing::warn!(error = %e, offset, len, "read failed");
                replies.error(cookie, device_errno(&e, false), "read failed", &mut self.out);
                Some(self.finish())
            }
        }
    }
}

/// The header of an `OFFSET_DATA` chunk of `len` data bytes at `offset`, into the
/// [`READ_HEADER_ROOM`] bytes before the data.
fn data_chunk_header(cookie: u64, offset: u64, len: u32, done: bool, room: &mut [u8]) {
    let h = ChunkHeader {
        flags: if done { chunk::FLAG_DONE } else { 0 },
        kind: chunk::OFFSET_DATA,
        cookie,
        len: 8 + len,
    };
    room[..ChunkHeader::SIZE].copy_from_slice(&h.encode());
    room[ChunkHeader::SIZE..READ_HEADER_ROOM].copy_from_slice(&offset.to_be_bytes());
}

fn sync_if(dev: &dyn BlockDevice, fua: bool) -> std::io::Result<()> {
    if fua {
        dev.flush()
    } else {
        Ok(())
    }
}

/// The NBD error value of a device failure; `ENOTSUP` only where NBD allows it (a fast
/// WRITE_ZEROES), `EIO` otherwise.
fn device_errno(e: &std::io::Error, fast_zero: bool) -> u32 {
    match errno_of(e) {
        errno::ENOTSUP if !fast_zero => errno::EIO,
        v => v,
    }
}

/// Descriptors whose lengths add up to at most `len` (a device must not describe more
/// than was asked; this makes sure of it), and at least one.
fn clamp_extents(list: &[(u32, u32)], len: u32) -> Vec<(u32, u32)> {
    let mut left = len;
    let mut v = Vec::with_capacity(list.len().max(1));
    for &(l, s) in list {
        if left == 0 {
            break;
        }
        let l = l.min(left);
        if l > 0 {
            v.push((l, s));
            left -= l;
        }
    }
    if v.is_empty() {
        v.push((len, 0));
    }
    v
}

/// A connection's input buffer: bytes received and not yet consumed by the machine, in
/// one fixed allocation. Shells read into [`InputBuffer::spare`], pass
/// [`InputBuffer::data`] to [`Transmission::handle`] and [`InputBuffer::consume`] what it
/// used.
#[derive(Debug)]
pub struct InputBuffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl InputBuffer {
    pub fn new(capacity: usize) -> InputBuffer {
        InputBuffer {
            buf: vec![0u8; capacity.max(proto::Request::SIZE)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
    /// Starts with bytes received before transmission began (after the handshake); more
    /// than fit are refused.
    pub fn with_leftover(capacity: usize, leftover: &[u8]) -> Option<InputBuffer> {
        let mut b = InputBuffer::new(capacity);
        if leftover.len() > b.buf.len() {
            return None;
        }
        b.buf[..leftover.len()].copy_from_slice(leftover);
        b.end = leftover.len();
        Some(b)
    }
    /// The bytes not consumed yet.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    /// Room to read into (moving unconsumed bytes to the front first). Never empty unless
    /// the buffer is full of unconsumed bytes, which a machine built for this buffer
    /// (see [`Transmission::min_input`]) never leaves.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && (self.end == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
    /// `n` bytes were read into [`InputBuffer::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }
}

#[cfg(test)]
mod tests;

//! The NBD wire format (fixed newstyle), both directions, no I/O.
//!
//! Every parser takes a byte slice, checks each length against what the slice holds and
//! against the caps below before using it, and returns an error instead of panicking.
//! Parsers of fixed-size headers return `Ok(None)` when more bytes are needed.

/// Server greeting: `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the greeting's second magic and every option's magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// The largest READ/WRITE/… length this server accepts (and advertises as maximum block size).
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// The largest option payload buffered during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Strings (export names, context names) are at most this long (proto.md).
pub const MAX_STRING_LEN: usize = 4096;

/// Handshake flags (server, u16).
pub mod hflags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (u32).
pub mod cflags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (u16).
pub mod tflags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;

    pub fn is_error(t: u32) -> bool {
        t & (1 << 31) != 0
    }
}

/// Information types of `NBD_REP_INFO` (and of the requests in `NBD_OPT_INFO`/`GO`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmdflags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// `base:allocation` states.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// Error values on the wire.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("bad magic {got:#x} (expected {expected:#x})")]
    BadMagic { expected: u64, got: u64 },
    #[error("{what} length {len} exceeds {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("malformed {0}")]
    Malformed(&'static str),
}

// ---- little helpers ------------------------------------------------------------------------

/// A cursor over a byte slice whose reads fail instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.remaining() < n {
            return Err(ProtoError::Malformed(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A string of `len` bytes: UTF-8, no NUL, at most [`MAX_STRING_LEN`].
    pub fn string(&mut self, len: usize, what: &'static str) -> Result<String, ProtoError> {
        if len > MAX_STRING_LEN {
            return Err(ProtoError::TooLong {
                what,
                len: len as u64,
                max: MAX_STRING_LEN as u64,
            });
        }
        let b = self.bytes(len, what)?;
        if b.contains(&0) {
            return Err(ProtoError::Malformed(what));
        }
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Malformed(what))
    }
    pub fn end(&self, what: &'static str) -> Result<(), ProtoError> {
        if self.remaining() != 0 {
            return Err(ProtoError::Malformed(what));
        }
        Ok(())
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

// ---- handshake ------------------------------------------------------------------------------

/// The server's first 18 bytes.
pub fn encode_greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Parses the greeting (client side): the handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<Option<u16>, ProtoError> {
    if b.len() < 18 {
        return Ok(None);
    }
    let mut r = Reader::new(&b[..18]);
    let m = r.u64("greeting")?;
    if m != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBDMAGIC,
            got: m,
        });
    }
    let m = r.u64("greeting")?;
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            got: m,
        });
    }
    Ok(Some(r.u16("greeting")?))
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless
/// both sides agreed on `NO_ZEROES`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    put_u64(out, size);
    put_u16(out, flags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// An option's 16-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const SIZE: usize = 16;

    pub fn parse(b: &[u8]) -> Result<Option<OptionHeader>, ProtoError> {
        if b.len() < Self::SIZE {
            return Ok(None);
        }
        let mut r = Reader::new(&b[..Self::SIZE]);
        let m = r.u64("option header")?;
        if m != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                got: m,
            });
        }
        Ok(Some(OptionHeader {
            option: r.u32("option")?,
            len: r.u32("option length")?,
        }))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, IHAVEOPT);
        put_u32(out, self.option);
        put_u32(out, self.len);
    }
}

/// The export name and information requests of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// The export name and queries of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdOption {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    /// An option this codec does not parse (its payload kept as is).
    Other {
        option: u32,
        data: Vec<u8>,
    },
}

impl NbdOption {
    pub fn code(&self) -> u32 {
        match self {
            NbdOption::ExportName(_) => opt::EXPORT_NAME,
            NbdOption::Abort => opt::ABORT,
            NbdOption::List => opt::LIST,
            NbdOption::Info(_) => opt::INFO,
            NbdOption::Go(_) => opt::GO,
            NbdOption::StructuredReply => opt::STRUCTURED_REPLY,
            NbdOption::ListMetaContext(_) => opt::LIST_META_CONTEXT,
            NbdOption::SetMetaContext(_) => opt::SET_META_CONTEXT,
            NbdOption::Other { option, .. } => *option,
        }
    }

    /// Parses an option's payload (already bounded by its header's length).
    pub fn decode(option: u32, data: &[u8]) -> Result<NbdOption, ProtoError> {
        if data.len() > MAX_OPTION_LEN as usize {
            return Err(ProtoError::TooLong {
                what: "option",
                len: data.len() as u64,
                max: MAX_OPTION_LEN as u64,
            });
        }
        let mut r = Reader::new(data);
        let o = match option {
            opt::EXPORT_NAME => NbdOption::ExportName(r.string(data.len(), "export name")?),
            opt::ABORT | opt::LIST | opt::STRUCTURED_REPLY => {
                r.end("option without payload")?;
                match option {
                    opt::ABORT => NbdOption::Abort,
                    opt::LIST => NbdOption::List,
                    _ => NbdOption::StructuredReply,
                }
            }
            opt::INFO | opt::GO => {
                let n = r.u32("export name length")? as usize;
                let name = r.string(n, "export name")?;
                let count = r.u16("information request count")? as usize;
                if r.remaining() != count * 2 {
                    return Err(ProtoError::Malformed("information requests"));
                }
                let mut requests = Vec::with_capacity(count);
                for _ in 0..count {
                    requests.push(r.u16("information request")?);
                }
                let req = InfoRequest { name, requests };
                if option == opt::INFO {
                    NbdOption::Info(req)
                } else {
                    NbdOption::Go(req)
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let n = r.u32("export name length")? as usize;
                let name = r.string(n, "export name")?;
                let count = r.u32("query count")? as usize;
                // Each query takes at least 4 bytes: a count beyond that is a lie.
                if count > r.remaining() / 4 {
                    return Err(ProtoError::Malformed("query count"));
                }
                let mut queries = Vec::with_capacity(count);
                for _ in 0..count {
                    let n = r.u32("query length")? as usize;
                    queries.push(r.string(n, "query")?);
                }
                r.end("meta context request")?;
                let req = MetaRequest { name, queries };
                if option == opt::LIST_META_CONTEXT {
                    NbdOption::ListMetaContext(req)
                } else {
                    NbdOption::SetMetaContext(req)
                }
            }
            _ => NbdOption::Other {
                option,
                data: data.to_vec(),
            },
        };
        Ok(o)
    }

    /// Encodes header and payload (client side).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            NbdOption::ExportName(n) => data.extend_from_slice(n.as_bytes()),
            NbdOption::Abort | NbdOption::List | NbdOption::StructuredReply => {}
            NbdOption::Info(req) | NbdOption::Go(req) => {
                put_u32(&mut data, req.name.len() as u32);
                data.extend_from_slice(req.name.as_bytes());
                put_u16(&mut data, req.requests.len() as u16);
                for &i in &req.requests {
                    put_u16(&mut data, i);
                }
            }
            NbdOption::ListMetaContext(req) | NbdOption::SetMetaContext(req) => {
                put_u32(&mut data, req.name.len() as u32);
                data.extend_from_slice(req.name.as_bytes());
                put_u32(&mut data, req.queries.len() as u32);
                for q in &req.queries {
                    put_u32(&mut data, q.len() as u32);
                    data.extend_from_slice(q.as_bytes());
                }
            }
            NbdOption::Other { data: d, .. } => data.extend_from_slice(d),
        }
        OptionHeader {
            option: self.code(),
            len: data.len() as u32,
        }
        .encode(out);
        out.extend_from_slice(&data);
    }
}

/// An option reply (header fields plus payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub const HEADER: usize = 20;

    /// Encodes an option reply without building a struct.
    pub fn encode_parts(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
        put_u64(out, OPTION_REPLY_MAGIC);
        put_u32(out, option);
        put_u32(out, reply);
        put_u32(out, data.len() as u32);
        out.extend_from_slice(data);
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        Self::encode_parts(out, self.option, self.reply, &self.data)
    }

    /// Parses one reply (client side): `Ok(Some((reply, bytes used)))`, or `Ok(None)` when
    /// more bytes are needed.
    pub fn parse(b: &[u8]) -> Result<Option<(OptionReply, usize)>, ProtoError> {
        if b.len() < Self::HEADER {
            return Ok(None);
        }
        let mut r = Reader::new(b);
        let m = r.u64("option reply")?;
        if m != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: OPTION_REPLY_MAGIC,
                got: m,
            });
        }
        let option = r.u32("option")?;
        let reply = r.u32("reply type")?;
        let len = r.u32("reply length")?;
        if len > MAX_OPTION_LEN {
            return Err(ProtoError::TooLong {
                what: "option reply",
                len: len as u64,
                max: MAX_OPTION_LEN as u64,
            });
        }
        if r.remaining() < len as usize {
            return Ok(None);
        }
        let data = r.bytes(len as usize, "option reply data")?.to_vec();
        Ok(Some((
            OptionReply {
                option,
                reply,
                data,
            },
            Self::HEADER + len as usize,
        )))
    }
}

/// `NBD_INFO_EXPORT` payload.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..].copy_from_slice(&max.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` payload.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    put_u16(&mut b, kind);
    b.extend_from_slice(s.as_bytes());
    b
}

/// `NBD_REP_SERVER` payload (one export of `NBD_OPT_LIST`).
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    put_u32(&mut b, name.len() as u32);
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    put_u32(&mut b, id);
    b.extend_from_slice(name.as_bytes());
    b
}

// ---- transmission ---------------------------------------------------------------------------

/// A request header (28 bytes; a WRITE's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub const SIZE: usize = 28;

    pub fn parse(b: &[u8]) -> Result<Option<Request>, ProtoError> {
        if b.len() < Self::SIZE {
            return Ok(None);
        }
        let mut r = Reader::new(&b[..Self::SIZE]);
        let m = r.u32("request")?;
        if m != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: REQUEST_MAGIC as u64,
                got: m as u64,
            });
        }
        Ok(Some(Request {
            flags: r.u16("request flags")?,
            command: r.u16("request type")?,
            cookie: r.u64("request cookie")?,
            offset: r.u64("request offset")?,
            len: r.u32("request length")?,
        }))
    }

    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// How many payload bytes follow this header on the wire: `len` for WRITE, else 0.
    /// A WRITE longer than [`MAX_REQUEST_LEN`] is an error: the stream cannot be followed
    /// without reading it, and the server closes the connection.
    pub fn payload_len(&self) -> Result<u32, ProtoError> {
        if self.command != cmd::WRITE {
            return Ok(0);
        }
        if self.len > MAX_REQUEST_LEN {
            return Err(ProtoError::TooLong {
                what: "write",
                len: self.len as u64,
                max: MAX_REQUEST_LEN as u64,
            });
        }
        Ok(self.len)
    }
}

/// A simple reply header (16 bytes; a successful READ's data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Result<Option<SimpleReply>, ProtoError> {
        if b.len() < Self::SIZE {
            return Ok(None);
        }
        let mut r = Reader::new(&b[..Self::SIZE]);
        let m = r.u32("reply")?;
        if m != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC as u64,
                got: m as u64,
            });
        }
        Ok(Some(SimpleReply {
            error: r.u32("reply error")?,
            cookie: r.u64("reply cookie")?,
        }))
    }
}

/// A structured reply chunk header (20 bytes; `len` payload bytes follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub const SIZE: usize = 20;

    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Parses a chunk header; its payload length is capped at [`MAX_REQUEST_LEN`] + 8.
    pub fn parse(b: &[u8]) -> Result<Option<ChunkHeader>, ProtoError> {
        if b.len() < Self::SIZE {
            return Ok(None);
        }
        let mut r = Reader::new(&b[..Self::SIZE]);
        let m = r.u32("chunk")?;
        if m != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: STRUCTURED_REPLY_MAGIC as u64,
                got: m as u64,
            });
        }
        let h = ChunkHeader {
            flags: r.u16("chunk flags")?,
            kind: r.u16("chunk type")?,
            cookie: r.u64("chunk cookie")?,
            len: r.u32("chunk length")?,
        };
        if h.len > MAX_REQUEST_LEN + 8 {
            return Err(ProtoError::TooLong {
                what: "chunk",
                len: h.len as u64,
                max: MAX_REQUEST_LEN as u64 + 8,
            });
        }
        Ok(Some(h))
    }
}

/// The longest message this server puts in an error chunk.
pub const MAX_ERROR_MESSAGE: usize = 256;

/// Encodes an `NBD_REPLY_TYPE_ERROR` chunk (header and payload), the final chunk of its
/// reply: `error` (nonzero) and a message for a human, cut at [`MAX_ERROR_MESSAGE`] bytes
/// on a character boundary.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    out.extend_from_slice(
        &ChunkHeader {
            flags: chunk::FLAG_DONE,
            kind: chunk::ERROR,
            cookie,
            len: 6 + msg.len() as u32,
        }
        .encode(),
    );
    put_u32(out, error);
    put_u16(out, msg.len() as u16);
    out.extend_from_slice(msg);
}

/// Encodes an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk (with `NBD_REPLY_FLAG_DONE`): a READ
/// failed at `offset` after some of its data went out.
pub fn encode_error_offset_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str, offset: u64) {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    out.extend_from_slice(
        &ChunkHeader {
            flags: chunk::FLAG_DONE,
            kind: chunk::ERROR_OFFSET,
            cookie,
            len: 6 + msg.len() as u32 + 8,
        }
        .encode(),
    );
    put_u32(out, error.max(1));
    put_u16(out, msg.len() as u16);
    out.extend_from_slice(msg);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Parses the payload of an error chunk (`NBD_REPLY_TYPE_ERROR` or `_ERROR_OFFSET`): the
/// error value and the message (lossily decoded).
pub fn parse_error_chunk(b: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut r = Reader::new(b);
    let error = r.u32("error chunk")?;
    let n = r.u16("error message length")? as usize;
    let msg = r.bytes(n, "error message")?;
    if error == 0 {
        return Err(ProtoError::Malformed("error chunk with error 0"));
    }
    Ok((error, String::from_utf8_lossy(msg).into_owned()))
}

/// The start of any reply: a simple reply or a structured reply chunk, told apart by magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// Parses a reply header (client side): the header and its size, `Ok(None)` when more
    /// bytes are needed, an error for any other magic.
    pub fn parse(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtoError> {
        if b.len() < 4 {
            return Ok(None);
        }
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                Ok(SimpleReply::parse(b)?.map(|r| (ReplyHeader::Simple(r), SimpleReply::SIZE)))
            }
            STRUCTURED_REPLY_MAGIC => {
                Ok(ChunkHeader::parse(b)?.map(|c| (ReplyHeader::Chunk(c), ChunkHeader::SIZE)))
            }
            m => Err(ProtoError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC as u64,
                got: m as u64,
            }),
        }
    }

    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple(r) => r.cookie,
            ReplyHeader::Chunk(c) => c.cookie,
        }
    }
}

/// Encodes an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (header and payload).
pub fn encode_block_status(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len() as u32;
    out.extend_from_slice(
        &ChunkHeader {
            flags: chunk::FLAG_DONE,
            kind: chunk::BLOCK_STATUS,
            cookie,
            len,
        }
        .encode(),
    );
    put_u32(out, context);
    for &(l, s) in extents {
        put_u32(out, l);
        put_u32(out, s);
    }
}

/// Parses the payload of a block status chunk: context id and (length, flags) descriptors.
pub fn parse_block_status(b: &[u8]) -> Result<(u32, Vec<(u32, u32)>), ProtoError> {
    let mut r = Reader::new(b);
    let ctx = r.u32("block status context")?;
    if r.remaining() % 8 != 0 || r.remaining() == 0 {
        return Err(ProtoError::Malformed("block status descriptors"));
    }
    let mut v = Vec::with_capacity(r.remaining() / 8);
    while r.remaining() > 0 {
        v.push((r.u32("extent length")?, r.u32("extent flags")?));
    }
    Ok((ctx, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:@._-]{0,40}"
    }

    fn option() -> impl Strategy<Value = NbdOption> {
        prop_oneof![
            name().prop_map(NbdOption::ExportName),
            Just(NbdOption::Abort),
            Just(NbdOption::List),
            Just(NbdOption::StructuredReply),
            (name(), proptest::collection::vec(any::<u16>(), 0..8))
                .prop_map(|(name, requests)| NbdOption::Info(InfoRequest { name, requests })),
            (name(), proptest::collection::vec(any::<u16>(), 0..8))
                .prop_map(|(name, requests)| NbdOption::Go(InfoRequest { name, requests })),
            (name(), proptest::collection::vec(name(), 0..5)).prop_map(|(name, queries)| {
                NbdOption::ListMetaContext(MetaRequest { name, queries })
            }),
            (name(), proptest::collection::vec(name(), 0..5)).prop_map(|(name, queries)| {
                NbdOption::SetMetaContext(MetaRequest { name, queries })
            }),
            (12u32..1000, proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(option, data)| NbdOption::Other { option, data }),
        ]
    }

    proptest! {
        #[test]
        fn option_round_trip(o in option()) {
            let mut b = Vec::new();
            o.encode(&mut b);
            let h = OptionHeader::parse(&b).unwrap().unwrap();
            prop_assert_eq!(h.len as usize, b.len() - OptionHeader::SIZE);
            let back = NbdOption::decode(h.option, &b[OptionHeader::SIZE..]).unwrap();
            prop_assert_eq!(back, o);
        }

        #[test]
        fn option_reply_round_trip(option in any::<u32>(), reply in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let r = OptionReply { option, reply, data };
            let mut b = Vec::new();
            r.encode(&mut b);
            let (back, used) = OptionReply::parse(&b).unwrap().unwrap();
            prop_assert_eq!(used, b.len());
            prop_assert_eq!(back, r);
            // Any prefix asks for more bytes instead of failing or panicking.
            for cut in 0..b.len() {
                prop_assert_eq!(OptionReply::parse(&b[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn request_round_trip(flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), len in any::<u32>()) {
            let r = Request { flags, command, cookie, offset, len };
            prop_assert_eq!(Request::parse(&r.encode()).unwrap(), Some(r));
        }

        #[test]
        fn replies_round_trip(error in any::<u32>(), cookie in any::<u64>(), flags in any::<u16>(), kind in any::<u16>(), len in 0..=MAX_REQUEST_LEN + 8) {
            let s = SimpleReply { error, cookie };
            prop_assert_eq!(SimpleReply::parse(&s.encode()).unwrap(), Some(s));
            let c = ChunkHeader { flags, kind, cookie, len };
            prop_assert_eq!(ChunkHeader::parse(&c.encode()).unwrap(), Some(c));
        }

        #[test]
        fn block_status_round_trip(ctx in any::<u32>(), ext in proptest::collection::vec((any::<u32>(), any::<u32>()), 1..20)) {
            let mut b = Vec::new();
            encode_block_status(&mut b, 7, ctx, &ext);
            let h = ChunkHeader::parse(&b).unwrap().unwrap();
            prop_assert_eq!(h.len as usize, b.len() - ChunkHeader::SIZE);
            prop_assert_eq!(parse_block_status(&b[ChunkHeader::SIZE..]).unwrap(), (ctx, ext));
        }

        #[test]
        fn parsers_never_panic(option in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = NbdOption::decode(option % 16, &data);
            let _ = NbdOption::decode(option, &data);
            let _ = OptionHeader::parse(&data);
            let _ = OptionReply::parse(&data);
            let _ = Request::parse(&data);
            let _ = SimpleReply::parse(&data);
            let _ = ChunkHeader::parse(&data);
            let _ = parse_block_status(&data);
            let _ = parse_greeting(&data);
            let _ = ReplyHeader::parse(&data);
            let _ = parse_error_chunk(&data);
        }

        /// An INFO/GO payload whose lengths lie fails with the error naming the field
        /// that lies, never with a panic or a wrong parse.
        #[test]
        fn info_options_with_lying_lengths_fail_cleanly(name in name(), requests in proptest::collection::vec(any::<u16>(), 0..8), lie in any::<u32>(), name_lies in any::<bool>()) {
            let rest = name.len() + 2 + 2 * requests.len();
            let (n, count) = if name_lies {
                // Longer than everything after the length field.
                let n = (name.len() as u64 + (rest - name.len()) as u64 + 1 + lie as u64 % (1 << 20)).min(u32::MAX as u64) as u32;
                (n, requests.len() as u16)
            } else {
                let c = lie as u16;
                prop_assume!(c as usize != requests.len());
                (name.len() as u32, c)
            };
            let mut d = n.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&count.to_be_bytes());
            for r in &requests {
                d.extend_from_slice(&r.to_be_bytes());
            }
            let want = if !name_lies {
                ProtoError::Malformed("information requests")
            } else if n as usize > MAX_STRING_LEN {
                ProtoError::TooLong { what: "export name", len: n as u64, max: MAX_STRING_LEN as u64 }
            } else {
                ProtoError::Malformed("export name")
            };
            for option in [opt::INFO, opt::GO] {
                prop_assert_eq!(NbdOption::decode(option, &d), Err(want.clone()));
            }
        }

        /// The same for LIST/SET_META_CONTEXT: a lying name length, a query count larger
        /// than the payload could hold, one larger than the queries sent, one smaller, and
        /// a lying query length each fail with their own error.
        #[test]
        fn meta_options_with_lying_lengths_fail_cleanly(name in name(), queries in proptest::collection::vec(name(), 1..5), lie in any::<u32>(), which in 0u8..5) {
            let body: usize = queries.iter().map(|q| 4 + q.len()).sum();
            let rest = name.len() + 4 + body;
            let mut n = name.len() as u32;
            let mut count = queries.len() as u32;
            let mut qlen0 = queries[0].len() as u32;
            let want = match which {
                0 => {
                    n = (rest as u64 + 1 + lie as u64 % (1 << 20)).min(u32::MAX as u64) as u32;
                    if n as usize > MAX_STRING_LEN {
                        ProtoError::TooLong { what: "export name", len: n as u64, max: MAX_STRING_LEN as u64 }
                    } else {
                        ProtoError::Malformed("export name")
                    }
                }
                1 => {
                    count = (body / 4 + 1) as u32 + lie % 1000;
                    ProtoError::Malformed("query count")
                }
                2 => {
                    let room = (body / 4) as u32;
                    prop_assume!(room > queries.len() as u32);
                    count = queries.len() as u32 + 1 + lie % (room - queries.len() as u32);
                    ProtoError::Malformed("query length")
                }
                3 => {
                    count = lie % queries.len() as u32;
                    ProtoError::Malformed("meta context request")
                }
                _ => {
                    // The first query claims more than is left after its length field.
                    let left = (body - 4) as u64;
                    qlen0 = (left + 1 + lie as u64 % (1 << 20)).min(u32::MAX as u64) as u32;
                    if qlen0 as usize > MAX_STRING_LEN {
                        ProtoError::TooLong { what: "query", len: qlen0 as u64, max: MAX_STRING_LEN as u64 }
                    } else {
                        ProtoError::Malformed("query")
                    }
                }
            };
            let mut d = n.to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&count.to_be_bytes());
            for (i, q) in queries.iter().enumerate() {
                let l = if i == 0 { qlen0 } else { q.len() as u32 };
                d.extend_from_slice(&l.to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            for option in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
                prop_assert_eq!(NbdOption::decode(option, &d), Err(want.clone()));
            }
        }
    }

    #[test]
    fn oversized_writes_and_options_are_refused() {
        let w = Request {
            flags: 0,
            command: cmd::WRITE,
            cookie: 1,
            offset: 0,
            len: MAX_REQUEST_LEN + 1,
        };
        assert!(matches!(w.payload_len(), Err(ProtoError::TooLong { .. })));
        let r = Request {
            command: cmd::READ,
            ..w
        };
        assert_eq!(r.payload_len().unwrap(), 0);
        let big = vec![b'a'; MAX_OPTION_LEN as usize + 1];
        assert!(NbdOption::decode(opt::EXPORT_NAME, &big).is_err());
        assert!(
            NbdOption::decode(opt::EXPORT_NAME, &[b'a', 0, b'b']).is_err(),
            "NUL in a name"
        );
        assert!(NbdOption::decode(opt::ABORT, &[1]).is_err());
    }

    #[test]
    fn greeting_round_trip() {
        let g = encode_greeting(hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES);
        assert_eq!(parse_greeting(&g).unwrap(), Some(3));
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
    }
}

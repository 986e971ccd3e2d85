//! The packet codec: every fleetboot-stream datagram, parsed with each length checked.
//!
//! All integers are big-endian. Every datagram starts with the same 5-byte header and ends
//! with an 8-byte authentication tag (see [`crate::auth`]):
//!
//! ```text
//! 0      1              5                                   len-8      len
//! +------+--------------+----------- body ------------------+----------+
//! |v|type| session u32  |  (per type, see the crate docs)  | tag (8)  |
//! +------+--------------+-----------------------------------+----------+
//! ```
//!
//! `v` is the high nibble (protocol version, [`VERSION`]), `type` the low nibble.
//! [`Packet::decode`] checks structure only (lengths, counts, field ranges that need no
//! session context); the state machines check the tag and the values that depend on the
//! session (block index below the block count, sequence numbers inside the stream).

use crate::auth::{MacKey, TAG_LEN};

/// Protocol version carried in the high nibble of byte 0.
pub const VERSION: u8 = 1;
/// Bytes before the body: version/type (1) and session id (4).
pub const HEADER_LEN: usize = 5;
/// Largest datagram the codec produces or accepts (jumbo frames).
pub const MAX_DATAGRAM: usize = 9000;
/// Smallest block size a session may use.
pub const MIN_BLOCK_SIZE: u16 = 64;
/// Largest block size a session may use.
pub const MAX_BLOCK_SIZE: u16 = 8192;
/// Largest FEC group (positions per group).
pub const MAX_FEC_GROUP: u32 = 32768;
/// Most ranges one STATUS may list.
pub const MAX_RANGES: usize = 256;
/// Most bitmap bytes one STATUS may carry (8 positions per byte).
pub const MAX_BITMAP_BYTES: usize = 1024;
/// Most STATUS datagrams one answer to a DONE may take: a receiver missing more than one
/// datagram lists sends the rest in further parts of the same answer (up to 8,192
/// ranges, or 262,144 positions' worth of bitmap), so the sender plans the round from
/// all of it instead of from the first ~8,192 positions.
pub const MAX_STATUS_PARTS: u8 = 32;
/// Largest receiver cache a REGISTER may announce.
pub const MAX_CACHE_SLOTS: u32 = 1 << 20;
/// Bytes a FEC shard adds in front of the block payload (the block index).
pub const FEC_SHARD_PREFIX: usize = 4;
/// Bytes of an ed25519 signature (ANNOUNCE, MANIFEST, DONE, ROLE).
pub const SIGNATURE_LEN: usize = 64;
/// Bytes of one block hash (SHA-256).
pub const HASH_LEN: usize = 32;
/// Positions per MANIFEST chunk: chunk `c` covers positions `c*512 ..` (the last one
/// may be shorter) with one hash per group of 16 positions
/// ([`crate::manifest::GROUP_POSITIONS`]): 32 group hashes and a signature, 1,107 bytes
/// on the wire, fit a 1500-byte MTU.
pub const MANIFEST_CHUNK: u32 = 512;
/// A MANIFEST chunk goes out at least this many positions before its first block: a
/// receiver that has a block this close to a chunk it does not know lost it, and asks
/// for it before its blocks come (and would be dropped as uncheckable).
pub const MANIFEST_LEAD: u32 = MANIFEST_CHUNK / 2;
/// Group hashes in a MANIFEST chunk covering `positions` positions.
pub const fn chunk_group_hashes(positions: u32) -> usize {
    positions.div_ceil(crate::manifest::GROUP_POSITIONS) as usize
}
/// Most chunk numbers one MANIFEST-REQUEST may list.
pub const MAX_MANIFEST_REQUEST: usize = 64;

/// Fixed overhead of a DATA or REPAIR datagram (header, seq, block, tag).
pub const DATA_OVERHEAD: usize = HEADER_LEN + 8 + TAG_LEN;
/// Fixed overhead of a FEC datagram (header, group, total, index, tag), excluding the
/// shard's block-index prefix.
pub const FEC_OVERHEAD: usize = HEADER_LEN + 8 + TAG_LEN;

/// Packet type numbers (low nibble of byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketType {
    /// Sender → all: a session exists, here are its parameters.
    Announce = 1,
    /// Receiver → sender: please register me.
    Register = 2,
    /// Sender → receiver (unicast): your id and the wrapped session key.
    Registered = 3,
    /// Sender → all: one block, first transmission.
    Data = 4,
    /// Sender → one or all: one block, retransmission.
    Repair = 5,
    /// Sender → all: one Reed-Solomon recovery symbol over a group of positions.
    Fec = 6,
    /// Receiver → sender: progress and free cache slots.
    Ack = 7,
    /// Sender → all: everything sent for this round; answer with STATUS.
    Done = 8,
    /// Receiver → sender: complete, or what is missing.
    Status = 9,
    /// Receiver → sender (lock-step): read the next block, or one I missed.
    ReadRequest = 10,
    /// Sender → all (lock-step): who is the read requester now.
    Role = 11,
    /// Receiver → sender: I am leaving.
    Leave = 12,
    /// Sender → all: one signed chunk of the block-hash manifest.
    Manifest = 13,
    /// Receiver → sender: please multicast these manifest chunks (or group lists).
    ManifestRequest = 14,
    /// Sender → all: the (block, SHA-256) of each position of one hash group, checked
    /// against the group's signed hash.
    GroupHashes = 15,
}

impl PacketType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Announce,
            2 => Self::Register,
            3 => Self::Registered,
            4 => Self::Data,
            5 => Self::Repair,
            6 => Self::Fec,
            7 => Self::Ack,
            8 => Self::Done,
            9 => Self::Status,
            10 => Self::ReadRequest,
            11 => Self::Role,
            12 => Self::Leave,
            13 => Self::Manifest,
            14 => Self::ManifestRequest,
            15 => Self::GroupHashes,
            _ => return None,
        })
    }
}

/// Why a datagram was refused by the codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than header plus tag, or shorter than its type's fixed fields.
    #[error("datagram truncated")]
    Truncated,
    /// Longer than its type allows (trailing bytes, or beyond [`MAX_DATAGRAM`]).
    #[error("datagram too long or has trailing bytes")]
    TooLong,
    /// Unknown version nibble.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// Unknown type nibble.
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    /// A field is outside its allowed range.
    #[error("field out of range: {0}")]
    Field(&'static str),
    /// More NAK ranges or bitmap bytes than allowed.
    #[error("missing list too long")]
    ListTooLong,
    /// The output buffer is too small for the packet.
    #[error("output buffer too small")]
    BufferTooSmall,
}

/// ANNOUNCE body: the session's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// Image identity (e.g. a digest prefix).
    pub image_id: [u8; 16],
    /// Image size in bytes.
    pub image_size: u64,
    /// Block size in bytes (even; last block may be short).
    pub block_size: u16,
    /// `ceil(image_size / block_size)`.
    pub block_count: u32,
    /// Number of positions in the stream (blocks sent, in order).
    pub stream_len: u32,
    /// Positions per FEC group.
    pub fec_group: u32,
    /// Send rate, bytes per second.
    pub rate: u64,
    /// Milliseconds left in the solicitation window (0 once streaming).
    pub solicit_ms: u32,
    /// Receivers acknowledge every this many packets.
    pub ack_every: u16,
    /// [`Announce::LOCKSTEP`], [`Announce::LATE_JOIN`], [`Announce::STREAMING`].
    pub flags: u8,
    /// SHA-256 over the image's block hashes ([`crate::manifest::manifest_root`]); every
    /// MANIFEST chunk of the session is signed over it.
    pub manifest_root: [u8; 32],
    /// The sender's ed25519 signature over the session id and every field above
    /// ([`crate::manifest::announce_message`]).
    pub signature: [u8; SIGNATURE_LEN],
}

impl Announce {
    /// The session runs in lock-step (read requester) mode.
    pub const LOCKSTEP: u8 = 1;
    /// Registrations are accepted after the solicitation window.
    pub const LATE_JOIN: u8 = 2;
    /// The stream has started.
    pub const STREAMING: u8 = 4;
}

/// REGISTER body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    /// Random per-receiver nonce; echoed in REGISTERED and binds the receiver's key.
    pub nonce: u64,
    /// Receiver's data cache size in blocks.
    pub cache_slots: u32,
}

/// REGISTERED body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Id the receiver uses in everything it sends.
    pub receiver: u32,
    /// The nonce of the REGISTER this answers.
    pub nonce: u64,
    /// Session key XOR a pad derived from the site secret and the nonce.
    pub wrapped_key: [u8; 16],
}

/// DATA or REPAIR body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data<'a> {
    /// Stream position (the first transmission's sequence number).
    pub seq: u32,
    /// Block index in the image.
    pub block: u32,
    /// Block bytes.
    pub payload: &'a [u8],
}

/// FEC body: recovery symbol `index` of `recovery_total` over group `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fec<'a> {
    /// Group number (positions `group*fec_group ..`).
    pub group: u32,
    /// Recovery count the encoder was built with.
    pub recovery_total: u16,
    /// Index of this symbol (< `recovery_total`).
    pub index: u16,
    /// The recovery shard (block size + 4 bytes).
    pub shard: &'a [u8],
}

/// ACK body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Receiver id.
    pub receiver: u32,
    /// Every position below this has been received.
    pub contig: u32,
    /// One past the highest position received.
    pub highest: u32,
    /// Free slots in the receiver's data cache.
    pub free_slots: u32,
}

/// DONE body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// Repair round (0 after the first pass).
    pub round: u32,
    /// Positions in the stream.
    pub stream_len: u32,
    /// [`Done::FINISHED`]: every live receiver is complete, the session is over.
    pub flags: u8,
    /// The sender's ed25519 signature over the session, its manifest root and the
    /// fields above ([`crate::manifest::done_message`]): a DONE(FINISHED) ends every
    /// receiver's session, so no fellow receiver may make one up.
    pub signature: [u8; SIGNATURE_LEN],
}

impl Done {
    /// The session is over.
    pub const FINISHED: u8 = 1;
}

/// One run of missing positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingRange {
    /// First missing position.
    pub start: u32,
    /// Number of positions (≥ 1).
    pub len: u32,
}

/// What a STATUS says is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Nothing listed (complete, or only a count).
    None,
    /// Ascending, non-overlapping ranges.
    Ranges(Vec<MissingRange>),
    /// Bit `i` (LSB first within each byte) set = position `start + i` missing.
    Bitmap {
        /// Position of bit 0.
        start: u32,
        /// The bits.
        bits: Vec<u8>,
    },
}

impl Missing {
    /// Calls `f` for every position listed.
    pub fn for_each(&self, mut f: impl FnMut(u32)) {
        match self {
            Missing::None => {}
            Missing::Ranges(r) => {
                for m in r {
                    for p in m.start..m.start + m.len {
                        f(p)
                    }
                }
            }
            Missing::Bitmap { start, bits } => {
                for (i, b) in bits.iter().enumerate() {
                    if *b == 0 {
                        continue;
                    }
                    for j in 0..8 {
                        if b & (1 << j) != 0 {
                            f(start + (i as u32) * 8 + j);
                        }
                    }
                }
            }
        }
    }

    /// One past the highest position listed (0 if none).
    pub fn end(&self) -> u64 {
        match self {
            Missing::None => 0,
            Missing::Ranges(r) => r.last().map_or(0, |m| m.start as u64 + m.len as u64),
            Missing::Bitmap { start, bits } => *start as u64 + bits.len() as u64 * 8,
        }
    }
}

/// STATUS body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Receiver id.
    pub receiver: u32,
    /// The DONE round this answers.
    pub round: u32,
    /// Free slots in the receiver's data cache.
    pub free_slots: u32,
    /// Total number of positions missing (may exceed what `missing` lists).
    pub total_missing: u32,
    /// [`Status::COMPLETE`], [`Status::TRUNCATED`].
    pub flags: u8,
    /// This datagram's index in the answer (`0..parts`).
    pub part: u8,
    /// Datagrams the answer takes (`1..=`[`MAX_STATUS_PARTS`]; 1 when complete). Each
    /// part lists its own positions, ascending, after the previous part's.
    pub parts: u8,
    /// The missing positions listed.
    pub missing: Missing,
}

impl Status {
    /// The receiver has every block.
    pub const COMPLETE: u8 = 1;
    /// The answer's parts list only part of what is missing.
    pub const TRUNCATED: u8 = 2;
}

fn validate_status(s: &Status) -> Result<(), WireError> {
    validate_missing(&s.missing)?;
    check(s.flags & !3 == 0, "status flags")?;
    check(s.free_slots <= MAX_CACHE_SLOTS, "free_slots")?;
    check((1..=MAX_STATUS_PARTS).contains(&s.parts) && s.part < s.parts, "status part")?;
    if s.flags & Status::COMPLETE != 0 {
        check(
            s.total_missing == 0 && s.missing == Missing::None && s.parts == 1,
            "complete with missing",
        )?;
    }
    Ok(())
}

/// READ-REQUEST body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Receiver id.
    pub receiver: u32,
    /// Lock-step round this request is for (ignored for [`ReadRequest::INDIVIDUAL`]).
    pub round: u32,
    /// Position requested.
    pub pos: u32,
    /// [`ReadRequest::DRIVE`] or [`ReadRequest::INDIVIDUAL`].
    pub kind: u8,
}

impl ReadRequest {
    /// The requester drives the next block (multicast to all).
    pub const DRIVE: u8 = 0;
    /// A receiver asks for a block it missed (answered by unicast, to it alone).
    pub const INDIVIDUAL: u8 = 1;
}

/// ROLE body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Lock-step round.
    pub round: u32,
    /// Receiver id of the read requester for this round.
    pub requester: u32,
    /// The next position in the stream.
    pub next_pos: u32,
    /// The sender's ed25519 signature over the session, its manifest root and the
    /// fields above ([`crate::manifest::role_message`]): only the sender hands out the
    /// role and says where the stream goes on.
    pub signature: [u8; SIGNATURE_LEN],
}

/// LEAVE body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leave {
    /// Receiver id.
    pub receiver: u32,
}

/// MANIFEST body: for positions `first .. first + positions`, the hash of each group of
/// 16 ([`crate::manifest::group_hash`]: the block sent at each position and its
/// SHA-256), signed by the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestChunk<'a> {
    /// First position covered (a multiple of [`MANIFEST_CHUNK`]).
    pub first: u32,
    /// Positions covered, `1 ..= MANIFEST_CHUNK`.
    pub positions: u16,
    /// [`chunk_group_hashes`]`(positions)` hashes of [`HASH_LEN`] bytes.
    pub group_hashes: &'a [u8],
    /// ed25519 signature over the session's manifest root, `first`, `positions` and the
    /// group hashes ([`crate::manifest::chunk_message`]).
    pub signature: [u8; SIGNATURE_LEN],
}

/// In a MANIFEST-REQUEST, an entry with this bit set asks for the GROUP-HASHES of the
/// hash group in the other bits rather than for a chunk.
pub const GROUP_LIST_FLAG: u32 = 1 << 31;

/// Bytes of one GROUP-HASHES entry: block index (u32) and block SHA-256.
pub const ENTRY_LEN: usize = 4 + HASH_LEN;

/// GROUP-HASHES body: for each position of hash group `group`, the block sent there and
/// its SHA-256. Not signed: a receiver takes it only if its group hash
/// ([`crate::manifest::group_hash`]) is the signed one, and then checks each block of the
/// group on its own — what it asks for once a group failed its check or got two
/// different blocks for a position (an insider racing the sender).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupHashes<'a> {
    /// The hash group (positions `group*16 ..`).
    pub group: u32,
    /// `n` entries of [`ENTRY_LEN`] bytes, `1 <= n <= 16`.
    pub entries: &'a [u8],
}

/// MANIFEST-REQUEST body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRequest {
    /// Receiver id.
    pub receiver: u32,
    /// Chunk numbers wanted, and hash groups whose list is wanted (with
    /// [`GROUP_LIST_FLAG`]) (1 ..= [`MAX_MANIFEST_REQUEST`] in all).
    pub chunks: Vec<u32>,
}

/// A packet body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// See [`Announce`].
    Announce(Announce),
    /// See [`Register`].
    Register(Register),
    /// See [`Registered`].
    Registered(Registered),
    /// First transmission of a block.
    Data(Data<'a>),
    /// Retransmission of a block.
    Repair(Data<'a>),
    /// See [`Fec`].
    Fec(Fec<'a>),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Done`].
    Done(Done),
    /// See [`Status`].
    Status(Status),
    /// See [`ReadRequest`].
    ReadRequest(ReadRequest),
    /// See [`Role`].
    Role(Role),
    /// See [`Leave`].
    Leave(Leave),
    /// See [`ManifestChunk`].
    Manifest(ManifestChunk<'a>),
    /// See [`ManifestRequest`].
    ManifestRequest(ManifestRequest),
    /// See [`GroupHashes`].
    GroupHashes(GroupHashes<'a>),
}

/// A decoded datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Session id.
    pub session: u32,
    /// Type-specific body.
    pub body: Body<'a>,
}

/// Type and session of a datagram, without decoding the body (for routing).
pub fn peek(bytes: &[u8]) -> Option<(PacketType, u32)> {
    if bytes.len() < HEADER_LEN + TAG_LEN || bytes[0] >> 4 != VERSION {
        return None;
    }
    let t = PacketType::from_u8(bytes[0] & 0x0f)?;
    Some((
        t,
        u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
    ))
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() - self.pos < n {
            return Err(WireError::Truncated);
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.pos..];
        self.pos = self.b.len();
        s
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(WireError::TooLong)
        }
    }
}

/// Appends to a buffer, refusing to grow one datagram past `limit` (its start plus
/// [`MAX_DATAGRAM`], or less when the caller asks).
struct Writer<'a> {
    b: &'a mut Vec<u8>,
    limit: usize,
}

impl Writer<'_> {
    fn put(&mut self, s: &[u8]) -> Result<(), WireError> {
        if self.limit - self.b.len() < s.len() {
            return Err(WireError::BufferTooSmall);
        }
        self.b.extend_from_slice(s);
        Ok(())
    }
    fn u8(&mut self, v: u8) -> Result<(), WireError> {
        self.put(&[v])
    }
    fn u16(&mut self, v: u16) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
    fn u32(&mut self, v: u32) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), WireError> {
        self.put(&v.to_be_bytes())
    }
}

fn check(cond: bool, what: &'static str) -> Result<(), WireError> {
    if cond {
        Ok(())
    } else {
        Err(WireError::Field(what))
    }
}

fn validate_announce(a: &Announce) -> Result<(), WireError> {
    check(
        (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&a.block_size) && a.block_size % 2 == 0,
        "block_size",
    )?;
    check(a.image_size > 0, "image_size")?;
    let bc = a.image_size.div_ceil(a.block_size as u64);
    check(bc == a.block_count as u64, "block_count")?;
    check(
        a.stream_len >= 1 && a.stream_len <= a.block_count,
        "stream_len",
    )?;
    check((1..=MAX_FEC_GROUP).contains(&a.fec_group), "fec_group")?;
    check(a.ack_every >= 1, "ack_every")?;
    check(a.rate >= 1, "rate")?;
    check(a.flags & !7 == 0, "announce flags")
}

fn validate_missing(m: &Missing) -> Result<(), WireError> {
    match m {
        Missing::None => Ok(()),
        Missing::Ranges(r) => {
            if r.len() > MAX_RANGES {
                return Err(WireError::ListTooLong);
            }
            check(!r.is_empty(), "empty range list")?;
            let mut next: u64 = 0;
            for x in r {
                check(x.len >= 1, "range len")?;
                check(x.start as u64 >= next, "ranges not ascending")?;
                let end = x.start as u64 + x.len as u64;
                check(end <= u32::MAX as u64, "range end")?;
                next = end;
            }
            Ok(())
        }
        Missing::Bitmap { start, bits } => {
            if bits.len() > MAX_BITMAP_BYTES {
                return Err(WireError::ListTooLong);
            }
            check(!bits.is_empty(), "empty bitmap")?;
            check(
                *start as u64 + bits.len() as u64 * 8 <= u32::MAX as u64,
                "bitmap end",
            )
        }
    }
}

impl<'a> Packet<'a> {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match &self.body {
            Body::Announce(_) => PacketType::Announce,
            Body::Register(_) => PacketType::Register,
            Body::Registered(_) => PacketType::Registered,
            Body::Data(_) => PacketType::Data,
            Body::Repair(_) => PacketType::Repair,
            Body::Fec(_) => PacketType::Fec,
            Body::Ack(_) => PacketType::Ack,
            Body::Done(_) => PacketType::Done,
            Body::Status(_) => PacketType::Status,
            Body::ReadRequest(_) => PacketType::ReadRequest,
            Body::Role(_) => PacketType::Role,
            Body::Leave(_) => PacketType::Leave,
            Body::Manifest(_) => PacketType::Manifest,
            Body::ManifestRequest(_) => PacketType::ManifestRequest,
            Body::GroupHashes(_) => PacketType::GroupHashes,
        }
    }

    /// Decodes a datagram. Checks structure only; the tag is not verified here (see
    /// [`MacKey::verify`]). Never panics.
    pub fn decode(bytes: &'a [u8]) -> Result<Packet<'a>, WireError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(WireError::TooLong);
        }
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err(WireError::Truncated);
        }
        let v = bytes[0] >> 4;
        if v != VERSION {
            return Err(WireError::Version(v));
        }
        let t =
            PacketType::from_u8(bytes[0] & 0x0f).ok_or(WireError::UnknownType(bytes[0] & 15))?;
        let session = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let mut r = Reader {
            b: &bytes[..bytes.len() - TAG_LEN],
            pos: HEADER_LEN,
        };
        let body = match t {
            PacketType::Announce => {
                let a = Announce {
                    image_id: r.array()?,
                    image_size: r.u64()?,
                    block_size: r.u16()?,
                    block_count: r.u32()?,
                    stream_len: r.u32()?,
                    fec_group: r.u32()?,
                    rate: r.u64()?,
                    solicit_ms: r.u32()?,
                    ack_every: r.u16()?,
                    flags: r.u8()?,
                    manifest_root: r.array()?,
                    signature: r.array()?,
                };
                validate_announce(&a)?;
                Body::Announce(a)
            }
            PacketType::Register => {
                let g = Register {
                    nonce: r.u64()?,
                    cache_slots: r.u32()?,
                };
                check(
                    (1..=MAX_CACHE_SLOTS).contains(&g.cache_slots),
                    "cache_slots",
                )?;
                Body::Register(g)
            }
            PacketType::Registered => Body::Registered(Registered {
                receiver: r.u32()?,
                nonce: r.u64()?,
                wrapped_key: r.array()?,
            }),
            PacketType::Data | PacketType::Repair => {
                let seq = r.u32()?;
                let block = r.u32()?;
                let payload = r.rest();
                check(
                    !payload.is_empty() && payload.len() <= MAX_BLOCK_SIZE as usize,
                    "payload length",
                )?;
                let d = Data {
                    seq,
                    block,
                    payload,
                };
                if t == PacketType::Data {
                    Body::Data(d)
                } else {
                    Body::Repair(d)
                }
            }
            PacketType::Fec => {
                let group = r.u32()?;
                let recovery_total = r.u16()?;
                let index = r.u16()?;
                let shard = r.rest();
                check(index < recovery_total, "fec index")?;
                check(
                    shard.len() >= 2
                        && shard.len() % 2 == 0
                        && shard.len() <= MAX_BLOCK_SIZE as usize + FEC_SHARD_PREFIX,
                    "fec shard length",
                )?;
                Body::Fec(Fec {
                    group,
                    recovery_total,
                    index,
                    shard,
                })
            }
            PacketType::Ack => {
                let a = Ack {
                    receiver: r.u32()?,
                    contig: r.u32()?,
                    highest: r.u32()?,
                    free_slots: r.u32()?,
                };
                check(a.contig <= a.highest, "ack contig > highest")?;
                check(a.free_slots <= MAX_CACHE_SLOTS, "free_slots")?;
                Body::Ack(a)
            }
            PacketType::Done => {
                let d = Done {
                    round: r.u32()?,
                    stream_len: r.u32()?,
                    flags: r.u8()?,
                    signature: r.array()?,
                };
                check(d.flags & !Done::FINISHED == 0, "done flags")?;
                Body::Done(d)
            }
            PacketType::Status => {
                let receiver = r.u32()?;
                let round = r.u32()?;
                let free_slots = r.u32()?;
                let total_missing = r.u32()?;
                let flags = r.u8()?;
                let part = r.u8()?;
                let parts = r.u8()?;
                let enc = r.u8()?;
                let missing = match enc {
                    0 => Missing::None,
                    1 => {
                        let n = r.u16()? as usize;
                        if n > MAX_RANGES {
                            return Err(WireError::ListTooLong);
                        }
                        let mut v = Vec::with_capacity(n);
                        for _ in 0..n {
                            v.push(MissingRange {
                                start: r.u32()?,
                                len: r.u32()?,
                            });
                        }
                        Missing::Ranges(v)
                    }
                    2 => {
                        let start = r.u32()?;
                        let n = r.u16()? as usize;
                        if n > MAX_BITMAP_BYTES {
                            return Err(WireError::ListTooLong);
                        }
                        Missing::Bitmap {
                            start,
                            bits: r.take(n)?.to_vec(),
                        }
                    }
                    _ => return Err(WireError::Field("status encoding")),
                };
                let s = Status {
                    receiver,
                    round,
                    free_slots,
                    total_missing,
                    flags,
                    part,
                    parts,
                    missing,
                };
                validate_status(&s)?;
                Body::Status(s)
            }
            PacketType::ReadRequest => {
                let q = ReadRequest {
                    receiver: r.u32()?,
                    round: r.u32()?,
                    pos: r.u32()?,
                    kind: r.u8()?,
                };
                check(q.kind <= 1, "read request kind")?;
                Body::ReadRequest(q)
            }
            PacketType::Role => Body::Role(Role {
                round: r.u32()?,
                requester: r.u32()?,
                next_pos: r.u32()?,
                signature: r.array()?,
            }),
            PacketType::Leave => Body::Leave(Leave { receiver: r.u32()? }),
            PacketType::Manifest => {
                let first = r.u32()?;
                let positions = r.u16()?;
                check((1..=MANIFEST_CHUNK).contains(&(positions as u32)), "manifest chunk length")?;
                check(first % MANIFEST_CHUNK == 0, "manifest chunk start")?;
                let group_hashes = r.take(chunk_group_hashes(positions as u32) * HASH_LEN)?;
                let signature = r.array()?;
                Body::Manifest(ManifestChunk { first, positions, group_hashes, signature })
            }
            PacketType::ManifestRequest => {
                let receiver = r.u32()?;
                let n = r.u16()? as usize;
                if n > MAX_MANIFEST_REQUEST {
                    return Err(WireError::ListTooLong);
                }
                check(n >= 1, "empty manifest request")?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(r.u32()?);
                }
                Body::ManifestRequest(ManifestRequest { receiver, chunks })
            }
            PacketType::GroupHashes => {
                let group = r.u32()?;
                let n = r.u8()? as u32;
                check((1..=crate::manifest::GROUP_POSITIONS).contains(&n), "group list length")?;
                let entries = r.take(n as usize * ENTRY_LEN)?;
                Body::GroupHashes(GroupHashes { group, entries })
            }
        };
        r.finish()?;
        Ok(Packet { session, body })
    }

    /// Encodes into the start of `out` with the tag computed with `key`. Returns the
    /// length. Refuses values that [`Packet::decode`] would refuse.
    pub fn encode(&self, key: &MacKey, out: &mut [u8]) -> Result<usize, WireError> {
        let mut v = Vec::with_capacity(out.len().min(MAX_DATAGRAM));
        let n = self.encode_limited(key, &mut v, out.len())?;
        out[..n].copy_from_slice(&v);
        Ok(n)
    }

    /// Appends the datagram, tag included, to `buf` (what a machine's `poll_transmit`
    /// does); bytes already in `buf` are left alone, and nothing is appended on an error.
    /// Returns the datagram's length.
    pub fn encode_append(&self, key: &MacKey, buf: &mut Vec<u8>) -> Result<usize, WireError> {
        self.encode_limited(key, buf, MAX_DATAGRAM)
    }

    fn encode_limited(&self, key: &MacKey, buf: &mut Vec<u8>, max: usize) -> Result<usize, WireError> {
        let start = buf.len();
        let r = self.encode_body(buf, start + max.min(MAX_DATAGRAM));
        match r {
            Ok(()) if start + max.min(MAX_DATAGRAM) - buf.len() >= TAG_LEN => {
                let tag = key.tag(&buf[start..]);
                buf.extend_from_slice(&tag);
                Ok(buf.len() - start)
            }
            Ok(()) => {
                buf.truncate(start);
                Err(WireError::BufferTooSmall)
            }
            Err(e) => {
                buf.truncate(start);
                Err(e)
            }
        }
    }

    fn encode_body(&self, buf: &mut Vec<u8>, limit: usize) -> Result<(), WireError> {
        let mut w = Writer { b: buf, limit };
        w.u8((VERSION << 4) | self.packet_type() as u8)?;
        w.u32(self.session)?;
        match &self.body {
            Body::Announce(a) => {
                validate_announce(a)?;
                w.put(&a.image_id)?;
                w.u64(a.image_size)?;
                w.u16(a.block_size)?;
                w.u32(a.block_count)?;
                w.u32(a.stream_len)?;
                w.u32(a.fec_group)?;
                w.u64(a.rate)?;
                w.u32(a.solicit_ms)?;
                w.u16(a.ack_every)?;
                w.u8(a.flags)?;
                w.put(&a.manifest_root)?;
                w.put(&a.signature)?;
            }
            Body::Register(g) => {
                check(
                    (1..=MAX_CACHE_SLOTS).contains(&g.cache_slots),
                    "cache_slots",
                )?;
                w.u64(g.nonce)?;
                w.u32(g.cache_slots)?;
            }
            Body::Registered(g) => {
                w.u32(g.receiver)?;
                w.u64(g.nonce)?;
                w.put(&g.wrapped_key)?;
            }
            Body::Data(d) | Body::Repair(d) => {
                check(
                    !d.payload.is_empty() && d.payload.len() <= MAX_BLOCK_SIZE as usize,
                    "payload length",
                )?;
                w.u32(d.seq)?;
                w.u32(d.block)?;
                w.put(d.payload)?;
            }
            Body::Fec(f) => {
                check(f.index < f.recovery_total, "fec index")?;
                check(
                    f.shard.len() >= 2
                        && f.shard.len() % 2 == 0
                        && f.shard.len() <= MAX_BLOCK_SIZE as usize + FEC_SHARD_PREFIX,
                    "fec shard length",
                )?;
                w.u32(f.group)?;
                w.u16(f.recovery_total)?;
                w.u16(f.index)?;
                w.put(f.shard)?;
            }
            Body::Ack(a) => {
                check(a.contig <= a.highest, "ack contig > highest")?;
                check(a.free_slots <= MAX_CACHE_SLOTS, "free_slots")?;
                w.u32(a.receiver)?;
                w.u32(a.contig)?;
                w.u32(a.highest)?;
                w.u32(a.free_slots)?;
            }
            Body::Done(d) => {
                check(d.flags & !Done::FINISHED == 0, "done flags")?;
                w.u32(d.round)?;
                w.u32(d.stream_len)?;
                w.u8(d.flags)?;
                w.put(&d.signature)?;
            }
            Body::Status(s) => {
                validate_status(s)?;
                w.u32(s.receiver)?;
                w.u32(s.round)?;
                w.u32(s.free_slots)?;
                w.u32(s.total_missing)?;
                w.u8(s.flags)?;
                w.u8(s.part)?;
                w.u8(s.parts)?;
                match &s.missing {
                    Missing::None => w.u8(0)?,
                    Missing::Ranges(r) => {
                        w.u8(1)?;
                        w.u16(r.len() as u16)?;
                        for x in r {
                            w.u32(x.start)?;
                            w.u32(x.len)?;
                        }
                    }
                    Missing::Bitmap { start, bits } => {
                        w.u8(2)?;
                        w.u32(*start)?;
                        w.u16(bits.len() as u16)?;
                        w.put(bits)?;
                    }
                }
            }
            Body::ReadRequest(q) => {
                check(q.kind <= 1, "read request kind")?;
                w.u32(q.receiver)?;
                w.u32(q.round)?;
                w.u32(q.pos)?;
                w.u8(q.kind)?;
            }
            Body::Role(x) => {
                w.u32(x.round)?;
                w.u32(x.requester)?;
                w.u32(x.next_pos)?;
                w.put(&x.signature)?;
            }
            Body::Leave(x) => w.u32(x.receiver)?,
            Body::Manifest(m) => {
                check((1..=MANIFEST_CHUNK).contains(&(m.positions as u32)), "manifest chunk length")?;
                check(
                    m.group_hashes.len() == chunk_group_hashes(m.positions as u32) * HASH_LEN,
                    "manifest group hash count",
                )?;
                check(m.first % MANIFEST_CHUNK == 0, "manifest chunk start")?;
                w.u32(m.first)?;
                w.u16(m.positions)?;
                w.put(m.group_hashes)?;
                w.put(&m.signature)?;
            }
            Body::ManifestRequest(q) => {
                if q.chunks.len() > MAX_MANIFEST_REQUEST {
                    return Err(WireError::ListTooLong);
                }
                check(!q.chunks.is_empty(), "empty manifest request")?;
                w.u32(q.receiver)?;
                w.u16(q.chunks.len() as u16)?;
                for c in &q.chunks {
                    w.u32(*c)?;
                }
            }
            Body::GroupHashes(l) => {
                let n = l.entries.len() / ENTRY_LEN;
                check(
                    l.entries.len() % ENTRY_LEN == 0 && (1..=crate::manifest::GROUP_POSITIONS as usize).contains(&n),
                    "group list length",
                )?;
                w.u32(l.group)?;
                w.u8(n as u8)?;
                w.put(l.entries)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> MacKey {
        MacKey::from_bytes([7; 32])
    }

    fn arb_missing() -> impl Strategy<Value = Missing> {
        prop_oneof![
            Just(Missing::None),
            proptest::collection::vec((0u32..1000, 1u32..50), 1..MAX_RANGES).prop_map(|v| {
                let mut next = 0u32;
                Missing::Ranges(
                    v.into_iter()
                        .map(|(gap, len)| {
                            let r = MissingRange {
                                start: next + gap,
                                len,
                            };
                            next = r.start + len;
                            r
                        })
                        .collect(),
                )
            }),
            (
                0u32..1_000_000,
                proptest::collection::vec(any::<u8>(), 1..MAX_BITMAP_BYTES)
            )
                .prop_map(|(start, bits)| Missing::Bitmap { start, bits }),
        ]
    }

    fn arb_body() -> impl Strategy<Value = Body<'static>> {
        let payload = proptest::collection::vec(any::<u8>(), 1..1500)
            .prop_map(|v| &*Box::leak(v.into_boxed_slice()));
        let shard = proptest::collection::vec(any::<u8>(), 1..700).prop_map(|mut v| {
            v.push(0);
            if v.len() % 2 == 1 {
                v.push(0);
            }
            &*Box::leak(v.into_boxed_slice())
        });
        prop_oneof![
            (
                any::<[u8; 16]>(),
                1u64..1 << 40,
                32u16..=4096,
                1u32..=100,
                any::<u32>(),
                any::<u64>(),
                0u8..8
            )
                .prop_map(|(image_id, size, bs, g, solicit_ms, rate, flags)| {
                    let block_size = bs * 2;
                    let block_count = size.div_ceil(block_size as u64);
                    if block_count > u32::MAX as u64 {
                        return Body::Leave(Leave { receiver: 1 });
                    }
                    Body::Announce(Announce {
                        image_id,
                        image_size: size,
                        block_size,
                        block_count: block_count as u32,
                        stream_len: block_count as u32,
                        fec_group: g,
                        rate: rate.max(1),
                        solicit_ms,
                        ack_every: 16,
                        flags,
                        manifest_root: image_id.repeat(2).try_into().unwrap(),
                        signature: [flags; SIGNATURE_LEN],
                    })
                }),
            (any::<u64>(), 1u32..=MAX_CACHE_SLOTS)
                .prop_map(|(nonce, cache_slots)| Body::Register(Register { nonce, cache_slots })),
            (any::<u32>(), any::<u64>(), any::<[u8; 16]>()).prop_map(
                |(receiver, nonce, wrapped_key)| {
                    Body::Registered(Registered {
                        receiver,
                        nonce,
                        wrapped_key,
                    })
                }
            ),
            (any::<u32>(), any::<u32>(), payload.clone()).prop_map(|(seq, block, payload)| {
                Body::Data(Data {
                    seq,
                    block,
                    payload,
                })
            }),
            (any::<u32>(), any::<u32>(), payload).prop_map(|(seq, block, payload)| Body::Repair(
                Data {
                    seq,
                    block,
                    payload
                }
            )),
            (any::<u32>(), 1u16.., any::<u16>(), shard).prop_map(|(group, total, i, shard)| {
                Body::Fec(Fec {
                    group,
                    recovery_total: total,
                    index: i % total,
                    shard,
                })
            }),
            (
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                0u32..=MAX_CACHE_SLOTS
            )
                .prop_map(|(receiver, a, b, free_slots)| Body::Ack(Ack {
                    receiver,
                    contig: a.min(b),
                    highest: a.max(b),
                    free_slots
                })),
            (any::<u32>(), any::<u32>(), 0u8..2, any::<u8>()).prop_map(|(round, stream_len, flags, fill)| Body::Done(
                Done {
                    round,
                    stream_len,
                    flags,
                    signature: [fill; SIGNATURE_LEN],
                }
            )),
            (
                any::<u32>(),
                any::<u32>(),
                0u32..=MAX_CACHE_SLOTS,
                any::<u32>(),
                any::<bool>(),
                arb_missing(),
                1u8..=MAX_STATUS_PARTS,
                any::<u8>(),
            )
                .prop_map(|(receiver, round, free_slots, total, trunc, missing, parts, part)| {
                    if missing == Missing::None && total == 0 {
                        Body::Status(Status {
                            receiver,
                            round,
                            free_slots,
                            total_missing: 0,
                            flags: Status::COMPLETE,
                            part: 0,
                            parts: 1,
                            missing,
                        })
                    } else {
                        Body::Status(Status {
                            receiver,
                            round,
                            free_slots,
                            total_missing: total,
                            flags: if trunc { Status::TRUNCATED } else { 0 },
                            part: part % parts,
                            parts,
                            missing,
                        })
                    }
                }),
            (any::<u32>(), any::<u32>(), any::<u32>(), 0u8..2).prop_map(
                |(receiver, round, pos, kind)| {
                    Body::ReadRequest(ReadRequest {
                        receiver,
                        round,
                        pos,
                        kind,
                    })
                }
            ),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(round, requester, next_pos, half)| {
                let mut signature = [0u8; SIGNATURE_LEN];
                signature[..32].copy_from_slice(&half);
                signature[32..].copy_from_slice(&half);
                Body::Role(Role {
                    round,
                    requester,
                    next_pos,
                    signature,
                })
            }),
            any::<u32>().prop_map(|receiver| Body::Leave(Leave { receiver })),
            (any::<u32>(), 1u16..=MANIFEST_CHUNK as u16, any::<u8>()).prop_map(
                |(first, positions, fill)| Body::Manifest(ManifestChunk {
                    first: first / MANIFEST_CHUNK * MANIFEST_CHUNK,
                    positions,
                    group_hashes: Box::leak(
                        (0..chunk_group_hashes(positions as u32) * HASH_LEN)
                            .map(|i| fill ^ i as u8)
                            .collect::<Vec<u8>>()
                            .into_boxed_slice()
                    ),
                    signature: [fill ^ 0x5a; SIGNATURE_LEN],
                })
            ),
            (any::<u32>(), proptest::collection::vec(any::<u32>(), 1..=MAX_MANIFEST_REQUEST))
                .prop_map(|(receiver, chunks)| Body::ManifestRequest(ManifestRequest {
                    receiver,
                    chunks
                })),
            (any::<u32>(), 1usize..=16, any::<u8>()).prop_map(|(group, n, fill)| Body::GroupHashes(GroupHashes {
                group,
                entries: Box::leak(vec![fill; n * ENTRY_LEN].into_boxed_slice()),
            })),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn round_trip(session in any::<u32>(), body in arb_body()) {
            let p = Packet { session, body };
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let n = p.encode(&key(), &mut buf).unwrap();
            prop_assert!(key().verify(&buf[..n]));
            prop_assert!(!MacKey::from_bytes([8; 32]).verify(&buf[..n]));
            let q = Packet::decode(&buf[..n]).unwrap();
            prop_assert_eq!(&q, &p);
            prop_assert_eq!(peek(&buf[..n]), Some((p.packet_type(), session)));
            // Re-encode gives identical bytes.
            let mut buf2 = vec![0u8; MAX_DATAGRAM];
            let n2 = q.encode(&key(), &mut buf2).unwrap();
            prop_assert_eq!(&buf[..n], &buf2[..n2]);
            // Every truncation is refused or decodes to something else, never panics.
            for cut in 0..n.min(64) {
                let _ = Packet::decode(&buf[..cut]);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Packet::decode(&bytes);
            let _ = peek(&bytes);
        }

        #[test]
        fn decode_never_panics_on_valid_header(t in 1u8..16, session in any::<u32>(),
                rest in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let mut b = vec![(VERSION << 4) | t];
            b.extend_from_slice(&session.to_be_bytes());
            b.extend_from_slice(&rest);
            if let Ok(p) = Packet::decode(&b) {
                // Anything accepted re-encodes to the same bytes (tag aside).
                let mut out = vec![0u8; MAX_DATAGRAM];
                let n = p.encode(&key(), &mut out).unwrap();
                prop_assert_eq!(&out[..n - TAG_LEN], &b[..b.len() - TAG_LEN]);
            }
        }
    }

    #[test]
    fn encode_append_leaves_what_is_there_and_appends_nothing_on_error() {
        let p = Packet { session: 7, body: Body::Leave(Leave { receiver: 3 }) };
        let mut one = vec![0u8; 64];
        let n = p.encode(&key(), &mut one).unwrap();
        let mut buf = b"earlier".to_vec();
        assert_eq!(p.encode_append(&key(), &mut buf).unwrap(), n);
        assert_eq!(&buf[..7], b"earlier");
        assert_eq!(&buf[7..], &one[..n]);
        let bad = Packet { session: 7, body: Body::ReadRequest(ReadRequest { receiver: 1, round: 0, pos: 0, kind: 9 }) };
        assert_eq!(bad.encode_append(&key(), &mut buf), Err(WireError::Field("read request kind")));
        assert_eq!(buf.len(), 7 + n);
        assert_eq!(p.encode(&key(), &mut [0u8; 12]), Err(WireError::BufferTooSmall));
    }

    #[test]
    fn refuses_status_parts_out_of_range() {
        let status = |flags, part, parts, missing| Status {
            receiver: 1,
            round: 0,
            free_slots: 0,
            total_missing: if flags == Status::COMPLETE { 0 } else { 9 },
            flags,
            part,
            parts,
            missing,
        };
        let one = Missing::Ranges(vec![MissingRange { start: 4, len: 2 }]);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // Encoding refuses them, and so does decoding the same bytes with the part fields
        // set afterwards (offset 5 + 17: after receiver, round, free, total and flags).
        for (flags, part, parts, missing) in [
            (0, 0, 0, one.clone()),
            (0, 2, 2, one.clone()),
            (0, 0, MAX_STATUS_PARTS + 1, one.clone()),
            (Status::COMPLETE, 0, 2, Missing::None),
        ] {
            let bad = Packet { session: 3, body: Body::Status(status(flags, part, parts, missing.clone())) };
            assert_eq!(bad.encode(&key(), &mut buf), Err(WireError::Field(if flags == 0 { "status part" } else { "complete with missing" })));
            let good = Packet { session: 3, body: Body::Status(status(flags, 0, 1, missing)) };
            let n = good.encode(&key(), &mut buf).unwrap();
            assert!(Packet::decode(&buf[..n]).is_ok());
            buf[HEADER_LEN + 17] = part;
            buf[HEADER_LEN + 18] = parts;
            assert!(Packet::decode(&buf[..n]).is_err(), "part {part} of {parts}");
        }
        // The last part of the largest answer is fine.
        let last = Packet { session: 3, body: Body::Status(status(Status::TRUNCATED, MAX_STATUS_PARTS - 1, MAX_STATUS_PARTS, one)) };
        let n = last.encode(&key(), &mut buf).unwrap();
        assert_eq!(Packet::decode(&buf[..n]).unwrap(), last);
    }

    #[test]
    fn refuses_absurd_lists() {
        let mut b = vec![(VERSION << 4) | PacketType::Status as u8, 0, 0, 0, 1];
        b.extend_from_slice(&[0; 16]); // receiver, round, free, total
        b.push(0); // flags
        b.extend_from_slice(&[0, 1]); // part 0 of 1
        b.push(1); // ranges
        b.extend_from_slice(&(MAX_RANGES as u16 + 1).to_be_bytes());
        b.extend(std::iter::repeat_n(0u8, (MAX_RANGES + 1) * 8 + TAG_LEN));
        assert_eq!(Packet::decode(&b), Err(WireError::ListTooLong));
        assert_eq!(Packet::decode(&[0x14]), Err(WireError::Truncated));
        assert_eq!(
            Packet::decode(&[0x24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::Version(2))
        );
    }
}

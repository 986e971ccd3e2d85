//! TFTP wire format: RFC 1350 packets plus the RFC 2347 OACK.
//!
//! Everything read from the wire is bounded before use: [`Packet::parse`] never panics and
//! never allocates more than the datagram it was given.

use std::fmt;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Real clients send at most a handful of options (blksize, tsize, timeout, windowsize,
/// multicast, ...); more than this is a flood, not a request.
pub const MAX_OPTIONS: usize = 16;
/// Longest option name or value accepted, in bytes.
pub const MAX_OPTION_LEN: usize = 255;
/// Longest file name accepted, in bytes.
pub const MAX_FILENAME_LEN: usize = 1024;

/// Transfer mode of a request. Only `octet` matters for booting; the others are parsed so
/// the shell can refuse them with a proper error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }

    fn parse(s: &str) -> Option<Mode> {
        [Mode::Netascii, Mode::Octet, Mode::Mail]
            .into_iter()
            .find(|m| s.eq_ignore_ascii_case(m.as_str()))
    }
}

/// TFTP error codes: RFC 1350 (0-7) and RFC 2347 (8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    /// 8: the receiver of an OACK refuses the options it acknowledges (RFC 2347).
    OptionsRefused,
    /// Any code above 8; kept so it can be logged.
    Other(u16),
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> ErrorCode {
        match code {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTid,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionsRefused,
            c => ErrorCode::Other(c),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTid => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionsRefused => 8,
            ErrorCode::Other(c) => c,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self, self.as_u16())
    }
}

/// One TFTP datagram. Strings never contain NUL (parse cannot produce one; encoding one
/// would produce a different packet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq {
        filename: String,
        mode: Mode,
        options: Vec<(String, String)>,
    },
    Wrq {
        filename: String,
        mode: Mode,
        options: Vec<(String, String)>,
    },
    Data {
        block: u16,
        data: Vec<u8>,
    },
    Ack {
        block: u16,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Oack {
        options: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("datagram too short")]
    TooShort,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("string not NUL-terminated")]
    MissingNul,
    #[error("string is not UTF-8")]
    NotUtf8,
    #[error("empty file name")]
    EmptyFilename,
    #[error("file name longer than {MAX_FILENAME_LEN} bytes")]
    FilenameTooLong,
    #[error("unknown transfer mode {0:?}")]
    BadMode(String),
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option name or value longer than {MAX_OPTION_LEN} bytes")]
    OptionTooLong,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u16(&mut self) -> Result<u16, ParseError> {
        match *self.0 {
            [a, b, ref rest @ ..] => {
                self.0 = rest;
                Ok(u16::from_be_bytes([a, b]))
            }
            _ => Err(ParseError::TooShort),
        }
    }

    fn cstr(&mut self) -> Result<&'a str, ParseError> {
        let nul = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(ParseError::MissingNul)?;
        let s = &self.0[..nul];
        self.0 = &self.0[nul + 1..];
        std::str::from_utf8(s).map_err(|_| ParseError::NotUtf8)
    }

    fn options(&mut self) -> Result<Vec<(String, String)>, ParseError> {
        let mut options = Vec::new();
        while !self.0.is_empty() {
            let name = self.cstr()?;
            if name.is_empty() {
                // Some PXE ROMs pad requests with NULs: treat an empty name as the end.
                break;
            }
            if self.0.is_empty() {
                return Err(ParseError::OptionWithoutValue(name.to_string()));
            }
            let value = self.cstr()?;
            if options.len() == MAX_OPTIONS {
                return Err(ParseError::TooManyOptions);
            }
            if name.len() > MAX_OPTION_LEN || value.len() > MAX_OPTION_LEN {
                return Err(ParseError::OptionTooLong);
            }
            options.push((name.to_ascii_lowercase(), value.to_string()));
        }
        Ok(options)
    }

    fn request(&mut self, op: u16) -> Result<Packet, ParseError> {
        let filename = self.cstr()?;
        if filename.is_empty() {
            return Err(ParseError::EmptyFilename);
        }
        if filename.len() > MAX_FILENAME_LEN {
            return Err(ParseError::FilenameTooLong);
        }
        let mode = self.cstr()?;
        let mode = Mode::parse(mode)
            .ok_or_else(|| ParseError::BadMode(mode.chars().take(32).collect()))?;
        let (filename, options) = (filename.to_string(), self.options()?);
        Ok(if op == OP_RRQ {
            Packet::Rrq {
                filename,
                mode,
                options,
            }
        } else {
            Packet::Wrq {
                filename,
                mode,
                options,
            }
        })
    }
}

impl Packet {
    pub fn parse(buf: &[u8]) -> Result<Packet, ParseError> {
        let mut r = Reader(buf);
        match r.u16()? {
            op @ (OP_RRQ | OP_WRQ) => r.request(op),
            OP_DATA => Ok(Packet::Data {
                block: r.u16()?,
                data: r.0.to_vec(),
            }),
            // Trailing bytes after an ACK are padding from some stacks, not an error.
            OP_ACK => Ok(Packet::Ack { block: r.u16()? }),
            OP_ERROR => {
                let code = ErrorCode::from_u16(r.u16()?);
                // Lenient on purpose: an error must abort the transfer even when the peer
                // forgot the NUL or sent Latin-1.
                let end = r.0.iter().position(|&b| b == 0).unwrap_or(r.0.len());
                let message = String::from_utf8_lossy(&r.0[..end]).into_owned();
                Ok(Packet::Error { code, message })
            }
            OP_OACK => Ok(Packet::Oack {
                options: r.options()?,
            }),
            op => Err(ParseError::UnknownOpcode(op)),
        }
    }

    /// Appends the wire form of the packet to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Rrq {
                filename,
                mode,
                options,
            } => encode_request(OP_RRQ, filename, *mode, options, out),
            Packet::Wrq {
                filename,
                mode,
                options,
            } => encode_request(OP_WRQ, filename, *mode, options, out),
            Packet::Data { block, data } => {
                encode_data_header(*block, out);
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => encode_ack(*block, out),
            Packet::Error { code, message } => encode_error(*code, message, out),
            Packet::Oack { options } => encode_oack(options, out),
        }
    }
}

/// A DATA packet's block number and payload, borrowed: the receive path needs no copy.
pub fn parse_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    match *buf {
        [0, 3, a, b, ref data @ ..] => Some((u16::from_be_bytes([a, b]), data)),
        _ => None,
    }
}

fn push_cstr(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn push_options(options: &[(String, String)], out: &mut Vec<u8>) {
    for (k, v) in options {
        push_cstr(k, out);
        push_cstr(v, out);
    }
}

pub fn encode_request(
    op: u16,
    filename: &str,
    mode: Mode,
    options: &[(String, String)],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&op.to_be_bytes());
    push_cstr(filename, out);
    push_cstr(mode.as_str(), out);
    push_options(options, out);
}

/// Opcode and block number; the caller appends the payload.
pub fn encode_data_header(block: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&OP_DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

pub fn encode_ack(block: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&OP_ACK.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

pub fn encode_error(code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&OP_ERROR.to_be_bytes());
    out.extend_from_slice(&code.as_u16().to_be_bytes());
    push_cstr(message, out);
}

pub fn encode_oack(options: &[(String, String)], out: &mut Vec<u8>) {
    out.extend_from_slice(&OP_OACK.to_be_bytes());
    push_options(options, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_firmware_rrq() {
        let p =
            Packet::parse(b"\x00\x01undionly.kpxe\x00OCTET\x00BLKSIZE\x001432\x00tsize\x000\x00")
                .unwrap();
        assert_eq!(
            p,
            Packet::Rrq {
                filename: "undionly.kpxe".into(),
                mode: Mode::Octet,
                options: opts(&[("blksize", "1432"), ("tsize", "0")]),
            }
        );
    }

    #[test]
    fn tolerates_nul_padding_after_options() {
        let p = Packet::parse(b"\x00\x01f\x00octet\x00blksize\x00512\x00\x00\x00").unwrap();
        assert_eq!(
            p,
            Packet::Rrq {
                filename: "f".into(),
                mode: Mode::Octet,
                options: opts(&[("blksize", "512")])
            }
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Packet::parse(b""), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(b"\x00"), Err(ParseError::TooShort));
        assert_eq!(
            Packet::parse(b"\x00\x09"),
            Err(ParseError::UnknownOpcode(9))
        );
        assert_eq!(Packet::parse(b"\x00\x01file"), Err(ParseError::MissingNul));
        assert_eq!(
            Packet::parse(b"\x00\x01file\x00octet"),
            Err(ParseError::MissingNul)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01\x00octet\x00"),
            Err(ParseError::EmptyFilename)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\xff\x00octet\x00"),
            Err(ParseError::NotUtf8)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00binary\x00"),
            Err(ParseError::BadMode("binary".into()))
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x00"),
            Err(ParseError::OptionWithoutValue("blksize".into()))
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x0015"),
            Err(ParseError::MissingNul)
        );
        assert_eq!(Packet::parse(b"\x00\x03\x00"), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(b"\x00\x04\x00"), Err(ParseError::TooShort));
    }

    #[test]
    fn rejects_option_flood() {
        let mut b = b"\x00\x01f\x00octet\x00".to_vec();
        for i in 0..=MAX_OPTIONS {
            b.extend_from_slice(format!("x{i}\x001\x00").as_bytes());
        }
        assert_eq!(Packet::parse(&b), Err(ParseError::TooManyOptions));
        let mut b = b"\x00\x01f\x00octet\x00blksize\x00".to_vec();
        b.extend(std::iter::repeat_n(b'9', MAX_OPTION_LEN + 1));
        b.push(0);
        assert_eq!(Packet::parse(&b), Err(ParseError::OptionTooLong));
    }

    #[test]
    fn error_without_nul_still_parses() {
        let p = Packet::parse(b"\x00\x05\x00\x01no such file").unwrap();
        assert_eq!(
            p,
            Packet::Error {
                code: ErrorCode::FileNotFound,
                message: "no such file".into()
            }
        );
    }

    #[test]
    fn data_view_matches_parse() {
        let mut out = Vec::new();
        Packet::Data {
            block: 65535,
            data: vec![1, 2, 3],
        }
        .encode(&mut out);
        assert_eq!(parse_data(&out), Some((65535, &[1u8, 2, 3][..])));
        assert_eq!(parse_data(b"\x00\x04\x00\x01"), None);
    }

    fn text(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..max)
            .prop_map(|v| v.into_iter().collect())
    }

    fn options() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec(("[a-z0-9]{1,12}", text(16)), 0..=MAX_OPTIONS)
    }

    fn mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Netascii), Just(Mode::Octet), Just(Mode::Mail)]
    }

    fn packet() -> impl Strategy<Value = Packet> {
        let filename = || text(64).prop_filter("non-empty", |s| !s.is_empty());
        prop_oneof![
            (filename(), mode(), options()).prop_map(|(filename, mode, options)| Packet::Rrq {
                filename,
                mode,
                options
            }),
            (filename(), mode(), options()).prop_map(|(filename, mode, options)| Packet::Wrq {
                filename,
                mode,
                options
            }),
            (
                any::<u16>(),
                proptest::collection::vec(any::<u8>(), 0..1500)
            )
                .prop_map(|(block, data)| Packet::Data { block, data }),
            any::<u16>().prop_map(|block| Packet::Ack { block }),
            (any::<u16>(), text(64)).prop_map(|(c, message)| Packet::Error {
                code: ErrorCode::from_u16(c),
                message
            }),
            options().prop_map(|options| Packet::Oack { options }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(p in packet()) {
            let mut out = Vec::new();
            p.encode(&mut out);
            prop_assert_eq!(Packet::parse(&out), Ok(p));
        }

        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Packet::parse(&b);
            let _ = parse_data(&b);
        }

        #[test]
        fn parse_never_panics_on_plausible_requests(
            op in 0u16..8,
            body in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..200),
        ) {
            let mut b = op.to_be_bytes().to_vec();
            b.extend(body);
            if let Ok(p) = Packet::parse(&b) {
                // Whatever parses must re-encode to something that parses the same.
                let mut out = Vec::new();
                p.encode(&mut out);
                prop_assert_eq!(Packet::parse(&out), Ok(p));
            }
        }
    }
}

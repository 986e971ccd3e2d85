//! The two packet layouts: the conflict-clearing packet exchanged between negotiators
//! (`docs/protocols.md`) and the negotiator <-> file server messages.
//!
//! Every length on the wire is checked against the datagram before it is used; parsing
//! never panics (a property test feeds it random bytes).

use std::net::Ipv4Addr;
use thiserror::Error;

/// Why a datagram could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("datagram too short: {0} bytes")]
    Short(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("length field {field} does not match the datagram's {actual} bytes")]
    LengthMismatch { field: usize, actual: usize },
    #[error("boot file name is not UTF-8")]
    NotUtf8,
    #[error("boot file name is empty")]
    EmptyName,
    #[error("boot file name longer than 255 bytes")]
    NameTooLong,
    #[error("unknown NAK reason {0}")]
    UnknownReason(u8),
}

/// Opcode of a conflict-clearing packet: 0 (query) and 1 (response, the query echoed);
/// 2 is an owner's periodic announcement of an assignment it holds,
/// so that assignments of a negotiator that died expire everywhere (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictOp {
    Query = 0,
    Response = 1,
    Announce = 2,
}

/// A multicast destination: the group and the client port the file server multicasts DATA
/// to. It is the unit of conflict: two files on one `Slot` is the failure the clearing
/// protocol exists to prevent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub group: Ipv4Addr,
    pub port: u16,
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.group, self.port)
    }
}

/// The conflict query / response / announcement (`docs/protocols.md`):
///
/// ```text
/// offset size field
///  0     1    opcode               0 query, 1 response (echo of the query), 2 announce
///  1     2    length               of the whole packet, big endian
///  3     4    file server IPv4     the MTFTP server that will multicast the file
///  7     2    negotiator type      PXE boot server type
///  9     2    layer                PXE boot layer
/// 11     4    multicast address
/// 15     2    port                 the client (multicast destination) port
/// 17     1    boot file name length (1..=255)
/// 18     n    boot file name
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConflictPacket {
    pub op: ConflictOp,
    pub file_server: Ipv4Addr,
    pub negotiator_type: u16,
    pub layer: u16,
    pub group: Ipv4Addr,
    pub port: u16,
    pub boot_file: String,
}

/// Bytes before the boot file name.
pub const CONFLICT_HEADER_LEN: usize = 18;

impl ConflictPacket {
    pub fn slot(&self) -> Slot {
        Slot {
            group: self.group,
            port: self.port,
        }
    }

    /// The same packet with another opcode (a response is the query echoed with opcode 1).
    pub fn with_op(&self, op: ConflictOp) -> ConflictPacket {
        ConflictPacket { op, ..self.clone() }
    }

    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let name = check_name(&self.boot_file)?;
        let len = CONFLICT_HEADER_LEN + name.len();
        let mut out = Vec::with_capacity(len);
        out.push(self.op as u8);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&self.file_server.octets());
        out.extend_from_slice(&self.negotiator_type.to_be_bytes());
        out.extend_from_slice(&self.layer.to_be_bytes());
        out.extend_from_slice(&self.group.octets());
        out.extend_from_slice(&self.port.to_be_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        Ok(out)
    }

    pub fn parse(buf: &[u8]) -> Result<ConflictPacket, WireError> {
        if buf.len() < CONFLICT_HEADER_LEN {
            return Err(WireError::Short(buf.len()));
        }
        let op = match buf[0] {
            0 => ConflictOp::Query,
            1 => ConflictOp::Response,
            2 => ConflictOp::Announce,
            o => return Err(WireError::UnknownOpcode(o)),
        };
        let field = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        let name_len = buf[17] as usize;
        if field != buf.len() || CONFLICT_HEADER_LEN + name_len != buf.len() {
            return Err(WireError::LengthMismatch {
                field,
                actual: buf.len(),
            });
        }
        let boot_file = parse_name(&buf[CONFLICT_HEADER_LEN..])?;
        Ok(ConflictPacket {
            op,
            file_server: ip(&buf[3..7]),
            negotiator_type: u16::from_be_bytes([buf[7], buf[8]]),
            layer: u16::from_be_bytes([buf[9], buf[10]]),
            group: ip(&buf[11..15]),
            port: u16::from_be_bytes([buf[15], buf[16]]),
            boot_file,
        })
    }
}

fn ip(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn check_name(name: &str) -> Result<&[u8], WireError> {
    let b = name.as_bytes();
    if b.is_empty() {
        return Err(WireError::EmptyName);
    }
    if b.len() > 255 {
        return Err(WireError::NameTooLong);
    }
    Ok(b)
}

fn parse_name(b: &[u8]) -> Result<String, WireError> {
    if b.is_empty() {
        return Err(WireError::EmptyName);
    }
    String::from_utf8(b.to_vec()).map_err(|_| WireError::NotUtf8)
}

/// Opcode of a negotiator <-> file server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsOp {
    /// Negotiator -> file server: be ready to multicast `file` on the slot. Also the renewal.
    Prepare = 1,
    /// File server -> negotiator: ready (or already set up with the same file).
    Ack = 2,
    /// File server -> negotiator: refused, see [`NakReason`].
    Nak = 3,
    /// Negotiator -> file server: take me off the slot's list.
    Delete = 4,
    /// File server -> negotiator: done (also when the negotiator was not on the list).
    Deleted = 5,
}

/// Why a file server refused a PREPARE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NakReason {
    /// The slot is in use for another file.
    Busy = 1,
    /// The file server has no such file.
    NoSuchFile = 2,
}

/// A negotiator <-> file server message (`docs/protocols.md`):
///
/// ```text
/// offset size field
///  0     1    opcode        1 PREPARE, 2 ACK, 3 NAK, 4 DELETE, 5 DELETED
///  1     2    length        of the whole packet, big endian
///  3     4    xid           chosen by the negotiator, echoed by the file server
///  7     4    multicast address
/// 11     2    client port   (multicast destination port)
/// 13     2    server port   (where clients send the MTFTP RRQ)
/// 15     1    NAK reason    1 busy, 2 no such file; 0 otherwise
/// 16     1    boot file name length (1..=255)
/// 17     n    boot file name
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FsMessage {
    pub op: FsOp,
    pub xid: u32,
    pub slot: Slot,
    pub server_port: u16,
    pub reason: Option<NakReason>,
    pub boot_file: String,
}

pub const FS_HEADER_LEN: usize = 17;

impl FsMessage {
    /// The file server's answer to this message, with the same xid, slot and name.
    pub fn reply(&self, op: FsOp, reason: Option<NakReason>) -> FsMessage {
        FsMessage {
            op,
            reason,
            ..self.clone()
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let name = check_name(&self.boot_file)?;
        let len = FS_HEADER_LEN + name.len();
        let mut out = Vec::with_capacity(len);
        out.push(self.op as u8);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.slot.group.octets());
        out.extend_from_slice(&self.slot.port.to_be_bytes());
        out.extend_from_slice(&self.server_port.to_be_bytes());
        out.push(self.reason.map_or(0, |r| r as u8));
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        Ok(out)
    }

    pub fn parse(buf: &[u8]) -> Result<FsMessage, WireError> {
        if buf.len() < FS_HEADER_LEN {
            return Err(WireError::Short(buf.len()));
        }
        let op = match buf[0] {
            1 => FsOp::Prepare,
            2 => FsOp::Ack,
            3 => FsOp::Nak,
            4 => FsOp::Delete,
            5 => FsOp::Deleted,
            o => return Err(WireError::UnknownOpcode(o)),
        };
        let field = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        let name_len = buf[16] as usize;
        if field != buf.len() || FS_HEADER_LEN + name_len != buf.len() {
            return Err(WireError::LengthMismatch {
                field,
                actual: buf.len(),
            });
        }
        let reason = match (op, buf[15]) {
            (FsOp::Nak, 1) => Some(NakReason::Busy),
            (FsOp::Nak, 2) => Some(NakReason::NoSuchFile),
            (_, 0) if op != FsOp::Nak => None,
            (_, r) => return Err(WireError::UnknownReason(r)),
        };
        Ok(FsMessage {
            op,
            xid: u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]),
            slot: Slot {
                group: ip(&buf[7..11]),
                port: u16::from_be_bytes([buf[11], buf[12]]),
            },
            server_port: u16::from_be_bytes([buf[13], buf[14]]),
            reason,
            boot_file: parse_name(&buf[FS_HEADER_LEN..])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A query encoded field by field, against the documented layout.
    #[test]
    fn conflict_query_bytes_follow_the_documented_layout() {
        let q = ConflictPacket {
            op: ConflictOp::Query,
            file_server: Ipv4Addr::new(10, 0, 0, 5),
            negotiator_type: 0x8000,
            layer: 0x0001,
            group: Ipv4Addr::new(239, 192, 1, 7),
            port: 1758,
            boot_file: "pxelinux.0".into(),
        };
        let bytes = q.encode().unwrap();
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0x00,                   // opcode: 0 = query
            0x00, 0x1c,             // length: 18 + 10 = 28
            10, 0, 0, 5,            // MTFTP (file) server IPv4
            0x80, 0x00,             // negotiator (boot server) type
            0x00, 0x01,             // layer
            239, 192, 1, 7,         // multicast address
            0x06, 0xde,             // port 1758
            10,                     // boot file name length
            b'p', b'x', b'e', b'l', b'i', b'n', b'u', b'x', b'.', b'0',
        ];
        assert_eq!(bytes, expected);
        assert_eq!(ConflictPacket::parse(&bytes).unwrap(), q);

        // The response is the query echoed with opcode 1: one byte differs.
        let r = q.with_op(ConflictOp::Response).encode().unwrap();
        assert_eq!(r[0], 1);
        assert_eq!(r[1..], bytes[1..]);
    }

    #[test]
    fn fs_message_layout() {
        let m = FsMessage {
            op: FsOp::Nak,
            xid: 0x0102_0304,
            slot: Slot {
                group: Ipv4Addr::new(239, 1, 2, 3),
                port: 0x1234,
            },
            server_port: 0x5678,
            reason: Some(NakReason::Busy),
            boot_file: "a".into(),
        };
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            3, 0, 18, 1, 2, 3, 4, 239, 1, 2, 3, 0x12, 0x34, 0x56, 0x78, 1, 1, b'a',
        ];
        assert_eq!(m.encode().unwrap(), expected);
        assert_eq!(FsMessage::parse(&expected).unwrap(), m);
    }

    #[test]
    fn bad_lengths_are_refused() {
        let mut b = ConflictPacket {
            op: ConflictOp::Query,
            file_server: Ipv4Addr::LOCALHOST,
            negotiator_type: 0,
            layer: 0,
            group: Ipv4Addr::new(239, 0, 0, 1),
            port: 1,
            boot_file: "f".into(),
        }
        .encode()
        .unwrap();
        b.push(0);
        assert!(matches!(
            ConflictPacket::parse(&b),
            Err(WireError::LengthMismatch { .. })
        ));
        b.pop();
        b[17] = 2;
        assert!(ConflictPacket::parse(&b).is_err());
        assert_eq!(ConflictPacket::parse(&[0; 5]), Err(WireError::Short(5)));
        let long = "x".repeat(256);
        assert_eq!(
            FsMessage {
                op: FsOp::Prepare,
                xid: 0,
                slot: Slot {
                    group: Ipv4Addr::UNSPECIFIED,
                    port: 0
                },
                server_port: 0,
                reason: None,
                boot_file: long,
            }
            .encode(),
            Err(WireError::NameTooLong)
        );
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9/._-]{1,200}"
    }

    fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    proptest! {
        #[test]
        fn conflict_round_trip(op in 0u8..3, fs in ipv4(), t in any::<u16>(), layer in any::<u16>(),
                               group in ipv4(), port in any::<u16>(), file in name()) {
            let op = [ConflictOp::Query, ConflictOp::Response, ConflictOp::Announce][op as usize];
            let p = ConflictPacket { op, file_server: fs, negotiator_type: t, layer, group, port, boot_file: file };
            let bytes = p.encode().unwrap();
            prop_assert_eq!(bytes.len(), CONFLICT_HEADER_LEN + p.boot_file.len());
            let back = ConflictPacket::parse(&bytes).unwrap();
            prop_assert_eq!(&back, &p);
            prop_assert_eq!(back.encode().unwrap(), bytes);
        }

        #[test]
        fn fs_round_trip(op in 1u8..6, xid in any::<u32>(), group in ipv4(), port in any::<u16>(),
                         sport in any::<u16>(), busy in any::<bool>(), file in name()) {
            let op = [FsOp::Prepare, FsOp::Ack, FsOp::Nak, FsOp::Delete, FsOp::Deleted][op as usize - 1];
            let reason = (op == FsOp::Nak).then_some(if busy { NakReason::Busy } else { NakReason::NoSuchFile });
            let m = FsMessage { op, xid, slot: Slot { group, port }, server_port: sport, reason, boot_file: file };
            let bytes = m.encode().unwrap();
            let back = FsMessage::parse(&bytes).unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert_eq!(back.encode().unwrap(), bytes);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            // Whatever parses must encode back to the same bytes.
            if let Ok(p) = ConflictPacket::parse(&bytes) {
                prop_assert_eq!(p.encode().unwrap(), bytes.clone());
            }
            if let Ok(m) = FsMessage::parse(&bytes) {
                prop_assert_eq!(m.encode().unwrap(), bytes);
            }
        }

        #[test]
        fn mutated_valid_packets_never_panic(file in name(), flips in proptest::collection::vec((0usize..300, any::<u8>()), 1..6)) {
            let mut b = ConflictPacket { op: ConflictOp::Query, file_server: Ipv4Addr::LOCALHOST, negotiator_type: 1, layer: 2,
                group: Ipv4Addr::new(239, 0, 0, 1), port: 3, boot_file: file }.encode().unwrap();
            for (i, v) in flips { let n = b.len(); b[i % n] = v; }
            let _ = ConflictPacket::parse(&b);
            let _ = FsMessage::parse(&b);
        }
    }
}

//! DHCPv4 / BOOTP wire format (RFC 2131 §2, RFC 2132, RFC 3396).
//!
//! [`DhcpMessage::parse`] validates every length it reads from the wire and never panics;
//! [`DhcpMessage::encode`] always produces a message `parse` accepts.

use fleetboot_boot::MacAddr;
use std::net::Ipv4Addr;

/// RFC 2131 §3: the four octets that separate the BOOTP header from DHCP options.
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];

/// Fixed BOOTP header length, before the magic cookie.
pub const HEADER_LEN: usize = 236;

/// BOOTP relays and old clients drop anything shorter (RFC 1542 §2.1).
pub const MIN_ENCODED_LEN: usize = 300;

/// Upper bound on option fragments in one message. A real client sends a few dozen; the cap
/// keeps a flood of one-byte options from costing quadratic time during concatenation.
pub const MAX_OPTION_FRAGMENTS: usize = 512;

const SNAME_LEN: usize = 64;
const FILE_LEN: usize = 128;

/// Option codes the crate reads or writes.
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN: u8 = 15;
    pub const BROADCAST: u8 = 28;
    pub const VENDOR_SPECIFIC: u8 = 43;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const VENDOR_CLASS: u8 = 60;
    pub const CLIENT_ID: u8 = 61;
    pub const TFTP_SERVER: u8 = 66;
    pub const BOOTFILE: u8 = 67;
    pub const USER_CLASS: u8 = 77;
    pub const CLIENT_ARCH: u8 = 93;
    pub const CLIENT_NII: u8 = 94;
    pub const CLIENT_UUID: u8 = 97;
    pub const IPXE_ENCAP: u8 = 175;
    pub const END: u8 = 255;
}

/// BOOTP `op` values.
pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;

/// Broadcast bit of `flags` (RFC 2131 §2, figure 2).
pub const FLAG_BROADCAST: u16 = 0x8000;

/// Why a datagram is not a DHCP message we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("{0} bytes is shorter than the 240-byte DHCP header and magic cookie")]
    TooShort(usize),
    #[error("hardware address length {0} exceeds the 16-byte chaddr field")]
    BadHardwareLength(u8),
    #[error("no DHCP magic cookie (plain BOOTP is not served)")]
    BadMagic,
    #[error("option {code} is truncated: needs {needed} bytes, {left} left")]
    Truncated {
        code: u8,
        needed: usize,
        left: usize,
    },
    #[error("more than {MAX_OPTION_FRAGMENTS} options")]
    TooManyOptions,
    #[error("option 52 (overload) has invalid value {0:?}")]
    BadOverload(Vec<u8>),
    #[error("PXE sub-option {code} has invalid length {len}")]
    BadSubOption { code: u8, len: usize },
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<MessageType> {
        use MessageType::*;
        Some(match v {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            _ => return None,
        })
    }

    /// The conventional log name, `DHCPDISCOVER` and so on.
    pub fn name(self) -> &'static str {
        use MessageType::*;
        match self {
            Discover => "DHCPDISCOVER",
            Offer => "DHCPOFFER",
            Request => "DHCPREQUEST",
            Decline => "DHCPDECLINE",
            Ack => "DHCPACK",
            Nak => "DHCPNAK",
            Release => "DHCPRELEASE",
            Inform => "DHCPINFORM",
        }
    }
}

/// Option 94: the client's network interface identifier (type 1 = UNDI, then version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nii {
    pub kind: u8,
    pub major: u8,
    pub minor: u8,
}

/// One DHCP message. `sname` and `file` hold the C strings of those fields (without the
/// terminating NULs); after a parse that honoured option 52 they are empty, because their
/// bytes were options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpMessage {
    pub op: u8,
    pub htype: u8,
    pub hlen: u8,
    pub hops: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    /// At most 64 bytes are encoded.
    pub sname: Vec<u8>,
    /// At most 128 bytes are encoded.
    pub file: Vec<u8>,
    /// Options in wire order, one entry per code: split options (RFC 3396) are joined on
    /// parse and split again on encode. Pad, end and overload (52) are wire framing and
    /// never appear here.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Default for DhcpMessage {
    fn default() -> Self {
        DhcpMessage {
            op: BOOTREQUEST,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 0,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [0; 16],
            sname: Vec::new(),
            file: Vec::new(),
            options: Vec::new(),
        }
    }
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn c_string(b: &[u8]) -> Vec<u8> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b[..end].to_vec()
}

/// Reads one options area into `acc`, joining repeated codes (RFC 3396 §5).
fn scan_options(
    area: &[u8],
    acc: &mut Vec<(u8, Vec<u8>)>,
    fragments: &mut usize,
) -> Result<(), DecodeError> {
    let mut i = 0;
    while i < area.len() {
        let code = area[i];
        match code {
            opt::PAD => {
                i += 1;
                continue;
            }
            opt::END => return Ok(()),
            _ => {}
        }
        let Some(&len) = area.get(i + 1) else {
            return Err(DecodeError::Truncated {
                code,
                needed: 1,
                left: 0,
            });
        };
        let start = i + 2;
        let end = start + len as usize;
        if end > area.len() {
            return Err(DecodeError::Truncated {
                code,
                needed: len as usize,
                left: area.len() - start,
            });
        }
        *fragments += 1;
        if *fragments > MAX_OPTION_FRAGMENTS {
            return Err(DecodeError::TooManyOptions);
        }
        let value = &area[start..end];
        match acc.iter_mut().find(|(c, _)| *c == code) {
            Some((_, v)) => v.extend_from_slice(value),
            None => acc.push((code, value.to_vec())),
        }
        i = end;
    }
    // A missing END is tolerated: some stacks stop at the last option.
    Ok(())
}

impl DhcpMessage {
    /// Decodes a DHCP message. Never panics, whatever the input.
    pub fn parse(b: &[u8]) -> Result<DhcpMessage, DecodeError> {
        if b.len() < HEADER_LEN + MAGIC_COOKIE.len() {
            return Err(DecodeError::TooShort(b.len()));
        }
        if b[236..240] != MAGIC_COOKIE {
            return Err(DecodeError::BadMagic);
        }
        let hlen = b[2];
        if hlen as usize > 16 {
            return Err(DecodeError::BadHardwareLength(hlen));
        }
        let sname_area = &b[44..108];
        let file_area = &b[108..236];
        let mut options = Vec::new();
        let mut fragments = 0;
        scan_options(&b[240..], &mut options, &mut fragments)?;

        let mut sname = c_string(sname_area);
        let mut file = c_string(file_area);
        if let Some(pos) = options.iter().position(|(c, _)| *c == opt::OVERLOAD) {
            let (_, v) = options.remove(pos);
            let flags = match v.as_slice() {
                [f @ 1..=3] => *f,
                _ => return Err(DecodeError::BadOverload(v)),
            };
            // RFC 3396 §5: the concatenation order is options, file, then sname.
            if flags & 1 != 0 {
                scan_options(file_area, &mut options, &mut fragments)?;
                file.clear();
            }
            if flags & 2 != 0 {
                scan_options(sname_area, &mut options, &mut fragments)?;
                sname.clear();
            }
        }

        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&b[28..44]);
        Ok(DhcpMessage {
            op: b[0],
            htype: b[1],
            hlen,
            hops: b[3],
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            secs: u16::from_be_bytes([b[8], b[9]]),
            flags: u16::from_be_bytes([b[10], b[11]]),
            ciaddr: ip_at(b, 12),
            yiaddr: ip_at(b, 16),
            siaddr: ip_at(b, 20),
            giaddr: ip_at(b, 24),
            chaddr,
            sname,
            file,
            options,
        })
    }

    /// Encodes the message: header, cookie, options (values over 255 bytes split per
    /// RFC 3396), END, zero padding to [`MIN_ENCODED_LEN`]. Codes 0, 52 and 255 in
    /// `options` are skipped: they are framing, and this encoder never overloads.
    pub fn encode(&self) -> Vec<u8> {
        let opts_len: usize = self
            .options
            .iter()
            .map(|(_, v)| v.len() + 2 * (v.len() / 255 + 1))
            .sum();
        let mut out = Vec::with_capacity((HEADER_LEN + 5 + opts_len).max(MIN_ENCODED_LEN));
        out.extend_from_slice(&[self.op, self.htype, self.hlen, self.hops]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for ip in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&ip.octets());
        }
        out.extend_from_slice(&self.chaddr);
        let mut sname = [0u8; SNAME_LEN];
        let n = self.sname.len().min(SNAME_LEN);
        sname[..n].copy_from_slice(&self.sname[..n]);
        out.extend_from_slice(&sname);
        let mut file = [0u8; FILE_LEN];
        let n = self.file.len().min(FILE_LEN);
        file[..n].copy_from_slice(&self.file[..n]);
        out.extend_from_slice(&file);
        out.extend_from_slice(&MAGIC_COOKIE);
        for (code, value) in &self.options {
            if matches!(*code, opt::PAD | opt::OVERLOAD | opt::END) {
                continue;
            }
            if value.is_empty() {
                out.extend_from_slice(&[*code, 0]);
            }
            for chunk in value.chunks(255) {
                out.push(*code);
                out.push(chunk.len() as u8);
                out.extend_from_slice(chunk);
            }
        }
        out.push(opt::END);
        if out.len() < MIN_ENCODED_LEN {
            out.resize(MIN_ENCODED_LEN, 0);
        }
        out
    }

    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    pub fn has_option(&self, code: u8) -> bool {
        self.option(code).is_some()
    }

    /// Replaces the option if present (keeping its position), else appends it.
    pub fn set_option(&mut self, code: u8, value: impl Into<Vec<u8>>) {
        let value = value.into();
        match self.options.iter_mut().find(|(c, _)| *c == code) {
            Some((_, v)) => *v = value,
            None => self.options.push((code, value)),
        }
    }

    pub fn remove_option(&mut self, code: u8) -> Option<Vec<u8>> {
        let pos = self.options.iter().position(|(c, _)| *c == code)?;
        Some(self.options.remove(pos).1)
    }

    fn ip_option(&self, code: u8) -> Option<Ipv4Addr> {
        match self.option(code)? {
            &[a, b, c, d] => Some(Ipv4Addr::new(a, b, c, d)),
            _ => None,
        }
    }

    fn string_option(&self, code: u8) -> Option<String> {
        // Some stacks NUL-terminate strings; the terminator is not part of the value.
        let v = self.option(code)?;
        let v = v.strip_suffix(&[0]).unwrap_or(v);
        Some(String::from_utf8_lossy(v).into_owned())
    }

    /// Option 53. `None` when absent, malformed or not a type RFC 2132 defines.
    pub fn message_type(&self) -> Option<MessageType> {
        match self.option(opt::MESSAGE_TYPE)? {
            &[t] => MessageType::from_u8(t),
            _ => None,
        }
    }

    /// Option 50.
    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        self.ip_option(opt::REQUESTED_IP)
    }

    /// Option 54.
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.ip_option(opt::SERVER_ID)
    }

    /// Option 61, raw (usually type byte + hardware address, or a DUID). Empty counts as absent.
    pub fn client_id(&self) -> Option<&[u8]> {
        self.option(opt::CLIENT_ID).filter(|v| !v.is_empty())
    }

    /// Option 57.
    pub fn max_message_size(&self) -> Option<u16> {
        match self.option(opt::MAX_MESSAGE_SIZE)? {
            &[a, b] => Some(u16::from_be_bytes([a, b])),
            _ => None,
        }
    }

    /// Option 55; empty when the client sent none.
    pub fn parameter_list(&self) -> &[u8] {
        self.option(opt::PARAMETER_LIST).unwrap_or(&[])
    }

    /// Option 12.
    pub fn hostname(&self) -> Option<String> {
        self.string_option(opt::HOSTNAME).filter(|s| !s.is_empty())
    }

    /// Option 60.
    pub fn vendor_class(&self) -> Option<String> {
        self.string_option(opt::VENDOR_CLASS)
    }

    /// Option 77 as a list of classes. RFC 3004 encodes each class with a length prefix,
    /// but iPXE (and other pre-RFC clients) send one bare string such as `iPXE`: when the
    /// bytes do not parse exactly as length-prefixed items they are one bare class.
    pub fn user_classes(&self) -> Vec<String> {
        let Some(v) = self.option(opt::USER_CLASS) else {
            return Vec::new();
        };
        let mut items = Vec::new();
        let mut rest = v;
        while let Some((&len, tail)) = rest.split_first() {
            if len == 0 || len as usize > tail.len() {
                items.clear();
                break;
            }
            let (item, tail) = tail.split_at(len as usize);
            items.push(String::from_utf8_lossy(item).into_owned());
            rest = tail;
        }
        if items.is_empty() && !v.is_empty() {
            let v = v.strip_suffix(&[0]).unwrap_or(v);
            items.push(String::from_utf8_lossy(v).into_owned());
        }
        items
    }

    /// Option 93: the first architecture listed (RFC 4578 allows several).
    pub fn client_arch(&self) -> Option<u16> {
        match self.option(opt::CLIENT_ARCH)? {
            [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }

    /// Option 94.
    pub fn client_nii(&self) -> Option<Nii> {
        match self.option(opt::CLIENT_NII)? {
            &[kind, major, minor] => Some(Nii { kind, major, minor }),
            _ => None,
        }
    }

    /// Option 97: the 16 UUID bytes after the type byte, which must be 0 (RFC 4578 §2.3).
    pub fn client_uuid(&self) -> Option<[u8; 16]> {
        match self.option(opt::CLIENT_UUID)? {
            [0, rest @ ..] => rest.try_into().ok(),
            _ => None,
        }
    }

    /// Option 175: only iPXE sends it.
    pub fn has_ipxe_encap(&self) -> bool {
        self.has_option(opt::IPXE_ENCAP)
    }

    /// The Ethernet address in `chaddr` (its first six bytes).
    pub fn mac(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.chaddr[..6]);
        MacAddr(m)
    }

    pub fn set_mac(&mut self, mac: MacAddr) {
        self.chaddr = [0; 16];
        self.chaddr[..6].copy_from_slice(&mac.0);
        self.htype = 1;
        self.hlen = 6;
    }

    pub fn broadcast_flag(&self) -> bool {
        self.flags & FLAG_BROADCAST != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ip() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    fn arb_cstr(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 0..=max)
    }

    fn arb_options() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        proptest::collection::btree_map(
            (1u8..=254).prop_filter("52 is framing", |c| *c != opt::OVERLOAD),
            proptest::collection::vec(any::<u8>(), 0..600),
            0..12,
        )
        .prop_map(|m| m.into_iter().collect::<Vec<_>>())
        .prop_shuffle()
    }

    prop_compose! {
        fn arb_message()(
            op in any::<u8>(), htype in any::<u8>(), hlen in 0u8..=16, hops in any::<u8>(),
            xid in any::<u32>(), secs in any::<u16>(), flags in any::<u16>(),
            ciaddr in arb_ip(), yiaddr in arb_ip(), siaddr in arb_ip(), giaddr in arb_ip(),
            chaddr in any::<[u8; 16]>(), sname in arb_cstr(64), file in arb_cstr(128),
            options in arb_options(),
        ) -> DhcpMessage {
            DhcpMessage { op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr,
                giaddr, chaddr, sname, file, options }
        }
    }

    proptest! {
        #[test]
        fn round_trips(m in arb_message()) {
            let bytes = m.encode();
            prop_assert!(bytes.len() >= MIN_ENCODED_LEN);
            prop_assert_eq!(DhcpMessage::parse(&bytes).unwrap(), m);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = DhcpMessage::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_after_valid_header(
            tail in proptest::collection::vec(any::<u8>(), 0..1200),
            sname in any::<[u8; 64]>(), file in any::<[u8; 128]>(),
            overload in 0u8..=4,
        ) {
            let mut b = DhcpMessage::default().encode();
            b[44..108].copy_from_slice(&sname);
            b[108..236].copy_from_slice(&file);
            b.truncate(240);
            if overload > 0 {
                b.extend_from_slice(&[opt::OVERLOAD, 1, overload]);
            }
            b.extend_from_slice(&tail);
            if let Ok(m) = DhcpMessage::parse(&b) {
                // Whatever parsed must survive a re-encode.
                let again = DhcpMessage::parse(&m.encode()).unwrap();
                prop_assert_eq!(again, m);
            }
        }
    }

    fn with_options(opts: &[u8]) -> Vec<u8> {
        let mut b = DhcpMessage::default().encode();
        b.truncate(240);
        b.extend_from_slice(opts);
        b
    }

    #[test]
    fn rejects_short_and_cookieless() {
        assert_eq!(
            DhcpMessage::parse(&[0; 100]),
            Err(DecodeError::TooShort(100))
        );
        let mut b = with_options(&[255]);
        b[236] = 0;
        assert_eq!(DhcpMessage::parse(&b), Err(DecodeError::BadMagic));
    }

    #[test]
    fn rejects_overrunning_option() {
        let b = with_options(&[53, 5, 1]);
        assert!(matches!(
            DhcpMessage::parse(&b),
            Err(DecodeError::Truncated { code: 53, .. })
        ));
        let b = with_options(&[53]);
        assert!(matches!(
            DhcpMessage::parse(&b),
            Err(DecodeError::Truncated { code: 53, .. })
        ));
    }

    #[test]
    fn caps_option_floods() {
        let flood: Vec<u8> = (0..2000).flat_map(|_| [80u8, 0]).collect();
        assert_eq!(
            DhcpMessage::parse(&with_options(&flood)),
            Err(DecodeError::TooManyOptions)
        );
    }

    #[test]
    fn joins_split_options_and_stops_at_end() {
        let b = with_options(&[
            12, 2, b'a', b'b', 0, 53, 1, 1, 12, 1, b'c', 255, 60, 1, b'x',
        ]);
        let m = DhcpMessage::parse(&b).unwrap();
        assert_eq!(m.hostname().as_deref(), Some("abc"));
        assert_eq!(m.message_type(), Some(MessageType::Discover));
        assert_eq!(m.vendor_class(), None);
        assert_eq!(m.options.len(), 2);
    }

    #[test]
    fn honours_overload() {
        let mut b = with_options(&[52, 1, 3, 12, 1, b'a', 255]);
        b[108..113].copy_from_slice(&[12, 1, b'b', 53, 1]);
        b[113] = 3;
        b[114] = 255;
        b[44..48].copy_from_slice(&[60, 2, b'P', b'X']);
        b[48] = 255;
        let m = DhcpMessage::parse(&b).unwrap();
        assert_eq!(m.hostname().as_deref(), Some("ab"));
        assert_eq!(m.message_type(), Some(MessageType::Request));
        assert_eq!(m.vendor_class().as_deref(), Some("PX"));
        assert!(m.file.is_empty() && m.sname.is_empty());
        assert!(!m.has_option(opt::OVERLOAD));
        assert!(matches!(
            DhcpMessage::parse(&with_options(&[52, 1, 7])),
            Err(DecodeError::BadOverload(_))
        ));
    }

    #[test]
    fn user_class_forms() {
        let mut m = DhcpMessage::default();
        m.set_option(opt::USER_CLASS, b"iPXE".to_vec());
        assert_eq!(m.user_classes(), ["iPXE"]);
        m.set_option(opt::USER_CLASS, b"\x04iPXE\x03foo".to_vec());
        assert_eq!(m.user_classes(), ["iPXE", "foo"]);
    }

    #[test]
    fn typed_accessors() {
        let mut m = DhcpMessage::default();
        m.set_option(opt::MAX_MESSAGE_SIZE, 1472u16.to_be_bytes().to_vec());
        m.set_option(opt::CLIENT_ARCH, vec![0, 7, 0, 0]);
        m.set_option(opt::CLIENT_NII, vec![1, 2, 1]);
        let mut uuid = vec![0];
        uuid.extend(1..=16);
        m.set_option(opt::CLIENT_UUID, uuid);
        m.set_option(opt::REQUESTED_IP, vec![10, 0, 0, 5]);
        assert_eq!(m.max_message_size(), Some(1472));
        assert_eq!(m.client_arch(), Some(7));
        assert_eq!(
            m.client_nii(),
            Some(Nii {
                kind: 1,
                major: 2,
                minor: 1
            })
        );
        assert_eq!(m.client_uuid().unwrap()[0], 1);
        assert_eq!(m.requested_ip(), Some(Ipv4Addr::new(10, 0, 0, 5)));
        m.set_option(opt::CLIENT_UUID, vec![1; 17]);
        assert_eq!(m.client_uuid(), None);
    }
}

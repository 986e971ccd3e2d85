//! fleetboot's trust primitives, shared by every service that decides who may do what.
//!
//! - [`token`]: API tokens for operators. A token is 256 random bits, shown once; only its
//!   SHA-256 is stored, and a presented token is compared against every stored hash in
//!   constant time. Each token has a [`token::Role`]: `read` or `admin`.
//! - [`capability`]: per-client capabilities, for networks where an address says nothing
//!   about who a client is (ProxyDHCP: another server hands out the addresses). A
//!   capability is an HMAC-SHA256 tag over a scope, a subject (a MAC address, an export
//!   name...) and an expiry, under a server key; whoever holds one may act as that subject
//!   in that scope until it expires. The HTTP service uses scope `http` with the client's
//!   MAC as subject; other services pick their own scope, so a capability for one never
//!   opens another.
//! - [`secret`]: secret files (keys, bootstrap tokens) created with mode 0600, refused when
//!   others can read them.
//! - [`allow`]: CIDR allow lists.
//!
//! No I/O happens here except in [`secret`] (files) and the OS random source.

pub mod allow;
pub mod capability;
pub mod secret;
pub mod token;

pub use allow::AllowList;
pub use capability::{CapabilityError, CapabilityKey};
pub use secret::SecretError;
pub use token::{Role, TokenHash};

/// Fills `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> Result<(), SecretError> {
    getrandom::fill(buf).map_err(|e| SecretError::Random(e.to_string()))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Bytes from hex (either case); `None` for odd lengths or other characters.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(unhex("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}

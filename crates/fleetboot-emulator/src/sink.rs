//! Where fetched bytes go: counted and hashed (SHA-256) as they arrive, and kept only when
//! the caller may need them (a possible script) and only while small, so a storm of large
//! images costs no memory here.

use sha2::{Digest, Sha256};

/// Content larger than this is not kept (it is not a script).
pub const MAX_KEPT: usize = 1 << 20;

pub struct Sink {
    hasher: Sha256,
    bytes: u64,
    keep: Option<Vec<u8>>,
}

/// A finished fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub bytes: u64,
    pub sha256: [u8; 32],
    /// The content, when the sink was asked to keep it and it is at most [`MAX_KEPT`].
    pub data: Option<Vec<u8>>,
}

impl Sink {
    pub fn new(keep: bool) -> Sink {
        Sink {
            hasher: Sha256::new(),
            bytes: 0,
            keep: keep.then(Vec::new),
        }
    }

    pub fn write(&mut self, b: &[u8]) -> Result<(), String> {
        self.hasher.update(b);
        self.bytes += b.len() as u64;
        if let Some(k) = &mut self.keep {
            if k.len() + b.len() > MAX_KEPT {
                self.keep = None;
            } else {
                k.extend_from_slice(b);
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn finish(self) -> Fetched {
        Fetched {
            bytes: self.bytes,
            sha256: self.hasher.finalize().into(),
            data: self.keep,
        }
    }
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The SHA-256 of `data` in lowercase hex (for callers that want to compare with a report).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Parses 64 hex digits.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 {
        return Err(format!("{s:?} is not 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{s:?} is not 64 hex digits"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_streams_like_whole_buffers() {
        let mut s = Sink::new(true);
        s.write(b"ab").unwrap();
        s.write(b"c").unwrap();
        let f = s.finish();
        assert_eq!(f.bytes, 3);
        assert_eq!(
            hex(&f.sha256),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(f.data.as_deref(), Some(&b"abc"[..]));
        assert_eq!(parse_sha256(&sha256_hex(b"abc")).unwrap(), f.sha256);
        assert!(parse_sha256("xyz").is_err());
        let mut big = Sink::new(true);
        big.write(&[1]).unwrap();
        big.write(&vec![0; MAX_KEPT]).unwrap();
        let f = big.finish();
        assert_eq!((f.bytes, f.data), (MAX_KEPT as u64 + 1, None));
        assert_eq!(Sink::new(false).finish().data, None);
    }
}

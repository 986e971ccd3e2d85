//! Digests: an object's SHA-256 (what the catalog and clients know it by) and the BLAKE3
//! of each fixed-size chunk (what lets a cache check a piece on its own, fast enough to
//! re-check every chunk it reads from disk).

use sha2::{Digest as _, Sha256};

/// A 32-byte digest (SHA-256 of an object, BLAKE3 of a chunk).
pub type Digest = [u8; 32];

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Parses exactly `N` bytes of hex (either case).
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(b[2 * i])? << 4 | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

/// The BLAKE3 of one chunk.
pub fn chunk_hash(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// The SHA-256 of a byte string.
pub fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// Hashes an object as its bytes stream past: the whole-object SHA-256 and a BLAKE3 per
/// `chunk_size` bytes, in one pass.
pub struct ObjectHasher {
    sha: Sha256,
    chunk: blake3::Hasher,
    chunk_size: u64,
    in_chunk: u64,
    size: u64,
    chunks: Vec<Digest>,
}

impl ObjectHasher {
    pub fn new(chunk_size: u32) -> ObjectHasher {
        ObjectHasher {
            sha: Sha256::new(),
            chunk: blake3::Hasher::new(),
            chunk_size: u64::from(chunk_size.max(1)),
            in_chunk: 0,
            size: 0,
            chunks: Vec::new(),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.sha.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = (self.chunk_size - self.in_chunk) as usize;
            let take = room.min(data.len());
            self.chunk.update(&data[..take]);
            self.in_chunk += take as u64;
            data = &data[take..];
            if self.in_chunk == self.chunk_size {
                self.chunks.push(*self.chunk.finalize().as_bytes());
                self.chunk.reset();
                self.in_chunk = 0;
            }
        }
    }

    /// (SHA-256 of the whole, size, BLAKE3 per chunk; the last chunk may be short).
    pub fn finish(mut self) -> (Digest, u64, Vec<Digest>) {
        if self.in_chunk > 0 {
            self.chunks.push(*self.chunk.finalize().as_bytes());
        }
        (self.sha.finalize().into(), self.size, self.chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_refusals() {
        let d: Digest = sha256(b"abc");
        assert_eq!(to_hex(&d), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(from_hex::<32>(&to_hex(&d)), Some(d));
        assert_eq!(from_hex::<32>(&to_hex(&d).to_uppercase()), Some(d));
        assert_eq!(from_hex::<2>("abc"), None);
        assert_eq!(from_hex::<2>("zzzz"), None);
        assert_eq!(from_hex::<1>("é"), None);
    }

    #[test]
    fn streaming_hash_matches_one_shot_whatever_the_pieces() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for piece in [1usize, 7, 999, 4096, 10_000] {
            let mut h = ObjectHasher::new(4096);
            for p in data.chunks(piece) {
                h.update(p);
            }
            let (sha, size, chunks) = h.finish();
            assert_eq!(sha, sha256(&data));
            assert_eq!(size, 10_000);
            let want: Vec<Digest> = data.chunks(4096).map(chunk_hash).collect();
            assert_eq!(chunks, want, "pieces of {piece}");
        }
        let (_, size, chunks) = ObjectHasher::new(4096).finish();
        assert_eq!((size, chunks.len()), (0, 0));
    }
}

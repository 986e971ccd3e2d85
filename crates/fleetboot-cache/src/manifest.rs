//! The manifest an origin signs for one version of one object: its name, version, size,
//! SHA-256, and the BLAKE3 of every fixed-size chunk. A cache serves nothing it cannot check
//! against a manifest whose signature verifies under the origin key it was configured
//! with: each chunk is checked on arrival and again when read back from its disk, so a
//! client that arrives in the middle of a fill is served the verified chunks and waits for
//! the rest.
//!
//! Wire form (big-endian), signed with ed25519 over a context string and every byte before
//! the signature:
//!
//! ```text
//! "FBMANIF1"  name_len:u16 name  version:u64  size:u64  chunk_size:u32  sha256:[32]
//! issued_ms:u64  chunk_count:u32  chunk_blake3:[32]*chunk_count  signature:[64]
//! ```

use crate::hash::{chunk_hash, Digest};
use crate::keys::{Signature, SigningKey, VerifyingKey};
use ed25519_dalek::{Signer, Verifier};
use std::ops::Range;

const MAGIC: &[u8; 8] = b"FBMANIF1";
const CONTEXT: &[u8] = b"fleetboot manifest v1\0";
/// Smallest chunk an origin may use.
pub const MIN_CHUNK: u32 = 4 << 10;
/// Largest chunk an origin may use (a chunk is held in memory whole).
pub const MAX_CHUNK: u32 = 64 << 20;
/// Most chunks one manifest may list (128 MiB of hashes; 256 TiB at 64 MiB chunks).
pub const MAX_CHUNKS: u32 = 1 << 22;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("not a fleetboot manifest")]
    Magic,
    #[error("manifest truncated")]
    Truncated,
    #[error("manifest has {0} bytes after its signature")]
    Trailing(usize),
    #[error("bad object name: {0}")]
    Name(#[from] crate::name::NameError),
    #[error("chunk size {0} is outside {MIN_CHUNK}..={MAX_CHUNK}")]
    ChunkSize(u32),
    #[error("{count} chunks listed, {want} needed for {size} bytes")]
    ChunkCount { count: u32, want: u64, size: u64 },
    #[error("the signature does not verify under the origin key")]
    Signature,
}

/// One version of one object, as its origin describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `files/...` or `images/...` ([`crate::name`]).
    pub name: String,
    /// Increases whenever the content under this name changes at the origin.
    pub version: u64,
    pub size: u64,
    pub chunk_size: u32,
    /// SHA-256 of the whole object.
    pub sha256: Digest,
    /// When the origin signed it (Unix ms; informational).
    pub issued_ms: u64,
    /// BLAKE3 of each chunk; the last one may be short.
    pub chunks: Vec<Digest>,
}

/// How many chunks `size` bytes make at `chunk_size`.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

impl Manifest {
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// The byte range of chunk `i`.
    pub fn chunk_range(&self, i: u32) -> Range<u64> {
        let cs = u64::from(self.chunk_size);
        let start = (u64::from(i) * cs).min(self.size);
        start..(start + cs).min(self.size)
    }

    pub fn chunk_len(&self, i: u32) -> usize {
        let r = self.chunk_range(i);
        (r.end - r.start) as usize
    }

    /// The chunk holding byte `offset` (`chunk_count()` at or past the end).
    pub fn chunk_of(&self, offset: u64) -> u32 {
        (offset / u64::from(self.chunk_size)).min(u64::from(self.chunk_count())) as u32
    }

    /// Whether `data` is chunk `i`, byte for byte.
    pub fn check_chunk(&self, i: u32, data: &[u8]) -> bool {
        self.chunks.get(i as usize).is_some_and(|want| data.len() == self.chunk_len(i) && chunk_hash(data) == *want)
    }

    /// The signed wire form.
    pub fn encode(&self, key: &SigningKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.name.len() + 32 * self.chunks.len() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.issued_ms.to_be_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_be_bytes());
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        let sig = key.sign(&[CONTEXT, &out].concat());
        out.extend_from_slice(&sig.to_bytes());
        out
    }

    /// Parses and checks a signed manifest: every length against the bytes there are, the
    /// name, the chunk geometry, and the signature under `origin`.
    pub fn decode(bytes: &[u8], origin: &VerifyingKey) -> Result<Manifest, ManifestError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(8)? != MAGIC {
            return Err(ManifestError::Magic);
        }
        let name_len = usize::from(r.u16()?);
        let name = std::str::from_utf8(r.take(name_len)?).map_err(|_| crate::name::NameError::Control)?.to_string();
        crate::name::validate(&name)?;
        let version = r.u64()?;
        let size = r.u64()?;
        let chunk_size = r.u32()?;
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(ManifestError::ChunkSize(chunk_size));
        }
        let sha256: Digest = r.take(32)?.try_into().map_err(|_| ManifestError::Truncated)?;
        let issued_ms = r.u64()?;
        let count = r.u32()?;
        let want = chunk_count(size, chunk_size);
        if u64::from(count) != want || count > MAX_CHUNKS {
            return Err(ManifestError::ChunkCount { count, want, size });
        }
        let hashes = r.take(count as usize * 32)?;
        let signed_len = r.at;
        let sig: [u8; 64] = r.take(64)?.try_into().map_err(|_| ManifestError::Truncated)?;
        if r.at != bytes.len() {
            return Err(ManifestError::Trailing(bytes.len() - r.at));
        }
        origin
            .verify(&[CONTEXT, &bytes[..signed_len]].concat(), &Signature::from_bytes(&sig))
            .map_err(|_| ManifestError::Signature)?;
        let chunks = hashes.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect();
        Ok(Manifest { name, version, size, chunk_size, sha256, issued_ms, chunks })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(ManifestError::Truncated)?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, ManifestError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, ManifestError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ManifestError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// The manifest of `data` (tests, and origins hashing small objects in memory).
pub fn of_bytes(name: &str, version: u64, chunk_size: u32, data: &[u8], issued_ms: u64) -> Manifest {
    let mut h = crate::hash::ObjectHasher::new(chunk_size);
    h.update(data);
    let (sha256, size, chunks) = h.finish();
    Manifest { name: name.to_string(), version, size, chunk_size, sha256, issued_ms, chunks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::from_seed;
    use proptest::prelude::*;

    fn sample(len: usize) -> (Manifest, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 256) as u8).collect();
        (of_bytes("files/vmlinuz", 3, MIN_CHUNK, &data, 1_700_000_000_000), data)
    }

    #[test]
    fn signed_round_trip_and_chunk_checks() {
        let key = from_seed([1; 32]);
        let (m, data) = sample(3 * MIN_CHUNK as usize + 100);
        let wire = m.encode(&key);
        let back = Manifest::decode(&wire, &key.verifying_key()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.chunk_count(), 4);
        assert_eq!(m.chunk_range(3), 3 * 4096..3 * 4096 + 100);
        assert_eq!(m.chunk_of(4095), 0);
        assert_eq!(m.chunk_of(4096 * 3 + 99), 3);
        assert!(m.check_chunk(3, &data[3 * 4096..]));
        let mut bad = data[..4096].to_vec();
        bad[17] ^= 1;
        assert!(!m.check_chunk(0, &bad));
        assert!(!m.check_chunk(0, &data[..4095]), "a short chunk is not the chunk");
        assert!(!m.check_chunk(9, &data[..4096]));
    }

    #[test]
    fn another_key_a_flipped_bit_or_a_bad_shape_is_refused() {
        let key = from_seed([1; 32]);
        let (m, _) = sample(10_000);
        let wire = m.encode(&key);
        assert_eq!(Manifest::decode(&wire, &from_seed([2; 32]).verifying_key()), Err(ManifestError::Signature));
        for i in [0usize, 9, 20, wire.len() - 70, wire.len() - 1] {
            let mut w = wire.clone();
            w[i] ^= 0x40;
            assert!(Manifest::decode(&w, &key.verifying_key()).is_err(), "flip at {i}");
        }
        assert_eq!(Manifest::decode(&wire[..wire.len() - 1], &key.verifying_key()), Err(ManifestError::Truncated));
        let mut long = wire.clone();
        long.push(0);
        assert_eq!(Manifest::decode(&long, &key.verifying_key()), Err(ManifestError::Trailing(1)));
        let mut m2 = m.clone();
        m2.chunks.pop();
        assert!(matches!(Manifest::decode(&m2.encode(&key), &key.verifying_key()), Err(ManifestError::ChunkCount { .. })));
        m2 = m.clone();
        m2.name = "files/../etc".into();
        assert!(matches!(Manifest::decode(&m2.encode(&key), &key.verifying_key()), Err(ManifestError::Name(_))));
    }

    #[test]
    fn empty_object_has_no_chunks() {
        let key = from_seed([1; 32]);
        let m = of_bytes("files/empty", 1, MIN_CHUNK, &[], 0);
        assert_eq!(m.chunk_count(), 0);
        assert_eq!(Manifest::decode(&m.encode(&key), &key.verifying_key()).unwrap(), m);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let key = from_seed([1; 32]);
            let _ = Manifest::decode(&bytes, &key.verifying_key());
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = Manifest::decode(&framed, &key.verifying_key());
        }
    }
}

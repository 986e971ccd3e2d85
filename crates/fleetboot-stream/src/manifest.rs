//! The sender's signed manifest: for every stream position, the block sent there and its
//! SHA-256, bound together in group hashes the sender signs with its ed25519 key, so a
//! receiver accepts a block only if the real sender produced it, at the position the
//! sender put it.
//!
//! The keyed tags of [`crate::auth`] only keep out hosts without the site secret: every
//! receiver holds the site and session keys and could tag anything. What receivers hold
//! of the sender's signing key is its public half, which verifies but cannot sign. So:
//!
//! - Positions are taken in **hash groups** of [`GROUP_POSITIONS`] (16) consecutive
//!   positions; a group's hash ([`group_hash`]) is the SHA-256 over, for each of its
//!   positions in stream order, the block index sent there and that block's SHA-256.
//! - ANNOUNCE carries the **manifest root** (SHA-256 over the image size, block size,
//!   stream length and every group hash, [`manifest_root`]) and is signed
//!   ([`announce_message`]): a receiver joins only a session the sender announced.
//! - MANIFEST chunks ([`crate::wire::MANIFEST_CHUNK`] = 512 positions, 32 group hashes)
//!   are signed over the root, their first position, their length and their group
//!   hashes ([`chunk_message`]): a chunk of another image, another version of it or
//!   another stream order does not verify.
//! - DONE and ROLE are signed over the session id and the manifest root
//!   ([`done_message`], [`role_message`]): a receiver ends its session, answers a
//!   repair round or drives the lock-step stream only when the sender said so. A
//!   replayed one is the sender's own for this very session: an old round or role,
//!   which the sender ignores (and a DONE(FINISHED) exists only once the session is
//!   over).
//! - A block (DATA, REPAIR, or decoded from FEC) whose chunk has arrived is hashed on
//!   arrival and held **pending**: it is not written to the receiver's sink (so nothing
//!   reads it) and does not count as received, until every position of its group is
//!   present and the group's hash over (block index, SHA-256) of each matches the signed
//!   one. Then the whole group is accepted; on a mismatch the whole group is dropped and
//!   fetched again (one forged block costs its group a repair, never a wrong byte). A
//!   block whose chunk has not arrived yet is dropped and the chunk asked for.
//! - A group that failed its check, or got two different blocks for one position (an
//!   insider racing the sender), is then checked block by block: the receiver asks for
//!   its GROUP-HASHES ([`crate::wire::GroupHashes`]: the (block, SHA-256) of each
//!   position, [`SessionManifest::group_list`]), takes the list only if its
//!   [`group_hash`] is the signed one, drops the pending blocks it does not name and
//!   refuses such blocks at once from then on. So a forger cannot make a group fail
//!   again and again, and the sender's own block takes the forged one's place.
//!
//! The block index is inside the group hash, so a genuine block at another position
//! fails as surely as forged bytes, and the chunk need not list the stream order.
//! Cost per position: 2 bytes of group hash, and one signature per 512 positions (about
//! 2.2 bytes a block on the wire where a list of (block, SHA-256) per position took 38,
//! and 1/16 of the signature checks); per datagram the receiver's cost stays a hash.

use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::sender::BlockSource;
use crate::wire::{Announce, Done, Role, HASH_LEN, MANIFEST_CHUNK, SIGNATURE_LEN};
use crate::StreamError;

/// The SHA-256 of one block.
pub type BlockHash = [u8; HASH_LEN];

/// Positions per hash group: group `g` covers positions `g*16 .. g*16 + 16` (the
/// stream's last group may be shorter). A receiver holds a group's blocks until all of
/// them are in, so the group is kept small: at 5% loss 44% of the groups arrive whole in
/// the first pass, and a forged block costs at most 16 blocks of repair.
pub const GROUP_POSITIONS: u32 = 16;

/// Hash groups per MANIFEST chunk.
pub const CHUNK_GROUPS: u32 = MANIFEST_CHUNK / GROUP_POSITIONS;

/// The hash a block is checked against.
pub fn block_hash(data: &[u8]) -> BlockHash {
    Sha256::digest(data).into()
}

/// Hash groups of a stream of `stream_len` positions.
pub fn group_count(stream_len: u32) -> u32 {
    stream_len.div_ceil(GROUP_POSITIONS)
}

/// The positions `start .. end` of hash group `g` in a stream of `stream_len`.
pub fn group_range(g: u32, stream_len: u32) -> (u32, u32) {
    let start = g.saturating_mul(GROUP_POSITIONS).min(stream_len);
    (start, start.saturating_add(GROUP_POSITIONS).min(stream_len))
}

/// Accumulates the hash of one group: call [`GroupHasher::push`] for each of its
/// positions in stream order, then [`GroupHasher::finish`].
#[derive(Clone)]
pub struct GroupHasher(Sha256);

impl Default for GroupHasher {
    fn default() -> Self {
        let mut h = Sha256::new();
        h.update(b"fleetboot-stream v2 group");
        GroupHasher(h)
    }
}

impl GroupHasher {
    /// Adds the next position: the block sent there and that block's SHA-256.
    pub fn push(&mut self, block: u32, hash: &BlockHash) {
        self.0.update(block.to_be_bytes());
        self.0.update(hash);
    }
    /// The group hash.
    pub fn finish(self) -> [u8; HASH_LEN] {
        self.0.finalize().into()
    }
}

/// The hash of a group whose positions carry `members` (block index, block SHA-256),
/// in stream order.
pub fn group_hash<'a>(members: impl IntoIterator<Item = (u32, &'a BlockHash)>) -> [u8; HASH_LEN] {
    let mut h = GroupHasher::default();
    for (b, hash) in members {
        h.push(b, hash);
    }
    h.finish()
}

/// The root every chunk is signed over: SHA-256 of a label, the image size, the block
/// size, the stream length and every group hash in stream order.
pub fn manifest_root(image_size: u64, block_size: u16, stream_len: u32, group_hashes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fleetboot-stream v2 manifest root");
    h.update(image_size.to_be_bytes());
    h.update(block_size.to_be_bytes());
    h.update(stream_len.to_be_bytes());
    h.update(GROUP_POSITIONS.to_be_bytes());
    h.update(group_hashes);
    h.finalize().into()
}

/// What the sender signs for one MANIFEST chunk: the root, the chunk's first position,
/// the positions it covers and its group hashes.
pub fn chunk_message(root: &[u8; 32], first: u32, positions: u16, group_hashes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(80 + group_hashes.len());
    m.extend_from_slice(b"fleetboot-stream v2 manifest chunk");
    m.extend_from_slice(root);
    m.extend_from_slice(&first.to_be_bytes());
    m.extend_from_slice(&positions.to_be_bytes());
    m.extend_from_slice(group_hashes);
    m
}

/// What the sender signs for an ANNOUNCE of `session`: every field but the signature.
pub fn announce_message(session: u32, a: &Announce) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(b"fleetboot-stream v2 announce");
    m.extend_from_slice(&session.to_be_bytes());
    m.extend_from_slice(&a.image_id);
    m.extend_from_slice(&a.image_size.to_be_bytes());
    m.extend_from_slice(&a.block_size.to_be_bytes());
    m.extend_from_slice(&a.block_count.to_be_bytes());
    m.extend_from_slice(&a.stream_len.to_be_bytes());
    m.extend_from_slice(&a.fec_group.to_be_bytes());
    m.extend_from_slice(&a.rate.to_be_bytes());
    m.extend_from_slice(&a.solicit_ms.to_be_bytes());
    m.extend_from_slice(&a.ack_every.to_be_bytes());
    m.push(a.flags);
    m.extend_from_slice(&a.manifest_root);
    m
}

/// What the sender signs for a DONE of `session`: the manifest root (which ties it to
/// this session's ANNOUNCE) and every field but the signature.
pub fn done_message(session: u32, root: &[u8; 32], d: &Done) -> Vec<u8> {
    let mut m = Vec::with_capacity(80);
    m.extend_from_slice(b"fleetboot-stream v1 done");
    m.extend_from_slice(&session.to_be_bytes());
    m.extend_from_slice(root);
    m.extend_from_slice(&d.round.to_be_bytes());
    m.extend_from_slice(&d.stream_len.to_be_bytes());
    m.push(d.flags);
    m
}

/// What the sender signs for a ROLE of `session`: the manifest root and every field but
/// the signature.
pub fn role_message(session: u32, root: &[u8; 32], r: &Role) -> Vec<u8> {
    let mut m = Vec::with_capacity(80);
    m.extend_from_slice(b"fleetboot-stream v1 role");
    m.extend_from_slice(&session.to_be_bytes());
    m.extend_from_slice(root);
    m.extend_from_slice(&r.round.to_be_bytes());
    m.extend_from_slice(&r.requester.to_be_bytes());
    m.extend_from_slice(&r.next_pos.to_be_bytes());
    m
}

/// Whether `signature` is `key`'s over `msg` (strict ed25519: no malleable encodings).
pub fn verify(key: &VerifyingKey, msg: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
    key.verify_strict(msg, &Signature::from_bytes(signature)).is_ok()
}

/// Chunks of a stream of `stream_len` positions.
pub fn chunk_count(stream_len: u32) -> u32 {
    stream_len.div_ceil(MANIFEST_CHUNK)
}

/// The SHA-256 of every block of one image and the sender's signing key: built once
/// per image ([`Manifest::build`], or [`Manifest::from_hashes`] with hashes kept from an
/// earlier build) and shared by its sessions, each of which signs its own stream order
/// over it ([`SessionManifest`]).
pub struct Manifest {
    key: SigningKey,
    image_size: u64,
    block_size: u16,
    hashes: Arc<[BlockHash]>,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("image_size", &self.image_size)
            .field("block_size", &self.block_size)
            .field("blocks", &self.hashes.len())
            .finish_non_exhaustive()
    }
}

/// The number of blocks of an image, refused when the stream cannot number them.
pub fn manifest_blocks(image_size: u64, block_size: u16) -> Result<u32, StreamError> {
    if block_size == 0 || image_size == 0 {
        return Err(StreamError::Config("image_size and block_size must be > 0"));
    }
    let bc = image_size.div_ceil(block_size as u64);
    if bc > u32::MAX as u64 - 1 {
        return Err(StreamError::Config("image has too many blocks"));
    }
    Ok(bc as u32)
}

impl Manifest {
    /// Reads every block of the image from `source` and hashes it.
    pub fn build<S: BlockSource + ?Sized>(
        source: &mut S,
        image_size: u64,
        block_size: u16,
        key: SigningKey,
    ) -> Result<Arc<Self>, StreamError> {
        let bc = manifest_blocks(image_size, block_size)?;
        let mut buf = vec![0u8; block_size as usize];
        let mut hashes = Vec::with_capacity(bc as usize);
        for b in 0..bc {
            let start = b as u64 * block_size as u64;
            let len = (image_size - start).min(block_size as u64) as usize;
            source
                .read_block(b, &mut buf[..len])
                .map_err(|e| StreamError::Source(e.to_string()))?;
            hashes.push(block_hash(&buf[..len]));
        }
        Ok(Arc::new(Manifest { key, image_size, block_size, hashes: hashes.into() }))
    }

    /// The manifest of an image whose block hashes ([`block_hash`] of every block, in
    /// block order) were computed before: a sender keeps them per image, so a new session
    /// does not read and hash the whole image again. Only the count is checked here;
    /// that they belong to the image is the keeper's business (a wrong hash makes every
    /// receiver drop that block).
    pub fn from_hashes(
        hashes: Arc<[BlockHash]>,
        image_size: u64,
        block_size: u16,
        key: SigningKey,
    ) -> Result<Arc<Self>, StreamError> {
        if hashes.len() as u64 != manifest_blocks(image_size, block_size)? as u64 {
            return Err(StreamError::Config("block hashes do not match the image's block count"));
        }
        Ok(Arc::new(Manifest { key, image_size, block_size, hashes }))
    }

    /// Every block's hash, in block order (what [`Manifest::from_hashes`] takes back).
    pub fn hashes(&self) -> &Arc<[BlockHash]> {
        &self.hashes
    }

    /// The public key receivers verify with.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
    /// Image size the manifest was built for.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }
    /// Block size the manifest was built for.
    pub fn block_size(&self) -> u16 {
        self.block_size
    }
    /// The hash of block `b`.
    pub fn hash(&self, b: u32) -> Option<&BlockHash> {
        self.hashes.get(b as usize)
    }
}

/// One session's manifest: its stream order, the group hashes over it, their root, and
/// the chunk signatures, made when a chunk is first sent.
pub struct SessionManifest {
    image: Arc<Manifest>,
    stream_len: u32,
    group_hashes: Vec<u8>,
    root: [u8; 32],
    signatures: Vec<Option<[u8; SIGNATURE_LEN]>>,
}

impl std::fmt::Debug for SessionManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManifest")
            .field("positions", &self.stream_len)
            .field("chunks", &self.signatures.len())
            .finish_non_exhaustive()
    }
}

/// One MANIFEST chunk as the sender sends it.
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    /// First position covered.
    pub first: u32,
    /// Positions covered.
    pub positions: u16,
    /// The hashes of the groups of those positions.
    pub group_hashes: &'a [u8],
    /// The sender's signature ([`chunk_message`]).
    pub signature: [u8; SIGNATURE_LEN],
}

impl SessionManifest {
    /// The manifest of a stream sending `order` (block indices, each below the image's
    /// block count).
    pub fn new(image: Arc<Manifest>, order: &[u32]) -> Self {
        let stream_len = order.len() as u32;
        let mut group_hashes = Vec::with_capacity(group_count(stream_len) as usize * HASH_LEN);
        for group in order.chunks(GROUP_POSITIONS as usize) {
            let h = group_hash(group.iter().map(|&b| (b, image.hash(b).expect("order inside the image"))));
            group_hashes.extend_from_slice(&h);
        }
        let root = manifest_root(image.image_size, image.block_size, stream_len, &group_hashes);
        let signatures = vec![None; chunk_count(stream_len) as usize];
        SessionManifest { image, stream_len, group_hashes, root, signatures }
    }
    /// The root ANNOUNCE carries.
    pub fn root(&self) -> [u8; 32] {
        self.root
    }
    /// Number of chunks.
    pub fn chunks(&self) -> u32 {
        self.signatures.len() as u32
    }
    /// Chunk `c`, signed.
    pub fn chunk(&mut self, c: u32) -> Option<Chunk<'_>> {
        let first = c.checked_mul(MANIFEST_CHUNK)?;
        let slot = self.signatures.get_mut(c as usize)?;
        let positions = (self.stream_len - first).min(MANIFEST_CHUNK) as u16;
        let start = (first / GROUP_POSITIONS) as usize * HASH_LEN;
        let end = start + (positions as u32).div_ceil(GROUP_POSITIONS) as usize * HASH_LEN;
        let group_hashes = &self.group_hashes[start..end];
        let signature = *slot.get_or_insert_with(|| {
            self.image.key.sign(&chunk_message(&self.root, first, positions, group_hashes)).to_bytes()
        });
        Some(Chunk { first, positions, group_hashes, signature })
    }
    /// The GROUP-HASHES entries of hash group `g` of a stream sending `order` (the order
    /// this manifest was made for): block index and SHA-256 of each position.
    pub fn group_list(&self, g: u32, order: &[u32]) -> Option<Vec<u8>> {
        if g >= group_count(self.stream_len) || order.len() as u32 != self.stream_len {
            return None;
        }
        let (start, end) = group_range(g, self.stream_len);
        let mut v = Vec::with_capacity((end - start) as usize * crate::wire::ENTRY_LEN);
        for &b in &order[start as usize..end as usize] {
            v.extend_from_slice(&b.to_be_bytes());
            v.extend_from_slice(self.image.hash(b)?);
        }
        Some(v)
    }
    /// Signs a DONE of `session` (sets its signature).
    pub fn sign_done(&self, session: u32, d: &mut Done) {
        d.signature = self.image.key.sign(&done_message(session, &self.root, d)).to_bytes();
    }
    /// Signs a ROLE of `session` (sets its signature).
    pub fn sign_role(&self, session: u32, r: &mut Role) {
        r.signature = self.image.key.sign(&role_message(session, &self.root, r)).to_bytes();
    }
    /// Signs an ANNOUNCE of `session` (sets its root and signature).
    pub fn sign_announce(&self, session: u32, a: &mut Announce) {
        a.manifest_root = self.root;
        a.signature = self.image.key.sign(&announce_message(session, a)).to_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Img(Vec<u8>);
    impl BlockSource for Img {
        fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
            let s = index as usize * 100;
            buf.copy_from_slice(&self.0[s..s + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn chunks_verify_only_with_their_root_and_key() {
        // 1,100 blocks of 100 bytes (the last one 13): three chunks, the last of 76
        // positions in 5 groups (the last of 12).
        let data: Vec<u8> = (0..100 * 1099 + 13).map(|i| (i * 7 + i / 251) as u8).collect();
        let key = SigningKey::from_bytes(&[3; 32]);
        let m = Manifest::build(&mut Img(data.clone()), data.len() as u64, 100, key).unwrap();
        let order: Vec<u32> = (0..1100).rev().collect();
        let mut s = SessionManifest::new(m.clone(), &order);
        assert_eq!(s.chunks(), 3);
        let pk = VerifyingKey::from_bytes(&m.public_key()).unwrap();
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key();
        let root = s.root();
        for c in 0..3 {
            let k = s.chunk(c).unwrap();
            let msg = chunk_message(&root, k.first, k.positions, k.group_hashes);
            assert!(verify(&pk, &msg, &k.signature));
            assert!(!verify(&other, &msg, &k.signature));
            assert!(!verify(&pk, &chunk_message(&[0; 32], k.first, k.positions, k.group_hashes), &k.signature));
            assert!(!verify(&pk, &chunk_message(&root, k.first + MANIFEST_CHUNK, k.positions, k.group_hashes), &k.signature));
        }
        // Group 0 = positions 0..16 = blocks 1099, 1098, ..., 1084.
        let k = s.chunk(0).unwrap();
        assert_eq!((k.first, k.positions, k.group_hashes.len()), (0, 512, 32 * HASH_LEN));
        let hashes: Vec<(u32, BlockHash)> = (1084..1100).rev().map(|b| {
            let start = b as usize * 100;
            (b, block_hash(&data[start..(start + 100).min(data.len())]))
        }).collect();
        let want = group_hash(hashes.iter().map(|(b, h)| (*b, h)));
        assert_eq!(&k.group_hashes[..HASH_LEN], &want);
        // The same blocks with two positions swapped make another group hash.
        let mut swapped = hashes.clone();
        swapped.swap(3, 4);
        assert_ne!(group_hash(swapped.iter().map(|(b, h)| (*b, h))), want);
        // A genuine block at the wrong position (its own hash, the wrong index).
        let mut moved = hashes.clone();
        moved[5].0 = 7;
        assert_ne!(group_hash(moved.iter().map(|(b, h)| (*b, h))), want);
        let k = s.chunk(2).unwrap();
        assert_eq!((k.first, k.positions, k.group_hashes.len()), (1024, 76, 5 * HASH_LEN));
        assert!(s.chunk(3).is_none());
        assert_eq!(group_range(68, 1100), (1088, 1100));
        assert_eq!(group_count(1100), 69);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

        /// For any image and any stream order (runs of blocks, as a learned order then
        /// the rest), every chunk goes through the wire codec unchanged, verifies under
        /// the root, covers its positions' groups, and each group hash is what a
        /// receiver computes from the blocks at those positions; a block moved to
        /// another position, or one changed byte, makes another group hash.
        #[test]
        fn chunks_round_trip_and_bind_each_position(
            blocks in 1u32..1300,
            tail in 1usize..=100,
            runs in proptest::collection::vec((0u32..1300, 1u32..80), 0..12),
            moved in 0usize..1300,
        ) {
            use crate::wire::{Body, ManifestChunk, Packet, chunk_group_hashes};
            let size = (blocks as u64 - 1) * 100 + tail as u64;
            let data: Vec<u8> = (0..size).map(|i| (i * 13 + i / 97) as u8).collect();
            let key = SigningKey::from_bytes(&[9; 32]);
            let m = Manifest::build(&mut Img(data.clone()), size, 100, key).unwrap();
            let mut seen = vec![false; blocks as usize];
            let mut order = Vec::new();
            for (start, len) in runs {
                for b in start..(start + len).min(blocks) {
                    if !std::mem::replace(&mut seen[b as usize], true) {
                        order.push(b);
                    }
                }
            }
            order.extend((0..blocks).filter(|&b| !seen[b as usize]));
            let mut sm = SessionManifest::new(m.clone(), &order);
            let root = sm.root();
            let pk = VerifyingKey::from_bytes(&m.public_key()).unwrap();
            let mut covered = 0u32;
            let tag = crate::auth::MacKey::from_bytes([1; 32]);
            for c in 0..sm.chunks() {
                let k = sm.chunk(c).unwrap();
                proptest::prop_assert_eq!(k.first, covered);
                proptest::prop_assert_eq!(k.group_hashes.len(), chunk_group_hashes(k.positions as u32) * HASH_LEN);
                covered += k.positions as u32;
                let body = Body::Manifest(ManifestChunk { first: k.first, positions: k.positions, group_hashes: k.group_hashes, signature: k.signature });
                let mut buf = Vec::new();
                let n = Packet { session: 1, body: body.clone() }.encode_append(&tag, &mut buf).unwrap();
                proptest::prop_assert!(n <= 1472, "a chunk of {} bytes does not fit a 1500-byte MTU", n);
                let back = Packet::decode(&buf).unwrap();
                proptest::prop_assert_eq!(&back.body, &body);
                proptest::prop_assert!(verify(&pk, &chunk_message(&root, k.first, k.positions, k.group_hashes), &k.signature));
                for (i, want) in k.group_hashes.chunks_exact(HASH_LEN).enumerate() {
                    let g = k.first / GROUP_POSITIONS + i as u32;
                    let (start, end) = group_range(g, order.len() as u32);
                    let members: Vec<(u32, BlockHash)> = (start..end).map(|p| {
                        let b = order[p as usize];
                        let s = b as usize * 100;
                        (b, block_hash(&data[s..(s + 100).min(data.len())]))
                    }).collect();
                    proptest::prop_assert_eq!(&group_hash(members.iter().map(|(b, h)| (*b, h)))[..], want);
                    let j = moved % members.len();
                    let mut other = members.clone();
                    other[j].0 = (other[j].0 + 1) % blocks.max(2);
                    proptest::prop_assert_ne!(&group_hash(other.iter().map(|(b, h)| (*b, h)))[..], want);
                    let mut other = members.clone();
                    other[j].1[j % HASH_LEN] ^= 1;
                    proptest::prop_assert_ne!(&group_hash(other.iter().map(|(b, h)| (*b, h)))[..], want);
                }
            }
            proptest::prop_assert_eq!(covered, blocks);
        }
    }

    #[test]
    fn kept_hashes_give_the_same_root_and_a_wrong_count_is_refused() {
        let data: Vec<u8> = (0..100 * 70 + 13).map(|i| (i * 7) as u8).collect();
        let key = SigningKey::from_bytes(&[3; 32]);
        let built = Manifest::build(&mut Img(data.clone()), data.len() as u64, 100, key.clone()).unwrap();
        let kept = Manifest::from_hashes(built.hashes().clone(), data.len() as u64, 100, key.clone()).unwrap();
        let order: Vec<u32> = (0..71).collect();
        assert_eq!(SessionManifest::new(built.clone(), &order).root(), SessionManifest::new(kept, &order).root());
        let short: Arc<[BlockHash]> = built.hashes()[..70].into();
        assert!(Manifest::from_hashes(short, data.len() as u64, 100, key.clone()).is_err());
        assert!(Manifest::from_hashes(built.hashes().clone(), data.len() as u64 + 100, 100, key).is_err());
    }

    /// What checking costs a receiver per block at 1450-byte blocks: one SHA-256 per
    /// block, one per 16 over the group, and one signature check per 512. Run in release:
    /// `cargo test --release -p fleetboot-stream --lib -- --ignored --nocapture manifest_cost`.
    #[test]
    #[ignore]
    fn manifest_cost() {
        let bs = 1450usize;
        let blocks = 40_000u32;
        let data: Vec<u8> = (0..bs * blocks as usize).map(|i| (i * 31 + i / 7) as u8).collect();
        let key = SigningKey::from_bytes(&[3; 32]);
        let t = std::time::Instant::now();
        let m = Manifest::build(&mut Img2(&data, bs), data.len() as u64, bs as u16, key).unwrap();
        let order: Vec<u32> = (0..blocks).collect();
        let mut sm = SessionManifest::new(m.clone(), &order);
        for c in 0..sm.chunks() {
            sm.chunk(c).unwrap();
        }
        let sender = t.elapsed();
        let pk = VerifyingKey::from_bytes(&m.public_key()).unwrap();
        let root = sm.root();
        let t = std::time::Instant::now();
        let mut ok = 0u32;
        for c in 0..sm.chunks() {
            let k = sm.chunk(c).unwrap();
            assert!(verify(&pk, &chunk_message(&root, k.first, k.positions, k.group_hashes), &k.signature));
            for (g, want) in k.group_hashes.chunks_exact(HASH_LEN).enumerate() {
                let first = k.first as usize + g * GROUP_POSITIONS as usize;
                let mut h = GroupHasher::default();
                for b in first..(first + GROUP_POSITIONS as usize).min(blocks as usize) {
                    h.push(b as u32, &block_hash(&data[b * bs..(b + 1) * bs]));
                    ok += 1;
                }
                assert_eq!(&h.finish()[..], want);
            }
        }
        let receiver = t.elapsed();
        assert_eq!(ok, blocks);
        let rate = |d: std::time::Duration| blocks as f64 / d.as_secs_f64();
        eprintln!(
            "manifest_cost: {blocks} blocks of {bs} B: sender hashes+signs {:.0} blocks/s ({:.0} MB/s), receiver verifies {:.0} blocks/s ({:.0} MB/s)",
            rate(sender),
            rate(sender) * bs as f64 / 1e6,
            rate(receiver),
            rate(receiver) * bs as f64 / 1e6
        );
    }

    struct Img2<'a>(&'a [u8], usize);
    impl BlockSource for Img2<'_> {
        fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
            let s = index as usize * self.1;
            buf.copy_from_slice(&self.0[s..s + buf.len()]);
            Ok(())
        }
    }
}

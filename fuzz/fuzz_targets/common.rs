//! What both stream targets share: the session's keys and the input format.
//!
//! The input is a list of datagrams, each `[selector u8][len u16 BE][len bytes]`. The
//! bytes are a datagram without its tag; the harness appends the tag computed with the
//! key the selector's low two bits name (0: the site key, 1: the session key or the
//! receiver's key, 2: a wrong key, 3: no tag at all), so the fuzzer reaches past the tag
//! checks into the parsers and state machines. The selector's upper six bits move the
//! clock forward by that many milliseconds first.

use std::sync::Arc;

use fleetboot_stream::{BlockSource, MacKey, Manifest, SigningKey};

pub const SITE_SECRET: [u8; 32] = [7; 32];
pub const SESSION: u32 = 5;
pub const SESSION_KEY: [u8; 16] = [9; 16];
pub const NONCE: u64 = 3;
pub const IMAGE: usize = 64 * 1024;
pub const BLOCK: u16 = 1024;

/// The image both targets stream: every byte of block `i` is `i as u8`.
pub struct Image;

impl BlockSource for Image {
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let s = index as usize * BLOCK as usize;
        assert!(s + buf.len() <= IMAGE, "a read beyond the image");
        buf.fill(index as u8);
        Ok(())
    }
}

/// The sender's signing key.
pub fn sender_key() -> SigningKey {
    SigningKey::from_bytes(&[0x5E; 32])
}

/// The image's signed manifest (block hashes and the sender's key).
pub fn manifest() -> Arc<Manifest> {
    Manifest::build(&mut Image, IMAGE as u64, BLOCK, sender_key()).expect("manifest")
}

pub struct Datagram<'a> {
    pub advance_ms: u64,
    pub key: u8,
    pub body: &'a [u8],
}

pub fn datagrams(mut data: &[u8]) -> impl Iterator<Item = Datagram<'_>> {
    std::iter::from_fn(move || {
        if data.len() < 3 {
            return None;
        }
        let sel = data[0];
        let len = (u16::from_be_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
        let body = &data[3..3 + len];
        data = &data[3 + len..];
        Some(Datagram { advance_ms: (sel >> 2) as u64, key: sel & 3, body })
    })
}

pub fn tagged(body: &[u8], key: Option<&MacKey>) -> Vec<u8> {
    let mut v = body.to_vec();
    if let Some(k) = key {
        let t = k.tag(body);
        v.extend_from_slice(&t);
    }
    v
}

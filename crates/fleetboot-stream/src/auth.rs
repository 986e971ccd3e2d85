//! Per-session authentication: keyed BLAKE3 tags truncated to [`TAG_LEN`] bytes.
//!
//! Keys:
//! - **site key** (from the operator's 32-byte site secret, shared by every sender and
//!   receiver of a site; the shells refuse to run without one or with all zeros): tags
//!   ANNOUNCE, REGISTER and REGISTERED, and wraps the session key in REGISTERED.
//! - **session key** (16 random bytes chosen by the shell per session, delivered to each
//!   receiver in its unicast REGISTERED): the sender's DATA, REPAIR, FEC, DONE and ROLE.
//! - **receiver key** (derived from the session key, the receiver id and the receiver's
//!   REGISTER nonce): everything that receiver sends after registration (ACK, STATUS,
//!   READ-REQUEST, LEAVE).
//!
//! A forged packet (wrong key) or a packet replayed from another session (other key,
//! other session id) fails its tag and is dropped and counted.

/// Bytes of the truncated tag that ends every datagram.
pub const TAG_LEN: usize = 8;

/// A 32-byte keyed-BLAKE3 key.
#[derive(Clone, PartialEq, Eq)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// A key from raw bytes.
    pub fn from_bytes(k: [u8; 32]) -> Self {
        MacKey(k)
    }

    /// The site key from the operator's site secret.
    pub fn site(secret: &[u8; 32]) -> Self {
        MacKey(blake3::derive_key("fleetboot-stream v1 site", secret))
    }

    /// The sender's key for session `session` from the 16-byte session key.
    pub fn session(session_key: &[u8; 16], session: u32) -> Self {
        let mut m = [0u8; 20];
        m[..16].copy_from_slice(session_key);
        m[16..].copy_from_slice(&session.to_be_bytes());
        MacKey(blake3::derive_key("fleetboot-stream v1 session", &m))
    }

    /// The key a receiver tags its packets with.
    pub fn receiver(session: &MacKey, receiver: u32, nonce: u64) -> Self {
        let mut h = blake3::Hasher::new_keyed(&session.0);
        h.update(b"receiver");
        h.update(&receiver.to_be_bytes());
        h.update(&nonce.to_be_bytes());
        MacKey(*h.finalize().as_bytes())
    }

    /// The tag of `msg`.
    pub fn tag(&self, msg: &[u8]) -> [u8; TAG_LEN] {
        let h = blake3::keyed_hash(&self.0, msg);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&h.as_bytes()[..TAG_LEN]);
        t
    }

    /// Whether the last [`TAG_LEN`] bytes of `datagram` are the tag of the rest
    /// (constant time in the tag comparison).
    pub fn verify(&self, datagram: &[u8]) -> bool {
        if datagram.len() < TAG_LEN {
            return false;
        }
        let (msg, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        let want = self.tag(msg);
        want.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// XOR pad that wraps (and unwraps) the session key in REGISTERED.
pub fn key_wrap_pad(site: &MacKey, session: u32, receiver: u32, nonce: u64) -> [u8; 16] {
    let mut h = blake3::Hasher::new_keyed(&site.0);
    h.update(b"key-wrap");
    h.update(&session.to_be_bytes());
    h.update(&receiver.to_be_bytes());
    h.update(&nonce.to_be_bytes());
    let mut pad = [0u8; 16];
    pad.copy_from_slice(&h.finalize().as_bytes()[..16]);
    pad
}

/// `a XOR b`.
pub fn xor16(a: &[u8; 16], b: &[u8; 16]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for i in 0..16 {
        o[i] = a[i] ^ b[i];
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trips_and_keys_differ() {
        let site = MacKey::site(&[1; 32]);
        let k = [9u8; 16];
        let pad = key_wrap_pad(&site, 5, 2, 77);
        assert_eq!(xor16(&xor16(&k, &pad), &pad), k);
        assert_ne!(MacKey::session(&k, 1), MacKey::session(&k, 2));
        let s = MacKey::session(&k, 1);
        assert_ne!(MacKey::receiver(&s, 1, 5), MacKey::receiver(&s, 2, 5));
        let mut m = b"hello world!".to_vec();
        let t = s.tag(&m);
        m.extend_from_slice(&t);
        assert!(s.verify(&m));
        m[0] ^= 1;
        assert!(!s.verify(&m));
    }
}

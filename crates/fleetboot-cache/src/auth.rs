//! Signed messages between caches and their origin.
//!
//! Every request a cache sends carries `X-Fleetboot-Auth: v1 peer=NAME ts=MS nonce=HEX
//! sig=HEX`: an ed25519 signature by the cache's own key over the method, the path with
//! its query, the peer name, the time, a fresh 128-bit nonce and the SHA-256 of the body.
//! The origin knows each cache's public key from its config (`[[origin.cache]]`), refuses
//! requests more than [`MAX_SKEW_MS`] from its clock and remembers the last
//! [`NONCES_PER_PEER`] nonces of each cache, so a captured request cannot be replayed.
//!
//! Control replies (a client's plan, directives, the answer to a report) carry
//! `X-Fleetboot-Reply: v1 sig=HEX`, the origin's signature over the request's nonce, the
//! status and the SHA-256 of the body: a cache accepts them only from the origin key it
//! was configured with, and only as the answer to its own request. Manifests are signed
//! on their own ([`crate::manifest`]); object bytes need no signature, every chunk is
//! checked against its manifest.

use crate::hash::{from_hex, sha256, to_hex};
use crate::keys::{Signature, SigningKey, VerifyingKey};
use ed25519_dalek::{Signer, Verifier as _};
use std::collections::{HashMap, HashSet, VecDeque};

/// The request header.
pub const AUTH_HEADER: &str = "x-fleetboot-auth";
/// The reply header.
pub const REPLY_HEADER: &str = "x-fleetboot-reply";
/// Largest clock difference accepted between a cache and its origin.
pub const MAX_SKEW_MS: u64 = 300_000;
/// Nonces remembered per cache (a replay inside the skew window is refused).
pub const NONCES_PER_PEER: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("no {AUTH_HEADER} header")]
    Missing,
    #[error("malformed {AUTH_HEADER} header")]
    Malformed,
    #[error("unknown cache {0:?}")]
    UnknownPeer(String),
    #[error("clock skew of {0} ms (more than {MAX_SKEW_MS})")]
    Skew(u64),
    #[error("nonce already used")]
    Replay,
    #[error("signature does not verify")]
    Signature,
}

/// A peer name: what `[[origin.cache]] name` and `cache.name` say (1–64 of `a-z0-9._-`).
pub fn valid_peer_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

fn request_text(method: &str, path: &str, peer: &str, ts_ms: u64, nonce: &[u8; 16], body: &[u8]) -> Vec<u8> {
    format!(
        "fleetboot cache request v1\n{method}\n{path}\n{peer}\n{ts_ms}\n{}\n{}",
        to_hex(nonce),
        to_hex(&sha256(body))
    )
    .into_bytes()
}

fn reply_text(nonce: &[u8; 16], status: u16, body: &[u8]) -> Vec<u8> {
    format!("fleetboot cache reply v1\n{}\n{status}\n{}", to_hex(nonce), to_hex(&sha256(body))).into_bytes()
}

/// The `X-Fleetboot-Auth` value for one request. `nonce` must be fresh randomness.
pub fn sign_request(
    key: &SigningKey,
    peer: &str,
    method: &str,
    path: &str,
    ts_ms: u64,
    nonce: [u8; 16],
    body: &[u8],
) -> String {
    let sig = key.sign(&request_text(method, path, peer, ts_ms, &nonce, body));
    format!("v1 peer={peer} ts={ts_ms} nonce={} sig={}", to_hex(&nonce), to_hex(&sig.to_bytes()))
}

/// A parsed `X-Fleetboot-Auth` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuth {
    pub peer: String,
    pub ts_ms: u64,
    pub nonce: [u8; 16],
    sig: [u8; 64],
}

impl RequestAuth {
    pub fn parse(value: &str) -> Result<RequestAuth, AuthError> {
        let mut parts = value.split_ascii_whitespace();
        if parts.next() != Some("v1") {
            return Err(AuthError::Malformed);
        }
        let (mut peer, mut ts, mut nonce, mut sig) = (None, None, None, None);
        for p in parts {
            let (k, v) = p.split_once('=').ok_or(AuthError::Malformed)?;
            match k {
                "peer" if valid_peer_name(v) => peer = Some(v.to_string()),
                "ts" => ts = v.parse::<u64>().ok(),
                "nonce" => nonce = from_hex::<16>(v),
                "sig" => sig = from_hex::<64>(v),
                _ => return Err(AuthError::Malformed),
            }
        }
        match (peer, ts, nonce, sig) {
            (Some(peer), Some(ts_ms), Some(nonce), Some(sig)) => Ok(RequestAuth { peer, ts_ms, nonce, sig }),
            _ => Err(AuthError::Malformed),
        }
    }
}

/// The nonces one peer used lately: a set to look up, the order to forget them in.
type Nonces = (HashSet<[u8; 16]>, VecDeque<[u8; 16]>);

/// The origin's side: the configured caches' keys and the nonces each has used.
pub struct RequestVerifier {
    peers: HashMap<String, VerifyingKey>,
    seen: HashMap<String, Nonces>,
}

impl RequestVerifier {
    pub fn new(peers: impl IntoIterator<Item = (String, VerifyingKey)>) -> RequestVerifier {
        RequestVerifier { peers: peers.into_iter().collect(), seen: HashMap::new() }
    }

    /// Checks one request; on success returns the cache's name and the request's nonce
    /// (to sign the reply with). `header` is the `X-Fleetboot-Auth` value, if any.
    pub fn verify(
        &mut self,
        header: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(String, [u8; 16]), AuthError> {
        let auth = RequestAuth::parse(header.ok_or(AuthError::Missing)?)?;
        let key = self.peers.get(&auth.peer).ok_or_else(|| AuthError::UnknownPeer(auth.peer.clone()))?;
        let skew = now_ms.abs_diff(auth.ts_ms);
        if skew > MAX_SKEW_MS {
            return Err(AuthError::Skew(skew));
        }
        key.verify(&request_text(method, path, &auth.peer, auth.ts_ms, &auth.nonce, body), &Signature::from_bytes(&auth.sig))
            .map_err(|_| AuthError::Signature)?;
        // Only a request that verified may take a slot in the nonce memory: strangers
        // cannot push a real cache's nonces out.
        let (set, order) = self.seen.entry(auth.peer.clone()).or_default();
        if !set.insert(auth.nonce) {
            return Err(AuthError::Replay);
        }
        order.push_back(auth.nonce);
        if order.len() > NONCES_PER_PEER {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        Ok((auth.peer, auth.nonce))
    }
}

/// The `X-Fleetboot-Reply` value for a reply to the request that carried `nonce`.
pub fn sign_reply(key: &SigningKey, nonce: &[u8; 16], status: u16, body: &[u8]) -> String {
    format!("v1 sig={}", to_hex(&key.sign(&reply_text(nonce, status, body)).to_bytes()))
}

/// Checks a reply to the request that carried `nonce`.
pub fn verify_reply(origin: &VerifyingKey, header: Option<&str>, nonce: &[u8; 16], status: u16, body: &[u8]) -> Result<(), AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let sig = value
        .strip_prefix("v1 sig=")
        .and_then(|h| from_hex::<64>(h.trim()))
        .ok_or(AuthError::Malformed)?;
    origin.verify(&reply_text(nonce, status, body), &Signature::from_bytes(&sig)).map_err(|_| AuthError::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::from_seed;

    const NOW: u64 = 1_700_000_000_000;

    fn setup() -> (SigningKey, RequestVerifier) {
        let cache = from_seed([3; 32]);
        (cache.clone(), RequestVerifier::new([("branch1".to_string(), cache.verifying_key())]))
    }

    #[test]
    fn a_signed_request_passes_once() {
        let (key, mut v) = setup();
        let h = sign_request(&key, "branch1", "POST", "/cache/v1/report", NOW, [9; 16], b"{}");
        assert_eq!(v.verify(Some(&h), "POST", "/cache/v1/report", b"{}", NOW + 1000), Ok(("branch1".into(), [9; 16])));
        assert_eq!(v.verify(Some(&h), "POST", "/cache/v1/report", b"{}", NOW + 1000), Err(AuthError::Replay));
    }

    #[test]
    fn tampering_strangers_and_old_requests_are_refused() {
        let (key, mut v) = setup();
        let h = sign_request(&key, "branch1", "GET", "/cache/v1/plan/x", NOW, [1; 16], b"");
        assert_eq!(v.verify(Some(&h), "GET", "/cache/v1/plan/y", b"", NOW), Err(AuthError::Signature));
        assert_eq!(v.verify(Some(&h), "POST", "/cache/v1/plan/x", b"", NOW), Err(AuthError::Signature));
        assert_eq!(v.verify(Some(&h), "GET", "/cache/v1/plan/x", b"x", NOW), Err(AuthError::Signature));
        assert_eq!(v.verify(Some(&h), "GET", "/cache/v1/plan/x", b"", NOW + MAX_SKEW_MS + 1), Err(AuthError::Skew(MAX_SKEW_MS + 1)));
        let other = sign_request(&from_seed([4; 32]), "branch1", "GET", "/p", NOW, [2; 16], b"");
        assert_eq!(v.verify(Some(&other), "GET", "/p", b"", NOW), Err(AuthError::Signature));
        let stranger = sign_request(&key, "branch2", "GET", "/p", NOW, [3; 16], b"");
        assert_eq!(v.verify(Some(&stranger), "GET", "/p", b"", NOW), Err(AuthError::UnknownPeer("branch2".into())));
        assert_eq!(v.verify(None, "GET", "/p", b"", NOW), Err(AuthError::Missing));
        for bad in ["", "v2 peer=a", "v1 peer=A ts=1 nonce=00 sig=00", "v1 peer=a ts=x nonce=00000000000000000000000000000000 sig=00", "v1 junk"] {
            assert_eq!(v.verify(Some(bad), "GET", "/p", b"", NOW), Err(AuthError::Malformed), "{bad:?}");
        }
        // The rejected attempts did not burn the real nonce.
        assert!(v.verify(Some(&h), "GET", "/cache/v1/plan/x", b"", NOW).is_ok());
    }

    #[test]
    fn nonce_memory_is_bounded() {
        let (key, mut v) = setup();
        for i in 0..(NONCES_PER_PEER as u32 + 10) {
            let mut n = [0u8; 16];
            n[..4].copy_from_slice(&i.to_be_bytes());
            let h = sign_request(&key, "branch1", "GET", "/p", NOW, n, b"");
            v.verify(Some(&h), "GET", "/p", b"", NOW).unwrap();
        }
        let (set, order) = &v.seen["branch1"];
        assert_eq!((set.len(), order.len()), (NONCES_PER_PEER, NONCES_PER_PEER));
    }

    #[test]
    fn replies_bind_to_the_request() {
        let origin = from_seed([5; 32]);
        let h = sign_reply(&origin, &[7; 16], 200, b"{\"seq\":1}");
        let pk = origin.verifying_key();
        assert_eq!(verify_reply(&pk, Some(&h), &[7; 16], 200, b"{\"seq\":1}"), Ok(()));
        assert_eq!(verify_reply(&pk, Some(&h), &[8; 16], 200, b"{\"seq\":1}"), Err(AuthError::Signature));
        assert_eq!(verify_reply(&pk, Some(&h), &[7; 16], 200, b"{\"seq\":2}"), Err(AuthError::Signature));
        assert_eq!(verify_reply(&from_seed([6; 32]).verifying_key(), Some(&h), &[7; 16], 200, b"{\"seq\":1}"), Err(AuthError::Signature));
        assert_eq!(verify_reply(&pk, None, &[7; 16], 200, b""), Err(AuthError::Missing));
    }
}

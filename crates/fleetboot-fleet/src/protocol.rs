//! The master ↔ agent messages, and how both sides sign them.
//!
//! Transport: HTTP/JSON (see `docs/fleet.md`). Every agent request is an [`Envelope`]:
//! the node's MAC, its ed25519 public key, a timestamp, a nonce and the JSON body, signed
//! with the node's key. The node generates its key pair at first boot and keeps it on its
//! local disk; the master binds the key to the node on first contact (or when an operator
//! approves it) and from then on accepts only that key for that MAC. Blob downloads carry
//! the same signature in a header over `GET <sha256>`. Every master reply is signed with
//! the master's key, which the agent pins at first contact (or is given), and echoes the
//! request's nonce, so a recorded reply cannot be replayed to another request.

use crate::model::{FileEntry, Kind, Sha256};
use crate::select::Chosen;
use crate::version::Version;
use ed25519_dalek::Signer;
use fleetboot_boot::MacAddr;
use serde::{Deserialize, Serialize};

const REQUEST_CONTEXT: &[u8] = b"fleetboot-fleet-request-v1\n";
const REPLY_CONTEXT: &[u8] = b"fleetboot-fleet-reply-v1\n";
/// Largest request or reply body either side parses.
pub const MAX_BODY: usize = 1 << 20;

/// An ed25519 key pair (a node's identity, or the master's).
pub struct KeyPair(ed25519_dalek::SigningKey);

impl KeyPair {
    pub fn generate() -> Result<KeyPair, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(KeyPair(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }
    /// From 64 hex digits (the secret seed).
    pub fn from_hex(s: &str) -> Option<KeyPair> {
        crate::unhex::<32>(s.trim()).map(|b| KeyPair(ed25519_dalek::SigningKey::from_bytes(&b)))
    }
    pub fn secret_hex(&self) -> String {
        crate::hex(&self.0.to_bytes())
    }
    pub fn public_hex(&self) -> String {
        crate::hex(self.0.verifying_key().as_bytes())
    }
    fn sign(&self, ctx: &[u8], parts: &[&[u8]]) -> String {
        crate::hex(&self.0.sign(&signed_bytes(ctx, parts)).to_bytes())
    }
}

fn signed_bytes(ctx: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = ctx.to_vec();
    for p in parts {
        // Length-prefixed: no two different part lists give the same bytes.
        m.extend_from_slice(&(p.len() as u64).to_be_bytes());
        m.extend_from_slice(p);
    }
    m
}

fn verify(key_hex: &str, sig_hex: &str, ctx: &[u8], parts: &[&[u8]]) -> bool {
    let (Some(k), Some(s)) = (crate::unhex::<32>(key_hex), crate::unhex::<64>(sig_hex)) else { return false };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&k) else { return false };
    key.verify_strict(&signed_bytes(ctx, parts), &ed25519_dalek::Signature::from_bytes(&s)).is_ok()
}

/// A signed agent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub node: MacAddr,
    /// The node's public key (hex).
    pub key: String,
    pub ts_ms: u64,
    /// 32 hex digits, fresh per request.
    pub nonce: String,
    /// JSON of an [`AgentMessage`], or `GET <sha256>` for a blob.
    pub body: String,
    pub sig: String,
}

impl Envelope {
    pub fn sign(key: &KeyPair, node: MacAddr, ts_ms: u64, nonce: String, body: String) -> Envelope {
        let sig = key.sign(REQUEST_CONTEXT, &[node.to_string().as_bytes(), &ts_ms.to_be_bytes(), nonce.as_bytes(), body.as_bytes()]);
        Envelope { node, key: key.public_hex(), ts_ms, nonce, body, sig }
    }

    pub fn verifies(&self) -> bool {
        verify(&self.key, &self.sig, REQUEST_CONTEXT, &[self.node.to_string().as_bytes(), &self.ts_ms.to_be_bytes(), self.nonce.as_bytes(), self.body.as_bytes()])
    }

    /// The blob-download form: sent as one header, `X-Fleet-Auth`.
    pub fn to_header(&self) -> String {
        format!("{} {} {} {} {}", self.node, self.key, self.ts_ms, self.nonce, self.sig)
    }

    pub fn from_header(h: &str, body: String) -> Option<Envelope> {
        let mut it = h.split(' ');
        let e = Envelope {
            node: it.next()?.parse().ok()?,
            key: it.next()?.to_string(),
            ts_ms: it.next()?.parse().ok()?,
            nonce: it.next()?.to_string(),
            body,
            sig: it.next()?.to_string(),
        };
        it.next().is_none().then_some(e)
    }
}

/// The body of a blob request's signature.
pub fn blob_body(sha: &Sha256) -> String {
    format!("GET {sha}")
}

/// A fresh nonce (32 hex digits).
pub fn nonce() -> String {
    let mut b = [0u8; 16];
    // A failing OS RNG leaves zeros: the request is then refused as a replay, not forged.
    let _ = getrandom::fill(&mut b);
    crate::hex(&b)
}

/// What the node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub mac: MacAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(rename = "type")]
    pub node_type: String,
    pub arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// Something the node has on its local disk, with the hashes of its files as they are
/// now (re-hashed at boot, so a corrupted file shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installed {
    pub name: String,
    pub version: Version,
    pub kind: Kind,
    pub arch: String,
    pub files: Vec<FileEntry>,
}

impl Installed {
    pub fn from_chosen(c: &Chosen) -> Installed {
        Installed { name: c.name.clone(), version: c.version.clone(), kind: c.kind, arch: c.arch.clone(), files: c.files.clone() }
    }

    /// Whether this is exactly the chosen version with intact files.
    pub fn matches(&self, c: &Chosen) -> bool {
        self.name == c.name && self.version == c.version && self.kind == c.kind && self.files == c.files
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeReport {
    /// The node stored what it was sent (ready and stored).
    Stored,
    /// The node runs its packages (stored ones, or test ones).
    Running,
}

/// Agent → master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// At every boot: what the node has (nothing when pristine), asking for its image and
    /// packages (by its configuration, or by `features`) or for verification.
    Boot {
        identity: Identity,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
        installed: Vec<Installed>,
    },
    Report {
        state: NodeReport,
        /// Test mode: running packages it did not store.
        #[serde(default)]
        test: bool,
        installed: Vec<Installed>,
    },
    /// While running: "still here, any orders?"
    Heartbeat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Pristine node: everything to fetch, store, then reboot into the image.
    Install,
    /// The node has what it should: run from local storage, nothing to fetch.
    Match,
    /// Fetch only `fetch`, store, continue (reboot first if the image changed).
    Update,
    /// Test mode: fetch `fetch`, run the set without storing it.
    Test,
}

/// The master's answer to a boot request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub verdict: Verdict,
    /// What the node should run: the image and packages, dependencies first.
    pub image: Chosen,
    pub packages: Vec<Chosen>,
    /// Blobs to download (only what differs from what the node reported).
    pub fetch: Vec<FileEntry>,
    /// Store the set (false in test mode).
    pub store: bool,
    /// Reboot into the stored image after storing (pristine install, or a new image).
    pub reboot: bool,
}

impl Plan {
    pub fn set(&self) -> impl Iterator<Item = &Chosen> {
        std::iter::once(&self.image).chain(self.packages.iter())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "order", rename_all = "snake_case", deny_unknown_fields)]
pub enum Order {
    None,
    /// Prepare: forget local storage and boot as a pristine node.
    Reset { campaign: String },
    /// Warm boot: reboot, then only validate with the master.
    Reboot { campaign: String },
}

/// Master → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Plan(Plan),
    Ack,
    Orders(Order),
    /// Not served: the reason names what to do (approve the node, fix the configuration).
    Refused { reason: String, retry: bool },
}

/// A signed reply; `nonce` is the request's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReply {
    pub key: String,
    pub nonce: String,
    pub body: String,
    pub sig: String,
}

impl SignedReply {
    pub fn sign(key: &KeyPair, nonce: &str, reply: &Reply) -> SignedReply {
        let body = serde_json::to_string(reply).unwrap_or_default();
        let sig = key.sign(REPLY_CONTEXT, &[nonce.as_bytes(), body.as_bytes()]);
        SignedReply { key: key.public_hex(), nonce: nonce.to_string(), body, sig }
    }

    /// The reply, if it is signed by `master_key` for the request with `nonce`.
    pub fn open(&self, master_key: &str, nonce: &str) -> Result<Reply, String> {
        if !self.key.eq_ignore_ascii_case(master_key) {
            return Err(format!("reply signed by key {}, not the master's {master_key}", self.key));
        }
        if self.nonce != nonce {
            return Err("reply is for another request (nonce)".into());
        }
        if !verify(&self.key, &self.sig, REPLY_CONTEXT, &[self.nonce.as_bytes(), self.body.as_bytes()]) {
            return Err("reply signature does not verify".into());
        }
        if self.body.len() > MAX_BODY {
            return Err("reply too large".into());
        }
        serde_json::from_str(&self.body).map_err(|e| format!("reply body: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_and_replies_verify_and_tampering_shows() {
        let node = KeyPair::generate().unwrap();
        let mac: MacAddr = "52:54:00:66:00:01".parse().unwrap();
        let e = Envelope::sign(&node, mac, 1000, nonce(), "{\"kind\":\"heartbeat\"}".into());
        assert!(e.verifies());
        assert!(!Envelope { ts_ms: 1001, ..e.clone() }.verifies());
        assert!(!Envelope { body: "{}".into(), ..e.clone() }.verifies());
        assert!(!Envelope { node: "52:54:00:66:00:02".parse().unwrap(), ..e.clone() }.verifies());
        let other = KeyPair::generate().unwrap();
        assert!(!Envelope { key: other.public_hex(), ..e.clone() }.verifies());
        let h = Envelope::from_header(&e.to_header(), e.body.clone()).unwrap();
        assert_eq!(h, e);
        assert!(Envelope::from_header("a b c", String::new()).is_none());

        let master = KeyPair::generate().unwrap();
        let r = SignedReply::sign(&master, &e.nonce, &Reply::Ack);
        assert_eq!(r.open(&master.public_hex(), &e.nonce), Ok(Reply::Ack));
        assert!(r.open(&master.public_hex(), "other").is_err());
        assert!(r.open(&other.public_hex(), &e.nonce).is_err());
        let forged = SignedReply { body: serde_json::to_string(&Reply::Orders(Order::None)).unwrap(), ..r };
        assert!(forged.open(&master.public_hex(), &e.nonce).is_err());
        assert_eq!(KeyPair::from_hex(&master.secret_hex()).unwrap().public_hex(), master.public_hex());
    }
}

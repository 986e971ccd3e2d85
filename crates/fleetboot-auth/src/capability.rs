//! Per-client capabilities: `<expiry>.<tag>`, where `expiry` is Unix seconds in decimal
//! and `tag` the first 128 bits of HMAC-SHA256(key, domain ‖ scope ‖ subject ‖ expiry) in
//! unpadded base64url. Only characters that are safe in URL paths, TFTP file names and NBD
//! export names.
//!
//! The key never leaves the server (a file in `data_dir`, mode 0600, see
//! [`CapabilityKey::load_or_create`]); a capability proves that this server handed it out
//! for that subject and scope, and until when. It does not prove who presents it: anyone
//! who sees it (on the wire, in a log) may use it until it expires, so it is short-lived
//! and scoped.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

/// Separates fleetboot capabilities from any other use of the same key and from later
/// formats.
const DOMAIN: &[u8] = b"fleetboot capability v1\0";
const TAG_BYTES: usize = 16;
const KEY_BYTES: usize = 32;

/// Why a capability was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("not a capability")]
    Malformed,
    #[error("expired at {at} (Unix seconds)")]
    Expired { at: u64 },
    #[error("not issued by this server for this client")]
    Forged,
}

impl CapabilityError {
    /// A short label for metrics: `malformed`, `expired`, `forged`.
    pub fn label(&self) -> &'static str {
        match self {
            CapabilityError::Malformed => "malformed",
            CapabilityError::Expired { .. } => "expired",
            CapabilityError::Forged => "forged",
        }
    }
}

/// The server key capabilities are made and checked with.
#[derive(Clone)]
pub struct CapabilityKey([u8; KEY_BYTES]);

impl fmt::Debug for CapabilityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CapabilityKey(..)")
    }
}

impl CapabilityKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> CapabilityKey {
        CapabilityKey(bytes)
    }

    /// A key that lives only in this process (capabilities die with it).
    pub fn ephemeral() -> Result<CapabilityKey, crate::SecretError> {
        let mut k = [0u8; KEY_BYTES];
        crate::random(&mut k)?;
        Ok(CapabilityKey(k))
    }

    /// The key in `path` (64 hex digits), made on first use with mode 0600. A key file
    /// that others may read is refused: whoever reads it can make capabilities for every
    /// client.
    pub fn load_or_create(path: &Path) -> Result<CapabilityKey, crate::SecretError> {
        let text = crate::secret::load_or_create(path, || {
            let k = CapabilityKey::ephemeral()?;
            Ok(format!("{}\n", crate::hex(&k.0)))
        })?;
        let bytes = crate::unhex(text.trim())
            .and_then(|b| <[u8; KEY_BYTES]>::try_from(b).ok())
            .ok_or_else(|| crate::SecretError::Malformed { path: path.to_path_buf(), want: "64 hex digits" })?;
        Ok(CapabilityKey(bytes))
    }

    fn tag(&self, scope: &str, subject: &[u8], expires: u64) -> [u8; TAG_BYTES] {
        let full = self.mac(scope, subject, expires).finalize().into_bytes();
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&full[..TAG_BYTES]);
        tag
    }

    fn mac(&self, scope: &str, subject: &[u8], expires: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(DOMAIN);
        // Lengths first: no (scope, subject) pair can be read as another.
        mac.update(&(scope.len() as u64).to_be_bytes());
        mac.update(scope.as_bytes());
        mac.update(&(subject.len() as u64).to_be_bytes());
        mac.update(subject);
        mac.update(&expires.to_be_bytes());
        mac
    }

    /// A capability for `subject` in `scope`, valid until `expires` (Unix seconds).
    pub fn issue(&self, scope: &str, subject: &[u8], expires: u64) -> String {
        let tag = self.tag(scope, subject, expires);
        format!("{expires}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks `capability` for `subject` in `scope` at `now` (Unix seconds); its expiry
    /// when it holds. The tag is compared in constant time.
    pub fn verify(&self, scope: &str, subject: &[u8], capability: &str, now: u64) -> Result<u64, CapabilityError> {
        let (expires, tag) = capability.split_once('.').ok_or(CapabilityError::Malformed)?;
        if expires.is_empty() || expires.len() > 20 || !expires.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CapabilityError::Malformed);
        }
        let expires: u64 = expires.parse().map_err(|_| CapabilityError::Malformed)?;
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .ok()
            .filter(|t| t.len() == TAG_BYTES)
            .ok_or(CapabilityError::Malformed)?;
        // The tag first: an expiry is only worth reporting on a capability we issued.
        self.mac(scope, subject, expires).verify_truncated_left(&tag).map_err(|_| CapabilityError::Forged)?;
        if now >= expires {
            return Err(CapabilityError::Expired { at: expires });
        }
        Ok(expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> CapabilityKey {
        CapabilityKey::from_bytes([b; 32])
    }

    #[test]
    fn a_capability_holds_for_its_subject_and_scope_until_it_expires() {
        let k = key(1);
        let cap = k.issue("http", b"\x52\x54\x00\x77\x00\x10", 1000);
        assert!(cap.starts_with("1000."), "{cap}");
        assert!(cap.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{cap}");
        assert_eq!(k.verify("http", b"\x52\x54\x00\x77\x00\x10", &cap, 999), Ok(1000));
        assert_eq!(k.verify("http", b"\x52\x54\x00\x77\x00\x10", &cap, 1000), Err(CapabilityError::Expired { at: 1000 }));
        // Another client, another scope, another key: not ours.
        assert_eq!(k.verify("http", b"\x52\x54\x00\x77\x00\x11", &cap, 0), Err(CapabilityError::Forged));
        assert_eq!(k.verify("nbd", b"\x52\x54\x00\x77\x00\x10", &cap, 0), Err(CapabilityError::Forged));
        assert_eq!(key(2).verify("http", b"\x52\x54\x00\x77\x00\x10", &cap, 0), Err(CapabilityError::Forged));
        // A later expiry with the old tag is forged, not merely expired.
        let (_, tag) = cap.split_once('.').unwrap();
        assert_eq!(k.verify("http", b"\x52\x54\x00\x77\x00\x10", &format!("99999.{tag}"), 0), Err(CapabilityError::Forged));
    }

    #[test]
    fn scope_and_subject_cannot_be_shifted_into_each_other() {
        let k = key(3);
        let cap = k.issue("ab", b"c", 50);
        assert_eq!(k.verify("a", b"bc", &cap, 0), Err(CapabilityError::Forged));
    }

    #[test]
    fn malformed_capabilities() {
        let k = key(1);
        for bad in ["", ".", "12", "x.AAAAAAAAAAAAAAAAAAAAAA", "12.AAAA", "12.!!!!!!!!!!!!!!!!!!!!!!", "-1.AAAAAAAAAAAAAAAAAAAAAA"] {
            assert_eq!(k.verify("http", b"m", bad, 0), Err(CapabilityError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_made_once_with_mode_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fleetboot-auth-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("capability.key");
        let a = CapabilityKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = CapabilityKey::load_or_create(&path).unwrap();
        assert_eq!(a.0, b.0, "the second start reads the first one's key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = CapabilityKey::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("others can read"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not hex\n").unwrap();
        assert!(CapabilityKey::load_or_create(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        /// Hostile strings never panic the check and are never accepted.
        #[test]
        fn arbitrary_strings_are_refused(s in ".{0,80}") {
            prop_assert!(key(9).verify("http", b"m", &s, 0).is_err());
        }

        /// Flipping any one character of a good capability makes it fail.
        #[test]
        fn any_change_is_refused(i in 0usize..40, c in "[A-Za-z0-9_.-]") {
            let k = key(4);
            let cap = k.issue("http", b"subject", 4_000_000_000);
            let i = i % cap.len();
            let mut changed: Vec<char> = cap.chars().collect();
            let c = c.chars().next().unwrap();
            prop_assume!(changed[i] != c);
            changed[i] = c;
            let changed: String = changed.into_iter().collect();
            prop_assert!(k.verify("http", b"subject", &changed, 0).is_err());
        }
    }
}

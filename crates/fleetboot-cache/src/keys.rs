//! ed25519 keys in the forms an operator handles: a public key as 64 hex characters (in a
//! config file, a log line, `fleetboot cache key`), a secret as the 32-byte seed in hex
//! (in a 0600 file the shell creates). Generating a seed needs randomness, which the
//! shell supplies: this crate reads no clock and no entropy source.

use crate::hash::{from_hex, to_hex};
pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("not 64 hex characters")]
    Hex,
    #[error("not a valid ed25519 public key")]
    Point,
}

/// A public key from 64 hex characters (surrounding whitespace ignored).
pub fn parse_public(s: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = from_hex::<32>(s.trim()).ok_or(KeyError::Hex)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Point)
}

/// A public key as 64 hex characters.
pub fn public_hex(key: &VerifyingKey) -> String {
    to_hex(key.as_bytes())
}

/// A secret key from its 32-byte seed in hex (a key file's content).
pub fn parse_secret(s: &str) -> Result<SigningKey, KeyError> {
    let seed = from_hex::<32>(s.trim()).ok_or(KeyError::Hex)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A secret key's seed in hex, for its key file.
pub fn secret_hex(key: &SigningKey) -> String {
    to_hex(&key.to_bytes())
}

/// The key a fresh 32-byte random seed makes.
pub fn from_seed(seed: [u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refusals() {
        let k = from_seed([7; 32]);
        let public = k.verifying_key();
        assert_eq!(parse_public(&format!(" {}\n", public_hex(&public))).unwrap(), public);
        assert_eq!(parse_secret(&secret_hex(&k)).unwrap().verifying_key(), public);
        assert_eq!(parse_public("abcd"), Err(KeyError::Hex));
        assert!(parse_secret("zz").is_err());
    }
}

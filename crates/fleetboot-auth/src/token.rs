//! API tokens: `fbt_` + 43 characters of unpadded base64url (256 random bits).
//!
//! The secret is shown to the operator once; the store keeps its SHA-256 ([`TokenHash`]).
//! A token of that size needs no salt or slow hash: nobody can guess one, and a stolen
//! hash does not give the token back.

use base64::Engine;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;
use subtle::ConstantTimeEq;

/// What every token starts with, so a leaked one is easy to recognise (and to scan for).
pub const PREFIX: &str = "fbt_";
const RANDOM_BYTES: usize = 32;
/// `fbt_` + base64url of 32 bytes without padding.
pub const LEN: usize = PREFIX.len() + 43;

/// What a token may do. `Admin` may do everything `Read` may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read the API (leases, traces, profiles, images, audit log) and `/metrics`.
    Read,
    /// Read, and change: profiles, images, anything an operator changes over the API.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    /// Whether a token with this role may do what needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?} (read, admin)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "read" => Ok(Role::Read),
            "admin" => Ok(Role::Admin),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

/// SHA-256 of a token: what the store keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// The hash of whatever was presented, token-shaped or not.
    pub fn of(presented: &str) -> TokenHash {
        TokenHash(Sha256::digest(presented.as_bytes()).into())
    }

    pub fn to_hex(&self) -> String {
        crate::hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<TokenHash> {
        crate::unhex(s)?.try_into().ok().map(TokenHash)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

/// A freshly made token: the secret to hand over once, and the hash to store.
pub struct NewToken {
    pub secret: String,
    pub hash: TokenHash,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken").field("hash", &self.hash).finish_non_exhaustive()
    }
}

/// A new token from the OS random source.
pub fn generate() -> Result<NewToken, crate::SecretError> {
    let mut raw = [0u8; RANDOM_BYTES];
    crate::random(&mut raw)?;
    let secret = format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let hash = TokenHash::of(&secret);
    Ok(NewToken { secret, hash })
}

/// Whether `s` has the shape of a token (prefix, length, alphabet); says nothing about
/// whether it is valid.
pub fn well_formed(s: &str) -> bool {
    s.len() == LEN
        && s.starts_with(PREFIX)
        && s[PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The candidate whose hash matches `presented`. Every candidate is compared, each in
/// constant time, so how long this takes does not depend on where (or whether) a match is.
pub fn find<T>(presented: &str, candidates: impl IntoIterator<Item = (TokenHash, T)>) -> Option<T> {
    let h = TokenHash::of(presented);
    let mut found = None;
    for (stored, value) in candidates {
        if bool::from(stored.0.ct_eq(&h.0)) && found.is_none() {
            found = Some(value);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_distinct_and_found_by_hash() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert!(well_formed(&a.secret), "{}", a.secret);
        assert_ne!(a.secret, b.secret);
        assert_eq!(TokenHash::of(&a.secret), a.hash);
        let stored = vec![(b.hash, "b"), (a.hash, "a")];
        assert_eq!(find(&a.secret, stored.clone()), Some("a"));
        assert_eq!(find(&b.secret, stored.clone()), Some("b"));
        // One character off is another token.
        let mut wrong = a.secret.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(find(&wrong, stored.clone()), None);
        assert_eq!(find("", stored), None);
    }

    #[test]
    fn hashes_round_trip_as_hex() {
        let t = generate().unwrap();
        assert_eq!(TokenHash::from_hex(&t.hash.to_hex()), Some(t.hash));
        assert_eq!(TokenHash::from_hex("abcd"), None);
    }

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Admin.allows(Role::Read));
        assert!(Role::Admin.allows(Role::Admin));
        assert!(Role::Read.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Admin));
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn shape_checks() {
        assert!(!well_formed("fbt_short"));
        assert!(!well_formed(&format!("xxx_{}", "A".repeat(43))));
        assert!(!well_formed(&format!("fbt_{}", "/".repeat(43))));
        assert!(well_formed(&format!("fbt_{}", "A".repeat(43))));
    }
}

//! The site secret every sender and receiver of a site shares (it keys the tags of
//! ANNOUNCE, REGISTER and REGISTERED and wraps each session's key): 32 bytes written as
//! 64 hex digits. It comes from a file (mode 0600) or the `FLEETBOOT_STREAM_SECRET`
//! environment variable, never from the command line, where `ps` shows it to every user
//! of the host. All zeros is refused: it is what an unset secret used to be. A sender
//! with none configured creates one in its data directory on first run.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::StreamdError;

/// The environment variable a secret may come from (64 hex digits).
pub const ENV: &str = "FLEETBOOT_STREAM_SECRET";

/// Where a sender keeps the secret it created, under its data directory.
pub fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join("stream").join("site.secret")
}

/// Parses 64 hex digits (surrounding whitespace allowed); all zeros is refused.
pub fn parse(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return Err("must be 64 hex digits".into());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).map_err(|_| "not hex".to_string())?;
    }
    if out == [0; 32] {
        return Err("all zeros is not a secret".into());
    }
    Ok(out)
}

fn bad(path: &Path, msg: String) -> StreamdError {
    StreamdError::Config(format!("site secret {}: {msg}", path.display()))
}

/// Reads a secret file. Refuses one that other users may read or write (`chmod 600`).
pub fn load(path: &Path) -> Result<[u8; 32], StreamdError> {
    let meta = fs::metadata(path).map_err(|e| StreamdError::io(path, e))?;
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(bad(path, format!("mode {:o} lets other users read it; chmod 600", meta.permissions().mode() & 0o777)));
    }
    let text = fs::read_to_string(path).map_err(|e| StreamdError::io(path, e))?;
    parse(&text).map_err(|m| bad(path, m))
}

/// The secret in `path`, created there (0600, random) if the file does not exist yet.
pub fn load_or_create(path: &Path) -> Result<[u8; 32], StreamdError> {
    match load(path) {
        Err(StreamdError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let secret: [u8; 32] = crate::net::random_bytes();
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| StreamdError::io(dir, e))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(format!("{hex}\n").as_bytes())?;
        f.sync_all()?;
        fs::File::open(dir)?.sync_all()
    };
    match write() {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created the site secret; give receivers the same file");
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load(path),
        Err(e) => Err(StreamdError::io(path, e)),
    }
}

/// The secret from `file` if given, else from [`ENV`], else — when `create_in` names a
/// file — from there, created on first use; else an error saying where one can come from.
pub fn resolve(file: Option<&Path>, create_in: Option<&Path>) -> Result<[u8; 32], StreamdError> {
    if let Some(f) = file {
        return load(f);
    }
    if let Ok(v) = std::env::var(ENV) {
        return parse(&v).map_err(|m| StreamdError::Config(format!("{ENV}: {m}")));
    }
    match create_in {
        Some(p) => load_or_create(p),
        None => Err(StreamdError::Config(format!(
            "no site secret: give the sender's secret file (--site-secret-file) or set {ENV}"
        ))),
    }
}

/// The environment variable a receiver may take the sender's public key from (64 hex
/// digits), when no `--sender-key-file` is given.
pub const SENDER_KEY_ENV: &str = "FLEETBOOT_STREAM_SENDER_KEY";

/// Where a sender keeps the signing key it created, under its data directory.
pub fn signing_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("stream").join("sender.key")
}

/// The public half of the signing key in `key_path`, written beside it for receivers.
pub fn public_key_path(key_path: &Path) -> PathBuf {
    key_path.with_extension("pub")
}

fn hex32(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sender's ed25519 signing key from `path` (64 hex digits of its seed, mode 0600:
/// a key other users may read is refused), created there on first use when `create` is
/// set. Its public half is (re)written to [`public_key_path`] (mode 0644) each time, so
/// the operator can copy it to the receivers.
pub fn load_signing_key(path: &Path, create: bool) -> Result<fleetboot_stream::SigningKey, StreamdError> {
    let label = |m: String| StreamdError::Config(format!("stream signing key {}: {m}", path.display()));
    let seed = match fs::metadata(path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(label(format!(
                    "mode {:o} lets other users read it; chmod 600",
                    meta.permissions().mode() & 0o777
                )));
            }
            let text = fs::read_to_string(path).map_err(|e| StreamdError::io(path, e))?;
            parse(&text).map_err(label)?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            let seed: [u8; 32] = crate::net::random_bytes();
            let dir = path.parent().unwrap_or(Path::new("."));
            fs::create_dir_all(dir).map_err(|e| StreamdError::io(dir, e))?;
            let write = || -> io::Result<()> {
                let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                f.write_all(format!("{}\n", hex32(&seed)).as_bytes())?;
                f.sync_all()?;
                fs::File::open(dir)?.sync_all()
            };
            match write() {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "created the stream signing key");
                    seed
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return load_signing_key(path, false),
                Err(e) => return Err(StreamdError::io(path, e)),
            }
        }
        Err(e) => return Err(StreamdError::io(path, e)),
    };
    let key = fleetboot_stream::SigningKey::from_bytes(&seed);
    let public = public_key_path(path);
    let text = format!("{}\n", hex32(&key.verifying_key().to_bytes()));
    if fs::read_to_string(&public).ok().as_deref() != Some(text.as_str()) {
        let tmp = public.with_extension("pub.tmp");
        fs::write(&tmp, &text)
            .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)))
            .and_then(|_| fs::rename(&tmp, &public))
            .map_err(|e| StreamdError::io(&public, e))?;
        tracing::info!(path = %public.display(), "stream public key: give receivers this file");
    }
    Ok(key)
}

/// Parses a sender public key (64 hex digits of a valid ed25519 point).
pub fn parse_public_key(s: &str) -> Result<[u8; 32], String> {
    let k = parse(s)?;
    fleetboot_stream::VerifyingKey::from_bytes(&k).map_err(|_| "not an ed25519 public key".to_string())?;
    Ok(k)
}

/// The sender's public key for a receiver: from `file` (which other users may not
/// change), else [`SENDER_KEY_ENV`]; without either the receiver does not start, as it
/// could not tell the sender's blocks from anyone else's.
pub fn resolve_public_key(file: Option<&Path>) -> Result<[u8; 32], StreamdError> {
    if let Some(f) = file {
        let meta = fs::metadata(f).map_err(|e| StreamdError::io(f, e))?;
        let bad = |m: String| StreamdError::Config(format!("stream sender key {}: {m}", f.display()));
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(bad(format!(
                "mode {:o} lets other users change it; chmod 644",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = fs::read_to_string(f).map_err(|e| StreamdError::io(f, e))?;
        return parse_public_key(&text).map_err(bad);
    }
    if let Ok(v) = std::env::var(SENDER_KEY_ENV) {
        return parse_public_key(&v).map_err(|m| StreamdError::Config(format!("{SENDER_KEY_ENV}: {m}")));
    }
    Err(StreamdError::Config(format!(
        "no sender public key: receivers accept only blocks the sender signed; give a copy of \
         the sender's data_dir/stream/sender.pub with --sender-key-file, or set {SENDER_KEY_ENV}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_short_and_non_hex_are_refused() {
        assert!(parse(&"0".repeat(64)).unwrap_err().contains("zeros"));
        assert!(parse("abcd").is_err());
        assert!(parse(&"zz".repeat(32)).is_err());
        assert!(parse(&"é".repeat(32)).is_err());
        assert_eq!(parse(&format!("  {}\n", "01".repeat(32))).unwrap(), [1; 32]);
    }

    #[test]
    fn created_once_private_then_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = default_path(d.path());
        let a = load_or_create(&p).unwrap();
        assert_ne!(a, [0; 32]);
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&p).unwrap(), a, "a second start reuses it");
        assert_eq!(resolve(Some(&p), None).unwrap(), a);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("chmod 600"));
        let zero = d.path().join("zero");
        fs::write(&zero, "0".repeat(64)).unwrap();
        fs::set_permissions(&zero, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&zero).unwrap_err().to_string().contains("zeros"));
        assert!(load(&d.path().join("none")).is_err(), "a receiver never invents one");
    }

    #[test]
    fn signing_key_created_private_with_its_public_half_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = signing_key_path(d.path());
        assert!(load_signing_key(&p, false).is_err(), "not created unless asked");
        let k = load_signing_key(&p, true).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_signing_key(&p, true).unwrap().to_bytes(), k.to_bytes());
        let public = public_key_path(&p);
        assert_eq!(resolve_public_key(Some(&public)).unwrap(), k.verifying_key().to_bytes());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load_signing_key(&p, true).unwrap_err().to_string().contains("chmod 600"));
        fs::set_permissions(&public, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(resolve_public_key(Some(&public)).unwrap_err().to_string().contains("chmod 644"));
        assert!(resolve_public_key(Some(&d.path().join("none"))).is_err());
    }
}

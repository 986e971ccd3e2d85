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
}

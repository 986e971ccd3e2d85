//! Secret files: created with mode 0600 in one step (written beside, then linked into
//! place, so a crash never leaves half a key and two starts never make two keys), and
//! refused when group or others may read them.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: others can read this secret (mode {mode:o}); `chmod 600` it, or delete it to make a new one")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path}: not a valid secret ({want})")]
    Malformed { path: PathBuf, want: &'static str },
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io { path: path.to_path_buf(), source }
}

/// Errors unless only the owner may read or write `path`.
pub fn check_private(path: &Path) -> Result<(), SecretError> {
    let mode = std::fs::metadata(path).map_err(io(path))?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed { path: path.to_path_buf(), mode });
    }
    Ok(())
}

/// Creates `path` holding `contents`, mode 0600; fails if it exists.
pub fn create_new(path: &Path, contents: &str) -> Result<(), SecretError> {
    // Unique per call, not only per process: two services of one process (a negotiator and
    // its file server) may make the same key at once.
    let mut nonce = [0u8; 8];
    crate::random(&mut nonce)?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("secret"),
        std::process::id(),
        crate::hex(&nonce)
    ));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        // link(2) fails if the name is taken: whoever links first wins.
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(io(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The text of the secret in `path`, made with `make` (mode 0600) if there is none yet.
pub fn load_or_create(path: &Path, make: impl FnOnce() -> Result<String, SecretError>) -> Result<String, SecretError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match create_new(path, &make()?) {
            Ok(()) => {}
            // Someone else made it in between: theirs is the key.
            Err(SecretError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        },
        Err(e) => return Err(io(path)(e)),
    }
    check_private(path)?;
    std::fs::read_to_string(path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_racing_to_make_one_secret_all_read_the_same() {
        let dir = std::env::temp_dir().join(format!("fleetboot-auth-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        let got: Vec<String> = (0..8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || load_or_create(&p, || Ok(format!("from {i}"))).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(got.iter().all(|g| *g == got[0]), "{got:?}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn created_once_private_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("fleetboot-auth-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        assert_eq!(load_or_create(&p, || Ok("one".into())).unwrap(), "one");
        assert_eq!(load_or_create(&p, || Ok("two".into())).unwrap(), "one");
        assert!(create_new(&p, "three").is_err());
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

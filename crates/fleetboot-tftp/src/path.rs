//! Confining requested file names to the served root.
//!
//! Unlike the state machines this touches the filesystem (it canonicalizes), so that a
//! symlink pointing out of the root is caught as well as a `..`.

use crate::codec::ErrorCode;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("empty file name")]
    Empty,
    #[error("absolute paths are refused")]
    Absolute,
    #[error("`..` components are refused")]
    ParentComponent,
    #[error("NUL in file name")]
    Nul,
    #[error("resolves outside the root")]
    OutsideRoot,
    #[error("not a regular file")]
    NotAFile,
    #[error("not found: {0}")]
    NotFound(#[source] io::Error),
    #[error("root {root:?} unusable: {source}")]
    Root { root: PathBuf, source: io::Error },
}

impl PathError {
    /// The TFTP error to answer with; the message should stay vague (no paths).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            PathError::NotFound(_) => ErrorCode::FileNotFound,
            PathError::Root { .. } => ErrorCode::NotDefined,
            _ => ErrorCode::AccessViolation,
        }
    }
}

/// Maps a requested name to a regular file under `root`. Backslashes count as separators:
/// Windows boot loaders request `boot\x64\wdsnbp.com`, and `..\` must not slip through.
/// A leading separator names the top of the served tree, as it does for dnsmasq and
/// tftp-hpa: GRUB's network images ask for `/grub/grub.cfg`.
pub fn resolve(root: &Path, requested: &str) -> Result<PathBuf, PathError> {
    if requested.contains('\0') {
        return Err(PathError::Nul);
    }
    let requested = requested.trim_start_matches(['/', '\\']);
    if requested.is_empty() {
        return Err(PathError::Empty);
    }
    let mut joined = root.to_path_buf();
    for part in requested.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(PathError::ParentComponent),
            p => joined.push(p),
        }
    }
    let root = root.canonicalize().map_err(|source| PathError::Root {
        root: root.to_path_buf(),
        source,
    })?;
    let real = joined.canonicalize().map_err(PathError::NotFound)?;
    if !real.starts_with(&root) {
        return Err(PathError::OutsideRoot);
    }
    if !real.metadata().map_err(PathError::NotFound)?.is_file() {
        return Err(PathError::NotAFile);
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p =
                std::env::temp_dir().join(format!("fleetboot-tftp-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn confines_to_root() {
        let tmp = TempDir::new("path");
        let root = tmp.0.join("root");
        fs::create_dir_all(root.join("boot/x64")).unwrap();
        fs::write(root.join("boot/x64/wdsnbp.com"), b"x").unwrap();
        fs::write(root.join("pxelinux.0"), b"x").unwrap();
        fs::write(tmp.0.join("secret"), b"x").unwrap();
        let real_root = root.canonicalize().unwrap();

        assert_eq!(
            resolve(&root, "pxelinux.0").unwrap(),
            real_root.join("pxelinux.0")
        );
        assert_eq!(
            resolve(&root, "./boot//x64/wdsnbp.com").unwrap(),
            real_root.join("boot/x64/wdsnbp.com")
        );
        assert_eq!(
            resolve(&root, "boot\\x64\\wdsnbp.com").unwrap(),
            real_root.join("boot/x64/wdsnbp.com")
        );

        assert!(matches!(resolve(&root, ""), Err(PathError::Empty)));
        // A leading separator is the top of the served tree, never the host's root.
        assert_eq!(
            resolve(&root, "/pxelinux.0").unwrap(),
            real_root.join("pxelinux.0")
        );
        assert_eq!(
            resolve(&root, "\\boot\\x64\\wdsnbp.com").unwrap(),
            real_root.join("boot/x64/wdsnbp.com")
        );
        assert!(matches!(
            resolve(&root, "/etc/passwd"),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(
            resolve(&root, "\\secret"),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(resolve(&root, "/"), Err(PathError::Empty)));
        assert!(matches!(
            resolve(&root, "/../secret"),
            Err(PathError::ParentComponent)
        ));
        assert!(matches!(
            resolve(&root, "../secret"),
            Err(PathError::ParentComponent)
        ));
        assert!(matches!(
            resolve(&root, "boot/../../secret"),
            Err(PathError::ParentComponent)
        ));
        assert!(matches!(
            resolve(&root, "boot\\..\\..\\secret"),
            Err(PathError::ParentComponent)
        ));
        assert!(matches!(resolve(&root, "a\0b"), Err(PathError::Nul)));
        assert!(matches!(
            resolve(&root, "missing"),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(resolve(&root, "boot"), Err(PathError::NotAFile)));
        assert_eq!(
            resolve(&root, "missing").unwrap_err().error_code(),
            ErrorCode::FileNotFound
        );
        assert_eq!(
            resolve(&root, "../x").unwrap_err().error_code(),
            ErrorCode::AccessViolation
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_root_are_refused() {
        let tmp = TempDir::new("symlink");
        let root = tmp.0.join("root");
        fs::create_dir_all(&root).unwrap();
        fs::write(tmp.0.join("secret"), b"x").unwrap();
        fs::write(root.join("kernel"), b"x").unwrap();
        std::os::unix::fs::symlink(tmp.0.join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(&tmp.0, root.join("up")).unwrap();
        std::os::unix::fs::symlink("kernel", root.join("vmlinuz")).unwrap();

        assert!(matches!(
            resolve(&root, "escape"),
            Err(PathError::OutsideRoot)
        ));
        assert!(matches!(
            resolve(&root, "up/secret"),
            Err(PathError::OutsideRoot)
        ));
        // A symlink that stays inside is fine.
        assert_eq!(
            resolve(&root, "vmlinuz").unwrap(),
            root.canonicalize().unwrap().join("kernel")
        );
    }
}

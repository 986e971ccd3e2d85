//! The content-addressed blob directory: every file of every image and package version,
//! stored once under its SHA-256 (`sha256/<hex>`, read-only), never in the database.
//!
//! Blobs arrive through [`BlobStore::stage`], which hashes while it copies into `tmp/`;
//! [`BlobStore::commit`] renames a staged blob into place only when it has the expected
//! hash. A blob in place is therefore always intact (unless the disk lies; `verify`
//! re-hashes). Versions that share a file share its blob; [`BlobStore::collect`] removes
//! blobs no package version refers to any more.

use crate::model::Sha256;
use sha2::Digest;
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("content hashes to {actual}, not the expected {expected}")]
    Mismatch { expected: Sha256, actual: Sha256 },
    #[error("{size} bytes is more than the {limit} allowed")]
    TooLarge { size: u64, limit: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

/// A blob copied into `tmp/` with its hash; removed on drop unless committed.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    pub sha256: Sha256,
    pub size: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Copies `src` into `dst`, hashing on the way; at most `limit` bytes.
pub fn copy_hashing(src: &mut impl Read, dst: &mut impl Write, limit: u64) -> io::Result<(Sha256, u64)> {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let got = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(g) => g,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        n += got as u64;
        if n > limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {limit} bytes")));
        }
        h.update(&buf[..got]);
        dst.write_all(&buf[..got])?;
    }
    Ok((Sha256::from_digest(&h.finalize().into()), n))
}

/// The SHA-256 of a file's content.
pub fn hash_file(path: &Path) -> io::Result<(Sha256, u64)> {
    let mut f = fs::File::open(path)?;
    copy_hashing(&mut f, &mut io::sink(), u64::MAX)
}

impl BlobStore {
    /// Opens (creating) the blob directory.
    pub fn open(dir: &Path) -> Result<BlobStore, BlobError> {
        for sub in ["sha256", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(BlobStore { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, sha: &Sha256) -> PathBuf {
        self.dir.join("sha256").join(sha.as_str())
    }

    /// Whether the blob is in place with the expected size.
    pub fn has(&self, sha: &Sha256, size: u64) -> bool {
        fs::metadata(self.path(sha)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Copies a stream into `tmp/`, hashing it; at most `limit` bytes.
    pub fn stage(&self, src: &mut impl Read, limit: u64) -> Result<Staged, BlobError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join("tmp").join(format!("{}-{seq}", std::process::id()));
        let mut f = fs::File::create(&path).map_err(io_err(&path))?;
        let mut staged = Staged { path, sha256: Sha256::of(b""), size: 0 };
        let (sha, size) = copy_hashing(src, &mut f, limit).map_err(io_err(&staged.path))?;
        f.sync_all().map_err(io_err(&staged.path))?;
        staged.sha256 = sha;
        staged.size = size;
        Ok(staged)
    }

    /// Moves a staged blob into place if it hashes to `expected`.
    pub fn commit(&self, mut staged: Staged, expected: &Sha256) -> Result<PathBuf, BlobError> {
        if staged.sha256 != *expected {
            return Err(BlobError::Mismatch { expected: expected.clone(), actual: staged.sha256.clone() });
        }
        let dest = self.path(expected);
        let mut perms = fs::metadata(&staged.path).map_err(io_err(&staged.path))?.permissions();
        perms.set_readonly(true);
        fs::set_permissions(&staged.path, perms).map_err(io_err(&staged.path))?;
        fs::rename(&staged.path, &dest).map_err(io_err(&dest))?;
        staged.path = PathBuf::new();
        Ok(dest)
    }

    /// Stores bytes under their hash (tests, small blobs).
    pub fn put(&self, bytes: &[u8]) -> Result<Sha256, BlobError> {
        let staged = self.stage(&mut &bytes[..], u64::MAX)?;
        let sha = staged.sha256.clone();
        self.commit(staged, &sha)?;
        Ok(sha)
    }

    pub fn open_blob(&self, sha: &Sha256) -> Result<fs::File, BlobError> {
        let p = self.path(sha);
        fs::File::open(&p).map_err(io_err(&p))
    }

    /// Re-hashes a blob in place.
    pub fn verify(&self, sha: &Sha256) -> Result<(), BlobError> {
        let p = self.path(sha);
        let (actual, _) = hash_file(&p).map_err(io_err(&p))?;
        if actual != *sha {
            return Err(BlobError::Mismatch { expected: sha.clone(), actual });
        }
        Ok(())
    }

    /// Removes blobs not in `referenced` and leftovers in `tmp/` older than an hour;
    /// returns how many blobs and bytes were removed.
    pub fn collect(&self, referenced: &BTreeSet<Sha256>) -> Result<(usize, u64), BlobError> {
        let dir = self.dir.join("sha256");
        let mut removed = (0, 0);
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let keep = e.file_name().to_str().and_then(|n| n.parse::<Sha256>().ok()).is_some_and(|s| referenced.contains(&s));
            if !keep {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                removed.0 += 1;
                removed.1 += len;
            }
        }
        let tmp = self.dir.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a.as_secs() > 3600);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_commit_verify_collect() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let a = store.put(b"alpha").unwrap();
        assert_eq!(a, Sha256::of(b"alpha"));
        assert!(store.has(&a, 5) && !store.has(&a, 4));
        store.verify(&a).unwrap();

        let staged = store.stage(&mut &b"beta"[..], 100).unwrap();
        let e = store.commit(staged, &a).unwrap_err();
        assert!(matches!(e, BlobError::Mismatch { .. }), "{e}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "a refused blob leaves nothing behind");
        assert!(store.stage(&mut &b"too long"[..], 3).is_err());

        let b = store.put(b"beta").unwrap();
        assert_eq!(store.collect(&[a.clone()].into()).unwrap(), (1, 4));
        assert!(store.has(&a, 5) && !store.has(&b, 4));
    }
}

//! What an origin publishes to its caches: every version of every object it has been
//! asked about, with its chunk hashes, and where its bytes are.
//!
//! - `files/PATH`: a file under `server.root` (confined like TFTP and HTTP requests). Its
//!   versions are numbered by the origin: a file whose content differs from the newest
//!   version published (checked by its inode, size and times, then its hash) becomes the
//!   next version. Only the newest content is on disk, so only the newest version's
//!   bytes can be sent; a cache still holding an older one serves it until it verified
//!   the new one.
//! - `images/NAME`: a catalog image; its versions are the catalog's, content-addressed and
//!   immutable, every version's bytes available.
//!
//! Hashing reads the whole object once; the chunk list is kept in memory (32 bytes a
//! chunk) for the newest [`KEEP_VERSIONS`] versions of each name.

use anyhow::{anyhow, bail, Context, Result};
use fleetboot_cache::hash::{to_hex, Digest, ObjectHasher};
use fleetboot_cache::manifest::Manifest;
use fleetboot_cache::table::Published;
use fleetboot_store::{OriginObject, Store, Write};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Versions of one name whose chunk lists stay in memory.
pub const KEEP_VERSIONS: usize = 8;

/// Names whose versions are tracked; a bound on what caches can make an origin hash.
pub const MAX_NAMES: usize = 100_000;

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Fingerprint {
    fn of(m: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// One published version.
#[derive(Debug, Clone)]
pub struct Version {
    pub version: u64,
    pub sha256: Digest,
    pub size: u64,
    /// BLAKE3 per chunk at the origin's chunk size; `None` for versions known from the
    /// store whose content is no longer here (an older file version).
    pub chunks: Option<Arc<Vec<Digest>>>,
    /// Where its bytes are, while they are there.
    pub path: Option<PathBuf>,
    fingerprint: Option<Fingerprint>,
}

#[derive(Debug, Default)]
struct Named {
    /// Ascending by version.
    versions: Vec<Version>,
}

/// Every object the origin knows.
pub struct Objects {
    root: PathBuf,
    data_dir: PathBuf,
    chunk_size: u32,
    names: HashMap<String, Named>,
    by_sha: HashMap<Digest, (PathBuf, Option<Fingerprint>)>,
}

/// Reads a file's SHA-256 and chunk hashes in one pass.
fn hash_file(path: &Path, chunk_size: u32) -> Result<(Digest, u64, Vec<Digest>, Fingerprint)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let before = Fingerprint::of(&f.metadata()?);
    let mut h = ObjectHasher::new(chunk_size);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let after = Fingerprint::of(&f.metadata()?);
    if before != after {
        bail!("{} changed while it was hashed", path.display());
    }
    let (sha, size, chunks) = h.finish();
    Ok((sha, size, chunks, after))
}

impl Objects {
    /// Starts from the versions the store remembers (numbering continues after a restart).
    pub fn load(store: &Store, root: PathBuf, data_dir: PathBuf, chunk_size: u32) -> Result<Objects> {
        let mut names: HashMap<String, Named> = HashMap::new();
        for o in store.origin_objects()? {
            let Some(sha) = fleetboot_cache::hash::from_hex::<32>(&o.sha256) else { continue };
            names.entry(o.name).or_default().versions.push(Version {
                version: o.version,
                sha256: sha,
                size: o.size,
                chunks: None,
                path: None,
                fingerprint: None,
            });
        }
        for n in names.values_mut() {
            n.versions.sort_by_key(|v| v.version);
        }
        Ok(Objects { root, data_dir, chunk_size, names, by_sha: HashMap::new() })
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The versions of `name` published so far (for [`fleetboot_cache::OriginTable`]).
    pub fn published(&self, name: &str) -> Vec<Published> {
        self.names
            .get(name)
            .map(|n| n.versions.iter().map(|v| Published { version: v.version, sha256: to_hex(&v.sha256) }).collect())
            .unwrap_or_default()
    }

    pub fn version(&self, name: &str, version: u64) -> Option<&Version> {
        self.names.get(name)?.versions.iter().find(|v| v.version == version)
    }

    pub fn newest(&self, name: &str) -> Option<&Version> {
        self.names.get(name)?.versions.last()
    }

    /// Every name with at least one version.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }

    /// Brings `name` up to date with what is on disk now (hashing it if it changed) and
    /// returns its newest version and, when that is a version not seen before, the store
    /// write that publishes it. Blocking: run it off the async threads.
    pub fn refresh(&mut self, name: &str, now_ms: u64) -> Result<(Version, Option<Write>)> {
        if !self.names.contains_key(name) && self.names.len() >= MAX_NAMES {
            bail!("the origin tracks {MAX_NAMES} objects already");
        }
        if let Some(path) = name.strip_prefix("files/") {
            self.refresh_file(name, path, now_ms)
        } else if let Some(image) = name.strip_prefix("images/") {
            self.refresh_image(name, image, now_ms)
        } else {
            bail!("{name}: not an object name")
        }
    }

    fn refresh_file(&mut self, name: &str, rel: &str, now_ms: u64) -> Result<(Version, Option<Write>)> {
        let path = fleetboot_tftp::path::resolve(&self.root, rel).map_err(|e| anyhow!("{rel}: {e}"))?;
        let meta = std::fs::metadata(&path)?;
        let fp = Fingerprint::of(&meta);
        if let Some(v) = self.names.get(name).and_then(|n| n.versions.last()) {
            if v.fingerprint == Some(fp) && v.path.as_deref() == Some(path.as_path()) && v.chunks.is_some() {
                return Ok((v.clone(), None));
            }
        }
        let (sha, size, chunks, fp) = hash_file(&path, self.chunk_size)?;
        let chunks = Arc::new(chunks);
        self.by_sha.insert(sha, (path.clone(), Some(fp)));
        let named = self.names.entry(name.to_string()).or_default();
        // Rewritten with the same bytes (or renamed into place): the same version. Content
        // that returns to an older version's is a new version all the same: versions only
        // grow, and a cache still holding the old one copies every chunk locally.
        if let Some(last) = named.versions.last_mut().filter(|last| last.sha256 == sha) {
            last.chunks = Some(chunks);
            last.path = Some(path);
            last.fingerprint = Some(fp);
            return Ok((last.clone(), None));
        }
        let version = named.versions.last().map_or(1, |v| v.version + 1);
        let v = Version { version, sha256: sha, size, chunks: Some(chunks), path: Some(path), fingerprint: Some(fp) };
        // Older versions of a file are gone from the disk: their bytes cannot be sent.
        for old in named.versions.iter_mut() {
            old.path = None;
        }
        named.versions.push(v.clone());
        trim(named);
        tracing::info!(name, version, sha256 = %to_hex(&sha), size, "published a new version");
        let write = Write::UpsertOriginObject(OriginObject { name: name.to_string(), version, sha256: to_hex(&sha), size, created_ms: now_ms });
        Ok((v, Some(write)))
    }

    fn refresh_image(&mut self, name: &str, image: &str, now_ms: u64) -> Result<(Version, Option<Write>)> {
        let catalog = fleetboot_images::Catalog::open_dir(&self.data_dir)?;
        let iv = catalog.resolve(image).map_err(|e| anyhow!("{image}: {e}"))?;
        let version = u64::from(iv.version);
        if let Some(v) = self.version(name, version) {
            if v.chunks.is_some() {
                return Ok((v.clone(), None));
            }
        }
        let path = catalog.blob_path(&iv.sha256);
        let (sha, size, chunks, fp) = hash_file(&path, self.chunk_size)?;
        if to_hex(&sha) != iv.sha256 {
            bail!("catalog image {image}:{version} does not match its SHA-256 (the blob is damaged)");
        }
        self.by_sha.insert(sha, (path.clone(), Some(fp)));
        let v = Version { version, sha256: sha, size, chunks: Some(Arc::new(chunks)), path: Some(path), fingerprint: Some(fp) };
        let named = self.names.entry(name.to_string()).or_default();
        let fresh = !named.versions.iter().any(|x| x.version == version);
        named.versions.retain(|x| x.version != version);
        named.versions.push(v.clone());
        named.versions.sort_by_key(|x| x.version);
        trim(named);
        let write = fresh.then(|| Write::UpsertOriginObject(OriginObject { name: name.to_string(), version, sha256: iv.sha256.clone(), size, created_ms: now_ms }));
        Ok((v, write))
    }

    /// The manifest of a version whose chunks are known.
    pub fn manifest(&self, name: &str, version: u64, now_ms: u64) -> Option<Manifest> {
        let v = self.version(name, version)?;
        Some(Manifest {
            name: name.to_string(),
            version,
            size: v.size,
            chunk_size: self.chunk_size,
            sha256: v.sha256,
            issued_ms: now_ms,
            chunks: v.chunks.as_ref()?.as_ref().clone(),
        })
    }

    /// Where the bytes with this SHA-256 are, if they are still those bytes: a file that
    /// changed since it was hashed is not served under its old digest.
    pub fn blob(&self, sha: &Digest) -> Option<PathBuf> {
        let (path, fp) = self.by_sha.get(sha)?;
        if let Some(fp) = fp {
            let now = std::fs::metadata(path).ok().map(|m| Fingerprint::of(&m))?;
            if now != *fp {
                return None;
            }
        }
        Some(path.clone())
    }
}

fn trim(named: &mut Named) {
    let n = named.versions.len();
    for v in named.versions.iter_mut().take(n.saturating_sub(KEEP_VERSIONS)) {
        v.chunks = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(name: &str) -> (PathBuf, Store, Objects) {
        let dir = std::env::temp_dir().join(format!("fleetboot-origin-objects-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let store = Store::open(&dir.join("fleetboot.db")).unwrap();
        let objects = Objects::load(&store, dir.join("root"), dir.clone(), 4096).unwrap();
        (dir, store, objects)
    }

    #[test]
    fn a_changed_file_is_the_next_version_and_a_rewritten_one_is_not() {
        let (dir, store, mut o) = setup("versions");
        let f = dir.join("root/vmlinuz");
        std::fs::write(&f, vec![1u8; 10_000]).unwrap();
        let (v1, w) = o.refresh("files/vmlinuz", 1).unwrap();
        assert_eq!((v1.version, v1.size, v1.chunks.as_ref().unwrap().len()), (1, 10_000, 3));
        store.write_blocking(w.into_iter().collect()).unwrap();
        assert!(o.refresh("files/vmlinuz", 2).unwrap().1.is_none(), "unchanged: no new version");
        std::fs::write(&f, vec![1u8; 10_000]).unwrap();
        let (same, w) = o.refresh("files/vmlinuz", 2).unwrap();
        assert_eq!((same.version, w.is_none()), (1, true), "the same bytes written again: no new version");
        assert_eq!(o.blob(&v1.sha256), Some(f.canonicalize().unwrap()));
        std::fs::write(&f, vec![2u8; 10_000]).unwrap();
        assert_eq!(o.blob(&v1.sha256), None, "the old digest no longer names these bytes");
        let (v2, w) = o.refresh("files/vmlinuz", 3).unwrap();
        assert_eq!(v2.version, 2);
        store.write_blocking(w.into_iter().collect()).unwrap();
        assert!(o.version("files/vmlinuz", 1).unwrap().path.is_none());
        // A restart remembers the numbering.
        let mut again = Objects::load(&store, dir.join("root"), dir.clone(), 4096).unwrap();
        assert_eq!(again.published("files/vmlinuz").len(), 2);
        std::fs::write(&f, vec![3u8; 5]).unwrap();
        assert_eq!(again.refresh("files/vmlinuz", 4).unwrap().0.version, 3);
        assert!(o.refresh("files/../etc/passwd", 5).is_err());
        assert!(o.refresh("files/missing", 5).is_err());
        let m = again.manifest("files/vmlinuz", 3, 9).unwrap();
        assert_eq!((m.size, m.chunk_count()), (5, 1));
        assert!(again.manifest("files/vmlinuz", 1, 9).is_none(), "no chunks for content no longer here");
    }
}

//! The block hashes of the images a sender streams, kept across sessions: hashing a whole
//! image (one SHA-256 per block, read from disk) is the most expensive step of opening a
//! session — 128 MiB cost about half a second, a fifth of what streaming it takes at
//! 400 Mbit/s — and its result depends only on the image's bytes and the block size.
//! Each session still signs its own stream order over them
//! ([`fleetboot_stream::manifest::SessionManifest`]: one hash per group of 16 positions
//! over the block index and the kept SHA-256 of each, a cheap pass over the kept hashes).
//!
//! Two levels, both bounded:
//!
//! - in memory, for the sessions of one process (`fleetboot stream serve` opens a new
//!   session of the same image each time one ends): at most [`Limits::memory_entries`]
//!   images and [`Limits::memory_bytes`] of hashes, least recently used dropped first;
//! - on disk, in the sender's cache directory (`data_dir/stream/block-hashes` for
//!   `fleetboot stream serve`, `--hash-cache` for `fleetboot-streamd send`): one file per
//!   image version and block size, `<sha256>-<block size>.blockhashes`, at most
//!   [`Limits::disk_files`] files and [`Limits::disk_bytes`] bytes, the least recently
//!   used removed first.
//!
//! Kept hashes are used only for the file they were computed from, unchanged: its device,
//! inode, size, modification and status-change times (ns) must all be those recorded, and
//! the SHA-256 the session names must be the one recorded. An image replaced in place
//! (rewritten: new mtime and ctime; renamed over: new inode) is hashed again. A build
//! checks the whole image against the SHA-256 the session names in the same pass and
//! refuses an image that does not match it; hashes of a file that changed while it was
//! read are used for that session only (they match the named SHA-256) and not kept. A
//! cache file that is short, corrupt (its own SHA-256 at the end) or of another format
//! is rebuilt.
//!
//! File format: `FBHASH1\n`, block size (u16), image size (u64), device, inode (u64),
//! mtime and ctime (i128 ns), the image's SHA-256 (32 bytes), block count (u32), the
//! block hashes (32 bytes each), then SHA-256 of all that; integers big-endian.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetboot_stream::manifest::{block_hash, manifest_blocks, BlockHash};
use sha2::{Digest, Sha256};

use crate::StreamdError;

const MAGIC: &[u8; 8] = b"FBHASH1\n";
const HEADER: usize = 8 + 2 + 8 + 8 + 8 + 16 + 16 + 32 + 4;
const SUFFIX: &str = ".blockhashes";
/// Image bytes read per `pread` while hashing (a multiple of the block size is used).
const BUILD_CHUNK: usize = 4 << 20;

/// What identifies one version of an image file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(file: &File) -> io::Result<FileIdentity> {
        let m = file.metadata()?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        })
    }
}

/// Where a session's block hashes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashOrigin {
    /// Kept in this process from an earlier session.
    Memory,
    /// Read from the cache directory.
    Disk,
    /// Computed from the image now.
    Built,
}

impl HashOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            HashOrigin::Memory => "memory",
            HashOrigin::Disk => "disk",
            HashOrigin::Built => "built",
        }
    }
}

/// One image's block hashes and where they came from.
#[derive(Debug, Clone)]
pub struct BlockHashes {
    pub hashes: Arc<[BlockHash]>,
    pub origin: HashOrigin,
}

/// The bounds of a [`HashCache`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_entries: usize,
    pub memory_bytes: usize,
    pub disk_files: usize,
    pub disk_bytes: u64,
    /// Hashes of a file whose status changed less than this before it was hashed are used
    /// but not kept: on kernels whose file times follow a coarse clock, a second change
    /// within the same tick would leave the file's times as they were.
    pub settle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        // 256 MiB of hashes is ~11 GiB of images at 1450-byte blocks.
        Limits {
            memory_entries: 16,
            memory_bytes: 256 << 20,
            disk_files: 64,
            disk_bytes: 2 << 30,
            settle: Duration::from_secs(2),
        }
    }
}

/// What a [`HashCache`] did, since it was made.
#[derive(Debug, Default)]
pub struct HashCacheStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub builds: AtomicU64,
    /// Blocks read and hashed by builds.
    pub blocks_hashed: AtomicU64,
    /// Kept hashes found but not used: another file, a changed one, a corrupt cache file.
    pub stale: AtomicU64,
    /// Entries dropped from memory and files removed from disk to stay within the limits.
    pub memory_evictions: AtomicU64,
    pub disk_evictions: AtomicU64,
}

/// An image version's key: its SHA-256 (hex) and the block size.
type ImageKey = (String, u16);

/// The kept entries and a use counter (what "least recently used" compares).
type Memory = (HashMap<ImageKey, MemoryEntry>, u64);

struct MemoryEntry {
    identity: FileIdentity,
    hashes: Arc<[BlockHash]>,
    used: u64,
}

/// Block hashes per image version, in memory and in a cache directory.
pub struct HashCache {
    limits: Limits,
    memory: Mutex<Memory>,
    pub stats: HashCacheStats,
}

/// The one cache of the process: every session's thread shares it.
pub fn shared() -> &'static HashCache {
    static SHARED: OnceLock<HashCache> = OnceLock::new();
    SHARED.get_or_init(|| HashCache::new(Limits::default()))
}

/// An image to hash: the open file the session reads, its path (for messages) and the
/// SHA-256 (hex) the session names it by.
#[derive(Debug, Clone, Copy)]
pub struct ImageRef<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub sha256: &'a str,
    pub size: u64,
    pub block_size: u16,
}

impl HashCache {
    pub fn new(limits: Limits) -> HashCache {
        HashCache {
            limits,
            memory: Mutex::new((HashMap::new(), 0)),
            stats: HashCacheStats::default(),
        }
    }

    /// The block hashes of `image`: kept ones when they are for this very file,
    /// unchanged, else computed (and kept in memory and, with `dir`, on disk).
    pub fn get(&self, dir: Option<&Path>, image: ImageRef<'_>) -> Result<BlockHashes, StreamdError> {
        let io_err = |e| StreamdError::io(image.path, e);
        let sha = image.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StreamdError::Config(format!("bad sha256 {:?}", image.sha256)));
        }
        let blocks = manifest_blocks(image.size, image.block_size)
            .map_err(|e| StreamdError::Config(e.to_string()))?;
        let identity = FileIdentity::of(image.file).map_err(io_err)?;
        if identity.size != image.size {
            return Err(StreamdError::Config(format!(
                "{} is {} bytes, the session says {}",
                image.path.display(),
                identity.size,
                image.size
            )));
        }
        let key = (sha.clone(), image.block_size);
        if let Some(h) = self.in_memory(&key, &identity) {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(BlockHashes { hashes: h, origin: HashOrigin::Memory });
        }
        let file_path = dir.map(|d| d.join(format!("{sha}-{}{SUFFIX}", image.block_size)));
        if let Some(p) = &file_path {
            match load(p, &identity, &sha, image.block_size, blocks) {
                Ok(Some(h)) => {
                    self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                    // Recently used: the last to be removed when the directory is full.
                    if let Ok(f) = File::options().write(true).open(p) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                    self.keep_in_memory(key, identity, h.clone());
                    return Ok(BlockHashes { hashes: h, origin: HashOrigin::Disk });
                }
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.stats.stale.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(file = %p.display(), reason = %e, "kept block hashes not used: rebuilding them");
                }
            }
        }
        let started = Instant::now();
        let started_wall = SystemTime::now();
        let (hashes, whole) = build(image.file, image.size, image.block_size, blocks).map_err(io_err)?;
        self.stats.builds.fetch_add(1, Ordering::Relaxed);
        self.stats.blocks_hashed.fetch_add(blocks as u64, Ordering::Relaxed);
        if whole != sha {
            return Err(StreamdError::Config(format!(
                "{} is not the image the session names: its SHA-256 is {whole}, not {sha}",
                image.path.display()
            )));
        }
        let hashes: Arc<[BlockHash]> = hashes.into();
        tracing::info!(
            image = %sha,
            blocks,
            ms = started.elapsed().as_millis() as u64,
            "block hashes built"
        );
        if FileIdentity::of(image.file).ok() != Some(identity) {
            tracing::warn!(file = %image.path.display(), "the image changed while it was hashed: its block hashes are not kept");
            return Ok(BlockHashes { hashes, origin: HashOrigin::Built });
        }
        let changed_ns = started_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128)
            - identity.ctime_ns;
        if changed_ns < self.limits.settle.as_nanos() as i128 {
            tracing::info!(file = %image.path.display(), "the image changed just before it was hashed: its block hashes are not kept");
            return Ok(BlockHashes { hashes, origin: HashOrigin::Built });
        }
        self.keep_in_memory(key, identity, hashes.clone());
        if let (Some(d), Some(p)) = (dir, &file_path) {
            match store(d, p, &identity, &sha, image.block_size, &hashes) {
                Ok(()) => self.prune(d, p),
                Err(e) => tracing::warn!(dir = %d.display(), error = %e, "block hashes not kept on disk"),
            }
        }
        Ok(BlockHashes { hashes, origin: HashOrigin::Built })
    }

    fn in_memory(&self, key: &ImageKey, identity: &FileIdentity) -> Option<Arc<[BlockHash]>> {
        let mut m = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *m;
        *clock += 1;
        let now = *clock;
        match map.get_mut(key) {
            Some(e) if e.identity == *identity => {
                e.used = now;
                Some(e.hashes.clone())
            }
            Some(_) => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                map.remove(key);
                None
            }
            None => None,
        }
    }

    fn keep_in_memory(&self, key: ImageKey, identity: FileIdentity, hashes: Arc<[BlockHash]>) {
        let bytes = hashes.len() * 32;
        if bytes > self.limits.memory_bytes || self.limits.memory_entries == 0 {
            return;
        }
        let mut m = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *m;
        *clock += 1;
        map.insert(key, MemoryEntry { identity, hashes, used: *clock });
        loop {
            let total: usize = map.values().map(|e| e.hashes.len() * 32).sum();
            if map.len() <= self.limits.memory_entries && total <= self.limits.memory_bytes {
                break;
            }
            let Some(oldest) = map.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone()) else {
                break;
            };
            map.remove(&oldest);
            self.stats.memory_evictions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(image = %oldest.0, block_size = oldest.1, "block hashes dropped from memory (limit reached)");
        }
    }

    /// Removes the least recently used cache files beyond the limits, never `keep`.
    fn prune(&self, dir: &Path, keep: &Path) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(SUFFIX))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        files.sort();
        let mut count = files.len();
        let mut bytes: u64 = files.iter().map(|f| f.1).sum();
        for (_, len, p) in files {
            if count <= self.limits.disk_files && bytes <= self.limits.disk_bytes {
                break;
            }
            if p == keep {
                continue;
            }
            if std::fs::remove_file(&p).is_ok() {
                count -= 1;
                bytes -= len;
                self.stats.disk_evictions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(file = %p.display(), "kept block hashes removed (cache directory limit reached)");
            }
        }
    }
}

/// Reads the image in large chunks, hashing each block and the whole image.
fn build(file: &File, size: u64, block_size: u16, blocks: u32) -> io::Result<(Vec<BlockHash>, String)> {
    let bs = block_size as usize;
    let chunk = (BUILD_CHUNK / bs).max(1) * bs;
    let mut buf = vec![0u8; chunk];
    let mut hashes = Vec::with_capacity(blocks as usize);
    let mut whole = Sha256::new();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(chunk as u64) as usize;
        file.read_exact_at(&mut buf[..len], off)?;
        whole.update(&buf[..len]);
        hashes.extend(buf[..len].chunks(bs).map(block_hash));
        off += len as u64;
    }
    Ok((hashes, format!("{:x}", whole.finalize())))
}

fn header(identity: &FileIdentity, sha: &str, block_size: u16, blocks: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&block_size.to_be_bytes());
    h.extend_from_slice(&identity.size.to_be_bytes());
    h.extend_from_slice(&identity.dev.to_be_bytes());
    h.extend_from_slice(&identity.ino.to_be_bytes());
    h.extend_from_slice(&identity.mtime_ns.to_be_bytes());
    h.extend_from_slice(&identity.ctime_ns.to_be_bytes());
    for i in 0..32 {
        // `sha` was checked to be 64 hex digits.
        h.push(u8::from_str_radix(&sha[i * 2..i * 2 + 2], 16).unwrap_or(0));
    }
    h.extend_from_slice(&blocks.to_be_bytes());
    h
}

/// The kept hashes at `path` if they are for this file, unchanged, and this SHA-256;
/// `None` if they are for another (or an older) file; an error if unreadable or corrupt.
fn load(
    path: &Path,
    identity: &FileIdentity,
    sha: &str,
    block_size: u16,
    blocks: u32,
) -> io::Result<Option<Arc<[BlockHash]>>> {
    let mut f = File::open(path)?;
    let expected = HEADER as u64 + blocks as u64 * 32 + 32;
    let len = f.metadata()?.len();
    let mut head = vec![0u8; HEADER];
    f.read_exact(&mut head)?;
    if head != header(identity, sha, block_size, blocks) {
        return Ok(None);
    }
    if len != expected {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong length"));
    }
    let mut body = vec![0u8; blocks as usize * 32 + 32];
    f.read_exact(&mut body)?;
    let (hashes, sum) = body.split_at(blocks as usize * 32);
    let mut h = Sha256::new();
    h.update(&head);
    h.update(hashes);
    if h.finalize().as_slice() != sum {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "checksum mismatch"));
    }
    Ok(Some(
        hashes
            .chunks_exact(32)
            .map(|c| <BlockHash>::try_from(c).expect("32 bytes"))
            .collect(),
    ))
}

/// Writes the hashes beside `path` and renames them into place, so a reader sees the old
/// file or the whole new one.
fn store(
    dir: &Path,
    path: &Path,
    identity: &FileIdentity,
    sha: &str,
    block_size: u16,
    hashes: &[BlockHash],
) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let head = header(identity, sha, block_size, hashes.len() as u32);
    let mut body = Vec::with_capacity(HEADER + hashes.len() * 32 + 32);
    body.extend_from_slice(&head);
    for h in hashes {
        body.extend_from_slice(h);
    }
    let sum: [u8; 32] = Sha256::digest(&body).into();
    body.extend_from_slice(&sum);
    // Unique per writer: two sessions of one image may build its hashes at once.
    static WRITERS: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("hashes"),
        std::process::id(),
        WRITERS.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&body)?;
        // Exact, not the file system's coarse clock: the order in which files are removed.
        f.set_modified(SystemTime::now())?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The images are written just before they are hashed.
    const LIMITS: Limits = Limits {
        memory_entries: 16,
        memory_bytes: 1 << 20,
        disk_files: 64,
        disk_bytes: 1 << 30,
        settle: Duration::ZERO,
    };

    /// Rewrites `path` in place (same inode), with a modification time of its own.
    fn rewrite(path: &Path, data: &[u8], mtime_secs: u64) {
        std::fs::write(path, data).unwrap();
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime_secs)).unwrap();
    }

    fn sha_hex(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    fn image(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    fn get(c: &HashCache, dir: &Path, path: &Path, sha: &str, size: u64) -> Result<BlockHashes, StreamdError> {
        let f = File::open(path).unwrap();
        c.get(Some(dir), ImageRef { file: &f, path, sha256: sha, size, block_size: 100 })
    }

    #[test]
    fn kept_hashes_are_used_again_and_rebuilt_when_the_image_changes() {
        let t = tempfile::tempdir().unwrap();
        let cache_dir = t.path().join("hashes");
        let data: Vec<u8> = (0..100 * 50 + 7).map(|i| (i * 13 + i / 100) as u8).collect();
        let sha = sha_hex(&data);
        let img = image(t.path(), "a.img", &data);
        let n = data.len() as u64;
        let c = HashCache::new(LIMITS);

        let first = get(&c, &cache_dir, &img, &sha, n).unwrap();
        assert_eq!(first.origin, HashOrigin::Built);
        assert_eq!(first.hashes.len(), 51);
        assert_eq!(first.hashes[50], block_hash(&data[5000..]));
        assert_eq!(c.stats.blocks_hashed.load(Ordering::Relaxed), 51);
        // The second session of this process: from memory, nothing read.
        let second = get(&c, &cache_dir, &img, &sha, n).unwrap();
        assert_eq!(second.origin, HashOrigin::Memory);
        assert_eq!(second.hashes, first.hashes);
        // Another process: from the cache directory.
        let fresh = HashCache::new(LIMITS);
        let third = get(&fresh, &cache_dir, &img, &sha, n).unwrap();
        assert_eq!(third.origin, HashOrigin::Disk);
        assert_eq!(third.hashes, first.hashes);
        assert_eq!(fresh.stats.blocks_hashed.load(Ordering::Relaxed), 0);
        assert_eq!(c.stats.builds.load(Ordering::Relaxed), 1);

        // Replaced in place with other bytes of the same size (same inode, new times):
        // neither level is used; the named SHA-256 must be the new one.
        let mut changed = data.clone();
        changed[4321] ^= 0xff;
        rewrite(&img, &changed, 1_000_000);
        let err = get(&c, &cache_dir, &img, &sha, n).unwrap_err();
        assert!(err.to_string().contains("not the image the session names"), "{err}");
        let new_sha = sha_hex(&changed);
        let rebuilt = get(&c, &cache_dir, &img, &new_sha, n).unwrap();
        assert_eq!(rebuilt.origin, HashOrigin::Built);
        assert_eq!(rebuilt.hashes[43], block_hash(&changed[4300..4400]));
        assert_ne!(rebuilt.hashes[43], first.hashes[43]);
        assert_eq!(c.stats.builds.load(Ordering::Relaxed), 3);
        let fresh = HashCache::new(LIMITS);
        assert_eq!(get(&fresh, &cache_dir, &img, &new_sha, n).unwrap().origin, HashOrigin::Disk);

        // Back to the old bytes under the old name: the file's times changed, so its
        // kept hashes (same SHA-256, older file) are not trusted; rebuilt.
        rewrite(&img, &data, 2_000_000);
        let fresh = HashCache::new(LIMITS);
        let again = get(&fresh, &cache_dir, &img, &sha, n).unwrap();
        assert_eq!(again.origin, HashOrigin::Built);
        assert_eq!(again.hashes, first.hashes);

        // Another file with the same bytes (another inode): its own build.
        let copy = image(t.path(), "b.img", &data);
        assert_eq!(get(&fresh, &cache_dir, &copy, &sha, n).unwrap().origin, HashOrigin::Built);
        // The session's size must be the file's.
        assert!(get(&fresh, &cache_dir, &copy, &sha, n - 1).is_err());
    }

    #[test]
    fn a_corrupt_cache_file_is_rebuilt() {
        let t = tempfile::tempdir().unwrap();
        let cache_dir = t.path().join("hashes");
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let sha = sha_hex(&data);
        let img = image(t.path(), "a.img", &data);
        let c = HashCache::new(LIMITS);
        get(&c, &cache_dir, &img, &sha, 3000).unwrap();
        let kept = cache_dir.join(format!("{sha}-100{SUFFIX}"));
        let mut bytes = std::fs::read(&kept).unwrap();
        let last = bytes.len() - 40;
        bytes[last] ^= 1;
        std::fs::write(&kept, &bytes).unwrap();
        let fresh = HashCache::new(LIMITS);
        let h = get(&fresh, &cache_dir, &img, &sha, 3000).unwrap();
        assert_eq!(h.origin, HashOrigin::Built);
        assert_eq!(h.hashes[29], block_hash(&data[2900..]));
        assert_eq!(fresh.stats.stale.load(Ordering::Relaxed), 1);
        // And written again, whole.
        let fresh = HashCache::new(LIMITS);
        assert_eq!(get(&fresh, &cache_dir, &img, &sha, 3000).unwrap().origin, HashOrigin::Disk);
    }

    #[test]
    fn both_levels_stay_within_their_limits() {
        let t = tempfile::tempdir().unwrap();
        let cache_dir = t.path().join("hashes");
        let limits = Limits { memory_entries: 2, disk_files: 3, ..LIMITS };
        let c = HashCache::new(limits);
        let mut images = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 1000];
            let sha = sha_hex(&data);
            let p = image(t.path(), &format!("{i}.img"), &data);
            assert_eq!(get(&c, &cache_dir, &p, &sha, 1000).unwrap().origin, HashOrigin::Built);
            images.push((p, sha));
        }
        let files = std::fs::read_dir(&cache_dir).unwrap().count();
        assert_eq!(files, 3);
        assert_eq!(c.stats.disk_evictions.load(Ordering::Relaxed), 2);
        assert_eq!(c.stats.memory_evictions.load(Ordering::Relaxed), 3);
        // The last two are in memory, the third last on disk, the first two nowhere.
        let origin = |i: usize| get(&c, &cache_dir, &images[i].0, &images[i].1, 1000).unwrap().origin;
        assert_eq!(origin(4), HashOrigin::Memory);
        assert_eq!(origin(3), HashOrigin::Memory);
        assert_eq!(origin(2), HashOrigin::Disk);
        assert_eq!(origin(0), HashOrigin::Built);
    }

    #[test]
    fn hashes_of_a_file_changed_just_now_are_not_kept() {
        let t = tempfile::tempdir().unwrap();
        let cache_dir = t.path().join("hashes");
        let data = vec![9u8; 1000];
        let sha = sha_hex(&data);
        let img = image(t.path(), "a.img", &data);
        let c = HashCache::new(Limits { settle: Duration::from_secs(3600), ..LIMITS });
        assert_eq!(get(&c, &cache_dir, &img, &sha, 1000).unwrap().origin, HashOrigin::Built);
        assert_eq!(get(&c, &cache_dir, &img, &sha, 1000).unwrap().origin, HashOrigin::Built);
        assert!(!cache_dir.exists());
    }
}

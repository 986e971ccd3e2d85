//! Copy-on-write overlays: a client's writes over a shared, read-only image.
//!
//! An overlay is a sparse data file as large as the image (a block's data lives at the same
//! offset as in the image) plus a block map, one bit per block: set means "read this block
//! from the overlay". Reads merge the two; the image file is only ever opened read-only.
//! A write that covers part of a block not yet in the overlay first copies that block from
//! the image (read-modify-write), so a mapped block is always whole.
//!
//! Two modes:
//! - [`OverlayMode::Standard`]: the data file is unlinked as soon as it is created and the
//!   map lives in memory only: everything is gone when the overlay is dropped (the client
//!   disconnects) or the server stops, crash or not. FLUSH has nothing to make durable.
//! - [`OverlayMode::Private`]: `<dir>/data` and `<dir>/map` persist across disconnects and
//!   restarts. The map on disk is a journal: a header, then records of block ranges that
//!   became mapped, each with a CRC32. FLUSH (and FUA) runs `fdatasync(data)`, then appends
//!   one record for the blocks mapped since the last flush and `fdatasync`s the journal. On
//!   open only whole records with a valid CRC count (a torn tail is cut off), so after a
//!   crash every block acknowledged before a completed FLUSH is mapped and holds its data,
//!   and no block is mapped whose data was not synced first. Blocks written but not flushed
//!   before a crash read from the image again (their data-file bytes are ignored and
//!   overwritten whole on the next write). The journal is compacted (rewritten as one record
//!   via temp file, fsync, rename, fsync of the directory) when it has grown and on close.
//!   `<dir>/lock` is held with `flock` so two servers never share one private overlay.

use crate::blockfile::BlockFile;
use crate::device::{check_range, BlockDevice, Extents, FileRun, ZeroMode};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// How long opening a private overlay waits for this process's own release of it.
const PRIVATE_LOCK_WAIT_MS: u64 = 500;

/// The default block size of new overlays (copy-on-write granularity).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;

const MAP_MAGIC: &[u8; 8] = b"FBOVMAP1";
const MAP_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const RECORD_MAGIC: u32 = 0x5245_4331; // "REC1"
/// Compact the journal on open when it holds more records than this.
const COMPACT_RECORDS: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverlayMode {
    /// Discarded when the client's last connection closes.
    Standard,
    /// Kept per client across reconnects, reboots and server restarts.
    Private,
}

impl FromStr for OverlayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "standard" => Ok(OverlayMode::Standard),
            "private" => Ok(OverlayMode::Private),
            _ => Err(format!(
                "unknown overlay mode {s:?} (expected \"standard\" or \"private\")"
            )),
        }
    }
}

impl std::fmt::Display for OverlayMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverlayMode::Standard => "standard",
            OverlayMode::Private => "private",
        })
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Block ranges `[a, b)` → how many blocks they cover together.
fn count_blocks(ranges: &[(u64, u64)]) -> u64 {
    let mut v = ranges.to_vec();
    v.sort_unstable();
    let (mut n, mut end) = (0, 0);
    for (a, b) in v {
        let a = a.max(end);
        if b > a {
            n += b - a;
            end = b;
        }
    }
    n
}

/// The private overlay's map journal.
#[derive(Debug)]
struct Journal {
    dir: PathBuf,
    file: File,
    len: u64,
    records: u64,
    broken: bool,
}

fn header(block: u32, size: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAP_MAGIC);
    h[8..12].copy_from_slice(&MAP_VERSION.to_be_bytes());
    h[12..16].copy_from_slice(&block.to_be_bytes());
    h[16..24].copy_from_slice(&size.to_be_bytes());
    let crc = crc32fast::hash(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_be_bytes());
    h
}

fn record(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut r = Vec::with_capacity(12 + ranges.len() * 16);
    r.extend_from_slice(&RECORD_MAGIC.to_be_bytes());
    r.extend_from_slice(&(ranges.len() as u32).to_be_bytes());
    for &(a, b) in ranges {
        r.extend_from_slice(&a.to_be_bytes());
        r.extend_from_slice(&(b - a).to_be_bytes());
    }
    let crc = crc32fast::hash(&r);
    r.extend_from_slice(&crc.to_be_bytes());
    r
}

/// Replays a journal: the mapped block ranges, the length of its valid prefix, and its
/// record count. A header that does not match is an error; a torn or corrupt record ends
/// the replay.
type Replayed = (Vec<(u64, u64)>, u64, u64);

fn replay(bytes: &[u8], block: u32, size: u64, nblocks: u64) -> io::Result<Replayed> {
    if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != header(block, size) {
        return Err(invalid(
            "overlay map header does not match this image (size or block size)",
        ));
    }
    let mut map = Vec::new();
    let mut pos = HEADER_LEN;
    let mut records = 0;
    loop {
        let rest = &bytes[pos..];
        if rest.len() < 12 {
            break;
        }
        let magic = u32::from_be_bytes(rest[..4].try_into().unwrap());
        let n = u32::from_be_bytes(rest[4..8].try_into().unwrap()) as usize;
        let Some(body) = n.checked_mul(16).and_then(|b| b.checked_add(8)) else {
            break;
        };
        if magic != RECORD_MAGIC || rest.len() < body + 4 {
            break;
        }
        let crc = u32::from_be_bytes(rest[body..body + 4].try_into().unwrap());
        if crc32fast::hash(&rest[..body]) != crc {
            break;
        }
        let mut ok = true;
        let mut ranges = Vec::with_capacity(n);
        for k in 0..n {
            let e = &rest[8 + k * 16..8 + k * 16 + 16];
            let a = u64::from_be_bytes(e[..8].try_into().unwrap());
            let l = u64::from_be_bytes(e[8..].try_into().unwrap());
            match a.checked_add(l) {
                Some(b) if b <= nblocks && l > 0 => ranges.push((a, b)),
                _ => ok = false,
            }
        }
        if !ok {
            break;
        }
        map.extend(ranges);
        pos += body + 4;
        records += 1;
    }
    Ok((map, pos as u64, records))
}

impl Journal {
    /// Writes a fresh journal holding `map` (temp file, fsync, rename, fsync dir).
    fn write_snapshot(
        dir: &Path,
        block: u32,
        size: u64,
        ranges: &[(u64, u64)],
    ) -> io::Result<Journal> {
        let tmp = dir.join("map.tmp");
        let path = dir.join("map");
        let mut bytes = header(block, size).to_vec();
        let mut records = 0;
        if !ranges.is_empty() {
            bytes.extend_from_slice(&record(ranges));
            records = 1;
        }
        {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all_at(&bytes, 0)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        fsync_dir(dir)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            file,
            len: bytes.len() as u64,
            records,
            broken: false,
        })
    }

    fn append(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other("overlay map journal failed earlier"));
        }
        let r = record(ranges);
        let res = self
            .file
            .write_all_at(&r, self.len)
            .and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.len += r.len() as u64;
                self.records += 1;
                Ok(())
            }
            Err(e) => {
                // Cut a torn record off so later records are not hidden behind it.
                if self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data())
                    .is_err()
                {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }
}

/// A client's copy-on-write overlay over a read-only disk (a catalog image, or the
/// streaming agent's image being received).
#[derive(Debug)]
pub struct Overlay {
    mode: OverlayMode,
    base: Arc<dyn BlockDevice>,
    size: u64,
    block: u64,
    /// The data file, and which of its blocks are mapped.
    map: BlockFile,
    /// Serializes writers (read-modify-write of a block must not interleave), held for
    /// writing; BLOCK_STATUS holds it for reading while it learns which blocks hold no
    /// hole, so that no punch falls between the question and the answer.
    writer: std::sync::RwLock<()>,
    /// Block ranges mapped since the last persisted flush (private mode).
    dirty: Mutex<Vec<(u64, u64)>>,
    journal: Option<Mutex<Journal>>,
    _lock: Option<File>,
    /// Blocks the client may map at most (see [`Overlay::with_quota`]).
    quota_blocks: u64,
    /// Mapped blocks whose bytes in the data file may include a hole (see [`HoleHints`]).
    holes: HoleHints,
    /// The data file's file system answers `FIEMAP` (cleared at the first refusal).
    fiemap_works: std::sync::atomic::AtomicBool,
}

/// Which blocks of an overlay's data file may hold a hole: those whose bytes were punched
/// (WRITE_ZEROES that may trim, TRIM), and every mapped block of a private overlay opened
/// from disk until a BLOCK_STATUS has looked at it. Every other mapped block is data
/// throughout — a block is mapped by writing all of it — so BLOCK_STATUS says so from
/// memory instead of asking the file system twice per run of blocks (`SEEK_DATA`,
/// `SEEK_HOLE`). A hint cleared too eagerly costs precision only: "data" (flags 0) is always
/// a correct answer; a hole is only ever reported after the file system said so.
#[derive(Debug)]
struct HoleHints {
    words: Vec<std::sync::atomic::AtomicU64>,
    blocks: u64,
}

impl HoleHints {
    fn new(blocks: u64) -> HoleHints {
        HoleHints { words: (0..blocks.div_ceil(64)).map(|_| Default::default()).collect(), blocks }
    }
    /// Blocks `[a, b)` may hold holes.
    fn set(&self, a: u64, b: u64) {
        use std::sync::atomic::Ordering;
        let b = b.min(self.blocks);
        let mut i = a;
        while i < b {
            let lo = i % 64;
            let hi = (b - (i - lo)).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            self.words[(i / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            i = i - lo + hi;
        }
    }
    /// Block `b` is data throughout.
    fn clear(&self, b: u64) {
        if b < self.blocks {
            self.words[(b / 64) as usize].fetch_and(!(1u64 << (b % 64)), std::sync::atomic::Ordering::AcqRel);
        }
    }
    /// From block `i`: whether it may hold a hole, and where the run of blocks in the same
    /// state ends (at most `limit`).
    fn run_end(&self, i: u64, limit: u64) -> (bool, u64) {
        crate::blockfile::bits_run_end(&self.words, self.blocks, i, limit)
    }
}

/// How many of the base's extents one BLOCK_STATUS of an overlay asks for at a time.
const BASE_EXTENTS: usize = 1024;

/// The base's `base:allocation` extents for one BLOCK_STATUS of an overlay: asked once from
/// where the first unmapped block lies to the end of the request (again only when a later
/// unmapped block lies past what the base described), instead of once per run of unmapped
/// blocks.
struct BaseExtents {
    list: Extents,
    /// Where `list` starts and ends.
    start: u64,
    end: u64,
    /// The extent of `list` at or before the last position looked up, and where it starts.
    at: usize,
    at_start: u64,
}

impl BaseExtents {
    fn new() -> BaseExtents {
        BaseExtents { list: Extents::new(BASE_EXTENTS), start: 0, end: 0, at: 0, at_start: 0 }
    }

    /// The base's flags at `pos` and where they end (at most `end`, past `pos`).
    fn at(&mut self, base: &dyn BlockDevice, pos: u64, end: u64) -> io::Result<(u32, u64)> {
        if pos < self.start || pos >= self.end {
            self.list.reset(BASE_EXTENTS);
            base.block_status(pos, (end - pos) as u32, &mut self.list)?;
            (self.start, self.end) = (pos, pos + self.list.covered());
            (self.at, self.at_start) = (0, pos);
            if self.end <= pos {
                // The base described nothing: "data" is always true.
                return Ok((0, end));
            }
        }
        if pos < self.at_start {
            (self.at, self.at_start) = (0, self.start);
        }
        let list = self.list.as_slice();
        while self.at < list.len() {
            let (len, flags) = list[self.at];
            let next = self.at_start + len as u64;
            if pos < next {
                return Ok((flags, next.min(end)));
            }
            self.at += 1;
            self.at_start = next;
        }
        Ok((0, end))
    }
}

/// Creates `dir` and every missing parent so that they survive a power failure: each new
/// directory's entry is made durable by an fsync of the directory that holds it.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.as_os_str().is_empty() && !at.exists() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

static QUOTA_LOGGED: crate::limits::LogEvery = crate::limits::LogEvery::new(std::time::Duration::from_secs(10));

impl Overlay {
    /// Calls `read_run(mapped, offset, buf)` for each run of blocks that lie all in the
    /// overlay or all in the base, in order, stopping at the first `Ok(false)`.
    fn read_runs(
        &self,
        offset: u64,
        buf: &mut [u8],
        mut read_run: impl FnMut(bool, u64, &mut [u8]) -> io::Result<bool>,
    ) -> io::Result<bool> {
        check_range(self.size, offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block;
            let last = (end - 1) / self.block + 1;
            let (mapped, e) = self.map.run_end(b, last);
            let run_end = (e * self.block).min(end);
            if !read_run(mapped, pos, &mut buf[(pos - offset) as usize..(run_end - offset) as usize])? {
                return Ok(false);
            }
            pos = run_end;
        }
        Ok(true)
    }

    /// A standard (throw-away) overlay over `base`: its data file is created in `tmp_dir`
    /// and unlinked at once, so nothing outlives the overlay, not even after a crash.
    pub fn standard(base: Arc<dyn BlockDevice>, block: u32, tmp_dir: &Path) -> io::Result<Overlay> {
        check_block(block)?;
        fs::create_dir_all(tmp_dir)?;
        let size = base.size();
        let data = tempfile_in(tmp_dir)?;
        data.set_len(size)?;
        Ok(Overlay {
            mode: OverlayMode::Standard,
            base,
            size,
            block: block as u64,
            map: BlockFile::new(data, size, block)?,
            writer: std::sync::RwLock::new(()),
            dirty: Mutex::new(Vec::new()),
            journal: None,
            _lock: None,
            quota_blocks: u64::MAX,
            holes: HoleHints::new(size.div_ceil(block as u64)),
            fiemap_works: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Opens (or creates) the private overlay over `base` in `dir`. Fails when another
    /// process holds it, or when its map was made for an image of another size or another
    /// block size.
    pub fn private(base: Arc<dyn BlockDevice>, block: u32, dir: &Path) -> io::Result<Overlay> {
        check_block(block)?;
        let size = base.size();
        create_dir_durably(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        // A client that reconnects at once can find its previous connection's overlay still
        // closing (the release flushes on the disk threads, then drops the lock): wait for
        // that briefly before calling the overlay taken.
        let mut waited = 0;
        // SAFETY: flock on an fd we own.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if waited >= PRIVATE_LOCK_WAIT_MS {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "private overlay in use by another process",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 10;
        }
        let nblocks = size.div_ceil(block as u64);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("data"))?;
        let map_path = dir.join("map");
        let (ranges, journal) = match fs::read(&map_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                data.set_len(size)?;
                data.sync_all()?;
                let j = Journal::write_snapshot(dir, block, size, &[])?;
                (Vec::new(), j)
            }
            Err(e) => return Err(e),
            Ok(bytes) => {
                let (ranges, valid, records) = replay(&bytes, block, size, nblocks)?;
                if data.metadata()?.len() != size {
                    data.set_len(size)?;
                }
                let j = if valid as usize != bytes.len() || records > COMPACT_RECORDS {
                    if valid as usize != bytes.len() {
                        tracing::warn!(dir = %dir.display(), dropped = bytes.len() as u64 - valid, "overlay map: torn tail dropped");
                    }
                    Journal::write_snapshot(dir, block, size, &ranges)?
                } else {
                    let file = OpenOptions::new().read(true).write(true).open(&map_path)?;
                    Journal {
                        dir: dir.to_path_buf(),
                        file,
                        len: valid,
                        records,
                        broken: false,
                    }
                };
                (ranges, j)
            }
        };
        let map = BlockFile::new(data, size, block)?;
        // What was punched before this open is not recorded: every mapped block may hold
        // a hole until BLOCK_STATUS has looked.
        let holes = HoleHints::new(nblocks);
        let mut scratch = Vec::new();
        for (a, b) in ranges {
            map.mark(a, b, &mut scratch);
            holes.set(a, b);
        }
        Ok(Overlay {
            mode: OverlayMode::Private,
            base,
            size,
            block: block as u64,
            map,
            writer: std::sync::RwLock::new(()),
            dirty: Mutex::new(Vec::new()),
            journal: Some(Mutex::new(journal)),
            _lock: Some(lock),
            quota_blocks: u64::MAX,
            holes,
            fiemap_works: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Caps the bytes of blocks the overlay may map (`None`: no cap beyond the image). A
    /// write that would map blocks past the cap fails with ENOSPC and changes nothing;
    /// blocks already mapped stay writable. Trimmed blocks still count: they stay mapped.
    pub fn with_quota(mut self, bytes: Option<u64>) -> Overlay {
        self.quota_blocks = bytes.map_or(u64::MAX, |b| b / self.block);
        self
    }

    /// Fails with ENOSPC when mapping the blocks `first..=last` would pass the quota.
    fn check_quota(&self, first: u64, last: u64) -> io::Result<()> {
        if self.quota_blocks == u64::MAX {
            return Ok(());
        }
        let mut new = 0;
        let mut b = first;
        while b <= last {
            let (mapped, e) = self.map.run_end(b, last + 1);
            if !mapped {
                new += e - b;
            }
            b = e;
        }
        if new > 0 && self.map.present() + new > self.quota_blocks {
            metrics::counter!("fleetboot_nbd_overlay_quota_refusals_total").increment(1);
            if let Some(held_back) = QUOTA_LOGGED.allow() {
                tracing::warn!(quota_bytes = self.quota_blocks * self.block, held_back, "a client's overlay is full (nbd.overlay_quota_mib); its write fails with ENOSPC");
            }
            return Err(io::Error::new(io::ErrorKind::StorageFull, "the client's overlay quota is used up"));
        }
        Ok(())
    }

    pub fn mode(&self) -> OverlayMode {
        self.mode
    }
    /// How many blocks hold overlay data.
    pub fn mapped_blocks(&self) -> u64 {
        self.map.present()
    }
    pub fn is_mapped(&self, block: u64) -> bool {
        self.map.has(block)
    }
    /// How many blocks BLOCK_STATUS would still ask the file system about (see
    /// [`HoleHints`]).
    #[cfg(test)]
    fn hinted_blocks(&self) -> u64 {
        self.holes.words.iter().map(|w| w.load(std::sync::atomic::Ordering::Relaxed).count_ones() as u64).sum()
    }

    /// The disk under the overlay.
    pub fn base(&self) -> &Arc<dyn BlockDevice> {
        &self.base
    }

    /// Copies block `b` from the base into the overlay with `patch` laid over it at `at`
    /// (or `zero_len` zero bytes when `patch` is None).
    fn copy_up(&self, b: u64, at: u64, patch: Option<&[u8]>, zero_len: u64) -> io::Result<()> {
        let start = b * self.block;
        let mut buf = vec![0u8; self.map.block_len(b) as usize];
        self.base.read(start, &mut buf)?;
        let rel = (at - start) as usize;
        match patch {
            Some(p) => buf[rel..rel + p.len()].copy_from_slice(p),
            None => buf[rel..rel + zero_len as usize].fill(0),
        }
        self.map.write_at(start, &buf)
    }

    fn mark(&self, a: u64, b: u64) {
        let mut newly = Vec::new();
        self.map.mark(a, b, &mut newly);
        if self.journal.is_some() && !newly.is_empty() {
            self.dirty.lock().unwrap().extend(newly);
        }
    }

    /// Writes `data` at `offset`, or `len` zero bytes when `data` is None (whole blocks then
    /// become holes when `punch`).
    fn write_inner(&self, offset: u64, data: Option<&[u8]>, len: u64, punch: bool) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _w = self.writer.write().unwrap();
        let end = offset + len;
        let first = offset / self.block;
        let last = (end - 1) / self.block;
        self.check_quota(first, last)?;
        let mut direct = (offset, end);
        let part = |a: u64, b: u64| data.map(|d| &d[(a - offset) as usize..(b - offset) as usize]);
        // A partial head block not yet in the overlay: copy it up with the new bytes.
        if (offset % self.block != 0 || end < self.map.block_end(first)) && !self.map.has(first) {
            let e = end.min(self.map.block_end(first));
            self.copy_up(first, offset, part(offset, e), e - offset)?;
            direct.0 = e;
        }
        // A partial tail block (another block than the head) not yet in the overlay.
        if last != first && end < self.map.block_end(last) && !self.map.has(last) {
            let s = last * self.block;
            self.copy_up(last, s, part(s, end), end - s)?;
            direct.1 = s;
        }
        let (a, b) = direct;
        if a < b {
            match data {
                Some(_) => self.map.write_at(a, part(a, b).expect("data"))?,
                None if punch => {
                    // Whole blocks become holes; partial (already mapped) ends get zeros.
                    let fa = a.div_ceil(self.block) * self.block;
                    let fb = if b == self.size {
                        b
                    } else {
                        b / self.block * self.block
                    };
                    if fa < fb {
                        self.holes.set(fa / self.block, fb.div_ceil(self.block));
                        self.map.punch(fa, fb - fa)?;
                        self.map.write_zeros(a, fa - a)?;
                        self.map.write_zeros(fb, b - fb)?;
                    } else {
                        self.map.write_zeros(a, b - a)?;
                    }
                }
                None => self.map.write_zeros(a, b - a)?,
            }
        }
        self.mark(first, last + 1);
        Ok(())
    }

    /// Flushes and, in private mode, compacts the journal: for a clean close.
    pub fn close(&self) -> io::Result<()> {
        self.flush()?;
        if let Some(journal) = &self.journal {
            let mut j = journal.lock().unwrap();
            if j.records > 1 {
                let ranges = self.map.ranges();
                let block = self.block as u32;
                *j = Journal::write_snapshot(&j.dir.clone(), block, self.size, &ranges)?;
            }
        }
        Ok(())
    }
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> u32 {
        self.block as u32
    }

    /// Overlay blocks from the overlay, the rest from the base.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_runs(offset, buf, |mapped, pos, dst| {
            if mapped {
                self.map.read_at(pos, dst)?;
            } else {
                self.base.read(pos, dst)?;
            }
            Ok(true)
        })
        .map(drop)
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.read_runs(offset, buf, |mapped, pos, dst| {
            if mapped { self.map.read_at_cached(pos, dst) } else { self.base.read_cached(pos, dst) }
        })
    }

    /// Overlay blocks from the overlay's file (they sit at their own offsets in it), the
    /// rest from the base's.
    fn cached_file_runs<'a>(&'a self, offset: u64, len: u64, runs: &mut Vec<FileRun<'a>>) -> bool {
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.size && len > 0) else {
            return false;
        };
        let last = (end - 1) / self.block + 1;
        let mut pos = offset;
        while pos < end {
            let (mapped, e) = self.map.run_end(pos / self.block, last);
            let run_end = (e * self.block).min(end);
            let ok = if mapped {
                self.map.cached_run(pos, run_end - pos).map(|r| runs.push(r)).is_some()
            } else {
                self.base.cached_file_runs(pos, run_end - pos, runs)
            };
            if !ok {
                return false;
            }
            pos = run_end;
        }
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_inner(offset, Some(data), data.len() as u64, false)
    }

    /// Whole blocks become holes in the overlay (explicit zeros with `NO_HOLE`); partial
    /// blocks are copied up and zeroed. Fast zeroing is refused when holes are not allowed:
    /// writing zeros is a write.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if mode.fast && !mode.may_trim {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "zeroing without holes is no faster than writing",
            ));
        }
        self.write_inner(offset, None, len, mode.may_trim)
    }

    /// Blocks wholly inside the range that are in the overlay become holes (they read as
    /// zeros); the rest is left alone, which TRIM allows.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let _w = self.writer.write().unwrap();
        let end = offset + len;
        let b0 = offset.div_ceil(self.block);
        let b1 = if end == self.size {
            self.map.blocks()
        } else {
            end / self.block
        };
        let mut b = b0;
        while b < b1 {
            let (mapped, e) = self.map.run_end(b, b1);
            if mapped {
                let start = b * self.block;
                self.holes.set(b, e);
                self.map.punch(start, self.map.block_end(e - 1) - start)?;
            }
            b = e;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable (private mode): `fdatasync` of the data, then
    /// one journal record for newly mapped blocks, `fdatasync`ed. Standard mode: nothing.
    fn flush(&self) -> io::Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let mut j = journal.lock().unwrap();
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap());
        let res = self.map.file().sync_data().and_then(|()| {
            if dirty.is_empty() {
                Ok(())
            } else {
                j.append(&dirty)
            }
        });
        if let Err(e) = res {
            let mut d = self.dirty.lock().unwrap();
            let newer = std::mem::take(&mut *d);
            *d = dirty;
            d.extend(newer);
            return Err(e);
        }
        Ok(())
    }

    /// Prefetches the parts the overlay does not hold from the base.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (mapped, e) = self.map.run_end(pos / self.block, self.map.blocks());
            let run_end = (e * self.block).min(end);
            if !mapped {
                self.base.cache(pos, run_end - pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Overlay blocks report the overlay file's allocation (zeroed blocks are holes);
    /// elsewhere the base says. Blocks that cannot hold a hole ([`HoleHints`]) are data
    /// without a question to the file system, and the base is asked once for the whole
    /// request rather than once per run of its blocks: an overlay with every other block
    /// written answers as fast as the image alone.
    fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
        check_range(self.size, offset, len as u64)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len as u64;
        let last = (end - 1) / self.block + 1;
        let mut base = BaseExtents::new();
        let mut learnt = false;
        let mut pos = offset;
        while pos < end {
            let (mapped, e) = self.map.run_end(pos / self.block, last);
            let run_end = (e * self.block).min(end);
            while pos < run_end {
                let (status, next) = if mapped {
                    self.mapped_status(pos, run_end, end, &mut learnt)
                } else {
                    base.at(&*self.base, pos, end)?
                };
                let next = next.clamp(pos + 1, run_end);
                if !out.push((next - pos) as u32, status) {
                    return Ok(());
                }
                pos = next;
            }
        }
        Ok(())
    }
}

impl Overlay {
    /// The `base:allocation` state of mapped bytes from `pos` (before `run_end`, the end of
    /// their run of mapped blocks), and where it ends. The first block of a request that
    /// may hold a hole has the data file's extents up to `request_end` looked up at once
    /// (`learnt` says it was done).
    fn mapped_status(&self, pos: u64, run_end: u64, request_end: u64, learnt: &mut bool) -> (u32, u64) {
        let (mut maybe_hole, mut e) = self.holes.run_end(pos / self.block, run_end.div_ceil(self.block));
        if maybe_hole && !*learnt {
            *learnt = true;
            if self.learn_data_blocks(pos, request_end) {
                (maybe_hole, e) = self.holes.run_end(pos / self.block, run_end.div_ceil(self.block));
            }
        }
        let sub_end = (e * self.block).min(run_end);
        if !maybe_hole {
            return (0, sub_end);
        }
        // Blocks seen to be data throughout need not be asked again, as long as no writer
        // could punch them between the question and the answer: learn only while no writer
        // runs, and never wait for one. Asked for the next hole first: mapped blocks are
        // mostly data, and then that one question is the whole answer.
        let writers = self.writer.try_read().ok();
        let (status, next) = crate::blockfile::file_extent_data_first(self.map.file(), pos, sub_end);
        if writers.is_some() && status == 0 {
            let first = pos.div_ceil(self.block);
            let after = if next >= self.size { self.map.blocks() } else { next / self.block };
            for b in first..after {
                self.holes.clear(b);
            }
        }
        (status, next)
    }

    /// Clears the hole hints of the blocks of `[from, to)` (rounded out to blocks) that the
    /// data file's extents (`FIEMAP`, many per call) show to be written data throughout —
    /// after a private overlay is reopened, the question for a whole BLOCK_STATUS instead
    /// of one per run of written blocks. While no writer runs (other BLOCK_STATUS may),
    /// never waiting for one; false when nothing was learnt.
    fn learn_data_blocks(&self, from: u64, to: u64) -> bool {
        use std::sync::atomic::Ordering;
        if !self.fiemap_works.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(_writers) = self.writer.try_read() else {
            return false;
        };
        let start = from / self.block * self.block;
        let end = to.div_ceil(self.block).saturating_mul(self.block).min(self.size);
        let mut spans = Vec::new();
        match crate::blockfile::file_data_spans(self.map.file(), start, end, &mut spans) {
            Ok(true) => {}
            _ => {
                self.fiemap_works.store(false, Ordering::Relaxed);
                return false;
            }
        }
        for (a, b) in spans {
            let first = a.div_ceil(self.block);
            let after = if b >= self.size { self.map.blocks() } else { b / self.block };
            for blk in first..after.min(self.map.blocks()) {
                self.holes.clear(blk);
            }
        }
        true
    }
}

/// Whether `block` can be an overlay's copy-on-write block size: a power of two from 512 B
/// to 4 MiB.
pub fn block_size_ok(block: u32) -> bool {
    block.is_power_of_two() && (512..=(4 << 20)).contains(&block)
}

fn check_block(block: u32) -> io::Result<()> {
    if !block_size_ok(block) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "overlay block size must be a power of two in 512..=4 MiB",
        ));
    }
    Ok(())
}

/// A file in `dir` that no name refers to: O_TMPFILE, or create-and-unlink.
fn tempfile_in(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Ok(f) => Ok(f),
        Err(_) => {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = dir.join(format!("overlay-{}-{}", std::process::id(), n));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)?;
            fs::remove_file(&p)?;
            Ok(f)
        }
    }
}

/// What a private overlay's map journal says ([`replay_journal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalReplay {
    /// Block ranges `[a, b)` that are mapped, in journal order (they may overlap).
    pub ranges: Vec<(u64, u64)>,
    /// Bytes of the journal that are whole records with a valid CRC; the rest is a torn
    /// tail that opening the overlay cuts off.
    pub valid_len: u64,
    pub records: u64,
}

/// Replays the bytes of a private overlay's `map` for an image of `size` bytes in blocks of
/// `block`: what opening the overlay would map. Fails when the header is not this image's
/// (size, block size); a torn or corrupt record, or one naming blocks past the end, ends
/// the replay. Never panics on any bytes (fuzzed).
pub fn replay_journal(bytes: &[u8], block: u32, size: u64) -> io::Result<JournalReplay> {
    let nblocks = size.div_ceil(block.max(1) as u64);
    let (ranges, valid_len, records) = replay(bytes, block, size, nblocks)?;
    Ok(JournalReplay { ranges, valid_len, records })
}

/// A whole journal holding `ranges` (header and one record, as compaction writes it).
pub fn journal_bytes(block: u32, size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut bytes = header(block, size).to_vec();
    if !ranges.is_empty() {
        bytes.extend_from_slice(&record(ranges));
    }
    bytes
}

/// Checks a private overlay directory offline: `(mapped blocks, journal records, bytes of
/// torn tail)`. For tests and `fleetboot` diagnostics.
pub fn inspect_private(dir: &Path, image_size: u64, block: u32) -> io::Result<(u64, u64, u64)> {
    let bytes = fs::read(dir.join("map"))?;
    let nblocks = image_size.div_ceil(block as u64);
    let (ranges, valid, records) = replay(&bytes, block, image_size, nblocks)?;
    Ok((count_blocks(&ranges), records, bytes.len() as u64 - valid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::device::ImageFile;

    fn base(dir: &Path, size: usize) -> (Arc<dyn BlockDevice>, Vec<u8>) {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        let p = dir.join("base");
        fs::write(&p, &bytes).unwrap();
        let f = Arc::new(File::open(&p).unwrap());
        (Arc::new(ImageFile::new(f, size as u64)), bytes)
    }

    const ZERO: ZeroMode = ZeroMode {
        may_trim: true,
        fast: false,
    };

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
        Trim(u64, u64),
        Flush,
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..size, proptest::collection::vec(any::<u8>(), 1..5000)).prop_map(move |(o, d)| {
                let o = o.min(size - d.len() as u64);
                Op::Write(o, d)
            }),
            (0..size, 1..9000u64).prop_map(move |(o, l)| {
                let l = l.min(size - o);
                Op::Zero(o, l.max(1).min(size - o))
            }),
            (0..size, 1..9000u64).prop_map(move |(o, l)| Op::Trim(o, l.min(size - o))),
            Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The overlay behaves like a plain copy of the image under the same writes; the image
        /// never changes; a private overlay reopened after a flush reads the same.
        #[test]
        fn overlay_matches_a_model(ops in proptest::collection::vec(op(20_000), 1..30), private in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let size = 20_000usize; // not a multiple of the block size
            let (b, bytes) = base(dir.path(), size);
            let mut model = bytes.clone();
            let trimmed = std::cell::RefCell::new(vec![false; size]);
            let odir = dir.path().join("ov");
            let ov = if private { Overlay::private(b.clone(), 4096, &odir).unwrap() }
                     else { Overlay::standard(b.clone(), 4096, dir.path()).unwrap() };
            for o in &ops {
                match o {
                    Op::Write(off, d) => { ov.write(*off, d).unwrap(); model[*off as usize..*off as usize + d.len()].copy_from_slice(d); trimmed.borrow_mut()[*off as usize..*off as usize + d.len()].fill(false); }
                    Op::Zero(off, l) => { ov.write_zeroes(*off, *l, ZERO).unwrap(); model[*off as usize..(*off + *l) as usize].fill(0); trimmed.borrow_mut()[*off as usize..(*off + *l) as usize].fill(false); }
                    Op::Trim(off, l) => { ov.trim(*off, *l).unwrap(); trimmed.borrow_mut()[*off as usize..(*off + *l) as usize].fill(true); }
                    Op::Flush => ov.flush().unwrap(),
                }
            }
            let check = |ov: &Overlay| {
                let mut got = vec![0u8; size];
                ov.read(0, &mut got).unwrap();
                let t = trimmed.borrow();
                for i in 0..size {
                    if !t[i] { assert_eq!(got[i], model[i], "byte {i}"); }
                }
                // Unaligned reads agree with the whole read.
                let mut part = vec![0u8; 5000];
                ov.read(7777, &mut part).unwrap();
                assert_eq!(&part[..], &got[7777..12777]);
                // Read without waiting (everything was just written or read, so it is in
                // the page cache where the file system takes such reads): the same bytes.
                let mut cached = vec![0u8; size];
                if ov.read_cached(0, &mut cached).unwrap() {
                    assert_eq!(cached, got);
                } else {
                    assert!(!crate::device::nowait_reads_work(), "fresh data must be read without waiting");
                }
                // Where the bytes lie in files (what sendfile sends): runs that cover each
                // range exactly and hold the same bytes.
                for (off, len) in [(0u64, size as u64), (7777, 5000), (4095, 2), (size as u64 - 1, 1)] {
                    let mut runs = Vec::new();
                    if !ov.cached_file_runs(off, len, &mut runs) {
                        continue;
                    }
                    let mut from_runs = Vec::new();
                    for r in &runs {
                        let mut b = vec![0u8; r.len as usize];
                        r.file.read_exact_at(&mut b, r.offset).unwrap();
                        from_runs.extend_from_slice(&b);
                    }
                    assert_eq!(&from_runs[..], &got[off as usize..(off + len) as usize], "runs of {off}+{len}");
                }
                assert!(!ov.cached_file_runs(1, size as u64, &mut Vec::new()), "past the end");
            };
            check(&ov);
            prop_assert_eq!(fs::read(dir.path().join("base")).unwrap(), bytes.clone());
            if private {
                ov.flush().unwrap();
                drop(ov);
                let ov2 = Overlay::private(b.clone(), 4096, &odir).unwrap();
                check(&ov2);
                ov2.close().unwrap();
                drop(ov2);
                let ov3 = Overlay::private(b, 4096, &odir).unwrap();
                check(&ov3);
            }
        }
    }

    #[test]
    fn unflushed_blocks_fall_back_to_the_image_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (b, bytes) = base(dir.path(), 64 * 1024);
        let odir = dir.path().join("ov");
        let ov = Overlay::private(b.clone(), 4096, &odir).unwrap();
        ov.write(0, &[1u8; 4096]).unwrap();
        ov.flush().unwrap();
        ov.write(8192, &[2u8; 100]).unwrap(); // never flushed
                                              // Simulate a crash: forget the overlay without close (the lock goes with the fd).
        drop(ov);
        // And a torn record at the end of the journal.
        let mut j = OpenOptions::new()
            .append(true)
            .open(odir.join("map"))
            .unwrap();
        std::io::Write::write_all(&mut j, &RECORD_MAGIC.to_be_bytes()).unwrap();
        std::io::Write::write_all(&mut j, &[0, 0, 0, 1, 9, 9]).unwrap();
        drop(j);
        assert_eq!(inspect_private(&odir, 65536, 4096).unwrap(), (1, 1, 10));
        let ov = Overlay::private(b, 4096, &odir).unwrap();
        let mut got = vec![0u8; 65536];
        ov.read(0, &mut got).unwrap();
        assert_eq!(&got[..4096], &[1u8; 4096][..]);
        assert_eq!(&got[4096..], &bytes[4096..]);
        assert_eq!(
            inspect_private(&odir, 65536, 4096).unwrap(),
            (1, 1, 0),
            "tail cut on open"
        );
    }

    #[test]
    fn a_private_overlay_is_locked_and_checks_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = base(dir.path(), 8192);
        let odir = dir.path().join("ov");
        let ov = Overlay::private(b.clone(), 4096, &odir).unwrap();
        // flock is per open file description: a second open in this process conflicts too.
        assert!(Overlay::private(b.clone(), 4096, &odir).is_err());
        drop(ov);
        fs::create_dir(dir.path().join("small")).unwrap();
        let (small, _) = base(&dir.path().join("small"), 4096);
        assert!(
            Overlay::private(small, 4096, &odir).is_err(),
            "size differs"
        );
        assert!(
            Overlay::private(b, 512, &odir).is_err(),
            "block size differs"
        );
    }

    #[test]
    fn extents_merge_overlay_and_image_holes() {
        use crate::proto::state;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 0).unwrap();
        drop(f);
        let b: Arc<dyn BlockDevice> =
            Arc::new(ImageFile::new(Arc::new(File::open(&p).unwrap()), 1 << 20));
        let ov = Overlay::standard(b, 65536, dir.path()).unwrap();
        ov.write(512 << 10, &[5u8; 10]).unwrap();
        let mut out = Extents::new(100);
        ov.block_status(0, 1 << 20, &mut out).unwrap();
        let h = state::HOLE | state::ZERO;
        assert_eq!(
            out.as_slice(),
            [(65536, 0), (448 << 10, h), (65536, 0), (448 << 10, h)]
        );
        let mut out = Extents::new(1);
        ov.block_status(0, 1 << 20, &mut out).unwrap();
        assert_eq!(out.as_slice(), [(65536, 0)]);
        // Zeroed overlay blocks are holes again; with NO_HOLE they are allocated zeros.
        ov.write_zeroes(512 << 10, 65536, ZERO).unwrap();
        ov.write_zeroes(0, 65536, ZeroMode { may_trim: false, fast: false }).unwrap();
        assert!(ov.is_mapped(8) && ov.is_mapped(0));
        let mut out = Extents::new(100);
        ov.block_status(0, 1 << 20, &mut out).unwrap();
        assert_eq!(out.as_slice(), [(65536, 0), ((1 << 20) - 65536, h)]);
        let mut z = vec![1u8; 65536];
        ov.read(0, &mut z).unwrap();
        assert!(z.iter().all(|b| *b == 0));
        // Fast zeroing that would have to write is refused, and changes nothing.
        let e = ov
            .write_zeroes(65536, 4096, ZeroMode { may_trim: false, fast: true })
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(!ov.is_mapped(1));
    }

    /// BLOCK_STATUS as it was answered before [`HoleHints`] and [`BaseExtents`]: the file
    /// system asked for every run of mapped blocks, the base for every run of unmapped
    /// ones. The reference the faster answer must match, extent for extent.
    fn block_status_per_run(ov: &Overlay, offset: u64, len: u32, out: &mut Extents) {
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end && !out.is_full() {
            let (mapped, e) = ov.map.run_end(pos / ov.block, ov.map.blocks());
            let run_end = (e * ov.block).min(end);
            if mapped {
                while pos < run_end {
                    let (status, next) = ov.map.extent(pos, run_end);
                    if !out.push((next - pos) as u32, status) {
                        return;
                    }
                    pos = next;
                }
            } else {
                ov.base.block_status(pos, (run_end - pos) as u32, out).unwrap();
                pos = run_end;
            }
        }
    }

    /// Operations spanning several 16 KiB blocks, so that zeroing and trims punch whole
    /// blocks (a third of the zeroing without holes allowed).
    fn wide_op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..size, proptest::collection::vec(any::<u8>(), 1..40_000)).prop_map(move |(o, d)| {
                let o = o.min(size - d.len() as u64);
                Op::Write(o, d)
            }),
            (0..size, 1..70_000u64).prop_map(move |(o, l)| Op::Zero(o, l.min(size - o).max(1))),
            (0..size, 1..70_000u64).prop_map(move |(o, l)| Op::Trim(o, l.min(size - o))),
            Just(Op::Flush),
        ]
    }

    /// A base with holes: data only in the 4 KiB pages `data_pages` names.
    fn sparse_base(dir: &Path, size: u64, data_pages: &[u64]) -> (Arc<dyn BlockDevice>, Vec<u8>) {
        let p = dir.join("sparse-base");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        let mut bytes = vec![0u8; size as usize];
        for &pg in data_pages {
            let at = (pg * 4096) as usize;
            if at >= bytes.len() {
                continue;
            }
            let n = 4096.min(bytes.len() - at);
            let page: Vec<u8> = (0..n).map(|i| (i as u8) | 1).collect();
            f.write_all_at(&page, at as u64).unwrap();
            bytes[at..at + n].copy_from_slice(&page);
        }
        drop(f);
        (Arc::new(ImageFile::new(Arc::new(File::open(&p).unwrap()), size)), bytes)
    }

    /// Checks `ov`'s BLOCK_STATUS of `offset+len` (at most `max` extents) against the
    /// per-run reference, and that every byte it calls zero reads as zero.
    fn check_block_status(ov: &Overlay, offset: u64, len: u32, max: usize) {
        let mut got = Extents::new(max);
        ov.block_status(offset, len, &mut got).unwrap();
        let mut want = Extents::new(max);
        block_status_per_run(ov, offset, len, &mut want);
        assert_eq!(got.as_slice(), want.as_slice(), "{offset}+{len} max {max}");
        assert!(got.as_slice().iter().all(|e| e.0 > 0));
        if !got.is_full() {
            assert_eq!(got.covered(), len as u64, "{offset}+{len}: every byte described");
        }
        let mut bytes = vec![0u8; got.covered() as usize];
        ov.read(offset, &mut bytes).unwrap();
        let mut at = 0usize;
        for &(l, flags) in got.as_slice() {
            if flags & crate::proto::state::ZERO != 0 {
                assert!(bytes[at..at + l as usize].iter().all(|b| *b == 0), "{offset}+{len}: extent at {at} said zero");
            }
            at += l as usize;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Over a base with holes, after any writes, zeroing (with and without holes) and
        /// trims, BLOCK_STATUS of any range says what asking the file system run by run
        /// says — before and after it has learnt which blocks hold no hole, and after a
        /// private overlay is reopened, knowing nothing of its holes.
        #[test]
        fn block_status_matches_asking_run_by_run(
            ops in proptest::collection::vec(wide_op(300_000), 1..25),
            data_pages in proptest::collection::vec(0u64..80, 0..30),
            queries in proptest::collection::vec((0u64..300_000, 1u32..300_000, prop_oneof![Just(1usize), Just(3), Just(1024)]), 1..8),
            private in any::<bool>(),
        ) {
            let size = 300_000u64; // several blocks, the last one short
            let dir = tempfile::tempdir().unwrap();
            let (b, _) = sparse_base(dir.path(), size, &data_pages);
            let odir = dir.path().join("ov");
            let ov = if private { Overlay::private(b.clone(), 16384, &odir).unwrap() }
                     else { Overlay::standard(b.clone(), 16384, dir.path()).unwrap() };
            for o in &ops {
                match o {
                    Op::Write(off, d) => ov.write(*off, d).unwrap(),
                    Op::Zero(off, l) => ov.write_zeroes(*off, *l, ZeroMode { may_trim: off % 3 != 0, fast: false }).unwrap(),
                    Op::Trim(off, l) => ov.trim(*off, *l).unwrap(),
                    Op::Flush => ov.flush().unwrap(),
                }
            }
            let queries: Vec<_> = queries.into_iter().map(|(o, l, m)| (o, l.min((size - o) as u32).max(1), m)).collect();
            let check_all = |ov: &Overlay| {
                for &(o, l, m) in &queries {
                    check_block_status(ov, o, l, m);
                }
                check_block_status(ov, 0, size as u32, 1024);
            };
            check_all(&ov);
            // Once more: now from what the first pass learnt.
            check_all(&ov);
            if private {
                ov.close().unwrap();
                drop(ov);
                let ov = Overlay::private(b, 16384, &odir).unwrap();
                prop_assert_eq!(ov.hinted_blocks(), ov.mapped_blocks(), "reopened: nothing known of holes");
                check_all(&ov);
                check_all(&ov);
            }
        }
    }

    /// A base that counts the BLOCK_STATUS questions it is asked.
    #[derive(Debug)]
    struct CountingBase {
        inner: Arc<dyn BlockDevice>,
        block_status_calls: std::sync::atomic::AtomicU64,
    }

    impl BlockDevice for CountingBase {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.inner.write(offset, data)
        }
        fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
            self.inner.write_zeroes(offset, len, mode)
        }
        fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.trim(offset, len)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u32, out: &mut Extents) -> io::Result<()> {
            self.block_status_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.block_status(offset, len, out)
        }
    }

    #[test]
    fn block_status_of_every_other_block_asks_the_base_once_and_learns_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let (inner, _) = base(dir.path(), size as usize);
        let counting = Arc::new(CountingBase { inner, block_status_calls: Default::default() });
        let b: Arc<dyn BlockDevice> = counting.clone();
        let odir = dir.path().join("ov");
        let ov = Overlay::private(b.clone(), 65536, &odir).unwrap();
        for blk in (0..size / 65536).step_by(2) {
            ov.write(blk * 65536, &[0x5a; 65536]).unwrap();
        }
        // Written whole, so known to be data: nothing to ask the file system.
        assert_eq!(ov.hinted_blocks(), 0);
        let calls = || counting.block_status_calls.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = Extents::new(1024);
        ov.block_status(0, size as u32, &mut out).unwrap();
        assert_eq!(out.as_slice(), [(size as u32, 0)], "all data, one extent");
        assert_eq!(calls(), 1, "32 unmapped runs, one question to the base");
        // A trimmed block is a hole again, and is reported as one.
        ov.trim(2 * 65536, 65536).unwrap();
        assert_eq!(ov.hinted_blocks(), 1);
        out.reset(1024);
        ov.block_status(0, size as u32, &mut out).unwrap();
        let h = crate::proto::state::HOLE | crate::proto::state::ZERO;
        assert_eq!(out.as_slice(), [(2 * 65536, 0), (65536, h), ((size - 3 * 65536) as u32, 0)]);
        assert_eq!(ov.hinted_blocks(), 1, "still a hole: still asked about");
        // Reopened, every mapped block is asked about once, then known.
        ov.close().unwrap();
        drop(ov);
        let ov = Overlay::private(b, 65536, &odir).unwrap();
        assert_eq!(ov.hinted_blocks(), 32);
        out.reset(1024);
        ov.block_status(0, size as u32, &mut out).unwrap();
        assert_eq!(out.as_slice(), [(2 * 65536, 0), (65536, h), ((size - 3 * 65536) as u32, 0)]);
        assert_eq!(ov.hinted_blocks(), 1, "the data blocks are known now, the hole is not");
    }

}

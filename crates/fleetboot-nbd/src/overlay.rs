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

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

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

/// The `base:allocation` state of `[offset, offset + len)` of a plain file: data (0) or
/// hole (HOLE|ZERO), and where that state ends (at most `end`).
pub fn file_extent(file: &File, offset: u64, end: u64) -> (u32, u64) {
    use crate::proto::state;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an fd we own; its file position is never used (all I/O is pread).
    let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            return (state::HOLE | state::ZERO, end);
        }
        return (0, end); // SEEK_DATA unsupported: say data
    }
    let data = data as u64;
    if data > offset {
        return (state::HOLE | state::ZERO, data.min(end));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return (0, end);
    }
    (0, (hole as u64).clamp(offset + 1, end))
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // No hole punching here: write zeros.
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut pos = offset;
    while pos < offset + len {
        let n = ((offset + len - pos) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One bit per block.
#[derive(Debug, Clone, Default)]
struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }
    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Sets `[a, b)`; returns the ranges that were not set before.
    fn set_range(&mut self, a: u64, b: u64, newly: &mut Vec<(u64, u64)>) {
        for i in a..b {
            let w = &mut self.words[(i / 64) as usize];
            let m = 1 << (i % 64);
            if *w & m == 0 {
                *w |= m;
                match newly.last_mut() {
                    Some(last) if last.1 == i => last.1 = i + 1,
                    _ => newly.push((i, i + 1)),
                }
            }
        }
    }
    /// The end of the run of blocks starting at `i` that share `i`'s state (at most `limit`).
    fn run_end(&self, i: u64, limit: u64) -> (bool, u64) {
        let v = self.get(i);
        let mut j = i + 1;
        while j < limit {
            let w = self.words[(j / 64) as usize];
            if j % 64 == 0 && ((v && w == u64::MAX) || (!v && w == 0)) {
                j += 64;
                continue;
            }
            if self.get(j) != v {
                break;
            }
            j += 1;
        }
        (v, j.min(limit))
    }
    fn ranges(&self, nbits: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        let mut i = 0;
        while i < nbits {
            let (set, e) = self.run_end(i, nbits);
            if set {
                v.push((i, e));
            }
            i = e;
        }
        v
    }
    fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
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

/// Replays a journal: the map, the length of its valid prefix, and its record count.
/// A header that does not match is an error; a torn or corrupt record ends the replay.
fn replay(bytes: &[u8], block: u32, size: u64, nblocks: u64) -> io::Result<(Bitmap, u64, u64)> {
    if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != header(block, size) {
        return Err(invalid(
            "overlay map header does not match this image (size or block size)",
        ));
    }
    let mut map = Bitmap::new(nblocks);
    let mut pos = HEADER_LEN;
    let mut records = 0;
    let mut scratch = Vec::new();
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
        for (a, b) in ranges {
            map.set_range(a, b, &mut scratch);
            scratch.clear();
        }
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
        map: &Bitmap,
        nblocks: u64,
    ) -> io::Result<Journal> {
        let tmp = dir.join("map.tmp");
        let path = dir.join("map");
        let mut bytes = header(block, size).to_vec();
        let ranges = map.ranges(nblocks);
        let mut records = 0;
        if !ranges.is_empty() {
            bytes.extend_from_slice(&record(&ranges));
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

/// A client's copy-on-write overlay over a shared image.
#[derive(Debug)]
pub struct Overlay {
    mode: OverlayMode,
    base: Arc<File>,
    size: u64,
    block: u64,
    nblocks: u64,
    data: File,
    map: RwLock<Bitmap>,
    /// Serializes writers (read-modify-write of a block must not interleave).
    writer: Mutex<()>,
    /// Block ranges mapped since the last persisted flush (private mode).
    dirty: Mutex<Vec<(u64, u64)>>,
    journal: Option<Mutex<Journal>>,
    _lock: Option<File>,
}

impl Overlay {
    /// A standard (throw-away) overlay: its data file is created in `tmp_dir` and unlinked at
    /// once, so nothing outlives the overlay, not even after a crash.
    pub fn standard(base: Arc<File>, size: u64, block: u32, tmp_dir: &Path) -> io::Result<Overlay> {
        check_block(block)?;
        fs::create_dir_all(tmp_dir)?;
        let data = tempfile_in(tmp_dir)?;
        data.set_len(size)?;
        let nblocks = size.div_ceil(block as u64);
        Ok(Overlay {
            mode: OverlayMode::Standard,
            base,
            size,
            block: block as u64,
            nblocks,
            data,
            map: RwLock::new(Bitmap::new(nblocks)),
            writer: Mutex::new(()),
            dirty: Mutex::new(Vec::new()),
            journal: None,
            _lock: None,
        })
    }

    /// Opens (or creates) the private overlay in `dir`. Fails when another process holds it,
    /// or when its map was made for an image of another size or another block size.
    pub fn private(base: Arc<File>, size: u64, block: u32, dir: &Path) -> io::Result<Overlay> {
        check_block(block)?;
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "private overlay in use by another process",
            ));
        }
        let nblocks = size.div_ceil(block as u64);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("data"))?;
        let map_path = dir.join("map");
        let (map, journal) = match fs::read(&map_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                data.set_len(size)?;
                data.sync_all()?;
                let map = Bitmap::new(nblocks);
                let j = Journal::write_snapshot(dir, block, size, &map, nblocks)?;
                (map, j)
            }
            Err(e) => return Err(e),
            Ok(bytes) => {
                let (map, valid, records) = replay(&bytes, block, size, nblocks)?;
                if data.metadata()?.len() != size {
                    data.set_len(size)?;
                }
                let j = if valid as usize != bytes.len() || records > COMPACT_RECORDS {
                    if valid as usize != bytes.len() {
                        tracing::warn!(dir = %dir.display(), dropped = bytes.len() as u64 - valid, "overlay map: torn tail dropped");
                    }
                    Journal::write_snapshot(dir, block, size, &map, nblocks)?
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
                (map, j)
            }
        };
        Ok(Overlay {
            mode: OverlayMode::Private,
            base,
            size,
            block: block as u64,
            nblocks,
            data,
            map: RwLock::new(map),
            writer: Mutex::new(()),
            dirty: Mutex::new(Vec::new()),
            journal: Some(Mutex::new(journal)),
            _lock: Some(lock),
        })
    }

    pub fn mode(&self) -> OverlayMode {
        self.mode
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn block_size(&self) -> u64 {
        self.block
    }
    /// How many blocks hold overlay data.
    pub fn mapped_blocks(&self) -> u64 {
        self.map.read().unwrap().count()
    }
    pub fn is_mapped(&self, block: u64) -> bool {
        self.map.read().unwrap().get(block)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond the end of the disk",
            )),
        }
    }

    /// Reads `buf.len()` bytes at `offset`: overlay blocks from the overlay, the rest from
    /// the image.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block;
            let last = (end - 1) / self.block + 1;
            let (mapped, e) = self.map.read().unwrap().run_end(b, last);
            let run_end = (e * self.block).min(end);
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if mapped {
                self.data.read_exact_at(dst, pos)?;
            } else {
                self.base.read_exact_at(dst, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * self.block).min(self.size)
    }

    /// Copies block `b` from the image into the overlay with `patch` laid over it at `at`.
    fn copy_up(&self, b: u64, at: u64, patch: Option<&[u8]>, zero_len: u64) -> io::Result<()> {
        let start = b * self.block;
        let mut buf = vec![0u8; (self.block_end(b) - start) as usize];
        self.base.read_exact_at(&mut buf, start)?;
        let rel = (at - start) as usize;
        match patch {
            Some(p) => buf[rel..rel + p.len()].copy_from_slice(p),
            None => buf[rel..rel + zero_len as usize].fill(0),
        }
        self.data.write_all_at(&buf, start)
    }

    fn mark(&self, a: u64, b: u64) {
        let mut newly = Vec::new();
        self.map.write().unwrap().set_range(a, b, &mut newly);
        if self.journal.is_some() && !newly.is_empty() {
            self.dirty.lock().unwrap().extend(newly);
        }
    }

    /// Writes `data` at `offset` (or `len` zero bytes when `data` is None).
    fn write_inner(&self, offset: u64, data: Option<&[u8]>, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _w = self.writer.lock().unwrap();
        let end = offset + len;
        let first = offset / self.block;
        let last = (end - 1) / self.block;
        let mut direct = (offset, end);
        let part = |a: u64, b: u64| data.map(|d| &d[(a - offset) as usize..(b - offset) as usize]);
        // A partial head block not yet in the overlay: copy it up with the new bytes.
        if (offset % self.block != 0 || end < self.block_end(first)) && !self.is_mapped(first) {
            let e = end.min(self.block_end(first));
            self.copy_up(first, offset, part(offset, e), e - offset)?;
            direct.0 = e;
        }
        // A partial tail block (another block than the head) not yet in the overlay.
        if last != first && end < self.block_end(last) && !self.is_mapped(last) {
            let s = last * self.block;
            self.copy_up(last, s, part(s, end), end - s)?;
            direct.1 = s;
        }
        if direct.0 < direct.1 {
            match data {
                Some(_) => self
                    .data
                    .write_all_at(part(direct.0, direct.1).unwrap(), direct.0)?,
                None => {
                    // Whole blocks become holes; partial (already mapped) ends get zeros.
                    let (a, b) = (direct.0, direct.1);
                    let fa = a.div_ceil(self.block) * self.block;
                    let fb = if b == self.size {
                        b
                    } else {
                        b / self.block * self.block
                    };
                    if fa < fb {
                        punch_hole(&self.data, fa, fb - fa)?;
                        if a < fa {
                            self.data.write_all_at(&vec![0u8; (fa - a) as usize], a)?;
                        }
                        if fb < b {
                            self.data.write_all_at(&vec![0u8; (b - fb) as usize], fb)?;
                        }
                    } else {
                        self.data.write_all_at(&vec![0u8; (b - a) as usize], a)?;
                    }
                }
            }
        }
        self.mark(first, last + 1);
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_inner(offset, Some(data), data.len() as u64)
    }

    /// Makes `[offset, offset+len)` read as zeros (whole blocks become holes in the overlay).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_inner(offset, None, len)
    }

    /// TRIM: blocks wholly inside the range that are in the overlay become holes (they read
    /// as zeros); the rest is left alone, which TRIM allows.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let _w = self.writer.lock().unwrap();
        let end = offset + len;
        let b0 = offset.div_ceil(self.block);
        let b1 = if end == self.size {
            self.nblocks
        } else {
            end / self.block
        };
        let mut b = b0;
        while b < b1 {
            let (mapped, e) = self.map.read().unwrap().run_end(b, b1);
            if mapped {
                punch_hole(
                    &self.data,
                    b * self.block,
                    self.block_end(e - 1) - b * self.block,
                )?;
            }
            b = e;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable (private mode): `fdatasync` of the data, then
    /// one journal record for newly mapped blocks, `fdatasync`ed. Standard mode: nothing.
    pub fn flush(&self) -> io::Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let mut j = journal.lock().unwrap();
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap());
        let res = self.data.sync_data().and_then(|()| {
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

    /// Flushes and, in private mode, compacts the journal: for a clean close.
    pub fn close(&self) -> io::Result<()> {
        self.flush()?;
        if let Some(journal) = &self.journal {
            let mut j = journal.lock().unwrap();
            if j.records > 1 {
                let map = self.map.read().unwrap();
                let block = self.block as u32;
                *j = Journal::write_snapshot(&j.dir.clone(), block, self.size, &map, self.nblocks)?;
            }
        }
        Ok(())
    }

    /// `base:allocation` extents of `[offset, offset+len)`, at most `max` of them: overlay
    /// blocks are data; elsewhere the image's holes are holes.
    pub fn extents(
        &self,
        offset: u64,
        len: u32,
        max: usize,
        out: &mut Vec<(u32, u32)>,
    ) -> io::Result<()> {
        self.check_range(offset, len as u64)?;
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block;
            let (mapped, e) = self.map.read().unwrap().run_end(b, self.nblocks);
            let run_end = (e * self.block).min(end);
            let (status, next) = if mapped {
                (0, run_end)
            } else {
                file_extent(&self.base, pos, run_end)
            };
            if !push_extent(out, (next - pos) as u32, status, max) {
                break;
            }
            pos = next;
        }
        Ok(())
    }
}

/// Appends an extent, merging with the previous one of the same state; false when `max`
/// extents are already there (and this one could not be merged).
pub fn push_extent(out: &mut Vec<(u32, u32)>, len: u32, status: u32, max: usize) -> bool {
    if let Some(last) = out.last_mut() {
        if last.1 == status {
            last.0 += len;
            return true;
        }
    }
    if out.len() >= max {
        return false;
    }
    out.push((len, status));
    true
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

/// Checks a private overlay directory offline: `(mapped blocks, journal records, bytes of
/// torn tail)`. For tests and `fleetboot` diagnostics.
pub fn inspect_private(dir: &Path, image_size: u64, block: u32) -> io::Result<(u64, u64, u64)> {
    let bytes = fs::read(dir.join("map"))?;
    let nblocks = image_size.div_ceil(block as u64);
    let (map, valid, records) = replay(&bytes, block, image_size, nblocks)?;
    Ok((map.count(), records, bytes.len() as u64 - valid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base(dir: &Path, size: usize) -> (Arc<File>, Vec<u8>) {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        let p = dir.join("base");
        fs::write(&p, &bytes).unwrap();
        (Arc::new(File::open(&p).unwrap()), bytes)
    }

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
            let ov = if private { Overlay::private(b.clone(), size as u64, 4096, &odir).unwrap() }
                     else { Overlay::standard(b.clone(), size as u64, 4096, dir.path()).unwrap() };
            for o in &ops {
                match o {
                    Op::Write(off, d) => { ov.write(*off, d).unwrap(); model[*off as usize..*off as usize + d.len()].copy_from_slice(d); trimmed.borrow_mut()[*off as usize..*off as usize + d.len()].fill(false); }
                    Op::Zero(off, l) => { ov.write_zeroes(*off, *l).unwrap(); model[*off as usize..(*off + *l) as usize].fill(0); trimmed.borrow_mut()[*off as usize..(*off + *l) as usize].fill(false); }
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
            };
            check(&ov);
            prop_assert_eq!(fs::read(dir.path().join("base")).unwrap(), bytes.clone());
            if private {
                ov.flush().unwrap();
                drop(ov);
                let ov2 = Overlay::private(b.clone(), size as u64, 4096, &odir).unwrap();
                check(&ov2);
                ov2.close().unwrap();
                drop(ov2);
                let ov3 = Overlay::private(b, size as u64, 4096, &odir).unwrap();
                check(&ov3);
            }
        }
    }

    #[test]
    fn unflushed_blocks_fall_back_to_the_image_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (b, bytes) = base(dir.path(), 64 * 1024);
        let odir = dir.path().join("ov");
        let ov = Overlay::private(b.clone(), 65536, 4096, &odir).unwrap();
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
        let ov = Overlay::private(b, 65536, 4096, &odir).unwrap();
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
        let ov = Overlay::private(b.clone(), 8192, 4096, &odir).unwrap();
        // flock is per open file description: a second open in this process conflicts too.
        assert!(Overlay::private(b.clone(), 8192, 4096, &odir).is_err());
        drop(ov);
        assert!(
            Overlay::private(b.clone(), 4096, 4096, &odir).is_err(),
            "size differs"
        );
        assert!(
            Overlay::private(b, 8192, 512, &odir).is_err(),
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
        let b = Arc::new(File::open(&p).unwrap());
        let ov = Overlay::standard(b, 1 << 20, 65536, dir.path()).unwrap();
        ov.write(512 << 10, &[5u8; 10]).unwrap();
        let mut out = Vec::new();
        ov.extents(0, 1 << 20, 100, &mut out).unwrap();
        let h = state::HOLE | state::ZERO;
        assert_eq!(
            out,
            vec![(65536, 0), (448 << 10, h), (65536, 0), (448 << 10, h)]
        );
        out.clear();
        ov.extents(0, 1 << 20, 1, &mut out).unwrap();
        assert_eq!(out, vec![(65536, 0)]);
    }
}

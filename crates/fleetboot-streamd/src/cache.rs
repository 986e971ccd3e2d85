//! The receiver's local copy of an image: a sparse file the size of the image plus a
//! bitmap of the blocks present (one bit per stream block), shared between the receiving
//! thread and readers (the agent's NBD disk) without a lock: a block's bytes are written
//! with `pwrite` before its bit is set (release), and readers check the bit (acquire)
//! before they `pread`.
//!
//! On disk, under the cache directory: `<sha256>.img` (the bytes) and `<sha256>.map`
//! (`FBMAP1`, block size u32, image size u64, then the bitmap), written by
//! [`Cache::persist`]. Reopening a cache whose map matches keeps what was received.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use fleetboot_stream::BlockSink;

const MAP_MAGIC: &[u8; 6] = b"FBMAP1";

/// A sparse image file plus a block bitmap.
#[derive(Debug)]
pub struct Cache {
    file: File,
    path: PathBuf,
    map_path: PathBuf,
    size: u64,
    block_size: u32,
    blocks: u32,
    bits: Vec<AtomicU64>,
    present: AtomicU32,
}

impl Cache {
    /// Opens (creating) the cache of image `name` (its SHA-256 hex) in `dir`.
    pub fn open(dir: &Path, name: &str, size: u64, block_size: u32) -> io::Result<Cache> {
        if block_size == 0 || size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty image or block size",
            ));
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.img"));
        let map_path = dir.join(format!("{name}.map"));
        let blocks = size.div_ceil(block_size as u64);
        if blocks > u32::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many blocks",
            ));
        }
        let blocks = blocks as u32;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let words = (blocks as usize).div_ceil(64);
        let mut bits: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let mut present = 0;
        // Keep what an earlier run received if its map matches this image and block size.
        if let Ok(m) = std::fs::read(&map_path) {
            if m.len() == 18 + words * 8
                && &m[..6] == MAP_MAGIC
                && m[6..10] == block_size.to_be_bytes()
                && m[10..18] == size.to_be_bytes()
                && file.metadata()?.len() == size
            {
                for (i, w) in bits.iter_mut().enumerate() {
                    let v = u64::from_le_bytes(m[18 + i * 8..26 + i * 8].try_into().unwrap());
                    present += v.count_ones();
                    *w = AtomicU64::new(v);
                }
            }
        }
        if present == 0 {
            file.set_len(0)?;
        }
        file.set_len(size)?;
        Ok(Cache {
            file,
            path,
            map_path,
            size,
            block_size,
            blocks,
            bits,
            present: AtomicU32::new(present),
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Number of blocks.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }
    /// Blocks present.
    pub fn present(&self) -> u32 {
        self.present.load(Ordering::Relaxed)
    }
    /// Every block is present.
    pub fn is_complete(&self) -> bool {
        self.present() == self.blocks
    }
    /// Whether block `b` is present.
    pub fn has(&self, b: u32) -> bool {
        b < self.blocks
            && self.bits[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }
    fn mark(&self, b: u32) {
        let old = self.bits[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
        if old & (1 << (b % 64)) == 0 {
            self.present.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn block_len(&self, b: u32) -> usize {
        let start = b as u64 * self.block_size as u64;
        (self.size - start).min(self.block_size as u64) as usize
    }
    /// The blocks `[first, last]` covering `len` bytes at `offset`.
    pub fn block_range(&self, offset: u64, len: u64) -> (u32, u32) {
        let first = (offset / self.block_size as u64) as u32;
        let last = ((offset + len.max(1) - 1) / self.block_size as u64) as u32;
        (first, last.min(self.blocks - 1))
    }
    /// Whether every block covering `[offset, offset+len)` is present.
    pub fn has_range(&self, offset: u64, len: u64) -> bool {
        let (a, b) = self.block_range(offset, len);
        (a..=b).all(|x| self.has(x))
    }

    /// Stores block `b` (its full length) and marks it present.
    pub fn put_block(&self, b: u32, data: &[u8]) -> io::Result<()> {
        if b >= self.blocks || data.len() != self.block_len(b) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block out of range",
            ));
        }
        if !self.has(b) {
            self.file
                .write_all_at(data, b as u64 * self.block_size as u64)?;
            self.mark(b);
        }
        Ok(())
    }

    /// Stores whole blocks from a buffer starting at a block boundary (`offset`); a short
    /// last block is allowed only at the end of the image.
    pub fn put_range(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let bs = self.block_size as u64;
        if offset % bs != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unaligned range",
            ));
        }
        let mut at = 0usize;
        while at < data.len() {
            let b = ((offset + at as u64) / bs) as u32;
            let n = self.block_len(b);
            if at + n > data.len() {
                break;
            }
            self.put_block(b, &data[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Reads bytes (present or not: absent blocks read as zeros).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes the bitmap next to the image (temp file + rename) and syncs the image.
    pub fn persist(&self) -> io::Result<()> {
        self.file.sync_data()?;
        let mut m = Vec::with_capacity(18 + self.bits.len() * 8);
        m.extend_from_slice(MAP_MAGIC);
        m.extend_from_slice(&self.block_size.to_be_bytes());
        m.extend_from_slice(&self.size.to_be_bytes());
        for w in &self.bits {
            m.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        let tmp = self.map_path.with_extension("map.tmp");
        std::fs::write(&tmp, &m)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.map_path)
    }
}

/// [`BlockSink`] over a shared [`Cache`].
#[derive(Debug, Clone, Copy)]
pub struct CacheSink<'a>(pub &'a Cache);

impl BlockSink for CacheSink<'_> {
    fn write_block(&mut self, index: u32, data: &[u8]) -> io::Result<()> {
        self.0.put_block(index, data)
    }
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> io::Result<()> {
        if !self.0.has(index) {
            return Err(io::Error::other("read of a block not received"));
        }
        self.0.read_at(index as u64 * self.0.block_size as u64, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_bits_and_persistence() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), "x", 2500, 1000).unwrap();
        assert_eq!(c.blocks(), 3);
        assert!(!c.has(0));
        c.put_block(2, &[7u8; 500]).unwrap();
        assert!(c.put_block(2, &[7u8; 1000]).is_err());
        assert!(c.put_block(3, &[7u8; 500]).is_err());
        assert!(c.has(2) && !c.has(1));
        c.put_range(0, &[1u8; 1000]).unwrap();
        assert_eq!(c.present(), 2);
        assert!(c.has_range(0, 1000) && !c.has_range(0, 1001));
        assert_eq!(c.block_range(999, 2), (0, 1));
        let mut b = [0u8; 4];
        c.read_at(998, &mut b).unwrap();
        assert_eq!(b, [1, 1, 0, 0]);
        c.persist().unwrap();
        drop(c);
        let c = Cache::open(d.path(), "x", 2500, 1000).unwrap();
        assert_eq!(c.present(), 2);
        assert!(c.has(0) && c.has(2));
        // A different block size starts over.
        drop(c);
        let c = Cache::open(d.path(), "x", 2500, 500).unwrap();
        assert_eq!(c.present(), 0);
    }
}

//! The receiver's local copy of an image: a [`BlockFile`] (a sparse file the size of the
//! image plus a bitmap of the blocks present, one bit per stream block), shared between
//! the receiving thread and readers (the agent's NBD disk) without a lock: a block's bytes
//! are written before its bit is set, and readers check the bit before they read.
//! A received block of zeros is a hole in the file, not written bytes, so the agent's disk
//! can report it as one.
//!
//! On disk, under the cache directory: `<sha256>.img` (the bytes) and `<sha256>.map`
//! (`FBMAP1`, block size u32, image size u64, then the bitmap as little-endian 64-bit
//! words), written by [`Cache::persist`]. Reopening a cache whose map matches keeps what
//! was received.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use fleetboot_nbd::blockfile::BlockFile;
use fleetboot_stream::BlockSink;

const MAP_MAGIC: &[u8; 6] = b"FBMAP1";
const MAP_HEADER: usize = 18;

/// A sparse image file plus a block bitmap.
#[derive(Debug)]
pub struct Cache {
    blocks: BlockFile,
    path: PathBuf,
    map_path: PathBuf,
    block_size: u32,
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
        if size.div_ceil(block_size as u64) > u32::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many blocks",
            ));
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.img"));
        let map_path = dir.join(format!("{name}.map"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let same_size = file.metadata()?.len() == size;
        let blocks = BlockFile::new(file, size, block_size)?;
        // Keep what an earlier run received if its map matches this image and block size.
        if let Ok(m) = std::fs::read(&map_path) {
            let words = (blocks.blocks() as usize).div_ceil(64);
            if same_size
                && m.len() == MAP_HEADER + words * 8
                && &m[..6] == MAP_MAGIC
                && m[6..10] == block_size.to_be_bytes()
                && m[10..18] == size.to_be_bytes()
            {
                let w: Vec<u64> = m[MAP_HEADER..]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                blocks.load_words(&w)?;
            }
        }
        if blocks.present() == 0 {
            // Nothing to keep: drop whatever bytes an earlier run left.
            blocks.file().set_len(0)?;
        }
        blocks.file().set_len(size)?;
        Ok(Cache {
            blocks,
            path,
            map_path,
            block_size,
        })
    }

    /// Removes the cache of image `name` from `dir` (its bytes and its map), so that the
    /// next [`Cache::open`] starts empty.
    pub fn discard(dir: &Path, name: &str) -> io::Result<()> {
        for file in [format!("{name}.img"), format!("{name}.map")] {
            match std::fs::remove_file(dir.join(file)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.blocks.size()
    }
    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Number of blocks.
    pub fn blocks(&self) -> u32 {
        self.blocks.blocks() as u32
    }
    /// Blocks present.
    pub fn present(&self) -> u32 {
        self.blocks.present() as u32
    }
    /// Every block is present.
    pub fn is_complete(&self) -> bool {
        self.blocks.is_complete()
    }
    /// Whether block `b` is present.
    pub fn has(&self, b: u32) -> bool {
        self.blocks.has(b as u64)
    }
    /// The blocks `[first, last]` covering `len` bytes at `offset`.
    pub fn block_range(&self, offset: u64, len: u64) -> (u32, u32) {
        let (a, b) = self.blocks.blocks_of(offset, len.max(1));
        (a as u32, (b.max(a + 1) - 1).min(self.blocks.blocks() - 1) as u32)
    }
    /// Whether every block covering `[offset, offset+len)` is present.
    pub fn has_range(&self, offset: u64, len: u64) -> bool {
        self.blocks.has_range(offset, len.max(1))
    }
    /// From block `b`: whether it is present and where the run of blocks in that state
    /// ends (at most `limit`).
    pub fn run_end(&self, b: u32, limit: u32) -> (bool, u32) {
        let (v, e) = self.blocks.run_end(b as u64, limit as u64);
        (v, e as u32)
    }
    /// The `base:allocation` state of the file from `offset` (see
    /// [`fleetboot_nbd::blockfile::file_extent`]): meaningful for present blocks only.
    pub fn extent(&self, offset: u64, end: u64) -> (u32, u64) {
        self.blocks.extent(offset, end)
    }

    /// Stores block `b` (its full length) and marks it present.
    pub fn put_block(&self, b: u32, data: &[u8]) -> io::Result<()> {
        let b64 = b as u64;
        if b64 >= self.blocks.blocks() || data.len() as u64 != self.blocks.block_len(b64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block out of range",
            ));
        }
        if !self.blocks.has(b64) {
            let at = b64 * self.block_size as u64;
            if data.iter().all(|&x| x == 0) {
                self.blocks.punch(at, data.len() as u64)?;
            } else {
                self.blocks.write_at(at, data)?;
            }
            self.blocks.mark_one(b64);
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
            let b = (offset + at as u64) / bs;
            if b >= self.blocks.blocks() {
                break;
            }
            let n = self.blocks.block_len(b) as usize;
            if at + n > data.len() {
                break;
            }
            self.put_block(b as u32, &data[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Reads bytes (present or not: absent blocks read as zeros).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.blocks.read_at(offset, buf)
    }

    /// Writes the bitmap next to the image (temp file + rename) and syncs the image.
    pub fn persist(&self) -> io::Result<()> {
        self.blocks.file().sync_data()?;
        let words = self.blocks.words();
        let mut m = Vec::with_capacity(MAP_HEADER + words.len() * 8);
        m.extend_from_slice(MAP_MAGIC);
        m.extend_from_slice(&self.block_size.to_be_bytes());
        m.extend_from_slice(&self.blocks.size().to_be_bytes());
        for w in words {
            m.extend_from_slice(&w.to_le_bytes());
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
        // A block of zeros is stored as a hole and reads as zeros, whatever an earlier run
        // left in the file there.
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join("x.img"))
            .unwrap()
            .write_all_at(&[5u8; 1000], 1000)
            .unwrap();
        c.put_block(1, &[0u8; 1000]).unwrap();
        assert!(c.has(1) && c.is_complete());
        let mut z = [9u8; 1000];
        c.read_at(1000, &mut z).unwrap();
        assert_eq!(z, [0u8; 1000]);
        c.persist().unwrap();
        drop(c);
        let c = Cache::open(d.path(), "x", 2500, 1000).unwrap();
        assert!(c.is_complete());
        // A different block size starts over.
        drop(c);
        let c = Cache::open(d.path(), "x", 2500, 500).unwrap();
        assert_eq!(c.present(), 0);
    }
}

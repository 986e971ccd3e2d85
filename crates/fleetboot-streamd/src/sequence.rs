//! Learned block sequences (the order a booting client read an image's blocks), stored with the image version they belong to:
//! `<catalog root>/sequences/<sha256>.seq`, a header (`FBSEQ1`, block size u32, count u32)
//! then the block indices as big-endian u32, in the order a client first read them.

use std::io;
use std::path::{Path, PathBuf};

use crate::StreamdError;

const MAGIC: &[u8; 6] = b"FBSEQ1";

/// Where the sequence of image `sha256` lives under the catalog root (`<data_dir>/images`).
pub fn path(catalog_root: &Path, sha256: &str) -> PathBuf {
    catalog_root.join("sequences").join(format!("{sha256}.seq"))
}

/// A learned sequence: the block size it was recorded at and the block order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub block_size: u32,
    pub blocks: Vec<u32>,
}

impl Sequence {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(14 + self.blocks.len() * 4);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&self.block_size.to_be_bytes());
        v.extend_from_slice(&(self.blocks.len() as u32).to_be_bytes());
        for b in &self.blocks {
            v.extend_from_slice(&b.to_be_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Sequence, String> {
        if b.len() < 14 || &b[..6] != MAGIC {
            return Err("not a sequence file".into());
        }
        let block_size = u32::from_be_bytes(b[6..10].try_into().unwrap());
        let n = u32::from_be_bytes(b[10..14].try_into().unwrap()) as usize;
        if block_size == 0 || b.len() != 14 + n.checked_mul(4).ok_or("count overflows")? {
            return Err("sequence length does not match its count".into());
        }
        let blocks = b[14..]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Sequence { block_size, blocks })
    }

    /// The order in blocks of `block_size` (the stream's): each recorded block maps to the
    /// stream blocks it covers, first occurrence kept, blocks past `block_count` dropped.
    pub fn to_order(&self, block_size: u32, block_count: u32) -> Vec<u32> {
        let mut seen = vec![false; block_count as usize];
        let mut out = Vec::new();
        for &b in &self.blocks {
            let start = b as u64 * self.block_size as u64;
            let end = start + self.block_size as u64;
            let first = start / block_size as u64;
            let last = (end - 1) / block_size as u64;
            for x in first..=last {
                if x < block_count as u64 && !seen[x as usize] {
                    seen[x as usize] = true;
                    out.push(x as u32);
                }
            }
        }
        out
    }
}

/// Where the read counts of image `sha256` are written (next to its sequence):
/// `<catalog root>/sequences/<sha256>.reads`, one line
/// `reads=N sequential=N random=N bytes=N`, counted since the NBD server started.
pub fn stats_path(catalog_root: &Path, sha256: &str) -> PathBuf {
    catalog_root
        .join("sequences")
        .join(format!("{sha256}.reads"))
}

/// Stores a sequence (temp file + rename).
pub fn store(catalog_root: &Path, sha256: &str, seq: &Sequence) -> io::Result<PathBuf> {
    let p = path(catalog_root, sha256);
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    let tmp = p.with_extension("seq.tmp");
    std::fs::write(&tmp, seq.encode())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &p)?;
    Ok(p)
}

/// Loads the sequence learned for an image, if there is one (convert it to the stream's
/// block size with [`Sequence::to_order`]).
pub fn load(catalog_root: &Path, sha256: &str) -> Result<Option<Sequence>, StreamdError> {
    let p = path(catalog_root, sha256);
    match std::fs::read(&p) {
        Ok(b) => Sequence::decode(&b)
            .map(Some)
            .map_err(|e| StreamdError::Config(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StreamdError::io(&p, e)),
    }
}

/// Read counts of one image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// READ requests.
    pub reads: u64,
    /// Reads that started where the previous read of the image ended.
    pub sequential: u64,
    /// Bytes read.
    pub bytes: u64,
}

impl ReadStats {
    /// Reads that did not continue the previous one.
    pub fn random(&self) -> u64 {
        self.reads - self.sequential
    }
}

#[derive(Debug, Default)]
struct Learning {
    seen: Vec<u64>,
    blocks: Vec<u32>,
    /// A sequence existed when recording started: count reads, learn nothing.
    known: bool,
    last_end: Option<u64>,
    stats: ReadStats,
    dirty: bool,
}

/// Sector-sequence learning on the NBD server's read path: installed with
/// `Exports::set_read_recorder`, it records, per image content, the blocks clients read in
/// the order they first read them, and counts sequential vs random reads. Images that
/// already have a sequence are only counted. [`Recorder::store_all`] writes what was
/// learned next to the images (`sequences/<sha256>.seq`).
#[derive(Debug)]
pub struct Recorder {
    root: PathBuf,
    block_size: u32,
    images: std::sync::Mutex<std::collections::HashMap<String, Learning>>,
}

impl Recorder {
    /// Records at `block_size` granularity (the stream's block size, so the order needs no
    /// conversion) for the catalog rooted at `catalog_root`.
    pub fn new(catalog_root: &Path, block_size: u32) -> Recorder {
        Recorder {
            root: catalog_root.to_path_buf(),
            block_size: block_size.max(1),
            images: Default::default(),
        }
    }

    /// Read counts per image SHA-256.
    pub fn stats(&self) -> Vec<(String, ReadStats)> {
        let g = self.images.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = g
            .iter()
            .map(|(k, l)| (k.clone(), l.stats.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Writes every image's read counts to [`stats_path`] (temp file + rename), so an
    /// operator or a test can see how sequential the server's image reads were. Returns
    /// the files written.
    pub fn store_stats(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for (sha, st) in self.stats() {
            let p = stats_path(&self.root, &sha);
            std::fs::create_dir_all(p.parent().expect("has a parent"))?;
            let tmp = p.with_extension("reads.tmp");
            std::fs::write(
                &tmp,
                format!(
                    "reads={} sequential={} random={} bytes={}\n",
                    st.reads,
                    st.sequential,
                    st.random(),
                    st.bytes
                ),
            )?;
            std::fs::rename(&tmp, &p)?;
            out.push(p);
        }
        Ok(out)
    }

    /// Blocks recorded so far for an image.
    pub fn recorded(&self, sha256: &str) -> Vec<u32> {
        let g = self.images.lock().unwrap_or_else(|e| e.into_inner());
        g.get(sha256).map(|l| l.blocks.clone()).unwrap_or_default()
    }

    /// Stores every sequence learned since the last store. Returns the files written.
    pub fn store_all(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut g = self.images.lock().unwrap_or_else(|e| e.into_inner());
        for (sha, l) in g.iter_mut() {
            if l.dirty && !l.known && !l.blocks.is_empty() {
                let seq = Sequence {
                    block_size: self.block_size,
                    blocks: l.blocks.clone(),
                };
                out.push(store(&self.root, sha, &seq)?);
                l.dirty = false;
            }
        }
        Ok(out)
    }
}

/// Installs a [`Recorder`] on an NBD server's exports and stores what it learns every
/// `every` (and once more when `stop` is set): `fleetboot serve`'s one-line hook.
pub fn install(
    exports: &fleetboot_nbd::Exports,
    block_size: u32,
    every: std::time::Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::Arc<Recorder> {
    let rec = std::sync::Arc::new(Recorder::new(exports.catalog().root(), block_size));
    exports.set_read_recorder(Some(rec.clone()));
    let r2 = rec.clone();
    let _ = std::thread::Builder::new()
        .name("sequence-store".into())
        .spawn(move || loop {
            let deadline = std::time::Instant::now() + every;
            while std::time::Instant::now() < deadline {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = r2.store_all();
                    let _ = r2.store_stats();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            match r2.store_all() {
                Ok(files) => {
                    for f in files {
                        tracing::info!(file = %f.display(), "sector sequence stored");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "storing sector sequences"),
            }
            // After the sequences: a fresh `.reads` file means this round's sequence is on
            // disk too.
            if let Err(e) = r2.store_stats() {
                tracing::warn!(error = %e, "storing image read counts");
            }
            for (sha, st) in r2.stats() {
                tracing::debug!(image = %sha, reads = st.reads, sequential = st.sequential, random = st.random(), "image reads");
            }
        });
    rec
}

impl fleetboot_nbd::ReadRecorder for Recorder {
    fn record_read(&self, image: &fleetboot_images::ImageVersion, offset: u64, len: u32) {
        let mut g = self.images.lock().unwrap_or_else(|e| e.into_inner());
        let l = g.entry(image.sha256.clone()).or_insert_with(|| {
            let blocks = image.size.div_ceil(self.block_size as u64) as usize;
            Learning {
                seen: vec![0; blocks.div_ceil(64)],
                known: path(&self.root, &image.sha256).exists(),
                ..Default::default()
            }
        });
        l.stats.reads += 1;
        l.stats.bytes += len as u64;
        if l.last_end == Some(offset) {
            l.stats.sequential += 1;
        }
        l.last_end = Some(offset + len as u64);
        if l.known || len == 0 {
            return;
        }
        let bs = self.block_size as u64;
        let first = offset / bs;
        let last = (offset + len as u64 - 1) / bs;
        for b in first..=last {
            let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
            if w < l.seen.len() && l.seen[w] & m == 0 {
                l.seen[w] |= m;
                l.blocks.push(b as u32);
                l.dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_conversion() {
        let s = Sequence {
            block_size: 4096,
            blocks: vec![3, 0, 3, 1],
        };
        assert_eq!(Sequence::decode(&s.encode()).unwrap(), s);
        assert!(Sequence::decode(&s.encode()[..20]).is_err());
        assert!(Sequence::decode(b"nope").is_err());
        // 4096-byte blocks onto 1450-byte blocks: block 3 = bytes 12288..16384 = 8..=11.
        assert_eq!(s.to_order(1450, 9), vec![8, 0, 1, 2, 3, 4, 5]);
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path(), "ab").unwrap().is_none());
        store(d.path(), "ab", &s).unwrap();
        assert_eq!(load(d.path(), "ab").unwrap(), Some(s));
    }

    #[test]
    fn read_counts_are_stored_next_to_the_sequence() {
        use fleetboot_nbd::ReadRecorder;
        let d = tempfile::tempdir().unwrap();
        let rec = Recorder::new(d.path(), 1000);
        let img = fleetboot_images::ImageVersion {
            name: "a".into(),
            version: 1,
            sha256: "ab".into(),
            size: 10_000,
            imported_at: 0,
            source: String::new(),
            source_format: "raw".into(),
        };
        rec.record_read(&img, 0, 1000);
        rec.record_read(&img, 1000, 1000); // sequential
        rec.record_read(&img, 5000, 500); // random
        let files = rec.store_stats().unwrap();
        assert_eq!(files, vec![stats_path(d.path(), "ab")]);
        assert_eq!(
            std::fs::read_to_string(&files[0]).unwrap(),
            "reads=3 sequential=1 random=2 bytes=2500\n"
        );
    }
}

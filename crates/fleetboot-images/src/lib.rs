//! fleetboot's disk image catalog.
//!
//! Map of the crate:
//! - [`Catalog`]: the catalog under `<data_dir>/images/`: [`Catalog::import`] (raw files copied
//!   sparsely while hashed; qcow2, vmdk, vdi, vhdx, qed converted with `qemu-img convert -O raw`),
//!   [`Catalog::list`], [`Catalog::show`], [`Catalog::resolve`], [`Catalog::remove`] and
//!   [`Catalog::open`] (read-only, for the HTTP Range service and the NBD server).
//! - [`ImageRef`]: `NAME` (the latest version) or `NAME:VERSION`.
//! - [`ImageVersion`]: one version of a named image: its SHA-256, size, origin.
//!
//! Layout on disk:
//! - `images/sha256/<hex>`: the image bytes, raw, content-addressed, mode 0444. Two names or
//!   versions with the same content share one file.
//! - `images/catalog.json`: names and versions, replaced atomically (temp file, fsync, rename,
//!   fsync of the directory) under an exclusive `flock` on `images/.lock`, so a CLI import and
//!   a running server never lose each other's changes. Readers just read the file.
//! - `images/tmp/`: imports in progress (removed on failure).
//!
//! Image metadata lives in this JSON file and not in SQLite so that the catalog (bytes and
//! names) is one directory an operator can copy or rsync to another server as a whole.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid image name {0:?}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with . or -)")]
    InvalidName(String),
    #[error("invalid image reference {0:?}: expected NAME or NAME:VERSION")]
    InvalidRef(String),
    #[error("no image {0}")]
    NotFound(String),
    #[error("catalog file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("qemu-img failed converting {path}: {message}")]
    Convert { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// One version of a named image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVersion {
    pub name: String,
    /// 1, 2, 3, … per name; never reused while a higher version exists.
    pub version: u32,
    /// Lower-case hex SHA-256 of the raw image bytes: the file name under `images/sha256/`.
    pub sha256: String,
    /// Size of the raw image in bytes (the disk size clients see).
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub imported_at: u64,
    /// The path it was imported from.
    pub source: String,
    /// The format it was imported from: `raw`, `qcow2`, …
    pub source_format: String,
}

impl ImageVersion {
    /// `NAME:VERSION`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }
}

/// `NAME` (latest version) or `NAME:VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub name: String,
    pub version: Option<u32>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef> {
        let (name, version) = match s.split_once(':') {
            Some((n, v)) => {
                let v: u32 = v.parse().map_err(|_| Error::InvalidRef(s.to_string()))?;
                if v == 0 {
                    return Err(Error::InvalidRef(s.to_string()));
                }
                (n, Some(v))
            }
            None => (s, None),
        };
        validate_name(name).map_err(|_| Error::InvalidRef(s.to_string()))?;
        Ok(ImageRef {
            name: name.to_string(),
            version,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}:{}", self.name, v),
            None => f.write_str(&self.name),
        }
    }
}

/// Checks an image name: 1-128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

/// The name an import gets when none is given: the file name up to its first `.`, with
/// characters a name cannot hold replaced by `-`.
pub fn default_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = file.split('.').next().unwrap_or("");
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_start_matches('-').to_string();
    name.truncate(128);
    if name.is_empty() {
        "image".to_string()
    } else {
        name
    }
}

/// What an import is doing; `done` and `total` are bytes of the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `qemu-img convert` to raw (bytes estimated from its percentage).
    Convert,
    /// Copying a raw file into the catalog while hashing it.
    Copy,
    /// Hashing a converted file.
    Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// Options of [`Catalog::import`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The image name; default [`default_name`] of the file.
    pub name: Option<String>,
    /// The source format (`raw`, `qcow2`, …; anything `qemu-img` reads); default: detected
    /// from the file's magic bytes.
    pub format: Option<String>,
}

/// An image opened read-only ([`Catalog::open`]).
#[derive(Debug)]
pub struct OpenImage {
    pub file: File,
    pub path: PathBuf,
    pub size: u64,
    pub version: ImageVersion,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogFile {
    images: Vec<ImageVersion>,
}

/// The image catalog under `<data_dir>/images`.
#[derive(Debug, Clone)]
pub struct Catalog {
    root: PathBuf,
}

const COPY_CHUNK: usize = 1 << 20;

impl Catalog {
    /// Opens (creating the directories of) the catalog under `<data_dir>/images`.
    pub fn open_dir(data_dir: &Path) -> Result<Catalog> {
        let root = data_dir.join("images");
        for d in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        Ok(Catalog { root })
    }

    /// `<data_dir>/images`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the bytes of an image with this SHA-256 live.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256)
    }

    fn catalog_path(&self) -> PathBuf {
        self.root.join("catalog.json")
    }

    fn load(&self) -> Result<CatalogFile> {
        let path = self.catalog_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(CatalogFile::default()),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    fn store(&self, cat: &CatalogFile) -> Result<()> {
        let path = self.catalog_path();
        let tmp = self.root.join("catalog.json.tmp");
        let bytes = serde_json::to_vec_pretty(cat).expect("catalog serializes");
        let ctx = || format!("writing {}", tmp.display());
        let mut f = File::create(&tmp).map_err(io_err(ctx()))?;
        f.write_all(&bytes).map_err(io_err(ctx()))?;
        f.sync_all().map_err(io_err(ctx()))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))?;
        sync_dir(&self.root)
    }

    /// Takes the catalog's exclusive lock (across processes) for a read-modify-write.
    fn lock(&self) -> Result<File> {
        let path = self.root.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io_err(format!("locking {}", path.display()))(
                io::Error::last_os_error(),
            ));
        }
        Ok(f) // unlocked when closed
    }

    /// Every version of every image, by name then version.
    pub fn list(&self) -> Result<Vec<ImageVersion>> {
        let mut images = self.load()?.images;
        images.sort_by(|a, b| a.name.cmp(&b.name).then(a.version.cmp(&b.version)));
        Ok(images)
    }

    /// The versions of one name, oldest first (an error when there are none).
    pub fn show(&self, name: &str) -> Result<Vec<ImageVersion>> {
        let v: Vec<_> = self
            .list()?
            .into_iter()
            .filter(|i| i.name == name)
            .collect();
        if v.is_empty() {
            return Err(Error::NotFound(name.to_string()));
        }
        Ok(v)
    }

    /// `NAME` → its latest version; `NAME:V` → that version.
    pub fn resolve(&self, spec: &str) -> Result<ImageVersion> {
        let r = ImageRef::parse(spec)?;
        self.resolve_ref(&r)
    }

    pub fn resolve_ref(&self, r: &ImageRef) -> Result<ImageVersion> {
        let cat = self.load()?;
        let found = cat
            .images
            .into_iter()
            .filter(|i| i.name == r.name && r.version.is_none_or(|v| v == i.version))
            .max_by_key(|i| i.version);
        found.ok_or_else(|| Error::NotFound(r.to_string()))
    }

    /// Opens an image read-only by `NAME` or `NAME:VERSION`.
    pub fn open(&self, spec: &str) -> Result<OpenImage> {
        let version = self.resolve(spec)?;
        self.open_version(version)
    }

    pub fn open_version(&self, version: ImageVersion) -> Result<OpenImage> {
        let path = self.blob_path(&version.sha256);
        let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let size = file
            .metadata()
            .map_err(io_err(format!("stat {}", path.display())))?
            .len();
        Ok(OpenImage {
            file,
            path,
            size,
            version,
        })
    }

    /// Removes `NAME:V` (that version) or `NAME` (every version). An image file no version
    /// refers to any more is deleted; clients that have it open keep reading it until they
    /// disconnect. Returns what was removed.
    pub fn remove(&self, spec: &str) -> Result<Vec<ImageVersion>> {
        let r = ImageRef::parse(spec)?;
        let _lock = self.lock()?;
        let mut cat = self.load()?;
        let (removed, kept): (Vec<_>, Vec<_>) = cat
            .images
            .into_iter()
            .partition(|i| i.name == r.name && r.version.is_none_or(|v| v == i.version));
        if removed.is_empty() {
            return Err(Error::NotFound(r.to_string()));
        }
        cat.images = kept;
        self.store(&cat)?;
        for gone in &removed {
            if !cat.images.iter().any(|i| i.sha256 == gone.sha256) {
                let p = self.blob_path(&gone.sha256);
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(format!("removing {}", p.display()))(e)),
                }
            }
        }
        sync_dir(&self.root.join("sha256"))?;
        Ok(removed)
    }

    /// Imports a file: raw files are copied (sparsely: all-zero MiBs become holes) while
    /// hashed; other formats are converted to raw with `qemu-img convert` first. Importing
    /// under a name that exists adds the next version. `progress` is called as bytes go by.
    pub fn import(
        &self,
        src: &Path,
        opts: &ImportOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImageVersion> {
        let name = match &opts.name {
            Some(n) => n.clone(),
            None => default_name(src),
        };
        validate_name(&name)?;
        let format = match &opts.format {
            Some(f) => f.clone(),
            None => detect_format(src)?.to_string(),
        };
        let tmp = self.root.join("tmp").join(format!(
            "import-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let staged = if format == "raw" {
            copy_raw(src, &tmp, progress)
        } else {
            convert(src, &format, &tmp, progress).and_then(|()| hash_file(&tmp, progress))
        };
        let (sha, size) = match staged {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let blob = self.blob_path(&sha);
        let _lock = self.lock()?;
        if blob.exists() {
            let _ = fs::remove_file(&tmp);
        } else {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
                .map_err(io_err(format!("chmod {}", tmp.display())))?;
            fs::rename(&tmp, &blob).map_err(io_err(format!("renaming to {}", blob.display())))?;
            sync_dir(&self.root.join("sha256"))?;
        }
        let mut cat = self.load()?;
        let version = cat
            .images
            .iter()
            .filter(|i| i.name == name)
            .map(|i| i.version)
            .max()
            .unwrap_or(0)
            + 1;
        let entry = ImageVersion {
            name,
            version,
            sha256: sha,
            size,
            imported_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            source: src.display().to_string(),
            source_format: format,
        };
        cat.images.push(entry.clone());
        self.store(&cat)?;
        tracing::info!(image = %entry.reference(), sha256 = %entry.sha256, size = entry.size, "image imported");
        Ok(entry)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
    d.sync_all()
        .map_err(io_err(format!("fsync {}", dir.display())))
}

/// The format of a disk image from its magic bytes: `qcow2`, `qed`, `vmdk`, `vdi`, `vhdx`,
/// `vpc` (dynamic VHD), else `raw`.
pub fn detect_format(path: &Path) -> Result<&'static str> {
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }
    let h = &head[..n];
    Ok(if h.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if h.starts_with(b"QED\0") {
        "qed"
    } else if h.starts_with(b"KDMV") || h.starts_with(b"# Disk DescriptorFile") {
        "vmdk"
    } else if h.len() >= 68 && h[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        "vdi"
    } else if h.starts_with(b"vhdxfile") {
        "vhdx"
    } else if h.starts_with(b"conectix") {
        "vpc"
    } else {
        "raw"
    })
}

fn copy_raw(src: &Path, dst: &Path, progress: &mut dyn FnMut(Progress)) -> Result<(String, u64)> {
    let mut input = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let total = input
        .metadata()
        .map_err(io_err(format!("stat {}", src.display())))?
        .len();
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(io_err(format!("creating {}", dst.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut done = 0u64;
    progress(Progress {
        phase: Phase::Copy,
        done,
        total,
    });
    loop {
        let n = read_full(&mut input, &mut buf)
            .map_err(io_err(format!("reading {}", src.display())))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        if chunk.iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64))
                .map_err(io_err(format!("seeking {}", dst.display())))?;
        } else {
            out.write_all(chunk)
                .map_err(io_err(format!("writing {}", dst.display())))?;
        }
        done += n as u64;
        progress(Progress {
            phase: Phase::Copy,
            done,
            total,
        });
    }
    out.set_len(done)
        .map_err(io_err(format!("truncating {}", dst.display())))?;
    out.sync_all()
        .map_err(io_err(format!("fsync {}", dst.display())))?;
    Ok((hex(&hasher.finalize()), done))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hash_file(path: &Path, progress: &mut dyn FnMut(Progress)) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let total = f
        .metadata()
        .map_err(io_err(format!("stat {}", path.display())))?
        .len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut done = 0u64;
    loop {
        let n =
            read_full(&mut f, &mut buf).map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(Progress {
            phase: Phase::Hash,
            done,
            total,
        });
    }
    f.sync_all()
        .map_err(io_err(format!("fsync {}", path.display())))?;
    Ok((hex(&hasher.finalize()), done))
}

/// `qemu-img convert -p -f FORMAT -O raw SRC DST`, reporting its percentage as progress.
fn convert(src: &Path, format: &str, dst: &Path, progress: &mut dyn FnMut(Progress)) -> Result<()> {
    let cerr = |message: String| Error::Convert {
        path: src.to_path_buf(),
        message,
    };
    // The virtual size, so that progress is in bytes.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(src)
        .output()
        .map_err(|e| cerr(format!("running qemu-img: {e}")))?;
    if !info.status.success() {
        return Err(cerr(
            String::from_utf8_lossy(&info.stderr).trim().to_string(),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&info.stdout)
        .map_err(|e| cerr(format!("qemu-img info output: {e}")))?;
    let total = v.get("virtual-size").and_then(|s| s.as_u64()).unwrap_or(0);
    let mut child = Command::new("qemu-img")
        .args(["convert", "-p", "-f", format, "-O", "raw"])
        .arg(src)
        .arg(dst)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| cerr(format!("running qemu-img: {e}")))?;
    let mut out = child.stdout.take().expect("piped");
    progress(Progress {
        phase: Phase::Convert,
        done: 0,
        total,
    });
    // Output looks like "    (12.34/100%)\r".
    let mut pending = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|&b| b == b'\r' || b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if let Some(pct) = parse_percent(&line) {
                let done = ((total as f64) * pct / 100.0) as u64;
                progress(Progress {
                    phase: Phase::Convert,
                    done: done.min(total),
                    total,
                });
            }
        }
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child
        .wait()
        .map_err(|e| cerr(format!("waiting for qemu-img: {e}")))?;
    if !status.success() {
        return Err(cerr(stderr.trim().to_string()));
    }
    progress(Progress {
        phase: Phase::Convert,
        done: total,
        total,
    });
    Ok(())
}

fn parse_percent(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?;
    let open = s.find('(')?;
    let slash = s[open..].find('/')? + open;
    s[open + 1..slash].trim().parse().ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_parse() {
        assert_eq!(
            ImageRef::parse("deb").unwrap(),
            ImageRef {
                name: "deb".into(),
                version: None
            }
        );
        assert_eq!(
            ImageRef::parse("deb-12.x:3").unwrap(),
            ImageRef {
                name: "deb-12.x".into(),
                version: Some(3)
            }
        );
        for bad in [
            "", ":1", "deb:", "deb:0", "deb:x", "a/b", "../x", "-x", "a@b", "deb:1:2",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_names() {
        assert_eq!(default_name(Path::new("/x/debian-12.qcow2")), "debian-12");
        assert_eq!(default_name(Path::new("/x/my disk.raw")), "my-disk");
        assert_eq!(default_name(Path::new("/x/.hidden")), "image");
    }

    #[test]
    fn percent() {
        assert_eq!(parse_percent(b"    (12.50/100%)\r"), Some(12.5));
        assert_eq!(parse_percent(b"garbage"), None);
    }
}

//! fleetboot's disk image catalog.
//!
//! Map of the crate:
//! - [`Catalog`]: the catalog under `<data_dir>/images/`: [`Catalog::import`] (raw files copied
//!   sparsely while hashed; qcow2, vmdk, vdi, vhdx, qed converted with `qemu-img convert -O raw`),
//!   [`Catalog::list`], [`Catalog::show`], [`Catalog::resolve`], [`Catalog::remove`] and
//!   [`Catalog::open`] (read-only, for the HTTP Range service and the NBD server).
//! - [`ImageRef`]: `NAME` (the latest version) or `NAME:VERSION`.
//! - [`ImageVersion`]: one version of a named image: its SHA-256, size, origin.
//! - [`range::byte_range`]: the `Range` header of a request for an image or file.
//!
//! Layout on disk:
//! - `images/sha256/<hex>`: the image bytes, raw, content-addressed, mode 0444. Two names or
//!   versions with the same content share one file.
//! - `images/catalog.json`: names and versions, replaced atomically (temp file, fsync, rename,
//!   fsync of the directory) under an exclusive `flock` on `images/.lock`, so a CLI import and
//!   a running server never lose each other's changes. Readers just read the file.
//! - `images/tmp/`: imports in progress (removed on failure; each holds an `flock` on its
//!   file while it runs, so the first [`Catalog::open_dir`] of a process removes the ones a
//!   killed import left and no others).
//!
//! Every entry of `catalog.json` is checked when it is read ([`parse_catalog`]): a
//! `sha256` that is not 64 lower-case hex digits (it becomes a path) makes the file
//! corrupt, not a path outside `sha256/`. An import hashes the copy it stored, read back
//! from the disk, before the catalog names it; [`Catalog::verify`] re-hashes stored images.
//!
//! Image metadata lives in this JSON file and not in SQLite so that the catalog (bytes and
//! names) is one directory an operator can copy or rsync to another server as a whole.

pub mod range;

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
    #[error("the stored copy {path} hashes to {found}, not {expected}: the disk or the filesystem changed it")]
    Mismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
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
    /// Reading the stored copy back and hashing it (after an import; `fleetboot image
    /// verify`).
    Verify,
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
    /// Opens (creating the directories of) the catalog under `<data_dir>/images`. The first
    /// time a process opens a catalog, imports a killed process left in `images/tmp` are
    /// removed (imports still running hold a lock on their file and are left alone).
    pub fn open_dir(data_dir: &Path) -> Result<Catalog> {
        let root = data_dir.join("images");
        for d in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let catalog = Catalog { root };
        static CLEANED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        let first = {
            let mut done = CLEANED.lock().unwrap_or_else(|e| e.into_inner());
            let key = fs::canonicalize(&catalog.root).unwrap_or_else(|_| catalog.root.clone());
            if done.contains(&key) {
                false
            } else {
                done.push(key);
                true
            }
        };
        if first {
            match catalog.remove_leftovers() {
                Ok(0) => {}
                Ok(n) => tracing::warn!(removed = n, dir = %catalog.root.join("tmp").display(), "removed what interrupted imports left"),
                Err(e) => tracing::warn!(error = %e, "cleaning images/tmp"),
            }
        }
        Ok(catalog)
    }

    /// Removes the files in `images/tmp` that no running import holds (an import locks its
    /// file until it is renamed into `sha256/` or removed). Returns how many went.
    pub fn remove_leftovers(&self) -> Result<usize> {
        let tmp = self.root.join("tmp");
        let entries = fs::read_dir(&tmp).map_err(io_err(format!("reading {}", tmp.display())))?;
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(f) = File::open(&path) else { continue };
            if !try_lock(&f) {
                continue; // an import in progress
            }
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
            }
        }
        if removed > 0 {
            sync_dir(&tmp)?;
        }
        Ok(removed)
    }

    /// `<data_dir>/images`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the bytes of an image with this SHA-256 live. `sha256` must be one
    /// [`is_sha256_hex`] accepts (everything read from the catalog is).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256)
    }

    fn catalog_path(&self) -> PathBuf {
        self.root.join("catalog.json")
    }

    fn load(&self) -> Result<CatalogFile> {
        let path = self.catalog_path();
        match fs::read(&path) {
            Ok(bytes) => parse_catalog(&bytes)
                .map(|images| CatalogFile { images })
                .map_err(|message| Error::Corrupt {
                    path: path.clone(),
                    message,
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
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            // A disk that filled up leaves no half-written file behind; catalog.json is as
            // it was.
            let _ = fs::remove_file(&tmp);
            return Err(io_err(ctx())(e));
        }
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
        if !is_sha256_hex(&version.sha256) {
            return Err(Error::Corrupt {
                path: self.catalog_path(),
                message: format!("{}: sha256 {:?} is not 64 lower-case hex digits", version.reference(), version.sha256),
            });
        }
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
    /// hashed; other formats are converted to raw with `qemu-img convert` first. The stored
    /// copy is then read back from the disk and hashed before the catalog names it (a raw
    /// copy must hash like its source). Importing under a name that exists adds the next
    /// version. `progress` is called as bytes go by.
    ///
    /// On any failure (a full disk included) nothing of the import stays: no file in
    /// `tmp/`, no new file in `sha256/`, `catalog.json` as it was.
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
        // Created and locked before anything is written: a catalog opened by another
        // process meanwhile leaves it alone; once this process is gone, it is a leftover.
        let staging = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(format!("creating {}", tmp.display())))?;
        if !try_lock(&staging) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(format!("locking {}", tmp.display()))(io::Error::last_os_error()));
        }
        let result = self.import_staged(src, &name, &format, &tmp, &staging, progress);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn import_staged(
        &self,
        src: &Path,
        name: &str,
        format: &str,
        tmp: &Path,
        staging: &File,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImageVersion> {
        let (sha, size) = if format == "raw" {
            let (streamed, size) = copy_raw(src, staging, tmp, progress)?;
            let (stored, _) = hash_stored(tmp, Phase::Verify, progress)?;
            if stored != streamed {
                return Err(Error::Mismatch {
                    path: tmp.to_path_buf(),
                    expected: streamed,
                    found: stored,
                });
            }
            (stored, size)
        } else {
            convert(src, format, tmp, progress)?;
            // The hash of the converted image is its identity: taken from the stored copy,
            // read back from the disk.
            hash_stored(tmp, Phase::Hash, progress)?
        };
        let blob = self.blob_path(&sha);
        let _lock = self.lock()?;
        let mut created = false;
        let present = match blob.exists() {
            false => false,
            true => match hash_stored(&blob, Phase::Verify, progress) {
                Ok((found, _)) if found == sha => true,
                Ok((found, _)) => {
                    tracing::warn!(blob = %blob.display(), found, "a stored image did not match its name; replaced by the verified import");
                    false
                }
                Err(e) => {
                    tracing::warn!(blob = %blob.display(), error = %e, "a stored image was unreadable; replaced by the verified import");
                    false
                }
            },
        };
        if present {
            let _ = fs::remove_file(tmp);
        } else {
            fs::set_permissions(tmp, fs::Permissions::from_mode(0o444))
                .map_err(io_err(format!("chmod {}", tmp.display())))?;
            fs::rename(tmp, &blob).map_err(io_err(format!("renaming to {}", blob.display())))?;
            created = !blob_was_named(&self.load().unwrap_or_default(), &sha);
            sync_dir(&self.root.join("sha256"))?;
        }
        let stored = (|| {
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
                name: name.to_string(),
                version,
                sha256: sha.clone(),
                size,
                imported_at: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                source: src.display().to_string(),
                source_format: format.to_string(),
            };
            cat.images.push(entry.clone());
            self.store(&cat)?;
            Ok(entry)
        })();
        match stored {
            Ok(entry) => {
                tracing::info!(image = %entry.reference(), sha256 = %entry.sha256, size = entry.size, "image imported");
                Ok(entry)
            }
            Err(e) => {
                // The catalog does not name it: the file this import added goes too.
                if created {
                    let _ = fs::remove_file(&blob);
                    let _ = sync_dir(&self.root.join("sha256"));
                }
                Err(e)
            }
        }
    }

    /// Re-hashes the stored images (of `name`, or all) against the SHA-256 they are stored
    /// under: one [`Scrubbed`] per stored file, with the versions that use it.
    pub fn verify(&self, name: Option<&str>, progress: &mut dyn FnMut(Progress)) -> Result<Vec<Scrubbed>> {
        let images = match name {
            Some(n) if n.contains(':') => vec![self.resolve(n)?],
            Some(n) => self.show(n)?,
            None => self.list()?,
        };
        let mut by_sha: Vec<Scrubbed> = Vec::new();
        for i in images {
            match by_sha.iter_mut().find(|s| s.sha256 == i.sha256) {
                Some(s) => s.used_by.push(i.reference()),
                None => by_sha.push(Scrubbed {
                    sha256: i.sha256.clone(),
                    size: i.size,
                    used_by: vec![i.reference()],
                    outcome: Outcome::Intact,
                }),
            }
        }
        for s in &mut by_sha {
            let path = self.blob_path(&s.sha256);
            s.outcome = match fs::metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Outcome::Missing,
                Err(e) => Outcome::Unreadable(e.to_string()),
                Ok(m) if m.len() != s.size => Outcome::WrongSize(m.len()),
                Ok(_) => match hash_stored(&path, Phase::Verify, progress) {
                    Ok((found, _)) if found == s.sha256 => Outcome::Intact,
                    Ok((found, _)) => Outcome::Corrupt(found),
                    Err(e) => Outcome::Unreadable(e.to_string()),
                },
            };
        }
        Ok(by_sha)
    }
}

/// What [`Catalog::verify`] found for one stored file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scrubbed {
    pub sha256: String,
    /// The size the catalog records.
    pub size: u64,
    /// `NAME:VERSION` of every version stored in this file.
    pub used_by: Vec<String>,
    pub outcome: Outcome,
}

/// The state of a stored image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its bytes hash to the SHA-256 it is stored under.
    Intact,
    /// No such file.
    Missing,
    /// Its size (given) is not the one the catalog records.
    WrongSize(u64),
    /// Its bytes hash to this other SHA-256.
    Corrupt(String),
    /// Reading it failed.
    Unreadable(String),
}

impl Outcome {
    pub fn is_intact(&self) -> bool {
        matches!(self, Outcome::Intact)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Intact => f.write_str("ok"),
            Outcome::Missing => f.write_str("missing"),
            Outcome::WrongSize(n) => write!(f, "wrong size ({n} bytes)"),
            Outcome::Corrupt(sha) => write!(f, "corrupt (hashes to {sha})"),
            Outcome::Unreadable(e) => write!(f, "unreadable ({e})"),
        }
    }
}

fn blob_was_named(cat: &CatalogFile, sha: &str) -> bool {
    cat.images.iter().any(|i| i.sha256 == sha)
}

/// Whether `s` can name a stored image: 64 lower-case hex digits (and so never a path).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads `catalog.json` and checks every entry: a valid name, a version from 1, a SHA-256
/// of 64 lower-case hex digits, no `NAME:VERSION` twice. The message says which entry is
/// wrong.
pub fn parse_catalog(bytes: &[u8]) -> std::result::Result<Vec<ImageVersion>, String> {
    let file: CatalogFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut seen = std::collections::HashSet::new();
    for (i, v) in file.images.iter().enumerate() {
        if validate_name(&v.name).is_err() {
            return Err(format!("images[{i}]: invalid name {:?}", v.name));
        }
        if v.version == 0 {
            return Err(format!("images[{i}] ({}): version 0", v.name));
        }
        if !is_sha256_hex(&v.sha256) {
            return Err(format!(
                "images[{i}] ({}): sha256 {:?} is not 64 lower-case hex digits",
                v.reference(),
                v.sha256
            ));
        }
        if !seen.insert((v.name.as_str(), v.version)) {
            return Err(format!("images[{i}]: {} appears twice", v.reference()));
        }
    }
    Ok(file.images)
}

/// `flock(LOCK_EX | LOCK_NB)`: whether this open file now holds the lock.
fn try_lock(f: &File) -> bool {
    // SAFETY: flock on an fd we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
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

/// Copies `src` into `out` (the file at `dst`), sparsely, hashing the source stream.
fn copy_raw(src: &Path, out: &File, dst: &Path, progress: &mut dyn FnMut(Progress)) -> Result<(String, u64)> {
    let mut input = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let total = input
        .metadata()
        .map_err(io_err(format!("stat {}", src.display())))?
        .len();
    let mut out = out;
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

/// Hashes a stored file as the disk holds it: flushed, its cached pages dropped, then read
/// back (`phase` names the progress).
fn hash_stored(path: &Path, phase: Phase, progress: &mut dyn FnMut(Progress)) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    f.sync_all()
        .map_err(io_err(format!("fsync {}", path.display())))?;
    // SAFETY: advice on an fd we own; clean pages are dropped so the read below comes from
    // the disk, not from what this process just wrote.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let total = f
        .metadata()
        .map_err(io_err(format!("stat {}", path.display())))?
        .len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut done = 0u64;
    progress(Progress { phase, done, total });
    loop {
        let n =
            read_full(&mut f, &mut buf).map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(Progress { phase, done, total });
    }
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

//! The composite bundle: one file an operator installs on the master, which unpacks into
//! boot images, packages, classes and nodes. Updates come the same way.
//!
//! Format (see `docs/fleet.md`): a POSIX tar holding
//! - `manifest.toml` — `format = 1`, then `[[image]]`, `[[package]]`, `[[class]]`,
//!   `[[node]]` tables; every file of every build as `{ path, sha256, size }`;
//! - `manifest.sig` (optional) — `key = "<ed25519 public key, hex>"`,
//!   `signature = "<hex>"` over `fleetboot-bundle-v1\n` + the bytes of `manifest.toml`;
//!   the manifest names every blob by hash, so this covers the whole bundle;
//! - `blobs/<sha256>` — file contents by hash, each once. A bundle may leave out blobs
//!   the master already holds (an update that only changes classes, say).
//!
//! [`build`] makes a bundle from a directory with a `bundle.toml` (the same tables, files
//! given as `{ path, source }` relative to the directory). [`open`] reads one: it stages
//! and checks every blob, the signature and the manifest; [`plan`] checks the result
//! against the database (immutable versions, dependencies, cycles, and every node's
//! selection) and returns the changes to commit — or an error naming the problem, with
//! nothing imported.

use crate::blobs::{BlobError, BlobStore, Staged};
use crate::model::{Build, Change, Class, Dependency, FieldError, FileEntry, FleetDb, Kind, Node, Package, Sha256};
use crate::select::{self, Want};
use crate::version::Version;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;
const SIGNING_CONTEXT: &[u8] = b"fleetboot-bundle-v1\n";
/// Largest manifest accepted: it is parsed in memory.
pub const MAX_MANIFEST: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the bundle is truncated or not a tar archive: {0}")]
    Truncated(String),
    #[error("the bundle has no manifest.toml")]
    NoManifest,
    #[error("bundle entry {0:?} is not expected (only manifest.toml, manifest.sig and blobs/<sha256>)")]
    UnexpectedEntry(String),
    #[error("{file}: {problem}")]
    Manifest { file: String, problem: String },
    #[error("blobs/{name}: {source}")]
    Blob { name: String, source: BlobError },
    #[error("{package} ({arch}) file {path:?}: blob {sha256} is neither in the bundle nor on the master")]
    MissingBlob { package: String, arch: String, path: String, sha256: Sha256 },
    #[error("{package} ({arch}) file {path:?}: manifest says {expected} bytes, the blob has {actual}")]
    SizeMismatch { package: String, arch: String, path: String, expected: u64, actual: u64 },
    #[error("manifest.sig: {0}")]
    Signature(String),
    #[error("{0}")]
    Database(String),
    #[error("package {package}: depends on {dependency} {constraint}, which no package version satisfies (available: {available})")]
    MissingDependency { package: String, dependency: String, constraint: String, available: String },
    #[error("dependency cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
    #[error("{} node(s) could not be served after this import:\n  {}", .0.len(), .0.join("\n  "))]
    Unresolvable(Vec<String>),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

// ---- the manifest -------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<Sha256>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    /// bundle.toml only: the file in the source directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    arch: String,
    files: Vec<RawFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackage {
    name: String,
    version: Version,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    node_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    depends: Vec<Dependency>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    provides: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    build: Vec<RawBuild>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    format: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    image: Vec<RawPackage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    package: Vec<RawPackage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    class: Vec<Class>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    node: Vec<Node>,
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub description: Option<String>,
    pub packages: Vec<Package>,
    pub classes: Vec<Class>,
    pub nodes: Vec<Node>,
}

impl Manifest {
    pub fn changes(&self) -> Vec<Change> {
        let mut c: Vec<Change> = self.packages.iter().cloned().map(Change::AddPackage).collect();
        c.extend(self.classes.iter().cloned().map(Change::PutClass));
        c.extend(self.nodes.iter().cloned().map(Change::PutNode));
        c
    }

    /// Every distinct blob the manifest refers to, with its size.
    pub fn blobs(&self) -> BTreeMap<Sha256, u64> {
        self.packages.iter().flat_map(|p| &p.builds).flat_map(|b| &b.files).map(|f| (f.sha256.clone(), f.size)).collect()
    }
}

fn parse_raw(text: &str, file: &str) -> Result<RawManifest, BundleError> {
    let err = |problem: String| BundleError::Manifest { file: file.to_string(), problem };
    let raw: RawManifest = toml::from_str(text).map_err(|e| err(toml_error(&e, text)))?;
    if raw.format != FORMAT {
        return Err(err(format!("format: {} is not a format this master reads (it reads {FORMAT})", raw.format)));
    }
    Ok(raw)
}

/// toml's own rendering spans several lines with a source excerpt; one line is kinder
/// to logs and API errors: `line N: <reason>`.
fn toml_error(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let line = text.get(..span.start).map_or(0, |t| t.matches('\n').count()) + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

fn convert(raw: RawManifest, file: &str, source_dir: Option<&Path>) -> Result<Manifest, BundleError> {
    let err = |e: FieldError| BundleError::Manifest { file: file.to_string(), problem: e.to_string() };
    let mut packages = Vec::new();
    let mut seen = BTreeSet::new();
    for (kind, table, list) in [(Kind::Image, "image", raw.image), (Kind::Package, "package", raw.package)] {
        for (i, rp) in list.into_iter().enumerate() {
            let at = format!("{table}[{i}] ({} {})", rp.name, rp.version);
            let mut builds = Vec::new();
            for (bi, rb) in rp.build.into_iter().enumerate() {
                let mut files = Vec::new();
                for (fi, rf) in rb.files.into_iter().enumerate() {
                    let field = format!("build[{bi}].files[{fi}]");
                    let entry = match source_dir {
                        Some(dir) => {
                            let src = rf.source.as_deref().unwrap_or(&rf.path);
                            crate::model::validate_file_path(&format!("{field}.source"), src).map_err(|e| err(e.within(&at)))?;
                            let p = dir.join(src);
                            let (sha256, size) = crate::blobs::hash_file(&p).map_err(io_err(&p))?;
                            FileEntry { path: rf.path, sha256, size }
                        }
                        None => {
                            if rf.source.is_some() {
                                return Err(err(FieldError::new(format!("{field}.source"), "only bundle.toml names source files; a bundle's manifest names blobs by sha256").within(&at)));
                            }
                            let sha256 = rf.sha256.ok_or_else(|| err(FieldError::new(format!("{field}.sha256"), "missing").within(&at)))?;
                            let size = rf.size.ok_or_else(|| err(FieldError::new(format!("{field}.size"), "missing").within(&at)))?;
                            FileEntry { path: rf.path, sha256, size }
                        }
                    };
                    files.push(entry);
                }
                builds.push(Build { arch: rb.arch, files });
            }
            let p = Package {
                name: rp.name,
                version: rp.version,
                kind,
                node_types: rp.node_types,
                depends: rp.depends,
                provides: rp.provides,
                builds,
                metadata: rp.metadata,
            };
            p.validate().map_err(|e| err(e.within(&at)))?;
            if !seen.insert((p.name.clone(), p.version.clone())) {
                return Err(err(FieldError::new(at, "listed twice")));
            }
            packages.push(p);
        }
    }
    let mut names = BTreeSet::new();
    for (i, c) in raw.class.iter().enumerate() {
        c.validate().map_err(|e| err(e.within(&format!("class[{i}]"))))?;
        if !names.insert(&c.name) {
            return Err(err(FieldError::new(format!("class[{i}].name"), format!("{:?} is listed twice", c.name))));
        }
    }
    let mut names = BTreeSet::new();
    let mut macs = BTreeSet::new();
    for (i, n) in raw.node.iter().enumerate() {
        n.validate().map_err(|e| err(e.within(&format!("node[{i}]"))))?;
        if !names.insert(&n.name) {
            return Err(err(FieldError::new(format!("node[{i}].name"), format!("{:?} is listed twice", n.name))));
        }
        if !macs.insert(n.mac) {
            return Err(err(FieldError::new(format!("node[{i}].mac"), format!("{} is listed twice", n.mac))));
        }
    }
    Ok(Manifest { description: raw.description, packages, classes: raw.class, nodes: raw.node })
}

/// Parses and validates a bundle's `manifest.toml`.
pub fn parse_manifest(text: &str) -> Result<Manifest, BundleError> {
    convert(parse_raw(text, "manifest.toml")?, "manifest.toml", None)
}

fn render_manifest(m: &Manifest) -> String {
    let raw_pkg = |p: &Package| RawPackage {
        name: p.name.clone(),
        version: p.version.clone(),
        node_types: p.node_types.clone(),
        depends: p.depends.clone(),
        provides: p.provides.clone(),
        metadata: p.metadata.clone(),
        build: p
            .builds
            .iter()
            .map(|b| RawBuild {
                arch: b.arch.clone(),
                files: b.files.iter().map(|f| RawFile { path: f.path.clone(), sha256: Some(f.sha256.clone()), size: Some(f.size), source: None }).collect(),
            })
            .collect(),
    };
    let raw = RawManifest {
        format: FORMAT,
        description: m.description.clone(),
        image: m.packages.iter().filter(|p| p.kind == Kind::Image).map(raw_pkg).collect(),
        package: m.packages.iter().filter(|p| p.kind == Kind::Package).map(raw_pkg).collect(),
        class: m.classes.clone(),
        node: m.nodes.clone(),
    };
    toml::to_string(&raw).unwrap_or_default()
}

// ---- signing keys ---------------------------------------------------------------------

/// An ed25519 signing key for bundles, stored as 64 hex digits (the secret seed).
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    pub fn generate() -> Result<SigningKey, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    pub fn from_hex(s: &str) -> Option<SigningKey> {
        crate::unhex::<32>(s.trim()).map(|b| SigningKey(ed25519_dalek::SigningKey::from_bytes(&b)))
    }

    pub fn to_hex(&self) -> String {
        crate::hex(&self.0.to_bytes())
    }

    /// The public key as 64 hex digits: what a master lists in `fleet.trusted_bundle_keys`.
    pub fn public_hex(&self) -> String {
        crate::hex(self.0.verifying_key().as_bytes())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigFile {
    key: String,
    signature: String,
}

/// Which signatures a master accepts.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Public keys (hex). Empty: unsigned bundles are accepted (signed ones must verify
    /// under a key listed here, so none are); non-empty: every bundle must be signed by one.
    pub keys: Vec<String>,
}

fn check_signature(manifest: &[u8], sig: Option<&[u8]>, trust: &Trust) -> Result<Option<String>, BundleError> {
    let bad = |s: String| BundleError::Signature(s);
    let Some(sig) = sig else {
        if trust.keys.is_empty() {
            return Ok(None);
        }
        return Err(bad("missing: this master accepts only bundles signed by a trusted key (fleet.trusted_bundle_keys)".into()));
    };
    let text = std::str::from_utf8(sig).map_err(|_| bad("not UTF-8 text".into()))?;
    let s: SigFile = toml::from_str(text).map_err(|e| bad(toml_error(&e, text)))?;
    let key_bytes = crate::unhex::<32>(&s.key).ok_or_else(|| bad("key: not 64 hex digits".into()))?;
    let sig_bytes = crate::unhex::<64>(&s.signature).ok_or_else(|| bad("signature: not 128 hex digits".into()))?;
    if !trust.keys.iter().any(|k| k.eq_ignore_ascii_case(&s.key)) {
        return Err(bad(format!("signed by key {}, which this master does not trust (fleet.trusted_bundle_keys)", s.key)));
    }
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key_bytes).map_err(|_| bad("key: not a valid ed25519 public key".into()))?;
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(manifest);
    key.verify(&msg, &ed25519_dalek::Signature::from_bytes(&sig_bytes))
        .map_err(|_| bad(format!("the signature does not match manifest.toml (key {})", s.key)))?;
    Ok(Some(s.key))
}

// ---- building -------------------------------------------------------------------------

/// What `build` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Built {
    pub packages: usize,
    pub classes: usize,
    pub nodes: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub signed_by: Option<String>,
}

/// Makes a bundle from `dir/bundle.toml` and the files it names.
pub fn build(dir: &Path, out: &Path, key: Option<&SigningKey>) -> Result<Built, BundleError> {
    let src = dir.join("bundle.toml");
    let text = std::fs::read_to_string(&src).map_err(io_err(&src))?;
    let manifest = convert(parse_raw(&text, "bundle.toml")?, "bundle.toml", Some(dir))?;
    let rendered = render_manifest(&manifest);
    // Where each blob's content is, by hash (first file with that hash).
    let mut sources: BTreeMap<Sha256, PathBuf> = BTreeMap::new();
    let raw = parse_raw(&text, "bundle.toml")?;
    for rp in raw.image.iter().chain(raw.package.iter()) {
        for rb in &rp.build {
            for rf in &rb.files {
                let p = dir.join(rf.source.as_deref().unwrap_or(&rf.path));
                let (sha, _) = crate::blobs::hash_file(&p).map_err(io_err(&p))?;
                sources.entry(sha).or_insert(p);
            }
        }
    }
    let tmp = out.with_extension("partial");
    let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(f));
    let add = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, bytes)
    };
    let signed_by = key.map(|k| k.public_hex());
    (|| -> std::io::Result<()> {
        add(&mut tar, "manifest.toml", rendered.as_bytes())?;
        if let Some(k) = key {
            let mut msg = SIGNING_CONTEXT.to_vec();
            msg.extend_from_slice(rendered.as_bytes());
            let sig = SigFile { key: k.public_hex(), signature: crate::hex(&k.0.sign(&msg).to_bytes()) };
            add(&mut tar, "manifest.sig", toml::to_string(&sig).unwrap_or_default().as_bytes())?;
        }
        for (sha, path) in &sources {
            let mut f = std::fs::File::open(path)?;
            tar.append_file(format!("blobs/{sha}"), &mut f)?;
        }
        tar.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()
    })()
    .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    Ok(Built {
        packages: manifest.packages.len(),
        classes: manifest.classes.len(),
        nodes: manifest.nodes.len(),
        blobs: sources.len(),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        signed_by,
    })
}

// ---- reading and checking -------------------------------------------------------------

/// A bundle whose blobs are staged and hash-checked, whose signature verified and whose
/// manifest is valid. Dropping it removes the staged blobs.
#[derive(Debug)]
pub struct Opened {
    pub manifest: Manifest,
    pub signed_by: Option<String>,
    staged: BTreeMap<Sha256, Staged>,
}

/// Reads a bundle: every blob is staged and must hash to its name, the signature must
/// verify (per `trust`) and the manifest must be valid, with every file's blob either in
/// the bundle or already in `blobs` at the stated size.
pub fn open(file: &Path, blobs: &BlobStore, trust: &Trust) -> Result<Opened, BundleError> {
    let mut f = std::fs::File::open(file).map_err(io_err(file))?;
    check_end_of_archive(&mut f, file)?;
    let f = std::fs::File::open(file).map_err(io_err(file))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(f));
    let truncated = |e: std::io::Error| BundleError::Truncated(e.to_string());
    let mut manifest_bytes = None;
    let mut sig_bytes = None;
    let mut staged: BTreeMap<Sha256, Staged> = BTreeMap::new();
    for entry in archive.entries().map_err(truncated)? {
        let mut entry = entry.map_err(truncated)?;
        let name = entry.path().map_err(truncated)?.to_string_lossy().into_owned();
        if !entry.header().entry_type().is_file() {
            return Err(BundleError::UnexpectedEntry(name));
        }
        let size = entry.header().size().map_err(truncated)?;
        match name.as_str() {
            "manifest.toml" | "manifest.sig" => {
                if size > MAX_MANIFEST {
                    return Err(BundleError::Manifest { file: name, problem: format!("{size} bytes is more than the {MAX_MANIFEST} allowed") });
                }
                let mut buf = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut buf).map_err(truncated)?;
                if buf.len() as u64 != size {
                    return Err(BundleError::Truncated(format!("{name}: {} of {size} bytes", buf.len())));
                }
                let slot = if name == "manifest.toml" { &mut manifest_bytes } else { &mut sig_bytes };
                if slot.replace(buf).is_some() {
                    return Err(BundleError::UnexpectedEntry(format!("{name} (a second one)")));
                }
            }
            _ => {
                let Some(hex) = name.strip_prefix("blobs/") else { return Err(BundleError::UnexpectedEntry(name)) };
                let expected: Sha256 = hex.parse().map_err(|_| BundleError::UnexpectedEntry(name.clone()))?;
                let st = blobs.stage(&mut entry, size).map_err(|source| match source {
                    BlobError::Io { source, .. } => BundleError::Truncated(format!("{name}: {source}")),
                    source => BundleError::Blob { name: hex.to_string(), source },
                })?;
                if st.size != size {
                    return Err(BundleError::Truncated(format!("{name}: {} of {size} bytes", st.size)));
                }
                if st.sha256 != expected {
                    return Err(BundleError::Blob {
                        name: hex.to_string(),
                        source: BlobError::Mismatch { expected, actual: st.sha256.clone() },
                    });
                }
                staged.insert(expected, st);
            }
        }
    }
    let manifest_bytes = manifest_bytes.ok_or(BundleError::NoManifest)?;
    let signed_by = check_signature(&manifest_bytes, sig_bytes.as_deref(), trust)?;
    let text = std::str::from_utf8(&manifest_bytes)
        .map_err(|_| BundleError::Manifest { file: "manifest.toml".into(), problem: "not UTF-8 text".into() })?;
    let manifest = parse_manifest(text)?;
    // Content nothing refers to is not imported; content already in place stays as it is.
    let referenced = manifest.blobs();
    staged.retain(|sha, st| referenced.contains_key(sha) && !blobs.has(sha, st.size));
    for p in &manifest.packages {
        for b in &p.builds {
            for f in &b.files {
                let size = match staged.get(&f.sha256) {
                    Some(s) => s.size,
                    None if blobs.has(&f.sha256, f.size) => f.size,
                    None => {
                        return Err(BundleError::MissingBlob {
                            package: p.id(),
                            arch: b.arch.clone(),
                            path: f.path.clone(),
                            sha256: f.sha256.clone(),
                        })
                    }
                };
                if size != f.size {
                    return Err(BundleError::SizeMismatch { package: p.id(), arch: b.arch.clone(), path: f.path.clone(), expected: f.size, actual: size });
                }
            }
        }
    }
    Ok(Opened { manifest, signed_by, staged })
}

/// A tar ends with two 512-byte zero blocks. A bundle cut short at an entry boundary
/// would otherwise read as a shorter, valid archive.
fn check_end_of_archive(f: &mut std::fs::File, path: &Path) -> Result<(), BundleError> {
    use std::io::{Seek, SeekFrom};
    let len = f.metadata().map_err(io_err(path))?.len();
    if len < 1024 || len % 512 != 0 {
        return Err(BundleError::Truncated(format!("{len} bytes is not a whole number of 512-byte tar blocks")));
    }
    f.seek(SeekFrom::End(-1024)).map_err(io_err(path))?;
    let mut tail = [0u8; 1024];
    f.read_exact(&mut tail).map_err(io_err(path))?;
    if tail.iter().any(|b| *b != 0) {
        return Err(BundleError::Truncated("no end-of-archive marker".into()));
    }
    Ok(())
}

/// What an import would change.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The changes to commit, in order.
    #[serde(skip)]
    pub changes: Vec<Change>,
    pub new_packages: Vec<String>,
    pub unchanged_packages: Vec<String>,
    pub classes: Vec<String>,
    pub nodes: Vec<String>,
    /// Every node's selection after the import, checked.
    pub nodes_checked: usize,
    pub new_blobs: usize,
    pub new_bytes: u64,
    pub signed_by: Option<String>,
}

/// Checks an opened bundle against the database: immutable versions, every dependency of
/// every package satisfiable, no cycle, and every node's selection resolvable.
pub fn plan(db: &FleetDb, opened: &Opened) -> Result<Plan, BundleError> {
    let mut after = db.clone();
    let mut new_packages = Vec::new();
    let mut unchanged = Vec::new();
    for c in opened.manifest.changes() {
        if let Change::AddPackage(p) = &c {
            if db.package(&p.name, &p.version).is_some_and(|old| old == p) {
                unchanged.push(p.id());
            } else {
                new_packages.push(p.id());
            }
        }
        after.apply(&c).map_err(|e| BundleError::Database(e.to_string()))?;
    }
    for p in after.all_packages() {
        for d in &p.depends {
            if !after.versions(&d.name).any(|c| c.kind == Kind::Package && d.version.matches(&c.version)) {
                return Err(BundleError::MissingDependency {
                    package: p.id(),
                    dependency: d.name.clone(),
                    constraint: d.version.to_string(),
                    available: {
                        let a: Vec<String> = after.versions(&d.name).map(|c| c.version.to_string()).collect();
                        if a.is_empty() { "none".into() } else { a.join(", ") }
                    },
                });
            }
        }
    }
    if let Some(cycle) = select::find_cycle(after.all_packages()) {
        return Err(BundleError::Cycle(cycle));
    }
    let mut problems = Vec::new();
    for n in after.nodes.values() {
        if let Err(e) = select::select(&after, n, Want::Configured) {
            problems.push(e.to_string());
        }
        if let Err(e) = select::select_test(&after, n, Want::Configured) {
            problems.push(format!("{e} (test mode)"));
        }
    }
    if !problems.is_empty() {
        return Err(BundleError::Unresolvable(problems));
    }
    Ok(Plan {
        changes: opened.manifest.changes(),
        new_packages,
        unchanged_packages: unchanged,
        classes: opened.manifest.classes.iter().map(|c| c.name.clone()).collect(),
        nodes: opened.manifest.nodes.iter().map(|n| n.name.clone()).collect(),
        nodes_checked: after.nodes.len(),
        new_blobs: opened.staged.len(),
        new_bytes: opened.staged.values().map(|s| s.size).sum(),
        signed_by: opened.signed_by.clone(),
    })
}

impl Opened {
    /// Moves the staged blobs into the blob directory; then the database may refer to them.
    pub fn commit_blobs(mut self, blobs: &BlobStore) -> Result<(), BundleError> {
        for (sha, st) in std::mem::take(&mut self.staged) {
            blobs.commit(st, &sha).map_err(|source| BundleError::Blob { name: sha.to_string(), source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLE_TOML: &str = r#"
format = 1
description = "release 1"

[[image]]
name = "lc-boot"
version = "1.0"
node_types = ["linecard"]
[[image.build]]
arch = "x86_64"
files = [{ path = "vmlinuz", source = "img/vmlinuz" }]

[[package]]
name = "base"
version = "1.0"
provides = ["core"]
[[package.build]]
arch = "noarch"
files = [{ path = "bin/base", source = "pkg/base" }]

[[package]]
name = "routing"
version = "2.0"
depends = [{ name = "base", version = ">=1" }]
provides = ["bgp"]
metadata = { description = "BGP and OSPF" }
[[package.build]]
arch = "x86_64"
files = [{ path = "bin/routing", source = "pkg/routing" }, { path = "share/copy", source = "pkg/base" }]

[[class]]
name = "linecards"
packages = { routing = "latest" }

[[node]]
name = "lc1"
mac = "52:54:00:66:00:01"
type = "linecard"
arch = "x86_64"
class = "linecards"
location = "shelf1/slot1"
"#;

    struct Fixture {
        dir: tempfile::TempDir,
        blobs: BlobStore,
    }

    impl Fixture {
        fn new(bundle_toml: &str) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src");
            std::fs::create_dir_all(src.join("img")).unwrap();
            std::fs::create_dir_all(src.join("pkg")).unwrap();
            std::fs::write(src.join("img/vmlinuz"), b"kernel bytes").unwrap();
            std::fs::write(src.join("pkg/base"), b"base 1.0").unwrap();
            std::fs::write(src.join("pkg/routing"), b"routing 2.0").unwrap();
            std::fs::write(src.join("bundle.toml"), bundle_toml).unwrap();
            let blobs = BlobStore::open(&dir.path().join("blobs")).unwrap();
            Fixture { dir, blobs }
        }

        fn build(&self, key: Option<&SigningKey>) -> PathBuf {
            let out = self.dir.path().join("out.fbundle");
            build(&self.dir.path().join("src"), &out, key).unwrap();
            out
        }

        fn import(&self, file: &Path, db: &FleetDb, trust: &Trust) -> Result<Plan, BundleError> {
            let opened = open(file, &self.blobs, trust)?;
            plan(db, &opened)
        }

        fn blob_count(&self) -> usize {
            std::fs::read_dir(self.blobs.dir().join("sha256")).unwrap().count() + std::fs::read_dir(self.blobs.dir().join("tmp")).unwrap().count()
        }

        /// A tar with these entries, as a bundle file.
        fn raw_tar(&self, entries: &[(&str, &[u8])]) -> PathBuf {
            let out = self.dir.path().join("raw.fbundle");
            let mut tar = tar::Builder::new(std::fs::File::create(&out).unwrap());
            for (name, bytes) in entries {
                let mut h = tar::Header::new_ustar();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                tar.append_data(&mut h, name, *bytes).unwrap();
            }
            tar.finish().unwrap();
            out
        }

        /// The entries of a built bundle.
        fn entries(&self, file: &Path) -> Vec<(String, Vec<u8>)> {
            let mut a = tar::Archive::new(std::fs::File::open(file).unwrap());
            a.entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let mut b = Vec::new();
                    e.read_to_end(&mut b).unwrap();
                    (e.path().unwrap().to_string_lossy().into_owned(), b)
                })
                .collect()
        }
    }

    fn refs(e: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
        e.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect()
    }

    #[test]
    fn build_open_plan_commit() {
        let fx = Fixture::new(BUNDLE_TOML);
        let key = SigningKey::generate().unwrap();
        let file = fx.build(Some(&key));
        let trust = Trust { keys: vec![key.public_hex()] };
        let opened = open(&file, &fx.blobs, &trust).unwrap();
        assert_eq!(opened.signed_by.as_deref(), Some(key.public_hex().as_str()));
        let db = FleetDb::default();
        let p = plan(&db, &opened).unwrap();
        assert_eq!(p.new_packages, ["lc-boot 1.0", "base 1.0", "routing 2.0"]);
        assert_eq!((p.nodes_checked, p.new_blobs), (1, 3), "base's content is shared by two files: one blob");
        let mut db2 = db.clone();
        for c in &p.changes {
            db2.apply(c).unwrap();
        }
        opened.commit_blobs(&fx.blobs).unwrap();
        for sha in db2.referenced_blobs() {
            fx.blobs.verify(&sha).unwrap();
        }
        // The same bundle again changes nothing; an update without blobs uses those present.
        let again = fx.import(&file, &db2, &trust).unwrap();
        assert!(again.new_packages.is_empty());
        let m = fx.entries(&file);
        let no_blobs: Vec<(&str, &[u8])> = refs(&m).into_iter().filter(|(n, _)| !n.starts_with("blobs/")).collect();
        let f2 = fx.raw_tar(&no_blobs);
        assert_eq!(fx.import(&f2, &db2, &trust).unwrap().new_blobs, 0);
        // A blob the manifest does not name is left out.
        let mut extra = refs(&m);
        let stray = format!("blobs/{}", Sha256::of(b"stray"));
        extra.push((stray.as_str(), b"stray"));
        let f3 = fx.raw_tar(&extra);
        let opened = open(&f3, &fx.blobs, &trust).unwrap();
        assert_eq!(plan(&db2, &opened).unwrap().new_blobs, 0, "all three are already in place");
        opened.commit_blobs(&fx.blobs).unwrap();
        assert!(!fx.blobs.has(&Sha256::of(b"stray"), 5));
    }

    fn assert_refused(fx: &Fixture, file: &Path, trust: &Trust, wanted: &str) {
        let before = fx.blob_count();
        let e = fx.import(file, &FleetDb::default(), trust).unwrap_err().to_string();
        assert!(e.contains(wanted), "error {e:?} does not say {wanted:?}");
        assert_eq!(fx.blob_count(), before, "nothing imported: {e}");
    }

    #[test]
    fn missing_dependency_is_named() {
        let fx = Fixture::new(&BUNDLE_TOML.replace(r#"{ name = "base", version = ">=1" }"#, r#"{ name = "base", version = ">=3" }"#));
        let file = fx.build(None);
        assert_refused(&fx, &file, &Trust::default(), "package routing 2.0: depends on base >=3, which no package version satisfies (available: 1.0)");
    }

    #[test]
    fn cycle_is_named() {
        let toml = BUNDLE_TOML.replace("provides = [\"core\"]", "provides = [\"core\"]\ndepends = [{ name = \"routing\" }]");
        let fx = Fixture::new(&toml);
        let file = fx.build(None);
        assert_refused(&fx, &file, &Trust::default(), "dependency cycle: base → routing → base");
    }

    #[test]
    fn hash_mismatch_is_named() {
        let fx = Fixture::new(BUNDLE_TOML);
        let file = fx.build(None);
        let mut e = fx.entries(&file);
        let blob = e.iter_mut().find(|(n, _)| n.starts_with("blobs/")).unwrap();
        blob.1[0] ^= 1;
        let name = blob.0.clone();
        let bad = fx.raw_tar(&refs(&e));
        assert_refused(&fx, &bad, &Trust::default(), &format!("{name}: content hashes to"));
    }

    #[test]
    fn bad_signatures_are_refused() {
        let fx = Fixture::new(BUNDLE_TOML);
        let (signer, trusted) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
        let file = fx.build(Some(&signer));
        let trust = Trust { keys: vec![trusted.public_hex()] };
        assert_refused(&fx, &file, &trust, "which this master does not trust");
        // Signed by a trusted key, but the manifest was changed after signing.
        let trust = Trust { keys: vec![signer.public_hex()] };
        let mut e = fx.entries(&file);
        let m = e.iter_mut().find(|(n, _)| n == "manifest.toml").unwrap();
        m.1 = String::from_utf8(m.1.clone()).unwrap().replace("release 1", "release 2").into_bytes();
        let bad = fx.raw_tar(&refs(&e));
        assert_refused(&fx, &bad, &trust, "manifest.sig: the signature does not match manifest.toml");
        // Unsigned, where a key is configured.
        let unsigned = fx.build(None);
        assert_refused(&fx, &unsigned, &trust, "manifest.sig: missing");
    }

    #[test]
    fn truncated_bundles_are_refused() {
        let fx = Fixture::new(BUNDLE_TOML);
        let file = fx.build(None);
        let bytes = std::fs::read(&file).unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 1024, 1536, 700] {
            let t = fx.dir.path().join("cut.fbundle");
            std::fs::write(&t, &bytes[..cut]).unwrap();
            assert_refused(&fx, &t, &Trust::default(), "truncated");
        }
    }

    #[test]
    fn unknown_manifest_key_is_named() {
        let fx = Fixture::new(BUNDLE_TOML);
        let file = fx.build(None);
        let mut e = fx.entries(&file);
        let m = e.iter_mut().find(|(n, _)| n == "manifest.toml").unwrap();
        m.1 = String::from_utf8(m.1.clone()).unwrap().replacen("[[package]]\n", "[[package]]\ncolour = \"red\"\n", 1).into_bytes();
        let bad = fx.raw_tar(&refs(&e));
        assert_refused(&fx, &bad, &Trust::default(), "manifest.toml: line 18: unknown field `colour`");
    }

    #[test]
    fn a_changed_version_and_an_unresolvable_node_are_refused() {
        let fx = Fixture::new(BUNDLE_TOML);
        let file = fx.build(None);
        let mut db = FleetDb::default();
        db.apply(&Change::AddPackage(crate::testdb::pkg("base", "1.0", &[], &[], &["noarch"]))).unwrap();
        let e = fx.import(&file, &db, &Trust::default()).unwrap_err().to_string();
        assert!(e.contains("package base 1.0 already exists with different contents"), "{e}");

        let fx = Fixture::new(&BUNDLE_TOML.replace("routing = \"latest\"", "routing = \"9.0\""));
        let file = fx.build(None);
        let e = fx.import(&file, &FleetDb::default(), &Trust::default()).unwrap_err().to_string();
        assert!(e.contains("node lc1: package routing:") && e.contains("class linecards wants =9.0"), "{e}");
    }
}

//! The node database and the package database, in memory.
//!
//! [`FleetDb`] is what the master decides from: the operator's configuration of nodes,
//! classes and every package version it holds. It is loaded from the store (or from a
//! bundle being checked) and changed only through [`FleetDb::apply`], so the master, the
//! store and a backup that replays the same changes end up with the same database.

use crate::version::Version;
use fleetboot_boot::MacAddr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A problem with one field of an entry: the error names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), problem: problem.into() }
    }

    /// Prefixes the field with where the entry sits (`package[2]`).
    pub fn within(self, outer: &str) -> FieldError {
        FieldError { field: format!("{outer}.{}", self.field), problem: self.problem }
    }
}

/// Names of nodes, classes, packages, features, node types and architectures: what an
/// operator types and what ends up in paths and URLs, so kept to a safe alphabet.
pub fn validate_name(field: &str, s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(field, format!("{s:?} is not a name (1-64 letters, digits, '.', '_', '-'; starting with a letter or digit)")))
    }
}

/// A SHA-256 digest as 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Sha256(String);

impl Sha256 {
    pub fn of(bytes: &[u8]) -> Sha256 {
        use sha2::Digest;
        Sha256(crate::hex(&sha2::Sha256::digest(bytes)))
    }
    pub fn from_digest(d: &[u8; 32]) -> Sha256 {
        Sha256(crate::hex(d))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Sha256 {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Sha256, FieldError> {
        if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Sha256(s.to_ascii_lowercase()))
        } else {
            Err(FieldError::new("sha256", format!("{s:?} is not 64 hex digits")))
        }
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sha256, D::Error> {
        String::deserialize(d)?.parse().map_err(|e: FieldError| serde::de::Error::custom(e.problem))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}…", &self.0[..12.min(self.0.len())])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A boot image: chosen by node type, the node reboots into it.
    Image,
    /// A software package: chosen by the class/node configuration or by features.
    Package,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Image => "image",
            Kind::Package => "package",
        })
    }
}

/// One file of a build: where it goes on the node, and its content by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub sha256: Sha256,
    pub size: u64,
}

/// A relative path inside a package: no absolute paths, no `..`, nothing odd.
pub fn validate_file_path(field: &str, p: &str) -> Result<(), FieldError> {
    let bad = p.is_empty()
        || p.len() > 255
        || p.starts_with('/')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || p.chars().any(|c| c.is_control() || c == '\\');
    if bad {
        Err(FieldError::new(field, format!("{p:?} is not a relative path inside the package")))
    } else {
        Ok(())
    }
}

/// The files of a package for one processor architecture (`noarch`: for every one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub arch: String,
    pub files: Vec<FileEntry>,
}

pub const NOARCH: &str = "noarch";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    pub name: String,
    #[serde(default = "crate::version::Constraint::any")]
    pub version: crate::version::Constraint,
}

/// One version of a boot image or a package, as the package database holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: Version,
    pub kind: Kind,
    /// Images: the node types they boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends: Vec<Dependency>,
    /// Features this package provides (nodes may ask for packages by feature).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provides: Vec<String>,
    pub builds: Vec<Build>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl Package {
    /// The build for `arch`, else the architecture-independent one.
    pub fn build_for(&self, arch: &str) -> Option<&Build> {
        self.builds.iter().find(|b| b.arch == arch).or_else(|| self.builds.iter().find(|b| b.arch == NOARCH))
    }

    pub fn id(&self) -> String {
        format!("{} {}", self.name, self.version)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        for (i, t) in self.node_types.iter().enumerate() {
            validate_name(&format!("node_types[{i}]"), t)?;
        }
        if self.kind == Kind::Package && !self.node_types.is_empty() {
            return Err(FieldError::new("node_types", "only boot images name node types"));
        }
        if self.kind == Kind::Image && self.node_types.is_empty() {
            return Err(FieldError::new("node_types", "a boot image must name the node types it boots"));
        }
        if self.kind == Kind::Image && !self.depends.is_empty() {
            return Err(FieldError::new("depends", "a boot image has no dependencies (packages do)"));
        }
        for (i, d) in self.depends.iter().enumerate() {
            validate_name(&format!("depends[{i}].name"), &d.name)?;
            if d.name == self.name {
                return Err(FieldError::new(format!("depends[{i}].name"), "a package cannot depend on itself"));
            }
        }
        for (i, f) in self.provides.iter().enumerate() {
            validate_name(&format!("provides[{i}]"), f)?;
        }
        if self.builds.is_empty() {
            return Err(FieldError::new("build", "at least one build (arch and files)"));
        }
        let mut arches = std::collections::BTreeSet::new();
        for (i, b) in self.builds.iter().enumerate() {
            validate_name(&format!("build[{i}].arch"), &b.arch)?;
            if !arches.insert(&b.arch) {
                return Err(FieldError::new(format!("build[{i}].arch"), format!("{:?} has two builds", b.arch)));
            }
            if b.files.is_empty() {
                return Err(FieldError::new(format!("build[{i}].files"), "a build needs at least one file"));
            }
            let mut paths = std::collections::BTreeSet::new();
            for (j, f) in b.files.iter().enumerate() {
                validate_file_path(&format!("build[{i}].files[{j}].path"), &f.path)?;
                if !paths.insert(&f.path) {
                    return Err(FieldError::new(format!("build[{i}].files[{j}].path"), format!("{:?} is listed twice", f.path)));
                }
            }
        }
        for k in self.metadata.keys() {
            validate_name(&format!("metadata.{k}"), k)?;
        }
        Ok(())
    }
}

/// Which version of a package a class or node prefers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Pin {
    #[default]
    /// The newest version that satisfies every dependency.
    Latest,
    Exactly(Version),
    /// A node's way of dropping a package its class lists.
    Excluded,
}

impl FromStr for Pin {
    type Err = crate::version::ParseError;
    fn from_str(s: &str) -> Result<Pin, Self::Err> {
        match s {
            "latest" | "*" => Ok(Pin::Latest),
            "none" => Ok(Pin::Excluded),
            v => v.parse().map(Pin::Exactly),
        }
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pin::Latest => f.write_str("latest"),
            Pin::Excluded => f.write_str("none"),
            Pin::Exactly(v) => write!(f, "{v}"),
        }
    }
}

impl Serialize for Pin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Pin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pin, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Nodes that share a software configuration. The class may mix processor types: each
/// node gets the build of its own architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Class {
    pub name: String,
    /// The boot image (by name) and its preferred version; none: chosen by node type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default = "latest", skip_serializing_if = "is_latest")]
    pub image_version: Pin,
    /// Packages and their preferred versions.
    #[serde(default)]
    pub packages: BTreeMap<String, Pin>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

fn latest() -> Pin {
    Pin::Latest
}

fn is_latest(p: &Pin) -> bool {
    *p == Pin::Latest
}

impl Class {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        if let Some(i) = &self.image {
            validate_name("image", i)?;
        }
        for k in self.packages.keys() {
            validate_name(&format!("packages.{k}"), k)?;
        }
        Ok(())
    }
}

/// The master runs a node on these package versions without the node storing them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TestMode {
    pub packages: BTreeMap<String, Version>,
}

/// One node as the operator configured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub mac: MacAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Card or machine type: chooses the boot image.
    #[serde(rename = "type")]
    pub node_type: String,
    pub arch: String,
    /// Shelf/slot, rack position...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// When set, packages are chosen by these features instead of a package list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// Overrides the class's boot image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default = "latest", skip_serializing_if = "is_latest")]
    pub image_version: Pin,
    /// Overrides the class's preferred versions, package by package (`none` drops one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packages: BTreeMap<String, Pin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<TestMode>,
    /// The node's identity: the ed25519 public key (hex) its agent generated at first boot,
    /// bound on first use or by an operator's approval. Only this key speaks for the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Node {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        validate_name("type", &self.node_type)?;
        validate_name("arch", &self.arch)?;
        if self.arch == NOARCH {
            return Err(FieldError::new("arch", "a node has a real architecture (noarch is for packages)"));
        }
        if let Some(c) = &self.class {
            validate_name("class", c)?;
        }
        if let Some(l) = &self.location {
            if l.is_empty() || l.len() > 128 || l.chars().any(|c| c.is_control()) {
                return Err(FieldError::new("location", "1-128 printable characters"));
            }
        }
        if let Some(u) = &self.uuid {
            if u.len() > 64 || u.chars().any(|c| !(c.is_ascii_hexdigit() || c == '-')) {
                return Err(FieldError::new("uuid", format!("{u:?} is not a UUID")));
            }
        }
        for (i, f) in self.features.iter().enumerate() {
            validate_name(&format!("features[{i}]"), f)?;
        }
        if let Some(i) = &self.image {
            validate_name("image", i)?;
        }
        for k in self.packages.keys() {
            validate_name(&format!("packages.{k}"), k)?;
        }
        if let Some(k) = &self.key {
            if crate::unhex::<32>(k).is_none() {
                return Err(FieldError::new("key", format!("{k:?} is not an ed25519 public key (64 hex digits)")));
            }
        }
        if let Some(t) = &self.test {
            for k in t.packages.keys() {
                validate_name(&format!("test.packages.{k}"), k)?;
            }
        }
        Ok(())
    }
}

/// A change to the configuration: what a bundle, the CLI or the API does, and what the
/// store persists and a backup replays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    PutNode(Node),
    RemoveNode { name: String },
    PutClass(Class),
    RemoveClass { name: String },
    /// Adds a package version (versions are immutable: re-adding an identical one is a no-op).
    AddPackage(Package),
    /// Forgets a package version (its blobs go at the next blob collection).
    PrunePackage { name: String, version: Version },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    #[error("package {name} {version} already exists with different contents; versions are immutable, give it a new version")]
    PackageChanged { name: String, version: Version },
    #[error("node {name}: MAC {mac} already belongs to node {other}")]
    MacTaken { name: String, mac: MacAddr, other: String },
    #[error("{what} {name:?} does not exist")]
    Missing { what: &'static str, name: String },
    #[error("{0}")]
    Invalid(String),
}

/// Nodes, classes and packages (every version), indexed for the master's lookups.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetDb {
    pub nodes: BTreeMap<String, Node>,
    pub classes: BTreeMap<String, Class>,
    /// name → version → package.
    pub packages: BTreeMap<String, BTreeMap<Version, Package>>,
    by_mac: BTreeMap<MacAddr, String>,
}

impl FleetDb {
    pub fn node_by_mac(&self, mac: &MacAddr) -> Option<&Node> {
        self.by_mac.get(mac).and_then(|n| self.nodes.get(n))
    }

    pub fn package(&self, name: &str, version: &Version) -> Option<&Package> {
        self.packages.get(name).and_then(|v| v.get(version))
    }

    pub fn versions(&self, name: &str) -> impl DoubleEndedIterator<Item = &Package> {
        self.packages.get(name).into_iter().flat_map(|v| v.values())
    }

    pub fn all_packages(&self) -> impl Iterator<Item = &Package> {
        self.packages.values().flat_map(|v| v.values())
    }

    /// Applies one change, checking it against the database; on error nothing changed.
    pub fn apply(&mut self, change: &Change) -> Result<(), DbError> {
        match change {
            Change::PutNode(n) => {
                n.validate().map_err(|e| DbError::Invalid(format!("node {}: {e}", n.name)))?;
                if let Some(other) = self.by_mac.get(&n.mac) {
                    if *other != n.name {
                        return Err(DbError::MacTaken { name: n.name.clone(), mac: n.mac, other: other.clone() });
                    }
                }
                if let Some(old) = self.nodes.insert(n.name.clone(), n.clone()) {
                    self.by_mac.remove(&old.mac);
                }
                self.by_mac.insert(n.mac, n.name.clone());
            }
            Change::RemoveNode { name } => {
                let old = self.nodes.remove(name).ok_or(DbError::Missing { what: "node", name: name.clone() })?;
                self.by_mac.remove(&old.mac);
            }
            Change::PutClass(c) => {
                c.validate().map_err(|e| DbError::Invalid(format!("class {}: {e}", c.name)))?;
                self.classes.insert(c.name.clone(), c.clone());
            }
            Change::RemoveClass { name } => {
                if let Some(n) = self.nodes.values().find(|n| n.class.as_deref() == Some(name)) {
                    return Err(DbError::Invalid(format!("class {name}: node {} is still in it", n.name)));
                }
                self.classes.remove(name).ok_or(DbError::Missing { what: "class", name: name.clone() })?;
            }
            Change::AddPackage(p) => {
                p.validate().map_err(|e| DbError::Invalid(format!("{} {}: {e}", p.kind, p.id())))?;
                let versions = self.packages.entry(p.name.clone()).or_default();
                if let Some(existing) = versions.get(&p.version) {
                    if existing != p {
                        return Err(DbError::PackageChanged { name: p.name.clone(), version: p.version.clone() });
                    }
                    return Ok(());
                }
                if let Some(other) = versions.values().next() {
                    if other.kind != p.kind {
                        return Err(DbError::Invalid(format!("{}: already a {}, cannot add a {} of that name", p.name, other.kind, p.kind)));
                    }
                }
                versions.insert(p.version.clone(), p.clone());
            }
            Change::PrunePackage { name, version } => {
                let versions = self.packages.get_mut(name).ok_or(DbError::Missing { what: "package", name: name.clone() })?;
                versions.remove(version).ok_or(DbError::Missing { what: "package version", name: format!("{name} {version}") })?;
                if versions.is_empty() {
                    self.packages.remove(name);
                }
            }
        }
        Ok(())
    }

    /// Every blob a package version in the database refers to.
    pub fn referenced_blobs(&self) -> std::collections::BTreeSet<Sha256> {
        self.all_packages().flat_map(|p| &p.builds).flat_map(|b| &b.files).map(|f| f.sha256.clone()).collect()
    }
}

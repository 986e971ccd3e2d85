//! Selection: which boot image and which package versions a node should run.
//!
//! - The boot image: the node's own choice, else its class's, else the newest image that
//!   boots the node's type; always the build of the node's architecture.
//! - Packages: the class's list with the node's overrides (`none` drops one), or — when
//!   the node asks by features — the packages that provide those features. Either way the
//!   preferred versions pin what they name, and dependencies are resolved to the newest
//!   versions that satisfy every constraint (backtracking when a newer one conflicts).
//!
//! Every error names the node, the package or feature, and the conflict.

use crate::model::{FileEntry, FleetDb, Kind, Node, Package, Pin};
use crate::version::{Constraint, Version};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A package version chosen for a node, with the files of the node's architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chosen {
    pub name: String,
    pub version: Version,
    pub kind: Kind,
    /// The build's architecture (the node's, or `noarch`).
    pub arch: String,
    pub files: Vec<FileEntry>,
}

impl Chosen {
    fn of(p: &Package, arch: &str) -> Chosen {
        let b = p.build_for(arch).expect("candidates are filtered by architecture");
        Chosen { name: p.name.clone(), version: p.version.clone(), kind: p.kind, arch: b.arch.clone(), files: b.files.clone() }
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// What a node should run: its boot image and its packages, dependencies first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    pub image: Chosen,
    pub packages: Vec<Chosen>,
}

impl Selection {
    pub fn all(&self) -> impl Iterator<Item = &Chosen> {
        std::iter::once(&self.image).chain(self.packages.iter())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    UnknownClass(String),
    NoImageForType { node_type: String, arch: String },
    SeveralImagesForType { node_type: String, images: Vec<String> },
    ImageMissing { image: String, pin: String, arch: String },
    NoProvider { feature: String, arch: String },
    SeveralProviders { feature: String, packages: Vec<String> },
    UnknownPackage { package: String, wanted_by: String },
    Excluded { package: String, wanted_by: String },
    NoVersion { package: String, arch: String, wanted: Vec<(String, String)>, available: Vec<Version> },
    Cycle(Vec<String>),
    TooComplex { steps: usize },
}

/// Why a node's configuration or request cannot be satisfied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SelectError {
    pub node: String,
    pub problem: Problem,
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: ", self.node)?;
        match &self.problem {
            Problem::UnknownClass(c) => write!(f, "class {c:?} does not exist"),
            Problem::NoImageForType { node_type, arch } => {
                write!(f, "no boot image boots node type {node_type:?} on {arch} (add one, or set image in the class or node)")
            }
            Problem::SeveralImagesForType { node_type, images } => {
                write!(f, "several boot images boot node type {node_type:?} ({}); set image in the class or node", images.join(", "))
            }
            Problem::ImageMissing { image, pin, arch } => write!(f, "boot image {image} {pin} has no build for {arch} (or does not exist)"),
            Problem::NoProvider { feature, arch } => write!(f, "feature {feature:?}: no package provides it on {arch}"),
            Problem::SeveralProviders { feature, packages } => write!(
                f,
                "feature {feature:?}: provided by several packages ({}); list the one to use in the class or node",
                packages.join(", ")
            ),
            Problem::UnknownPackage { package, wanted_by } => write!(f, "package {package}: wanted by {wanted_by}, but no such package exists"),
            Problem::Excluded { package, wanted_by } => {
                write!(f, "package {package}: wanted by {wanted_by}, but the node's configuration excludes it (none)")
            }
            Problem::NoVersion { package, arch, wanted, available } => {
                let w: Vec<String> = wanted.iter().map(|(by, c)| format!("{by} wants {c}")).collect();
                let a: Vec<String> = available.iter().map(Version::to_string).collect();
                write!(
                    f,
                    "package {package}: no version satisfies every constraint on {arch} — {}; available: {}",
                    w.join("; "),
                    if a.is_empty() { "none".to_string() } else { a.join(", ") }
                )
            }
            Problem::Cycle(path) => write!(f, "dependency cycle: {}", path.join(" → ")),
            Problem::TooComplex { steps } => write!(f, "dependency resolution gave up after {steps} steps"),
        }
    }
}

/// The most steps the resolver tries before giving up: fleets have tens of packages, not
/// distributions' tens of thousands, so this bounds a pathological database, not a real one.
pub const MAX_STEPS: usize = 100_000;

/// What the node asks for.
#[derive(Debug, Clone, Copy)]
pub enum Want<'a> {
    /// The class/node configuration (or the node's configured features).
    Configured,
    /// Packages by these features (the node asked with a feature list).
    Features(&'a [String]),
}

/// The selection for a node's normal (stored) configuration.
pub fn select(db: &FleetDb, node: &Node, want: Want<'_>) -> Result<Selection, SelectError> {
    select_with(db, node, want, &BTreeMap::new())
}

/// The selection for a node in test mode: its test versions pinned over its configuration.
pub fn select_test(db: &FleetDb, node: &Node, want: Want<'_>) -> Result<Option<Selection>, SelectError> {
    let Some(test) = &node.test else { return Ok(None) };
    let extra: BTreeMap<String, Pin> = test.packages.iter().map(|(k, v)| (k.clone(), Pin::Exactly(v.clone()))).collect();
    select_with(db, node, want, &extra).map(Some)
}

fn select_with(db: &FleetDb, node: &Node, want: Want<'_>, extra: &BTreeMap<String, Pin>) -> Result<Selection, SelectError> {
    let fail = |problem| SelectError { node: node.name.clone(), problem };
    let class = match &node.class {
        Some(c) => Some(db.classes.get(c).ok_or_else(|| fail(Problem::UnknownClass(c.clone())))?),
        None => None,
    };
    let image = select_image(db, node, class).map_err(fail)?;

    // Preferred versions: the class's, then the node's own, then test versions.
    let mut pins: BTreeMap<String, (Pin, String)> = BTreeMap::new();
    if let Some(c) = class {
        for (k, p) in &c.packages {
            pins.insert(k.clone(), (p.clone(), format!("class {}", c.name)));
        }
    }
    for (k, p) in &node.packages {
        pins.insert(k.clone(), (p.clone(), format!("node {}", node.name)));
    }
    for (k, p) in extra {
        pins.insert(k.clone(), (p.clone(), format!("test mode of node {}", node.name)));
    }

    let features: &[String] = match want {
        Want::Features(f) => f,
        Want::Configured => &node.features,
    };
    let mut roots = Vec::new();
    if features.is_empty() {
        for (name, (pin, by)) in &pins {
            if *pin != Pin::Excluded {
                roots.push(Req { name: name.clone(), constraint: Constraint::any(), feature: None, by: by.clone() });
            }
        }
    } else {
        for f in features {
            let providers: BTreeSet<&str> = db
                .all_packages()
                .filter(|p| p.kind == Kind::Package && p.provides.contains(f) && p.build_for(&node.arch).is_some())
                .map(|p| p.name.as_str())
                .collect();
            let name = match providers.len() {
                0 => return Err(fail(Problem::NoProvider { feature: f.clone(), arch: node.arch.clone() })),
                1 => providers.first().copied().unwrap_or_default(),
                _ => {
                    let pinned: Vec<&str> = providers.iter().copied().filter(|p| pins.contains_key(*p)).collect();
                    match pinned.as_slice() {
                        [one] => *one,
                        _ => {
                            return Err(fail(Problem::SeveralProviders {
                                feature: f.clone(),
                                packages: providers.iter().map(|s| s.to_string()).collect(),
                            }))
                        }
                    }
                }
            };
            roots.push(Req { name: name.to_string(), constraint: Constraint::any(), feature: Some(f.clone()), by: format!("feature {f}") });
        }
    }

    let mut r = Resolver { db, arch: &node.arch, pins: &pins, steps: 0 };
    let chosen = r.solve(roots.into_iter().collect(), BTreeMap::new(), Vec::new()).map_err(fail)?;
    let ordered = dependency_order(&chosen).map_err(fail)?;
    Ok(Selection { image, packages: ordered.into_iter().map(|p| Chosen::of(p, &node.arch)).collect() })
}

fn select_image(db: &FleetDb, node: &Node, class: Option<&crate::model::Class>) -> Result<Chosen, Problem> {
    let configured = match (&node.image, class.and_then(|c| c.image.as_ref())) {
        (Some(i), _) => Some((i.clone(), node.image_version.clone())),
        (None, Some(i)) => Some((i.clone(), class.map(|c| c.image_version.clone()).unwrap_or_default())),
        (None, None) => None,
    };
    let (name, pin) = match configured {
        Some(c) => c,
        None => {
            let names: BTreeSet<&str> = db
                .all_packages()
                .filter(|p| p.kind == Kind::Image && p.node_types.contains(&node.node_type) && p.build_for(&node.arch).is_some())
                .map(|p| p.name.as_str())
                .collect();
            match names.len() {
                0 => return Err(Problem::NoImageForType { node_type: node.node_type.clone(), arch: node.arch.clone() }),
                1 => (names.first().map(|s| s.to_string()).unwrap_or_default(), Pin::Latest),
                _ => {
                    return Err(Problem::SeveralImagesForType {
                        node_type: node.node_type.clone(),
                        images: names.iter().map(|s| s.to_string()).collect(),
                    })
                }
            }
        }
    };
    let found = db
        .versions(&name)
        .rev()
        .filter(|p| p.kind == Kind::Image && p.build_for(&node.arch).is_some())
        .find(|p| match &pin {
            Pin::Exactly(v) => Constraint::exactly(v).matches(&p.version),
            _ => true,
        });
    found
        .map(|p| Chosen::of(p, &node.arch))
        .ok_or(Problem::ImageMissing { image: name, pin: pin.to_string(), arch: node.arch.clone() })
}

#[derive(Debug, Clone)]
struct Req {
    name: String,
    constraint: Constraint,
    /// A root asked for by feature: only versions providing it qualify.
    feature: Option<String>,
    by: String,
}

struct Resolver<'a> {
    db: &'a FleetDb,
    arch: &'a str,
    pins: &'a BTreeMap<String, (Pin, String)>,
    steps: usize,
}

impl<'a> Resolver<'a> {
    fn accepts(&self, p: &Package, reqs: &[&Req]) -> bool {
        let pinned = match self.pins.get(&p.name) {
            Some((Pin::Exactly(v), _)) => Constraint::exactly(v).matches(&p.version),
            _ => true,
        };
        pinned
            && p.kind == Kind::Package
            && p.build_for(self.arch).is_some()
            && reqs.iter().all(|r| r.constraint.matches(&p.version) && r.feature.as_ref().is_none_or(|f| p.provides.contains(f)))
    }

    fn no_version(&self, name: &str, reqs: &[&Req]) -> Problem {
        let mut wanted: Vec<(String, String)> =
            reqs.iter().map(|r| (r.by.clone(), r.feature.as_ref().map_or(r.constraint.to_string(), |f| format!("a version providing {f}")))).collect();
        if let Some((Pin::Exactly(v), by)) = self.pins.get(name) {
            wanted.push((by.clone(), format!("={v}")));
        }
        wanted.dedup();
        // "any version" says nothing next to a real constraint.
        if wanted.iter().any(|(_, c)| c != "*") {
            wanted.retain(|(_, c)| c != "*");
        }
        Problem::NoVersion {
            package: name.to_string(),
            arch: self.arch.to_string(),
            wanted,
            available: self.db.versions(name).filter(|p| p.build_for(self.arch).is_some()).map(|p| p.version.clone()).collect(),
        }
    }

    /// Depth-first: take the next requirement; if its package is chosen, check it; else try
    /// its acceptable versions newest first. The first candidate's error is reported when
    /// none works — the one an operator expects to see.
    fn solve(
        &mut self,
        mut pending: std::collections::VecDeque<Req>,
        chosen: BTreeMap<String, &'a Package>,
        mut seen: Vec<Req>,
    ) -> Result<BTreeMap<String, &'a Package>, Problem> {
        loop {
            self.steps += 1;
            if self.steps > MAX_STEPS {
                return Err(Problem::TooComplex { steps: MAX_STEPS });
            }
            let Some(req) = pending.pop_front() else { return Ok(chosen) };
            if let Some((Pin::Excluded, _)) = self.pins.get(&req.name) {
                return Err(Problem::Excluded { package: req.name.clone(), wanted_by: req.by.clone() });
            }
            if self.db.packages.get(&req.name).is_none_or(|v| v.values().all(|p| p.kind != Kind::Package)) {
                return Err(Problem::UnknownPackage { package: req.name.clone(), wanted_by: req.by.clone() });
            }
            seen.push(req.clone());
            let on_name: Vec<&Req> = seen.iter().filter(|r| r.name == req.name).collect();
            if let Some(p) = chosen.get(&req.name) {
                if self.accepts(p, &on_name) {
                    continue;
                }
                return Err(self.no_version(&req.name, &on_name));
            }
            let candidates: Vec<&'a Package> = self.db.versions(&req.name).rev().filter(|p| self.accepts(p, &on_name)).collect();
            if candidates.is_empty() {
                return Err(self.no_version(&req.name, &on_name));
            }
            let mut first_error = None;
            for c in candidates {
                let mut next_pending = pending.clone();
                for d in &c.depends {
                    next_pending.push_back(Req { name: d.name.clone(), constraint: d.version.clone(), feature: None, by: c.id() });
                }
                let mut next_chosen = chosen.clone();
                next_chosen.insert(c.name.clone(), c);
                match self.solve(next_pending, next_chosen, seen.clone()) {
                    Ok(done) => return Ok(done),
                    Err(e @ Problem::TooComplex { .. }) => return Err(e),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            return Err(first_error.unwrap_or_else(|| self.no_version(&req.name, &on_name)));
        }
    }
}

/// The chosen packages, each after everything it depends on; a cycle is an error naming it.
fn dependency_order<'a>(chosen: &BTreeMap<String, &'a Package>) -> Result<Vec<&'a Package>, Problem> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        name: &str,
        chosen: &BTreeMap<String, &'a Package>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
        out: &mut Vec<&'a Package>,
    ) -> Result<(), Problem> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = path.iter().position(|p| p == name).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].to_vec();
                cycle.push(name.to_string());
                return Err(Problem::Cycle(cycle));
            }
            None => {}
        }
        let Some(p) = chosen.get(name) else { return Ok(()) };
        marks.insert(name.to_string(), Mark::Visiting);
        path.push(name.to_string());
        for d in &p.depends {
            visit(&d.name, chosen, marks, path, out)?;
        }
        path.pop();
        marks.insert(name.to_string(), Mark::Done);
        out.push(p);
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    for name in chosen.keys() {
        visit(name, chosen, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// Dependency cycles among package names in `packages` (any version depending on any
/// version of another), for checking a bundle before any node asks.
pub fn find_cycle<'a>(packages: impl IntoIterator<Item = &'a Package>) -> Option<Vec<String>> {
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in packages {
        let e = edges.entry(p.name.as_str()).or_default();
        for d in &p.depends {
            e.insert(d.name.as_str());
        }
    }
    let mut marks: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(n: &'a str, edges: &BTreeMap<&'a str, BTreeSet<&'a str>>, marks: &mut BTreeMap<&'a str, u8>, path: &mut Vec<&'a str>) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut c: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                c.push(n.to_string());
                return Some(c);
            }
            _ => {}
        }
        marks.insert(n, 1);
        path.push(n);
        for d in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, edges, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n, 2);
        None
    }
    let names: Vec<&str> = edges.keys().copied().collect();
    for n in names {
        if let Some(c) = visit(n, &edges, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Change;
    use crate::testdb::*;
    use proptest::prelude::*;

    fn names(s: &Selection) -> Vec<String> {
        s.packages.iter().map(|c| format!("{} {}", c.name, c.version)).collect()
    }

    #[test]
    fn class_configuration_resolves_newest_compatible_dependencies_first() {
        let db = sample();
        let n = node("lc1", 1, Some("linecards"));
        let s = select(&db, &n, Want::Configured).unwrap();
        assert_eq!(s.image.version, v("1.1"));
        assert_eq!(names(&s), ["base 2.0", "monitor 0.3", "routing 2.0"]);
        assert_eq!(s.packages[0].arch, "noarch");
    }

    #[test]
    fn a_pin_pulls_dependencies_back_by_backtracking() {
        let mut db = sample();
        db.apply(&Change::PutClass(class("linecards", &[("routing", "latest"), ("base", "1.1")]))).unwrap();
        let s = select(&db, &node("lc1", 1, Some("linecards")), Want::Configured).unwrap();
        assert_eq!(names(&s), ["base 1.1", "routing 1.0"]);
    }

    #[test]
    fn arch_chooses_the_build_and_limits_versions() {
        let db = sample();
        let mut n = node("arm1", 2, Some("linecards"));
        n.arch = "aarch64".into();
        let s = select(&db, &n, Want::Configured).unwrap();
        // routing 2.0 has no aarch64 build: routing 1.0, so base ^1.
        assert_eq!(names(&s), ["base 1.1", "monitor 0.3", "routing 1.0"]);
        assert_eq!(s.image.version, v("1.0"));
        assert_eq!(s.packages[0].arch, "aarch64");
    }

    #[test]
    fn node_overrides_class_and_can_drop_a_package() {
        let db = sample();
        let mut n = node("lc1", 1, Some("linecards"));
        n.packages.insert("monitor".into(), Pin::Excluded);
        n.packages.insert("routing".into(), Pin::Exactly(v("1.0")));
        let s = select(&db, &n, Want::Configured).unwrap();
        assert_eq!(names(&s), ["base 1.1", "routing 1.0"]);
    }

    #[test]
    fn features_give_two_nodes_of_one_type_different_packages() {
        let db = sample();
        let a = select(&db, &node("a", 1, Some("linecards")), Want::Features(&["bgp".into()])).unwrap();
        let b = select(&db, &node("b", 2, Some("linecards")), Want::Features(&["snmp".into()])).unwrap();
        assert_eq!(names(&a), ["base 2.0", "routing 2.0"]);
        assert_eq!(names(&b), ["base 2.0", "monitor 0.3"]);
        assert_eq!(a.image, b.image);
    }

    #[test]
    fn errors_name_node_package_and_conflict() {
        let mut db = sample();
        db.apply(&Change::PutClass(class("linecards", &[("routing", "2.0"), ("base", "1.1")]))).unwrap();
        let e = select(&db, &node("lc7", 7, Some("linecards")), Want::Configured).unwrap_err().to_string();
        assert!(e.starts_with("node lc7: package base:"), "{e}");
        assert!(e.contains("routing 2.0 wants >=2") && e.contains("class linecards wants =1.1"), "{e}");
        assert!(e.contains("available: 1.0, 1.1, 2.0"), "{e}");

        let e = select(&db, &node("lc7", 7, None), Want::Features(&["isis".into()])).unwrap_err().to_string();
        assert_eq!(e, "node lc7: feature \"isis\": no package provides it on x86_64");

        let e = select(&db, &node("lc7", 7, Some("nope")), Want::Configured).unwrap_err().to_string();
        assert_eq!(e, "node lc7: class \"nope\" does not exist");

        db.apply(&Change::PutClass(class("linecards", &[("ghost", "latest")]))).unwrap();
        let e = select(&db, &node("lc7", 7, Some("linecards")), Want::Configured).unwrap_err().to_string();
        assert_eq!(e, "node lc7: package ghost: wanted by class linecards, but no such package exists");

        let mut n = node("lc8", 8, None);
        n.node_type = "fabric".into();
        let e = select(&db, &n, Want::Configured).unwrap_err().to_string();
        assert!(e.contains("no boot image boots node type \"fabric\""), "{e}");
    }

    #[test]
    fn a_dependency_cycle_is_named() {
        let mut db = sample();
        db.apply(&Change::AddPackage(pkg("a", "1", &[("b", "*")], &[], &["noarch"]))).unwrap();
        db.apply(&Change::AddPackage(pkg("b", "1", &[("c", "*")], &[], &["noarch"]))).unwrap();
        db.apply(&Change::AddPackage(pkg("c", "1", &[("a", "*")], &[], &["noarch"]))).unwrap();
        db.apply(&Change::PutClass(class("loop", &[("a", "latest")]))).unwrap();
        let e = select(&db, &node("n", 1, Some("loop")), Want::Configured).unwrap_err();
        assert_eq!(e.problem, Problem::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
        assert_eq!(find_cycle(db.all_packages()), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
        assert_eq!(find_cycle(sample().all_packages()), None);
    }

    #[test]
    fn test_mode_pins_over_the_configuration() {
        let db = sample();
        let mut n = node("lc1", 1, Some("linecards"));
        assert_eq!(select_test(&db, &n, Want::Configured).unwrap(), None);
        n.test = Some(crate::model::TestMode { packages: [("routing".to_string(), v("1.0"))].into() });
        let t = select_test(&db, &n, Want::Configured).unwrap().unwrap();
        assert_eq!(names(&t), ["base 1.1", "monitor 0.3", "routing 1.0"]);
    }

    // Random databases: whatever the resolver returns satisfies every constraint, has
    // builds for the arch, respects pins and lists each dependency before its dependent.
    type Spec = (usize, u64, Vec<(usize, u8, u64)>, bool);
    fn random_db() -> impl Strategy<Value = (Vec<Spec>, Vec<(usize, Option<u64>)>)> {
        let pkg_spec = (0usize..6, 1u64..4, proptest::collection::vec((0usize..6, 0u8..4, 1u64..4), 0..3), any::<bool>());
        (proptest::collection::vec(pkg_spec, 1..20), proptest::collection::vec((0usize..6, proptest::option::of(1u64..4)), 1..4))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn resolutions_satisfy_every_constraint((db, roots) in random_db().prop_map(|(specs, roots)| {
            let mut db = sample();
            for (name, ver, deps, arm) in specs {
                let deps: Vec<(String, String)> = deps.into_iter().filter(|(d, _, _)| *d != name).map(|(d, op, dv)| {
                    let op = [">=", "<", "=", "^"][op as usize];
                    (format!("p{d}"), format!("{op}{dv}"))
                }).collect();
                let deps: Vec<(&str, &str)> = deps.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                let arches: &[&str] = if arm { &["aarch64"] } else { &["x86_64", "aarch64"] };
                let _ = db.apply(&Change::AddPackage(pkg(&format!("p{name}"), &format!("{ver}.0"), &deps, &[], arches)));
            }
            (db, roots)
        })) {
            let mut db = db;
            let c = crate::model::Class {
                name: "c".into(),
                packages: roots.iter().map(|(n, pin)| (format!("p{n}"), pin.map_or(Pin::Latest, |p| Pin::Exactly(v(&format!("{p}.0")))))).collect(),
                ..Default::default()
            };
            db.apply(&Change::PutClass(c.clone())).unwrap();
            let n = node("n", 1, Some("c"));
            if let Ok(s) = select(&db, &n, Want::Configured) {
                let at: BTreeMap<&str, usize> = s.packages.iter().enumerate().map(|(i, c)| (c.name.as_str(), i)).collect();
                for (i, chosen) in s.packages.iter().enumerate() {
                    let p = db.package(&chosen.name, &chosen.version).unwrap();
                    prop_assert!(p.build_for("x86_64").is_some());
                    if let Some(Pin::Exactly(want)) = c.packages.get(&p.name) {
                        prop_assert_eq!(&p.version, want);
                    }
                    for d in &p.depends {
                        let j = at.get(d.name.as_str()).copied();
                        prop_assert!(j.is_some(), "{} needs {} which is not chosen", p.id(), d.name);
                        let j = j.unwrap();
                        prop_assert!(j < i);
                        prop_assert!(d.version.matches(&s.packages[j].version));
                    }
                }
                for name in c.packages.keys() {
                    prop_assert!(at.contains_key(name.as_str()));
                }
            }
        }
    }
}

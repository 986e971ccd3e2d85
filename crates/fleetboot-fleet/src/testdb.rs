//! Small databases for tests.

use crate::model::*;
use crate::version::Version;
use std::collections::BTreeMap;

pub fn file(path: &str, content: &str) -> FileEntry {
    FileEntry { path: path.into(), sha256: Sha256::of(content.as_bytes()), size: content.len() as u64 }
}

pub fn pkg(name: &str, version: &str, depends: &[(&str, &str)], provides: &[&str], arches: &[&str]) -> Package {
    Package {
        name: name.into(),
        version: version.parse().unwrap(),
        kind: Kind::Package,
        node_types: vec![],
        depends: depends.iter().map(|(n, c)| Dependency { name: n.to_string(), version: c.parse().unwrap() }).collect(),
        provides: provides.iter().map(|s| s.to_string()).collect(),
        builds: arches
            .iter()
            .map(|a| Build { arch: a.to_string(), files: vec![file(&format!("{name}/run"), &format!("{name} {version} {a}"))] })
            .collect(),
        metadata: BTreeMap::new(),
    }
}

pub fn image(name: &str, version: &str, types: &[&str], arches: &[&str]) -> Package {
    Package {
        kind: Kind::Image,
        node_types: types.iter().map(|s| s.to_string()).collect(),
        builds: arches
            .iter()
            .map(|a| Build { arch: a.to_string(), files: vec![file("vmlinuz", &format!("{name} {version} {a} kernel"))] })
            .collect(),
        ..pkg(name, version, &[], &[], &[])
    }
}

pub fn node(name: &str, mac_last: u8, class: Option<&str>) -> Node {
    Node {
        name: name.into(),
        mac: fleetboot_boot::MacAddr([0x52, 0x54, 0, 0x66, 0, mac_last]),
        uuid: None,
        node_type: "linecard".into(),
        arch: "x86_64".into(),
        location: None,
        class: class.map(str::to_string),
        features: vec![],
        image: None,
        image_version: Pin::Latest,
        packages: BTreeMap::new(),
        test: None,
        key: None,
    }
}

pub fn class(name: &str, packages: &[(&str, &str)]) -> Class {
    Class {
        name: name.into(),
        packages: packages.iter().map(|(k, v)| (k.to_string(), v.parse().unwrap())).collect(),
        ..Class::default()
    }
}

pub fn v(s: &str) -> Version {
    s.parse().unwrap()
}

/// A small fleet: base 1.0/1.1/2.0, routing 1.0 (base ^1) and 2.0 (base >=2), bgp from
/// routing, a monitor package, an image for linecards on x86_64 and aarch64.
pub fn sample() -> FleetDb {
    let mut db = FleetDb::default();
    let changes = vec![
        Change::AddPackage(image("lc-boot", "1.0", &["linecard"], &["x86_64", "aarch64"])),
        Change::AddPackage(image("lc-boot", "1.1", &["linecard"], &["x86_64"])),
        Change::AddPackage(pkg("base", "1.0", &[], &[], &["x86_64", "aarch64"])),
        Change::AddPackage(pkg("base", "1.1", &[], &[], &["x86_64", "aarch64"])),
        Change::AddPackage(pkg("base", "2.0", &[], &[], &["noarch"])),
        Change::AddPackage(pkg("routing", "1.0", &[("base", "^1")], &["bgp", "ospf"], &["x86_64", "aarch64"])),
        Change::AddPackage(pkg("routing", "2.0", &[("base", ">=2")], &["bgp", "ospf"], &["x86_64"])),
        Change::AddPackage(pkg("monitor", "0.3", &[("base", ">=1.1")], &["snmp"], &["noarch"])),
        Change::PutClass(class("linecards", &[("routing", "latest"), ("monitor", "latest")])),
    ];
    for c in &changes {
        db.apply(c).unwrap();
    }
    db
}

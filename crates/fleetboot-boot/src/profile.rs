//! Boot profiles: operator rules that map a client's identity to a boot plan.

use crate::identity::{Arch, ClientIdentity};
use serde::{Deserialize, Serialize};

/// What a client should boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BootPlan {
    /// A Linux kernel, its initrds and command line; optionally a network disk (a catalog
    /// image over NBD) named on the kernel command line.
    ///
    /// Firmware is chainloaded into iPXE (the `[pxe]` build for its architecture) unless
    /// `loader` names another first boot file: `shimx64.efi` (Secure Boot: shim, then
    /// signed GRUB), a GRUB network image, `lpxelinux.0`. Each of them asks fleetboot for its
    /// configuration — iPXE `boot/<mac>.ipxe`, GRUB `grub/grub.cfg`, PXELINUX
    /// `pxelinux.cfg/01-<mac>` — which is rendered from this same plan.
    Linux {
        kernel: String,
        #[serde(default)]
        initrd: Vec<String>,
        #[serde(default)]
        cmdline: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<Disk>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loader: Option<String>,
    },
    /// One boot file (an NBP, an EFI program, an iPXE image) handed to the client as is.
    BootFile { path: String },
    /// A custom iPXE script, sent verbatim (it must start with `#!ipxe`).
    Script { script: String },
    /// A catalog disk image booted by iPXE's `sanboot` over HTTP (read-only, Range reads of
    /// `/images/{image}`): its boot loader runs as if the disk were local.
    Sanboot { image: String },
}

/// A network disk attached to a Linux plan: the kernel command line gets
/// `fleetboot.disk=nbd://ADDR:PORT/EXPORT` (or the operator places `{disk_url}` itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// A catalog image: `NAME` (its latest version) or `NAME:VERSION`.
    pub image: String,
    /// `client` (default): the client's own copy-on-write overlay, export `IMAGE@MAC`,
    /// writable (standard or private as the server's `[nbd]` config says);
    /// `shared`: the image itself, read-only, export `IMAGE`.
    #[serde(default)]
    pub overlay: DiskOverlay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskOverlay {
    #[default]
    Client,
    Shared,
}

impl Disk {
    /// The NBD export name for a client (`IMAGE@52-54-00-..` or `IMAGE`).
    pub fn export_for(&self, mac: &crate::identity::MacAddr) -> String {
        match self.overlay {
            DiskOverlay::Client => format!("{}@{}", self.image, mac.hyphenated()),
            DiskOverlay::Shared => self.image.clone(),
        }
    }
}

/// Whether `s` is an image reference the catalog accepts: `NAME` or `NAME:VERSION`, NAME
/// 1-128 of `A-Z a-z 0-9 . _ -` not starting with `.` or `-`, VERSION a number from 1.
pub fn image_ref_ok(s: &str) -> bool {
    let (name, version) = match s.split_once(':') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let version_ok = version.is_none_or(|v| v.parse::<u32>().is_ok_and(|v| v > 0));
    name_ok && version_ok
}

fn check_image(field: &str, image: &str) -> Result<(), ProfileError> {
    if image_ref_ok(image) {
        Ok(())
    } else {
        Err(err(field, format!("{image:?} is not an image reference (NAME or NAME:VERSION; NAME of A-Z a-z 0-9 . _ -)")))
    }
}

/// Which clients a profile applies to. Every non-empty list must match (AND across
/// fields); within a list any entry may match (OR). An empty matcher matches everyone.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Matcher {
    /// MAC addresses or prefixes with a trailing `*` (`52:54:00:*`); case-insensitive.
    pub mac: Vec<String>,
    /// SMBIOS UUIDs (option 97), case-insensitive.
    pub uuid: Vec<String>,
    /// Architecture names: `bios`, `uefi-x64`, `uefi-ia32`, `arm64`, `uefi-http-x64`, ...
    pub arch: Vec<String>,
    /// Option 77 user classes (`iPXE`, or what an operator set with `set user-class`).
    pub user_class: Vec<String>,
    /// Operator-assigned client groups.
    pub group: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// Lower numbers are tried first; ties break by name.
    #[serde(default = "default_priority")]
    pub priority: i64,
    #[serde(default, rename = "match")]
    pub matcher: Matcher,
    pub boot: BootPlan,
}

fn default_priority() -> i64 {
    100
}

/// A profile field that failed validation, named the way the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {problem}")]
pub struct ProfileError {
    pub field: String,
    pub problem: String,
}

fn err(field: &str, problem: impl Into<String>) -> ProfileError {
    ProfileError { field: field.to_string(), problem: problem.into() }
}

impl Profile {
    /// Checks everything a client would otherwise trip over at boot time.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(err("name", "must be non-empty and use only letters, digits, '-', '_' or '.'"));
        }
        for (i, m) in self.matcher.mac.iter().enumerate() {
            if !mac_pattern_ok(m) {
                return Err(err(&format!("match.mac[{i}]"), format!("{m:?} is not a MAC address or a prefix ending in '*'")));
            }
        }
        for (i, a) in self.matcher.arch.iter().enumerate() {
            if Arch::from_name(a).is_none() {
                return Err(err(
                    &format!("match.arch[{i}]"),
                    format!("unknown architecture {a:?} (bios, uefi-x64, uefi-ia32, arm64, uefi-http-x64, uefi-http-arm64, arch-N)"),
                ));
            }
        }
        match &self.boot {
            BootPlan::Linux { kernel, initrd, cmdline, disk, loader } => {
                check_path("boot.kernel", kernel)?;
                if let Some(l) = loader {
                    check_path("boot.loader", l)?;
                }
                for (i, p) in initrd.iter().enumerate() {
                    check_path(&format!("boot.initrd[{i}]"), p)?;
                }
                if cmdline.contains('\n') {
                    return Err(err("boot.cmdline", "must be one line"));
                }
                match disk {
                    Some(d) => check_image("boot.disk.image", &d.image)?,
                    None if cmdline.contains("{disk_url}") => {
                        return Err(err("boot.cmdline", "uses {disk_url} but the plan has no boot.disk"))
                    }
                    None => {}
                }
            }
            BootPlan::Sanboot { image } => check_image("boot.image", image)?,
            BootPlan::BootFile { path } => check_path("boot.path", path)?,
            BootPlan::Script { script } => {
                if !script.starts_with("#!ipxe") {
                    return Err(err("boot.script", "must start with #!ipxe"));
                }
            }
        }
        Ok(())
    }

    pub fn matches(&self, c: &ClientIdentity) -> bool {
        let m = &self.matcher;
        let mac = c.mac.to_string();
        (m.mac.is_empty() || m.mac.iter().any(|p| mac_matches(p, &mac)))
            && (m.uuid.is_empty()
                || c.uuid.as_deref().is_some_and(|u| m.uuid.iter().any(|x| x.eq_ignore_ascii_case(u))))
            && (m.arch.is_empty()
                || c.arch.is_some_and(|a| m.arch.iter().any(|x| Arch::from_name(x) == Some(a))))
            && (m.user_class.is_empty()
                || c.user_class.as_deref().is_some_and(|u| m.user_class.iter().any(|x| x == u)))
            && (m.group.is_empty() || c.group.as_deref().is_some_and(|g| m.group.iter().any(|x| x == g)))
    }
}

/// A URL or a path relative to the served root; never absolute or climbing out of it.
fn check_path(field: &str, p: &str) -> Result<(), ProfileError> {
    if p.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if p.contains("://") {
        return Ok(());
    }
    if p.starts_with('/') || p.split('/').any(|s| s == "..") {
        return Err(err(field, format!("{p:?} must be a URL or a path inside the served root (no leading '/', no '..')")));
    }
    Ok(())
}

fn mac_pattern_ok(p: &str) -> bool {
    let body = p.strip_suffix('*').unwrap_or(p);
    body.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '-') && (p.ends_with('*') || p.len() == 17)
}

fn mac_matches(pattern: &str, mac: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase().replace('-', ":");
    match pattern.strip_suffix('*') {
        Some(prefix) => mac.starts_with(prefix),
        None => pattern == mac,
    }
}

/// The profile that applies to a client: the first match by (priority, name).
pub fn select<'a>(profiles: &'a [Profile], client: &ClientIdentity) -> Option<&'a Profile> {
    profiles
        .iter()
        .filter(|p| p.matches(client))
        .min_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::MacAddr;

    fn linux(name: &str, prio: i64, matcher: Matcher) -> Profile {
        Profile {
            name: name.into(),
            priority: prio,
            matcher,
            boot: BootPlan::Linux {
                kernel: "vmlinuz".into(),
                initrd: vec!["initrd.gz".into()],
                cmdline: String::new(),
                disk: None,
                loader: None,
            },
        }
    }

    fn client() -> ClientIdentity {
        ClientIdentity {
            mac: "52:54:00:77:00:10".parse().unwrap(),
            arch: Some(Arch::Bios),
            user_class: Some("iPXE".into()),
            group: Some("lab".into()),
            uuid: Some("6C2A0D1E-7E57-4B00-9000-000000000010".into()),
            ..Default::default()
        }
    }

    #[test]
    fn first_match_by_priority_wins() {
        let ps = vec![
            linux("catch-all", 1000, Matcher::default()),
            linux("by-mac", 10, Matcher { mac: vec!["52:54:00:*".into()], ..Default::default() }),
            linux("other-arch", 1, Matcher { arch: vec!["uefi-x64".into()], ..Default::default() }),
        ];
        assert_eq!(select(&ps, &client()).unwrap().name, "by-mac");
        let other = ClientIdentity { mac: MacAddr([2, 0, 0, 0, 0, 1]), ..client() };
        assert_eq!(select(&ps, &other).unwrap().name, "catch-all");
    }

    #[test]
    fn all_fields_must_match() {
        let m = Matcher {
            arch: vec!["bios".into()],
            group: vec!["lab".into()],
            uuid: vec!["6c2a0d1e-7e57-4b00-9000-000000000010".into()],
            user_class: vec!["iPXE".into()],
            mac: vec!["52-54-00-77-00-10".into()],
        };
        assert!(linux("p", 1, m.clone()).matches(&client()));
        let c = ClientIdentity { group: None, ..client() };
        assert!(!linux("p", 1, m).matches(&c));
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = linux("ok", 1, Matcher::default());
        assert!(p.validate().is_ok());
        p.matcher.arch = vec!["sparc".into()];
        assert_eq!(p.validate().unwrap_err().field, "match.arch[0]");
        p.matcher.arch.clear();
        p.boot = BootPlan::Linux { kernel: "../etc/passwd".into(), initrd: vec![], cmdline: String::new(), disk: None, loader: None };
        assert_eq!(p.validate().unwrap_err().field, "boot.kernel");
        p.boot = BootPlan::Linux { kernel: "k".into(), initrd: vec![], cmdline: String::new(), disk: None, loader: Some("/shimx64.efi".into()) };
        assert_eq!(p.validate().unwrap_err().field, "boot.loader");
        p.boot = BootPlan::Script { script: "echo hi".into() };
        assert_eq!(p.validate().unwrap_err().field, "boot.script");
        p.name = "bad name".into();
        assert_eq!(p.validate().unwrap_err().field, "name");
    }

    #[test]
    fn disks_and_sanboot_validate_and_name_the_field() {
        let disk = |image: &str, cmdline: &str| {
            let mut p = linux("d", 1, Matcher::default());
            p.boot = BootPlan::Linux {
                kernel: "vmlinuz".into(),
                initrd: vec![],
                cmdline: cmdline.into(),
                disk: (!image.is_empty()).then(|| Disk { image: image.into(), overlay: DiskOverlay::Client }),
                loader: None,
            };
            p.validate()
        };
        assert!(disk("debian-12", "root=/dev/nbd0").is_ok());
        assert!(disk("debian-12:3", "x={disk_url}").is_ok());
        for bad in ["-x", "a/b", "deb:0", "deb:x", ".hidden", "a b"] {
            assert_eq!(disk(bad, "").unwrap_err().field, "boot.disk.image", "{bad}");
        }
        assert_eq!(disk("", "x={disk_url}").unwrap_err().field, "boot.cmdline");
        let mut p = linux("s", 1, Matcher::default());
        p.boot = BootPlan::Sanboot { image: "win:2".into() };
        assert!(p.validate().is_ok());
        p.boot = BootPlan::Sanboot { image: "../win".into() };
        assert_eq!(p.validate().unwrap_err().field, "boot.image");
    }

    #[test]
    fn disk_json_shape() {
        let v = serde_json::json!({"name": "d", "boot": {"kind": "linux", "kernel": "k",
            "disk": {"image": "deb"}}});
        let p: Profile = serde_json::from_value(v).unwrap();
        let BootPlan::Linux { disk: Some(d), .. } = &p.boot else { panic!("{p:?}") };
        assert_eq!(d.overlay, DiskOverlay::Client);
        let mac: MacAddr = "52:54:00:77:00:10".parse().unwrap();
        assert_eq!(d.export_for(&mac), "deb@52-54-00-77-00-10");
        let shared = Disk { image: "deb:2".into(), overlay: DiskOverlay::Shared };
        assert_eq!(shared.export_for(&mac), "deb:2");
        let bad = serde_json::json!({"name": "d", "boot": {"kind": "linux", "kernel": "k",
            "disk": {"image": "deb", "overlay": "private"}}});
        assert!(serde_json::from_value::<Profile>(bad).is_err());
        // No disk, no loader: the fields are left out, so stored profiles keep their old shape.
        let v = serde_json::to_value(linux("x", 1, Matcher::default())).unwrap();
        assert!(v["boot"].get("disk").is_none() && v["boot"].get("loader").is_none());
        let v = serde_json::json!({"name": "sb", "boot": {"kind": "linux", "kernel": "k", "loader": "shimx64.efi"}});
        let p: Profile = serde_json::from_value(v).unwrap();
        assert!(matches!(&p.boot, BootPlan::Linux { loader: Some(l), .. } if l == "shimx64.efi"));
        let s = serde_json::json!({"name": "w", "boot": {"kind": "sanboot", "image": "win"}});
        let p: Profile = serde_json::from_value(s).unwrap();
        assert_eq!(p.boot, BootPlan::Sanboot { image: "win".into() });
    }

    #[test]
    fn json_shape_is_stable() {
        let p = linux("lab", 5, Matcher { mac: vec!["52:54:00:*".into()], ..Default::default() });
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["boot"]["kind"], "linux");
        assert_eq!(v["match"]["mac"][0], "52:54:00:*");
        let back: Profile = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }
}

//! Running `fleetboot doctor --json` on a config written for one test, and reading its
//! findings. Shared by `doctor.rs` (no root) and `doctor_e2e.rs` (namespaces).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");

/// One finding of doctor's JSON.
#[derive(Debug, Clone)]
pub struct Finding {
    pub check: String,
    pub status: String,
    pub summary: String,
    pub fix: Option<String>,
}

/// What one doctor run said.
#[derive(Debug)]
pub struct Report {
    pub exit_ok: bool,
    pub findings: Vec<Finding>,
    pub stdout: String,
}

impl Report {
    /// The findings of `check` with `status`.
    pub fn with(&self, check: &str, status: &str) -> Vec<&Finding> {
        self.findings.iter().filter(|f| f.check == check && f.status == status).collect()
    }

    /// The one finding of `check` with `status` whose summary contains `text`; fails the
    /// test with every finding printed otherwise.
    pub fn expect(&self, check: &str, status: &str, text: &str) -> &Finding {
        self.with(check, status)
            .into_iter()
            .find(|f| f.summary.contains(text))
            .unwrap_or_else(|| panic!("no {status} {check} finding containing {text:?} in:\n{}", self.stdout))
    }

    pub fn errors(&self) -> Vec<&Finding> {
        self.findings.iter().filter(|f| f.status == "error").collect()
    }

    /// No error findings, exit status 0.
    pub fn assert_clean(&self) {
        assert!(self.errors().is_empty() && self.exit_ok, "expected no errors:\n{}", self.stdout);
    }
}

/// A config for doctor under `dir`: boot files `undionly.kpxe` and `snponly.efi` in
/// `dir/root`, state in `dir/data`; TFTP and HTTP on ports the OS picks (not checked).
pub struct Setup {
    pub dir: PathBuf,
    pub address: String,
    pub interface: Option<String>,
    pub mode: String,
    pub subnet: Option<String>,
    /// Appended as is (sections, profiles).
    pub extra: String,
    pub tftp_listen: String,
    pub http_listen: String,
    pub data_dir: PathBuf,
}

impl Setup {
    pub fn new(dir: &Path) -> Setup {
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("undionly.kpxe"), b"a BIOS boot file").unwrap();
        std::fs::write(root.join("snponly.efi"), b"a UEFI boot file").unwrap();
        Setup {
            dir: dir.to_path_buf(),
            address: "127.0.0.1".into(),
            interface: Some("lo".into()),
            mode: "off".into(),
            subnet: None,
            extra: String::new(),
            tftp_listen: "127.0.0.1:0".into(),
            http_listen: "127.0.0.1:0".into(),
            data_dir: dir.join("data"),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn config_text(&self) -> String {
        let interface = self.interface.as_ref().map(|i| format!("interface = \"{i}\"\n")).unwrap_or_default();
        let subnet = self
            .subnet
            .as_ref()
            .map(|s| format!("[[dhcp.subnet]]\n{s}\n"))
            .unwrap_or_default();
        format!(
            "data_dir = \"{data}\"\n[server]\naddress = \"{addr}\"\n{interface}root = \"{root}\"\n\
             [dhcp]\nmode = \"{mode}\"\n{subnet}\
             [pxe]\ntransport = \"http\"\nbios = \"undionly.kpxe\"\nuefi_x64 = \"snponly.efi\"\n\
             [tftp]\nlisten = \"{tftp}\"\n[http]\nlisten = \"{http}\"\n{extra}",
            data = self.data_dir.display(),
            addr = self.address,
            root = self.root().display(),
            mode = self.mode,
            tftp = self.tftp_listen,
            http = self.http_listen,
            extra = self.extra,
        )
    }

    pub fn write(&self) -> PathBuf {
        let path = self.dir.join("fleetboot.toml");
        std::fs::write(&path, self.config_text()).unwrap();
        path
    }
}

/// The account the test runs as (doctor checks permissions against it by default here:
/// the baseline must pass whoever runs it).
pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `PROGRAM ... doctor --config CONFIG --json ARGS`, run by `cmd` (a plain command or one
/// wrapped in a namespace), bounded in time.
pub fn run_in(mut cmd: Command, config: &Path, args: &[&str]) -> Report {
    cmd.arg("doctor").arg("--config").arg(config).arg("--json").args(args);
    let out = fleetboot_lab::netns::output_with_timeout(cmd, Duration::from_secs(60)).expect("running fleetboot doctor");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("doctor printed no JSON ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    let findings: Vec<Finding> = doc["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| Finding {
            check: f["check"].as_str().unwrap().to_string(),
            status: f["status"].as_str().unwrap().to_string(),
            summary: f["summary"].as_str().unwrap().to_string(),
            fix: f["fix"].as_str().map(str::to_string),
        })
        .collect();
    let errors = findings.iter().filter(|f| f.status == "error").count();
    assert_eq!(doc["errors"].as_u64(), Some(errors as u64), "the error count matches the findings");
    assert_eq!(out.status.success(), errors == 0, "exit status 0 exactly when there is no error:\n{stdout}");
    for f in &findings {
        if f.status == "error" || f.status == "warning" {
            assert!(f.fix.as_deref().is_some_and(|x| !x.is_empty()), "every error and warning says how to fix it: {f:?}");
        }
    }
    Report { exit_ok: out.status.success(), findings, stdout }
}

/// `fleetboot doctor --config CONFIG --json --no-dhcp-probe ARGS` on this host.
pub fn run(config: &Path, args: &[&str]) -> Report {
    let mut all = vec!["--no-dhcp-probe"];
    all.extend_from_slice(args);
    run_in(Command::new(BIN), config, &all)
}

/// A directory of its own for one test, removed at the end (kept with
/// FLEETBOOT_E2E_KEEP=1). World-traversable, so a service account can be checked in it.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fleetboot-doctor-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("FLEETBOOT_E2E_KEEP").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

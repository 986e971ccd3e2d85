//! The lab payload: a Debian cloud kernel (`vmlinuz`) and a busybox initramfs (`initrd.gz`)
//! whose `/init` prints `FLEETBOOT-LAB-MARKER nonce=<fleetboot.nonce= from the kernel
//! command line> uptime=...` on the serial console and powers off.
//!
//! Built once by `scripts/build-payload.sh` (run by `scripts/setup.sh`) into a cache
//! directory: `$FLEETBOOT_PAYLOAD`, else `/var/cache/fleetboot-lab/payload`. Other
//! [`Part`]s are built when a firmware mode first needs them: GRUB's i386-pc network image
//! and an arm64 kernel + busybox initramfs + GRUB network image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::output_with_timeout;

/// Default cache directory of the payload.
pub const DEFAULT_DIR: &str = "/var/cache/fleetboot-lab/payload";

/// The files of the payload.
pub const FILES: [&str; 2] = ["vmlinuz", "initrd.gz"];

/// The payload directory: `$FLEETBOOT_PAYLOAD` or [`DEFAULT_DIR`].
pub fn default_dir() -> PathBuf {
    std::env::var_os("FLEETBOOT_PAYLOAD")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Whether `dir` holds a complete payload.
pub fn is_complete(dir: &Path) -> bool {
    FILES.iter().all(|f| {
        std::fs::metadata(dir.join(f))
            .map(|m| m.len() > 0)
            .unwrap_or(false)
    })
}

/// Finds `scripts/build-payload.sh`: `$FLEETBOOT_SCRIPTS/build-payload.sh`, then relative
/// to this crate's source tree, the current directory and the running executable.
pub fn find_script() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("FLEETBOOT_SCRIPTS") {
        candidates.push(PathBuf::from(d).join("build-payload.sh"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-payload.sh"));
    if let Ok(cwd) = std::env::current_dir() {
        for a in cwd.ancestors() {
            candidates.push(a.join("scripts/build-payload.sh"));
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        for a in exe.ancestors().skip(1) {
            candidates.push(a.join("scripts/build-payload.sh"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A piece of the payload, built by `scripts/build-payload.sh DIR PART`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `vmlinuz`, `initrd.gz` (x86_64).
    X86,
    /// `x86-modules/*.ko` and `x86-modules/order`: the modules the x86 kernel loads for a
    /// virtio NIC, for guests that talk to the network themselves.
    X86Net,
    /// `grub-pc/grub/i386-pc/core.0` and its modules: GRUB's i386-pc network image.
    GrubPc,
    /// `arm64/vmlinuz`, `arm64/initrd.gz`, `arm64/grubnetaa64.efi`.
    Arm64,
}

impl Part {
    fn arg(&self) -> &'static str {
        match self {
            Part::X86 => "x86",
            Part::X86Net => "x86-net",
            Part::GrubPc => "grub-pc",
            Part::Arm64 => "arm64",
        }
    }

    /// The files that must exist (non-empty) for the part to be complete.
    pub fn files(&self) -> &'static [&'static str] {
        match self {
            Part::X86 => &FILES,
            Part::X86Net => &["x86-modules/order", "x86-modules/virtio_net.ko"],
            Part::GrubPc => &["grub-pc/grub/i386-pc/core.0", "grub-pc/grub/i386-pc/linux.mod"],
            Part::Arm64 => &["arm64/vmlinuz", "arm64/initrd.gz", "arm64/grubnetaa64.efi"],
        }
    }

    pub fn is_complete(&self, dir: &Path) -> bool {
        self.files().iter().all(|f| std::fs::metadata(dir.join(f)).map(|m| m.len() > 0).unwrap_or(false))
    }
}

/// Ensures the payload exists in `dir` (default: [`default_dir`]), building it with
/// `scripts/build-payload.sh` if needed (bounded to 10 minutes). Returns the directory.
pub fn ensure(dir: Option<&Path>) -> Result<PathBuf> {
    ensure_part(dir, Part::X86)
}

/// [`ensure`] for one [`Part`].
pub fn ensure_part(dir: Option<&Path>, part: Part) -> Result<PathBuf> {
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(default_dir);
    if part.is_complete(&dir) {
        return Ok(dir);
    }
    let script = find_script().context(
        "the lab payload is missing and scripts/build-payload.sh was not found \
         (run scripts/setup.sh, or set FLEETBOOT_PAYLOAD / FLEETBOOT_SCRIPTS)",
    )?;
    eprintln!(
        "fleetboot-lab: building the payload ({}) into {} with {}",
        part.arg(),
        dir.display(),
        script.display()
    );
    let mut c = Command::new("bash");
    c.arg(&script).arg(&dir).arg(part.arg());
    let out = output_with_timeout(c, Duration::from_secs(600))?;
    if !out.status.success() || !part.is_complete(&dir) {
        bail!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(dir)
}

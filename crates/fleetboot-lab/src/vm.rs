//! One QEMU VM booting from the network, like the reference script: `-accel tcg` (KVM
//! hangs on these machines), `-uuid` (or option 97 is zeros), virtio-net on a tap, the
//! serial console on stdout, read line by line from a pipe (the VM powers off ~10 ms after
//! printing the marker). QEMU's exit status proves nothing: only the whole marker line
//! `FLEETBOOT-LAB-MARKER nonce=<NONCE>-<mac hexhyp>` at the start of a console line counts
//! (the kernel also echoes its command line, which contains the nonce).
//!
//! [`Firmware`] says what boots: QEMU's iPXE ROM on SeaBIOS, or UEFI firmware with its own
//! network stack (the NIC gets no option ROM, `romfile=`): OVMF for PXE, HTTP Boot (PXE
//! switched off through fw_cfg, so the firmware goes straight to HTTP) and Secure Boot
//! (Microsoft's keys enrolled), AAVMF under `qemu-system-aarch64` for arm64. Each VM gets
//! its own copy of the firmware's variable store, next to its console log.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::netns::Lab;

/// Console lines that end a boot early (as failures).
pub const FAILURES: [&str; 4] = [
    "No more network devices",
    "No bootable device",
    "Kernel panic",
    "Boot failed",
];

/// Console lines of UEFI firmware that end a boot early: the network boot option failed
/// (no offer, a download error, an image refused under Secure Boot) or shim refused one.
pub const UEFI_FAILURES: [&str; 4] = [
    "BdsDxe: failed to load",
    "Access Denied",
    "Security Violation",
    "Verification failed",
];

/// The firmware a lab VM boots with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Firmware {
    /// SeaBIOS with QEMU's iPXE ROM for virtio-net (iPXE from the first instruction).
    #[default]
    Bios,
    /// OVMF, its own PXE stack (arch 7): the boot file over TFTP.
    Uefi,
    /// OVMF, UEFI HTTP Boot only (arch 16, `HTTPClient`): the boot file is a URL.
    UefiHttp,
    /// OVMF with Secure Boot enforced and Microsoft's keys enrolled; PXE.
    SecureBoot,
    /// AAVMF on `qemu-system-aarch64 -M virt` (arch 11); PXE.
    Arm64,
}

/// OVMF (Debian's `ovmf`): code and the variable store template.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// OVMF built for Secure Boot, and a variable store with Microsoft's keys enrolled.
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.ms.fd";
pub const OVMF_VARS_MS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
/// AAVMF (Debian's `qemu-efi-aarch64`).
pub const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
pub const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

impl Firmware {
    pub const ALL: [Firmware; 5] =
        [Firmware::Bios, Firmware::Uefi, Firmware::UefiHttp, Firmware::SecureBoot, Firmware::Arm64];

    pub fn name(&self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UefiHttp => "uefi-http",
            Firmware::SecureBoot => "secureboot",
            Firmware::Arm64 => "arm64",
        }
    }

    pub fn is_uefi(&self) -> bool {
        *self != Firmware::Bios
    }

    /// The QEMU system emulator.
    pub fn qemu(&self) -> &'static str {
        match self {
            Firmware::Arm64 => "qemu-system-aarch64",
            _ => "qemu-system-x86_64",
        }
    }

    /// The firmware code and variable store template, for UEFI.
    pub fn flash(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Firmware::Bios => None,
            Firmware::Uefi | Firmware::UefiHttp => Some((OVMF_CODE, OVMF_VARS)),
            Firmware::SecureBoot => Some((OVMF_CODE_SECBOOT, OVMF_VARS_MS)),
            Firmware::Arm64 => Some((AAVMF_CODE, AAVMF_VARS)),
        }
    }

    /// The DHCP client architecture (option 93) this firmware sends.
    pub fn arch_code(&self) -> u16 {
        match self {
            Firmware::Bios => 0,
            Firmware::Uefi | Firmware::SecureBoot => 7,
            Firmware::UefiHttp => 16,
            Firmware::Arm64 => 11,
        }
    }

    /// Whether the console line ends this firmware's boot as a failure.
    pub fn failure_in(&self, line: &str) -> Option<&'static str> {
        failure_in(line).or_else(|| {
            self.is_uefi().then(|| UEFI_FAILURES.iter().copied().find(|f| line.contains(f))).flatten()
        })
    }

    /// What QEMU needs besides the NIC and the console.
    fn machine_args(&self, vars: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |v: &[&str]| a.extend(v.iter().map(|s| s.to_string()));
        match self {
            Firmware::Bios => push(&["-m", "256", "-boot", "n"]),
            Firmware::Uefi | Firmware::UefiHttp => push(&["-machine", "q35", "-m", "512"]),
            // Secure Boot as libvirt sets it up: variables writable only from SMM.
            Firmware::SecureBoot => {
                push(&["-machine", "q35,smm=on", "-m", "512", "-global", "driver=cfi.pflash01,property=secure,value=on"])
            }
            Firmware::Arm64 => push(&["-machine", "virt", "-cpu", "cortex-a57", "-m", "512"]),
        }
        if let Some((code, _)) = self.flash() {
            push(&["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={code}")]);
            push(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", vars.display())]);
            // IPv6 network boot would only add attempts (each costs tens of seconds) after
            // a failed IPv4 one; HTTP Boot runs alone, without PXE before it.
            push(&["-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=n"]);
            if *self == Firmware::UefiHttp {
                push(&["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]);
            }
        }
        a
    }

    /// The NIC: QEMU's iPXE ROM on BIOS; no option ROM on UEFI, so the firmware's own
    /// network stack boots.
    fn nic(&self, mac: &str) -> String {
        match self {
            Firmware::Bios => format!("virtio-net-pci,netdev=n0,mac={mac}"),
            _ => format!("virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex=1"),
        }
    }
}

impl std::str::FromStr for Firmware {
    type Err = String;
    fn from_str(s: &str) -> Result<Firmware, String> {
        Firmware::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            format!("unknown firmware {s:?} (bios, uefi, uefi-http, secureboot, arm64)")
        })
    }
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default per-VM time limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// The MAC of VM `index`: 52:54:00:77:00:(0x10+index).
pub fn mac_for(index: usize) -> String {
    format!("52:54:00:77:00:{:02x}", 0x10 + index)
}

/// The UUID of VM `index`, like the reference script.
pub fn uuid_for(index: usize) -> String {
    format!("6c2a0d1e-7e57-4b00-9000-0000000000{:02x}", index)
}

/// `52:54:00:77:00:10` → `52-54-00-77-00-10` (iPXE's `${mac:hexhyp}`).
pub fn mac_hyphen(mac: &str) -> String {
    mac.replace(':', "-")
}

/// The marker line VM `mac` prints in a run with `nonce`.
pub fn marker_for(nonce: &str, mac: &str) -> String {
    format!("FLEETBOOT-LAB-MARKER nonce={nonce}-{}", mac_hyphen(mac))
}

/// Removes ANSI escape sequences (iPXE draws with them) and surrounding `\r`.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                // CSI: parameters/intermediates until a final byte 0x40..=0x7e
                for d in it.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&d) {
                        break;
                    }
                }
            } else {
                it.next();
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Whether a console line is exactly the marker `want` (followed by nothing or a space).
pub fn is_marker(line: &str, want: &str) -> bool {
    let l = strip_ansi(line);
    match l.strip_prefix(want) {
        Some(rest) => rest.is_empty() || rest.starts_with(char::is_whitespace),
        None => false,
    }
}

/// The failure pattern a console line contains, if any.
pub fn failure_in(line: &str) -> Option<&'static str> {
    FAILURES.iter().copied().find(|f| line.contains(f))
}

/// What one VM should do.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub index: usize,
    pub mac: String,
    pub uuid: String,
    /// Tap in the lab's switch namespace.
    pub tap: String,
    /// Per-run nonce; the expected marker is [`marker_for`]`(nonce, mac)`.
    pub nonce: String,
    pub timeout: Duration,
    /// Console log (`<elapsed s> <line>`); QEMU's stderr goes next to it (`.qemu.err`),
    /// and so does a UEFI VM's variable store (`.vars.fd`).
    pub log_path: PathBuf,
    pub firmware: Firmware,
    /// Console lines that are the expected end of this boot instead of the marker (a
    /// refusal under Secure Boot): the first one seen ends the boot as
    /// [`VmOutcome::Expected`].
    pub expect_instead: Vec<String>,
}

impl VmSpec {
    /// VM `index` on `tap`, MAC/UUID by index, logs `vm<index>.log` in `dir`.
    pub fn new(index: usize, tap: &str, nonce: &str, dir: &Path) -> VmSpec {
        VmSpec {
            index,
            mac: mac_for(index),
            uuid: uuid_for(index),
            tap: tap.to_string(),
            nonce: nonce.to_string(),
            timeout: DEFAULT_TIMEOUT,
            log_path: dir.join(format!("vm{index}.log")),
            firmware: Firmware::Bios,
            expect_instead: Vec::new(),
        }
    }
}

/// How a VM's boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The marker line appeared this long after QEMU started.
    Marker(Duration),
    /// A failure line appeared, or QEMU exited without the marker.
    Failed { after: Duration, reason: String },
    /// No marker within the time limit.
    Timeout(Duration),
    /// A line of [`VmSpec::expect_instead`] appeared (the whole line, ANSI removed).
    Expected { after: Duration, line: String },
}

impl VmOutcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, VmOutcome::Marker(_))
    }

    /// Time to the marker, if it appeared.
    pub fn marker_time(&self) -> Option<Duration> {
        match self {
            VmOutcome::Marker(d) => Some(*d),
            _ => None,
        }
    }
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::Marker(d) => write!(f, "OK {:.2}s", d.as_secs_f64()),
            VmOutcome::Failed { after, reason } => {
                write!(f, "FAIL {:.2}s ({reason})", after.as_secs_f64())
            }
            VmOutcome::Timeout(d) => write!(f, "TIMEOUT after {:.0}s", d.as_secs_f64()),
            VmOutcome::Expected { after, line } => write!(f, "EXPECTED {:.2}s ({line})", after.as_secs_f64()),
        }
    }
}

/// One console line and when it arrived (since QEMU started).
#[derive(Clone, Debug)]
pub struct ConsoleLine {
    pub at: Duration,
    pub text: String,
}

/// The result of [`boot`].
#[derive(Clone, Debug)]
pub struct VmRun {
    pub index: usize,
    pub mac: String,
    pub uuid: String,
    /// Wall-clock time QEMU was started (to align server-side events).
    pub started: SystemTime,
    pub outcome: VmOutcome,
    pub console: Vec<ConsoleLine>,
    pub log_path: PathBuf,
}

/// Boots one VM in the lab's switch namespace and watches its console until the marker,
/// a failure line, QEMU's exit or the time limit; QEMU is always stopped before returning.
pub fn boot(lab: &Lab, spec: &VmSpec) -> Result<VmRun> {
    let want = marker_for(&spec.nonce, &spec.mac);
    let err_path = spec.log_path.with_extension("qemu.err");
    let stderr =
        File::create(&err_path).with_context(|| format!("creating {}", err_path.display()))?;
    let mut log = File::create(&spec.log_path)
        .with_context(|| format!("creating {}", spec.log_path.display()))?;
    let vars = spec.log_path.with_extension("vars.fd");
    if let Some((_, template)) = spec.firmware.flash() {
        // Each VM writes its own boot variables; the template stays untouched.
        std::fs::copy(template, &vars)
            .with_context(|| format!("copying the UEFI variable store {template}"))?;
    }
    let mut cmd = lab.cmd(lab.switch_ns(), "timeout");
    cmd.arg("--kill-after=5")
        .arg(format!("{}", spec.timeout.as_secs().max(1) + 5))
        .arg(spec.firmware.qemu())
        .args(["-accel", "tcg", "-nodefaults", "-nographic", "-no-reboot"])
        .args(spec.firmware.machine_args(&vars))
        .args(["-uuid", &spec.uuid])
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={},script=no,downscript=no",
            spec.tap
        ))
        .arg("-device")
        .arg(spec.firmware.nic(&spec.mac))
        .args(["-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut child = lab.spawn_tracked(&mut cmd)?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let reader = thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let terminate = || {
        // SAFETY: kill(2) on the `timeout` process we started; it forwards to QEMU.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    };
    let mut outcome: Option<VmOutcome> = None;
    let mut console = Vec::new();
    let mut stop_at = t0 + spec.timeout;
    loop {
        let now = Instant::now();
        if now >= stop_at {
            if outcome.is_none() {
                outcome = Some(VmOutcome::Timeout(now - t0));
            }
            terminate();
            break;
        }
        match rx.recv_timeout(stop_at - now) {
            Ok((t, text)) => {
                let at = t.saturating_duration_since(t0);
                let _ = writeln!(log, "{:8.3} {}", at.as_secs_f64(), text);
                if outcome.is_none() {
                    let clean = strip_ansi(&text);
                    if is_marker(&text, &want) {
                        outcome = Some(VmOutcome::Marker(at));
                        // it powers off by itself; give it a moment, then stop it
                        stop_at = stop_at.min(Instant::now() + Duration::from_secs(10));
                    } else if let Some(e) = spec.expect_instead.iter().find(|e| clean.contains(e.as_str())) {
                        let _ = e;
                        outcome = Some(VmOutcome::Expected { after: at, line: clean.trim().to_string() });
                        terminate();
                        stop_at = Instant::now() + Duration::from_secs(5);
                    } else if spec.firmware.failure_in(&text).is_some() {
                        outcome = Some(VmOutcome::Failed {
                            after: at,
                            reason: strip_ansi(&text).trim().chars().take(80).collect(),
                        });
                        terminate();
                        stop_at = Instant::now() + Duration::from_secs(5);
                    }
                }
                console.push(ConsoleLine { at, text });
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break, // EOF: QEMU exited
        }
    }
    // reap QEMU (bounded), then forget its pid
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(25)),
            _ => {
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    lab.untrack(pid);
    drop(rx);
    let _ = reader.join();
    let _ = std::fs::remove_file(&vars);
    let outcome = outcome.unwrap_or_else(|| {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        let tail = err.lines().last().unwrap_or("").trim().to_string();
        VmOutcome::Failed {
            after: t0.elapsed(),
            reason: format!(
                "QEMU exited without the marker ({}){}",
                status.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            ),
        }
    });
    Ok(VmRun {
        index: spec.index,
        mac: spec.mac.clone(),
        uuid: spec.uuid.clone(),
        started,
        outcome,
        console,
        log_path: spec.log_path.clone(),
    })
}

/// Milestones recognised on the console, in boot order: (pattern, label). The time of a
/// line is when it ended, so iPXE's "... ok" lines mark completion. The firmware, shim,
/// GRUB and PXELINUX lines only appear when those run.
pub const MILESTONES: [(&str, &str); 16] = [
    ("Start PXE over IPv4", "firmware PXE started"),
    ("Start HTTP Boot over IPv4", "firmware HTTP Boot started"),
    ("NBP file downloaded successfully", "firmware fetched boot file"),
    ("BdsDxe: starting Boot", "firmware started boot file"),
    ("Fetching Netboot Image", "shim fetches GRUB"),
    ("Welcome to GRUB", "GRUB started"),
    ("PXELINUX ", "PXELINUX started"),
    ("fleetboot: loading", "GRUB loads the kernel"),
    ("EFI stub: UEFI Secure Boot is enabled", "kernel: Secure Boot on"),
    ("iPXE initialising devices", "iPXE started"),
    ("Configuring (net", "iPXE DHCP done"),
    (".ipxe...", "boot script fetched"),
    ("vmlinuz...", "kernel fetched"),
    ("initrd.gz...", "initrd fetched"),
    ("Linux version", "Linux started"),
    ("Run /init", "init started"),
];

/// The first console line matching each [`MILESTONES`] pattern: (time, label, line).
pub fn console_milestones(console: &[ConsoleLine]) -> Vec<(Duration, &'static str, String)> {
    let mut out = Vec::new();
    for (pat, label) in MILESTONES {
        if let Some(l) = console.iter().find(|l| l.text.contains(pat)) {
            out.push((
                l.at,
                label,
                strip_ansi(&l.text).trim().chars().take(100).collect(),
            ));
        }
    }
    out.sort_by_key(|m| m.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_matches_whole_line_only() {
        let want = marker_for("abc123", "52:54:00:77:00:10");
        assert_eq!(want, "FLEETBOOT-LAB-MARKER nonce=abc123-52-54-00-77-00-10");
        assert!(is_marker(&format!("{want} uptime=4.2\r"), &want));
        assert!(is_marker(&want, &want));
        assert!(!is_marker(&format!("{want}0 uptime=1"), &want));
        assert!(!is_marker(
            &format!("[    0.000000] Command line: console=ttyS0 fleetboot.nonce=abc123-52-54-00-77-00-10 {want}"),
            &want
        ));
        assert!(is_marker(&format!("\u{1b}[0m{want} uptime=1"), &want));
    }

    #[test]
    fn firmware_names_and_failures() {
        for f in Firmware::ALL {
            assert_eq!(f.name().parse::<Firmware>(), Ok(f));
        }
        assert!("efi".parse::<Firmware>().is_err());
        let denied = "BdsDxe: failed to load Boot0001 \"UEFI PXEv4 (MAC:525400770010)\": Access Denied";
        assert!(Firmware::SecureBoot.failure_in(denied).is_some());
        // A BIOS console never shows UEFI lines; its own failures count everywhere.
        assert!(Firmware::Bios.failure_in(denied).is_none());
        assert!(Firmware::Arm64.failure_in("Kernel panic - not syncing").is_some());
        assert_eq!(Firmware::Arm64.qemu(), "qemu-system-aarch64");
        assert_eq!((Firmware::Uefi.arch_code(), Firmware::UefiHttp.arch_code(), Firmware::Arm64.arch_code()), (7, 16, 11));
        // HTTP Boot only: PXE switched off, so the firmware does not try it first.
        let args = Firmware::UefiHttp.machine_args(Path::new("/tmp/v.fd")).join(" ");
        assert!(args.contains("opt/org.tianocore/IPv4PXESupport,string=n"), "{args}");
        assert!(!Firmware::Uefi.machine_args(Path::new("/tmp/v.fd")).join(" ").contains("IPv4PXESupport"));
        let sb = Firmware::SecureBoot.machine_args(Path::new("/tmp/v.fd")).join(" ");
        assert!(sb.contains("OVMF_CODE_4M.ms.fd") && sb.contains("smm=on") && sb.contains("file=/tmp/v.fd"), "{sb}");
        assert!(Firmware::Uefi.nic("52:54:00:77:00:10").contains("romfile=,"));
        assert!(!Firmware::Bios.nic("52:54:00:77:00:10").contains("romfile"));
    }

    #[test]
    fn macs_and_uuids() {
        assert_eq!(mac_for(0), "52:54:00:77:00:10");
        assert_eq!(mac_for(2), "52:54:00:77:00:12");
        assert_eq!(uuid_for(1), "6c2a0d1e-7e57-4b00-9000-000000000001");
        assert_eq!(
            failure_in("No more network devices"),
            Some("No more network devices")
        );
    }
}
